"""Keeping an index in step with folders of images: plan (what changed since the last run), then sync.

Each folder indexed is a root: the store keeps its absolute path once and every file's path relative to
it. A file is unchanged when its size and mtime match what was indexed. A new file that has the name, size
and mtime of an indexed file that is gone (from this folder, or from a folder that no longer exists at
all), or else its size and content hash (a copy), is that file renamed or moved: it is re-pointed and
keeps its embedding. So a renamed or moved folder is re-pointed, not embedded again, and not read.

The plan is made on disk, in a private temporary SQLite database: the files found (listed as the folder is
walked), the files the index knows there (streamed from the store), and the comparison and the moves as SQL;
the files to embed are then read back a chunk at a time. Its memory does not grow with the folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import operator
import os
import sqlite3
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Container, Iterator, NamedTuple, Sequence

from clipkit._io import SkipList, batches, printable, temp_space
from clipkit._progress import progress_bar
from clipkit.data.folder import iter_image_files, relative_path
from clipkit.index.store import CHECK_BY_KEY, Store, streamed
from clipkit.index.vectors import storable

log = logging.getLogger("clipkit.index")


@dataclass
class SyncReport:
    """What `Index.sync_folder` did (or, from `plan_folder`, would do)."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    moved: int = 0  # renamed or moved files recognised by content, kept without re-embedding
    unchanged: int = 0
    skipped: SkipList = field(default_factory=SkipList)  # (path, reason), as a list reads them; bounded memory
    skipped_kinds: dict[str, int] = field(default_factory=dict)  # why, in a few words -> how many
    orphaned: dict[str, int] = field(default_factory=dict)  # indexed folders that no longer exist -> items left
    captions_moved: int = 0  # captions carried with the items of moved shards
    captions: object = None  # what syncing the caption files did (clipkit.index.captions.CaptionReport), if any
    excluded: list[str] = field(default_factory=list)  # the exclude globs the folder was synced with
    shards_seen: list = field(default_factory=lambda: [0])  # [how many, the first few]: .tar files a folder holds

    def saw_shard(self, path: str) -> None:
        self.shards_seen[0] += 1
        if len(self.shards_seen) < 4:
            self.shards_seen.append(path)

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    @property
    def found(self) -> bool:
        """Whether the source gave anything: an image embedded, kept, moved or skipped."""
        return bool(self.embedded or self.unchanged or self.moved or self.skipped)

    def skip(self, path: str, reason: str, kind: str) -> None:
        self.skipped.append((path, reason))
        self.skipped_kinds[kind] = self.skipped_kinds.get(kind, 0) + 1


class FileStat(NamedTuple):
    """What a plan keeps of a file's stat (an os.stat_result is six times its size: a plan lists millions)."""

    st_size: int
    st_mtime: float


class PlanRows:
    """One of a plan's lists (new, changed, gone or moved files), kept in the plan's private on-disk database
    and read back in path order: `len()`, iteration, and `[i]` / slices as a list reads them."""

    def __init__(self, plan: "SyncPlan", query: str, row: Callable):
        self._plan, self._query, self._row = plan, query, row

    def __len__(self) -> int:
        return self._plan.db.execute(f"SELECT COUNT(*) FROM ({self._query})").fetchone()[0]

    def __iter__(self) -> Iterator:
        return map(self._row, streamed(self._plan.db.execute(f"{self._query} ORDER BY 1")))

    def chunks(self, size: int) -> Iterator[list]:
        """The rows `size` at a time (each chunk a list)."""
        return batches(self, size)

    def __getitem__(self, at):
        if isinstance(at, slice):
            return list(self)[at]
        return list(itertools.islice(self, at, at + 1))[0] if at >= 0 else list(self)[at]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __bool__(self) -> bool:
        return self._plan.db.execute(f"SELECT EXISTS ({self._query})").fetchone()[0] == 1

    def __repr__(self) -> str:
        return f"PlanRows({len(self)})"


