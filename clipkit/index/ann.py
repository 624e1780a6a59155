"""The ANN structure: a FAISS index over (key, unit vector) pairs, the cache of the store that searches run on.

Which structure (exact flat while small, IVF above FLAT_LIMIT, or any FAISS factory string), training it,
tuning its search parameters to a recall target, adding and removing by key, serialising it, and a GPU
copy for searching when FAISS sees a GPU. Keys live inside the structure itself: an IVF index stores
them in its inverted lists (so removing some never shifts the others); structures without their own ids
are wrapped in an IndexIDMap2, and removal is used only where the inner index compacts in order
(flat codes); everything else is rebuilt from the store by the caller.
"""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np

log = logging.getLogger(__name__)

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


def choose_structure(index_type: str, n: int, dim: int, memory_budget: int | None = None) -> str:
    """The FAISS factory string for `n` vectors: exact flat while small, IVF above FLAT_LIMIT.

    IVF lists ~ 4 sqrt(n) (a power of two); the vectors stay uncompressed unless they would not fit
    `memory_budget` bytes, and only then product quantisation (it costs text-to-image recall).
    """
    if index_type == "flat":
        return "Flat"
    if index_type != "auto":
        return index_type
    if n <= FLAT_LIMIT:
        return "Flat"
    nlist = int(min(65536, max(256, 2 ** round(np.log2(4 * np.sqrt(n))))))
    nlist = min(nlist, 2 ** int(np.log2(max(2, n // 39))))  # k-means wants >= 39 training points per list
    if memory_budget is not None and n * dim * 4 > memory_budget:
        code = max(1, memory_budget // n)
        m = max(d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, min(code, dim // 2)))
        return f"IVF{nlist},PQ{m}"
    return f"IVF{nlist},Flat"


def nlist_of(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


def training_size(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    needed = 39 * int(ivf.nlist) if ivf is not None else 0  # FAISS's own minimum for k-means
    return max(needed, 256 if "PQ" in type(faiss.downcast_index(index)).__name__ else 1)


def apply_search_params(index: faiss.Index, params: dict) -> None:
    """Set nprobe / efSearch on an index, through IDMap wrappers."""
    if not params:
        return
    if "nprobe" in params:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = int(params["nprobe"])
    if "efSearch" in params:
        inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else faiss.downcast_index(index)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = int(params["efSearch"])


class Structure:
    """A FAISS index holding (key, vector) pairs, with the search parameters it was tuned to."""

    def __init__(self, index: faiss.Index, factory: str = "Flat", params: dict | None = None):
        self.index, self.factory, self.params = index, factory, dict(params or {})
        apply_search_params(index, self.params)
        self._gpu = None  # (GPU index, position -> key map or None), or False: not on the GPU

    @classmethod
    def flat(cls, dim: int) -> "Structure":
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @classmethod
    def from_bytes(cls, data: bytes, factory: str, params: dict | None) -> "Structure":
        return cls(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), factory, params)

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def describe(self) -> str:
        return self.factory + "".join(f" {k}={v}" for k, v in self.params.items())

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        for start in range(0, len(vectors), 100_000):
            self.index.add_with_ids(np.ascontiguousarray(vectors[start:start + 100_000], dtype=np.float32),
                                    np.ascontiguousarray(keys[start:start + 100_000], dtype=np.int64))
        self._gpu = None

    def remove(self, keys: np.ndarray) -> bool:
        """Remove these keys; False where this structure cannot (the caller rebuilds it)."""
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
        if k <= GPU_MAX_K and faiss.get_num_gpus() > 0:
            with _GPU_LOCK:
                gpu = self._gpu_copy()
                if gpu:
                    clone, position_to_key = gpu
                    scores, found = clone.search(queries, k)
                    if position_to_key is not None:
                        found = np.where(found >= 0, position_to_key[np.maximum(found, 0)], -1)
                    return _mark_missing(scores, found)
        return _mark_missing(*self.index.search(queries, k))

    def _gpu_copy(self):
        """Called under _GPU_LOCK: the GPU copy, made on first use after each change."""
        global _GPU_RESOURCES
        if self._gpu is None:
            if _GPU_RESOURCES is None:
                _GPU_RESOURCES = faiss.StandardGpuResources()
            wrapped = isinstance(self.index, faiss.IndexIDMap2)
            source = faiss.downcast_index(self.index.index) if wrapped else self.index
            try:
                clone = faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, source)
            except RuntimeError:  # a structure FAISS cannot put on the GPU (HNSW): search it on the CPU
                log.info("%s cannot run on the GPU; searching it on the CPU", self.factory)
                self._gpu = False
                return self._gpu
            apply_search_params(clone, self.params)
            self._gpu = (clone, faiss.vector_to_array(self.index.id_map) if wrapped else None)
        return self._gpu


def _mark_missing(scores: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores[keys < 0] = -np.inf
    return scores, keys


def _wrap(inner: faiss.Index) -> faiss.Index:
    """IVF structures keep keys in their lists; the others get an id map."""
    if faiss.try_extract_index_ivf(inner) is not None and not isinstance(inner, faiss.IndexRefine):
        return inner
    return faiss.IndexIDMap2(inner)


def build_structure(index_type: str, vectors: np.ndarray, keys: np.ndarray, *, memory_budget: int | None = None,
                    target_recall: float = 0.95, sample_queries: np.ndarray | None = None,
                    params: dict | None = None) -> Structure:
    """Choose (for "auto"), train, fill and tune the structure for these vectors.

    `params`: search parameters to keep (no tuning); None tunes them to `target_recall`.
    """
    dim = vectors.shape[1]
    factory = choose_structure(index_type, len(vectors), dim, memory_budget)
    if factory == "Flat":
        structure = Structure.flat(dim)
        structure.add(vectors, keys)
        return structure
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not inner.is_trained:
        needed = training_size(inner)
        if len(vectors) < needed:
            raise ValueError(f"index type {factory!r} needs at least {needed} vectors to train, the index has "
                             f"{len(vectors)}: add more, or use 'flat' or 'auto'")
        sample = np.random.default_rng(0).permutation(len(vectors))[:max(needed, 256 * nlist_of(inner))]
        inner.train(vectors[np.sort(sample)])
    structure = Structure(_wrap(inner), factory)
    structure.add(vectors, keys)
    if not params:
        params = tune_search(structure.index, vectors, keys, target_recall, queries=sample_queries)
        log.info("index %s tuned: %s", factory, params)
        if index_type == "auto" and params.get("nprobe", 0) > nlist_of(inner) // 8:
            # the data has too little structure for IVF to pay: exact search is as fast and exact
            log.info("%s needs nprobe=%s of %s lists for the target recall; using exact search", factory,
                     params["nprobe"], nlist_of(inner))
            structure = Structure.flat(dim)
            structure.add(vectors, keys)
            return structure
    structure.params = dict(params)
    apply_search_params(structure.index, structure.params)
    return structure


def tune_search(index: faiss.Index, vectors: np.ndarray, keys: np.ndarray, target: float = 0.95, k: int = 10,
                n_queries: int = 500, queries: np.ndarray | None = None) -> dict:
    """The cheapest nprobe / efSearch whose recall@k against exact search reaches `target` (+0.01 margin).

    `vectors` are the indexed vectors with their ascending `keys`. `queries`: sample queries like the real
    ones (`Index.build(sample_queries=...)`), best; without them, samples of the data perturbed to about
    0.6 cosine of their source stand in.
    """
    rng = np.random.default_rng(1)
    n, dim = len(vectors), vectors.shape[1]
    count = min(n_queries, n)
    if queries is None:  # stored vectors moved to ~0.6 cosine of themselves: near the data, not on it
        queries = vectors[rng.choice(n, count, replace=False)]
        queries = queries + 1.33 * rng.standard_normal(queries.shape).astype(np.float32) / np.sqrt(dim)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    truth = exact.search(queries, k)[1]
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    if ivf is not None:
        name, values = "nprobe", [v for v in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
                                  if v <= ivf.nlist] + [int(ivf.nlist)]
    elif hasattr(inner, "hnsw"):
        name, values = "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024]
    else:
        return {}
    best = values[-1]
    for value in values:
        apply_search_params(index, {name: value})
        found = index.search(queries, k)[1]
        found = np.where(found >= 0, np.searchsorted(keys, found), -1)  # keys -> positions, as in truth
        recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])
        if recall >= min(1.0, target + 0.01):
            best = value
            break
    return {name: int(best)}
