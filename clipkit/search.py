"""`search()`: a query (text, image or vector) -> embedding -> index -> hits."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from clipkit._cache import Kept, file_version
from clipkit.encode import IMAGE, IMAGE_TYPES, TEXT, encode_images, encode_texts, warn_if_image_paths
from clipkit.hit import Hit
from clipkit.index import Index, prepare_vectors
from clipkit.index.ann import first_of_each
from clipkit.index.shards import item_image
from clipkit.index.vectors import from_tensor
from clipkit.rerankers import HeadReranker, Reranker, load_reranker, pair_scores


def index_model(index: Index, model=None, *, device=None, precision: str | None = None):
    """The model that embeds queries for `index`: `model` (checked against the one that built it), else
    the one the index records (name, weights, fingerprint), loaded once (on `device`, at `precision`) and
    kept on the index: the one place the CLI, the server and `search` get "the model this index records"."""
    from clipkit.encode import as_model
    from clipkit.models import load_recorded_model, resolve_device

    if model is not None:
        model = as_model(model)
        index.check_model(model)
        if index.model is None:
            index.model = model
        return model
    if index.model is not None and (device is None or resolve_device(device) == index.model.device) and \
            (precision is None or precision == index.model.precision):
        return index.model
    model = load_recorded_model(index.model_info, device=device, precision=precision)
    index.check_model(model)
    index.model = model
    return model


def query_kind(query: Any) -> str:
    """TEXT, IMAGE or 'vector' for a single query; anything else is a ValueError."""
    if isinstance(query, str):
        if not query.strip():
            raise ValueError("the text query is empty")
        warn_if_image_paths([query], stacklevel=4)  # the caller of search() or search_batch()
        return TEXT
    if isinstance(query, IMAGE_TYPES):
        return IMAGE
    if isinstance(query, np.ndarray):
        if query.ndim == 1 or (query.ndim == 2 and np.issubdtype(query.dtype, np.floating)):
            return "vector"  # (2-D: one query of several vectors, as an item of a BLIP-2 index holds)
        if query.ndim in (2, 3) and query.dtype == np.uint8:
            return IMAGE
        raise ValueError(f"an array query must be an embedding (1-D, or 2-D: several vectors) or an HxWx3 uint8 "
                         f"image, got shape {query.shape} dtype {query.dtype}")
    several = " (one query a call; for many at once: clipkit.search_batch(queries, index, k))" \
        if isinstance(query, (list, tuple)) else ""
    raise ValueError(f"unsupported query type {type(query).__name__}: pass a str (text), a PIL image, a pathlib.Path, "
                     f"an image file's bytes, an HxWx3 uint8 array, or a 1-D embedding (numpy or torch){several}")


def search(query: Any, index: Index, k: int = 10, *, model=None, rerank: bool = False, rerank_k: int | None = None,
           weight: float | None = None, modality: str = "image", reranker=None,
           under: str | os.PathLike | None = None) -> list[Hit]:
    """Top-k hits for one query, best first.

    `query`: str -> text; PIL image / Path / HxWx3 uint8 array -> image; 1-D float array (numpy, or a torch
    tensor on any device) -> embedding; 2-D float array -> one query of several vectors (an item scored by its
    best match with any: the stored embedding of an item of a BLIP-2 index, `index.embeddings([id])[0]`; for a
    batch, `search_batch`).
    `index`: an Index, or the path of an index folder (opened for the call; the model its queries need is kept
    for the next search by path: `opened`).
    `model=None` uses the index's own model; another model is checked against the one that built it.
    `rerank=True`: ITC retrieves the top `rerank_k` (default max(k, 32)) candidates and the model's ITM
    head re-orders them; a hit's score is then the ITM log-odds + `weight` x cosine (default: the weight the
    head was fitted with, 0 for a head fitted with none), and its cosine is
    kept in `metadata['itc_score']`. A text query re-ranks images (files in the index); an image query
    re-ranks captions (items with a 'caption').
    `modality="text"` searches the index's captions instead of its images (image -> text, text -> text):
    hits are captions, with `metadata['caption']`, their image's `path` and `metadata['image_id']`.
    `reranker`: re-rank with another model (`clipkit.load_reranker`: a BLIP ITM checkpoint, or a clipkit
    model with an ITM head) instead of the index model's own head; a hit's score is then that re-ranker's
    (BLIP: the match probability) + `weight` (default 0 for BLIP) x cosine.
    `under`: a folder (or a file): only the items whose file lies there (captions: whose image's file does),
    searched exactly for a folder of up to 200,000 items; a ValueError when the index holds none there.
    """
    query = from_tensor(query)
    kind = query_kind(query)
    with opened(index) as index:
        _check_k(k)
        return _search_all([query], [kind], index, k, model=model, rerank=rerank, rerank_k=rerank_k, weight=weight,
                           modality=modality, reranker=reranker, under=under)[0]


def search_batch(queries: Sequence, index: Index, k: int = 10, *, model=None, rerank: bool = False,
                 rerank_k: int | None = None, weight: float | None = None, modality: str = "image",
                 reranker=None, under: str | os.PathLike | None = None) -> list[list[Hit]]:
    """`search()` for many queries at once: for each query (any kind `search()` takes, mixed), the hits
    `search()` gives it, with the texts embedded in batches and the images in batches (a file of thousands of
    queries costs the model's batched time, not a call each). A bad query is a ValueError before anything is
    searched. The options are `search()`'s, the same for every query. A 2-D float array is a batch of
    embeddings, a row a query. (The hits of every query are held until it returns: for millions of queries,
    call it a chunk at a time.)"""
    queries = from_tensor(queries)
    if isinstance(queries, np.ndarray) and queries.ndim == 2 and np.issubdtype(queries.dtype, np.floating):
        queries = list(queries)  # (rows of embeddings; a 2-D uint8 array would be one grey image)
    if isinstance(queries, (str, np.ndarray, *IMAGE_TYPES)) or not isinstance(queries, Sequence):
        raise ValueError(f"queries must be a list of queries, got {type(queries).__name__}: for one query, "
                         "use clipkit.search")
    with opened(index) as index:
        _check_k(k)
        kinds = []
        queries = [from_tensor(query) for query in queries]
        for query in queries:  # (a loop, not a comprehension: the warning names the caller's line)
            kinds.append(query_kind(query))
        return _search_all(queries, kinds, index, k, model=model, rerank=rerank, rerank_k=rerank_k, weight=weight,
                           modality=modality, reranker=reranker, under=under)


def _check_k(k) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")


MODELS_KEPT = 2  # models of indexes searched by path, kept for the next search by path
_MODELS = Kept(lambda: MODELS_KEPT)


@contextlib.contextmanager
def opened(index) -> Iterator[Index]:
    """`index` as is, or an index folder's path opened for this search (every check a load makes, every change
    seen) with the model its queries need taken from the last searches by path: `search(query, "photos.clipkit")`
    in a loop loads the model once, not each call (0.19 s of its 0.25 s with the demo model, seconds with a large
    one). A model is kept while what the index records names it and its weights file stays as it was (`MODELS_KEPT`
    of them, least recently used dropped); one that changed or went is loaded, or refused, as at a first call."""
    if not isinstance(index, (str, os.PathLike)):
        if not isinstance(index, Index):
            raise ValueError(f"index must be a clipkit.Index or an index folder's path, got {type(index).__name__}")
        yield index
        return
    index = Index.load(index)
    key = _model_key(index.model_info)
    index.model = _MODELS.take(key) if key else None
    try:
        yield index
    finally:
        if key and index.model is not None:
            _MODELS.put(key, index.model)


def _model_key(info: dict | None) -> str | None:
    """What identifies the model an index records, with its weights file's size and time (so that weights
    replaced or gone since are loaded again, and said)."""
    if not info:
        return None
    weights = info.get("pretrained")
    return json.dumps([info, file_version(weights) if isinstance(weights, str) else None], sort_keys=True,
                      default=str)


EMBED_CHUNK = 1024  # queries of a kind embedded in one call by `search_batch`


def _search_all(queries: list, kinds: list[str], index: Index, k: int, *, model, modality: str, **options) -> list:
    """Each query's hits: the queries of a kind embedded together and searched together (`ranked_hits_many`),
    `EMBED_CHUNK` at a time, in the collection their kind searches."""
    targets = {kind: searched_collection(index, modality, kind=kind, rerank=options["rerank"]) for kind in set(kinds)}
    model = index_model(index, model) if set(kinds) - {"vector"} else None  # (None: nothing to embed)
    embedders = {TEXT: encode_texts, IMAGE: encode_images}
    results: list = [None] * len(queries)
    for kind in dict.fromkeys(kinds):
        positions = [i for i, each in enumerate(kinds) if each == kind]
        for start in range(0, len(positions), EMBED_CHUNK):  # (tokens or pixels, and hits, of a chunk at a time)
            chunk = positions[start:start + EMBED_CHUNK]
            batch = [queries[i] for i in chunk]
            vectors = list(embedders[kind](batch, model)) if kind in embedders else [_query_vectors(query, index.dim)
                                                                                      for query in batch]
            found = ranked_hits_many(targets[kind], vectors, k, queries=batch, kind=kind, model=model, **options)
            for position, hits in zip(chunk, found):
                results[position] = hits
    return results


def _query_vectors(query: np.ndarray, dim: int) -> np.ndarray:
    """An embedding query's unit vector (1-D), or its unit vectors (2-D: an item scored by its best match)."""
    vectors = prepare_vectors(query, dim, what="the query")
    return vectors[0] if np.ndim(query) == 1 else vectors


