"""The store: one SQLite file with every item (id, file, metadata) and the index's settings, and the item's
vectors in the segment files beside it (clipkit/index/segments.py).

It is the index's source of truth; the FAISS structure is a cache of it. Here live the schema, the
format version and its migrations, the generation counter (bumped by every committed change, so a
reader can tell cheaply that something changed), the folders an index covers (roots: a file's path is
stored relative to its root, so a moved folder is re-pointed in one place) and read-only opening.
Every change is one `BEGIN IMMEDIATE` transaction; SQLite's write-ahead log lets readers read
throughout and never see half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from clipkit._io import SpillList, batches
from clipkit.errors import BrokenIndexError, IndexBusyError, IndexFullError, ReadOnlyIndexError
from clipkit.index.segments import Segments, new_state
from clipkit.index.vectors import damaged_rows, ids_array, in_sorted, keys_sum

SHARD_STATS = "shards"  # stores before the `shards` table: store info, shard path -> [size, mtime] (JSON)
FORMAT = "clipkit-index"
FORMAT_VERSION = 4  # 1: absolute paths; 2: roots; 3: vectors in segment files, not in SQLite; 4: segments
# whose keys run without a gap have no key file (`runs`). Version 3 is read as it is (a 4 without runs), and
# becomes 4 with the first state that has a run, so that an older clipkit says "upgrade" instead of failing
CURRENT_VERSIONS = (3, 4)
REMOVAL_LOG_GENERATIONS = 100_000  # compaction forgets removals older than this many generations
DB_FILE = "meta.sqlite"
SQL_CHUNK = 500
META_COLUMNS = ("path", "mtime", "size", "caption")


def is_index(path) -> bool:
    """Whether `path` is a clipkit index folder (one that holds its store)."""
    return (Path(path) / DB_FILE).is_file()


# items without a root found by their path (a folder's removal, adoption); stores made before it was part of
# the schema get it at their first write (Store.add_missing_indexes)
_ROOTLESS_INDEX = "CREATE INDEX IF NOT EXISTS items_rootless_path ON items(path) WHERE root IS NULL AND path IS NOT NULL"

# each webdataset shard read in full (clipkit.index.shards): its size and mtime then, and a digest of its first
# and last MiB (None for shards recorded before digests); stores made before it get it at their first write
_SHARDS_TABLE = ("CREATE TABLE IF NOT EXISTS shards (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime REAL NOT "
                 "NULL, digest TEXT)")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY,      -- the FAISS id: never reused, and an item's embedding never changes under it
    id UNIQUE NOT NULL,           -- the user's id (int or text, kept as given, a file's absolute path)
    root INTEGER,                 -- the folder (roots.root) `path` is relative to, NULL: `path` as given
    path TEXT, mtime REAL, size INTEGER, caption TEXT, extra TEXT
);
CREATE INDEX IF NOT EXISTS items_root_path ON items(root, path) WHERE root IS NOT NULL;  -- (ids alone: no entry)
CREATE TABLE IF NOT EXISTS roots (root INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
-- keys removed, with the generation that removed them: readers catching up read what went since theirs
CREATE TABLE IF NOT EXISTS removed (key INTEGER PRIMARY KEY, generation INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS removed_generation ON removed(generation);
""" + _ROOTLESS_INDEX + ";\n" + _SHARDS_TABLE + ";\n"
# the image ids whose captions are still to remove: written in the transaction that removes the images, emptied
# once their captions are gone (a process killed in between leaves them for the next writer); created when
# first needed
_CAPTION_DEBT_TABLE = "CREATE TABLE IF NOT EXISTS caption_debt (id UNIQUE NOT NULL)"
# the queries builds tune on (Index.build's sample_queries, remembered); created when first given
_TUNE_QUERIES_TABLE = "CREATE TABLE IF NOT EXISTS tune_queries (n INTEGER PRIMARY KEY, vector BLOB NOT NULL)"

_RECORD_SELECT = ("SELECT items.key, items.id, roots.path, items.path, items.mtime, items.size, items.caption, "
                  "items.extra FROM items LEFT JOIN roots ON roots.root = items.root")