class SyncPlan:
    """What bringing an index up to date with a folder takes (`Index.plan_folder`): `new`, `changed` (path,
    FileStat), `gone` (ids of files no longer there), `moved` (old id, new path, FileStat), each in path
    order, and `unchanged` (a count). The files are listed into a private temporary SQLite database on disk
    (SQLite keeps a small page cache and deletes it when the plan closes), so a plan's memory is the same for
    a folder of a hundred files or of ten million."""

    def __init__(self, root: Path, root_folder: str = "", root_id: int | None = None):
        self.root = root  # the folder asked for
        self.root_folder = root_folder  # the indexed folder it belongs to (itself, or one that holds it)
        self.root_id = root_id  # None: a folder new to the index
        self.unchanged = 0
        self.report = SyncReport()  # skips found while planning
        self.db = sqlite3.connect("", check_same_thread=False)  # "": private, on disk, deleted when closed
        self.db.executescript(_PLAN_SCHEMA)
        self.new = PlanRows(self, "SELECT path, size, mtime FROM found WHERE state = 'new'", _path_stat)
        self.changed = PlanRows(self, "SELECT path, size, mtime FROM found WHERE state = 'changed'", _path_stat)
        self.gone = PlanRows(self, "SELECT id FROM known WHERE state = 'gone'", lambda r: r[0])
        self.moved = PlanRows(self, "SELECT path, old, size, mtime FROM found WHERE state = 'moved'",
                              lambda r: (r[1], r[0], FileStat(r[2], r[3])))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "SyncPlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _path_stat(row: tuple) -> tuple[str, FileStat]:
    return row[0], FileStat(row[1], row[2])


_PLAN_SCHEMA = """
CREATE TABLE found (dev INTEGER, ino INTEGER, link INTEGER, path TEXT UNIQUE, size INTEGER, mtime REAL,
                    state TEXT, old TEXT, PRIMARY KEY (dev, ino));
CREATE TABLE known (id TEXT PRIMARY KEY, size INTEGER, mtime REAL, state TEXT) WITHOUT ROWID;
CREATE TABLE vanished (size INTEGER, mtime REAL, name TEXT, hash TEXT, id TEXT);
CREATE INDEX vanished_by_name ON vanished (size, mtime, name);
CREATE INDEX vanished_by_content ON vanished (size, hash);
CREATE TABLE moves (path TEXT PRIMARY KEY, old TEXT);
"""
_CHUNK = 10_000  # rows written or looked up per statement batch


def file_hash(path: str | os.PathLike) -> str:
    """A content hash of a file (BLAKE2b, 128 bits), to recognise it after a rename or move."""
    digest = _content_digest()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_hash(data: bytes) -> str:
    """`file_hash` of a file that holds `data`."""
    digest = _content_digest()
    digest.update(data)
    return digest.hexdigest()


def _content_digest():
    return hashlib.blake2b(digest_size=16)


def hash_or_none(path: Path) -> str | None:
    try:
        return file_hash(path)
    except OSError:  # gone since it was listed: the next sync removes it
        return None


def shard_of(relative_path: str, shards: int) -> int:
    """The shard (0..shards-1) a file belongs to: a stable hash of its path relative to the folder."""
    return zlib.crc32(relative_path.encode("utf-8", "surrogateescape")) % shards


def _locate(store: Store, folder: str) -> tuple[int | None, str, str]:
    """(root id or None, the root's folder, `folder`'s path inside it + '/' or '')."""
    for root, root_folder, _ in store.roots():
        if folder == root_folder:
            return root, root_folder, ""
        if folder.startswith(root_folder.rstrip(os.sep) + os.sep):
            return root, root_folder, Path(folder).relative_to(root_folder).as_posix() + "/"
    return None, folder, ""


