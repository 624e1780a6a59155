"""Choosing and tuning the ANN structure on the user's own data, so that its recall is what users get.

The tuner measures, it does not guess: it holds out items of the collection as fresh queries (items not
in the structure while it is tuned are queries from the data's own distribution, unlike stored vectors
perturbed by noise) or takes `sample_queries` (text embeddings for an image collection: they sit in
another region of the space, the modality gap). Half of those queries pick, for each candidate structure,
the cheapest setting (nprobe, k_factor, efSearch) whose recall@10 against exact search meets the target;
the candidates are timed and the fastest wins (exact flat search included). The other half, unseen by
that choice, estimates the recall users will get: that estimate is reported, and fresh queries from the
same distribution land within a couple of hundredths of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from clipkit.index import ondisk
from clipkit.index.ann import (DEEP_K, DEEP_KS, TUNED_K, Structure, candidates, empty_structure, split_refine,
                               top_k_scan, training_size)

log = logging.getLogger("clipkit.index")

NPROBES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192,
           224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1536, 2048, 3072, 4096)
K_FACTORS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # coarse codes among
# millions need long shortlists (at 10M x 512-d with 64-byte codes, 640 held 0.885 of the true top 10)
TIMED_QUERIES = 48  # queries searched one at a time to time a setting
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
MARGIN = 0.005  # asked of the tuning half, so that the unseen half's estimate still meets the target
SMALLER_WITHIN = 1.15  # a passing setting this much slower than the fastest wins if its structure is smaller
TIE = 1e-5  # a score this close to the k-th true score ties with it (float32 sums in another order)
SAFETY = 0.003  # asked of the unseen half's estimate (about one standard error at 1,000 queries)


@dataclass
class Tuning:
    """What the tuner chose and why: `estimated_recall` is recall@10 on queries the choice never saw."""

    structure: str
    params: dict
    estimated_recall: float
    target: float
    queries: str  # "held-out items", "sample queries" (given, or remembered from an earlier build) or
    # "caption embeddings" (the index's captions: text-side queries, across the modality gap)
    n_queries: int
    seconds_per_query: float
    tried: list[dict] = field(default_factory=list)  # every candidate setting: structure, params, recall, s/query
    deep_recall: float | None = None  # the least of recall@25, @50, @100 on the unseen queries, each searched
    # with its setting (`nprobe@25` … in params where a rung needs more than the one below)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Queries:
    tune: np.ndarray
    tune_truth: np.ndarray
    check: np.ndarray
    check_truth: np.ndarray
    tune_deep: np.ndarray | None = None  # the true top DEEP_K of each (None: too few items for that)
    check_deep: np.ndarray | None = None
    tune_scores: np.ndarray | None = None  # their true scores, as deep as the deepest truth
    check_scores: np.ndarray | None = None

    @classmethod
    def halves(cls, queries: np.ndarray, truth: tuple, k: int) -> "_Queries":
        """Half the queries to tune on, half to check on; `truth` (scores, keys) of the true top k, or deeper
        (DEEP_K)."""
        scores, keys = truth
        half, deep = len(queries) // 2, keys.shape[1] > k
        return cls(queries[:half], keys[:half, :k], queries[half:], keys[half:, :k],
                   keys[:half] if deep else None, keys[half:] if deep else None, scores[:half], scores[half:])


def recall_at(found: np.ndarray, truth: np.ndarray, found_scores: np.ndarray | None = None,
              floor: np.ndarray | None = None) -> float:
    """Mean share of each query's true top k (`truth`, keys) among the found keys. Given `floor` (each query's
    k-th true score) and the found items' exact `found_scores`, a found item that is not in `truth` but scores
    as high as the k-th counts too: a tie (a duplicate of an item) that exact search cut arbitrarily. (A
    collection of duplicated photos could not meet the target with every list probed.)"""
    k = truth.shape[1]
    hits = np.array([len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)], np.float64)
    if floor is not None:
        tied = (found_scores >= floor[:, None] - TIE) & (found >= 0)
        tied &= ~(found[:, :, None] == truth[:, None, :]).any(axis=2)
        hits = np.minimum(hits + tied.sum(axis=1), k)
    return float(np.mean(hits / k))


def build_structure(index_type: str, vectors: np.ndarray, keys: np.ndarray, *, memory_budget: int | None = None,
                    target_recall: float = 0.95, sample_queries: np.ndarray | None = None,
                    queries_are: str = "sample queries", params: dict | None = None, k: int = TUNED_K,
                    n_queries: int = 2000) -> tuple[Structure, Tuning | None]:
    """The structure for these vectors: chosen ("auto"), trained, filled and tuned (None: no tuning, when
    exact or when `params` are given: a rebuild that keeps earlier choices)."""
    options = candidates(index_type, len(vectors), vectors.shape[1], memory_budget)
    if options == ["Flat"]:
        structure = Structure.flat(vectors.shape[1])
        structure.add(vectors, keys)
        return structure, None
    if params:  # a rebuild of the structure recorded earlier (`index_type` is its factory string)
        structure = empty_structure(options[0], vectors)
        structure.add(vectors, keys)
        structure.set_params(params)
        return structure, None
    return tune_structure(options, vectors, keys, target=target_recall, sample_queries=sample_queries, k=k,
                          n_queries=n_queries, allow_flat=index_type == "auto", queries_are=queries_are)


def tune_structure(options: list[str], vectors: np.ndarray, keys: np.ndarray, *, target: float = 0.95,
                   sample_queries: np.ndarray | None = None, k: int = TUNED_K, n_queries: int = 2000,
                   allow_flat: bool = True, queries_are: str = "sample queries") -> tuple[Structure, Tuning]:
    """Build every structure in `options`, tune each to `target`, keep the fastest (see the module doc)."""
    rng = np.random.default_rng(0)
    held = np.zeros(len(vectors), bool)
    if sample_queries is None:  # hold out items: fresh samples of the data, added back at the end
        held[rng.choice(len(vectors), min(n_queries, max(2, len(vectors) // 10)), replace=False)] = True
        queries, source = vectors[held], "held-out items"
    else:
        queries, source = sample_queries[rng.permutation(len(sample_queries))[:n_queries]], queries_are
    base, base_keys = vectors[~held], keys[~held]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(base))
    scores, found = exact.search(np.ascontiguousarray(queries), _truth_depth(k, len(base)))
    truth = scores, base_keys[found]
    split = _Queries.halves(queries, truth, k)
    tried, built = [], {}
    if allow_flat:
        tried.append({"structure": "Flat", "params": {}, "recall": 1.0,
                      "seconds": _time(lambda query: exact.search(query, k), split.tune)})
    quantizer = None
    for factory in options:  # trained on every item (k-means barely notices 5%), filled without the held-out
        structure = empty_structure(factory, vectors, faiss.clone_index(quantizer) if quantizer else None)
        quantizer = quantizer or _quantizer(structure)
        structure.add(base, base_keys)
        built[factory] = structure
        tried += _settings(structure, split, target + MARGIN, k)
    chosen, estimate = _choose(tried, built, split, target, k)
    deep_recall = None
    if chosen["structure"] == "Flat":
        structure = Structure.flat(vectors.shape[1])
        structure.add(vectors, keys)
    else:
        structure = built[chosen["structure"]]
        deep_recall = _deepen(structure, chosen["params"], split, target)
        if held.any():  # the held-out items join the structure now
            structure.add(vectors[held], keys[held])
    report = Tuning(structure.factory, structure.params, estimate, target, source, len(queries),
                    chosen["seconds"], tried, deep_recall)
    log.info("ANN tuned: %s %s, estimated recall@%d %.3f on %d unseen %s", report.structure, report.params, k,
             estimate, len(split.check), source)
    return structure, report


def _quantizer(structure: Structure):
    ivf = faiss.try_extract_index_ivf(structure.index)
    return ivf.quantizer if ivf is not None else None


def _time(search, queries: np.ndarray) -> float:
    """Seconds of one query, searched alone as users search (a batch spreads the per-query costs, the re-rank's
    reads above all, and would favour other settings): the median over up to TIMED_QUERIES queries, each the
    better of two runs (the machine is shared)."""
    sample = queries[:TIMED_QUERIES]
    best = np.full(len(sample), np.inf)
    for _ in range(2):
        for number, query in enumerate(sample):
            start = time.perf_counter()
            search(query[None])
            best[number] = min(best[number], time.perf_counter() - start)
    return float(np.median(best))


def _grid(structure: Structure) -> tuple[str, list[int]]:
    """The search parameter to tune and its values, smallest (cheapest) first."""
    ivf = faiss.try_extract_index_ivf(structure.index)
    if ivf is not None:
        return "nprobe", [v for v in NPROBES if v < ivf.nlist] + [int(ivf.nlist)]
    return "efSearch", list(EF_SEARCH)


def _recall(structure: Structure, params: dict, queries: np.ndarray, truth: np.ndarray, k: int,
            scores: np.ndarray | None = None) -> float:
    """Recall@k of `structure` searched with `params` against `truth` (keys, k or more deep; `scores`: theirs,
    for ties, where the structure's scores are exact)."""
    structure.set_params(params)
    found_scores, found = structure.search(queries, k)
    floor = scores[:, k - 1] if scores is not None and structure.exact_scores else None
    return recall_at(found, truth[:, :k], found_scores, floor)


def _settings(structure: Structure, split: _Queries, goal: float, k: int) -> list[dict]:
    """For each k_factor, the smallest nprobe (or efSearch) meeting `goal` on the tuning half, timed. Longer
    shortlists stop being tried once a passing one needs the least nprobe, or two in a row passed slower
    than the fastest (past that, each costs more re-ranking for less probing: slower)."""
    name, values = _grid(structure)
    out, fastest, slower = [], float("inf"), 0
    for k_factor in _k_factors(structure, split, goal, k, name, values):
        extra = {} if k_factor is None else {"k_factor": k_factor}
        best = {name: _smallest_meeting(structure, name, values, extra, split, goal, k), **extra}
        recall = _recall(structure, best, split.tune, split.tune_truth, k, split.tune_scores)
        seconds = _time(lambda query: structure.search(query, k), split.tune)
        out.append({"structure": structure.factory, "params": best, "recall": recall, "seconds": seconds})
        if recall >= goal:
            fastest, slower = min(fastest, seconds), 0 if seconds < fastest else slower + 1
            if best[name] == values[0] or slower >= 2:
                break
    return out


def _k_factors(structure: Structure, split: _Queries, goal: float, k: int, name: str, values: list[int]) -> tuple:
    """The shortlist lengths worth tuning (None: the structure has no re-rank). Those too short for `goal` even
    with every list probed are left out when a longer one reaches it: one search of every list, k x the
    longest k_factor deep, tells each length's recall (the exact re-rank puts each true neighbour a shortlist
    holds in the top k), where a search of every list for each length took minutes at 10M."""
    if structure.refine is None:
        return (None,)
    if name != "nprobe" or structure.per_item > 1:
        return K_FACTORS
    structure.set_params({name: values[-1], "k_factor": 1})
    listed = structure.shortlist(split.tune, min(structure.ntotal, k * K_FACTORS[-1]))
    reach = [kf for kf in K_FACTORS if recall_at(listed[:, :kf * k], split.tune_truth) >= goal]
    return K_FACTORS[K_FACTORS.index(reach[0]):] if reach else K_FACTORS


def _smallest_meeting(structure: Structure, name: str, values: list[int], extra: dict, split: _Queries,
                      goal: float, k: int) -> int:
    """The smallest value meeting `goal` (recall grows with it), or the largest if none does (`_least`)."""
    return _least(values, lambda value: _recall(structure, {name: value, **extra}, split.tune, split.tune_truth,
                                                 k, split.tune_scores) >= goal)


def _least(values: list[int], passes) -> int:
    """The smallest of `values` (ascending) that `passes` (as all past it do), by bisection; the largest when
    none does. One look at the smallest first (the cheapest to try, and what a deep search often needs: the
    setting for 10), then at the largest (a setting too weak for the goal costs one search, not a bisection)."""
    if passes(values[0]):
        return values[0]
    if len(values) == 1 or not passes(values[-1]):
        return values[-1]
    low, high = 1, len(values) - 1
    while low < high:
        middle = (low + high) // 2
        if passes(values[middle]):
            high = middle
        else:
            low = middle + 1
    return values[low]


def _choose(tried: list[dict], built: dict, split: _Queries, target: float, k: int) -> tuple[dict, float]:
    """The fastest setting whose recall meets the target on the unseen half too (stepping a setting's
    nprobe / efSearch up until it does), or one holding fewer bytes a vector at most SMALLER_WITHIN x slower;
    if none meets it, the one that comes closest."""
    flat = [t for t in tried if t["structure"] == "Flat"]
    passing = [dict(t, estimate=1.0) for t in flat]
    limit = flat[0]["seconds"] if flat else float("inf")
    closest = None
    for candidate in sorted((t for t in tried if t["structure"] != "Flat"), key=lambda t: t["seconds"]):
        if candidate["seconds"] >= SMALLER_WITHIN * limit:
            continue  # already slower than a setting known to pass, by more than a smaller one may be
        confirmed, estimate = _confirm(built[candidate["structure"]], candidate, split, target + SAFETY, k)
        candidate["estimate"] = estimate
        if confirmed is not None:
            passing.append(confirmed)
            limit = min(limit, confirmed["seconds"])
        elif closest is None or estimate > closest[1]:
            closest = (candidate, estimate)
    if passing:
        best = _smallest_of_the_fastest(passing, built, split.tune.shape[1])
        return best, best["estimate"]
    log.warning("no structure reached recall@%d %.3f on held-out queries; using the best found (%.3f)", k, target,
                closest[1])
    return closest


def _smallest_of_the_fastest(passing: list[dict], built: dict, dim: int) -> dict:
    """Of the passing settings at most SMALLER_WITHIN x slower than the fastest, the one whose structure holds
    the fewest bytes a vector (exact search: the float32 vectors): at 200,000 x 256-d IVF-Flat (1,037 B) and
    fast-scan PQ with an exact re-rank (82 B) came within timing noise of each other, and which won flipped
    from run to run."""
    fastest = min(t["seconds"] for t in passing)
    near = [t for t in passing if t["seconds"] <= SMALLER_WITHIN * fastest]
    sizes = {name: dim * 4 if name == "Flat" else built[name].bytes_per_vector() for name in
             {t["structure"] for t in near}}
    return min(near, key=lambda t: (sizes[t["structure"]], t["seconds"]))


def _confirm(structure: Structure, setting: dict, split: _Queries, goal: float, k: int) -> tuple[dict | None, float]:
    """`setting`, its nprobe / efSearch raised step by step until recall on the unseen half meets `goal`:
    (the confirmed setting with its estimate and time, or None; the last estimate)."""
    params = dict(setting["params"])  # (from `_settings`: the structure's nprobe / efSearch always among them)
    name, grid = _grid(structure)
    start = grid.index(params[name]) if params[name] in grid else 0
    params[name], estimate = _raised(grid[start:], lambda v: _recall(structure, {**params, name: v}, split.check,
                                                                      split.check_truth, k, split.check_scores), goal)
    if estimate < goal:
        return None, estimate
    structure.set_params(params)
    seconds = _time(lambda query: structure.search(query, k), split.tune)
    return dict(setting, params=params, estimate=estimate, seconds=seconds), estimate


def _raised(values: list, estimate_of, goal: float, steps: int = 8) -> tuple:
    """Of `values` (ascending; at most `steps` of them) the first whose estimate on the unseen half meets
    `goal`, or else the last tried: (that value, its estimate)."""
    for value in values[:steps]:
        estimate = estimate_of(value)
        if estimate >= goal:
            break
    return value, estimate


class Collection:
    """What a streaming build reads: the index's stored vectors, never all in RAM at once (core.Index passes
    its store's)."""

    def __init__(self, count: int, dim: int, sample, batches, lookup, lists_budget: int | None = None,
                 spill_dir=None, per_item: int = 1):
        self.count, self.dim, self.per_item = count, dim, per_item  # items of `per_item` vectors of `dim`
        self.sample = sample  # sample(m) -> (keys, vectors) of up to m items drawn at random
        self.batches = batches  # batches() -> iterator of (keys, vectors), every item once, in key order
        self.lookup = lookup  # lookup(keys) -> (vectors as stored: float16 or float32, found): what the re-rank reads
        self.lists_budget = lists_budget  # bytes of inverted lists the build holds in RAM before writing a part
        self.spill_dir = spill_dir  # where parts are written (None: the system's temporary folder)


def build_streaming(factories: list[str], collection: Collection, *, target_recall: float = 0.95,
                    sample_queries: np.ndarray | None = None, queries_are: str = "sample queries",
                    params: dict | None = None, k: int = TUNED_K, n_queries: int = 1000,
                    train_rows: int = 300_000) -> tuple[Structure, Tuning | None]:
    """An IVF structure with PQ codes (one of `factories`, shortest codes first) built in bounded memory:
    trained on a sample, filled batch by batch from the stored vectors (which its exact re-rank reads where
    they lie), then tuned as `tune_structure` tunes: held-out items leave the structure while it is tuned,
    and the exact answers come from one pass over every stored vector. Of several code sizes, the shortest
    whose shortlists `_pick_codes` estimates to hold the true neighbours is built."""
    needed = training_size(faiss.index_factory(collection.dim, split_refine(factories[0])[0],
                                               faiss.METRIC_INNER_PRODUCT))
    per_item = collection.per_item
    keys, train = collection.sample(min(collection.count, -(-max(train_rows, needed) // per_item)))
    if params or per_item > 1:  # a rebuild as recorded; items of several vectors: the first codes planned
        structure = empty_structure(factories[0], train, niter=10, per_item=per_item)
    if params:
        del train
        _fill(structure, collection)
        structure.set_params(params)
        return structure, None
    (held, _), queries, truth, _ = tuning = _tuning_queries(collection, keys[:n_queries], sample_queries,
                                                            queries_are, k, n_queries)
    if per_item == 1:
        structure = _pick_codes(factories, (train, keys, held), collection, queries, truth[1],
                                target_recall + 2 * MARGIN, k)
    del train
    _fill(structure, collection)
    return structure, _tune_in_place(structure, *tuning, target_recall, k)


def retune(structure: Structure, collection: Collection, *, target_recall: float = 0.95,
           sample_queries: np.ndarray | None = None, queries_are: str = "sample queries", k: int = TUNED_K,
           n_queries: int = 1000) -> Tuning:
    """Tune a built structure's search parameters anew for the collection it holds now (grown since it was
    tuned: longer lists, more codes competing for each shortlist), without rebuilding it."""
    held = collection.sample(n_queries, seed=1)[0] if sample_queries is None else None
    tuning = _tuning_queries(collection, held, sample_queries, queries_are, k, n_queries)
    return _tune_in_place(structure, *tuning, target_recall, k)


def _tuning_queries(collection: Collection, candidates: np.ndarray | None, sample_queries: np.ndarray | None,
                    queries_are: str, k: int, n_queries: int = 1000) -> tuple:
    """((held-out keys, their stored rows), queries, (scores, keys) of their true top k, what they are):
    `sample_queries` when given, else the items `candidates` held out (out of the exact answers, and of the
    structure while it is tuned). The exact answers come from one pass over every stored vector."""
    held, rows = np.zeros(0, np.int64), None
    if sample_queries is None:  # (items of several vectors: each held-out item's first vector)
        held, rows = candidates, np.asarray(collection.lookup(candidates)[0], np.float32)  # (lookup: as stored)
        queries, source = rows[:, :collection.dim], "held-out items"
    else:
        queries = sample_queries[np.random.default_rng(0).permutation(len(sample_queries))[:n_queries]]
        source = queries_are
    depth = _truth_depth(k, collection.count - len(held))
    truth = top_k_scan(queries, collection.batches(), depth, exclude=np.sort(held), per_item=collection.per_item)
    return (held, rows), queries, truth, source


def _truth_depth(k: int, items: int) -> int:
    """How many true neighbours of each tuning query to find: DEEP_K, to tune searches for more than k too,
    where there are items enough; else k."""
    return DEEP_K if k < DEEP_K <= items // 2 else k


def _deepen(structure: Structure, params: dict, split: _Queries, target: float) -> float | None:
    """Set `params` on `structure`, with, for each rung of DEEP_KS, the least nprobe / efSearch (at least the
    rung below's) that a search for that k needs to meet `target` on the tuning half, raised a few steps where
    the unseen half falls short (as `_confirm` raises the setting for k), kept as `nprobe@25` … where it is more
    than the rung below's: the least recall of the rungs on the unseen half, or None where there is nothing to
    tune."""
    structure.set_params(params)
    name, values = _grid(structure)
    if split.tune_deep is None or name not in params:
        return None
    others = {key: value for key, value in params.items() if key != name}
    deeper, below, estimates = dict(params), params[name], []

    tuning = split.tune, split.tune_deep, split.tune_scores
    unseen = split.check, split.check_deep, split.check_scores

    def recall(value: int, k: int, half: tuple) -> float:
        queries, truth, scores = half
        return _recall(structure, {name: value, **others}, queries, truth, k, scores)

    for k in DEEP_KS:
        higher = [v for v in values if v >= below] or [below]
        value = _least(higher, lambda v: recall(v, k, tuning) >= target + MARGIN)
        raised, estimate = _raised(higher[higher.index(value):], lambda v: recall(v, k, unseen), target + SAFETY)
        if estimate >= target + SAFETY:  # (else out of reach a few steps up: the tuning half's choice stays)
            value = raised
        estimates.append(estimate if value == raised else recall(value, k, unseen))
        if value > below:
            deeper[f"{name}@{k}"] = below = value
    structure.set_params(deeper)
    return min(estimates)


def _tune_in_place(structure: Structure, held_out: tuple, queries: np.ndarray, truth: tuple, source: str,
                   target_recall: float, k: int) -> Tuning:
    """Tune `structure` (holding every item) on `queries`: half choose the setting, half estimate its recall;
    the `held_out` items (keys, stored rows) are out of it meanwhile."""
    held, rows = held_out
    structure.remove(held)
    split = _Queries.halves(queries, truth, k)
    tried = _settings(structure, split, target_recall + MARGIN, k)
    chosen, estimate = _choose(tried, {structure.factory: structure}, split, target_recall, k)
    deep_recall = _deepen(structure, chosen["params"], split, target_recall)
    if len(held):
        structure.add(rows, held)
        structure.set_params(structure.params)  # (a delta the items went into searches so too)
    report = Tuning(structure.factory, structure.params, estimate, target_recall, source, len(queries),
                    chosen["seconds"], tried, deep_recall)
    log.info("ANN tuned on the collection: %s %s, estimated recall@%d %.3f on %d unseen %s",
             report.structure, report.params, k, estimate, len(split.check), source)
    return report


def _fill(structure: Structure, collection: Collection) -> None:
    """Add every stored vector, batch by batch. Inverted lists past `collection.lists_budget` bytes are
    written to a part file and emptied; at the end the parts (and what is still in RAM) are merged, list by
    list, into one lists file that the structure then searches memory-mapped: RAM holds at most the budget's
    worth of lists whatever the collection's size. The files are unlinked once open (the maps keep them):
    a save writes the index's own, and a kill leaves no more than a part being written."""
    structure.attach_vectors(collection.lookup)  # no RAM copy: the re-rank reads the stored vectors
    head = ondisk.head_or_none(structure.index) if collection.lists_budget is not None else None
    layout, parts = (ondisk.Layout.of(structure.index) if head is not None else None), []
    for batch_keys, vectors in collection.batches():
        structure.add(vectors, batch_keys)
        if head is not None and structure.index.ntotal * (layout.entry_bytes + 8) > collection.lists_budget:
            parts.append(_written(head, [structure.index], collection.spill_dir))
            structure.index.reset()  # (its lists are in the part now)
    if parts:
        log.info("merging %d part(s) of inverted lists", len(parts) + 1)
        with _part_file(collection.spill_dir) as path:
            ondisk.write_lists(path, parts + [structure.index])
            structure.open_lists(head, Path(path))


def _written(head: bytes, sources: list, folder) -> faiss.Index:
    """The lists of `sources` written to a part file, opened memory-mapped (the file is already unlinked)."""
    with _part_file(folder) as path:
        ondisk.write_lists(path, sources)
        return ondisk.open_sealed(head, path)[0]


@contextlib.contextmanager
def _part_file(folder):
    handle, path = tempfile.mkstemp(prefix=".structure-part-", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


SHORTLIST_FACTOR = 128  # the k_factor at which `_pick_codes` asks the true neighbours to be shortlisted: the
# longest shortlist worth re-ranking before longer codes pay (1,280 random rows a query: a few ms from the page
# cache, issued together from disk), so that disk per vector grows only where shortlists cannot make up for it


PROBED_SHARE = 4  # `_pick_codes` estimates with a quarter of the lists probed: codes that need nearly every list
# probed to shortlist the true neighbours leave the tuner only slow settings (measured: 17 ms a query at 1M,
# on the edge of its recall target), so the ladder goes on to longer codes there


def _pick_codes(factories: list[str], sample: tuple, collection: Collection, queries: np.ndarray,
                truth: np.ndarray, goal: float, k: int) -> Structure:
    """The empty structure of the first of `factories` (codes growing) whose shortlists of SHORTLIST_FACTOR x k
    are estimated to hold a share `goal` of the true neighbours among all `collection.count` items (else the
    last): the training sample and the true neighbours are coded, 1 / PROBED_SHARE of the lists probed, and
    each true neighbour's rank among the sample's codes, scaled by count / sample size, is its rank among all."""
    quantizer, structure = None, None
    for factory in factories:
        structure = empty_structure(factory, sample[0], faiss.clone_index(quantizer) if quantizer else None, niter=10)
        if len(factories) == 1:
            return structure
        quantizer = quantizer or faiss.clone_index(faiss.try_extract_index_ivf(structure.index).quantizer)
        estimate = _shortlist_recall(structure, sample, collection, queries, truth, k)
        log.info("%s: an estimated %.3f of the true top %d within %d-long shortlists among %d", factory,
                 estimate, k, SHORTLIST_FACTOR * k, collection.count)
        if estimate >= goal:
            break
    return structure


def _shortlist_recall(structure: Structure, sample: tuple, collection: Collection, queries: np.ndarray,
                      truth: np.ndarray, k: int) -> float:
    """`_pick_codes`'s estimate: `sample` = (vectors, keys, held-out keys, which are queries, not items)."""
    train, keys, held = sample
    probe = Structure(faiss.clone_index(structure.index), split_refine(structure.factory)[0])
    wanted = np.unique(truth[truth >= 0])
    others = ~np.isin(keys, wanted) & ~np.isin(keys, held)
    probe.add(train[others], keys[others])
    probe.add(np.asarray(collection.lookup(wanted)[0], np.float32), wanted)
    probe.set_params({"nprobe": max(1, faiss.try_extract_index_ivf(probe.index).nlist // PROBED_SHARE)})
    scale = collection.count / max(1, int(others.sum()))  # items of the collection per sampled item
    depth = min(probe.ntotal, int(np.ceil(SHORTLIST_FACTOR * k / scale)) + len(wanted))
    found = probe.search(queries, depth)[1]
    rank = np.full(truth.shape, np.inf)
    for row, (listed, true) in enumerate(zip(found, truth)):
        sampled_above = np.cumsum(~np.isin(listed, wanted))  # other queries' neighbours are not a sample
        position = dict(zip(listed.tolist(), sampled_above.tolist()))
        rank[row] = [position.get(key, np.inf) for key in true.tolist()]
    return float(np.mean((rank * scale < SHORTLIST_FACTOR * k)[truth >= 0]))