def searched_collection(index: Index, modality: str, *, kind: str | None = None, rerank: bool = False) -> Index:
    """The collection a query of `kind` searches: the images ("image") or the captions ("text") of `index`."""
    if modality == "image":
        return index
    if modality != "text":
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    if rerank and kind == TEXT:
        raise ValueError("re-ranking scores an image against captions; a text query searches captions without "
                         "re-ranking")
    if index.captions is None:
        raise ValueError("this index holds no captions: index a folder with NAME.txt caption files beside the "
                         "images (one caption a line) to search captions")
    return index.captions


def ranked_hits_many(index: Index, vectors: list[np.ndarray], k: int, *, queries: list, kind: str = "vector",
                     model=None, rerank: bool = False, rerank_k: int | None = None, weight: float | None = None,
                     max_depth: int | None = None, reranker=None, under: str | os.PathLike | None = None) -> list:
    """The one search path behind `search()`, `search_batch()` and the HTTP server: each unit query vector's
    top `k` hits (among the items under the folder `under`, if given), the queries of one `kind` found together
    (one structure search, one pass over a folder's rows); with `rerank`, ITC's top `rerank_k` (default
    max(k, 32), at most `max_depth`) re-ordered by `reranker` (default: the model's ITM head) scoring each query
    (of `kind` TEXT or IMAGE) against them. The server takes the same steps: `rerank_plan`,
    `nearest_hits_many`, `rerank_hits`."""
    depth, reranker = rerank_plan(k, kind=kind, model=model, rerank=rerank, rerank_k=rerank_k, max_depth=max_depth,
                                  reranker=reranker)
    found = nearest_hits_many(index, vectors, depth, under=under)
    if reranker is not None:
        found = [rerank_hits(query, kind, hits, reranker, weight) for query, hits in zip(queries, found)]
    return [hits[:k] for hits in found]


