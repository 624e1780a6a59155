"""Indexing a table of image URLs (`clipkit index urls.parquet`, img2dataset's input): each image is fetched
(clipkit.data.images.ImageURL: a deadline and a size cap a fetch), embedded here or on a Ray cluster
(`engine`), and committed batch by batch with its URL as id and metadata (`url`, `caption`); captions go
to the caption collection. The table is read a chunk at a time, so memory does not grow with it.

Incremental and resumable: URLs already in the index are not fetched again, so a run stopped at any
moment and run again fetches only what was not committed, and a table that grew adds only its new rows.
URLs that failed (an HTTP error, a timeout, not an image) are skipped with their reason and tried again
on the next run. Rows removed from the table stay in the index (`clipkit remove` takes them out).
"""

from __future__ import annotations

import logging

import numpy as np

from clipkit._progress import progress_bar
from clipkit.data.images import ImageURL, is_url
from clipkit.data.urls import UrlTable
from clipkit.index.ingest import add_captions
from clipkit.index.sync import SyncReport, shard_of

log = logging.getLogger("clipkit.index")

CHUNK_ROWS = 50_000  # table rows planned at a time


def sync_urls(index, table: UrlTable, model, *, batch_size: int = 64, workers: int | None = None,
              progress: bool | None = None, engine=None, chunk: int | None = None,
              part: tuple[int, int] | None = None) -> SyncReport:
    """Add the images of `table` that `index` (whose writer lock the caller holds) lacks; see the module.
    `chunk`: table rows planned and handed to the engine at a time (default: the engine's `items_per_call`,
    else CHUNK_ROWS). `part=(i, n)`: only the rows whose URL falls in part i of n (by a hash of the URL)."""
    from clipkit.encode import embed_image_files

    chunk = chunk or getattr(engine, "items_per_call", None) or CHUNK_ROWS
    report = SyncReport()
    with progress_bar(progress, total=table.count(), unit="img", desc="indexing") as bar:
        for rows in table.chunks(chunk):
            mine = rows if part is None else [row for row in rows if shard_of(str(row[0]), part[1]) == part[0]]
            todo, more = _new_rows(index, mine, report)
            bar.update(len(rows) - len(todo))
            items = [ImageURL(url) for url, _ in todo]
            for vectors, positions, failures in (engine or embed_image_files)(items, model, batch_size=batch_size,
                                                                              workers=workers):
                for position, reason, kind in failures:
                    report.skip(todo[position][0], reason, kind)
                    log.info("skipped %s", reason)
                if len(positions):
                    _commit(index, vectors, [todo[p] for p in positions], model)
                    report.added += len(positions)
                bar.update(len(positions) + len(failures))
            _more_captions(index, more, model)
    return report


def _new_rows(index, rows: list[tuple], report: SyncReport) -> tuple[list, list]:
    """(the (url, caption) rows of a chunk to fetch: http(s) URLs not yet in the index, each once; the rows
    whose caption may be missing from an image: rows repeating a URL with a caption (a URL's first row gives
    the item its `caption`), and first rows whose caption a run stopped before storing)."""
    valid, seen, more = [], set(), []
    for url, caption in rows:
        if not is_url(url):
            report.skip(str(url), f"{url!r} is not an http(s) URL", "not a URL")
        elif url in seen:
            report.unchanged += 1  # a row repeated in the table: one item, its caption one more
            more += [(url, caption)] if caption else []
        else:
            seen.add(url)
            valid.append((url, caption))
    present = index.find([url for url, _ in valid])
    todo = [(url, caption) for url, caption in valid if url not in present]
    report.unchanged += len(valid) - len(todo)
    firsts = [(url, caption) for url, caption in valid if url in present and caption]
    collection = index._writable_captions() if firsts else None  # (False: damaged; said once)
    stored = set(collection.find([f"{url}#0" for url, _ in firsts])) if collection else set()
    more += [(url, caption) for url, caption in firsts
             if caption != present[url].get("caption") or f"{url}#0" not in stored]
    return todo, more


def _more_captions(index, rows: list[tuple[str, str]], model) -> None:
    """The captions of `rows` whose image is in the index, each one it lacks (clipkit.index.ingest)."""
    if rows:
        present = index.find([url for url, _ in rows])
        rows = [(url, caption) for url, caption in rows if url in present]
        add_captions(index, [url for url, _ in rows], [caption for _, caption in rows], None, model)


def _commit(index, vectors: np.ndarray, rows: list[tuple[str, str | None]], model) -> None:
    """One embedded batch into the index (ids: the URLs) and its captions into the caption collection."""
    records = [{"url": url, **({"caption": caption} if caption else {})} for url, caption in rows]
    ids = [url for url, _ in rows]
    index.add(vectors, ids=ids, metadata=records)
    captioned = [(url, caption) for url, caption in rows if caption]
    add_captions(index, [url for url, _ in captioned], [caption for _, caption in captioned], None, model,
                 fresh=set(ids))