def plan_folder(store: Store, folder: str | os.PathLike, *, exclude: Sequence[str] = (),
                shard: tuple[int, int] | None = None, include: Container[str] | None = None) -> SyncPlan:
    """What syncing `folder` would do, changing nothing.

    `shard=(i, n)`: only the files of shard i of n (by a hash of the path under `folder`), for indexing one
    folder from n processes or machines into n indexes merged later (`Index.merge`). `include`: only
    these files (absolute paths), e.g. those a caption table lists; the folder's others count as gone.
    """
    root = Path(folder).resolve()
    if not storable(str(root)):
        raise ValueError(f"{printable(str(root))}: the folder's name is not valid UTF-8, which the index cannot "
                         "store; rename it")
    root_id, root_folder, prefix = _locate(store, str(root))
    plan = SyncPlan(root=root, root_folder=root_folder, root_id=root_id)
    try:
        with temp_space(f"the plan of {printable(str(root))}"):
            _list_known(store, plan, prefix)
            _list_found(store, plan, exclude, shard, include)
            _compare(plan)
            _find_moves(store, plan)
    except BaseException:
        plan.close()
        raise
    return plan


def _list_known(store: Store, plan: SyncPlan, prefix: str) -> None:
    """The indexed files under the folder into the plan's `known` table, streamed from the store; the damaged
    among their stored vectors (flipped bytes) are marked to be embedded again."""
    known = itertools.chain(
        ((item_id, size, mtime) for item_id, _, size, mtime in store.iter_files(plan.root_id, prefix))
        if plan.root_id is not None else (),
        ((item_id, size, mtime) for item_id, size, mtime in store.outside_files(str(plan.root), plan.root_id)
         if isinstance(item_id, str)))
    for chunk in batches(known, _CHUNK):
        plan.db.executemany("INSERT OR IGNORE INTO known (id, size, mtime) VALUES (?, ?, ?)", chunk)
    count = plan.db.execute("SELECT COUNT(*) FROM known").fetchone()[0]
    if count * CHECK_BY_KEY < store.count():  # a few among many: gathered by key, a chunk at a time
        cursor = plan.db.execute("SELECT id FROM known")
        while rows := cursor.fetchmany(_CHUNK):
            store.check_vectors([item_id for item_id, in rows])
    elif count:
        store.check_vectors()  # most of the index: one pass over the vector files
    damaged = [record["id"] for record in store.records_by_key(sorted(store.damaged)).values()]
    plan.db.executemany("UPDATE known SET state = 'damaged' WHERE id = ?", ((i,) for i in damaged))


def _list_found(store: Store, plan: SyncPlan, exclude: Sequence[str], shard, include) -> None:
    """The folder's image files into the plan's `found` table as they are listed, one row per file (a second
    name of a file, a symlink or hard link, replaces the first only if it is a real name before a symlink's, or
    earlier in path order)."""
    def unread_shard(path: str) -> None:  # (a shard in the folder that the index holds is no news)
        if store.shard_record(path) is None:
            plan.report.saw_shard(path)

    def mine(path: str) -> bool:  # (this run's part of the folder, and what the caption table lists)
        return ((shard is None or shard_of(relative_path(path, str(plan.root)), shard[1]) == shard[0])
                and (include is None or path in include))

    def odd(path: str, reason: str) -> None:
        if mine(path):
            plan.report.skip(printable(path), f"{printable(path)}: {reason}", "not a regular file")

    rows = []
    for path, stat, link in iter_image_files(plan.root, exclude=exclude, on_shard=unread_shard, on_odd=odd):
        if not mine(path):
            continue
        if not storable(path):
            plan.report.skip(printable(path), f"{printable(path)}: the file name is not valid UTF-8, which the index "
                             "cannot store; rename the file", "name not UTF-8")
            continue
        rows.append((stat.st_dev, stat.st_ino, link, path, stat.st_size, stat.st_mtime))
        if len(rows) == _CHUNK:
            _insert_found(plan, rows)
            rows = []
    _insert_found(plan, rows)


def _insert_found(plan: SyncPlan, rows: list[tuple]) -> None:
    plan.db.executemany(
        "INSERT INTO found (dev, ino, link, path, size, mtime) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dev, ino) DO "
        "UPDATE SET link = excluded.link, path = excluded.path, size = excluded.size, mtime = excluded.mtime "
        "WHERE (excluded.link, excluded.path) < (found.link, found.path)", rows)


