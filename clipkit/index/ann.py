"""The ANN structure: a FAISS index over (key, unit vector) pairs, the cache of the store that searches run on.

Which structure (exact flat while small, IVF above FLAT_LIMIT, or any FAISS factory string), training it,
tuning its search parameters to a recall target, adding and removing by key, serialising it, and a GPU
copy for searching when FAISS sees a GPU. Keys live inside the structure itself: an IVF index stores
them in its inverted lists (so removing some never shifts the others); structures without their own ids
are wrapped in an IndexIDMap2, and removal is used only where the inner index compacts in order
(flat codes); everything else is rebuilt from the store by the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import zlib
from pathlib import Path

import faiss
import numpy as np

from clipkit._io import atomic_path, atomic_write_bytes
from clipkit.index import ondisk
from clipkit.index.vectors import add_sorted, damaged_rows, in_sorted

log = logging.getLogger(__name__)

DAMAGED_SCORE = 1.01  # unit vectors score within [-1, 1] (plus float16 rounding): beyond, or NaN, a stored
# vector is damaged (flipped bytes on disk) and is never returned
FLAT_LIMIT = 50_000  # "auto" stays exact up to here: about a millisecond per query on a CPU core
GPU_MAX_K = 2048  # FAISS's GPU search returns at most this many neighbours; deeper searches run on the CPU
_GPU_LOCK = threading.Lock()  # FAISS GPU indexes and their resources are not thread-safe, searches included
_GPU_RESOURCES = None


def check_index_type(index_type: str, dim: int) -> None:
    if not isinstance(index_type, str) or not index_type:
        raise ValueError(f"index_type must be 'flat', 'auto' or a FAISS factory string, got {index_type!r}")
    if index_type in ("flat", "auto"):
        return
    try:
        faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown"
        raise ValueError(f"index_type {index_type!r} is not 'flat', 'auto' or a FAISS factory string FAISS "
                         f"accepts ({first})") from None


HNSW_QUANTIZER_FROM = 4096  # lists from which the coarse quantizer is an HNSW graph (assigning millions of
# vectors to a flat one costs n x lists x dim), as autofaiss does
FEW_QUERIES_IMPLEM = 14  # IndexIVFFastScan's implementation for a few queries (0: FAISS's choice for batches)
QUANTIZER_EF = 64  # the least efSearch of an HNSW coarse quantizer (twice nprobe when that is more)
TUNED_K = 10  # the k structures are tuned for (recall@10); a search for fewer shortlists as deep as one for 10:
# k_factor x 1 candidates held the true top 1 for 0.94 of queries where k_factor x 10 held it for 0.99
DEEP_KS = (25, 50, 100)  # a search for more than TUNED_K probes as tuned for the first of these that is at least
# its k (params `nprobe@25`, `nprobe@50`, `nprobe@100`, or `efSearch@…`, each where it is more than the rung's below;
# the last for any k past it): the nprobe tuned for recall@10 gave recall@50 0.93 (120k x 256-d), deeper
# neighbours lying in more lists
DEEP_K = DEEP_KS[-1]
IN_RAM_COPIES = 5  # float32 copies of the collection the in-RAM tuner holds at its peak (tune.tune_structure)


def default_memory_budget() -> int:
    """The RAM a build may use unless told: a quarter of this machine's memory, at most 2 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return min(int(total) // 4, 2 << 30)


def budget_or_default(memory_budget: int | None) -> int:
    return memory_budget if memory_budget is not None else default_memory_budget()


def streams(n: int, dim: int, memory_budget: int | None) -> bool:
    """Whether a build must stream (train on a sample, add in chunks from the stored vectors) to stay within
    `memory_budget` bytes (default: `default_memory_budget()`), rather than tune with the collection in RAM."""
    return n * dim * 4 * IN_RAM_COPIES > budget_or_default(memory_budget)


