"""Precomputed embeddings in the field's exchange layout (clip-retrieval's inference output), part by part.

    EMB_DIR/img_emb/img_emb_{i}.npy           (N_i, D) image embeddings (float16 or float32)
    EMB_DIR/text_emb/text_emb_{i}.npy         (N_i, D) caption embeddings, row for row (optional)
    EMB_DIR/metadata/metadata_{i}.parquet     N_i rows: image_path, url, caption (any of them; optional)

Each part becomes items of the index: ids are the metadata's `image_path` (else `url`, else the global row
number, counting the parts in order), metadata the row's columns, and captions (with their text embedding,
or embedded by the index's model) go to the caption collection. Parts are read memory-mapped in chunks and
each chunk is one commit, so memory stays bounded by the chunk, a run stopped at any moment keeps what it
committed, and running it again goes on from there. A part is recorded (its file's size and mtime) once all
of it is in: later runs skip it, and add only parts that are new (or re-read one that was rewritten).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from clipkit.index.captions import new_captions
from clipkit.index.sync import SyncReport

log = logging.getLogger("clipkit.index")

PARTS = "embedding_parts"  # store info: img_emb file -> [size, mtime, rows] once all of it is in
METADATA_COLUMNS = ("id", "image_path", "url", "caption")  # id: written by `clipkit export` (clipkit.index.export)


@dataclass
class Part:
    number: int
    images: Path  # img_emb_{i}.npy
    texts: Path | None  # text_emb_{i}.npy
    metadata: Path | None  # metadata_{i}.parquet


def is_embedding_folder(source: str | os.PathLike) -> bool:
    """Whether `clipkit index SOURCE` names a folder of precomputed embeddings (it holds img_emb/*.npy)."""
    return any(Path(source, "img_emb").glob("img_emb_*.npy"))


def embedding_parts(folder: str | os.PathLike) -> list[Part]:
    """The parts of an embedding folder, in order of their number."""
    folder = Path(folder)
    parts = []
    for path in folder.glob("img_emb/img_emb_*.npy"):
        match = re.fullmatch(r"img_emb_(\d+)\.npy", path.name)
        if match:
            number = int(match.group(1))
            texts = folder / "text_emb" / f"text_emb_{number}.npy"
            metadata = folder / "metadata" / f"metadata_{number}.parquet"
            parts.append(Part(number, path, texts if texts.is_file() else None,
                              metadata if metadata.is_file() else None))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no img_emb/img_emb_{{i}}.npy: not an embedding folder "
                                "(clip-retrieval's inference output)")
    return sorted(parts, key=lambda p: p.number)


def _rows(part: Part, chunk: int) -> Iterator[dict[str, list]]:
    """The part's metadata in chunks of `chunk` rows: column -> values (only the columns clipkit reads)."""
    if part.metadata is None:
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading metadata_*.parquet needs pyarrow: pip install 'clipkit[parquet]'") from None
    table = pq.ParquetFile(part.metadata)
    columns = [c for c in METADATA_COLUMNS if c in table.schema_arrow.names]
    for batch in table.iter_batches(batch_size=chunk, columns=columns or None):
        yield {name: batch.column(name).to_pylist() for name in columns}


def _load(path: Path | None, dim: int | None = None) -> np.ndarray | None:
    """The part's array, memory-mapped: (rows, dim) numbers, else a ValueError that names the file."""
    if path is None:
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable .npy array of embeddings ({exc}): it may be truncated; "
                         "write it again, or move it out of the folder") from None
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim) or array.dtype.kind not in "fiu":
        raise ValueError(f"{path} holds an array of shape {array.shape} and type {array.dtype}; expected "
                         f"(rows, {dim or 'D'}) numbers")
    return array


def embedding_dim(folder: str | os.PathLike) -> int:
    """The dimension of an embedding folder's vectors (its first part's)."""
    return int(_load(embedding_parts(folder)[0].images).shape[1])


def sync_embeddings(index, folder: str | os.PathLike, model=None, *, chunk: int = 50_000,
                    progress: bool | None = None) -> SyncReport:
    """Bring `index` (whose writer lock the caller holds) up to date with the embedding folder: see the module."""
    report = SyncReport()
    start = 0  # global row number of the part's first row
    parts = embedding_parts(folder)
    total = sum(len(_load(part.images, index.dim)) for part in parts)  # memory-mapped: only headers are read
    with tqdm(total=total, disable=None if progress is None else not progress, unit="vec", desc="ingesting") as bar:
        for part in parts:
            images = _load(part.images, index.dim)  # one part mapped at a time: its pages go with it
            stat = os.stat(part.images)
            key = str(part.images.resolve())
            if index.store.info(PARTS, {}).get(key) == [stat.st_size, stat.st_mtime, len(images)]:
                report.unchanged += len(images)
                bar.update(len(images))
            else:
                _ingest_part(index, part, images, start, model, chunk, report, bar)
                with index.store.transaction(bump=False):
                    index.store.set_info(PARTS, {**index.store.info(PARTS, {}),
                                                 key: [stat.st_size, stat.st_mtime, len(images)]})
            start += len(images)
    return report


def _ingest_part(index, part: Part, images: np.ndarray, start: int, model, chunk: int, report: SyncReport,
                 bar) -> None:
    texts = _load(part.texts, index.dim)
    if texts is not None and len(texts) != len(images):
        raise ValueError(f"{part.texts} has {len(texts)} rows but {part.images} has {len(images)}")
    rows = _rows(part, chunk)
    for offset in range(0, len(images), chunk):
        stop = min(offset + chunk, len(images))
        meta = next(rows, None) if part.metadata is not None else None
        records = _records(meta, stop - offset, part)
        ids = [_item_id(record, start + offset + n) for n, record in enumerate(records)]
        present = set(index.find(ids))  # a run stopped inside this part: what it committed stays as it is
        keep = []
        for n, item_id in enumerate(ids):
            if item_id in present:
                continue
            present.add(item_id)
            keep.append(n)
        report.unchanged += len(ids) - len(keep)
        vectors = np.asarray(images[offset:stop], dtype=np.float32)[keep]
        keep, vectors = _usable(vectors, keep, ids, part.images.name, offset, report)
        if keep:
            index.add(vectors, ids=[ids[n] for n in keep], metadata=[records[n] for n in keep])
            report.added += len(keep)
        ingest_captions(index, records, ids, keep, texts, offset, model)
        bar.update(stop - offset)


def _usable(vectors: np.ndarray, keep: list[int], ids: list, file: str, offset: int,
            report: SyncReport) -> tuple[list, np.ndarray]:
    """The rows of `keep` (of the chunk at `offset` in part `file`) whose embedding can be searched (finite,
    not zero); the others are reported as skipped, and the rest of the part goes in."""
    with np.errstate(invalid="ignore", over="ignore"):
        good = np.isfinite(vectors).all(axis=1) & (np.einsum("ij,ij->i", vectors, vectors) > 0)
    for n in np.flatnonzero(~good):
        report.skip(str(ids[keep[n]]), f"{file} row {offset + keep[n]}: its embedding is NaN, infinite or zero",
                    "damaged embedding")
    return [n for n, ok in zip(keep, good) if ok], vectors[good]


def _records(meta: dict | None, count: int, part: Part) -> list[dict]:
    if meta is None:
        return [{} for _ in range(count)]
    if len(next(iter(meta.values()), [])) != count:
        raise ValueError(f"{part.metadata} and {part.images} have different numbers of rows")
    names = list(meta)
    return [{name: meta[name][n] for name in names if meta[name][n] is not None} for n in range(count)]


def _item_id(record: dict, row: int):
    """An item's id: the `id` clipkit's export wrote, else its image_path, else its url, else its global row
    number (taken out of `record`, which becomes the item's metadata)."""
    given = record.pop("id", None)
    return given if given is not None else record.get("image_path") or record.get("url") or row


def ingest_captions(index, records: list[dict], ids: list, keep: list[int], texts, offset: int, model) -> None:
    """The captions of the rows just added, into the caption collection: their text embeddings, else
    embedded by `model` (no model and no text embeddings: no captions)."""
    rows = [n for n in keep if records[n].get("caption")]
    if not rows or (texts is None and model is None):
        return
    if texts is not None:
        vectors = np.asarray(texts[[offset + n for n in rows]], dtype=np.float32)
    else:
        from clipkit.encode import encode_texts

        vectors = encode_texts([records[n]["caption"] for n in rows], model)
    collection = index._writable_captions()
    if collection is False:  # damaged: said once; the images go in all the same
        return
    collection = collection or new_captions(index, model)
    collection.add(vectors, ids=[f"{ids[n]}#0" for n in rows],
                   metadata=[{"caption": records[n]["caption"], "image_id": ids[n], "path": None} for n in rows])