def _compare(plan: SyncPlan) -> None:
    """Each file found is new, changed (size or mtime, or its stored vector damaged) or unchanged; each file
    known and not found is gone."""
    db = plan.db
    db.executescript("""
        UPDATE found SET state = CASE
            WHEN NOT EXISTS (SELECT 1 FROM known WHERE known.id = found.path) THEN 'new'
            WHEN EXISTS (SELECT 1 FROM known WHERE known.id = found.path AND known.size = found.size
                         AND known.mtime = found.mtime AND known.state IS NOT 'damaged') THEN 'unchanged'
            ELSE 'changed' END;
        UPDATE known SET state = 'gone' WHERE NOT EXISTS (SELECT 1 FROM found WHERE found.path = known.id);
    """)
    plan.unchanged = db.execute("SELECT COUNT(*) FROM found WHERE state = 'unchanged'").fetchone()[0]


def missing_roots(store: Store) -> list[tuple[int, str]]:
    """(root id, folder) of the indexed folders that no longer exist (renamed, moved or deleted)."""
    return [(root, folder) for root, folder, _ in store.roots() if not os.path.isdir(folder)]


def _vanished(store: Store, plan: SyncPlan) -> Iterator[dict]:
    """Records of indexed files that are gone: from this folder, and from folders that no longer exist."""
    for chunk in plan.gone.chunks(_CHUNK):
        yield from store.records_by_id(chunk).values()
    for root, _ in missing_roots(store):
        if root != plan.root_id:
            yield from store.iter_records_of_root(root)


def _find_moves(store: Store, plan: SyncPlan) -> None:
    """A new file that is a vanished one moved keeps its item: one of the same name, size and modification
    time (what a rename or a move keeps: the test that finds a file unchanged), else of the same size and
    content hash (a copy: only new files of a vanished one's size are read, to hash them)."""
    if not plan.new:
        return
    vanished = ((int(r["size"]), r.get("mtime"), os.path.basename(r["id"]), r.get("content_hash"), r["id"])
                for r in _vanished(store, plan) if r.get("size") is not None and isinstance(r["id"], str))
    for chunk in batches(vanished, _CHUNK):
        plan.db.executemany("INSERT INTO vanished (size, mtime, name, hash, id) VALUES (?, ?, ?, ?, ?)", chunk)
    cursor = plan.db.execute("SELECT path, size, mtime FROM found WHERE state = 'new' AND size IN "
                             "(SELECT size FROM vanished) ORDER BY path")
    while rows := cursor.fetchmany(_CHUNK):  # (matches go to their own table: `found` is being read)
        for path, size, mtime in rows:
            match = _vanished_one(plan, "mtime = ? AND name = ?", (size, mtime, os.path.basename(path))) or \
                _vanished_one(plan, "hash = ?", (size, hash_or_none(path)))
            if match is not None:
                plan.db.execute("DELETE FROM vanished WHERE rowid = ?", (match[0],))
                plan.db.execute("INSERT INTO moves (path, old) VALUES (?, ?)", (path, match[1]))
    plan.db.executescript("""
        UPDATE found SET state = 'moved', old = (SELECT old FROM moves WHERE moves.path = found.path)
            WHERE path IN (SELECT path FROM moves);
        UPDATE known SET state = 'moved' WHERE id IN (SELECT old FROM moves);
    """)


def _vanished_one(plan: SyncPlan, where: str, args: tuple) -> tuple | None:
    """(rowid, id) of the latest vanished file of this size (`args[0]`) that `where` also picks, or None."""
    return plan.db.execute(f"SELECT rowid, id FROM vanished WHERE size = ? AND {where} ORDER BY rowid DESC LIMIT 1",
                           args).fetchone()


def _file_row(root: int, root_folder: str, path: str, stat: FileStat) -> tuple:
    """A file's store row: (root, relative path, mtime, size, caption, extra)."""
    relative = relative_path(path, root_folder)
    return (root, relative, stat.st_mtime, stat.st_size, None, json.dumps({"content_hash": hash_or_none(path)}))


