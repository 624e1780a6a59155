"""Precomputed embeddings in the field's exchange layout (clip-retrieval's inference output), part by part.

    EMB_DIR/img_emb/img_emb_{i}.npy           (N_i, D) image embeddings (float16 or float32)
    EMB_DIR/text_emb/text_emb_{i}.npy         (N_i, D) caption embeddings, row for row (optional)
    EMB_DIR/metadata/metadata_{i}.parquet     N_i rows: image_path, url, caption (any of them; optional)

    EMB_DIR/captions/captions_{i}.parquet     more captions of part i's images: image_id, line, caption (by
    EMB_DIR/captions/text_emb_{i}.npy         `clipkit export`; optional), and their text embeddings

Each part becomes items of the index: ids are the metadata's `image_path` (else `url`, else the global row
number, counting the parts in order), metadata the row's columns, and captions (with their text embedding,
or embedded by the index's model) go to the caption collection. Rows that repeat an image (clip-retrieval
writes one row per image-caption pair, so a COCO image has five) add their captions to it. Parts are read
memory-mapped in chunks and each chunk is one commit, so memory stays bounded by the chunk, a run stopped at
any moment keeps what it committed, and running it again goes on from there: an image's caption of the same
text is never added twice, and one missing (a run stopped between the image and its captions) is added. A
part is recorded (its file's size and mtime) once all of it is in: later runs skip it, and add only parts
that are new (or re-read one that was rewritten).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from clipkit._progress import progress_bar
from clipkit.errors import ModelMismatchError
from clipkit.index.captions import caption_line, captions_of_images, image_of, new_captions
from clipkit.index.export import MANIFEST
from clipkit.index.sync import SyncReport

log = logging.getLogger("clipkit.index")

PARTS = "embedding_parts"  # store info: img_emb file -> [size, mtime, rows] once all of it is in
METADATA_COLUMNS = ("id", "id_is_integer", "image_path", "url", "caption")  # id, id_is_integer: written by
# `clipkit export` (clipkit.index.export)


@dataclass
class Part:
    number: int
    images: Path  # img_emb_{i}.npy
    texts: Path | None  # text_emb_{i}.npy
    metadata: Path | None  # metadata_{i}.parquet
    more: tuple[Path, Path] | None = None  # captions/captions_{i}.parquet and captions/text_emb_{i}.npy


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
            more = (folder / "captions" / f"captions_{number}.parquet", folder / "captions" / f"text_emb_{number}.npy")
            parts.append(Part(number, path, texts if texts.is_file() else None,
                              metadata if metadata.is_file() else None, more if more[0].is_file() else None))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no img_emb/img_emb_{{i}}.npy: not an embedding folder "
                                "(clip-retrieval's inference output)")
    return sorted(parts, key=lambda p: p.number)


def _rows(table_path: Path | None, chunk: int, wanted: tuple = METADATA_COLUMNS) -> Iterator[dict[str, list]]:
    """A parquet file's rows in chunks of `chunk`: column -> values (only the `wanted` columns)."""
    if table_path is None:
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading metadata_*.parquet needs pyarrow: pip install 'clipkit[parquet]'") from None
    table = pq.ParquetFile(table_path)
    columns = [c for c in wanted if c in table.schema_arrow.names]
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