def choose_structure(index_type: str, n: int, dim: int, memory_budget: int | None = None) -> str:
    """The FAISS structure family for `n` vectors: exact flat while small, IVF above FLAT_LIMIT.

    IVF lists ~ 2 sqrt(n) (a power of two, at least 39 training points each): with fast-scan codes and an
    exact re-rank, probing more of fewer lists measured faster at the same recall than the classic 4 sqrt(n).
    When the build would not fit `memory_budget` bytes with the collection in RAM (`streams`), 4-bit fast-scan
    product quantisation (at most dim / 8 bytes a vector, fewer to fit the budget), whose shortlist is
    re-ranked exactly with the memory-mapped stored vectors, built by streaming; otherwise the tuner
    (clipkit/index/tune.py) picks between the candidates of `candidates()`.
    """
    if index_type == "flat":
        return "Flat"
    if index_type != "auto":
        return index_type
    if n <= FLAT_LIMIT:
        return "Flat"
    nlist = int(min(65536, max(256, 2 ** round(np.log2(2 * np.sqrt(n))))))
    nlist = min(nlist, 2 ** int(np.log2(max(2, n // 39))))  # k-means wants >= 39 training points per list
    if streams(n, dim, memory_budget):
        nlist = max(256, nlist // 2)  # ~sqrt(n) lists: k-means on a 39-per-list sample stays minutes at 10M
        quantizer = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"
        code_bytes = max(1, min(dim // 8, budget_or_default(memory_budget) // n))
        return f"{quantizer},PQ{fastscan_m(dim, code_bytes)}x4fs,RFlat"
    return f"IVF{nlist},Flat"


def candidates(index_type: str, n: int, dim: int, memory_budget: int | None = None) -> list[str]:
    """The structures the tuner builds and compares for this collection ("Flat" is always the fallback).

    Above FLAT_LIMIT, with room for the vectors: IVF-Flat, and IVF with 4-bit fast-scan PQ codes whose
    shortlist is re-ranked exactly against the stored vectors (`,RFlat`: the frontier for embeddings);
    HNSW too for low-dimensional data, where its graph pays. Over the memory budget: fast-scan PQ codes only.
    """
    base = choose_structure(index_type, n, dim, memory_budget)
    if index_type == "auto" and "PQ" in base:
        return code_ladder(base, n, dim, memory_budget)
    if index_type != "auto" or base == "Flat":
        return [base]
    nlist = base.split(",")[0]
    out = [base, f"{nlist},PQ{fastscan_m(dim)}x4fs,RFlat"]
    if dim <= 64 and n <= 2_000_000:
        out.append("HNSW32")
    return out


def code_ladder(factory: str, n: int, dim: int, memory_budget: int | None = None) -> list[str]:
    """A streamed "…,PQ{m}x4fs,RFlat" plan, then longer or better codes while `n` codes fit the memory budget:
    the same bytes after a learnt rotation (OPQ: product quantisation loses less where dimensions are
    correlated, as autofaiss's defaults assume), half as many bytes again rotated into a wider space (three
    dimensions a sub-quantizer: `opq_factory`), then twice and four times the bytes (up to two dimensions a
    sub-quantizer). The build keeps the first whose shortlists its estimate says hold the true neighbours."""
    quantizer, rest = factory.split(",", 1)
    m = int(rest[2:rest.index("x")])
    out = [factory]
    if m % 4 == 0 and m < dim // 2:
        for rotated in (m, m * 3 // 2):
            if n * rotated // 2 <= budget_or_default(memory_budget):
                out.append(opq_factory(quantizer, rotated, dim))
    while m < dim // 2 and n * m <= budget_or_default(memory_budget):  # 2m sub-quantizers: m bytes a vector
        m, before = fastscan_m(dim, m), m
        if m == before:
            break
        out.append(f"{quantizer},PQ{m}x4fs,RFlat")
    return out


def opq_factory(quantizer: str, m: int, dim: int) -> str:
    """"OPQ{m}_{width},{quantizer},PQ{m}x4fs,RFlat": a rotation of `dim` into `width` (dim rounded up to whole
    sub-quantizers) learnt for `m` 4-bit sub-quantizers (see `empty_structure`)."""
    return f"OPQ{m}_{-(-dim // m) * m},{quantizer},PQ{m}x4fs,RFlat"


_OPQ_FASTSCAN = re.compile(r"OPQ(\d+)_(\d+),(IVF\d+(?:_HNSW\d+)?),PQ(\d+)x4fs")
OPQ_TRAIN_ROWS = 20_000  # the rotation's training sample: minutes at 50k x 512, seconds here, close in recall
OPQ_ITERATIONS = 20


def fastscan_m(dim: int, code_bytes: int | None = None) -> int:
    """Sub-quantizers for 4-bit fast-scan PQ: two dimensions each, or fewer to fit `code_bytes` per vector
    (an even divisor of `dim`, as fast-scan packs codes in pairs)."""
    limit = dim // 2 if code_bytes is None else min(dim // 2, 2 * code_bytes)
    fitting = [m for m in range(2, dim + 1, 2) if dim % m == 0 and m <= max(2, limit)]
    return max(fitting) if fitting else 1


def serialized_size(index: faiss.Index) -> int:
    """The bytes `index` takes written out, counted as FAISS writes it (without a copy of it in RAM, as
    `faiss.serialize_index` makes: the tuner sizes its candidates while it holds them all)."""
    size = 0

    def count(chunk: bytes) -> int:
        nonlocal size
        size += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return size


def split_refine(factory: str) -> tuple[str, bool]:
    """("IVF1024,PQ128x4fs", True) for "IVF1024,PQ128x4fs,RFlat": the re-rank is clipkit's, not FAISS's
    IndexRefine, so that keys and removal work as in every other structure."""
    for suffix in (",RFlat", ",Refine(Flat)"):
        if factory.endswith(suffix):
            return factory[:-len(suffix)], True
    return factory, False


def nlist_of(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


def training_size(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    needed = 39 * int(ivf.nlist) if ivf is not None else 0  # FAISS's own minimum for k-means
    return max(needed, 256 if "PQ" in type(faiss.downcast_index(index)).__name__ else 1)


def _search_parameters(index: faiss.Index, deeper: dict, selector, held: list):
    """FAISS's parameters for one search of `index` with the settings `deeper` in place of its own and the
    filter `selector` (or None): set per call, so that searches in other threads keep their own. `held` keeps
    the objects they point to."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:  # an HNSW graph (never filtered: it is rebuilt on removal)
        return faiss.SearchParametersHNSW(efSearch=int(deeper.get("efSearch", _unwrapped(index).hnsw.efSearch)))
    nprobe = int(deeper.get("nprobe", ivf.nprobe))
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if selector is not None:
        params.sel = selector
    if hasattr(faiss.downcast_index(ivf.quantizer), "hnsw"):
        held.append(faiss.SearchParametersHNSW(efSearch=_quantizer_ef(nprobe)))
        params.quantizer_params = held[-1]
    return params


def _unwrapped(index: faiss.Index) -> faiss.Index:
    """The index inside an IDMap wrapper (or `index` itself), as its own type."""
    return faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)


def _quantizer_ef(nprobe: int) -> int:
    """The efSearch of an HNSW coarse quantizer asked for `nprobe` lists (a graph returns at most efSearch
    lists, whatever nprobe asks)."""
    return max(QUANTIZER_EF, 2 * nprobe)


def apply_search_params(index: faiss.Index, params: dict) -> None:
    """Set nprobe / efSearch on an index, through IDMap wrappers."""
    if not params:
        return
    if "nprobe" in params:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = int(params["nprobe"])
            quantizer = faiss.downcast_index(ivf.quantizer)
            if hasattr(quantizer, "hnsw"):
                quantizer.hnsw.efSearch = _quantizer_ef(ivf.nprobe)
    if "efSearch" in params:
        inner = _unwrapped(index)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = int(params["efSearch"])


@contextlib.contextmanager
def assigning(index: faiss.Index):
    """While adding: an HNSW coarse quantizer assigns each vector its list with its build-time efSearch
    (QUANTIZER_EF), not the wider one searches probing many lists need (2 x nprobe: adding 10k vectors at
    10M took 5.7 s with efSearch 768, for the same one nearest list)."""
    ivf = faiss.try_extract_index_ivf(index)
    graph = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None) if ivf is not None else None
    if graph is None:
        yield
        return
    kept, graph.efSearch = graph.efSearch, QUANTIZER_EF
    try:
        yield
    finally:
        graph.efSearch = kept


class RefineVectors:
    """The stored vectors of a structure whose shortlist is re-ranked exactly (`,RFlat`), by key.

    Rows are appended; a dense key -> row table (keys are never reused and grow one by one) finds them
    with one gather. Removed rows stay until they are a quarter of all, then are compacted away.
    """

    def __init__(self, dim: int):
        self.data = np.zeros((0, dim), np.float32)
        self.keys = np.zeros(0, np.int64)  # the key of each row
        self.row_of = np.zeros(0, np.int64)  # key -> row, -1 for none
        self.size = 0

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, np.int64)
        need = self.size + len(keys)
        if need > len(self.data):  # grow by doubling: adding batch after batch stays linear
            capacity = max(need, 2 * len(self.data), 1024)
            grown = np.zeros((capacity, self.data.shape[1]), np.float32)
            grown[:self.size] = self.data[:self.size]
            self.data, self.keys = grown, np.resize(self.keys, capacity)
        top = int(keys.max()) + 1 if len(keys) else 0
        if top > len(self.row_of):
            table = np.full(max(top, 2 * len(self.row_of)), -1, np.int64)
            table[:len(self.row_of)] = self.row_of
            self.row_of = table
        self.data[self.size:need] = vectors
        self.keys[self.size:need] = keys
        self.row_of[keys] = np.arange(self.size, need)
        self.size = need

    def remove(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, np.int64)
        keys = keys[(keys >= 0) & (keys < len(self.row_of))]
        self.row_of[keys] = -1
        alive = self.row_of[self.keys[:self.size]] == np.arange(self.size)
        if self.size - int(alive.sum()) > self.size // 4:
            kept = np.flatnonzero(alive)
            self.data, self.keys = self.data[kept], self.keys[kept]
            self.size = len(kept)
            self.row_of[self.keys] = np.arange(self.size)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors of `keys`, found mask); rows without a key are zero."""
        inside = (keys >= 0) & (keys < len(self.row_of))
        rows = np.where(inside, self.row_of[np.where(inside, keys, 0)], -1)
        return self.data[np.maximum(rows, 0)], rows >= 0


def rerank(queries: np.ndarray, shortlist: np.ndarray, k: int, lookup,
           per_item: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The top k of each query's shortlisted keys (-1: none) by exact inner product with the vectors
    `lookup(keys) -> (vectors, found)` gives (in RAM while tuning, else the index's stored ones, float16 or
    float32); rows of `per_item` vectors score the best of them."""
    n, width = shortlist.shape
    scores = np.empty(shortlist.shape, np.float32)
    step = max(1, 4_000_000 // max(1, width * queries.shape[1] * per_item))  # gathered floats per chunk of queries
    for start in range(0, n, step):
        keys = shortlist[start:start + step]
        vectors, found = lookup(keys.ravel())
        vectors = vectors.reshape(len(keys), width * per_item, -1)
        if vectors.dtype == np.float16 and per_item == 1:
            part = np.stack([_scores_fp16(rows, usable, query, k) for rows, usable, query
                             in zip(vectors, found.reshape(keys.shape), queries[start:start + step])])
        else:
            part = np.matmul(vectors.astype(np.float32, copy=False), queries[start:start + step, :, None])[:, :, 0]
        if per_item > 1:
            part = part.reshape(len(keys), width, per_item).max(axis=2)
        part[~found.reshape(keys.shape) | (keys < 0) | ~(np.abs(part) <= DAMAGED_SCORE)] = -np.inf
        scores[start:start + step] = part
    k = min(k, width)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, 1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    keys = np.take_along_axis(np.take_along_axis(shortlist, top, 1), order, 1)
    top_scores = np.take_along_axis(top_scores, order, 1)
    return top_scores, np.where(np.isfinite(top_scores), keys, -1)


def _scores_fp16(rows: np.ndarray, found: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Inner products of one query with float16 rows, by FAISS's fp16 scalar-quantizer kernels (numpy converts
    float16 one value at a time: 1 ms for a 2,000-row shortlist). Only the best 2k + 32 are kept, the others
    get -inf, unless rows not `found` or damaged (beyond DAMAGED_SCORE, NaN) could hide one of the top k: then
    every row is scored."""
    scorer = faiss.IndexScalarQuantizer(rows.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(np.ascontiguousarray(rows).view(np.uint8).ravel(), scorer.codes)
    scorer.ntotal = len(rows)
    out = np.full(len(rows), np.nan, np.float32)  # (NaN: marked damaged by the caller)
    for depth in dict.fromkeys((min(len(rows), 2 * k + 32), len(rows))):
        scores, labels = scorer.search(query[None], depth)
        kept = labels[0] >= 0
        scores, labels = scores[0][kept], labels[0][kept]
        if ((np.abs(scores) <= DAMAGED_SCORE) & found[labels]).sum() >= min(k, len(rows)) or depth == len(rows):
            out[:] = -np.inf if depth < len(rows) else np.nan
            out[labels] = scores
            return out
    return out


class Structure:
    """A FAISS index holding (key, vector) pairs, with the search parameters it was tuned to; for `,RFlat`
    structures also where the vectors are, to re-rank `k_factor` x k shortlisted keys exactly: a copy in RAM
    while the tuner builds it (`RefineVectors`), then the index's stored vectors (`attach_vectors`)."""

    def __init__(self, index: faiss.Index, factory: str = "Flat", params: dict | None = None, per_item: int = 1):
        self.index, self.factory, self.per_item = index, factory, per_item
        # items of several vectors: FAISS holds each vector under key * per_item + its number, and the
        # shortlist's items are always re-ranked exactly (best vector), from a RAM copy while tuning
        refined = split_refine(factory)[1] or per_item > 1
        self.refine = RefineVectors(int(index.d) * per_item) if refined else None
        self._lookup = self.refine.lookup if self.refine is not None else None  # keys -> (vectors, found)
        self._gpu = None  # (GPU index, position -> key map or None), or False: not on the GPU
        self.sealed = None  # ondisk.Sealed: `index` searches memory-mapped lists, and then:
        self.delta = None  # an IVF index in RAM beside them (same quantizer and codes): what was added since
        self.dropped = np.zeros(0, np.int64)  # sorted keys removed from the sealed lists since (never returned)
        self._selector = None  # FAISS's filter for `dropped`, with the objects it refers to
        self.snapshot = None  # (folder, config record) of the files this structure was last saved as or read from
        self.set_params(params or {})

    @property
    def exact_scores(self) -> bool:
        """Whether `search` scores are exact inner products: re-ranked, or full vectors in the lists / graph."""
        return self._lookup is not None or not re.search(r"PQ|SQ|LSH|RQ|ITQ", split_refine(self.factory)[0])

    def set_params(self, params: dict) -> None:
        """Search with these parameters (nprobe, efSearch, k_factor) from now on, on the GPU copy too."""
        self.params = dict(params)
        apply_search_params(self.index, self.params)
        if self.delta is not None:
            apply_search_params(self.delta, self.params)
        if self._gpu:
            with _GPU_LOCK:
                apply_search_params(self._gpu[0], self.params)

    @classmethod
    def flat(cls, dim: int, per_item: int = 1) -> "Structure":
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), per_item=per_item)

    @classmethod
    def read(cls, folder: Path, record: dict, factory: str, params: dict | None, per_item: int = 1) -> "Structure":
        """The structure saved in `folder` as `record` says (its file, lists file and CRC-32 of the file); a
        ValueError when the file is not what was recorded."""
        file = folder / record["faiss_file"]
        with open(file, "rb") as handle:
            crc = file_crc(handle)
            handle.seek(0)
            if crc != record.get("faiss_crc32"):
                raise ValueError(f"the checksum of {file.name} does not match what was recorded")
            if record.get("lists_file"):
                head = handle.read()
            else:
                index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
        if record.get("lists_file") and os.path.getsize(folder / record["lists_file"]) != record.get("lists_bytes"):
            raise ValueError(f"{record['lists_file']} is not the size recorded")
        if not record.get("lists_file"):
            structure = cls(index, factory, params, per_item=per_item)
        else:
            structure = cls.__new__(cls)
            structure._open_sealed(head, folder / record["lists_file"], factory, params, per_item)
        structure.snapshot = (folder.resolve(), dict(record))
        return structure

    def open_lists(self, head: bytes, lists_file: Path) -> None:
        """Search the lists written to `lists_file` (for this structure's `head`) from now on, memory-mapped."""
        self._open_sealed(head, lists_file, self.factory, self.params)

    def _open_sealed(self, head: bytes, lists_file: Path, factory: str, params: dict | None,
                     per_item: int | None = None) -> None:
        lookup = getattr(self, "_lookup", None)
        index, table = ondisk.open_sealed(head, lists_file)
        self.__init__(index, factory, per_item=per_item or self.per_item)
        self.sealed = ondisk.Sealed(head, lists_file.name, table.last_key, table.count)
        self.delta = ondisk.empty_copy(head, self.index)
        if lookup is not None:
            self.attach_vectors(lookup)
        self.set_params(params if params is not None else {})

    def write_files(self, folder: Path, tag: str) -> dict:
        """Write the structure into `folder` under new names: an IVF one as its head and a lists file (this
        structure then searches those, memory-mapped: its lists leave RAM, and the delta and removals since
        its last lists are merged in), any other as one FAISS file. The record of what was written."""
        head_name, lists_name = f"structure-{tag}.faiss", None
        head = self.sealed.head if self.sealed is not None else ondisk.head_or_none(self.index)
        if head is not None:
            lists_name = f"structure-{tag}.lists"
            sources = [self.index] + ([self.delta] if self.delta is not None and self.delta.ntotal else [])
            with atomic_path(folder / lists_name) as tmp:
                ondisk.write_lists(tmp, sources, [self.dropped, None])
            lists_bytes = os.path.getsize(folder / lists_name)
            atomic_write_bytes(folder / head_name, head)
            crc = zlib.crc32(head)
            self._open_sealed(head, folder / lists_name, self.factory, self.params)
        else:
            lists_bytes = None
            with atomic_path(folder / head_name) as tmp:  # written by FAISS: no copy of the structure in memory
                faiss.write_index(self.index, str(tmp))
                with open(tmp, "rb") as handle:
                    crc = file_crc(handle)
        return {"faiss_file": head_name, "lists_file": lists_name, "lists_bytes": lists_bytes, "faiss_crc32": crc}

    def pending(self) -> int:
        """Changes since the sealed lists were written (added into the delta, removed from them)."""
        return (int(self.delta.ntotal) if self.delta is not None else 0) + len(self.dropped)

    @property
    def ntotal(self) -> int:
        vectors = int(self.index.ntotal) - len(self.dropped) + (int(self.delta.ntotal) if self.delta is not None else 0)
        return vectors // self.per_item

    def sub_keys(self, keys: np.ndarray) -> np.ndarray:
        """The keys FAISS holds an item's vectors under (the item's own key when it has one)."""
        keys = np.asarray(keys, np.int64)
        if self.per_item == 1:
            return keys
        return (keys[:, None] * self.per_item + np.arange(self.per_item)).ravel()

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def describe(self) -> str:
        def order(item):  # (nprobe, nprobe@25, nprobe@50, nprobe@100)
            name, _, rung = item[0].partition("@")
            return name, int(rung or 0)

        return self.factory + "".join(f" {k}={v}" for k, v in sorted(self.params.items(), key=order))

    def bytes_per_vector(self) -> float:
        """Memory per vector: the FAISS file's size plus, for `,RFlat`, the float32 vectors held for the re-rank."""
        held = self.refine.size * self.dim * 4 if isinstance(self.refine, RefineVectors) else 0
        if self.sealed is not None:
            folder = self.snapshot[0] if self.snapshot else None
            lists = os.path.getsize(folder / self.sealed.lists_file) if folder else 0
            return (len(self.sealed.head) + lists) / max(1, self.ntotal)
        size = serialized_size(self.index) + held
        return size / max(1, self.ntotal)

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        """Add vectors under keys (new ones); the RAM copy for the re-rank too, while there is one."""
        target = self.delta if self.delta is not None else self.index  # sealed lists are read-only
        each, sub = np.asarray(vectors).reshape(-1, self.dim), self.sub_keys(keys)
        with assigning(target):
            for start in range(0, len(each), 100_000):
                target.add_with_ids(np.ascontiguousarray(each[start:start + 100_000], dtype=np.float32),
                                    np.ascontiguousarray(sub[start:start + 100_000], dtype=np.int64))
        if isinstance(self.refine, RefineVectors):
            self.refine.add(keys, vectors)
        if self.delta is None:
            self._gpu = None

    def attach_vectors(self, lookup) -> None:
        """An `,RFlat` structure re-ranks with the vectors `lookup(keys) -> (vectors, found)` gives from now on
        (the index's stored ones: the FAISS file holds only codes, and RAM holds no copy)."""
        if self.refine is not None:
            self.refine = lookup
        if self.refine is not None or self.sealed is not None:  # sealed lists: scores are always re-computed
            self._lookup = lookup  # from the stored vectors (damage there is caught; the lists are not checksummed)

    def remove(self, keys: np.ndarray) -> bool:
        """Remove these keys; False where this structure cannot (the caller rebuilds it)."""
        items, keys = keys, self.sub_keys(keys)
        if isinstance(self.refine, RefineVectors):
            self.refine.remove(items)
        if self.sealed is not None:  # keys in the lists are filtered out of them; the delta removes its own
            keys = np.unique(np.asarray(keys, np.int64))
            if self.delta.ntotal:  # (keys only grow, but a build's held-out items come back through the delta)
                self.delta.remove_ids(np.ascontiguousarray(keys))
            self.dropped, self._selector = add_sorted(self.dropped, keys[keys <= self.sealed.last_key])[0], None
            return True
        if isinstance(self.index, faiss.IndexIDMap2):
            inner = faiss.downcast_index(self.index.index)
            if not isinstance(inner, faiss.IndexFlatCodes):  # only these compact in order, as the id map does
                return False
        try:
            self.index.remove_ids(np.ascontiguousarray(keys, dtype=np.int64))
        except RuntimeError:
            return False
        self._gpu = None
        return True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys) of the top k, -1 / -inf where fewer were found; on the GPU when FAISS has one."""
        deeper = self._deeper(k)
        if self._lookup is None:
            return self._search(queries, k, deeper)
        depth = min(self.ntotal * self.per_item, max(k, TUNED_K) * int(self.params.get("k_factor", 1)))
        return rerank(queries, self.shortlist(queries, max(depth, k), deeper), k, self._lookup, self.per_item)

    def _deeper(self, k: int) -> dict:
        """The settings a search for `k` takes in place of the structure's own: for k more than TUNED_K, those
        tuned for the first rung of DEEP_KS at least k (the last past them all): a rung without its own
        (`nprobe@50`) takes the one below's."""
        deeper = {}
        if k <= TUNED_K:
            return deeper
        for rung in DEEP_KS:
            deeper.update({name: int(self.params[f"{name}@{rung}"]) for name in ("nprobe", "efSearch")
                           if f"{name}@{rung}" in self.params})
            if rung >= k:
                break
        return deeper

    def shortlist(self, queries: np.ndarray, depth: int, deeper: dict | None = None) -> np.ndarray:
        """The keys of each query's `depth` best by the codes, before any re-rank (-1: none): for items of
        several vectors, the items of the best vectors, each once. `deeper`: see `_deeper`."""
        _, keys = self._search(queries, depth, deeper or {})
        if self.per_item > 1:
            keys = first_of_each(np.where(keys >= 0, keys // self.per_item, -1))
        return keys

    def _search(self, queries: np.ndarray, k: int, deeper: dict) -> tuple[np.ndarray, np.ndarray]:
        """The top k of the main index (removed keys left out) and of the delta beside it, merged."""
        scores, keys = self._search_main(queries, k, deeper)
        if self.delta is not None and self.delta.ntotal:
            held = []
            params = _search_parameters(self.delta, deeper, None, held) if deeper else None
            more_scores, more_keys = _mark_missing(*self.delta.search(queries, k, params=params))
            scores, keys = top_of(np.hstack([scores, more_scores]), np.hstack([keys, more_keys]), k)
        return scores, keys

    def _search_main(self, queries: np.ndarray, k: int, deeper: dict) -> tuple[np.ndarray, np.ndarray]:
        wider = k + len(self.dropped)  # the GPU copy cannot filter: it looks further and drops those
        if wider <= GPU_MAX_K and faiss.get_num_gpus() > 0:
            with _GPU_LOCK:
                gpu = self._gpu_copy()
                if gpu:
                    clone, position_to_key = gpu
                    if deeper:  # (the GPU copy is searched under the lock: set for this search, then back)
                        apply_search_params(clone, {**self.params, **deeper})
                    try:
                        scores, found = clone.search(queries, wider)
                    finally:
                        if deeper:
                            apply_search_params(clone, self.params)
                    if position_to_key is not None:
                        found = np.where(found >= 0, position_to_key[np.maximum(found, 0)], -1)
                    found[in_sorted(found, self.dropped)] = -1
                    return top_of(*_mark_missing(scores, found), k)
        ivf = faiss.try_extract_index_ivf(self.index)
        if isinstance(ivf, faiss.IndexIVFFastScan):  # one query or a few: FAISS's fast-scan kernel that spreads
            ivf.implem = FEW_QUERIES_IMPLEM if len(queries) <= 4 else 0  # the probed lists over threads
        if not len(self.dropped) and not deeper:
            return _mark_missing(*self.index.search(queries, k))
        if len(self.dropped) and self._selector is None:
            batch = faiss.IDSelectorBatch(self.dropped)
            self._selector = (faiss.IDSelectorNot(batch), batch)
        held = []  # (the FAISS objects the parameters point to, alive through the search)
        params = _search_parameters(self.index, deeper, self._selector[0] if len(self.dropped) else None, held)
        return _mark_missing(*self.index.search(queries, k, params=params))

    def _gpu_copy(self):
        """Called under _GPU_LOCK: the GPU copy, made on first use after each change."""
        if self._gpu is None:
            wrapped = isinstance(self.index, faiss.IndexIDMap2)
            source = faiss.downcast_index(self.index.index) if wrapped else self.index
            try:
                clone = faiss.index_cpu_to_gpu(gpu_resources(), 0, source)
            except RuntimeError:  # a structure FAISS cannot put on the GPU (HNSW): search it on the CPU
                log.info("%s cannot run on the GPU; searching it on the CPU", self.factory)
                self._gpu = False
                return self._gpu
            apply_search_params(clone, self.params)
            self._gpu = (clone, faiss.vector_to_array(self.index.id_map) if wrapped else None)
        return self._gpu


class ExactStructure:
    """Exact search straight over the stored vectors (the index's memory-mapped segments): no copy of them in
    RAM or in a FAISS file. `scan()` yields (keys, float32 vectors) of every committed row; rows of removed
    items (`dead`, until compaction drops them) are never returned."""

    factory, refine, params, sealed = "Flat", None, {}, None

    def __init__(self, dim: int, scan, count: int, dead: np.ndarray, on_damaged=None, per_item: int = 1):
        self._dim, self.scan, self._count, self.on_damaged = dim, scan, int(count), on_damaged
        self.per_item = per_item  # vectors a row holds side by side (an item scores the best of them)
        self.dead = np.unique(np.asarray(dead, np.int64))
        self._gpu = None  # (GPU flat index of the live rows, position -> key), made on first use after each change

    @property
    def ntotal(self) -> int:
        return self._count

    @property
    def dim(self) -> int:
        return self._dim

    def describe(self) -> str:
        return "Flat"

    def set_params(self, params: dict) -> None:
        pass

    def attach_vectors(self, lookup) -> None:
        pass

    def bytes_per_vector(self) -> float:
        return 0.0

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        self._count += len(keys)  # the rows are in the segments already (committed)
        self._gpu = None

    def remove(self, keys: np.ndarray) -> bool:
        self.dead, fresh = add_sorted(self.dead, keys)
        self._count -= fresh
        self._gpu = None
        return True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """On the GPU when FAISS has one (a flat copy of the live rows there), else one pass over the rows."""
        if k <= GPU_MAX_K and self.per_item == 1 and faiss.get_num_gpus() > 0:
            with _GPU_LOCK:
                if self._gpu is None:
                    self._gpu = self._gpu_copy()
                clone, position_to_key = self._gpu
                scores, found = clone.search(queries, k)
            return _mark_missing(scores, np.where(found >= 0, position_to_key[np.maximum(found, 0)], -1))
        return top_k_scan(queries, self.scan(), k, exclude=self.dead, on_damaged=self.on_damaged,
                          per_item=self.per_item)

    def _gpu_copy(self) -> tuple:
        """A flat index of the live rows on the GPU, filled batch by batch (the host never holds them all)."""
        clone = faiss.index_cpu_to_gpu(gpu_resources(), 0, faiss.IndexFlatIP(self._dim))
        keys = []
        for batch_keys, vectors in self.live_rows():
            clone.add(np.ascontiguousarray(vectors, np.float32))
            keys.append(batch_keys)
        return clone, np.concatenate(keys) if keys else np.zeros(0, np.int64)

    def live_rows(self):
        """(keys, vectors) batches of the rows a copy may hold: removed items' and damaged ones (NaN, not unit
        length: told to `on_damaged`) left out, so that no copy ever scores them."""
        for batch_keys, vectors in self.scan():
            damaged = damaged_rows(vectors, self.per_item)
            if damaged.any() and self.on_damaged is not None:
                self.on_damaged(batch_keys[damaged].tolist())
            keep = ~in_sorted(batch_keys, self.dead) & ~damaged
            yield batch_keys[keep], vectors[keep]


def top_k_scan(queries: np.ndarray, batches, k: int, exclude: np.ndarray | None = None,
               cells: int = 1 << 24, on_damaged=None, per_item: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(scores, keys) of each query's exact top k by inner product, best first (-inf / -1 where fewer), in one
    pass over (keys, vectors) batches, keys in `exclude` (sorted) left out; at most `cells` scores at a time.
    Rows of `per_item` vectors side by side score the best of them. Damaged vectors (NaN, or scoring past a
    unit vector's range) are left out and told to `on_damaged(keys)`."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_keys = np.full((len(queries), k), -1, np.int64)
    block = max(1024 // per_item, cells // max(1, len(queries) * per_item))
    for keys, vectors in batches:
        for start in range(0, len(keys), block):
            part_keys = keys[start:start + block]
            rows = np.asarray(vectors[start:start + block], np.float32)
            scores = queries @ rows.reshape(-1, queries.shape[1]).T
            if per_item > 1:
                scores = scores.reshape(len(queries), len(part_keys), per_item).max(axis=2)
            if exclude is not None and len(exclude):
                scores[:, in_sorted(part_keys, exclude)] = -np.inf
            damaged = ~(np.abs(scores) <= DAMAGED_SCORE) & ~np.isneginf(scores)
            if damaged.any():
                scores[damaged] = -np.inf
                if on_damaged is not None:
                    on_damaged(part_keys[damaged.any(axis=0)].tolist())
            top = min(k, len(part_keys))
            chosen = np.argpartition(-scores, top - 1, axis=1)[:, :top]
            merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, chosen, 1)], axis=1)
            merged_keys = np.concatenate([best_keys, part_keys[chosen]], axis=1)
            order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(merged_scores, order, 1)
            best_keys = np.take_along_axis(merged_keys, order, 1)
    return best_scores, np.where(np.isfinite(best_scores), best_keys, -1)


def file_crc(handle) -> int:
    """CRC-32 of an open binary file from its position on, read in 16 MiB blocks."""
    crc = 0
    while block := handle.read(1 << 24):
        crc = zlib.crc32(block, crc)
    return crc


def gpu_resources():
    """FAISS's GPU resources, made once (call under _GPU_LOCK)."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def first_of_each(keys: np.ndarray) -> np.ndarray:
    """Each row's keys with repeats (after their first place) set to -1."""
    order = np.argsort(keys, axis=1, kind="stable")
    ordered = np.take_along_axis(keys, order, 1)
    repeat = np.zeros(keys.shape, bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    out = keys.copy()
    np.put_along_axis(out, order, np.where(repeat, -1, ordered), 1)
    return out


def top_of(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, keys) of each row, best first (-1 keys scored -inf)."""
    scores = np.where(keys >= 0, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)


def _mark_missing(scores: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores[keys < 0] = -np.inf
    return scores, keys


def wrap(inner: faiss.Index) -> faiss.Index:
    """IVF structures keep keys in their lists; the others get an id map."""
    if faiss.try_extract_index_ivf(inner) is not None and not isinstance(inner, faiss.IndexRefine):
        return inner
    return faiss.IndexIDMap2(inner)


def empty_structure(factory: str, train: np.ndarray, quantizer: faiss.Index | None = None,
                    niter: int | None = None, per_item: int = 1) -> Structure:
    """A trained, empty structure for `factory` ("Flat", any FAISS factory string, optionally ",RFlat"), for
    items of `per_item` vectors (`train`: rows of that many side by side).

    `quantizer`: an already trained IVF coarse quantizer, owned by Python (a clone), for this structure's lists
    (the tuner compares IVF-Flat and IVF-PQ over the same lists, trained once).
    """
    dim = train.shape[1] // per_item
    train = train.reshape(-1, dim)
    if factory == "Flat":
        return Structure.flat(dim, per_item)
    base, _ = split_refine(factory)
    inner = faiss.index_factory(dim, base, faiss.METRIC_INNER_PRODUCT)
    _no_polysemous_training(inner)
    if quantizer is not None and quantizer.ntotal != nlist_of(inner):
        quantizer = None  # trained for another number of lists
    if _OPQ_FASTSCAN.fullmatch(base):
        _train_rotation(inner, train, quantizer)
    elif quantizer is not None and isinstance(inner, faiss.IndexIVFPQFastScan):
        inner = faiss.IndexIVFPQFastScan(quantizer, dim, inner.nlist, inner.pq.M, 4, faiss.METRIC_INNER_PRODUCT)
    elif quantizer is not None and isinstance(inner, faiss.IndexIVFFlat):
        inner = faiss.IndexIVFFlat(quantizer, dim, inner.nlist, faiss.METRIC_INNER_PRODUCT)
    if not inner.is_trained:
        needed = training_size(inner)
        if len(train) < needed:
            raise ValueError(f"index type {factory!r} needs at least {needed} vectors to train, the index has "
                             f"{len(train)}: add more, or use 'flat' or 'auto'")
        ivf = faiss.try_extract_index_ivf(inner)
        if niter is not None and ivf is not None:
            ivf.cp.niter = niter
        quantizer_graph = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None) if ivf is not None else None
        if quantizer_graph is not None:  # items are assigned to lists through it: a wider search, closer lists
            quantizer_graph.efSearch = QUANTIZER_EF
        wanted = max(needed, 256 * nlist_of(inner))
        if len(train) > wanted:  # (a copy only when there is more than k-means uses)
            train = train[np.sort(np.random.default_rng(0).permutation(len(train))[:wanted])]
        inner.train(np.ascontiguousarray(train))
    return Structure(wrap(inner), factory, per_item=per_item)


def _no_polysemous_training(index: faiss.Index) -> None:
    """FAISS's factory trains 8-bit PQ codes ("IVF1024,PQ32", "PQ16") for polysemous search, a Hamming-distance
    filter that only `polysemous_ht` turns on, which clipkit never sets: that training reorders each codebook
    (ADC distances, hence results, are the same either way) and took 98% of an "IVF8,PQ16" build (17 s of
    17.3 on 2,000 vectors)."""
    node = faiss.downcast_index(faiss.try_extract_index_ivf(index) or index)
    while isinstance(node, faiss.IndexPreTransform):
        node = faiss.downcast_index(node.index)
    if hasattr(node, "do_polysemous_training"):
        node.do_polysemous_training = False


def _train_rotation(index: faiss.IndexPreTransform, train: np.ndarray, quantizer: faiss.Index | None) -> None:
    """Train the OPQ rotation of an "OPQ{m}_{width},IVF…,PQ{m}x4fs" index on a sample of `train`, for the 4-bit
    codes it rotates for (FAISS's own training assumes 8-bit ones: several times slower); with `quantizer`,
    its lists' centroids rotated become this index's lists (the rotation keeps inner products: same lists)."""
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    ivf = faiss.extract_index_ivf(index)
    pq = faiss.ProductQuantizer(opq.d_out, opq.M, 4)
    opq.niter, opq.pq = OPQ_ITERATIONS, pq
    rows = train[np.sort(np.random.default_rng(1).permutation(len(train))[:OPQ_TRAIN_ROWS])]
    opq.train(np.ascontiguousarray(rows, dtype=np.float32))
    opq.pq = None
    if quantizer is not None:
        ivf.quantizer.add(opq.apply(quantizer.reconstruct_n(0, quantizer.ntotal)))
