"""Retrieval evaluation: ITC Recall@K both ways, and the same after ITM re-ranking of the top candidates.

Re-ranking: for each query, ITC's top `rerank_k` candidates are scored by the ITM head; they are put
first, ordered by ITM log-odds + `weight` x cosine, and the rest keep ITC's order after them. So
re-ranked Recall@K for K <= rerank_k is capped by ITC's Recall@rerank_k (reported beside it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipkit.data.captions import RetrievalSet
from clipkit.encode import encode_gallery, encode_images, encode_texts
from clipkit.errors import ModelMismatchError
from clipkit.itm import require_itm
from clipkit.metrics import image_to_text_ranks, summarize, text_to_image_ranks
from clipkit.models import Model
from clipkit.rerankers import HeadReranker, load_reranker

_RERANKED = 1e4  # added to re-ranked candidates' scores so they stay ahead of the rest


@dataclass
class Evaluation:
    itc: dict
    rerank: dict | None = None
    seconds: dict = field(default_factory=dict)
    n_images: int = 0
    n_texts: int = 0
    weight: float | None = None  # the cosine weight text -> image re-ranking used
    weight_i2t: float | None = None  # ... and image -> text
    reranker: str | None = None  # the re-ranker, when not the model's own ITM head


def _rerank_rows(similarity: np.ndarray, rerank_k: int, score_pairs, weight: float,
                 chunk: int = 2048) -> np.ndarray:
    """Rows of `similarity` with each row's top-k columns rescored by score_pairs(rows, cols), `chunk`
    pairs at a time (the head's inputs for all pairs at once would not fit: ~63 GB for COCO 5k, k=16)."""
    k = min(rerank_k, similarity.shape[1])
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(len(similarity)), k)
    cols = top.reshape(-1)
    itm = np.concatenate([score_pairs(rows[start:start + chunk], cols[start:start + chunk])
                          for start in range(0, len(rows), chunk)]) if len(rows) else np.zeros(0, np.float32)
    out = similarity.copy()
    out[rows, cols] = _RERANKED + itm + weight * similarity[rows, cols]
    return out


def similarity_matrix(text_emb: np.ndarray, image_emb: np.ndarray, cells: int = 1 << 26) -> np.ndarray:
    """(texts, images) cosine similarities; images of several vectors (N, V, D) score their best vector,
    computed a block of images at a time (at most `cells` numbers at once)."""
    if image_emb.ndim == 2:
        return text_emb @ image_emb.T
    out = np.empty((len(text_emb), len(image_emb)), np.float32)
    step = max(1, cells // max(1, len(text_emb) * image_emb.shape[1]))
    for start in range(0, len(image_emb), step):
        block = image_emb[start:start + step]
        out[:, start:start + step] = np.einsum("td,nvd->tnv", text_emb, block).max(axis=2)
    return out


def evaluate(model: Model | None, data: RetrievalSet, *, rerank: bool = False, rerank_k: int = 16,
             weight: float | None = None, batch_size: int = 128, ks=(1, 5, 10), reranker=None,
             embedded: tuple | None = None) -> Evaluation:
    """Encode `data` with `model` and measure retrieval, ITC only and (with rerank) ITC + ITM: the model's own
    head, or `reranker` (`clipkit.load_reranker`, e.g. a BLIP ITM model) when given. `embedded`: (image, caption)
    embeddings `model` made of `data` already (an index's: `index_set`), used instead of embedding it again
    (`model` may then be None, without re-ranking)."""
    if rerank_k < 1:
        raise ValueError(f"rerank_k must be at least 1, got {rerank_k}")
    rerank = rerank or reranker is not None
    if rerank:  # (re-ranking holds the captions x images similarities, three copies; ITC alone one block of them)
        check_fits(len(data.captions), len(data.images), copies=3)
    if rerank and reranker is None and model.vectors_per_image > 1:
        reranker = model  # BLIP-2: the checkpoint's own ITM head (load_reranker)
    head = require_itm(model) if rerank and reranker is None else None
    seconds = {}
    image_emb, images, text_emb = _embeddings(model, data, batch_size, head is not None, embedded, seconds)
    start = time.perf_counter()
    mapping = data.text_to_image
    t2i, i2t, similarity = _itc_ranks(text_emb, image_emb, mapping, dense=rerank)
    result = Evaluation(itc=summarize(t2i, i2t, ks), n_images=len(data.images), n_texts=len(data.captions))
    result.itc[f"t2i_R@{rerank_k}"] = float((t2i <= rerank_k).mean())
    result.itc[f"i2t_R@{rerank_k}"] = float((i2t <= rerank_k).mean())
    seconds["itc_search"] = time.perf_counter() - start

    if rerank:
        start = time.perf_counter()
        if reranker is not None:  # another model: it prepares the images its own way
            reranker = load_reranker(reranker)
            result.reranker = reranker.name
            images = reranker.image_inputs(data.images)
        else:  # the model's own head, whose image states came with the embeddings
            reranker = HeadReranker(model)
        texts = reranker.text_inputs(data.captions)
        result.weight, result.weight_i2t = reranker.cosine_weight(weight), reranker.cosine_weight(weight, "i2t")

        def t2i_pairs(rows, cols):  # rows: captions, cols: images
            return reranker.match(images, cols, texts, rows)

        def i2t_pairs(rows, cols):  # rows: images, cols: captions
            return reranker.match(images, rows, texts, cols)

        t2i_sim = _rerank_rows(similarity, rerank_k, t2i_pairs, result.weight)
        i2t_sim = _rerank_rows(similarity.T, rerank_k, i2t_pairs, result.weight_i2t)
        t2i = text_to_image_ranks(lambda a, b: t2i_sim[a:b], len(data.captions), mapping)
        i2t = image_to_text_ranks(lambda a, b: i2t_sim[a:b], len(data.images), mapping)
        result.rerank = summarize(t2i, i2t, ks)
        seconds["itm_rerank"] = time.perf_counter() - start
    result.seconds = seconds
    return result


def _embeddings(model, data: RetrievalSet, batch_size: int, states: bool, embedded: tuple | None,
                seconds: dict) -> tuple:
    """(image embeddings, the ITM head's image inputs when `states`, caption embeddings): `embedded`'s where
    given (the images encoded all the same for their head states), else encoded; the seconds each took."""
    start, images = time.perf_counter(), None
    if embedded is None or states:
        image_emb, images = encode_gallery(model, data.images, batch_size, states=states)
        seconds["encode_images"] = time.perf_counter() - start
    if embedded is not None:
        return embedded[0], images, embedded[1]
    start = time.perf_counter()
    text_emb = encode_texts(data.captions, model, batch_size)
    seconds["encode_texts"] = time.perf_counter() - start
    return image_emb, images, text_emb


BLOCK_CELLS = 1 << 24  # similarities computed at once for ITC ranks (64 MB of float32)


def _itc_ranks(text_emb: np.ndarray, image_emb: np.ndarray, mapping: np.ndarray, dense: bool) -> tuple:
    """(text->image ranks, image->text ranks, the captions x images similarity matrix if `dense` else None):
    without it (ITC alone) the similarities are computed a block of rows at a time as the ranks read them, so
    that memory holds the embeddings and one block, whatever the number of captions and images."""
    n_texts, n_images = len(text_emb), len(image_emb)
    if dense:
        similarity = similarity_matrix(text_emb, image_emb)
        rows, columns = (lambda a, b: similarity[a:b]), (lambda a, b: similarity[:, a:b].T)
    else:
        similarity = None
        rows = lambda a, b: similarity_matrix(text_emb[a:b], image_emb)  # noqa: E731
        columns = lambda a, b: similarity_matrix(text_emb, image_emb[a:b]).T  # noqa: E731
    t2i = text_to_image_ranks(rows, n_texts, mapping, block=max(1, min(1024, BLOCK_CELLS // max(1, n_images))))
    i2t = image_to_text_ranks(columns, n_images, mapping, block=max(1, min(1024, BLOCK_CELLS // max(1, n_texts))))
    return t2i, i2t, similarity


def check_fits(n_texts: int, n_images: int, copies: int = 1) -> None:
    """Refuse an evaluation whose (captions x images) similarity matrices (`copies` of them) would not fit in
    half of this machine's memory, saying how to evaluate a sample instead."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = n_texts * n_images * 4 * copies
    if need > total // 2:
        raise ValueError(f"{n_images} images x {n_texts} captions: every caption is ranked against every image, "
                         f"which needs {need / 2**30:.1f} GiB here, more than half of this machine's "
                         f"{total / 2**30:.0f} GiB; evaluate a random sample of the images: --n-images N")


# ---------------------------------------------------------------------------------------------
# Binding (Winoground-style)


def binding(model: Model, pairs: list, *, rerank: bool = False, reranker=None, weight: float | None = None) -> dict:
    """Winoground-style scores over (scene, swapped twin) pairs (`clipkit.data.synthetic.binding_pairs`): text
    (each image scores its own caption above the other), image (each caption scores its own image above the
    other) and group (both), by ITC cosine and, with `rerank` (or a `reranker`), by the re-ranking score
    (`score_pairs`'s); overall and per kind of swap. Chance: 0.25 / 0.25 / 0.17."""
    if not pairs:
        raise ValueError("binding needs at least one pair")
    images = [image for pair in pairs for image in pair.images]
    texts = [caption for pair in pairs for caption in pair.captions]
    base = 2 * np.repeat(np.arange(len(pairs)), 4)
    image_index, text_index = base + np.tile([0, 0, 1, 1], len(pairs)), base + np.tile([0, 1, 0, 1], len(pairs))
    image_emb, text_emb = encode_images(images, model), encode_texts(texts, model)
    scores = {"itc": np.sum(image_emb[image_index] * text_emb[text_index], axis=1)}
    if rerank or reranker is not None:
        reranker = load_reranker(reranker if reranker is not None else model)
        matched = reranker.match(reranker.image_inputs(images), image_index, reranker.text_inputs(texts), text_index)
        scores["rerank"] = matched + reranker.cosine_weight(weight) * scores["itc"]
    kinds = np.array([pair.kind for pair in pairs])
    report: dict = {"pairs": len(pairs)}
    for method, values in scores.items():
        wins = _winoground(values.reshape(-1, 4))
        report[method] = {name: float(won.mean()) for name, won in wins.items()}
        report[f"{method}_by_kind"] = {kind: {name: float(won[kinds == kind].mean()) for name, won in wins.items()}
                                       for kind in sorted(set(kinds))}
    return report


def _winoground(scores: np.ndarray) -> dict[str, np.ndarray]:
    """Per pair, from the scores (image 0 + caption 0, image 0 + caption 1, image 1 + caption 0, image 1 +
    caption 1): whether each image prefers its caption (text), each caption its image (image), and both."""
    s00, s01, s10, s11 = scores.T
    text = (s00 > s01) & (s11 > s10)
    image = (s00 > s10) & (s11 > s01)
    return {"text": text, "image": image, "group": text & image}


# ---------------------------------------------------------------------------------------------
# The benchmark (benchmarks/retrieval.py and `clipkit eval`)

DATASETS = ("synthetic", "flickr30k", "coco", "wds", "folder")


def load_dataset(dataset: str = "synthetic", *, root: str | None = None, captions: str | None = None,
                 split: str = "test", n_images: int | None = None, seed: int = 0) -> RetrievalSet:
    """A retrieval set: the synthetic test split (`n_images`, `seed`), Flickr30k / COCO (`root` the image folder,
    `captions` the Karpathy JSON), webdataset shards (`root` their URLs) or a folder of images with NAME.txt
    captions ("folder:DIR", or "folder" with `root`). A path as `dataset` is what it holds: shards (a .tar, a
    brace pattern or glob, a folder of them), a caption table (.csv/.tsv/.jsonl/.parquet), or a folder."""
    from clipkit.data.captions import read_any_set, read_karpathy, read_shard_set, synthetic_set
    from clipkit.data.shardspec import is_shard_spec

    if dataset.startswith("folder:"):
        dataset, root = "folder", dataset.split(":", 1)[1]
    elif dataset not in DATASETS and (os.path.exists(dataset) or is_shard_spec(dataset)):  # a path, not a name
        return read_any_set(dataset)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}, or the path of a folder of "
                         "images with NAME.txt captions, of shards, or of a caption table")
    if dataset == "synthetic":
        return synthetic_set(n_images or 1000, seed=seed, split=split)
    if not root:
        raise ValueError(f"--dataset {dataset} needs --root (the image folder, or shard URLs for wds)")
    if dataset == "wds":
        return read_shard_set(root)
    if dataset == "folder":
        return read_any_set(root)  # (a folder of shards is read as shards)
    captions = captions or str(Path(root) / f"dataset_{dataset}.json")
    return read_karpathy(captions, root, split=split, name=dataset)


def index_set(path: str, n_images: int | None = None, seed: int = 0) -> tuple:
    """The captioned images of a clipkit index as a retrieval set, with the embeddings the index holds of them
    and of their captions (nothing is embedded again), and the index: every captioned image, or a random
    `n_images` of the index's images (with `seed`) that have captions: (data, (image, caption embeddings), index)."""
    from clipkit.index import Index
    from clipkit.index.captions import image_of, texts_of_images
    from clipkit.index.shards import item_image

    index = Index.load(path)
    captions = index.captions
    if captions is None or not len(captions):
        raise ValueError(f"{path} holds no captions to evaluate with: index images with their captions (NAME.txt "
                         "beside NAME.jpg, or a caption table), or give --dataset the captioned data itself")
    image_ids = index.ids()
    if n_images is not None and n_images < len(image_ids):
        chosen = np.sort(np.random.default_rng(seed).choice(len(image_ids), n_images, replace=False))
        image_ids = [image_ids[i] for i in chosen]
    texts = texts_of_images(captions, image_ids)  # caption id -> its text
    of_image: dict[str, list[str]] = {}
    for caption_id in texts:
        of_image.setdefault(image_of(caption_id), []).append(caption_id)
    image_ids = [i for i in image_ids if str(i) in of_image]
    caption_ids = [c for i in image_ids for c in of_image[str(i)]]
    data = RetrievalSet(name=f"index:{Path(path).name}",
                        images=[item_image(r.get("path"), r) or r["id"] for r in index.get(image_ids)],
                        captions=[texts[c] for c in caption_ids],
                        text_to_image=[n for n, i in enumerate(image_ids) for _ in of_image[str(i)]])
    return data, (index.embeddings(image_ids), captions.embeddings(caption_ids)), index


def _index_model(index, model: str | None, pretrained: str | None, device: str | None) -> Model:
    """The model an index's embeddings were made by: the one it records, or `model` when it is that one."""
    from clipkit.models import load_model, load_recorded_model

    if model is None:
        return load_recorded_model(index.model_info, device=device)
    loaded = load_model(model, pretrained, device=device)
    try:
        index.check_model(loaded)
    except ModelMismatchError:
        info = index.model_info or {}
        raise ModelMismatchError(f"--model {model}: the index's embeddings were made by {info.get('name')!r} "
                                 f"(pretrained={info.get('pretrained')!r}); leave out --model to evaluate them with "
                                 "it, or give --dataset the captioned data to embed it with another") from None
    return loaded


def _by_direction(metrics: dict | None, ks) -> dict | None:
    if metrics is None:
        return None
    return {d: {**{f"R@{k}": metrics[f"{d}_R@{k}"] for k in ks}, "mean_rank": metrics[f"{d}_mean_rank"],
                "median_rank": metrics[f"{d}_median_rank"]} for d in ("t2i", "i2t")}


def run_benchmark(dataset: str = "synthetic", *, model: str | None = None, pretrained: str | None = None,
                  rerank: bool = False, rerank_k: int = 16, weight: float | None = None, batch_size: int = 128,
                  device: str | None = None, json_path: str | None = None, ks=(1, 5, 10), reranker: str | None = None,
                  binding_pairs: int = 0, **data_options) -> dict:
    """Evaluate, print a markdown table and the time per stage, and return (and with `json_path` write) the
    report. `data_options` go to `load_dataset` (root, captions, split, n_images, seed). `dataset` may be a
    clipkit index holding captions: its stored embeddings are evaluated (`index_set`; `model`: the one it records,
    default; `n_images`: a random sample of them). `model` defaults to clipkit-demo otherwise."""
    from clipkit.index import is_index
    from clipkit.models import load_model, warn_untrained

    start = time.perf_counter()
    recorded = {}
    if is_index(dataset):
        data, embedded, index = index_set(dataset, data_options.get("n_images"), data_options.get("seed", 0))
        load_seconds = time.perf_counter() - start
        recorded = index.model_info or {}  # (its ITC recall needs no model: the embeddings are stored)
        needed = model is not None or rerank or reranker is not None or binding_pairs
        loaded = _index_model(index, model, pretrained, device) if needed else None
    else:
        data, embedded = load_dataset(dataset, **data_options), None
        load_seconds = time.perf_counter() - start
        loaded = load_model(model or "clipkit-demo", pretrained, device=device)
    if loaded is not None:
        warn_untrained(loaded)
    loaded_reranker = load_reranker(reranker, device=device) if reranker is not None else None
    result = evaluate(loaded, data, rerank=rerank, rerank_k=rerank_k, weight=weight, batch_size=batch_size, ks=ks,
                      reranker=loaded_reranker, embedded=embedded)
    report = {"dataset": data.name, "model": model or (loaded.name if loaded else recorded.get("name")),
              "pretrained": pretrained or (loaded.pretrained if loaded else recorded.get("pretrained")),
              "n_images": result.n_images,
              "n_texts": result.n_texts, "itc": _by_direction(result.itc, ks), "rerank": _by_direction(result.rerank, ks),
              "rerank_k": rerank_k if result.rerank is not None else None, "rerank_weight": result.weight,
              "rerank_weight_i2t": result.weight_i2t,
              "reranker": result.reranker,
              f"itc_R@{rerank_k}_cap": {d: result.itc[f"{d}_R@{rerank_k}"] for d in ("t2i", "i2t")},
              "mean_rank": {d: result.itc[f"{d}_mean_rank"] for d in ("t2i", "i2t")},
              "seconds": {"load_data": round(load_seconds, 2), **{k: round(v, 2) for k, v in result.seconds.items()}}}
    if binding_pairs:
        from clipkit.data.synthetic import binding_pairs as make_pairs

        pairs = make_pairs(binding_pairs, seed=data_options.get("seed", 0), split=data_options.get("split", "test"))
        report["binding"] = binding(loaded, pairs, rerank=rerank, reranker=loaded_reranker, weight=weight)
    print(format_table(report, ks))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict, ks) -> str:
    lines = [f"{report['dataset']}: {report['n_images']} images, {report['n_texts']} captions, model {report['model']}",
             "", "| direction | method | " + " | ".join(f"R@{k}" for k in ks) + " | mean rank | median rank |",
             "|---|---|" + "---|" * (len(ks) + 2)]
    names = {"t2i": "text→image", "i2t": "image→text"}
    for direction in ("t2i", "i2t"):
        for method in ("itc", "rerank"):
            if report[method] is None:
                continue
            label = "ITC" if method == "itc" else \
                f"ITC + {'ITM' if not report.get('reranker') else report['reranker']} (top {report['rerank_k']})"
            row = report[method][direction]
            values = " | ".join(f"{row[f'R@{k}']:.3f}" for k in ks)
            lines.append(f"| {names[direction]} | {label} | {values} | {row['mean_rank']:.2f} | {row['median_rank']:g} |")
    if report["rerank"] is not None:
        cap = report[f"itc_R@{report['rerank_k']}_cap"]
        lines.append(f"\nre-ranking is capped by ITC R@{report['rerank_k']}: t2i {cap['t2i']:.3f}, i2t {cap['i2t']:.3f}")
    if report.get("binding"):
        lines += binding_table(report["binding"])
    lines.append("\nseconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def binding_table(result: dict) -> list[str]:
    lines = [f"\nbinding (Winoground-style, {result['pairs']} pairs; chance 0.25 / 0.25 / 0.17):", "",
             "| method | swap | text | image | group |", "|---|---|---|---|---|"]
    for method in ("itc", "rerank"):
        if method not in result:
            continue
        rows = [("all", result[method]), *result[f"{method}_by_kind"].items()]
        for kind, values in rows:
            lines.append(f"| {'ITC' if method == 'itc' else 're-ranked'} | {kind} | {values['text']:.3f} | "
                         f"{values['image']:.3f} | {values['group']:.3f} |")
    return lines
