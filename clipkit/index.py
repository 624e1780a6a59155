"""`Index`: a FAISS inner-product index over unit-norm embeddings, plus a SQLite store.

On disk an index is a directory:

    meta.sqlite   the source of truth: one row per item (user id, path, mtime, size, caption, extra JSON,
                  embedding) and an info table (format, dim, model, generation)
    index.faiss   the FAISS index, a cache of the embeddings in meta.sqlite, tagged with the generation
                  it was written at; missing or stale, it is rebuilt from meta.sqlite on load
    config.json   format, version, dim, metric, model, count (for people and tools to read)

Every change to the store is one SQLite transaction, and the FAISS file and config are replaced
atomically (temporary name, fsync, rename), so a crash never leaves an index that loads wrongly.
FAISS runs on the GPU when `faiss.get_num_gpus() > 0`; the CPU index stays the one that is saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from clipkit import __version__
from clipkit._io import atomic_path, atomic_write_json, atomic_write_with
from clipkit.data.folder import scan_images
from clipkit.data.images import failure_kind
from clipkit.errors import BrokenIndexError, ModelMismatchError

log = logging.getLogger(__name__)

FORMAT = "clipkit-index"
FORMAT_VERSION = 1
DB_FILE, FAISS_FILE, CONFIG_FILE = "meta.sqlite", "index.faiss", "config.json"
METRIC = "inner_product"
_META_COLUMNS = ("path", "mtime", "size", "caption")
_RECORD_COLUMNS = ", ".join(("id", *_META_COLUMNS, "extra"))  # a record's row, as Index._record reads it
_SQL_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY,      -- the FAISS id
    id UNIQUE NOT NULL,           -- the user's id (int or text, kept as given)
    path TEXT, mtime REAL, size INTEGER, caption TEXT, extra TEXT,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class SyncReport:
    """What `Index.sync_folder` did (or, from `plan_folder`, would do)."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    moved: int = 0  # renamed or moved files recognised by content, kept without re-embedding
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped_kinds: dict[str, int] = field(default_factory=dict)  # why, in a few words -> how many

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    def skip(self, path: str, reason: str, kind: str) -> None:
        self.skipped.append((path, reason))
        self.skipped_kinds[kind] = self.skipped_kinds.get(kind, 0) + 1


@dataclass
class SyncPlan:
    """What bringing an index up to date with a folder takes (`Index.plan_folder`)."""

    root: Path
    new: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    changed: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # ids of files no longer there
    moved: list[tuple[str, Path, os.stat_result]] = field(default_factory=list)  # (old id, new path, stat)
    unchanged: int = 0
    report: SyncReport = field(default_factory=SyncReport)  # skips found while planning