def sync_folder(index, folder: str | os.PathLike, model, *, batch_size: int = 64, workers: int | None = None,
                progress: bool | None = None, exclude: Sequence[str] = (), shard: tuple[int, int] | None = None,
                include: Container[str] | None = None, engine=None,
                on_moved: Callable[[list[tuple], Callable], None] | None = None,
                on_gone: Callable[[Callable], None] | None = None) -> SyncReport:
    """Bring `index` (a clipkit Index, whose writer lock the caller holds) up to date with `folder`.
    `engine`: where the images are embedded (None: here, `clipkit.encode.embed_image_files`; or a callable
    `engine(paths, model, batch_size=, workers=)` yielding the same batches, such as
    `clipkit.encode_ray.RayEngine`); each batch is committed as it arrives. `on_moved(moves, change)`: called
    with each chunk of moved files ((old id, new id) each) to make the change (for `index._write`) that moves
    them, their captions with them (`clipkit.index.captions.CaptionMover`). `on_gone(change)`: called with each
    change that removes deleted files, to make it (default: `index._write`; with their captions: before the
    images are embedded, so that no caption outlives its image through a long run)."""
    with plan_folder(index.store, folder, exclude=exclude, shard=shard, include=include) as plan:
        report = plan.report
        report.unchanged = plan.unchanged
        root = index._write(partial(_reorganise, plan))
        report.removed = _remove_gone(index, plan, root, on_gone or index._write)
        report.moved = _move_files(index, plan, root, on_moved, progress)
        todo = itertools.chain(plan.new, plan.changed)
        chunk = getattr(engine, "items_per_call", None) or FOLDER_CHUNK
        with progress_bar(progress, total=len(plan.new) + len(plan.changed), unit="img", desc="indexing") as bar:
            for files in batches(todo, chunk):  # (a Ray engine starts its actors once a chunk)
                _embed_files(index, files, root, plan.root_folder, model, report, bar, engine,
                             batch_size=batch_size, workers=workers)
    report.orphaned = {folder: index.store.root_count(root) for root, folder in missing_roots(index.store)}
    return report


FOLDER_CHUNK = 100_000  # files of a folder embedded in one engine call (their paths held meanwhile)
MOVE_CHUNK = 10_000  # moved files re-pointed in one transaction (their vectors held meanwhile)
GONE_CHUNK = 100_000  # gone files removed in one transaction (their keys held meanwhile)


def _reorganise(plan: SyncPlan, store: Store):
    """A change (for Index._write): the plan's root recorded (the files the index held there without one
    adopted); the root's id."""
    root = store.add_root(plan.root_folder)
    store.adopt(root, plan.root_folder, str(plan.root))
    store.drop_empty_roots(keep=root)
    return root, None, None, []


def _remove_gone(index, plan: SyncPlan, root: int, write: Callable[[Callable], Any]) -> int:
    """Remove the plan's gone files, `GONE_CHUNK` a transaction made by `write(change)` (a stopped run leaves
    the rest, which the next run finds gone again); how many."""
    for chunk in plan.gone.chunks(GONE_CHUNK):
        write(partial(_remove_chunk, chunk, root))
    return len(plan.gone)


def _remove_chunk(ids: list, root: int, store: Store):
    """A change (for Index._write): the items of these ids removed, the folders left empty forgotten."""
    gone = list(store.keys_for(ids).values())
    store.delete_keys(gone)
    store.drop_empty_roots(keep=root)
    return None, None, None, gone


def _move_files(index, plan: SyncPlan, root: int, on_moved, progress: bool | None) -> int:
    """Re-point the plan's moved files at their new paths, keeping their embeddings, `MOVE_CHUNK` files a
    transaction (a stopped run leaves the rest at their old ids, and the next run finds them moved again);
    how many moved."""
    total = len(plan.moved)
    with progress_bar(progress if total > MOVE_CHUNK else False, total=total, unit="img", desc="moving") as bar:
        for chunk in plan.moved.chunks(MOVE_CHUNK):
            change = partial(_move_chunk, chunk, root, plan.root_folder)
            if on_moved is None:
                index._write(change)
            else:
                on_moved([(old_id, path) for old_id, path, _ in chunk], change)
            bar.update(len(chunk))
    return total


