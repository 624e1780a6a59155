"""`Index`: the facade over the store (SQLite and the vector files, the truth), the ANN structure (FAISS, its
cache; kept in step by clipkit/index/live.py), folder sync (clipkit/index/folders.py) and the writer lock.

On disk an index is a folder:

    meta.sqlite   the store: every item (id, file, metadata, where its vector lies), the folders it covers,
                  settings, and a generation counter that every committed change raises
    vectors/      the embeddings: append-only, memory-mapped segment files (clipkit/index/segments.py)
    structure-*   the ANN structure as it was at some generation: an IVF one as its head (.faiss) and its
                  memory-mapped inverted lists (.lists, clipkit/index/ondisk.py), others one FAISS file;
                  trusted when its checksum matches config.json's record and, caught up from the store
                  since that generation, it holds exactly the store's key set (digest)
    config.json   format, dimension, model, structure, and that record (for people and tools to read too)
    writer.lock   held by the one process writing the index (clipkit/index/lock.py)

A loaded index keeps up with the store: before a search it looks (at most every `refresh_interval`
seconds) whether the generation moved, and if so adds and removes what changed, so a server sees what
an indexer commits while it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from clipkit.errors import ModelMismatchError
import clipkit.index.sync as sync
from clipkit.index.ann import Structure, check_index_type
from clipkit.index.lock import writer_lock
from clipkit.index.segments import DTYPES, new_state
from clipkit.index.store import FORMAT, FORMAT_VERSION, Store, meta_row
from clipkit.index.subset import folders_of, keys_in, search_under
import clipkit.index.live as live
import clipkit.index.persist as persist
from clipkit.index.folders import FolderSync
from clipkit.index.vectors import id_list, normalize_id, prepare_items, prepare_vectors

log = logging.getLogger("clipkit.index")



class Index(FolderSync):
    """Nearest-neighbour search over unit-norm embeddings with per-item metadata."""

    refresh_interval = 0.5  # seconds between looks at the store's generation (0: before every search)

    def __init__(self, dim: int, *, model=None, model_info: dict | None = None, index_type: str = "flat",
                 target_recall: float = 0.95, memory_budget: int | None = None, precision: str | None = None,
                 vectors_per_item: int | None = None):
        """An empty index of `dim`-d vectors.

        `vectors_per_item`: items of several vectors each (BLIP-2's 32 query tokens; default: the model's
        `vectors_per_image`, else 1), added as (N, vectors_per_item, dim) arrays; an item's score is the
        maximum over its vectors, as such models define their similarity. Approximate structures hold every
        vector (under the item's key) and re-rank the shortlist's items exactly.

        `index_type`: "flat" (exact), "auto" (exact up to FLAT_LIMIT vectors, then the fastest structure that
        fits `memory_budget` and keeps recall@10 against exact >= `target_recall`, chosen and tuned at build
        time: see clipkit/index/tune.py), or any FAISS factory string ("IVF1024,Flat", "HNSW32",
        "IVF1024,PQ128x4fs,RFlat", ...), tuned the same way.
        `precision`: how the vectors are stored: "float32" (exact search equals numpy's), "float16" (half the
        disk and page cache; scores within about 1e-3 of float32's) or "auto" (the default: float32 while the
        search is exact, float16 from the first build of an approximate structure on, which re-ranks with them).
        """
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        check_index_type(index_type, int(dim))
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        info = model.info if model is not None else model_info
        if info is not None and int(info.get("dim", dim)) != dim:
            raise ValueError(f"model dimension {info['dim']} does not match index dimension {dim}")
        per_item = vectors_per_item if vectors_per_item is not None else int((info or {}).get("vectors_per_image", 1))
        if not isinstance(per_item, (int, np.integer)) or isinstance(per_item, bool) or per_item < 1:
            raise ValueError(f"vectors_per_item must be a positive integer, got {vectors_per_item!r}")
        precision = precision or "auto"
        if precision not in ("auto", *DTYPES):
            raise ValueError(f"precision must be 'auto', 'float16' or 'float32', got {precision!r}")
        vectors = new_state("float32" if precision == "auto" else precision)
        store = Store.create()
        with store.transaction(bump=False):
            for name, value in (("format", FORMAT), ("format_version", FORMAT_VERSION), ("dim", int(dim)),
                                ("model", info), ("generation", 0), ("next_key", 0), ("index_type", index_type),
                                ("target_recall", target_recall), ("memory_budget", memory_budget),
                                ("structure_version", 0), ("vectors", vectors), ("precision", precision),
                                ("vectors_per_item", int(per_item))):
                store.set_info(name, value)
        self._attach(store, int(dim), path=None, model=model)
        self._structure = live.exact_structure(self)

    def _attach(self, store: Store, dim: int, path: Path | None, model=None) -> None:
        self.store, self.dim, self.path, self.model = store, dim, path, model
        self.last_sync: sync.SyncReport | None = None
        self._lock = threading.RLock()
        self._last_key = -1  # every key up to here is in the structure, or was removed (new keys are above it)
        self._tuning = None  # the tuner's report of the last build, until recorded
        self._captions: Index | None = None  # the caption collection, once loaded or made
        self._captions_broken = False  # it could not be opened (said once)
        self._damaged_told = 0  # damaged embeddings warned about
        self._generation = store.generation()
        self._structure_version = store.info("structure_version", 0)
        self._looked_at = time.monotonic()

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_embeddings(cls, embeddings: Any, ids: Sequence | None = None, metadata: Sequence[dict] | None = None,
                        *, model=None, index_type: str = "flat", **options) -> "Index":
        """An index over `embeddings` (N, D); ids default to 0..N-1; metadata is one dict per row.

        `index_type` and `options` (target_recall, memory_budget) as for `Index(...)`.
        """
        array = np.asarray(embeddings)
        if array.ndim not in (2, 3) or array.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty (N, D) array, or (N, V, D) for items of V vectors, "
                             f"got shape {array.shape}")
        if array.ndim == 3:
            options["vectors_per_item"] = array.shape[1]
        index = cls(array.shape[-1], model=model, index_type=index_type, **options)
        index.add(array, ids=ids, metadata=metadata)
        if index_type != "flat":
            index.build()
        return index

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, model, *, batch_size: int = 64, workers: int | None = None,
                    progress: bool | None = None, index_type: str = "flat", **options) -> "Index":
        """Embed every image under `folder` (recursively); unreadable files are skipped and logged. A folder of
        webdataset shards (.tar files and no images at its top, as `clipkit index` takes it) gives its shards'.

        The report of what was indexed and skipped is in `index.last_sync`.
        """
        from clipkit.encode import as_model
        from clipkit.data.shardspec import is_shard_folder

        model = as_model(model)
        index = cls(model.dim, model=model, index_type=index_type, **options)
        if is_shard_folder(os.fspath(folder), nested=True):
            index.sync_shards(os.fspath(folder), model, batch_size=batch_size, progress=progress)
        else:
            index.sync_folder(folder, model, batch_size=batch_size, workers=workers, progress=progress)
        if index_type != "flat":
            index.build()
        return index

    @classmethod
    def merge(cls, parts: Sequence["Index | str | os.PathLike"], *, out: str | os.PathLike | None = None,
              index_type: str = "flat", chunk: int = 50_000, **options) -> "Index":
        """One index holding every item of `parts` (indexes or index folders), e.g. the shards written
        by `clipkit index --shard i/n`. They must share the model and dimension; an id found in two
        parts is a ValueError. Items keep their ids, metadata and embeddings (nothing is re-embedded), and
        so do their captions. With `out` (a new folder) the merge is written there chunk by chunk, in bounded
        memory; killed midway, the same call goes on from where it stopped (clipkit/index/merge.py).
        """
        from clipkit.index.merge import merge

        return merge(cls, parts, out=out, index_type=index_type, chunk=chunk, **options)

    # -- what it is -------------------------------------------------------------------------

    @property
    def model_info(self) -> dict | None:
        """name, pretrained, dim and weight fingerprint of the model that built this index."""
        return self.store.info("model")

    @property
    def generation(self) -> int:
        """The store's change counter (every committed change raises it)."""
        return self.store.generation()

    @property
    def index_type(self) -> str:
        return self.store.info("index_type", "flat")

    @property
    def structure(self) -> str:
        """The FAISS structure in use now ("Flat", "IVF1024,Flat", ...) and its tuned search parameters."""
        return self._structure.describe()

    @property
    def readonly(self) -> bool:
        return self.store.readonly

    def __len__(self) -> int:
        self._maybe_refresh()
        return self._structure.ntotal

    def __contains__(self, item_id: Any) -> bool:
        with self._lock:
            return bool(self.store.keys_for([normalize_id(item_id)]))

    def __repr__(self) -> str:
        model = (self.model_info or {}).get("name")
        return f"Index(n={len(self)}, dim={self.dim}, model={model!r}, path={str(self.path) if self.path else None!r})"

    # -- keeping up with the store ----------------------------------------------------------

    def refresh(self) -> bool:
        """Catch up with what other processes committed to the store; True when something changed."""
        with self._lock:
            return self._catch_up()

    def _maybe_refresh(self) -> None:
        if self.path is None or time.monotonic() - self._looked_at < self.refresh_interval:
            return
        with self._lock:
            self._catch_up()

    def _catch_up(self) -> bool:
        """Under self._lock: bring the structure to the store's generation (clipkit/index/live.py)."""
        return live.catch_up(self)

    def _rebuild(self, **options) -> Structure:
        return live.rebuild(self, **options)

    def _load_saved_structure(self, config: dict | None = None) -> bool:
        return live.load_saved_structure(self, config)

    def _warn_damaged(self) -> None:
        live.warn_damaged(self)

    def _outgrown(self, count: int) -> bool:
        return live.outgrown(self, count)

    def _retune_if_grown(self) -> bool:
        return live.retune_if_grown(self)

    def describe(self) -> dict:
        """What this index is, read from its store and folder (nothing is counted item by item): path, items,
        captions, dim, vectors_per_item, dtype, model, index_type, structure, tuning, folders, bytes on disk,
        format_version and generation."""
        with self._lock:
            folders = [{"path": path, "exists": os.path.isdir(path), "exclude": self.excludes(path)}
                       for _, path, _ in self.store.roots()]
        on_disk = sum(entry.stat().st_size for entry in _files_under(self.path)) if self.path else None
        return {"path": str(self.path) if self.path else None, "items": len(self),
                "captions": len(self.captions) if self.captions is not None else 0, "dim": self.dim,
                "vectors_per_item": self.vectors_per_item, "dtype": self.store.info("vectors", {}).get("dtype"),
                "model": self.model_info, "index_type": self.index_type, "structure": self.structure,
                "tuning": self.tuning, "folders": folders, "bytes": on_disk,
                "format_version": self.store.info("format_version"), "generation": self.generation}

    @property
    def tuning(self) -> dict | None:
        """The ANN tuner's report for the structure in use: structure, params, estimated_recall (recall@10 on
        queries its choice never saw), target, queries ("held-out items" or "sample queries"), timings."""
        return self.store.info("tuning")

    # -- writing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, *, wait: bool = True, on_wait=None, timeout: float | None = None) -> Iterator["Index"]:
        """Hold this index's writer lock across several changes (a whole `clipkit index` run).

        Another process writing it: wait for it (`on_wait(message)` is told once), or with `wait=False`
        raise `IndexBusyError` naming it. Readers are never blocked. On entry the index catches up with
        everything committed before.
        """
        self.store.require_writable()
        lock = writer_lock(self.path, wait=wait, on_wait=on_wait, timeout=timeout) if self.path else \
            contextlib.nullcontext()
        with lock, self._lock:
            self.store.add_missing_indexes()
            self._catch_up()
            yield self

    def _write(self, change) -> Any:
        """Run `change(store)` as one transaction under the writer lock; it returns (result, new keys, their
        vectors, removed keys), which go into the structure once committed."""
        with self.writer(on_wait=log.warning):
            with self.store.transaction():
                result, keys, vectors, removed = change(self.store)
            if not live.apply(self, [(keys, vectors)] if keys is not None else [], np.asarray(removed, np.int64)):
                self._rebuild()
            self._generation = self.store.generation()
        return result

    def add(self, embeddings: Any, ids: Sequence | None = None, metadata: Sequence[dict] | None = None) -> None:
        """Add rows (normalised to unit length; (N, V, D) for items of V vectors). An id already in the index
        is a ValueError."""
        vectors = prepare_items(embeddings, self.dim, self.vectors_per_item)
        n = len(vectors)
        if ids is not None:
            ids = id_list(ids)
            if len(ids) != n:
                raise ValueError(f"got {n} embeddings but {len(ids)} ids")
            if len(set(ids)) != n:
                raise ValueError("ids contain duplicates")
        metadata = list(metadata) if metadata is not None else [{}] * n
        if len(metadata) != n:
            raise ValueError(f"got {n} embeddings but {len(metadata)} metadata entries")
        rows = [meta_row(m) for m in metadata]

        def change(store: Store):
            start = store.info("next_key", 0)
            given = ids if ids is not None else list(range(start, start + n))
            clash = list(store.keys_for(given))
            if clash:
                raise ValueError(f"{len(clash)} id(s) already in the index, e.g. {clash[0]!r}; remove them first")
            return None, store.insert(vectors, given, rows), vectors, []

        self._write(change)

    def remove(self, ids: Iterable) -> int:
        """Remove items by id, with their captions; an id not in the index is a ValueError (and nothing is
        removed). An id whose item went but whose captions a killed call left behind counts as there: the same
        call again finishes it (else the next removal or save removes those captions)."""
        if isinstance(ids, (str, int, np.integer)):
            ids = [ids]
        ids = list(dict.fromkeys(normalize_id(v) for v in ids))
        if not ids:
            return 0

        left_captions: list = []  # (ids whose item a killed call removed: their captions go after the change)

        def change(store: Store):
            keys = store.keys_for(ids)
            missing = [i for i in ids if i not in keys]
            left_captions[:] = self._captioned(missing) if missing else []
            captioned = set(left_captions) | store.owed_among(missing)
            missing = [i for i in missing if i not in captioned]
            if missing:
                raise ValueError(f"{len(missing)} id(s) not in the index, e.g. {missing[0]!r}")
            store.delete_keys(list(keys.values()))
            return len(ids), None, None, list(keys.values())

        return self._remove_with_captions(change, also=left_captions)

    def build(self, sample_queries: Any = None) -> None:
        """(Re)build the FAISS structure for the current contents: choose it (auto), train, add, tune.

        `sample_queries` (M, D), e.g. text embeddings of typical queries, tune nprobe/efSearch/k_factor on the
        queries this index will see; they are remembered, and every later build (a collection that outgrew
        its structure, too) tunes on them. Without any, builds tune on the index's caption embeddings when it
        has captions (text-side queries), else on held-out items of the collection.
        Searches are exact until then for trained types; `add` after a build goes into the built structure.
        """
        live.build(self, sample_queries)

    def set_index_type(self, index_type: str, sample_queries: Any = None) -> None:
        """Switch to another index type ("flat", "auto" or a FAISS factory string) and build it now."""
        check_index_type(index_type, self.dim)
        live.build(self, sample_queries, index_type)

    def compact(self) -> int:
        """Rewrite the vector files without the rows of removed items, and a saved IVF structure's lists with
        what was added and removed since they were written (a save does each by itself once those are over a
        quarter, a tenth); the bytes of vector files given back."""
        with self.writer(on_wait=log.warning):
            before = self.store.segments.disk_bytes()
            self.store.compact()
            if self.path is not None and self._structure.sealed is not None and self._structure.pending():
                persist.write_structure(self, self.path, merge=True)
            return before - self.store.segments.disk_bytes()

    # -- queries ----------------------------------------------------------------------------

    def search(self, queries: Any, k: int = 10, *, under: str | os.PathLike | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: `(scores, ids)`, each `(n_queries, min(k, len(index)))`, best first.

        Queries are normalised to unit length; `ids` are the ids given when the items were added. An
        approximate structure (IVF) may find fewer than k: those slots hold id None and score -inf.
        `under`: only the items whose file is that folder's (or under it), exactly for a folder of up to
        200,000 items (`clipkit.index.subset`); a ValueError when the index holds none there.
        """
        with self._lock:
            for _ in range(3):  # an item removed since the last look at the store: catch up, search again
                scores, keys = self.search_keys(queries, k, under=under)
                ids = self.store.ids_by_key(keys)
                if not any(i is None for i in ids[keys >= 0]) or not self.refresh():
                    return scores, ids
            return scores, ids

    def count_under(self, under: str | os.PathLike) -> int:
        """How many items lie under the folder `under` (or are that file): what `search(..., under=)` searches."""
        with self._lock:
            return len(keys_in(self.store, folders_of(under)))

    def search_keys(self, queries: Any, k: int = 10, *, under: str | os.PathLike | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """As `search`, but `(scores, keys)`: the items' integer keys (-1 where none was found), with no
        metadata lookup; `get_by_key` turns them into records."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        vectors = prepare_vectors(queries, self.dim, what="queries")
        folders = None if under is None else folders_of(under)
        self._maybe_refresh()
        with self._lock:
            k = min(int(k), self._structure.ntotal)
            if k == 0:
                return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
            if folders is not None:
                return search_under(self.store, self._structure, vectors, k, folders)
            found = self._structure.search(vectors, k)
            self._warn_damaged()
            return found

    def get(self, ids: Iterable) -> list[dict]:
        """Metadata for each id, in order: {'id', 'path', 'mtime', 'size', 'caption', ...extra}."""
        ids = id_list(ids)
        with self._lock:
            records = _all_found(ids, self.store.records_by_id(ids))
        return [{name: value for name, value in records[i].items() if name != "key"} for i in ids]

    def keys(self, ids: Iterable) -> list[int]:
        """The integer key of each id (its FAISS id), for callers that need integer handles."""
        ids = id_list(ids)
        with self._lock:
            keys = _all_found(ids, self.store.keys_for(ids))
        return [int(keys[i]) for i in ids]

    def find(self, ids: Iterable) -> dict:
        """id -> metadata (as `get`, with 'id' and 'key') of those of `ids` that are in the index."""
        ids = id_list(ids)
        with self._lock:
            return self.store.records_by_id(ids)

    def get_by_key(self, keys: Iterable[int]) -> list[dict | None]:
        """Metadata (as `get`, with 'id' and 'key') for each integer key; None where no item has that key."""
        keys = [int(k) for k in keys]
        with self._lock:
            records = self.store.records_by_key(keys)
        return [dict(records[k]) if k in records else None for k in keys]

    def ids(self) -> list:
        with self._lock:
            return self.store.ids()

    def ids_with_prefix(self, prefix: str) -> list[str]:
        """The (text) ids that start with `prefix`, e.g. a shard's `SHARD#` items, found through the id index."""
        with self._lock:
            return self.store.ids_with_prefix(prefix)

    def count_with_prefix(self, prefix: str) -> int:
        """How many (text) ids start with `prefix`, counted over the id index without listing them."""
        with self._lock:
            return self.store.count_with_prefix(prefix)

    def embeddings(self, ids: Iterable | None = None) -> np.ndarray:
        """The stored unit-norm embeddings (all, in insertion order, or for the given ids): (N, D), or
        (N, V, D) for items of V vectors."""
        with self._lock:
            rows = self.store.all_vectors()[1] if ids is None else self.store.vectors(self.keys(ids))
        return rows if self.vectors_per_item == 1 else rows.reshape(len(rows), self.vectors_per_item, self.dim)

    @property
    def vectors_per_item(self) -> int:
        return self.store.vectors_per_item

    def check_model(self, model, writing: bool = False) -> None:
        """Refuse a model other than the one that built this index (`writing`: to add embeddings, not query)."""
        info = self.model_info
        if info is None:
            if model.dim != self.dim:
                raise ModelMismatchError(f"model {model.name} makes {model.dim}-d embeddings but the index holds "
                                         f"{self.dim}-d ones")
            return
        if model.fingerprint != info.get("fingerprint"):
            raise ModelMismatchError(
                f"this index was built with model {info.get('name')!r} (pretrained={info.get('pretrained')!r}, "
                f"weights {info.get('fingerprint')}), but the {'indexing' if writing else 'query'} model is "
                f"{model.name!r} (pretrained={model.pretrained!r}, weights {model.fingerprint}); embeddings from "
                "different models are not comparable: " + (
                    "index with the index's own model (leave out --model), or into a new index" if writing else
                    "query with the index's own model (model=None) or rebuild the index"))

    # -- save / load (clipkit/index/persist.py) -----------------------------------------------

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the index to folder `path` (default: where it was loaded or last saved).

        Afterwards the index is attached to `path`: later changes are committed to its store at once.
        """
        return persist.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model=None) -> "Index":
        """Open an index folder written by `save` (or by `clipkit index`). Nothing is written: an index on
        read-only storage loads and searches."""
        return persist.load(cls, path, model)

    def close(self) -> None:
        with self._lock:
            self.store.close()


def _files_under(folder: Path) -> Iterator[os.DirEntry]:
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            yield from _files_under(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            yield entry


def _all_found(ids: list, found: dict) -> dict:
    """`found` (id -> something), or a KeyError naming an id it lacks."""
    missing = [i for i in ids if i not in found]
    if missing:
        raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {missing[0]!r}")
    return found
