"""Captions in the index: the lines of `NAME.txt` beside each indexed `NAME.jpg`, or the rows of a caption
table (CSV / JSONL: an image column and a caption column), embedded by the index's own model into a
caption collection (an `Index` of its own in the index folder's `captions/`), so that images can search
captions (image -> text) and texts can search captions (text -> text).

Caption items have ids `IMAGE_ID#LINE` and carry their text (`caption`), their image's id (`image_id`) and
path (`path`). Syncing compares each image's caption file with what is stored: unchanged captions are kept,
changed or new ones embedded, those of changed, moved or removed images dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from clipkit._io import batches
from clipkit.data.folder import caption_file, is_image_name, read_captions
from clipkit.errors import BrokenIndexError, first_line
from clipkit.index.store import is_index

if TYPE_CHECKING:
    from clipkit.data.tables import TableRows

log = logging.getLogger("clipkit.index")

CAPTIONS_DIR = "captions"
_HELD: dict["CaptionTable", "TableRows"] = {}  # the tables read for a block (`CaptionTable.held`)


@dataclass
class CaptionReport:
    added: int = 0  # embedded
    removed: int = 0
    kept: int = 0
    moved: int = 0  # carried with their image to its new id (a renamed or moved file), embeddings kept


@dataclass(frozen=True)
class CaptionTable:
    """A caption table: a CSV (with a header) or JSONL file, one row per caption (or a list of captions per
    JSONL row), image paths relative to `root` (default: the table's folder). A table of the image column
    alone, or a .txt file of image paths (one a line), lists images without captions."""

    path: str
    image_column: str = "image"
    caption_column: str = "caption"
    root: str | None = None

    @classmethod
    def of(cls, path: str | os.PathLike, image_column: str = "image", caption_column: str = "caption",
           root: str | os.PathLike | None = None) -> "CaptionTable":
        if not Path(path).is_file():
            raise FileNotFoundError(f"caption table not found: {path}")
        if not is_table(path):
            raise ValueError(f"{path}: a caption table is a .csv, .tsv, .jsonl or .parquet file, or a .txt list of "
                             "image files (one path a line)")
        return cls(os.path.abspath(path), image_column, caption_column,
                   os.path.abspath(root) if root is not None else None)

    @property
    def folder(self) -> str:
        """The folder its relative image paths start from."""
        return self.root or os.path.dirname(self.path)

    def read(self) -> "contextlib.AbstractContextManager[TableRows]":
        """Its rows by absolute image path (a `TableRows`: on disk, looked up by image), as a context: `with
        table.read() as rows`. Inside `held()`, the rows read there."""
        from clipkit.data.tables import read_table

        if self in _HELD:
            return contextlib.nullcontext(_HELD[self])
        return read_table(self.path, self.image_column, self.caption_column, self.folder, captions=False)

    @contextlib.contextmanager
    def held(self) -> "Iterator[TableRows]":
        """A block in which every `read()` of this table hands out the same rows, read once (the CLI checks a
        table before it touches the index, then indexes it: a million rows are read once, not twice)."""
        if self in _HELD:
            yield _HELD[self]
            return
        with self.read() as rows:
            _HELD[self] = rows
            try:
                yield rows
            finally:
                del _HELD[self]

    def listed_files(self, rows: "TableRows") -> tuple[int, list[tuple[str, str]]]:
        """(how many of the image files it lists exist under its folder, [(listed path, why it is not one of
        them)]); `rows`: the table, read."""
        folder = os.path.abspath(self.folder)
        inside, problems = 0, []
        for path in rows:
            if not path.startswith(folder.rstrip(os.sep) + os.sep):
                problems.append((path, f"{path}: listed in {self.path} but not under {folder}"))
            elif not os.path.isfile(path):
                problems.append((path, f"{path}: listed in {self.path} but not found"))
            else:
                inside += 1
        return inside, problems

    def to_json(self) -> dict:
        return asdict(self)


def is_table(path: str | os.PathLike) -> bool:
    """Whether a file is one a `CaptionTable` reads: by its suffix, and a .txt file when it lists image files
    (its first line names one, rather than a URL or a caption)."""
    from clipkit.data.urls import first_line, table_suffix

    suffix = table_suffix(path)
    if suffix != ".txt":
        return suffix in TABLE_SUFFIXES
    first = first_line(path)
    return bool(first) and "://" not in first and is_image_name(first)


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".txt")  # .txt: image paths, no captions


def image_of(caption_id: str) -> str:
    """The id of a caption item's image (caption ids are `IMAGE_ID#LINE`)."""
    return caption_id.rpartition("#")[0]


def caption_line(caption_id: str) -> int:
    """The line of a caption item (`IMAGE_ID#LINE`; 0 where it is no number)."""
    line = caption_id.rpartition("#")[2]
    return int(line) if line.isdigit() else 0


def first_captions(collection, image_ids: list) -> dict:
    """image id -> the record of its first caption (`IMAGE_ID#0`) in the caption `collection` (None: no
    captions), for those of `image_ids` that have one."""
    if collection is None or not image_ids:
        return {}
    found = collection.find([f"{i}#0" for i in image_ids])
    return {record["image_id"]: record for record in found.values() if "image_id" in record}


def wanted_captions(image_ids: list[str], table=None, files: bool = True) -> dict[str, dict]:
    """caption id -> its metadata, for every caption of every image: its rows in `table` (a caption table,
    read: a `TableRows`, or a dict of image id -> captions) where they give captions, else the lines of its
    caption file. `files`: the image ids are file paths (not shard samples), each caption's `path`."""
    from clipkit.data.tables import TableRows

    wanted, given = {}, table.get_many(image_ids) if isinstance(table, TableRows) else table or {}
    for image_id in image_ids:
        texts = given.get(image_id)
        if not texts:
            texts = read_captions(image_id) if files else []
        for line, text in enumerate(texts):
            wanted[f"{image_id}#{line}"] = {"caption": text, "image_id": image_id, "path": image_id if files else None}
    return wanted


def sync_captions(index, collection, prefix: str, model, table=None, files: bool = True, gone: Iterable = (),
                  batch_size: int = 256, page: int = 10_000) -> CaptionReport:
    """Bring `collection` (`index`'s caption Index) in step with the captions of the images whose ids start
    with `prefix` (with `files` only image files, never the samples of shards that lie inside a synced
    folder): their `table` rows (a `TableRows` or a dict), else their caption files. Captions whose image is
    not indexed go: those of `gone`, and those under `prefix`. Both are read `page` ids at a time, in id
    order, so what is held and embedded at once is bounded by that, not by the folder's size."""
    report = CaptionReport()
    for images in batches(gone, page):
        _drop_unindexed(index, collection, captions_of_images(collection, images), report)
    for captions in id_pages(collection, prefix, page=page):
        _drop_unindexed(index, collection, captions, report)
    for images in id_pages(index, prefix, files_only=files, page=page):
        _sync_caption_chunk(collection, images, texts_of_images(collection, images), model, table, files,
                            batch_size, report)
    return report


def id_pages(index, prefix: str, files_only: bool = False, page: int = 10_000) -> Iterator[list[str]]:
    """The text ids of `index` that start with `prefix`, `page` at a time, in id order (`files_only`: of
    image files alone); changes between pages are taken as they come."""
    after = None
    while True:
        with index._lock:
            ids = index.store.id_page(prefix, after, page, files_only)
        if not ids:
            return
        yield ids
        after = ids[-1]


def _drop_unindexed(index, collection, captions: list[str], report: CaptionReport) -> None:
    """Remove those of `captions` whose image is not in `index` (left by a run stopped between the two stores,
    or by a sync that removed the image)."""
    images = sorted({image_of(c) for c in captions})
    with index._lock:
        indexed = {str(i) for i in index.store.keys_for(images)}
    drop = [c for c in captions if image_of(c) not in indexed]
    if drop:
        collection.remove(drop)
        report.removed += len(drop)


def _sync_caption_chunk(collection, image_ids: list[str], texts: dict[str, str | None], model, table, files: bool,
                        batch_size: int, report: CaptionReport) -> None:
    """`sync_captions` for some of the images: `texts`, caption id -> text of those stored for them."""
    wanted = wanted_captions(image_ids, table, files)
    drop = [i for i, text in texts.items() if i not in wanted or wanted[i]["caption"] != text]
    add = [i for i, meta in wanted.items() if texts.get(i, object()) != meta["caption"]]
    report.removed, report.kept = report.removed + len(drop), report.kept + len(texts) - len(drop)
    if drop:
        collection.remove(drop)
    if add:  # (only with captions to embed: it imports torch)
        from clipkit.encode import encode_texts
    for start in range(0, len(add), batch_size):
        batch = add[start:start + batch_size]
        vectors = encode_texts([wanted[i]["caption"] for i in batch], model, batch_size)
        collection.add(vectors, ids=batch, metadata=[wanted[i] for i in batch])
        report.added += len(batch)


# -- an index's caption collection (what `Index` delegates to) ---------------------------------------------


def captions_of(index):
    """`index.captions`: its caption collection, loaded on first use, or None when none was ever made."""
    if index._captions is None and index.path is not None and is_index(index.path / CAPTIONS_DIR):
        index._captions = type(index).load(index.path / CAPTIONS_DIR, model=index.model)
    return index._captions


def writable_captions(index):
    """The caption collection, for a change: None when there is none; False when it cannot be opened (a
    warning says so: images are indexed and removed, captions are left as they are until that folder is
    deleted and the index updated again). One on read-only storage is refused before anything changes."""
    if index._captions_broken:
        return False
    try:
        collection = captions_of(index)
    except (BrokenIndexError, PermissionError) as exc:
        index._captions_broken = True
        log.warning("the caption collection %s cannot be opened (%s): images are indexed and removed, their "
                    "captions are not; delete that folder and index again to rebuild it",
                    index.path / CAPTIONS_DIR, first_line(exc))
        return False
    if collection is not None:
        collection.store.require_writable()
    return collection


def new_captions(index, model):
    """A new, empty caption collection for `index` (saved beside it when it has a folder)."""
    collection = type(index)(index.dim, model=model, vectors_per_item=1)  # captions: one text vector each
    if index.path is not None:
        collection.save(index.path / CAPTIONS_DIR)
    index._captions = collection
    return collection


def carry_captions(collection, moves: Sequence[tuple], batch: int = 10_000) -> list[str]:
    """Copy the captions of images that moved to other ids ((old id, new id) each: a renamed or moved file)
    to the new ids, embeddings and all, so that no caption sync embeds them again (`move_with_captions`).
    Returns the ids of the copies made (those already there are left as they are)."""
    made = []
    for start in range(0, len(moves), batch):
        new_of = {str(old): new for old, new in moves[start:start + batch]}
        records = collection.get(captions_of_images(collection, [old for old, _ in moves[start:start + batch]]))
        targets = {f"{new_of[image_of(r['id'])]}#{r['id'].rpartition('#')[2]}": r for r in records}
        there = collection.find(list(targets))
        targets = {target: r for target, r in targets.items() if target not in there}
        if targets:
            vectors = collection.embeddings([r["id"] for r in targets.values()])
            collection.add(vectors, ids=list(targets), metadata=[
                {**{k: v for k, v in r.items() if k not in ("id", "key")}, "image_id": new_of[image_of(r["id"])],
                 "path": new_of[image_of(r["id"])]} for r in targets.values()])
            made += targets
    return made


def sync_index_captions(index, prefix: str, model, table=None, files: bool = True, gone: Iterable = (),
                        carried: int = 0, page: int = 10_000) -> CaptionReport | None:
    """The captions of `index`'s images whose ids start with `prefix` (a folder's, a shard's), in step with
    their sources: their `table` rows (a caption table, a shard's txt members), else NAME.txt beside NAME.jpg.
    Folders also drop the captions of `gone` (the ids the folder's sync removed or moved to other ids) and
    of images under the prefix no longer indexed; a shard's items never move, and removing items drops
    their captions, so a shard's sync reads only its own ids. The work is the folder's, not the index's.
    `carried`: how many captions went with moved images (`CaptionMover`), counted as moved, not kept."""
    collection = writable_captions(index)
    if collection is False:
        return None
    if collection is None:
        if not table and not any(os.path.isfile(caption_file(i)) for ids in id_pages(index, prefix, files) for i in ids):
            return None
        collection = new_captions(index, model)
    report = sync_captions(index, collection, prefix, model, table, files, gone, page=page)
    report.moved, report.kept = carried, max(report.kept - carried, 0)  # (counted by the sync as kept)
    return report


class CaptionMover:
    """What a folder's sync calls with each chunk of its moved files ((old id, new id) each) and the change
    that moves them: the change made with their captions (`move_with_captions`), and, for a folder without a
    caption table, the one remembered for the folder they came from (`moved_caption_table`) found. `table`:
    the folder's table (given, remembered or found); `carried`: how many captions went with their images."""

    def __init__(self, index, folder: Path, table: CaptionTable | None):
        from clipkit.index.sync import missing_roots

        self.index, self.folder, self.table, self.carried, self.moved = index, folder, table, 0, False
        self._gone = [root for _, root in missing_roots(index.store)]  # (where moves come from)

    def __call__(self, moves: list[tuple], change: Callable) -> None:
        if self.table is None:
            self.table = moved_caption_table(self.index, self.folder, moves)
        self.carried += move_with_captions(self.index, moves, change)
        self.moved = True

    def sweep(self, report: CaptionReport | None) -> None:
        """After the moves, drop the captions left without an image under the indexed folders that are gone:
        the copies of a chunk whose run was killed before it committed, when the folder moved on again before
        the next run (the old captions went with each chunk, so usually there is nothing to read)."""
        if self.moved:
            drop_orphans(self.index, [root.rstrip(os.sep) + os.sep for root in self._gone], report)


def drop_orphans(index, prefixes: Iterable[str], report: CaptionReport | None = None) -> None:
    """Drop the captions whose ids start with one of `prefixes` and whose image is not indexed, read a page at
    a time (after a removal or a move, usually none: those a kill -9 left between the images' transaction and
    their captions')."""
    collection = writable_captions(index)
    for prefix in prefixes if collection else ():
        for captions in id_pages(collection, prefix):
            _drop_unindexed(index, collection, captions, report or CaptionReport())


def move_with_captions(index, moves: list[tuple], change: Callable) -> int:
    """`index._write(change)`, a change that moves images to other ids ((old id, new id) each), with their
    captions: copied to the new ids before it (`carry_captions`), the old ones removed after it
    (`remove_with_captions`), so that a run stopped at any point loses none (a change that fails takes its
    copies back; a run killed in between finds them there when it runs again). How many were carried."""
    collection = writable_captions(index)
    copies = carry_captions(collection, moves) if collection else []

    def undo() -> None:  # (the change failed: the copies go, unless it committed, its images now at the new ids)
        if copies and index.store.keys_for([moves[0][0]]):
            collection.remove(copies)

    remove_with_captions(index, change, undo=undo)
    return len(copies)


def captions_of_images(collection, image_ids: Sequence) -> list[str]:
    """The caption ids of these images: a range over the caption ids for each (`IMAGE_ID#LINE`), hundreds to
    a statement."""
    return list(texts_of_images(collection, image_ids, texts=False))


def texts_of_images(collection, image_ids: Sequence, texts: bool = True) -> dict[str, str | None]:
    """caption id -> its text (`texts`; else None), for every caption of these images (`captions_of_images`)."""
    images = {str(i) for i in image_ids}
    with collection._lock:
        found = collection.store.ids_with_prefixes([f"{image}#" for image in images], captions=texts)
    pairs = found if texts else ((c, None) for c in found)
    return {c: text for c, text in pairs if image_of(c) in images}


def caption_table_for(index, folder: Path, captions) -> CaptionTable | None:
    """The caption table for `folder`: `captions` (then remembered for the folder), else the one remembered
    for it (None when its file is gone: NAME.txt files serve again), else None."""
    tables = index.store.info("caption_tables", {})
    if captions is not None:
        table = captions if isinstance(captions, CaptionTable) else CaptionTable.of(captions)
        if tables.get(str(folder)) != table.to_json():
            with index.store.transaction(bump=False):
                index.store.set_info("caption_tables", {**tables, str(folder): table.to_json()})
    elif str(folder) in tables:
        table = CaptionTable(**tables[str(folder)])
        if not os.path.isfile(table.path):
            log.warning("the caption table %s of %s is gone: its captions give way to NAME.txt files",
                        table.path, folder)
            return None
    else:
        return None
    return table


def moved_caption_table(index, folder: Path, moves: Sequence[tuple]) -> CaptionTable | None:
    """The caption table remembered for the folder that `folder`'s moved files ((old id, new id) each) came
    from, once that folder is gone (renamed or moved): its paths inside the old folder re-pointed into
    `folder`, and remembered for `folder` from now on. None when there is none."""
    from clipkit.index.sync import is_under

    tables = index.store.info("caption_tables", {})
    for old_folder, saved in tables.items():
        old, new = next(((o, n) for o, n in moves if isinstance(o, str) and is_under(o, old_folder)), (None, None))
        if old is None or os.path.isdir(old_folder):
            continue
        relative = old[len(old_folder.rstrip(os.sep)):]  # (from the separator on)
        new_folder = new[:-len(relative)] if new.endswith(relative) else str(folder)

        def moved(path: str | None) -> str | None:
            inside = path is not None and is_under(path, old_folder)
            return new_folder + path[len(old_folder.rstrip(os.sep)):] if inside else path

        table = CaptionTable(**{**saved, "path": moved(saved["path"]), "root": moved(saved.get("root"))})
        if os.path.isfile(table.path):
            with index.store.transaction(bump=False):
                index.store.set_info("caption_tables", {**{k: v for k, v in tables.items() if k != old_folder},
                                                        str(folder): table.to_json()})
            return table
    return None


def remove_with_captions(index, change, report: CaptionReport | None = None, undo: Callable | None = None,
                         also: Sequence = ()):
    """`index._write(change)`, a removal, then the captions whose image went with it, and those of the image
    ids `also` (read after the change, which may fill it), counted in `report`; a caption collection that
    cannot be changed is found out before anything is removed. `undo()`: called if the change fails (it
    committed nothing)."""
    collection = writable_captions(index)

    def owing(store):  # (the images' ids recorded in their transaction: a kill before their captions go
        result = change(store)  # leaves the next writer the list)
        store.owe_captions(itertools.chain(gone, also))
        return result

    try:
        with index.store.recording_deletions() as gone:
            removed = index._write(owing if collection else change)
    except BaseException:
        if undo is not None:
            undo()
        raise
    if collection:
        settle_caption_debt(index, collection, report)  # (and what an earlier removal, killed, left)
    return removed


def settle_caption_debt(index, collection, report: CaptionReport | None = None) -> None:
    """Remove the captions of the images removals recorded in the image store as owing theirs (this one's, or
    those of one killed before it got to them), unless the image is back under its id; counted in `report`.
    (A caption's id: its image's id as text, '#', a line.)"""
    while owed := index.store.caption_debt():
        present = index.store.keys_for(owed)
        orphans = captions_of_images(collection, [i for i in owed if i not in present])
        if orphans:
            collection.remove(orphans)
        index.store.settle_captions(owed)
        if report is not None:
            report.removed += len(orphans)
