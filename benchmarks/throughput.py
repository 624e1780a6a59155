"""Throughput side by side: clipkit vs open_clip's stock usage, same weights, batch size and threads, one run.

    python benchmarks/throughput.py [--models clipkit-demo ViT-B-32] [--json throughput.json] [--quick]

Each row times clipkit's path and the baseline a user would otherwise write, interleaved (A, B, A, B,
...) and reports the median of each and their ratio, so a noisy shared machine moves both alike:

- text (short): 4-14 word captions; baseline `model.encode_text(tokenizer(texts))` per batch
- text (77 tokens): captions that fill the context
- image: in-memory PIL images; baseline `encode_image(torch.stack([preprocess(im) ...]))`
- folder index: JPEG files -> index, end to end; baseline a plain loop (PIL open, preprocess, encode,
  FAISS IndexFlatIP.add); also reported against the bare forward on pre-decoded tensors (the bound),
  and on camera-sized 1600x1200 JPEGs (where clipkit's draft-mode decoding pays)
- search: clipkit Index.search (ids + metadata lookup) vs a bare FAISS IndexFlatIP, batched queries
- ANN: `index_type="auto"` on 200k embedding-like 256-d vectors of two kinds vs exact flat: queries/s,
  estimated and measured recall@10, build time, bytes per vector (the table of benchmarks/ann.py)
- ITM re-ranking (models with an ITM head): queries/s re-ranking 32 candidates
- training step: `clipkit train --no-itm` vs open_clip's own trainer `open_clip_train` (shipped in
  the open_clip_torch wheel; needs pandas) on the same config, shards, batch size, learning rate,
  precision, loader workers and threads, samples/s per step (median over the steps after warm-up,
  runs interleaved); and `clipkit train` with its ITM head (one extra fusion pass on 3B pairs) for
  the cost of ITM
- GEMM: float32 matmul FLOP/s at the same threads, for context

ViT-B-32 runs with random weights (speed does not depend on them). Prints a markdown table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

import clipkit
from clipkit.data.synthetic import render, scenes
from clipkit.models import Model, load_model

WORDS = ("a small red circle sits left of two big blue squares near the green triangle under one yellow "
         "star beside a purple heart").split()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def side_by_side(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured interleaved after one warm-up call of each."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        a += timed(ours, 1)
        b += timed(theirs, 1)
    return statistics.median(a), statistics.median(b)


def get_model(name: str) -> Model:
    if name == "clipkit-demo":
        return load_model(name, device="cpu")
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    clip.eval()
    return Model(name=name, pretrained=None, clip=clip, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name),
                 device=torch.device("cpu"), dim=clip.text_projection.shape[1], image_size=clip.visual.image_size[0],
                 context_length=clip.context_length, fingerprint="random")


def sample_images(n: int, size: int) -> list[Image.Image]:
    specs = scenes(n, seed=0, split="test")
    return [render(spec, size=size) for spec in specs]


class Rows:
    """The rows of one model, with what every group of rows shares: its batch size, repeats and data scale."""

    def __init__(self, name: str, quick: bool, smoke: bool):
        self.name, self.model = name, get_model(name)
        self.big = name != "clipkit-demo"
        self.batch = 32 if self.big else 128
        self.repeats = 1 if smoke else 3 if quick else 5
        self.shrink = 8 if smoke else 1  # smoke: every row on an eighth of the data, once
        self.rows: list[dict] = []

    def add(self, what: str, ours_s: float, theirs_s: float, count: int, unit: str, baseline="stock open_clip"):
        self.rows.append({"model": self.name, "row": what, "clipkit_per_s": round(count / ours_s, 1),
                          "baseline_per_s": round(count / theirs_s, 1), "ratio": round(theirs_s / ours_s, 2),
                          "unit": unit, "baseline": baseline})

    def side_by_side(self, what: str, ours, theirs, count: int, unit: str, baseline="stock open_clip"):
        self.add(what, *side_by_side(ours, theirs, self.repeats), count, unit, baseline)


def rows_for(name: str, quick: bool, smoke: bool = False) -> list[dict]:
    """`smoke`: every row on an eighth of the data, once (that the script runs, not a measurement)."""
    rows = Rows(name, quick, smoke)
    text_rows(rows)
    images = sample_images((64 if rows.big else 512) // rows.shrink, 256 if rows.big else 96)
    image_rows(rows, images)
    photo_rows(rows)
    search_rows(rows)
    if rows.model.itm is not None:
        rerank_rows(rows, images[:32])
    return rows.rows


def text_rows(rows: Rows) -> None:
    clip, tokenizer, batch = rows.model.clip, rows.model.tokenizer, rows.batch
    rng = np.random.default_rng(0)
    n_text = (256 if rows.big else 1024) // rows.shrink
    short = [" ".join(WORDS[: rng.integers(4, 15)]) for _ in range(n_text)]
    long = [" ".join(WORDS * 4) for _ in range(n_text // 4)]

    def stock_text(texts):
        def run():
            with torch.inference_mode():
                for s in range(0, len(texts), batch):
                    F.normalize(clip.encode_text(tokenizer(texts[s:s + batch])), dim=-1)
        return run

    def ours_text(texts):
        return lambda: clipkit.encode(texts, model=rows.model, batch_size=batch)

    rows.side_by_side("text, short captions", ours_text(short), stock_text(short), len(short), "texts/s")
    rows.side_by_side("text, 77 tokens", ours_text(long), stock_text(long), len(long), "texts/s")


def plain_loop(model: Model, files: list[Path], batch: int) -> None:
    """What a user writes without clipkit: PIL open, preprocess, encode, FAISS add."""
    index = faiss.IndexFlatIP(model.dim)
    with torch.inference_mode():
        for s in range(0, len(files), batch):
            x = torch.stack([model.preprocess(Image.open(f).convert("RGB")) for f in files[s:s + batch]])
            index.add(F.normalize(model.clip.encode_image(x), dim=-1).numpy())


def image_rows(rows: Rows, images: list[Image.Image]) -> None:
    """In-memory images, and a folder of them end to end (against a plain loop and the bare forward)."""
    model, batch = rows.model, rows.batch
    pixels = torch.stack([model.preprocess(im) for im in images])

    def stock_images():
        with torch.inference_mode():
            for s in range(0, len(images), batch):
                F.normalize(model.clip.encode_image(torch.stack([model.preprocess(im) for im in images[s:s + batch]])),
                            dim=-1)

    def bare_forward():
        with torch.inference_mode():
            for s in range(0, len(pixels), batch):
                model.clip.encode_image(pixels[s:s + batch])

    rows.side_by_side("image, in memory", lambda: clipkit.encode(images, model=model, batch_size=batch), stock_images,
                      len(images), "images/s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, im in enumerate(images):
            im.save(folder / f"{i:05d}.jpg", quality=90)
        files = sorted(folder.glob("*.jpg"))
        ours_s, theirs_s = side_by_side(lambda: clipkit.Index.from_folder(folder, model, batch_size=batch),
                                        lambda: plain_loop(model, files, batch), rows.repeats)
        rows.add("folder index, end to end", ours_s, theirs_s, len(images), "images/s",
                 "plain PIL + open_clip + FAISS loop")
        bound_s = statistics.median(timed(bare_forward, rows.repeats))
        rows.add("folder index vs bare forward (bound)", ours_s, bound_s, len(images), "images/s",
                 "bare encode_image on tensors")


def photo_rows(rows: Rows) -> None:
    """Camera-sized JPEGs: where draft-mode decoding pays."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        n_photos = (32 if rows.big else 96) // rows.shrink
        for i, im in enumerate(sample_images(n_photos, 96)):
            im.resize((1600, 1200), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
        files = sorted(folder.glob("*.jpg"))
        rows.side_by_side("folder index, 1600x1200 JPEGs",
                          lambda: clipkit.Index.from_folder(folder, rows.model, batch_size=rows.batch),
                          lambda: plain_loop(rows.model, files, rows.batch), n_photos, "images/s",
                          "plain PIL + open_clip + FAISS loop")


def search_rows(rows: Rows) -> None:
    rng, dim = np.random.default_rng(0), rows.model.dim
    n_items, n_queries = 50_000 // rows.shrink, 1024 // rows.shrink
    vectors = rng.standard_normal((n_items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.integers(0, n_items, n_queries)] + 0.1 * rng.standard_normal((n_queries, dim)).astype(
        np.float32)
    index = clipkit.Index.from_embeddings(vectors)
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    rows.side_by_side(f"search, {n_items} items, k=10", lambda: index.search(queries, 10),
                      lambda: flat.search(queries, 10), n_queries, "queries/s", "bare FAISS IndexFlatIP")


def rerank_rows(rows: Rows, images: list[Image.Image]) -> None:
    from clipkit.rerankers import HeadReranker
    from clipkit.search import Hit, rerank_hits

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, im in enumerate(images):
            paths.append(Path(tmp) / f"{i}.png")
            im.save(paths[-1])
        hits = [Hit(id=i, score=0.5, path=str(p)) for i, p in enumerate(paths)]
        seconds = statistics.median(timed(lambda: rerank_hits("a red circle", "text",
                                                              [Hit(h.id, h.score, h.path, {}) for h in hits],
                                                              HeadReranker(rows.model)), rows.repeats))
    rows.rows.append({"model": rows.name, "row": f"ITM re-rank, {len(images)} candidates",
                      "clipkit_per_s": round(1 / seconds, 1), "baseline_per_s": None, "ratio": None,
                      "unit": "queries/s", "baseline": "none"})


def ann_rows(n: int, dim: int = 256) -> list[dict]:
    """`index_type="auto"` vs exact flat search on two kinds of embedding-like data (benchmarks/ann.py)."""
    from ann import ann_table, print_table

    table = ann_table(n, dim)
    print_table(table)
    return [{"model": f"{r['data']} {r['n']} x {r['dim']}-d", "row": f"ANN auto ({r['structure']}) vs exact, k=10",
             "clipkit_per_s": r["queries_per_s"], "baseline_per_s": r["exact_queries_per_s"], "ratio": r["speedup"],
             "unit": "queries/s", "baseline": "exact flat (clipkit)", "recall_at_10": r["measured_recall_at_10"],
             "estimated_recall_at_10": r["estimated_recall_at_10"], "build_s": r["build_s"],
             "bytes_per_vector": r["bytes_per_vector"]} for r in table]


# open_clip_train in-process, after clipkit's configs are registered (so it knows clipkit-demo). The wheel's
# webdataset reader predates webdataset 0.2.96, which ends each tar with an {} EOF marker that it cannot
# group (open_clip#935); the marker is dropped before grouping, the fix its maintainers gave.
_OPEN_CLIP_TRAIN = """
import sys
from clipkit.models import register_configs
register_configs()
import open_clip_train.data as data
_group = data.group_by_keys_nothrow
data.group_by_keys_nothrow = lambda samples, *a, **k: _group((s for s in samples if "fname" in s), *a, **k)
from open_clip_train.main import main
main(sys.argv[1:])
"""


def _median_after_warmup(values: list[float], warmup: int = 3) -> float:
    kept = values[warmup:] or values
    return statistics.median(kept)


def train_rows(name: str, quick: bool) -> list[dict]:
    """Training samples/s: clipkit's trainer (ITC only, and ITC + ITM) vs open_clip_train, same shards and config."""
    from clipkit.data.synthetic import write_synthetic

    big = name != "clipkit-demo"
    batch, steps = (16, 8 if quick else 12) if big else (128, 12 if quick else 30)
    runs = 1 if quick else 3
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_synthetic(Path(tmp) / "shards", batch * (steps + 2), seed=0, split="train", size=64,
                                 maxcount=max(batch * 4, 256), workers=1, progress=False)
        pattern = f"{shards[0].parent}/train-{{000000..{len(shards) - 1:06d}}}.tar"  # brace form: both read it

        def clipkit_run(itm: bool, n: int) -> float:
            out = Path(tmp) / f"ck-{itm}-{n}"
            subprocess.run([sys.executable, "-m", "clipkit", "train", "--data", pattern, "--out", str(out),
                            "--model", name, "--pretrained", "scratch", "--val", "none", "--steps", str(steps),
                            "--batch-size", str(batch), "--lr", "1e-3", "--warmup", "2", "--workers", "1",
                            "--precision", "fp32", "--log-every", "1", "--ckpt-every", str(10 * steps),
                            "--itm" if itm else "--no-itm"], check=True, env=env, capture_output=True)
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            return _median_after_warmup([e["samples_per_s"] for e in log if "samples_per_s" in e])

        def open_clip_run(n: int) -> float:
            done = subprocess.run([sys.executable, "-c", _OPEN_CLIP_TRAIN, "--model", name, "--train-data", pattern,
                                   "--dataset-type", "webdataset", "--train-num-samples", str(batch * steps),
                                   "--batch-size", str(batch), "--workers", "1", "--epochs", "1", "--lr", "1e-3",
                                   "--warmup", "2", "--wd", "0.1", "--precision", "fp32", "--log-every-n-steps", "1",
                                   "--save-frequency", "0", "--report-to", "", "--logs", str(Path(tmp) / "oc"),
                                   "--name", f"run{n}"], check=True, env=env, capture_output=True, text=True)
            rates = [float(m) for m in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.]+)/s,", done.stdout + done.stderr)]
            if not rates:
                raise RuntimeError("open_clip_train logged no step times:\n" + (done.stdout + done.stderr)[-2000:])
            return _median_after_warmup(rates)

        ours, theirs, with_itm = [], [], []
        for n in range(runs):
            ours.append(clipkit_run(False, n))
            theirs.append(open_clip_run(n))
            with_itm.append(clipkit_run(True, n))
    a, b, c = statistics.median(ours), statistics.median(theirs), statistics.median(with_itm)
    common = {"model": name, "unit": "samples/s", "baseline": "open_clip_train", "baseline_per_s": round(b, 1)}
    return [{**common, "row": f"training step, ITC (batch {batch})", "clipkit_per_s": round(a, 1),
             "ratio": round(a / b, 2)},
            {**common, "row": f"training step, ITC + ITM (batch {batch})", "clipkit_per_s": round(c, 1),
             "ratio": round(c / b, 2)}]


def gemm_flops(repeats: int = 5) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    seconds = statistics.median(timed(lambda: a @ b, repeats))
    return 2 * 1024 ** 3 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["clipkit-demo", "ViT-B-32"])
    parser.add_argument("--json", default="throughput.json")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--smoke", action="store_true", help="an eighth of the data, once: that it runs (tests)")
    parser.add_argument("--ann-size", type=int, default=200_000, help="vectors for the ANN row (0: skip it)")
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="skip the training-step rows (they need pandas for open_clip_train)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows += rows_for(name, args.quick, args.smoke)
        if args.train:
            rows += train_rows(name, args.quick)
    if args.ann_size:
        rows += ann_rows(args.ann_size)
    flops = gemm_flops()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "gemm_gflops": round(flops / 1e9, 1),
               "cuda": torch.cuda.is_available(), "faiss_gpus": faiss.get_num_gpus()}
    print(f"machine: {machine}")
    print("| model | row | clipkit | baseline | ratio | unit | baseline is |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['row']} | {r['clipkit_per_s']} | {r['baseline_per_s']} | {r['ratio']} | "
              f"{r['unit']} | {r['baseline']} |")
    for r in rows:
        if "recall_at_10" in r:
            print(f"ANN: recall@10 {r['recall_at_10']} against exact (estimated {r['estimated_recall_at_10']}), "
                  f"build {r['build_s']} s, "
                  f"{r['bytes_per_vector']} bytes per vector")
    Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