def rerank_plan(k: int, *, kind: str, model=None, rerank: bool = False, rerank_k: int | None = None,
                max_depth: int | None = None, reranker=None) -> tuple[int, Reranker | None]:
    """(how many nearest items to find, the re-ranker that re-orders them or None) for `k` hits: with `rerank`,
    max(k, rerank_k or 32), at most max(k, `max_depth`), and `reranker` loaded (default: the model's own)."""
    if rerank_k is not None and (not isinstance(rerank_k, (int, np.integer)) or rerank_k < 1):
        raise ValueError(f"rerank_k must be a positive integer, got {rerank_k!r}")
    if not rerank:
        return k, None
    if kind not in (TEXT, IMAGE):
        raise ValueError("re-ranking scores a text or an image against candidates; a vector query has neither")
    depth = max(k, rerank_k or 32)
    return (depth if max_depth is None else min(depth, max(k, max_depth))), load_reranker(
        reranker if reranker is not None else model)


def nearest_hits_many(index: Index, vectors: list[np.ndarray], depth: int,
                      under: str | os.PathLike | None = None) -> list[list[Hit]]:
    """For each unit query vector, the index's top `depth` items (under the folder `under`, if given) as Hits
    with their metadata; the one-vector queries searched in one call. A query of several vectors (a BLIP-2
    image's query tokens) scores an item by its best vector: each vector's top `depth`, merged by the best score
    per item (exact: an item outside every vector's top `depth` is outside it)."""
    for _ in range(3):  # (a writer changing the top hits again and again: at most two catch-ups)
        found = _nearest_keys(index, vectors, depth, under)
        records = iter(index.get_by_key([int(key) for _, keys in found for key in keys]))
        per_query = [[next(records) for _ in keys] for _, keys in found]
        # an approximate index may find fewer (key -1); an item removed (or moved) since the index last looked
        # at its store has no record: then it catches up and searches again, rather than return fewer hits
        stale = any(record is None and key >= 0 for (_, keys), records_of in zip(found, per_query)
                    for key, record in zip(keys, records_of))
        if not stale or not index.refresh():
            break
    return [[Hit(id=record.pop("id"), score=float(score), path=record.pop("path", None), key=record.pop("key"),
                 metadata=record) for score, record in zip(scores, records_of) if record is not None]
            for (scores, _), records_of in zip(found, per_query)]


