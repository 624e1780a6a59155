"""An index out, in clip-retrieval's layout: what `clipkit index EMB_DIR` reads (`clipkit.index.ingest`), and
what autofaiss, clip-retrieval's back end and embedding_reader read.

    OUT/img_emb/img_emb_{i}.npy           float16 image embeddings, `part_size` rows a part
    OUT/text_emb/text_emb_{i}.npy         the first caption's embedding of each row (zeros without one), when
                                          the index holds captions
    OUT/metadata/metadata_{i}.parquet     id, image_path, url, caption (where known)
    OUT/captions/captions_{i}.parquet     the further captions of part i's images (image_id, line, caption) and
    OUT/captions/text_emb_{i}.npy         their embeddings (float16): clipkit's own, which `clipkit index`
                                          reads back; clip-retrieval's readers never look there
    OUT/export.json                       what was exported (index, generation, rows, part size, the model
                                          that made the embeddings), and whether all of it is written
    OUT/writer.lock                       held while an export writes there: one at a time

`id` carries the item's id (integers stay integers when every id is one; where ids of both kinds are mixed,
`id_is_integer` says which), so that reading the folder back gives the same ids. The items stream in key order from one committed state of the index (one sequential
pass over its vector files), so memory is bounded by one part. Each file is written under a temporary name
and renamed into place, a part's img_emb file last (readers find parts by it). A stopped export run again
over the same unchanged index goes on from the first part it lacks (and deletes the part it was writing).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from clipkit._progress import progress_bar
from clipkit._io import atomic_write_json, atomic_write_with
from clipkit.errors import IndexBusyError
from clipkit.index.captions import caption_line, captions_of_images, first_captions
from clipkit.index.lock import LOCK_FILE, writer_lock
from clipkit.index.sync import is_under
from clipkit.index.vectors import damaged_rows

MANIFEST = "export.json"


def export_embeddings(index, out: str | os.PathLike, *, part_size: int = 100_000,
                      progress: bool | None = None) -> dict:
    """Write `index` into folder `out` (new or empty, outside the index; or an export of the same state of the
    index that was stopped, which goes on); {'parts', 'rows', 'captions', 'more_captions', 'damaged',
    'resumed'} ('captions': rows with a first caption; 'more_captions': further captions, written this run)."""
    _pyarrow()
    out = Path(out)
    with index._lock, index.store.snapshot():  # one committed state throughout
        manifest = {"format": "clipkit-export", "index": str(index.path.resolve()) if index.path else None,
                    "generation": index.store.generation(), "rows": index.store.count(), "part_size": part_size,
                    "model": index.model_info}
        resumed = _start(index, out, manifest)
        with _export_lock(out):
            _lay_out(index, out, manifest, resumed)
            done = _write_parts(index, out, manifest["rows"], part_size, progress)
            atomic_write_json(out / MANIFEST, {**manifest, "complete": True})
    return {**done, "resumed": resumed}


def _write_parts(index, out: Path, rows: int, part_size: int, progress: bool | None) -> dict:
    """Each part of `part_size` rows (of `rows`) that `out` lacks, in key order; what was written."""
    pa, pq = _pyarrow()
    id_types = index.store.id_types()
    done = {"parts": 0, "rows": 0, "captions": 0, "more_captions": 0, "damaged": 0}
    with progress_bar(progress, total=rows, unit="vec", desc="exporting") as bar:
        for number, (keys, vectors) in enumerate(_parts(index.store.live_vectors(), part_size)):
            if not (out / "img_emb" / f"img_emb_{number}.npy").exists():
                _write_part(index, out, number, keys, vectors, id_types, done, pa, pq)
            done["parts"], done["rows"] = done["parts"] + 1, done["rows"] + len(keys)
            bar.update(len(keys))
    return done


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("writing metadata_*.parquet needs pyarrow: pip install 'clipkit[parquet]'") from None
    return pa, pq


@contextlib.contextmanager
def _export_lock(out: Path) -> Iterator[None]:
    """One export into `out` at a time (a second one would find the first's parts half written, and a resumed
    one deletes what a stopped one left half written): the writer lock of `out`."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        with writer_lock(out, wait=False):
            yield
    except IndexBusyError as exc:
        raise IndexBusyError(str(exc).replace("the index at", "the export folder", 1)) from None


def _start(index, out: Path, manifest: dict) -> bool:
    """Check, writing nothing, that `index` can be exported into `out`: a new folder, an empty one (but for an
    export's lock), or one holding an export of this same state of `index` that stopped; whether it goes on."""
    if index.vectors_per_item > 1:
        raise ValueError(f"this index keeps {index.vectors_per_item} vectors an item; clip-retrieval's layout holds "
                         "one an image, so it cannot be exported to it")
    if index.path is not None and is_under(str(out.resolve()), str(index.path.resolve())):
        raise ValueError(f"{out} is inside the index's own folder; export into a folder outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; export into a new or empty folder")
    if not out.exists() or all(entry.name == LOCK_FILE for entry in out.iterdir()):
        return False
    try:
        earlier = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and earlier.get("complete"):
        raise ValueError(f"{out} already holds an export (img_emb/); export into a new or empty folder")
    if earlier != {**manifest, "complete": False}:
        raise ValueError(f"{out} already holds files (or a stopped export of another index, or of this one "
                         "before it changed); export into a new or empty folder")
    return True


