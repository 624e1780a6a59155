"""Keeping an index in step with folders of images: plan (what changed since the last run), then sync.

Each folder indexed is a root: the store keeps its absolute path once and every file's path relative to
it. A file is unchanged when its size and mtime match what was indexed. A new file whose size and content
hash equal those of an indexed file that is gone (from this folder, or from a folder that no longer
exists at all) is that file renamed or moved: it is re-pointed and keeps its embedding. So a renamed or
moved folder is re-pointed, not embedded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Container, NamedTuple, Sequence

from clipkit._io import SkipList
from clipkit._progress import progress_bar
from clipkit.data.folder import scan_image_paths
from clipkit.data.images import failure_kind
from clipkit.index.store import Store

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
    moves: list[tuple] = field(default_factory=list, repr=False)  # (old id, new id) of the moved files
    captions_moved: int = 0  # captions carried with the items of moved shards
    captions: object = None  # what syncing the caption files did (clipkit.index.captions.CaptionReport), if any
    excluded: list[str] = field(default_factory=list)  # the exclude globs the folder was synced with

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    def skip(self, path: str, reason: str, kind: str) -> None:
        self.skipped.append((path, reason))
        self.skipped_kinds[kind] = self.skipped_kinds.get(kind, 0) + 1


class FileStat(NamedTuple):
    """What a plan keeps of a file's stat (an os.stat_result is six times its size: a plan lists millions)."""

    st_size: int
    st_mtime: float


@dataclass
class SyncPlan:
    """What bringing an index up to date with a folder takes (`Index.plan_folder`)."""

    root: Path  # the folder asked for
    root_folder: str = ""  # the root it belongs to (itself, or an indexed folder that holds it)
    root_id: int | None = None  # None: a folder new to the index
    new: list[tuple[str, FileStat]] = field(default_factory=list)  # (path, stat)
    changed: list[tuple[str, FileStat]] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # ids of files no longer there
    moved: list[tuple[str, str, FileStat]] = field(default_factory=list)  # (old id, new path, stat)
    unchanged: int = 0
    report: SyncReport = field(default_factory=SyncReport)  # skips found while planning


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
    if not _storable(str(root)):
        raise ValueError(f"{printable(str(root))}: the folder's name is not valid UTF-8, which the index cannot "
                         "store; rename it")
    root_id, root_folder, prefix = _locate(store, str(root))
    plan = SyncPlan(root=root, root_folder=root_folder, root_id=root_id)
    known: dict[str, tuple] = {}
    if root_id is not None:
        known.update((item_id, (size, mtime)) for item_id, _, size, mtime in store.files(root_id, prefix))
    known.update((item_id, (size, mtime)) for item_id, size, mtime in store.outside_files(str(root), root_id)
                 if isinstance(item_id, str))
    store.check_vectors(list(known))  # the folder's damaged stored vectors (flipped bytes) are embedded again
    damaged = {record["id"] for record in store.records_by_key(sorted(store.damaged)).values()}
    files = scan_image_paths(root, exclude=exclude)
    if shard is not None:
        files = [p for p in files if shard_of(Path(p).relative_to(root).as_posix(), shard[1]) == shard[0]]
    if include is not None:
        files = [p for p in files if p in include]
    for path in files:
        if not _storable(path):
            plan.report.skip(printable(path), f"{printable(path)}: the file name is not valid UTF-8, which the index "
                             "cannot store; rename the file", "name not UTF-8")
            continue
        try:
            stat = os.stat(path)
        except OSError as exc:
            plan.report.skip(path, str(exc), failure_kind(exc))
            continue
        previous, stat = known.pop(path, None), FileStat(stat.st_size, stat.st_mtime)
        if previous is None:
            plan.new.append((path, stat))
        elif previous == stat and path not in damaged:
            plan.unchanged += 1
        else:
            plan.changed.append((path, stat))
    plan.gone = list(known)
    if plan.new:
        _find_moves(store, plan)
    return plan


def _storable(name: str) -> bool:
    """Whether a path can be an id in the store (text there is UTF-8: no undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """A file name with undecodable bytes written as \\xNN, fit to print and to write as JSON."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _vanished(store: Store, plan: SyncPlan) -> list[dict]:
    """Records of indexed files that are gone: from this folder, and from folders that no longer exist."""
    records = list(store.records_by_id(plan.gone).values())
    for root, root_folder, _ in store.roots():
        if root != plan.root_id and not os.path.isdir(root_folder):
            records += store.records_of_root(root)
    return records


def _find_moves(store: Store, plan: SyncPlan) -> None:
    by_content: dict[tuple[int, str], list] = {}
    for record in _vanished(store, plan):
        if record.get("content_hash") and record.get("size") is not None:
            by_content.setdefault((int(record["size"]), record["content_hash"]), []).append(record["id"])
    if not by_content:
        return
    sizes = {size for size, _ in by_content}
    still_new = []
    for path, stat in plan.new:
        candidates = by_content.get((stat.st_size, hash_or_none(path))) if stat.st_size in sizes else None
        if candidates:
            plan.moved.append((candidates.pop(), path, stat))
        else:
            still_new.append((path, stat))
    moved_ids = {old for old, _, _ in plan.moved}
    plan.new = still_new
    plan.gone = [i for i in plan.gone if i not in moved_ids]


