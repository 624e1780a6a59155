"""Search within a folder: the top k among the items whose file (or shard) lies under it (`Index.search(...,
under=...)`): the items `clipkit remove FOLDER` would remove.

A folder of up to `SCAN_LIMIT` items is searched exactly, its rows read by key from the memory-mapped segments
(a trip's photos among millions: milliseconds, and exact whatever the structure). A larger one is searched
through the index's structure, deeper and deeper (from its share of the index) until each query has k of its
items or the whole index was looked at: what the structure finds, kept to the folder's items; where that would
hold too many results at once, its rows are read as for a small folder (exact, in bounded memory).
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

import numpy as np

from clipkit.index.ann import top_k_scan, top_of
from clipkit.index.sync import keys_under
from clipkit.index.vectors import in_sorted

SCAN_LIMIT = 200_000  # items under a folder searched row by row (at most ~0.4 GB of float16 at 1,024-d, read
# 10,000 rows at a time); past it, through the structure
READ_ROWS = 10_000
DEEP_CELLS = 1 << 24  # results a deeper search of the structure may hold at once (12 bytes each: ~200 MB)


def folders_of(under: str | os.PathLike) -> list[str]:
    """The absolute paths `under` may stand for in the index: as given (made absolute), and with its symbolic
    links resolved (an indexed folder's path is the one it was indexed by; the links below it are kept)."""
    if not isinstance(under, (str, os.PathLike)) or not str(under).strip():
        raise ValueError(f"under must be a folder's path, got {under!r}")
    given = os.path.abspath(os.path.expanduser(under))
    try:
        return list(dict.fromkeys([given, str(Path(given).resolve())]))
    except (OSError, RuntimeError):  # (a loop of links, a name too long: only the path as given)
        return [given]


def search_under(store, structure, queries: np.ndarray, k: int, folders: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, keys) of each query's top k among the items under the first of `folders` that holds any
    (-inf / -1 where fewer); a ValueError when none does."""
    with store.snapshot():  # (one committed state: the keys and their rows)
        keys = keys_in(store, folders)
        if not len(keys):
            raise ValueError(f"no indexed item lies under {folders[0]} (`clipkit roots` lists the indexed folders)")
        if len(keys) <= SCAN_LIMIT:
            return _scan(store, queries, k, keys)
    found = _deeper(structure, queries, k, np.sort(keys))
    if found is not None:
        return found
    with store.snapshot():  # (the structure did not give k of them within its memory bound: every row read)
        return _scan(store, queries, k, keys_in(store, folders))


def _scan(store, queries: np.ndarray, k: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k over the rows of `keys`, read `READ_ROWS` at a time."""
    rows = ((part, store.vectors(part)) for part in np.array_split(keys, max(1, -(-len(keys) // READ_ROWS))))
    return top_k_scan(queries, rows, k, per_item=store.vectors_per_item)


def keys_in(store, folders: list[str]) -> np.ndarray:
    """The keys of the items (files, or items of shards) under the first of `folders` that holds any (none: an
    empty array): what `clipkit remove FOLDER` would remove. Kept for the next search in the same folder while
    the store's generation stays (listing a folder of a million items takes ~0.9 s; every change of items
    bumps the generation), up to `FOLDER_KEYS_KEPT` keys an index; read-only to callers."""
    with store.snapshot():  # (the generation and the keys of one committed state)
        wanted = (store.generation(), tuple(folders))
        with _FOLDER_KEYS_LOCK:
            remembered = _FOLDER_KEYS.setdefault(store, {})
            keys = remembered.pop(wanted, None)
            if keys is not None:
                remembered[wanted] = keys  # (the most recently used last)
                return keys
        keys = np.zeros(0, np.int64)
        for folder in folders:
            keys = np.fromiter(keys_under(folder, store), np.int64)
            if len(keys):
                break
    keys.flags.writeable = False
    with _FOLDER_KEYS_LOCK:
        for old in [entry for entry in remembered if entry[0] != wanted[0]]:
            del remembered[old]  # (an older generation's)
        remembered[wanted] = keys
        while remembered and sum(len(each) for each in remembered.values()) > FOLDER_KEYS_KEPT:
            del remembered[next(iter(remembered))]  # the least recently used (a folder past the bound: itself)
    return keys


FOLDER_KEYS_KEPT = 1 << 23  # keys of recently searched folders kept per index (8 bytes each: 64 MB)
_FOLDER_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # store -> {(generation, folders): keys}
_FOLDER_KEYS_LOCK = threading.Lock()


def _deeper(structure, queries: np.ndarray, k: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The structure searched k x (its size / the folder's, twice over) deep, four times deeper while a
    query has fewer than k of the folder's items, up to the whole structure; its hits kept to `keys`. None
    when that would hold more than `DEEP_CELLS` results at once (a folder the structure's top ranks seldom
    reach, searched by many queries at once)."""
    total = max(structure.ntotal, 1)
    depth = min(total, k * 2 * -(-total // len(keys)))
    while depth * len(queries) <= DEEP_CELLS:
        scores, found = structure.search(queries, depth)
        found = np.where(in_sorted(found, keys), found, -1)
        if depth >= total or ((found >= 0).sum(axis=1) >= min(k, len(keys))).all():
            return top_of(scores, found, k)
        depth = min(total, depth * 4)
    return None