def _move_chunk(moves: list[tuple], root: int, root_folder: str, store: Store):
    """A change (for Index._write): `moves` ((old id, new path, stat) each) re-keyed, their embeddings kept;
    the folders left empty forgotten."""
    moved_from, new_keys, vectors = store.move([
        (old_id, path, root, relative_path(path, root_folder), stat.st_mtime, stat.st_size)
        for old_id, path, stat in moves])
    store.drop_empty_roots(keep=root)
    return None, new_keys, vectors, moved_from


def _embed_files(index, files: list[tuple[str, FileStat]], root: int, root_folder: str, model, report: SyncReport,
                 bar, engine, **options) -> None:
    """Embed `files` (path, stat) with `engine` (None: here), committing each batch as it comes."""
    if engine is None:  # (imported only here, with files to embed: it imports torch)
        from clipkit.encode import embed_image_files

        engine = embed_image_files
    paths = [path for path, _ in files]
    for vectors, positions, failures in engine(paths, model, **options):
        for position, reason, kind in failures:
            report.skip(paths[position], reason, kind)
            log.info("skipped %s", reason)
        if len(positions):
            rows = [(files[p][0], _file_row(root, root_folder, *files[p])) for p in positions]
            added, updated = index._replace_files(vectors, rows)
            report.added += added
            report.updated += updated
        bar.update(len(positions) + len(failures))


REMOVE_CHUNK = 100_000  # items removed in one transaction (their keys held meanwhile)


def remove_page(keys_of: Callable[[Store], Iterator[int]], forget: Callable[[Store, str], bool], store: Store):
    """A change (for Index._write): the first `REMOVE_CHUNK` keys that `keys_of(store)` gives removed (keys
    removed are not given again: the next page takes the rest), then the recorded shards that
    `forget(store, shard path)` picks forgotten (so indexing one again reads it anew) and the folders left
    empty; (how many, ...)."""
    keys_left = keys_of(store)
    keys = list(itertools.islice(keys_left, REMOVE_CHUNK))
    keys_left.close()  # (its statement ends before the rows it read are deleted)
    store.delete_keys(keys)
    store.forget_shards([shard for shard in store.shard_records() if forget(store, shard)])
    store.drop_empty_roots()
    return len(keys), None, None, keys


def keys_under(folder: str, store: Store) -> Iterator[int]:
    """The keys of every item whose file, or shard, is `folder` or under it."""
    under = partial(is_under, folder=folder)
    yield from store.keys_under(folder)
    yield from store.shard_keys(folder + "#", under)
    yield from store.shard_keys(folder.rstrip(os.sep) + os.sep, under)


def shard_under(folder: str, store: Store, shard: str) -> bool:
    return is_under(shard, folder)


def keys_missing(shards: list[str], store: Store) -> Iterator[int]:
    """The keys of the items of every indexed folder that no longer exists, and of `shards` (`gone_shards`)."""
    for _, folder in missing_roots(store):
        yield from store.keys_under(folder)
    yield from keys_of_shards(shards, store)


def keys_of_shards(shards: list[str], store: Store) -> Iterator[int]:
    """The keys of the items of these shards (a range of ids each; no look at the files)."""
    for shard in shards:
        yield from store.shard_keys(shard + "#", partial(operator.eq, shard))


def gone_shards(store: Store) -> list[str]:
    """The shards whose items are indexed in place and whose file no longer exists (a pass over the shard
    items: once a removal, not once a page)."""
    return [shard for shard in store.shards() if _gone(shard)]


def shard_gone(store: Store, shard: str) -> bool:
    return _gone(shard)


def gone_shards_in(folder: str, store: Store) -> list[str]:
    """The recorded shards in `folder` (or its subfolders) whose file is gone (one look a recorded shard; a gone
    shard's record is kept until its last item goes, so a stopped removal is found again)."""
    return [shard for shard in store.shard_records() if is_under(shard, folder) and _gone(shard)]


def gone_shard_emptied(folder: str, store: Store, shard: str) -> bool:
    """Whether `shard`, in `folder` (or its subfolders), is gone and has no item left (its record, which finds
    its items, is kept until then)."""
    return is_under(shard, folder) and _gone(shard) and next(keys_of_shards([shard], store), None) is None


def is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _gone(shard: str) -> bool:
    return not os.path.isfile(shard)