def _file_row(root: int, root_folder: str, path: str, stat: FileStat) -> tuple:
    """A file's store row: (root, relative path, mtime, size, caption, extra)."""
    relative = Path(path).relative_to(root_folder).as_posix()
    return (root, relative, stat.st_mtime, stat.st_size, None, json.dumps({"content_hash": hash_or_none(path)}))


def sync_folder(index, folder: str | os.PathLike, model, *, batch_size: int = 64, workers: int | None = None,
                progress: bool | None = None, exclude: Sequence[str] = (), shard: tuple[int, int] | None = None,
                include: Container[str] | None = None, engine=None) -> SyncReport:
    """Bring `index` (a clipkit Index, whose writer lock the caller holds) up to date with `folder`.
    `engine`: where the images are embedded (None: here, `clipkit.encode.embed_image_files`; or a callable
    `engine(paths, model, batch_size=, workers=)` yielding the same batches, such as
    `clipkit.encode_ray.RayEngine`); each batch is committed as it arrives."""
    from clipkit.encode import embed_image_files

    plan = plan_folder(index.store, folder, exclude=exclude, shard=shard, include=include)
    report = plan.report
    report.unchanged = plan.unchanged

    def reorganise(store: Store):
        root = store.add_root(plan.root_folder)
        store.adopt(root, plan.root_folder, str(plan.root))
        gone = list(store.keys_for(plan.gone).values())
        store.delete_keys(gone)
        moved_from, new_keys, vectors = store.move([  # each re-keyed, its embedding kept
            (old_id, path, root, Path(path).relative_to(plan.root_folder).as_posix(), stat.st_mtime, stat.st_size)
            for old_id, path, stat in plan.moved])
        store.drop_empty_roots(keep=root)
        return root, new_keys, vectors, gone + moved_from

    root = index._write(reorganise)
    report.moved, report.removed = len(plan.moved), len(plan.gone)
    report.moves = [(old_id, path) for old_id, path, _ in plan.moved]
    todo = plan.new + plan.changed
    paths = [p for p, _ in todo]
    batches = (engine or embed_image_files)(paths, model, batch_size=batch_size, workers=workers)
    with progress_bar(progress, total=len(paths), unit="img", desc="indexing") as bar:
        for vectors, positions, failures in batches:
            for position, reason, kind in failures:
                report.skip(paths[position], reason, kind)
                log.info("skipped %s", reason)
            if len(positions):
                rows = [(todo[p][0], _file_row(root, plan.root_folder, *todo[p])) for p in positions]
                added, updated = index._replace_files(vectors, rows)
                report.added += added
                report.updated += updated
            bar.update(len(positions) + len(failures))
    report.orphaned = {folder: index.store.root_count(root) for root, folder, _ in index.store.roots()
                       if not os.path.isdir(folder)}
    return report


def remove_under(store: Store, folder: str):
    """A change (for Index._write): remove every item whose file, or shard, is `folder` or under it."""
    under = partial(is_under, folder=folder)
    keys = store.keys_under(folder) + store.shard_keys(folder + "#", under) + \
        store.shard_keys(folder.rstrip(os.sep) + os.sep, under)
    _forget_shards(store, under)
    store.delete_keys(keys)
    store.drop_empty_roots()
    return len(keys), None, None, keys


def remove_missing_roots(store: Store):
    """A change (for Index._write): remove the items of every indexed folder, and shard, that no longer exists."""
    keys = []
    for _, folder, _ in store.roots():
        if not os.path.isdir(folder):
            keys += store.keys_under(folder)
    keys += [key for shard in store.shards() if _gone(shard) for key in store.shard_keys(shard + "#", _gone)]
    _forget_shards(store, _gone)
    store.delete_keys(keys)
    store.drop_empty_roots()
    return len(keys), None, None, keys


def remove_gone_shards(store: Store, folder: str):
    """A change (for Index._write): remove the items of the recorded shards directly in `folder` whose file is
    gone (one look a recorded shard, then a range of ids each)."""
    gone = [shard for shard in store.shard_records() if os.path.dirname(shard) == folder and _gone(shard)]
    keys = [key for shard in gone for key in store.shard_keys(shard + "#", lambda _: True)]
    store.forget_shards(gone)
    store.delete_keys(keys)
    return len(keys), None, None, keys


def is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _gone(shard: str) -> bool:
    return not os.path.isfile(shard)


def _forget_shards(store: Store, chosen) -> None:
    """Inside a transaction: forget the recorded sizes and mtimes of the shards `chosen(shard path)` picks
    (so indexing such a shard again reads it anew)."""
    store.forget_shards([shard for shard in store.shard_records() if chosen(shard)])
