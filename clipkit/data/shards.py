"""Writing webdataset shards, from the synthetic generator, a folder with captions, or a CSV/JSONL table.

One sample per image, keys: the image (`jpg` or `png`), `txt` (all captions, one per line) and
`json` (`image_id`, `group_id`, `captions`, `source`, and whatever else the source knows).
Each shard is written under a temporary name and renamed when complete; a manifest
(`PREFIX.json`: shard names and sample counts) is written last.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import webdataset as wds
from PIL import Image

from clipkit._progress import progress_bar
from clipkit._io import atomic_path, atomic_write_json
from clipkit.data.folder import caption_file, read_captions, scan_images
from clipkit.data.images import encode_image, read_image
from clipkit.data.tables import read_table

log = logging.getLogger(__name__)

@dataclass
class Sample:
    """One rendered image with its captions and metadata, as written to shards or folders."""

    key: str
    image: bytes
    image_format: str
    captions: list[str]
    meta: dict


_RAW_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
_FIXED_MTIME = 0  # tar headers carry no wall-clock time: same input, same bytes (an int: a float
# mtime makes tarfile add a PAX header to every member)


def sample_from_image(image: Any, captions: list[str] | str, meta: dict | None = None, key: str = "") -> Sample:
    """A `Sample` from bytes (with meta['format']), a PIL image, or an image file path."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    meta = dict(meta or {})
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        image_format = _RAW_FORMATS.get(path.suffix.lower())
        if image_format:
            read_image(path)  # refuse a broken file now rather than at training time
            data = path.read_bytes()
        else:
            data, image_format = encode_image(read_image(path), "jpg"), "jpg"
        meta.setdefault("source", str(path))
    elif isinstance(image, Image.Image):
        data, image_format = encode_image(image.convert("RGB"), "jpg"), "jpg"
    elif isinstance(image, (bytes, bytearray)):
        data, image_format = bytes(image), meta.pop("format", "jpg")
    else:
        raise ValueError(f"unsupported image type {type(image).__name__}")
    meta["captions"] = captions
    return Sample(key=key, image=data, image_format=image_format, captions=captions, meta=meta)


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, prefix: str = "shard",
                 maxcount: int = 1000, progress: bool | None = None, total: int | None = None) -> list[Path]:
    """Write `samples` into `out_dir/PREFIX-000000.tar`, ... with at most `maxcount` samples each.

    Returns the shard paths. Samples without a key get their running number as key. A folder that already
    holds shards of that prefix is refused (ValueError): they are never overwritten.
    """
    if not isinstance(maxcount, int) or maxcount < 1:
        raise ValueError(f"maxcount must be a positive integer, got {maxcount!r}")
    if any(c in prefix for c in "./\\{}"):
        raise ValueError(f"prefix must not contain '.', '/', braces or backslashes, got {prefix!r}")
    out_dir = Path(out_dir)
    existing = sorted(out_dir.glob(f"{prefix}-*.tar")) + [p for p in [out_dir / f"{prefix}.json"] if p.exists()]
    if existing:  # never over shards an index may point at, nor beside a longer set a shorter one
        raise ValueError(f"{out_dir} already holds shards named {prefix}-*.tar ({existing[0].name}, ...): write into "
                         "another folder or choose another --prefix (existing shards are never overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, int]] = []
    batch: list[Sample] = []

    def flush():
        path = out_dir / shard_name(prefix, len(written))
        written.append((path, write_shard(path, batch)))
        batch.clear()

    with progress_bar(progress, total=total, unit="img", desc="writing shards") as bar:
        for number, sample in enumerate(samples):
            if not sample.key:
                sample.key = f"{number:09d}"
            batch.append(sample)
            if len(batch) == maxcount:
                flush()
            bar.update(1)
        if batch:
            flush()
    write_manifest(out_dir, prefix, written)
    return [p for p, _ in written]


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def write_shard(path: str | os.PathLike, samples: Iterable[Sample]) -> int:
    """Write one shard atomically; returns the number of samples."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, mtime=_FIXED_MTIME)
        for sample in samples:
            if not sample.key or "." in sample.key:
                raise ValueError(f"sample key {sample.key!r} is empty or contains '.', which webdataset reads "
                                 "as an extension")
            writer.write({"__key__": sample.key, sample.image_format: sample.image,
                          "txt": "\n".join(sample.captions), "json": json.dumps(sample.meta, sort_keys=True)})
            count += 1
        writer.close()
    return count


def write_manifest(out_dir: Path, prefix: str, written: list[tuple[Path, int]]) -> None:
    """PREFIX.json: shard names, sample counts and the brace pattern that reads them all."""
    atomic_write_json(out_dir / f"{prefix}.json", {
        "shards": [{"name": Path(p).name, "count": n} for p, n in written], "total": sum(n for _, n in written),
        "pattern": f"{prefix}-{{{0:06d}..{len(written) - 1:06d}}}.tar" if written else None})


def samples_from_source(path: str | os.PathLike, skipped: list | None = None, image_column: str = "image",
                        caption_column: str = "caption") -> Iterator[Sample]:
    """A folder of images with NAME.txt captions, or a caption table, as samples."""
    if os.path.isdir(path):
        return samples_from_folder(path, skipped)
    return samples_from_table(path, image_column, caption_column, skipped=skipped)


def samples_from_folder(folder: str | os.PathLike, skipped: list | None = None) -> Iterator[Sample]:
    """Images under `folder` with same-name `.txt` caption files (one caption per line).

    Images without captions and unreadable images are skipped (and appended to `skipped`).
    """
    for number, path in enumerate(scan_images(folder)):
        captions = read_captions(path)
        if not captions:
            _skip(skipped, path, _no_captions(caption_file(path)))
            continue
        try:
            yield sample_from_image(path, captions, {"image_id": number, "group_id": number})
        except (ValueError, OSError) as exc:
            _skip(skipped, path, str(exc))


def _no_captions(caption: str) -> str:
    """Why an image's caption file gave no captions."""
    name = os.path.basename(caption)
    if not os.path.lexists(caption):
        return f"no caption file {name} beside it"
    if not os.path.isfile(caption):
        return f"no captions: {name} is not a regular file"
    return f"no captions: {name} is empty or unreadable"


def _skip(skipped: list | None, path, reason: str) -> None:
    """A file left out: into `skipped` (the caller reports them), else a warning."""
    if skipped is None:
        log.warning("skipped %s: %s", path, reason)
    else:
        skipped.append((str(path), reason))


def samples_from_table(path: str | os.PathLike, image_column: str = "image", caption_column: str = "caption",
                       root: str | os.PathLike | None = None, skipped: list | None = None) -> Iterator[Sample]:
    with read_table(path, image_column, caption_column, root) as rows:
        for number, (image, captions) in enumerate(rows.items()):
            if not captions:
                _skip(skipped, image, "no captions")
                continue
            captions = [" ".join(caption.split()) for caption in captions]  # a shard's txt holds one caption a line
            try:
                yield sample_from_image(image, captions, {"image_id": number, "group_id": number})
            except (ValueError, OSError) as exc:
                _skip(skipped, image, str(exc))