def _nearest_keys(index: Index, vectors: list[np.ndarray], depth: int, under) -> list[tuple[np.ndarray, np.ndarray]]:
    """(scores, keys) of each query's top `depth`: the one-vector queries in one `search_keys` call."""
    out: list = [None] * len(vectors)
    single = [i for i, vector in enumerate(vectors) if vector.ndim == 1]
    if single:
        scores, keys = index.search_keys(np.stack([vectors[i] for i in single]), depth, under=under)
        for row, i in enumerate(single):
            out[i] = (scores[row], keys[row])
    for i, vector in enumerate(vectors):
        if vector.ndim != 1:
            scores, keys = index.search_keys(vector, depth, under=under)
            best_scores, best_keys = _best_per_key(scores.ravel(), keys.ravel(), depth)
            out[i] = (best_scores[0], best_keys[0])
    return out


def _best_per_key(scores: np.ndarray, keys: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    scores, keys = scores[order], first_of_each(keys[order][None, :])[0]  # each key at its best score
    kept = np.flatnonzero(keys >= 0)[:depth]
    return scores[kept][None, :], keys[kept][None, :]


def rerank_hits(query: Any, kind: str, hits: list[Hit], reranker: Reranker, weight: float | None = None) -> list[Hit]:
    """Re-order ITC hits by the re-ranker's score (+ weight x cosine; None: the re-ranker's own weight): the
    score `score_pairs` gives the same pairs. A text query is scored against the hits' images, an image query
    against the hits' captions. Images are decoded in full, as `score_pairs` decodes them. The cosine is the
    re-ranker's own where it is a clipkit model (its weight was fitted to it; the index may hold another model's
    embeddings, or embeddings of a reduced-scale decode), else the hits' ITC score. Two steps: `rerank_pairs`
    (files read, decoded and preprocessed: the server runs it beside other requests') and `rerank_scored` (the
    model)."""
    return rerank_scored(rerank_pairs(query, kind, hits, reranker), kind, reranker, weight)


def rerank_pairs(query: Any, kind: str, hits: list[Hit], reranker: Reranker
                 ) -> tuple[list[Hit], torch.Tensor | None, list[str], np.ndarray, np.ndarray]:
    """(the hits that can be scored, the pictures as the re-ranker's pixel batch, the texts, each pair's picture
    and text positions) of a re-ranking: a text query against the hits' images (those whose file went since
    indexing left out), an image query against the hits' captions."""
    if not hits:
        return hits, None, [], np.zeros(0, int), np.zeros(0, int)
    if kind == TEXT:
        sources = [item_image(h.path, h.metadata) for h in hits]
        missing = [h.id for h, source in zip(hits, sources) if source is None]
        if missing:
            raise ValueError(f"re-ranking a text query needs the images, but item {missing[0]!r} has no image file")
        pixels = reranker.prepared(sources, skip_errors=True, kept=True)
        hits = [hit for hit, picture in zip(hits, pixels) if picture is not None]  # files gone since indexing
        pixels = torch.stack([p for p in pixels if p is not None]) if hits else None
        return hits, pixels, [query], np.arange(len(hits)), np.zeros(len(hits), int)
    texts = [h.metadata.get("caption") for h in hits]
    if any(c is None for c in texts):
        raise ValueError("re-ranking an image query scores it against captions, but these hits have none: "
                         "image-to-image search cannot be re-ranked by ITM")
    return hits, torch.stack(reranker.prepared([query])), texts, np.zeros(len(hits), int), np.arange(len(hits))


def rerank_scored(pairs: tuple, kind: str, reranker: Reranker, weight: float | None = None) -> list[Hit]:
    """`rerank_pairs`' hits re-ordered by the re-ranker's score of their pairs (+ weight x cosine)."""
    hits, pictures, texts, image_index, text_index = pairs
    if not hits:
        return hits
    weight = reranker.cosine_weight(weight, "t2i" if kind == TEXT else "i2t")
    own = isinstance(reranker, HeadReranker)  # a clipkit model's head: its own cosine (else the hits' ITC score)
    scores = pair_scores(reranker, pictures, image_index, texts, text_index, weight if own else 0.0)
    for hit, score in zip(hits, scores):
        hit.metadata["itc_score"] = hit.score
        hit.score = float(score) + (0.0 if own else weight * hit.score)
    return sorted(hits, key=lambda h: -h.score)
