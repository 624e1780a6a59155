"""Saving an index to its folder and opening it again (the facade `Index.save` / `Index.load`).

Saving attaches an index to a folder: its store is copied there (vectors compacted into a new set of
segment files) unless it lives there already; then the ANN structure is written (approximate structures
only: an IVF one as `structure-GEN-TAG.faiss`, its head, and `structure-GEN-TAG.lists`, its memory-mapped
inverted lists; others as one FAISS file), under new names, unless the files it was saved as still serve,
with `config.json`, which names them and records what they were saved from (generation, last key, key-set
digest, checksum), so that a later open trusts them only while that holds and catches up from the store.
Index folders of older formats (`index.faiss`) still open. Opening migrates older formats under the writer
lock and reads no vectors.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import sqlite3
import zlib
from pathlib import Path

from clipkit import __version__
from clipkit._io import atomic_path, atomic_write_json
from clipkit.errors import BrokenIndexError, IndexFullError, first_line
from clipkit.index import ondisk
from clipkit.index.captions import CAPTIONS_DIR
from clipkit.index.lock import LOCK_FILE, writer_lock
from clipkit.index.store import (CURRENT_VERSIONS, DB_FILE, FORMAT, FORMAT_VERSION, REMOVAL_LOG_GENERATIONS, Store,
                                 fold_journal, is_index, translate)

log = logging.getLogger("clipkit.index")

FAISS_FILE, CONFIG_FILE = "index.faiss", "config.json"
METRIC = "inner_product"


def save(index, path) -> Path:
    """`index.save(path)`."""
    if path is None:
        if index.path is None:
            raise ValueError("this index has not been saved before: pass a path")
        path = index.path
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; choose another index path")
    if path.is_dir() and not (path / DB_FILE).exists() and any(p.name != LOCK_FILE for p in path.iterdir()):
        raise ValueError(f"{path} is a non-empty folder that is not a clipkit index; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with writer_lock(path, on_wait=log.warning), index._lock:
            if index.path is None or path.resolve() != index.path.resolve():
                _copy_store(index, path)
            with index.writer():
                write_structure(index, path)
            index._settle_captions()  # (what a removal killed before its captions left)
            if index._captions is not None:
                index._captions.save(path / CAPTIONS_DIR)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise IndexFullError(f"no space left on the disk holding {path}: what was already committed is kept; "
                                 "free some space and save again") from exc
        raise
    return path


def write_structure(index, path: Path, merge: bool = False) -> None:
    """Under the writer lock: re-plan an outgrown structure, compact, write the structure's files (unless those
    it was saved as still serve, see `_files_serve`, and no `merge` is asked for) and config.json, then drop
    files no config names."""
    if index._outgrown(index._structure.ntotal):
        index.build()  # the collection outgrew (or shrank below) the structure chosen for it
    else:
        index._retune_if_grown()  # grown within it: the same lists, search parameters tuned anew
    store = index.store
    if store.dead_rows() > int(store.vectors_state()["rows"]) // 4:
        store.compact()  # removed items' rows are over a quarter of the vector files: reclaim them
    structure, previous = index._structure, read_config(path)
    merged = False
    if structure.factory == "Flat":  # exact search needs no file: it reads the stored vectors
        record = {"faiss_file": None, "lists_file": None, "faiss_crc32": zlib.crc32(b""),
                  "faiss_generation": index._generation, "faiss_last_key": index._last_key,
                  "faiss_key_sum": store.key_sum()}
    elif not merge and _files_serve(index, path):
        record = structure.snapshot[1]
    else:
        merged = structure.sealed is not None and structure.snapshot is not None
        tag = f"{index._generation}-{os.urandom(3).hex()}"
        record = {**structure.write_files(path, tag), "faiss_generation": index._generation,
                  "faiss_last_key": index._last_key, "faiss_key_sum": store.key_sum()}
        structure.snapshot = (path.resolve(), record)
    if merged:  # readers reopen the new lists instead of growing their deltas
        index._structure_version = int(store.info("structure_version", 0)) + 1
    atomic_write_json(path / CONFIG_FILE, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "clipkit_version": __version__,
        "dim": index.dim, "metric": METRIC, "index_type": index.index_type, "structure": structure.factory,
        "search_params": structure.params, "model": index.model_info, "count": structure.ntotal, **record,
        "structure_version": index._structure_version})
    if merged:
        with store.transaction(bump=False):
            store.set_info("structure_version", index._structure_version)
    store.checkpoint()
    _drop_unnamed_files(path, record, previous)


MERGE_FRACTION = 0.1  # a save writes new lists once the changes since the last ones are this much of them
MERGE_AT_LEAST = 10_000  # (of at least this many entries)


def _files_serve(index, path: Path) -> bool:
    """Whether the files the structure was last saved as (or read from) in `path` still serve: unchanged since,
    or sealed lists whose delta and removals are still small (a later open catches up with those from the
    store, as readers do)."""
    structure = index._structure
    if structure.snapshot is None or structure.snapshot[0] != path.resolve():
        return False
    if structure.sealed is None and ondisk.sealable(structure.index):
        return False  # read from a whole FAISS file (an older format): its lists go to disk now
    saved_at = structure.snapshot[1].get("faiss_generation", -1)
    if structure.sealed is None or index._generation - saved_at > REMOVAL_LOG_GENERATIONS // 2:
        return saved_at == index._generation  # (a catch-up needs the removal log back to the files' generation)
    return structure.pending() <= MERGE_FRACTION * max(structure.sealed.count, MERGE_AT_LEAST)


def _drop_unnamed_files(path: Path, record: dict, previous: dict) -> None:
    """Remove structure files neither this config nor the one before names (a reader that opened those keeps
    them until it closes them; one that read the old config a moment ago still finds its files)."""
    named = {record.get("faiss_file"), record.get("lists_file"), previous.get("faiss_file"),
             previous.get("lists_file")}
    stale = [*path.glob("structure-*.faiss"), *path.glob("structure-*.lists"), path / FAISS_FILE,
             *path.glob(".structure-*.tmp")]  # (a writer killed while writing; only writers write them)
    for file in stale:
        if file.name not in named:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(file)


def structure_files(path) -> dict[str, Path]:
    """The files holding the saved ANN structure of the index at `path`, as its config.json names them:
    {"faiss": head or whole FAISS file, "lists": the memory-mapped lists (IVF structures)}."""
    config = read_config(Path(path))
    names = {"faiss": config.get("faiss_file", FAISS_FILE), "lists": config.get("lists_file")}
    return {role: Path(path) / name for role, name in names.items() if name}


def _copy_store(index, path: Path) -> None:
    """The index's store (and vectors) copied into folder `path`; the index is attached to the copy."""
    target = path / DB_FILE
    with atomic_path(target) as tmp:
        os.unlink(tmp)
        index.store.backup_to(Path(tmp))
        # The journals of an index that lived here go before the new store takes the name: SQLite would
        # replay an old write-ahead log onto the new file (two stores spliced) after a crash between the two.
        fold_journal(target)
    old = index.store
    index.store = Store.open(target)
    index.path = path
    old.close()
    index.store.segments.drop_other_sets(index.store.vectors_state())  # those of an index that lived here