def exported_model(folder: str | os.PathLike) -> dict | None:
    """The model a clipkit export records in its export.json (name, pretrained, dim, fingerprint), or None
    (a folder other tools wrote, or an export of an index that recorded none)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    info = manifest.get("model") if isinstance(manifest, dict) else None
    return info if isinstance(info, dict) and isinstance(info.get("name"), str) else None


def check_exported_model(folder: str | os.PathLike, exported: dict | None, info: dict | None) -> None:
    """Refuse to put the embeddings of a clipkit export (`exported`: the model its export.json records) into an
    index of another model (`info`: the index's, or the one given to ingest them with): they are not
    comparable."""
    if exported is not None and info is not None and exported.get("fingerprint") != info.get("fingerprint"):
        raise ModelMismatchError(
            f"{folder} holds embeddings of model {exported['name']!r} (pretrained={exported.get('pretrained')!r}, "
            f"weights {exported.get('fingerprint')}; its {MANIFEST} says), but this index's model is "
            f"{info.get('name')!r} (weights {info.get('fingerprint')}); embeddings from different models are not "
            "comparable: leave out --model, or ingest into a new index")


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
    with progress_bar(progress, total=total, unit="vec", desc="ingesting") as bar:
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
    rows = _rows(part.metadata, chunk)
    for offset in range(0, len(images), chunk):
        stop = min(offset + chunk, len(images))
        meta = next(rows, None) if part.metadata is not None else None
        records = _records(meta, stop - offset, part)
        ids = [_item_id(record, start + offset + n) for n, record in enumerate(records)]
        present = set(index.find(ids))  # a run stopped inside this part: what it committed stays as it is
        keep = []
        for n, item_id in enumerate(ids):
            if item_id not in present:
                present.add(item_id)
                keep.append(n)
        report.unchanged += len(ids) - len(keep)
        vectors = np.asarray(images[offset:stop], dtype=np.float32)[keep]
        kept, vectors = _usable(vectors, keep, ids, part.images.name, offset, report)
        if kept:
            index.add(vectors, ids=[ids[n] for n in kept], metadata=[records[n] for n in kept])
            report.added += len(kept)
        damaged = {ids[n] for n in set(keep) - set(kept)}
        rows_with = [n for n in range(len(ids)) if records[n].get("caption") and ids[n] not in damaged]
        add_captions(index, [ids[n] for n in rows_with], [records[n]["caption"] for n in rows_with],
                     None if texts is None else texts[[offset + n for n in rows_with]], model,
                     fresh={ids[n] for n in kept})
        bar.update(stop - offset)
    if part.more is not None:
        _more_captions(index, part, model, chunk)


def _more_captions(index, part: Part, model, chunk: int) -> None:
    """The part's further captions (`captions/captions_{i}.parquet`, as `clipkit export` writes them) of its
    images in the index, with their text embeddings where `captions/text_emb_{i}.npy` has them."""
    table, vectors = part.more
    vectors = _load(vectors, index.dim) if vectors.is_file() else None
    done = 0
    for rows in _rows(table, chunk, ("image_id", "image_id_is_integer", "line", "caption")):
        count = len(next(iter(rows.values()), []))
        if vectors is not None and len(vectors) < done + count:
            raise ValueError(f"{part.more[1]} has fewer rows than {table}")
        images, captions = rows.get("image_id", [None] * count), rows.get("caption", [None] * count)
        integer = rows.get("image_id_is_integer", [False] * count)
        images = [int(i) if whole and i is not None else i for i, whole in zip(images, integer)]
        found = index.find([i for i in images if i is not None])
        chosen = [n for n in range(count) if images[n] in found and captions[n]]
        add_captions(index, [images[n] for n in chosen], [captions[n] for n in chosen],
                     None if vectors is None else vectors[[done + n for n in chosen]], model,
                     lines=[rows["line"][n] for n in chosen] if None not in rows.get("line", [None]) else None)
        done += count


def _usable(vectors: np.ndarray, keep: list[int], ids: list, file: str, offset: int,
            report: SyncReport) -> tuple[list, np.ndarray]:
    """The rows of `keep` (of the chunk at `offset` in part `file`) whose embedding can be searched (finite,
    not zero); the others are reported as skipped, and the rest of the part goes in."""
    good = _searchable(vectors)
    for n in np.flatnonzero(~good):
        report.skip(str(ids[keep[n]]), f"{file} row {offset + keep[n]}: its embedding is NaN, infinite or zero",
                    "damaged embedding")
    return [n for n, ok in zip(keep, good) if ok], vectors[good]


def _searchable(vectors: np.ndarray) -> np.ndarray:
    """Which rows are finite and not zero (a direction to search by)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.isfinite(vectors).all(axis=1) & (np.einsum("ij,ij->i", vectors, vectors) > 0)


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
    if record.pop("id_is_integer", False) and given is not None:
        given = int(given)
    return given if given is not None else record.get("image_path") or record.get("url") or row


def add_captions(index, image_ids: list, texts: list[str], vectors: np.ndarray | None, model,
                 fresh: set = frozenset(), lines: list[int] | None = None) -> int:
    """Captions of images in the index (`texts[n]` of `image_ids[n]`), into the caption collection: each one
    unless its image already has a caption of that text, as `IMAGE_ID#LINE` after the image's last line;
    with `lines` (as `clipkit export` writes them), as `IMAGE_ID#lines[n]` unless that id is there.
    `vectors`: their embeddings, row for row, else embedded by `model` (neither: none added); `fresh`: ids of
    images added just now, which have no captions yet. Returns how many were added."""
    if not image_ids or (vectors is None and model is None):
        return 0
    collection = index._writable_captions()
    if collection is False:  # damaged: said once; the images go in all the same
        return 0
    if lines is not None:
        wanted = {f"{image}#{line}": n for n, (image, line) in enumerate(zip(image_ids, lines))}
        there = collection.find(list(wanted)) if collection is not None else {}
        caption_ids = [c for c in wanted if c not in there]
        chosen = [wanted[c] for c in caption_ids]
    else:
        chosen, caption_ids = _after_last_lines(collection, image_ids, texts, fresh)
    if not chosen:
        return 0
    if vectors is not None:
        vectors = np.asarray(vectors[chosen], dtype=np.float32)
        good = _searchable(vectors)
        if not good.all():
            log.warning("%d caption embedding(s) are NaN, infinite or zero: those captions are left out (e.g. %r)",
                        int((~good).sum()), caption_ids[int(np.flatnonzero(~good)[0])])
            chosen, caption_ids = [n for n, ok in zip(chosen, good) if ok], [c for c, ok in zip(caption_ids, good) if ok]
            vectors = vectors[good]
            if not chosen:
                return 0
    else:
        from clipkit.encode import encode_texts

        vectors = encode_texts([texts[n] for n in chosen], model)
    collection = collection or new_captions(index, model)
    collection.add(vectors, ids=caption_ids,
                   metadata=[{"caption": texts[n], "image_id": image_ids[n], "path": None} for n in chosen])
    return len(chosen)


def _after_last_lines(collection, image_ids: list, texts: list[str], fresh: set) -> tuple[list[int], list[str]]:
    """(which of the captions are new to their image, their ids: after the image's last line)."""
    have, lines = _captions_known(collection, [i for i in dict.fromkeys(image_ids) if i not in fresh])
    chosen, caption_ids = [], []
    for n, (image, text) in enumerate(zip(image_ids, texts)):
        if (image, text) not in have:
            have.add((image, text))
            lines[str(image)] = lines.get(str(image), -1) + 1
            chosen.append(n)
            caption_ids.append(f"{image}#{lines[str(image)]}")
    return chosen, caption_ids


def _captions_known(collection, image_ids: list) -> tuple[set, dict[str, int]]:
    """({(image id, caption text)} of `image_ids`' captions in `collection` (None: none), {image id as text:
    its last caption line}); caption ids are `IMAGE_ID#LINE`, so 5 and "5" number their lines together."""
    have, lines = set(), {}
    if collection is None or not image_ids:
        return have, lines
    for record in collection.get(list(dict.fromkeys(captions_of_images(collection, image_ids)))):
        have.add((record.get("image_id"), record.get("caption")))
        lines[image_of(record["id"])] = max(lines.get(image_of(record["id"]), -1), caption_line(record["id"]))
    return have, lines