def _lay_out(index, out: Path, manifest: dict, resumed: bool) -> None:
    """The export's folders and its manifest (a resumed export: what the stopped one left half written goes)."""
    for sub in ("img_emb", "metadata") + (("text_emb", "captions") if index.captions is not None else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for stale in (out / sub).glob(".*.tmp") if resumed else ():
            stale.unlink(missing_ok=True)
    if not resumed:
        atomic_write_json(out / MANIFEST, {**manifest, "complete": False})


def _parts(batches: Iterator[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`batches` of (keys, vectors) regrouped into parts of exactly `size` rows (the last one shorter)."""
    keys, vectors, held = [], [], 0
    for batch_keys, batch_vectors in batches:
        start = 0
        while start < len(batch_keys):
            take = min(size - held, len(batch_keys) - start)
            keys.append(batch_keys[start:start + take])
            vectors.append(batch_vectors[start:start + take])
            held, start = held + take, start + take
            if held == size:
                yield np.concatenate(keys), np.concatenate(vectors)
                keys, vectors, held = [], [], 0
    if held:
        yield np.concatenate(keys), np.concatenate(vectors)


def _write_part(index, out: Path, number: int, keys: np.ndarray, vectors: np.ndarray, id_types: set,
                done: dict, pa, pq) -> None:
    """One part's metadata, caption embeddings and image embeddings (written last). Damaged rows (NaN,
    infinite, not unit length: flipped bytes on disk) are left out and counted."""
    good = ~damaged_rows(vectors)
    keys, vectors = keys[good], vectors[good]
    by_key = index.store.records_by_key([int(k) for k in keys])
    records = [by_key[int(k)] for k in keys]
    ids = [r["id"] for r in records]
    first = first_captions(index.captions, ids)  # item id -> its first caption's record
    table = pa.table({
        **_id_columns("id", ids, id_types),
        "image_path": [r.get("path") or (r["id"] if isinstance(r["id"], str) else None) for r in records],
        "url": [r.get("url") for r in records],
        "caption": [r.get("caption") or first.get(r["id"], {}).get("caption") for r in records]})
    atomic_write_with(out / "metadata" / f"metadata_{number}.parquet", lambda tmp: pq.write_table(table, tmp))
    if index.captions is not None:
        _save_npy(out / "text_emb" / f"text_emb_{number}.npy", _caption_vectors(index, ids, first))
        done["more_captions"] += _write_more_captions(index.captions, out, number, ids, id_types, pa, pq)
    _save_npy(out / "img_emb" / f"img_emb_{number}.npy", vectors.astype(np.float16))
    done["captions"] += len(first)
    done["damaged"] += int((~good).sum())


def _id_columns(name: str, ids: list, id_types: set) -> dict[str, list]:
    """Column `name` holding `ids`: integers while every id of the index is one, else text, with
    `{name}_is_integer` telling which were integers where the index mixes both (5 and "5" are two ids)."""
    if id_types == {int}:
        return {name: ids}
    mixed = {f"{name}_is_integer": [isinstance(i, int) for i in ids]} if len(id_types) > 1 else {}
    return {name: [str(i) for i in ids], **mixed}


def _write_more_captions(collection, out: Path, number: int, ids: list, id_types: set, pa, pq) -> int:
    """The captions of `ids` past their first (`IMAGE_ID#0`), in line order, and their embeddings."""
    position = {(type(i), i): n for n, i in enumerate(ids)}

    def place(record: dict) -> tuple[int, int]:
        return position[type(record["image_id"]), record["image_id"]], caption_line(record["id"])

    chosen = dict.fromkeys(c for c in captions_of_images(collection, ids) if not c.endswith("#0"))
    records = sorted((r for r in collection.get(list(chosen)) if (type(r.get("image_id")), r.get("image_id"))
                      in position), key=place)
    chosen = [r["id"] for r in records]
    table = pa.table({**_id_columns("image_id", [r["image_id"] for r in records], id_types),
                      "line": [caption_line(r["id"]) for r in records], "caption": [r.get("caption") for r in records]})
    atomic_write_with(out / "captions" / f"captions_{number}.parquet", lambda tmp: pq.write_table(table, tmp))
    vectors = collection.embeddings(chosen) if chosen else np.zeros((0, collection.dim), np.float32)
    _save_npy(out / "captions" / f"text_emb_{number}.npy", vectors.astype(np.float16))
    return len(chosen)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    atomic_write_with(path, write)


def _caption_vectors(index, ids: list, first: dict) -> np.ndarray:
    """The first caption's embedding of each item, zeros where it has none (float16)."""
    vectors = np.zeros((len(ids), index.dim), np.float16)
    rows = [n for n, i in enumerate(ids) if i in first]
    if rows:
        vectors[rows] = index.captions.embeddings([first[ids[n]]["id"] for n in rows]).astype(np.float16)
    return vectors