def load(cls, path, model):
    """`cls.load(path, model=model)`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no index at {path}: build one with `clipkit index FOLDER --index {path}`")
    if not path.is_dir():
        raise BrokenIndexError(f"{path} is not an index folder (expected {DB_FILE}, {FAISS_FILE}, {CONFIG_FILE})")
    config = read_config(path)
    if not is_index(path):
        raise BrokenIndexError(f"index at {path} has no {DB_FILE}; it is incomplete: rebuild it with "
                               "`clipkit index FOLDER --index PATH`")
    store = Store.open(path / DB_FILE)
    try:
        return _open(cls, store, path, config, model)
    except sqlite3.DatabaseError as exc:  # damage found past the first page: the same one-line error
        store.close()
        raise translate(exc, path / DB_FILE) from exc


def _open(cls, store: Store, path: Path, config: dict, model):
    if store.info("format_version") not in CURRENT_VERSIONS:
        if store.readonly:
            raise BrokenIndexError(f"the index at {path} has format version {store.info('format_version')!r} "
                                   "and is read-only; open it once on writable storage to upgrade it")
        with writer_lock(path, on_wait=log.warning):
            store.migrate()
    dim = store.info("dim")
    if dim is None:
        raise BrokenIndexError(f"the store {path / DB_FILE} records no dimension; rebuild the index")
    if config.get("dim") not in (None, int(dim)):
        raise BrokenIndexError(f"{path / CONFIG_FILE} says dim {config.get('dim')} but the store says {dim}")
    index = cls.__new__(cls)
    index._attach(store, int(dim), path)
    with index._lock:
        if not index._load_saved_structure(config):
            index._rebuild()
        index._warn_damaged()
    if model is not None:
        index.check_model(model)
        index.model = model
    return index


def _what_it_is(path: Path) -> str:
    """For a folder taken for an index that is none: what it holds, and the command that makes an index of it."""
    from clipkit.data.folder import is_image_name
    from clipkit.index.ingest import is_embedding_folder

    if not path.is_dir():
        return ""
    if is_embedding_folder(path):
        return f"; it holds embeddings in clip-retrieval's layout: `clipkit index {path} --index NEW` indexes them"
    with os.scandir(path) as entries:  # (a look at the first entries of what may be a huge folder)
        names = [entry.name for entry in itertools.islice(entries, 1000)]
    if names == [LOCK_FILE]:
        return ("; nothing was written there yet (a first `clipkit index` into it stopped before its first "
                "batch): run that command again")
    if any(is_image_name(name) for name in names):
        return f"; it is a folder of images: `clipkit index {path} --index INDEX` indexes it"
    if any(name.endswith(".tar") for name in names):
        return (f"; it holds webdataset shards: `clipkit index '{path}/NAME-{{000000..000009}}.tar' --index INDEX` "
                "indexes them")
    return ""


def read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        if is_index(path):
            return {}  # a save interrupted before its config: the store is enough
        raise BrokenIndexError(f"{path} is not a clipkit index (no {CONFIG_FILE} or {DB_FILE}){_what_it_is(path)}")
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError("not a clipkit index config")
    except (OSError, ValueError) as exc:
        if not is_index(path):
            raise BrokenIndexError(f"{config_path} is unreadable ({first_line(exc)}) and {path} has no "
                                   f"{DB_FILE}: this is no clipkit index") from exc
        # the store is the truth; config.json only records what the structure's files were saved from: without
        # it, they are not trusted (the structure is rebuilt from the store) and the next save writes all anew
        log.warning("%s is unreadable (%s); going by %s alone (the next save rewrites it)", config_path,
                    first_line(exc), DB_FILE)
        return {}
    return config