def chunks(values: list, size: int = SQL_CHUNK) -> Iterator[list]:
    """`values` in slices small enough for one `IN (...)`."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def marks(values: list) -> str:
    return ",".join("?" * len(values))


def translate(exc: sqlite3.Error, where: Path | str | None) -> Exception:
    """A SQLite error as the clipkit error a user can act on."""
    text = str(exc)
    lowered = text.lower()
    index = f"the index {where}" if where is not None else "the index"
    if "full" in lowered or "no space" in lowered:
        return IndexFullError(f"no space left on the disk holding {index}: what was already indexed is kept; free "
                              "some space and run the same command again")
    if "readonly" in lowered or "read-only" in lowered:
        return ReadOnlyIndexError(f"{index} is read-only: it can be searched but not changed; copy it to writable "
                                  "storage to change it")
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in lowered or "not a database" in lowered):
        store = f"the store {where}" if where is not None else "the index's store"
        return BrokenIndexError(f"{store} is damaged ({text}); rebuild the index")
    return exc


class Store:
    """The SQLite store of one index (in memory until the index is saved)."""

    def __init__(self, db: sqlite3.Connection, file: Path | None, readonly: bool = False):
        self.db, self.file, self.readonly = db, file, readonly
        self.damaged: set[int] = set()  # keys whose stored embedding was found NaN, infinite or zero when read
        self._segments: Segments | None = None  # the vector files, made on first use (the dimension known)
        self._deleted: SpillList | None = None  # ids deleted while `recording_deletions`

    @property
    def vectors_per_item(self) -> int:
        """How many vectors each item has (BLIP-2's query tokens: 32; one for CLIP-like models)."""
        return int(self.info("vectors_per_item", 1))

    @property
    def row_width(self) -> int:
        """Numbers in a stored row: an item's vectors side by side."""
        return int(self.info("dim")) * self.vectors_per_item

    @property
    def segments(self) -> Segments:
        """The vector segments, mapped as far as the store (in its current snapshot) says rows are committed."""
        if self._segments is None:
            self._segments = Segments(self.file.parent if self.file is not None else None, self.row_width,
                                      readonly=self.readonly)
        self._segments.view(self.vectors_state())
        return self._segments

    def vectors_state(self) -> dict:
        """What is committed of the vectors: {'set', 'rows', 'dtype', 'segment_rows'} (segments.new_state)."""
        state = self.info("vectors")
        if state is None:
            raise BrokenIndexError(f"the store {self.file or 'in memory'} records no vector files; rebuild the index")
        return state

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, file: Path | None = None) -> "Store":
        """A new, empty store (in memory, or a new file: the caller holds the writer lock)."""
        target = ":memory:" if file is None else str(file)
        db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=60)
        if file is not None:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return cls(db, file)

    @classmethod
    def open(cls, file: Path) -> "Store":
        """An existing store; opened read-only (and never written) when its folder cannot be written."""
        if not os.access(file, os.R_OK):
            raise PermissionError(f"cannot read the index store {file}: permission denied (run as its owner, or "
                                  "give this user read access to the index folder)")
        writable = os.access(file.parent, os.W_OK) and os.access(file, os.W_OK)
        try:
            if writable:
                db = sqlite3.connect(str(file), check_same_thread=False, isolation_level=None, timeout=60)
            else:
                db = _connect_readonly(file)
            store = cls(db, file, readonly=not writable)
            store.info("format_version")  # reads the file: a damaged one fails here
            return store
        except sqlite3.DatabaseError as exc:
            raise BrokenIndexError(f"the store {file} is damaged ({exc}); rebuild the index") from exc

    def add_missing_indexes(self) -> None:
        """Under the writer lock: the SQL indexes and tables a store made by an earlier clipkit lacks (one pass
        over the items, once; until then the queries that want them scan), and the shard records moved from
        the store info into their table (one transaction: readers see them in one place or the other)."""
        if self.readonly:
            return
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'items_rootless_path'").fetchone():
            self.db.execute(_ROOTLESS_INDEX)
        if not self._has_shards_table() or self.info(SHARD_STATS) is not None:
            with self.transaction(bump=False):
                self.db.execute(_SHARDS_TABLE)
                self.db.executemany("INSERT OR REPLACE INTO shards(path, size, mtime, digest) VALUES (?, ?, ?, ?)",
                                    [(path, stat[0], stat[1], None) for path, stat in self.info(SHARD_STATS, {}).items()])
                self.db.execute("DELETE FROM info WHERE name = ?", (SHARD_STATS,))

    def _has_shards_table(self) -> bool:
        if not getattr(self, "_shards_table", False):
            self._shards_table = bool(self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'shards'").fetchone())
        return self._shards_table

    # -- the shards read in full (clipkit.index.shards) --------------------------------------------------

    def shard_record(self, path: str) -> list | None:
        """[size, mtime, digest or None] recorded when the shard at `path` was last read in full, or None."""
        if not self._has_shards_table():  # a store no writer of this version opened yet (read-only here)
            recorded = self.info(SHARD_STATS, {}).get(path)
            return [*recorded[:2], None] if recorded else None
        row = self.db.execute("SELECT size, mtime, digest FROM shards WHERE path = ?", (path,)).fetchone()
        return list(row) if row else None

    def shard_records(self) -> dict[str, list]:
        """Every recorded shard: path -> [size, mtime, digest or None]."""
        if not self._has_shards_table():
            return {path: [*stat[:2], None] for path, stat in self.info(SHARD_STATS, {}).items()}
        return {path: [size, mtime, digest] for path, size, mtime, digest in
                self.db.execute("SELECT path, size, mtime, digest FROM shards")}

    def record_shard(self, path: str, size: int, mtime: float, digest: str | None) -> None:
        """Inside a transaction (under the writer lock, which made the table): the shard was read in full."""
        self.db.execute("INSERT OR REPLACE INTO shards(path, size, mtime, digest) VALUES (?, ?, ?, ?)",
                        (path, size, mtime, digest))

    def forget_shards(self, paths: list[str]) -> None:
        """Inside a transaction: drop these shards' records (indexing one again reads it anew)."""
        self.db.executemany("DELETE FROM shards WHERE path = ?", [(path,) for path in paths])

    def require_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyIndexError(f"the index at {self.file.parent} is read-only: it can be searched but not "
                                     "changed; copy it to writable storage to change it")

    def migrate(self) -> None:
        """Bring an older format up to FORMAT_VERSION in place (the caller holds the writer lock): each step is
        one transaction, so a kill leaves the store at the version before or after it."""
        version = self.info("format_version")
        if version in CURRENT_VERSIONS:
            return
        if version not in (1, 2):
            raise BrokenIndexError(f"the index at {self.file.parent} has format version {version!r}; this clipkit "
                                   f"reads versions 1 to {FORMAT_VERSION}: upgrade clipkit or rebuild the index")
        self.require_writable()
        if version == 1:
            with self.transaction(bump=False):  # 1 -> 2: roots, relative paths, keys never reused
                self.db.execute("ALTER TABLE items ADD COLUMN root INTEGER")
                for statement in _SCHEMA.split(";")[1:]:  # the index and the tables version 1 lacks
                    if statement.strip():
                        self.db.execute(statement)
                next_key = self.db.execute("SELECT COALESCE(MAX(key), -1) + 1 FROM items").fetchone()[0]
                self.set_info("next_key", next_key)
                self.set_info("format_version", 2)
        self._move_vectors_out()
        with contextlib.suppress(sqlite3.Error):  # give the blobs' pages back to the file system
            self.db.execute("VACUUM")

    def _move_vectors_out(self, batch: int = 10_000) -> None:
        """2 -> 3: the embedding blobs go into segment files (written and fsynced before the commit that drops
        the column; nothing is embedded again)."""
        dim = int(self.info("dim"))
        with self.transaction(bump=False):
            state, total = new_state("float32"), 0
            self._segments = Segments(self.file.parent, dim)
            cursor = self.db.execute("SELECT key, embedding FROM items ORDER BY key")
            while rows := cursor.fetchmany(batch):
                keys = np.asarray([k for k, _ in rows], np.int64)
                state = self._segments.append(state, keys, blobs_to_vectors([b for _, b in rows], dim))
                total += keys_sum(keys)
            self.set_info("key_sum", str(total % 2**64))
            self.db.execute("ALTER TABLE items DROP COLUMN embedding")
            for statement in _SCHEMA.split(";"):  # the tables version 2 lacks
                if statement.strip():
                    self.db.execute(statement)
            self.set_vectors(state)
            self.set_info("format_version", FORMAT_VERSION)
        self._segments.drop_other_sets(state)

    # -- settings and transactions ----------------------------------------------------------------

    def info(self, name: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM info WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_info(self, name: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO info(name, value) VALUES (?, ?)", (name, json.dumps(value)))

    def set_vectors(self, state: dict) -> None:
        """Inside a transaction: record what is committed of the vectors (and the format that reads it)."""
        self.set_info("vectors", state)
        version = self.info("format_version")
        if version_for(state, version) != version:
            self.set_info("format_version", FORMAT_VERSION)

    def last_key(self) -> int:
        """The highest key ever given (-1 before the first): every later item's key is above it."""
        return int(self.info("next_key", 0)) - 1

    def generation(self) -> int:
        return int(self.info("generation", 0))

    @contextlib.contextmanager
    def transaction(self, bump: bool = True) -> Iterator[None]:
        """One atomic change (the generation goes up by one with it, unless `bump=False`)."""
        self.require_writable()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                if bump:
                    self.db.execute("UPDATE info SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) "
                                    "WHERE name = 'generation'")
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise translate(exc, self.file.parent if self.file else "in memory") from exc
        except OSError as exc:  # writing the vector files
            if exc.errno == errno.ENOSPC:
                raise IndexFullError(f"no space left on the disk holding the index {self.file.parent}: what was "
                                     "already indexed is kept; free some space and run the same command again") from exc
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state (a read transaction), whatever writers commit meanwhile."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            if self.db.in_transaction:
                self.db.execute("COMMIT")

    # -- items ----------------------------------------------------------------------------------

    def count(self) -> int:
        """How many items: kept by every change (a COUNT(*) reads the whole id index: 1.3 s at 10M items
        from disk, and a live reader counts after every commit it catches up with)."""
        kept = self.info("item_count")
        return int(kept) if kept is not None else self._counted()

    def _counted(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def _add_to_count(self, delta: int) -> None:
        """Inside the transaction that changed the items by `delta` (already applied)."""
        kept = self.info("item_count")
        self.set_info("item_count", int(kept) + delta if kept is not None else self._counted())

    def insert(self, vectors: np.ndarray, ids: list, rows: list[tuple]) -> np.ndarray:
        """Inside a transaction: store unit `vectors` with their ids and (root, path, mtime, size, caption,
        extra) rows under new keys, which are returned. The vectors are durable in their segment before the
        transaction can commit."""
        start = int(self.info("next_key", 0))
        keys = np.arange(start, start + len(ids), dtype=np.int64)
        self.db.executemany("INSERT INTO items(key, id, root, path, mtime, size, caption, extra) "
                            "VALUES (?,?,?,?,?,?,?,?)", [(int(k), i, *row) for k, i, row in zip(keys, ids, rows)])
        self.set_vectors(self.segments.append(self.vectors_state(), keys, vectors))
        self.set_info("next_key", start + len(ids))
        self._add_to_key_sum(keys_sum(keys))
        self._add_to_count(len(ids))
        return keys

    def key_sum(self) -> str:
        """The digest (`keys_sum`) of the keys in the store, kept up to date by every change."""
        return self.info("key_sum", "0")

    def _add_to_key_sum(self, delta: int) -> None:
        self.set_info("key_sum", str((int(self.key_sum()) + delta) % 2**64))

    def delete_keys(self, keys: list[int]) -> None:
        """Inside a (generation-raising) transaction: remove items; their keys go to the removal log (and their
        ids to the list `recording_deletions` hands out)."""
        generation = self.generation() + 1  # the one this transaction commits
        for chunk in chunks([int(k) for k in keys]):
            rows = self.db.execute(f"DELETE FROM items WHERE key IN ({marks(chunk)}) RETURNING key, id",
                                   chunk).fetchall()
            gone = [k for k, _ in rows]
            if self._deleted is not None:
                self._deleted.extend(i for _, i in rows)
            self.db.executemany("INSERT OR REPLACE INTO removed(key, generation) VALUES (?, ?)",
                                [(k, generation) for k in gone])
            self._add_to_key_sum(-keys_sum(np.asarray(gone, np.int64)))
            self._add_to_count(-len(gone))

    @contextlib.contextmanager
    def recording_deletions(self) -> Iterator[SpillList]:
        """A list that receives the id of every item deleted inside (whether or not its transaction commits):
        a `SpillList`, so that removing millions holds ten thousand ids in memory. A recording inside another
        takes the deletions made inside it (the outer one resumes after it)."""
        outer, self._deleted = self._deleted, SpillList()
        try:
            yield self._deleted
        finally:
            self._deleted = outer

    def removed_since(self, generation: int) -> np.ndarray:
        """The keys removed by changes after `generation` (as far as the log goes back: see `prune_removed`)."""
        rows = self.db.execute("SELECT key FROM removed WHERE generation > ?", (int(generation),))
        return np.fromiter((k for (k,) in rows), dtype=np.int64)

    def prune_removed(self, keep: int = REMOVAL_LOG_GENERATIONS) -> None:
        """Inside a transaction that dropped every removed item's row from the vector files (compaction): forget
        removals more than `keep` generations old (a reader further behind finds its count off and rebuilds).
        Until then the log holds every removed key whose row is still in the vector files."""
        self.db.execute("DELETE FROM removed WHERE generation <= ?", (self.generation() - keep,))

    def ids_by_key(self, keys: np.ndarray) -> np.ndarray:
        """The id of each key (None for -1 or a key no item has): int64 when every one is an int, else objects."""
        wanted = [int(k) for k in np.unique(keys) if k >= 0]
        found: dict[int, Any] = {}
        for chunk in chunks(wanted):
            found.update(self.db.execute(f"SELECT key, id FROM items WHERE key IN ({marks(chunk)})", chunk))
        return ids_array([found.get(int(k)) for k in np.ravel(keys)]).reshape(np.shape(keys))

    def keys_for(self, ids: list) -> dict:
        """id -> key for the ids that are in the store."""
        found = {}
        for chunk in chunks(ids):
            found.update(self.db.execute(f"SELECT id, key FROM items WHERE id IN ({marks(chunk)})", chunk).fetchall())
        return found

    def ids(self) -> list:
        return [row[0] for row in self.db.execute("SELECT id FROM items ORDER BY key")]

    def id_types(self) -> set[type]:
        """Which types the items' ids have ({int}, {str}, both, or none): two seeks of the id index, whose
        order puts every integer before every text."""
        found = set()
        if self.db.execute("SELECT 1 FROM items WHERE id < '' LIMIT 1").fetchone():
            found.add(int)
        if self.db.execute("SELECT 1 FROM items WHERE id >= '' LIMIT 1").fetchone():
            found.add(str)
        return found

    def ids_with_prefix(self, prefix: str) -> list[str]:
        """The text ids that start with `prefix`, by a range over the id index (not a scan of every id): text
        sorts by code point, so they are those from `prefix` up to its last character's successor."""
        if not prefix:
            raise ValueError("an empty prefix would be every text id")
        rows = self.db.execute("SELECT id FROM items WHERE id >= ? AND id < ? ORDER BY key", (prefix, past(prefix)))
        return [row[0] for row in rows]

    def id_page(self, prefix: str, after: str | None = None, limit: int = 10_000,
                files_only: bool = False) -> list[str]:
        """Up to `limit` text ids that start with `prefix`, in id order, past `after` (the last of the page
        before; None: from the first): a collection's ids a page at a time, whatever changes between pages."""
        if not prefix:
            raise ValueError("an empty prefix would be every text id")
        only = " AND path IS NOT NULL" if files_only else ""
        start = "id > ?" if after is not None else "id >= ?"
        rows = self.db.execute(f"SELECT id FROM items WHERE {start} AND id < ?{only} ORDER BY id LIMIT ?",
                               (after if after is not None else prefix, past(prefix), int(limit)))
        return [row[0] for row in rows]

    def ids_with_prefixes(self, prefixes: list[str], captions: bool = False) -> list:
        """The text ids that start with any of `prefixes` (`captions`: (id, stored caption) pairs): a range over
        the id index for each, a few hundred ranges to a statement (SQLite looks each up in the index and
        unites them)."""
        found = []
        for chunk in chunks([p for p in prefixes if p], 400):
            ranges = " OR ".join(["(id >= ? AND id < ?)"] * len(chunk))
            rows = self.db.execute(f"SELECT id{', caption' if captions else ''} FROM items WHERE {ranges}",
                                   [bound for p in chunk for bound in (p, past(p))])
            found += rows.fetchall() if captions else [row[0] for row in rows]
        return found

    def count_with_prefix(self, prefix: str) -> int:
        """How many text ids start with `prefix` (a count over the id index's range; nothing listed)."""
        if not prefix:
            raise ValueError("an empty prefix would be every text id")
        return int(self.db.execute("SELECT COUNT(*) FROM items WHERE id >= ? AND id < ?",
                                   (prefix, past(prefix))).fetchone()[0])

    def records_by_key(self, keys: list[int]) -> dict[int, dict]:
        """key -> record ({'id', 'path', 'mtime', 'size', 'caption', ...extra}) for keys in the store (a key
        past SQLite's 64-bit integers, as a client may send, is in no store)."""
        return self._records("items.key", [k for k in keys if -2**63 <= k < 2**63])

    def records_by_id(self, ids: list) -> dict[Any, dict]:
        return {record["id"]: record for record in self._records("items.id", ids).values()}

    def _records(self, column: str, values: list) -> dict[int, dict]:
        found = {}
        for chunk in chunks(values):
            for row in self.db.execute(f"{_RECORD_SELECT} WHERE {column} IN ({marks(chunk)})", chunk):
                found[row[0]] = record(row)
        return found

    def vectors(self, keys: list[int]) -> np.ndarray:
        """The embeddings (float32) of `keys`, in that order (each key must be in the store)."""
        keys = np.asarray(keys, dtype=np.int64)
        vectors, found = self.segments.vectors(keys)
        if not found.all():
            raise BrokenIndexError(f"the vector files of {self.file or 'this index'} lack the item with key "
                                   f"{int(keys[~found][0])}: they are damaged; rebuild the index")
        return self._checked(keys, vectors)

    def vectors_after(self, key: int, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, vectors) of every item with a key above `key`, in batches (what a reader catches up with)."""
        cursor = self.db.execute("SELECT key FROM items WHERE key > ? ORDER BY key", (int(key),))
        while rows := cursor.fetchmany(batch):
            keys = np.asarray([k for (k,) in rows], dtype=np.int64)
            yield keys, self.vectors(keys)

    def _checked(self, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """`vectors` with damaged rows (NaN, infinite or far from unit length: flipped bytes on disk) set to zero,
        so that no search ever scores NaN; their keys are remembered in `damaged` (syncing re-embeds them)."""
        bad = damaged_rows(vectors, self.vectors_per_item)
        if bad.any():
            self.damaged.update(int(k) for k in keys[bad])
            vectors[bad] = 0
        return vectors

    def check_vectors(self, ids: list | None = None) -> None:
        """Read the stored vectors of `ids` (default: every item's) and remember the damaged ones in `damaged`:
        a folder's few among millions are gathered by key, more in one sequential pass over the files."""
        with self.snapshot():
            if ids is not None and len(ids) * CHECK_BY_KEY < self.count():
                keys = np.sort(np.fromiter(self.keys_for(ids).values(), np.int64))
                for start in range(0, len(keys), 65_536):
                    self._checked(keys[start:start + 65_536], self.segments.vectors(keys[start:start + 65_536])[0])
                return
            for keys, vectors in self.live_vectors():
                self._checked(keys, vectors)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, vectors) of every item, in key order, in RAM (small collections: builds that fit the budget)."""
        batches = [(keys, self._checked(keys, vectors)) for keys, vectors in self.live_vectors()]
        if not batches:
            return np.zeros(0, np.int64), np.zeros((0, self.row_width), np.float32)
        return np.concatenate([keys for keys, _ in batches]), np.concatenate([vectors for _, vectors in batches])

    # -- captions owed a removal --------------------------------------------------------------------

    def owe_captions(self, image_ids: Iterable) -> None:
        """Inside the transaction that removes these images: record that their captions are to go too."""
        self.db.execute(_CAPTION_DEBT_TABLE)
        for chunk in batches(image_ids, 10_000):
            self.db.executemany("INSERT OR IGNORE INTO caption_debt(id) VALUES (?)", ((i,) for i in chunk))

    def caption_debt(self, limit: int = 10_000) -> list:
        """Up to `limit` image ids whose captions are still to remove ([] for a store older than the table)."""
        try:
            return [i for i, in self.db.execute("SELECT id FROM caption_debt LIMIT ?", (int(limit),))]
        except sqlite3.OperationalError:  # (no such table)
            return []

    def owed_among(self, image_ids: list) -> set:
        """Those of these image ids whose captions are still to remove."""
        if not self.caption_debt(1):
            return set()
        found: set = set()
        for chunk in chunks(list(image_ids)):
            found.update(i for i, in self.db.execute(f"SELECT id FROM caption_debt WHERE id IN ({marks(chunk)})",
                                                     chunk))
        return found

    def settle_captions(self, image_ids: list) -> None:
        """The captions of these images are gone: their record goes (one transaction; readers see no change)."""
        with self.transaction(bump=False):
            for chunk in chunks(list(image_ids)):
                self.db.execute(f"DELETE FROM caption_debt WHERE id IN ({marks(chunk)})", chunk)

    # -- the queries builds tune on ---------------------------------------------------------------

    def set_tune_queries(self, vectors: np.ndarray) -> None:
        """Inside a transaction: remember the queries builds tune on (replacing those before)."""
        self.db.execute(_TUNE_QUERIES_TABLE)
        self.db.execute("DELETE FROM tune_queries")
        self.db.executemany("INSERT INTO tune_queries(n, vector) VALUES (?, ?)",
                            [(n, np.asarray(v, np.float32).tobytes()) for n, v in enumerate(vectors)])

    def tune_queries(self, dim: int) -> np.ndarray | None:
        """The queries remembered for tuning, or None (none remembered; a store older than the table)."""
        try:
            blobs = [row[0] for row in self.db.execute("SELECT vector FROM tune_queries ORDER BY n")]
        except sqlite3.OperationalError:  # no such table
            return None
        return blobs_to_vectors(blobs, dim) if blobs else None

    # -- roots ----------------------------------------------------------------------------------

    def roots(self, counts: bool = False) -> list[tuple[int, str, int | None]]:
        """(root, folder, items) of each folder the index covers; items None unless `counts` (counting reads
        every entry of a root in the id index: 0.1 s a million)."""
        if not counts:
            return [(root, path, None) for root, path in self.db.execute("SELECT root, path FROM roots ORDER BY path")]
        return self.db.execute("SELECT roots.root, roots.path, COUNT(items.key) FROM roots LEFT JOIN items "
                               "ON items.root = roots.root GROUP BY roots.root ORDER BY roots.path").fetchall()

    def root_count(self, root: int) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM items WHERE root = ?", (root,)).fetchone()[0])

    def add_root(self, folder: str) -> int:
        """Inside a transaction: the root of `folder`, created if new."""
        row = self.db.execute("SELECT root FROM roots WHERE path = ?", (folder,)).fetchone()
        if row:
            return int(row[0])
        return int(self.db.execute("INSERT INTO roots(path) VALUES (?)", (folder,)).lastrowid)

    def drop_empty_roots(self, keep: int | None = None) -> None:
        """Inside a transaction: forget folders no item is under any more (but `keep`)."""
        self.db.execute("DELETE FROM roots WHERE root IS NOT ? AND NOT EXISTS "
                        "(SELECT 1 FROM items WHERE items.root = roots.root)", (keep,))  # a seek a root

    def iter_files(self, root: int, prefix: str = "", batch: int = 10_000) -> Iterator[tuple]:
        """(id, relative path, size, mtime) of the root's items under `prefix` ('' or 'sub/dir/'), read `batch`
        rows at a time (a folder of millions is never held)."""
        if not prefix:
            return streamed(self.db.execute("SELECT id, path, size, mtime FROM items WHERE root = ?", (root,)), batch)
        return streamed(self.db.execute("SELECT id, path, size, mtime FROM items WHERE root = ? AND path >= ? AND "
                                        "path < ?", (root, prefix, past(prefix))), batch)

    def outside_files(self, folder: str, root: int | None, batch: int = 10_000) -> Iterator[tuple]:
        """(id, size, mtime) of files under `folder` held elsewhere: without a root (format 1 stored
        absolute paths) or under roots inside `folder` (indexed on their own before); read `batch` at a time."""
        prefix = folder.rstrip(os.sep) + os.sep
        for cursor in (
                self.db.execute("SELECT id, size, mtime FROM items WHERE root IS NULL AND path >= ? AND path < ?",
                                (prefix, past(prefix))),
                self.db.execute("SELECT items.id, items.size, items.mtime FROM roots JOIN items ON items.root = "
                                "roots.root WHERE roots.root IS NOT ? AND roots.path >= ? AND roots.path < ?",
                                (root, prefix, past(prefix)))):
            yield from streamed(cursor, batch)

    def adopt(self, root: int, root_folder: str, folder: str) -> None:
        """Inside a transaction: the files under `folder` held without a root or under roots inside it
        move to `root` (whose folder is `root_folder`), with paths relative to it; keys stay."""
        prefix = folder.rstrip(os.sep) + os.sep
        base = root_folder.rstrip(os.sep) + os.sep
        self.db.execute("UPDATE items SET root = ?, path = replace(substr(path, ?), ?, '/') "  # (one statement:
                        "WHERE root IS NULL AND path >= ? AND path < ?",  # an ingest of millions is not held)
                        (root, len(base) + 1, os.sep, prefix, past(prefix)))
        for inner, inner_path in self.db.execute("SELECT root, path FROM roots WHERE root != ? AND substr(path, 1, ?) = ?",
                                                 (root, len(prefix), prefix)).fetchall():
            relative = Path(inner_path[len(base):]).as_posix() + "/"
            self.db.execute("UPDATE items SET root = ?, path = ? || path WHERE root = ?", (root, relative, inner))
            self.db.execute("DELETE FROM roots WHERE root = ?", (inner,))

    def move(self, moves: list[tuple[Any, str, int, str, float, int]]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Inside a transaction: re-point items at other files with the same content, each (old id, new id,
        root, relative path, mtime, size), keeping their embeddings (nothing is embedded again) under new keys,
        since a key's id never changes (readers cache it). (old keys, new keys, their vectors)."""
        if not moves:
            return [], np.zeros(0, np.int64), np.zeros((0, self.row_width), np.float32)
        old = {}
        for chunk in chunks([m[0] for m in moves]):
            old.update((row[0], row[1:]) for row in self.db.execute(
                f"SELECT id, key, caption, extra FROM items WHERE id IN ({marks(chunk)})", chunk))
        old_keys = [old[m[0]][0] for m in moves]
        vectors = self.vectors(old_keys)
        self.delete_keys(old_keys)
        rows = [(root, relative, mtime, size, *old[old_id][1:]) for old_id, _, root, relative, mtime, size in moves]
        return old_keys, self.insert(vectors, [m[1] for m in moves], rows), vectors

    def iter_records_of_root(self, root: int, batch: int = 10_000) -> Iterator[dict]:
        """The records of the root's items, read `batch` at a time."""
        return map(record, streamed(self.db.execute(f"{_RECORD_SELECT} WHERE items.root = ?", (root,)), batch))

    def keys_under(self, folder: str, batch: int = 10_000) -> Iterator[int]:
        """Keys of every item whose file is `folder` or under it (rooted or not), read `batch` at a time."""
        prefix = folder.rstrip(os.sep) + os.sep
        yield from self._keys_at("root IS NULL", (), folder, prefix, batch)
        for root, root_path, _ in self.roots():
            if root_path == folder or root_path.startswith(prefix):
                yield from (k for (k,) in streamed(self.db.execute("SELECT key FROM items WHERE root = ?", (root,)),
                                                   batch))
            elif folder.startswith(root_path.rstrip(os.sep) + os.sep):
                inside = Path(folder[len(root_path.rstrip(os.sep)) + 1:]).as_posix()
                yield from self._keys_at("root = ?", (root,), inside, inside + "/", batch)

    def _keys_at(self, where: str, args: tuple, path: str, prefix: str, batch: int) -> Iterator[int]:
        """Keys of the items (`where`) at `path` or under `prefix`: two searches of an index (an OR of the
        two would scan)."""
        yield from (k for (k,) in self.db.execute(f"SELECT key FROM items WHERE {where} AND path = ?", (*args, path)))
        yield from (k for (k,) in streamed(self.db.execute(f"SELECT key FROM items WHERE {where} AND path >= ? AND "
                                                           "path < ?", (*args, prefix, past(prefix))), batch))

    def shards(self) -> list[str]:
        """The shard paths whose items are indexed in place (`clipkit.index.shards`): one pass, no keys held."""
        rows = self.db.execute("SELECT DISTINCT json_extract(extra, '$.shard') FROM items "
                               "WHERE path IS NULL AND extra LIKE '%\"shard\"%'")
        return [shard for (shard,) in rows if isinstance(shard, str)]

    def shard_keys(self, prefix: str, chosen, batch: int = 10_000) -> Iterator[int]:
        """The keys of the shard items whose ids start with `prefix` (a shard's are `SHARD#KEY`: a range over
        the id index, no scan) and whose shard `chosen(shard path)` picks, read `batch` at a time."""
        rows = self.db.execute("SELECT key, json_extract(extra, '$.shard') FROM items WHERE id >= ? AND id < ? "
                               "AND path IS NULL", (prefix, past(prefix)))
        return (key for key, shard in streamed(rows, batch) if isinstance(shard, str) and chosen(shard))

    # -- copies ---------------------------------------------------------------------------------

    def dead_rows(self) -> int:
        """Rows of removed items still in the vector files (reclaimed by `compact`)."""
        return int(self.vectors_state()["rows"]) - self.count()

    def live_vectors(self, batch: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, float32 vectors) of every item, in key order, in batches: one sequential read of the vector
        files, leaving out the rows of removed items (every one of which the removal log holds until a
        compaction drops the row)."""
        dead = self.dead_keys()
        for keys, vectors in self.segments.batches(batch, read=True):
            if len(dead):
                live = ~in_sorted(keys, dead)
                keys, vectors = keys[live], vectors[live]
            if len(keys):  # (a batch of removed items' rows alone gives nothing)
                yield keys, vectors

    def dead_keys(self) -> np.ndarray:
        """Sorted keys whose rows are still in the vector files but whose items are gone: the removal log holds
        every one of them until a compaction drops the row."""
        return np.unique(self.removed_since(-1))

    def sample_items(self, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(keys, float32 vectors) of up to `m` items drawn at random (from the vector files' rows: no scan of
        the items), in random order."""
        rows = int(self.vectors_state()["rows"])
        rng = np.random.default_rng(seed)
        drawn = rng.choice(rows, min(rows, int(m * 1.1) + 16), replace=False) if rows else np.zeros(0, np.int64)
        keys = self.segments.keys_at(np.sort(drawn))
        live = rng.permutation(keys[~in_sorted(keys, self.dead_keys())])[:m]
        return live, self.segments.vectors(live)[0]

    def compact(self, dtype: str | None = None) -> None:
        """Rewrite the vectors of the items still in the store into a new set of segment files (as `dtype`,
        default as they are) and drop the old ones (whose rows belonged to removed items); the caller holds
        the writer lock."""
        with self.transaction(bump=False):
            state = self.segments.rewrite({**self.vectors_state(), **({"dtype": dtype} if dtype else {})},
                                          self.live_vectors())
            self.set_vectors(state)
            self.prune_removed()
        self.segments.drop_other_sets(state)

    def backup_to(self, target: Path) -> None:
        """Copy this store into the new file `target` and its vectors (the live ones, compacted) beside it."""
        destination = sqlite3.connect(str(target), isolation_level=None)
        try:
            self.db.backup(destination)
            destination.execute("PRAGMA journal_mode=WAL")
            with self.snapshot():
                copy = Segments(target.parent, self.row_width)
                state = copy.rewrite(self.vectors_state(), self.live_vectors())
            for name, value in (("vectors", state), ("format_version", version_for(state, self.info("format_version")))):
                destination.execute("INSERT OR REPLACE INTO info(name, value) VALUES (?, ?)", (name, json.dumps(value)))
        finally:
            destination.close()

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the main file, so the file alone holds everything (copies, read-only
        media). Best effort: a reader holding an old snapshot only delays it."""
        if self.file is not None and not self.readonly:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self.db.close()


def version_for(state: dict, version) -> int:
    """The format version a store at `version` records with the vectors `state`: 4 once a segment has a run."""
    return FORMAT_VERSION if any(run is not None for run in state.get("runs") or []) else version


def fold_journal(file: Path) -> None:
    """Fold the write-ahead log of the store at `file` (if any) into it, then delete the log and its index:
    afterwards the file alone is the store, and may be replaced by another without SQLite ever replaying
    this log onto that one. A damaged store's log is deleted as it is (there is nothing to keep)."""
    wal, shm = Path(str(file) + "-wal"), Path(str(file) + "-shm")
    if file.is_file() and wal.is_file() and wal.stat().st_size:
        db = sqlite3.connect(str(file), timeout=60, isolation_level=None)
        try:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.DatabaseError:
            busy = 0
        finally:
            db.close()
        if busy:
            raise IndexBusyError(f"cannot replace the index store {file}: another process holds a read open on "
                                   "it; stop it (clipkit serve, say) and save again")
    for journal in (wal, shm):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)


def streamed(cursor: sqlite3.Cursor, batch: int = 10_000) -> Iterator[tuple]:
    """The rows of `cursor`, fetched `batch` at a time (a result of millions is never held)."""
    while rows := cursor.fetchmany(batch):
        yield from rows


def past(prefix: str) -> str:
    """The first text after every text that starts with `prefix` (SQLite compares text by code point), so
    that `x >= prefix AND x < past(prefix)` is a range over an index: the texts that start with it."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def record(row: tuple) -> dict:
    key, item_id, root, path, mtime, size, caption, extra = row
    full = os.path.join(root, *path.split("/")) if root is not None and path is not None else path
    out = {"id": item_id, **{c: v for c, v in zip(META_COLUMNS, (full, mtime, size, caption)) if v is not None}}
    out.update(json.loads(extra) if extra else {})
    out["key"] = key
    return out


CHECK_BY_KEY = 8  # check_vectors gathers a folder's rows by key while they are under 1/8 of all


def meta_row(meta: dict | None) -> tuple:
    """A metadata dict as the store's (root, path, mtime, size, caption, extra) columns (no root)."""
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"metadata entries must be dicts, got {type(meta).__name__}")
    meta = dict(meta or {})
    path, mtime, size, caption = (meta.pop(name, None) for name in META_COLUMNS)
    meta.pop("key", None)
    try:
        extra = json.dumps(meta) if meta else None
    except TypeError as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
    return (None, os.fspath(path) if path is not None else None, float(mtime) if mtime is not None else None,
            int(size) if size is not None else None, str(caption) if caption is not None else None, extra)


def blobs_to_vectors(blobs: list[bytes], dim: int) -> np.ndarray:
    """Stored embedding blobs as a (N, dim) float32 array; a blob of the wrong size is damage."""
    if any(len(b) != 4 * dim for b in blobs):
        raise BrokenIndexError(f"the store holds embeddings of the wrong size for dim {dim}; rebuild the index")
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim).copy()


def _connect_readonly(file: Path) -> sqlite3.Connection:
    """Read-only media: SQLite's read-only mode, or (when it cannot keep its shared-memory file beside
    the store) immutable mode, which reads the main file as it is."""
    uri = "file:" + urllib.parse.quote(str(file.resolve()))
    try:
        db = sqlite3.connect(uri + "?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
        db.execute("SELECT COUNT(*) FROM info").fetchone()
        return db
    except sqlite3.OperationalError:
        return sqlite3.connect(uri + "?immutable=1", uri=True, check_same_thread=False, isolation_level=None)