def file_hash(path: str | os.PathLike) -> str:
    """A content hash of a file (BLAKE2b, 128 bits), to recognise it after a rename or move."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalize_id(value: Any) -> int | str:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"ids must be int or str, got bool {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"ids must be int or str, got {type(value).__name__} {value!r}")


def _ids_array(values: list) -> np.ndarray:
    if values and all(isinstance(v, int) for v in values):
        return np.asarray(values, dtype=np.int64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def prepare_vectors(vectors: Any, dim: int, what: str = "embeddings") -> np.ndarray:
    """Validate a (N, dim) or (dim,) array and return unit-norm float32 rows (always 2-D)."""
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric array: {exc}") from None
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, {dim}), got shape {array.shape}")
    if array.shape[1] != dim:
        raise ValueError(f"{what} have dimension {array.shape[1]} but the index has dimension {dim}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} contain an all-zero vector, which has no direction to search by")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


class Index:
    """Nearest-neighbour search over unit-norm embeddings with per-item metadata."""

    def __init__(self, dim: int, *, model=None, model_info: dict | None = None, index_type: str = "flat",
                 target_recall: float = 0.95, memory_budget: int | None = None):
        """An empty index of `dim`-d vectors.

        `index_type`: "flat" (exact), "auto" (exact up to FLAT_LIMIT vectors, then IVF chosen by size and
        `memory_budget`, its nprobe tuned at build time so recall@10 against exact stays >= `target_recall`),
        or any FAISS factory string ("IVF1024,Flat", "HNSW32", "IVF4096,PQ32", ...), tuned the same way.
        """
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        _check_index_type(index_type, int(dim))
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        self.model = model  # the live Model, when known (not persisted)
        self.path: Path | None = None
        self.last_sync: SyncReport | None = None
        self._lock = threading.RLock()
        self._db = self._connect(":memory:")
        info = model.info if model is not None else model_info
        if info is not None and int(info.get("dim", self.dim)) != self.dim:
            raise ValueError(f"model dimension {info['dim']} does not match index dimension {self.dim}")
        with self._db:
            self._set_info("format", FORMAT)
            self._set_info("format_version", FORMAT_VERSION)
            self._set_info("dim", self.dim)
            self._set_info("model", info)
            self._set_info("generation", 0)
            self._set_info("index_type", index_type)
            self._set_info("target_recall", target_recall)
            self._set_info("memory_budget", memory_budget)
        self._faiss = self._new_faiss()
        self._gpu = None

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_embeddings(cls, embeddings: Any, ids: Sequence | None = None, metadata: Sequence[dict] | None = None,
                        *, model=None, index_type: str = "flat", **options) -> "Index":
        """An index over `embeddings` (N, D); ids default to 0..N-1; metadata is one dict per row.

        `index_type` and `options` (target_recall, memory_budget) as for `Index(...)`.
        """
        array = np.asarray(embeddings)
        if array.ndim != 2 or array.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty 2-D array (N, D), got shape {array.shape}")
        index = cls(array.shape[1], model=model, index_type=index_type, **options)
        index.add(array, ids=ids, metadata=metadata)
        if index_type != "flat":
            index.build()
        return index

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, model, *, batch_size: int = 64, workers: int | None = None,
                    progress: bool | None = None, index_type: str = "flat", **options) -> "Index":
        """Embed every image under `folder` (recursively); unreadable files are skipped and logged.

        The report of what was indexed and skipped is in `index.last_sync`.
        """
        from clipkit.encode import as_model

        model = as_model(model)
        index = cls(model.dim, model=model, index_type=index_type, **options)
        index.sync_folder(folder, model, batch_size=batch_size, workers=workers, progress=progress)
        if index_type != "flat":
            index.build()
        return index

    @classmethod
    def merge(cls, parts: Sequence["Index | str | os.PathLike"], *, index_type: str = "flat",
              chunk: int = 50_000, **options) -> "Index":
        """One index holding every item of `parts` (indexes or index folders), e.g. the shards written
        by `clipkit index --shard i/n`. They must share the model and dimension; an id found in two
        parts is a ValueError. Items keep their ids, metadata and embeddings (nothing is re-embedded).
        """
        loaded = [p if isinstance(p, Index) else Index.load(p) for p in parts]
        if not loaded:
            raise ValueError("nothing to merge: give at least one index")
        first = loaded[0]
        for position, part in enumerate(loaded[1:], 1):
            if part.dim != first.dim:
                raise ValueError(f"part {position} holds {part.dim}-d embeddings, part 0 {first.dim}-d ones")
            if (part.model_info or {}).get("fingerprint") != (first.model_info or {}).get("fingerprint"):
                raise ModelMismatchError(f"part {position} was built by another model than part 0 "
                                         f"({(part.model_info or {}).get('name')} vs {(first.model_info or {}).get('name')})")
        merged = cls(first.dim, model=first.model, model_info=first.model_info, index_type=index_type, **options)
        for part in loaded:
            ids = part.ids()
            for start in range(0, len(ids), chunk):
                batch = ids[start:start + chunk]
                records = part.get(batch)
                for record in records:
                    record.pop("id")
                merged.add(part.embeddings(batch), ids=batch, metadata=records)
        if index_type != "flat":
            merged.build()
        return merged

    # -- storage ----------------------------------------------------------------------------

    @staticmethod
    def _connect(target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, check_same_thread=False)
        db.execute("PRAGMA foreign_keys=ON")
        if target != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    def _set_info(self, name: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO info(name, value) VALUES (?, ?)", (name, json.dumps(value)))

    def _get_info(self, name: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM info WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else default

    @property
    def model_info(self) -> dict | None:
        """name, pretrained, dim and weight fingerprint of the model that built this index."""
        return self._get_info("model")

    @property
    def generation(self) -> int:
        return int(self._get_info("generation", 0))

    def _bump_generation(self) -> None:
        self._db.execute("UPDATE info SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE name = 'generation'")

    @contextlib.contextmanager
    def _change(self):
        """One transaction for a change to the store and the FAISS index together.

        On any error the transaction rolls back and FAISS is rebuilt from the store, so the two never
        disagree.
        """
        with self._lock:
            try:
                with self._db:
                    yield
                    self._bump_generation()
            except BaseException:
                self._faiss = self._rebuild_faiss()
                self._gpu = None
                raise

    def _new_faiss(self) -> faiss.Index:
        self._factory = "Flat"
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @property
    def index_type(self) -> str:
        return self._get_info("index_type", "flat")

    @property
    def structure(self) -> str:
        """The FAISS structure in use now ("Flat", "IVF1024,Flat", ...) and its tuned search parameters."""
        params = self._get_info("search_params") or {}
        return self._factory + "".join(f" {k}={v}" for k, v in params.items())

    def set_index_type(self, index_type: str, sample_queries: Any = None) -> None:
        """Switch to another index type ("flat", "auto" or a FAISS factory string) and build it now."""
        _check_index_type(index_type, self.dim)
        self._build(sample_queries, index_type)

    def build(self, sample_queries: Any = None) -> None:
        """(Re)build the FAISS structure for the current contents: choose it (auto), train, add, tune.

        `sample_queries` (M, D), e.g. text embeddings of typical queries, tune nprobe/efSearch on the
        queries this index will see; otherwise perturbed samples of the data are used.
        Searches are exact until then for trained types; `add` after a build goes into the built structure.
        """
        self._build(sample_queries)

    def _build(self, sample_queries: Any, index_type: str | None = None) -> None:
        if sample_queries is not None:
            sample_queries = prepare_vectors(sample_queries, self.dim, what="sample_queries")
        with self._lock, self._db:  # a build that fails rolls a type change back: the index stays as it was
            if index_type is not None:
                self._set_info("index_type", index_type)
                self._set_info("search_params", {})
            self._faiss = self._rebuild_faiss(tune=True, sample_queries=sample_queries)
            self._gpu = None

    def _build_from(self, vectors: np.ndarray, keys: np.ndarray, tune: bool,
                    sample_queries: np.ndarray | None = None) -> faiss.Index:
        factory = choose_structure(self.index_type, len(vectors), self.dim, self._get_info("memory_budget"))
        self._set_info("planned_structure", factory)
        if factory == "Flat":
            index = self._new_faiss()
            index.add_with_ids(vectors, keys)
            if self._get_info("search_params"):
                self._set_info("search_params", {})
            return index
        inner = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not inner.is_trained:
            needed = _training_size(inner)
            if len(vectors) < needed:
                raise ValueError(f"index type {factory!r} needs at least {needed} vectors to train, the index has "
                                 f"{len(vectors)}: add more, or use 'flat' or 'auto'")
            sample = np.random.default_rng(0).permutation(len(vectors))[:max(needed, 256 * _nlist(inner))]
            inner.train(vectors[np.sort(sample)])
        index = faiss.IndexIDMap2(inner)
        for start in range(0, len(vectors), 100_000):
            index.add_with_ids(vectors[start:start + 100_000], keys[start:start + 100_000])
        self._factory = factory
        params = dict(self._get_info("search_params") or {})
        if tune or not params:
            params = tune_search(index, vectors, self._get_info("target_recall", 0.95), queries=sample_queries)
            log.info("index %s tuned: %s", factory, params)
            if self.index_type == "auto" and params.get("nprobe", 0) > _nlist(inner) // 8:
                # the data has too little structure for IVF to pay: exact search is as fast and exact
                log.info("%s needs nprobe=%s of %s lists for the target recall; using exact search", factory,
                         params["nprobe"], _nlist(inner))
                index, params = self._new_faiss(), {}
                index.add_with_ids(vectors, keys)
            self._set_info("search_params", params)  # committed by the caller's transaction (or build)
        apply_search_params(index, params)
        return index

    def __len__(self) -> int:
        return int(self._faiss.ntotal)

    def __contains__(self, item_id: Any) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM items WHERE id = ?", (_normalize_id(item_id),)).fetchone() is not None

    def __repr__(self) -> str:
        model = (self.model_info or {}).get("name")
        return f"Index(n={len(self)}, dim={self.dim}, model={model!r}, path={str(self.path) if self.path else None!r})"

    # -- changes ----------------------------------------------------------------------------

    def add(self, embeddings: Any, ids: Sequence | None = None, metadata: Sequence[dict] | None = None) -> None:
        """Add rows (normalised to unit length). An id already in the index is a ValueError."""
        vectors = prepare_vectors(embeddings, self.dim)
        n = len(vectors)
        if ids is None:
            with self._lock:
                start = self._db.execute("SELECT COALESCE(MAX(key), -1) + 1 FROM items").fetchone()[0]
            ids = range(start, start + n)
        ids = [_normalize_id(v) for v in ids]
        if len(ids) != n:
            raise ValueError(f"got {n} embeddings but {len(ids)} ids")
        if len(set(ids)) != n:
            raise ValueError("ids contain duplicates")
        metadata = list(metadata) if metadata is not None else [{}] * n
        if len(metadata) != n:
            raise ValueError(f"got {n} embeddings but {len(metadata)} metadata entries")
        rows = [self._meta_row(m) for m in metadata]
        with self._change():
            clash = self._existing(ids)
            if clash:
                raise ValueError(f"{len(clash)} id(s) already in the index, e.g. {clash[0]!r}; remove them first")
            self._insert(vectors, ids, rows)

    def _insert(self, vectors: np.ndarray, ids: list, rows: list[tuple]) -> None:
        """Inside a transaction: store unit-norm `vectors` with their ids and metadata rows."""
        start = self._db.execute("SELECT COALESCE(MAX(key), -1) + 1 FROM items").fetchone()[0]
        keys = np.arange(start, start + len(ids), dtype=np.int64)
        self._db.executemany(
            "INSERT INTO items(key, id, path, mtime, size, caption, extra, embedding) VALUES (?,?,?,?,?,?,?,?)",
            [(int(k), i, *row, v.tobytes()) for k, i, row, v in zip(keys, ids, rows, vectors)])
        self._faiss.add_with_ids(vectors, keys)
        self._gpu = None

    @staticmethod
    def _meta_row(meta: dict | None) -> tuple:
        meta = dict(meta or {})
        if not isinstance(meta, dict):
            raise ValueError(f"metadata entries must be dicts, got {type(meta).__name__}")
        path = meta.pop("path", None)
        mtime = meta.pop("mtime", None)
        size = meta.pop("size", None)
        caption = meta.pop("caption", None)
        try:
            extra = json.dumps(meta) if meta else None
        except TypeError as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
        return (os.fspath(path) if path is not None else None,
                float(mtime) if mtime is not None else None,
                int(size) if size is not None else None,
                str(caption) if caption is not None else None, extra)

    def _existing(self, ids: list) -> list:
        found = []
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[start:start + _SQL_CHUNK]
            query = f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            found.extend(row[0] for row in self._db.execute(query, chunk))
        return found

    def _keys_for(self, ids: list) -> dict:
        keys = {}
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[start:start + _SQL_CHUNK]
            query = f"SELECT id, key FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            keys.update(self._db.execute(query, chunk).fetchall())
        return keys

    def remove(self, ids: Iterable) -> int:
        """Remove items by id; an id not in the index is a ValueError (and nothing is removed)."""
        if isinstance(ids, (str, int, np.integer)):
            ids = [ids]
        ids = list(dict.fromkeys(_normalize_id(v) for v in ids))
        if not ids:
            return 0
        with self._lock:
            keys = self._keys_for(ids)
            missing = [i for i in ids if i not in keys]
            if missing:
                raise ValueError(f"{len(missing)} id(s) not in the index, e.g. {missing[0]!r}")
            with self._change():
                self._delete_keys(list(keys.values()))
        return len(ids)

    def _delete_keys(self, keys: list[int]) -> None:
        """Inside a transaction: drop rows and their vectors."""
        for start in range(0, len(keys), _SQL_CHUNK):
            chunk = keys[start:start + _SQL_CHUNK]
            self._db.execute(f"DELETE FROM items WHERE key IN ({','.join('?' * len(chunk))})", chunk)
        try:
            self._faiss.remove_ids(np.asarray(keys, dtype=np.int64))
        except RuntimeError:  # structures without removal (HNSW): rebuild from the store, which has the truth
            self._faiss = self._rebuild_faiss()
        self._gpu = None

    # -- queries ----------------------------------------------------------------------------

    def _searcher(self) -> tuple[faiss.Index, np.ndarray | None]:
        """The index to search and, for a GPU copy of the inner index, its position -> key map."""
        if faiss.get_num_gpus() == 0 or len(self) == 0:
            return self._faiss, None
        if self._gpu is None:
            inner = faiss.downcast_index(self._faiss.index)
            try:
                clone = faiss.index_cpu_to_gpu(_gpu_resources(), 0, inner)
            except RuntimeError:  # a structure FAISS cannot put on the GPU (HNSW): search it on the CPU
                self._gpu = (self._faiss, None)
                return self._gpu
            apply_search_params(clone, self._get_info("search_params") or {})
            self._gpu = (clone, faiss.vector_to_array(self._faiss.id_map))
        return self._gpu

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: `(scores, ids)`, each `(n_queries, min(k, len(index)))`, best first.

        Queries are normalised to unit length; `ids` are the ids given when the items were added. An
        approximate structure (IVF) may find fewer than k: those slots hold id None and score -inf.
        """
        with self._lock:
            scores, keys = self.search_keys(queries, k)
            return scores, self._ids_of(keys)

    def search_keys(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """As `search`, but `(scores, keys)`: the items' integer keys (-1 where none was found), with no
        metadata lookup; `get_by_key` turns them into records."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        vectors = prepare_vectors(queries, self.dim, what="queries")
        with self._lock:
            k = min(int(k), len(self))
            if k == 0:
                return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
            searcher, position_to_key = self._searcher()
            scores, found = searcher.search(vectors, k)
            keys = np.where(found >= 0, position_to_key[found], -1) if position_to_key is not None else found
            scores[found < 0] = -np.inf
        return scores, keys

    def _ids_of(self, keys: np.ndarray) -> np.ndarray:
        id_of = dict(self._rows_by_key([int(k) for k in np.unique(keys) if k >= 0], "id"))
        flat = [id_of[int(k)] if k >= 0 else None for k in keys.reshape(-1)]
        return _ids_array(flat).reshape(keys.shape)

    def get(self, ids: Iterable) -> list[dict]:
        """Metadata for each id, in order: {'id', 'path', 'mtime', 'size', 'caption', ...extra}."""
        ids = [_normalize_id(v) for v in ids]
        records = {}
        with self._lock:
            for start in range(0, len(ids), _SQL_CHUNK):
                chunk = ids[start:start + _SQL_CHUNK]
                query = f"SELECT {_RECORD_COLUMNS} FROM items WHERE id IN ({','.join('?' * len(chunk))})"
                for row in self._db.execute(query, chunk):
                    records[row[0]] = self._record(row)
        missing = [i for i in ids if i not in records]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[0]!r}")
        return [records[i] for i in ids]

    def keys(self, ids: Iterable) -> list[int]:
        """The stable integer key of each id (its FAISS id), for callers that need integer handles."""
        ids = [_normalize_id(v) for v in ids]
        with self._lock:
            keys = self._keys_for(ids)
        missing = [i for i in ids if i not in keys]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[0]!r}")
        return [int(keys[i]) for i in ids]

    def get_by_key(self, keys: Iterable[int]) -> list[dict | None]:
        """Metadata (as `get`, with 'id' and 'key') for each integer key; None where no item has that key."""
        keys = [int(k) for k in keys]
        with self._lock:
            rows = {key: row for key, *row in self._rows_by_key(keys, _RECORD_COLUMNS)}
        return [self._record(rows[k], k) if k in rows else None for k in keys]

    @staticmethod
    def _record(row: tuple, key: int | None = None) -> dict:
        item_id, *values, extra = row
        record = {"id": item_id, **{c: v for c, v in zip(_META_COLUMNS, values) if v is not None}}
        record.update(json.loads(extra) if extra else {})
        if key is not None:
            record["key"] = key
        return record

    def ids(self) -> list:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT id FROM items ORDER BY key")]

    def embeddings(self, ids: Iterable | None = None) -> np.ndarray:
        """The stored unit-norm embeddings (all, in insertion order, or for the given ids)."""
        with self._lock:
            if ids is None:
                blobs = [row[0] for row in self._db.execute("SELECT embedding FROM items ORDER BY key")]
            else:
                ids = [_normalize_id(v) for v in ids]
                keys = self._keys_for(ids)
                missing = [i for i in ids if i not in keys]
                if missing:
                    raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[0]!r}")
                by_key = dict(self._rows_by_key([keys[i] for i in ids], "embedding"))
                blobs = [by_key[keys[i]] for i in ids]
        return self._vectors(blobs).copy()

    def _rows_by_key(self, keys: list[int], columns: str):
        """Rows (key, *columns) of the items with these keys, in chunks SQLite accepts."""
        for start in range(0, len(keys), _SQL_CHUNK):
            chunk = keys[start:start + _SQL_CHUNK]
            yield from self._db.execute(
                f"SELECT key, {columns} FROM items WHERE key IN ({','.join('?' * len(chunk))})", chunk)

    # -- models -----------------------------------------------------------------------------

    def check_model(self, model) -> None:
        """Refuse a model other than the one that built this index."""
        info = self.model_info
        if info is None:
            if model.dim != self.dim:
                raise ModelMismatchError(f"model {model.name} makes {model.dim}-d embeddings but the index holds "
                                         f"{self.dim}-d ones")
            return
        if model.fingerprint != info.get("fingerprint"):
            raise ModelMismatchError(
                f"this index was built with model {info.get('name')!r} (pretrained={info.get('pretrained')!r}, "
                f"weights {info.get('fingerprint')}), but the query model is {model.name!r} "
                f"(pretrained={model.pretrained!r}, weights {model.fingerprint}); embeddings from different "
                "models are not comparable: query with the index's own model (model=None) or rebuild the index")

    def resolve_model(self, model=None):
        """The model to embed queries with: `model` (checked), the live model, or the recorded one loaded."""
        from clipkit.encode import as_model
        from clipkit.models import load_model

        if model is not None:
            model = as_model(model)
        elif self.model is not None:
            model = self.model
        else:
            info = self.model_info
            if info is None:
                raise ValueError("this index records no model; pass model= to embed the query, or search by vector")
            model = load_model(info["name"], info.get("pretrained"))
        self.check_model(model)
        if self.model is None:
            self.model = model
        return model

    # -- folders ----------------------------------------------------------------------------

    def plan_folder(self, folder: str | os.PathLike, *, exclude: Sequence[str] = (),
                    shard: tuple[int, int] | None = None) -> SyncPlan:
        """What `sync_folder` would do, without changing anything (`clipkit index --check`).

        A file is unchanged when its size and mtime match what was indexed. A new file with the size
        and content hash of a file that is gone is that file renamed or moved: it keeps its embedding.
        `shard=(i, n)`: only the files of shard i of n (by a hash of the path under `folder`), for
        indexing one folder from n processes or machines into n indexes merged later (`Index.merge`).
        """
        root = Path(folder).resolve()
        plan = SyncPlan(root=root)
        known = self._known_files(root)
        files = scan_images(root, exclude=exclude)
        if shard is not None:
            files = [p for p in files if shard_of(p.relative_to(root).as_posix(), shard[1]) == shard[0]]
        for path in files:
            try:
                stat = path.stat()
            except OSError as exc:
                plan.report.skip(str(path), str(exc), failure_kind(exc))
                continue
            previous = known.pop(str(path), None)
            if previous is None:
                plan.new.append((path, stat))
            elif previous == (stat.st_size, stat.st_mtime):
                plan.unchanged += 1
            else:
                plan.changed.append((path, stat))
        plan.gone = list(known)
        if plan.gone and plan.new:
            self._find_moves(plan)
        return plan

    def _find_moves(self, plan: SyncPlan) -> None:
        by_hash: dict[tuple[int, str], str] = {}
        for record in self.get(plan.gone):
            content = record.get("content_hash")
            if content and record.get("size") is not None:
                by_hash.setdefault((int(record["size"]), content), record["id"])
        sizes = {size for size, _ in by_hash}
        still_new = []
        for path, stat in plan.new:
            match = by_hash.pop((stat.st_size, _hash_or_none(path)), None) if stat.st_size in sizes else None
            if match is None:
                still_new.append((path, stat))
            else:
                plan.moved.append((match, path, stat))
        moved_ids = {old for old, _, _ in plan.moved}
        plan.new = still_new
        plan.gone = [i for i in plan.gone if i not in moved_ids]

    def sync_folder(self, folder: str | os.PathLike, model=None, *, batch_size: int = 64,
                    workers: int | None = None, progress: bool | None = None,
                    exclude: Sequence[str] = (), shard: tuple[int, int] | None = None) -> SyncReport:
        """Bring the index up to date with the images under `folder` (see `plan_folder`).

        New files are embedded, changed ones (size or mtime) re-embedded, deleted ones removed,
        renamed or moved ones re-pointed without re-embedding, unchanged ones left alone. Unreadable
        files are skipped and reported with the reason. Each batch is committed on its own (embeddings
        and metadata in one transaction), so an interrupted run keeps what it finished and running it
        again resumes. Ids are absolute file paths; one file is never indexed twice.
        """
        from clipkit.encode import iter_image_batches

        model = self.resolve_model(model)
        if self.model_info is None:
            with self._lock, self._db:
                self._set_info("model", model.info)
        plan = self.plan_folder(folder, exclude=exclude, shard=shard)
        report = plan.report
        report.unchanged = plan.unchanged
        if plan.moved:
            with self._change():
                for old_id, path, stat in plan.moved:
                    self._db.execute("UPDATE items SET id = ?, path = ?, mtime = ?, size = ? WHERE id = ?",
                                     (str(path), str(path), stat.st_mtime, stat.st_size, old_id))
            report.moved = len(plan.moved)
        if plan.gone:
            with self._change():
                keys = self._keys_for(plan.gone)
                self._delete_keys(list(keys.values()))
            report.removed = len(plan.gone)
        todo = plan.new + plan.changed
        paths = [p for p, _ in todo]
        with tqdm(total=len(paths), disable=None if progress is None else not progress, unit="img",
                  desc="indexing") as bar:
            for pixels, positions, failures in iter_image_batches(paths, model.preprocess, batch_size,
                                                                   skip_errors=True, workers=workers,
                                                                   device=model.device,
                                                                   draft_size=model.image_size):
                for position, reason, kind in failures:
                    report.skip(str(paths[position]), reason, kind)
                    log.info("skipped %s", reason)
                if positions:
                    vectors = model.encode_image(pixels).cpu().numpy()
                    added, updated = self._replace_files(vectors, [todo[p] for p in positions])
                    report.added += added
                    report.updated += updated
                bar.update(len(positions) + len(failures))
        self.last_sync = report
        return report

    def _known_files(self, root: Path) -> dict[str, tuple[int, float]]:
        prefix = str(root).rstrip(os.sep) + os.sep
        with self._lock:
            rows = self._db.execute("SELECT id, size, mtime FROM items WHERE path IS NOT NULL AND substr(path, 1, ?) = ?",
                                    (len(prefix), prefix)).fetchall()
        return {item_id: (size, mtime) for item_id, size, mtime in rows if isinstance(item_id, str)}

    def _replace_files(self, vectors: np.ndarray, batch: list[tuple[Path, os.stat_result]]) -> tuple[int, int]:
        """One transaction: drop old rows of these files, add the new embeddings."""
        ids = [str(path) for path, _ in batch]
        rows = [self._meta_row({"path": str(path), "size": stat.st_size, "mtime": stat.st_mtime,
                                "content_hash": _hash_or_none(path)})
                for path, stat in batch]
        vectors = prepare_vectors(vectors, self.dim)
        with self._change():
            old = self._keys_for(ids)
            if old:
                self._delete_keys(list(old.values()))
            self._insert(vectors, ids, rows)
        return len(ids) - len(old), len(old)

    # -- save / load ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the index to directory `path` (default: where it was loaded or last saved).

        Afterwards the index is attached to `path`: later changes are committed to its store at once.
        """
        if path is None:
            if self.path is None:
                raise ValueError("this index has not been saved before: pass a path")
            path = self.path
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a folder; choose another index path")
        if path.is_dir() and any(path.iterdir()) and not (path / DB_FILE).exists():
            raise ValueError(f"{path} is a non-empty folder that is not a clipkit index; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self.path is None or path.resolve() != self.path.resolve():
                self._copy_db_to(path / DB_FILE)
            if self.index_type == "auto" and self._get_info("planned_structure", "Flat") != choose_structure(
                    "auto", len(self), self.dim, self._get_info("memory_budget")):
                self.build()  # the collection outgrew (or shrank below) the structure chosen for it
            self._db.commit()
            generation = self.generation
            cpu_index = self._faiss
            atomic_write_with(path / FAISS_FILE, lambda tmp: faiss.write_index(cpu_index, tmp))
            atomic_write_json(path / CONFIG_FILE, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "clipkit_version": __version__,
                "dim": self.dim, "metric": METRIC, "index_type": self.index_type, "structure": self._factory,
                "search_params": self._get_info("search_params") or {}, "model": self.model_info,
                "count": len(self), "faiss_generation": generation})
            self.path = path
        return path

    def _copy_db_to(self, target: Path) -> None:
        with atomic_path(target) as tmp:
            os.unlink(tmp)
            destination = sqlite3.connect(tmp)
            try:
                self._db.backup(destination)
                destination.execute("PRAGMA journal_mode=DELETE")
            finally:
                destination.close()
        for suffix in ("-wal", "-shm"):  # stale journals from an index that lived here before
            stale = Path(str(target) + suffix)
            if stale.exists():
                stale.unlink()
        old = self._db
        self._db = self._connect(str(target))
        old.close()

    @classmethod
    def load(cls, path: str | os.PathLike, *, model=None) -> "Index":
        """Open an index directory written by `save` (or by `clipkit index`)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no index at {path}: build one with `clipkit index FOLDER --index {path}`")
        if not path.is_dir():
            raise BrokenIndexError(f"{path} is not an index folder (expected {DB_FILE}, {FAISS_FILE}, {CONFIG_FILE})")
        config = _read_config(path)
        if not (path / DB_FILE).is_file():
            raise BrokenIndexError(f"index at {path} has no {DB_FILE}; it is incomplete: rebuild it with "
                                   "`clipkit index FOLDER --index PATH`")
        index = cls.__new__(cls)
        index.path = path
        index.model = None
        index.last_sync = None
        index._lock = threading.RLock()
        index._gpu = None
        try:
            index._db = cls._connect(str(path / DB_FILE))
            version = index._get_info("format_version")
            dim = index._get_info("dim")
        except sqlite3.DatabaseError as exc:
            raise BrokenIndexError(f"the store {path / DB_FILE} is damaged ({exc}); rebuild the index") from exc
        if version != FORMAT_VERSION or dim is None:
            raise BrokenIndexError(f"index at {path} has format version {version!r}; this clipkit "
                                   f"({__version__}) reads version {FORMAT_VERSION}: rebuild the index")
        index.dim = int(dim)
        if config.get("dim") not in (None, index.dim):
            raise BrokenIndexError(f"{path / CONFIG_FILE} says dim {config.get('dim')} but the store says {index.dim}")
        index._faiss = index._load_faiss(path, config)
        if model is not None:
            index.resolve_model(model)
        return index

    def _load_faiss(self, path: Path, config: dict) -> faiss.Index:
        count = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        faiss_path = path / FAISS_FILE
        if faiss_path.is_file() and config.get("faiss_generation") == self.generation:
            try:
                loaded = faiss.read_index(str(faiss_path))
                if loaded.ntotal == count and loaded.d == self.dim:
                    self._factory = config.get("structure", "Flat")
                    apply_search_params(loaded, self._get_info("search_params") or {})
                    return loaded
            except RuntimeError as exc:
                log.warning("%s is unreadable (%s); rebuilding it from %s", faiss_path, str(exc).splitlines()[0],
                            DB_FILE)
        elif count:
            log.info("%s is missing or older than %s; rebuilding it", faiss_path, DB_FILE)
        return self._rebuild_faiss()

    def _rebuild_faiss(self, tune: bool = False, sample_queries: np.ndarray | None = None) -> faiss.Index:
        if self.index_type == "flat":
            rebuilt = self._new_faiss()
            keys: list[int] = []
            blobs: list[bytes] = []
            for key, blob in self._db.execute("SELECT key, embedding FROM items ORDER BY key"):
                keys.append(key)
                blobs.append(blob)
                if len(keys) == 10_000:
                    self._add_blobs(rebuilt, keys, blobs)
                    keys, blobs = [], []
            if keys:
                self._add_blobs(rebuilt, keys, blobs)
            return rebuilt
        rows = self._db.execute("SELECT key, embedding FROM items ORDER BY key").fetchall()
        keys_array = np.asarray([key for key, _ in rows], dtype=np.int64)
        vectors = self._vectors([blob for _, blob in rows])
        return self._build_from(np.ascontiguousarray(vectors), keys_array, tune, sample_queries)

    def _vectors(self, blobs: list[bytes]) -> np.ndarray:
        """Stored embedding blobs as a read-only (N, dim) float32 array; a blob of the wrong size is damage."""
        if any(len(b) != 4 * self.dim for b in blobs):
            raise BrokenIndexError(f"the store holds embeddings of the wrong size for dim {self.dim}; rebuild the index")
        if not blobs:
            return np.zeros((0, self.dim), np.float32)
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), self.dim)

    def _add_blobs(self, target: faiss.Index, keys: list[int], blobs: list[bytes]) -> None:
        target.add_with_ids(np.ascontiguousarray(self._vectors(blobs)), np.asarray(keys, dtype=np.int64))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def shard_of(relative_path: str, shards: int) -> int:
    """The shard (0..shards-1) a file belongs to: a stable hash of its path relative to the folder."""
    return zlib.crc32(relative_path.encode("utf-8", "surrogateescape")) % shards


FLAT_LIMIT = 50_000  # "auto" stays exact up to here: about a millisecond per query on a CPU core


def _check_index_type(index_type: str, dim: int) -> None:
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
    if memory_budget is not None and n * dim * 4 > memory_budget:
        code = max(1, memory_budget // n)
        m = max(d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, min(code, dim // 2)))
        return f"IVF{nlist},PQ{m}"
    return f"IVF{nlist},Flat"


def _nlist(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


def _training_size(index: faiss.Index) -> int:
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


def tune_search(index: faiss.Index, vectors: np.ndarray, target: float = 0.95, k: int = 10,
                n_queries: int = 500, queries: np.ndarray | None = None) -> dict:
    """The cheapest nprobe / efSearch whose recall@k against exact search reaches `target` (+0.01 margin).

    `queries`: sample queries like the real ones (`Index.build(sample_queries=...)`), best; without
    them, samples of the data perturbed to about 0.6 cosine of their source stand in.
    """
    rng = np.random.default_rng(1)
    n, dim = len(vectors), vectors.shape[1]
    count = min(n_queries, n)
    if queries is None:  # stored vectors moved to ~0.6 cosine of themselves: near the data, not on it
        queries = vectors[rng.choice(n, count, replace=False)]
        queries = queries + 1.33 * rng.standard_normal(queries.shape).astype(np.float32) / np.sqrt(dim)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(vectors.shape[1])
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
    id_map = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else None
    best = values[-1]
    for value in values:
        apply_search_params(index, {name: value})
        found = index.search(queries, k)[1]
        if id_map is not None:  # truth holds positions; found holds ids, added in ascending order
            found = np.where(found >= 0, np.searchsorted(id_map, found), -1)
        recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])
        if recall >= min(1.0, target + 0.01):
            best = value
            break
    return {name: int(best)}


def _hash_or_none(path: Path) -> str | None:
    try:
        return file_hash(path)
    except OSError:  # gone since it was decoded: the next sync removes it
        return None


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        if (path / DB_FILE).is_file():
            return {}  # a save interrupted before its config: the store is enough
        raise BrokenIndexError(f"{path} is not a clipkit index (no {CONFIG_FILE} or {DB_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise BrokenIndexError(f"{config_path} is unreadable ({exc}); rebuild the index") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BrokenIndexError(f"{config_path} is not a clipkit index config")
    return config


_GPU_RESOURCES = None


def _gpu_resources():
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES
