"""The folder side of `Index` (a mixin): keeping an index in step with folders of images, caption tables,
webdataset shards and embedding folders, and removing what left them. The work is in clipkit/index/sync.py,
shards.py, ingest.py and captions.py; these methods hold the writer lock and record the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Container, Iterable, Sequence

import numpy as np

import clipkit.index.sync as sync
from clipkit._progress import progress_bar
from clipkit.errors import ModelMismatchError
from clipkit.index.captions import (CaptionMover, CaptionReport, CaptionTable, caption_table_for, captions_of,
                                    captions_of_images, drop_orphans, image_of, remove_with_captions,
                                    settle_caption_debt, sync_index_captions, writable_captions)
from clipkit.index.store import Store
from clipkit.index.vectors import prepare_items

if TYPE_CHECKING:
    from clipkit.data.urls import UrlTable

EXCLUDES = "excludes"  # store info: folder -> the exclude globs it was last synced with

log = logging.getLogger("clipkit.index")


class FolderSync:
    """Folder, table, shard and embedding-folder sync for `Index` (which provides store, writer, _write, ...)."""

    # -- folders ----------------------------------------------------------------------------

    def plan_folder(self, folder: str | os.PathLike, *, exclude: Sequence[str] | None = None,
                    shard: tuple[int, int] | None = None,
                    include: Container[str] | None = None) -> "sync.SyncPlan":
        """What `sync_folder` would do, without changing anything (`clipkit index --check`); see
        `clipkit.index.sync.plan_folder`."""
        with self._lock:
            exclude = self._excludes_for(folder, exclude, remember=False)
            return sync.plan_folder(self.store, folder, exclude=exclude, shard=shard, include=include)

    def excludes(self, folder: str | os.PathLike) -> list[str]:
        """The exclude globs remembered for `folder` (those its last `sync_folder` was given)."""
        return list(self.store.info(EXCLUDES, {}).get(str(Path(folder).resolve()), []))

    def _excludes_for(self, folder: str | os.PathLike, exclude: Sequence[str] | None,
                      remember: bool = True) -> list[str]:
        """The globs `folder` is synced with: `exclude`, else those remembered for it, else, for a folder the
        index holds no file of yet, those of a folder that is gone and whose files it holds now (moved or renamed:
        its globs move with it, before anything they leave out is embedded; found by planning the folder once
        more). `remember` (under the writer lock): what is chosen is remembered for `folder`."""
        if exclude is not None:
            if remember:
                self._remember_excludes(folder, exclude)
            return list(exclude)
        remembered = self.excludes(folder)
        if remembered or self.store.id_page(str(Path(folder).resolve()).rstrip(os.sep) + os.sep, limit=1):
            return remembered  # (a folder the index holds files of: its globs were settled when it was first synced)
        gone = [old for old in self.store.info(EXCLUDES, {})  # (whose items could have moved here)
                if not os.path.isdir(old) and self.store.count_with_prefix(old.rstrip(os.sep) + os.sep)]
        if not gone:
            return []
        with self.plan_folder(folder, exclude=[]) as plan:
            for old_id, _, _ in plan.moved:
                source = next((old for old in gone if isinstance(old_id, str) and sync.is_under(old_id, old)), None)
                if source is not None:
                    moved = self.store.info(EXCLUDES)[source]
                    if remember:
                        self._remember_excludes(source, [])
                        self._remember_excludes(folder, moved)
                    return list(moved)
        return []

    def _remember_excludes(self, folder: str | os.PathLike, exclude: Sequence[str]) -> None:
        """Under the writer lock: `exclude` is what `folder` leaves out from now on ([]: nothing)."""
        key, saved = str(Path(folder).resolve()), self.store.info(EXCLUDES, {})
        if saved.get(key, []) != list(exclude):
            with self.store.transaction(bump=False):
                self.store.set_info(EXCLUDES, {**{k: v for k, v in saved.items() if k != key},
                                               **({key: list(exclude)} if exclude else {})})

    def sync_folder(self, folder: str | os.PathLike, model=None, *, batch_size: int = 64,
                    workers: int | None = None, progress: bool | None = None,
                    exclude: Sequence[str] | None = None, shard: tuple[int, int] | None = None,
                    captions: "CaptionTable | str | os.PathLike | None" = None,
                    listed_only: bool = False, engine=None) -> "sync.SyncReport":
        """Bring the index up to date with the images under `folder` (see `clipkit.index.sync`).

        New files are embedded, changed ones (size or mtime) re-embedded, deleted ones removed, renamed
        or moved ones (also a whole folder moved elsewhere) re-pointed without re-embedding, unchanged
        ones left alone. Each batch is committed on its own, so an interrupted run keeps what it finished
        and running it again resumes. Ids are absolute file paths; one file is never indexed twice. The
        writer lock is held for the whole run. `exclude`: globs of files and folders to leave out, remembered
        for the folder (later runs without `exclude` leave out the same; `[]` forgets them).

        Captions come from `NAME.txt` beside each image, or from `captions`, a caption table (CSV / JSONL
        path or `CaptionTable`) for the images it lists; the table is remembered for the folder, so later
        runs without it keep using it. `listed_only`: index only the images the caption table lists (listed
        files that are missing or outside the folder are reported as skipped). `engine`: where images are
        embedded (None: this process; `clipkit.encode_ray.RayEngine(...)`: a Ray cluster).
        """
        if self.path is not None and sync.is_under(str(Path(folder).resolve()), str(self.path.resolve())):
            raise ValueError(f"{folder} is this index's own folder (or inside it), not a folder of images: give the "
                             "folder the images are in")
        model = self._writing_model(model)
        with self.writer(on_wait=log.warning):
            self._writable_captions()  # a read-only caption collection is refused before any image is indexed
            self._record_model(model)
            exclude = self._excludes_for(folder, exclude)
            table = caption_table_for(self, Path(folder).resolve(), captions)
            if listed_only and table is None:
                raise ValueError("listed_only needs a caption table (captions=)")
            with contextlib.ExitStack() as stack:
                rows = stack.enter_context(table.read()) if table is not None else None  # the captions, listed files
                problems = table.listed_files(rows)[1] if listed_only else []
                mover = CaptionMover(self, Path(folder).resolve(), table)  # (captions go with moved images)
                dropped = CaptionReport()  # (the captions of deleted files, gone with them)
                with self.store.recording_deletions() as gone:  # (files removed, or moved to other ids)
                    report = sync.sync_folder(self, folder, model, batch_size=batch_size, workers=workers,
                                              progress=progress, exclude=exclude, shard=shard,
                                              include=rows if listed_only else None, engine=engine, on_moved=mover,
                                              on_gone=partial(remove_with_captions, self, report=dropped))
                report.excluded = list(exclude)
                for path, reason in problems:
                    report.skip(path, reason, "missing")
                if mover.table is not table:  # a folder indexed with a caption table, moved: the table moved too
                    rows = stack.enter_context(mover.table.read())
                report.captions = self._sync_captions(str(Path(folder).resolve()).rstrip(os.sep) + os.sep, model,
                                                      rows, gone=gone, carried=mover.carried)
                if report.captions is not None:
                    report.captions.removed += dropped.removed
                mover.sweep(report.captions)
        self.last_sync = report
        return report

    def sync_shards(self, urls: str | Sequence[str], model=None, *, batch_size: int = 64,
                    progress: bool | None = None, engine=None, chunk: int | None = None,
                    shard: tuple[int, int] | None = None) -> "sync.SyncReport":
        """Bring the index up to date with webdataset shards (uncompressed .tar files on disk; brace patterns
        such as `shards/{000000..000009}.tar`), indexed in place: see `clipkit.index.shards`. Their
        captions (`txt` members) go to the caption collection. Incremental and resumable like `sync_folder`;
        `engine` as there (its workers must see the shards' files), given the new samples of `chunk` or more
        of them at a time (default: the engine's `items_per_call`, else 50,000; many shards, one call: a Ray
        actor pool starts once a call). `shard=(i, n)`: only the shard files of part i of n (every n-th from the
        i-th, in name order), for indexing a shard set from n processes into n indexes merged later
        (`Index.merge`). A folder stands for the .tar shards in it: those recorded there whose file is gone are
        removed, as `sync_folder` removes deleted files (after the others are read, so that a shard renamed
        inside the folder keeps its items)."""
        from clipkit.index.shards import local_folders, sync_shards

        model = self._writing_model(model)
        captions = CaptionReport()

        def shard_captions(path: str, table: dict[str, list[str]] | None) -> None:
            if table is None:  # an unchanged shard: its captions are kept
                captions.kept += self.captions.count_with_prefix(path + "#") if self.captions is not None else 0
                return
            done = self._sync_captions(path + "#", model, table, files=False)
            if done is not None:
                captions.added, captions.removed = captions.added + done.added, captions.removed + done.removed
                captions.kept += done.kept

        with self.writer(on_wait=log.warning):
            self._writable_captions()  # a read-only caption collection is refused before any image is indexed
            self._record_model(model)
            report = sync_shards(self, urls, model, batch_size=batch_size, progress=progress, on_shard=shard_captions,
                                 engine=engine, chunk=chunk, part=shard)
            for folder in local_folders(urls):
                gone = sync.gone_shards_in(folder, self.store)
                report.removed += self._remove_pages(partial(sync.keys_of_shards, gone),
                                                     partial(sync.gone_shard_emptied, folder),
                                                     [shard + "#" for shard in gone], captions)
        captions.moved, captions.kept = report.captions_moved, max(captions.kept - report.captions_moved, 0)
        report.captions = captions if self._captions is not None else None
        self.last_sync = report
        return report

    def sync_embeddings(self, folder: str | os.PathLike, model=None, *, chunk: int = 50_000,
                        progress: bool | None = None) -> "sync.SyncReport":
        """Bring the index up to date with a folder of precomputed embeddings in clip-retrieval's layout
        (img_emb/, text_emb/, metadata/): see `clipkit.index.ingest`. `model`: the model that made them,
        recorded so that text queries work (its dimension must match); without one, the model a clipkit export
        records (its export.json) is recorded. Incremental and resumable."""
        from clipkit.index.ingest import check_exported_model, exported_model, sync_embeddings

        if model is not None:
            model = self._writing_model(model)
        exported = exported_model(folder)
        with self.writer(on_wait=log.warning):
            self._writable_captions()  # a read-only caption collection is refused before anything is added
            check_exported_model(folder, exported, model.info if model is not None else self.model_info)
            if model is not None:
                self._record_model(model)
            elif self.model_info is None and exported is not None:
                self._record_model_info(exported)
            report = sync_embeddings(self, folder, model, chunk=chunk, progress=progress)
        self.last_sync = report
        return report

    def export(self, out: str | os.PathLike, *, part_size: int = 100_000, progress: bool | None = None) -> dict:
        """Write this index into folder `out` in clip-retrieval's layout (img_emb/, text_emb/, metadata/), which
        autofaiss, clip-retrieval's back end and `sync_embeddings` read: see `clipkit.index.export`."""
        from clipkit.index.export import export_embeddings

        return export_embeddings(self, out, part_size=part_size, progress=progress)

    def sync_urls(self, table: "UrlTable | str | os.PathLike", model=None, *, batch_size: int = 64,
                  workers: int | None = None, progress: bool | None = None, engine=None,
                  shard: tuple[int, int] | None = None) -> "sync.SyncReport":
        """Add the images of a table of URLs (parquet, CSV, JSONL with a `url` column and optionally a
        `caption` one, or a .txt file of URLs; `clipkit.data.urls.UrlTable`), fetched and embedded here or on
        `engine` (a Ray cluster): see `clipkit.index.urls`. Ids are the URLs; incremental and resumable.
        `shard=(i, n)`: only the URLs of part i of n (by a hash of the URL), as `sync_folder`'s."""
        from clipkit.data.urls import UrlTable
        from clipkit.index.urls import sync_urls

        table = table if isinstance(table, UrlTable) else UrlTable.of(table)
        model = self._writing_model(model)
        with self.writer(on_wait=log.warning):
            self._writable_captions()  # a read-only caption collection is refused before any image is fetched
            self._record_model(model)
            report = sync_urls(self, table, model, batch_size=batch_size, workers=workers, progress=progress,
                               engine=engine, part=shard)
        self.last_sync = report
        return report

    def _writing_model(self, model):
        """The model to add embeddings with (`model`, else the one the index holds, else the one it records: a
        `clipkit.recorded.RecordedModel`, which clipkit.models loads when something is to be embedded), checked
        against the index."""
        from clipkit.recorded import RecordedModel

        model = model if model is not None else self.model
        if model is None and self.model_info:
            model = RecordedModel(self.model_info)
        if not isinstance(model, RecordedModel):  # (one recorded is taken as is: torch is not even imported)
            from clipkit.encode import as_model

            model = as_model(model)
        self.check_model(model, writing=True)
        return model

    def _record_model(self, model) -> None:
        self._record_model_info(model.info)
        if self.model is None:
            self.model = model

    def _record_model_info(self, info: dict) -> None:
        """Record the model that made this index's embeddings (once: the first one stays, except that the same
        weights given from another file or folder, the recorded one gone, are recorded there: weights moved)."""
        from clipkit.recorded import weights_moved

        recorded = self.model_info
        if recorded is None:
            if info.get("dim", self.dim) != self.dim:
                raise ModelMismatchError(f"model {info.get('name')!r} makes {info.get('dim')}-d embeddings but the "
                                         f"index holds {self.dim}-d ones")
        elif not weights_moved(recorded, info):
            return
        with self.store.transaction(bump=False):
            self.store.set_info("model", info)

    def sync_table(self, table: "CaptionTable | str | os.PathLike", model=None, **options) -> "sync.SyncReport":
        """Index the images a caption table (CSV / JSONL / parquet) lists, with its captions (an image without
        any takes its NAME.txt): the images under the table's folder (or its `root`) that it names; listed files
        that are missing or lie outside that folder are reported as skipped. A table of the image column alone,
        or a .txt list of image paths (one a line), lists images without captions. Incremental like
        `sync_folder` (which takes the same options): the images of the folder are the ones it lists, so a
        line taken out of it takes its image out of the index."""
        table = table if isinstance(table, CaptionTable) else CaptionTable.of(table)
        return self.sync_folder(table.folder, model, captions=table, listed_only=True, **options)

    @property
    def captions(self) -> "FolderSync | None":
        """The caption collection (an Index of caption embeddings by the same model, items `IMAGE_ID#LINE`
        with their `caption`, `image_id` and `path`), or None when no caption was ever indexed."""
        return captions_of(self)

    def _sync_captions(self, prefix: str, model, table=None, files: bool = True,
                       gone: Iterable = (), carried: int = 0) -> "CaptionReport | None":
        return sync_index_captions(self, prefix, model, table, files, gone, carried)

    def _writable_captions(self) -> "FolderSync | None | bool":
        return writable_captions(self)

    def roots(self) -> list[dict]:
        """The folders this index covers: {'path', 'items', 'exists', 'exclude' (its remembered globs)} each."""
        with self._lock:
            return [{"path": path, "items": count, "exists": os.path.isdir(path), "exclude": self.excludes(path)}
                    for _, path, count in self.store.roots(counts=True)]

    def remove_folder(self, folder: str | os.PathLike, progress: bool | None = None) -> int:
        """Remove every item whose file (or shard) is `folder` or under it (which may no longer exist); how many
        went."""
        target = os.path.abspath(folder)
        return self._remove_pages(partial(sync.keys_under, target), partial(sync.shard_under, target),
                                  [target.rstrip(os.sep) + os.sep, target + "#"], progress=progress)

    def prune_missing(self, progress: bool | None = None) -> int:
        """Remove the items of every indexed folder, and shard, that no longer exists; how many went."""
        with self._lock:
            folders, shards = [folder for _, folder in sync.missing_roots(self.store)], sync.gone_shards(self.store)
        return self._remove_pages(partial(sync.keys_missing, shards), sync.shard_gone,
                                  [f.rstrip(os.sep) + os.sep for f in folders] + [s + "#" for s in shards],
                                  progress=progress)

    def _captioned(self, image_ids: list) -> list:
        """Those of `image_ids` that have captions in the caption collection."""
        collection = captions_of(self)
        have = {image_of(c) for c in captions_of_images(collection, image_ids)} if collection else set()
        return [i for i in image_ids if str(i) in have]

    def _settle_captions(self) -> None:
        """Remove the captions a removal killed between its images and their captions left behind."""
        collection = writable_captions(self) if self.store.caption_debt(1) else None
        if collection:
            settle_caption_debt(self, collection)

    def _remove_with_captions(self, change, also: Sequence = ()) -> Any:
        """`self._write(change)`, a removal, then the captions of the items removed and of the image ids `also`
        (clipkit/index/captions.py)."""
        return remove_with_captions(self, change, also=also)

    def _remove_pages(self, keys_of, forget, under: Sequence[str], captions: "CaptionReport | None" = None,
                      progress: bool | None = False) -> int:
        """Remove the items whose keys `keys_of(store)` gives, with their captions, `sync.REMOVE_CHUNK` a
        transaction (`sync.remove_page`: a stopped run keeps what it removed, and the same call again removes
        the rest), then the captions left under the caption id prefixes `under` without their image (a kill
        between a page's images and its captions); how many items went."""
        removed = 0
        with progress_bar(progress, unit="item", desc="removing", delay=2) as bar:
            while True:
                count = remove_with_captions(self, partial(sync.remove_page, keys_of, forget), captions)
                removed += count
                bar.update(count)
                if count < sync.REMOVE_CHUNK:
                    break
        drop_orphans(self, under, captions)
        return removed

    def _replace_files(self, vectors: np.ndarray, rows: list[tuple[str, tuple]]) -> tuple[int, int]:
        """One transaction: drop the old rows of these files (ids), add their new embeddings."""
        ids = [item_id for item_id, _ in rows]
        vectors = prepare_items(vectors, self.dim, self.vectors_per_item)

        def change(store: Store):
            old = store.keys_for(ids)
            store.delete_keys(list(old.values()))
            keys = store.insert(vectors, ids, [row for _, row in rows])
            return (len(ids) - len(old), len(old)), keys, vectors, list(old.values())

        return self._write(change)
