"""Image-caption sets for retrieval evaluation: Flickr30k / MS-COCO Karpathy splits, and the synthetic test split.

Each reader returns a `RetrievalSet`: the images (paths or PIL images), the captions, and
`text_to_image[t]`, the index of caption t's image (any number of captions per image).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RetrievalSet:
    name: str
    images: list[Any]  # pathlib.Path or PIL.Image
    captions: list[str]
    text_to_image: np.ndarray  # (n_captions,) int64
    group_ids: list[int] | None = None  # synthetic: images sharing a group are each other's distractors
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.text_to_image = np.asarray(self.text_to_image, dtype=np.int64)
        if len(self.text_to_image) != len(self.captions):
            raise ValueError("text_to_image must have one entry per caption")
        if len(self.images) and (self.text_to_image.min() < 0 or self.text_to_image.max() >= len(self.images)):
            raise ValueError("text_to_image points outside the image list")


def _entries(data: Any, path: Path, split: str) -> list[tuple[str, list[str]]]:
    """(relative image path, captions) from the Karpathy layout or BLIP's list layout."""
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy: dataset_flickr30k.json
        out = []
        for item in data["images"]:
            if item.get("split") != split and not (split == "train" and item.get("split") == "restval"):
                continue
            name = os.path.join(item.get("filepath", ""), item["filename"])
            out.append((name, [s["raw"].strip() for s in item.get("sentences", [])]))
        if not out:
            splits = sorted({str(i.get("split")) for i in data["images"]})
            raise ValueError(f"{path} has no images in split {split!r}; its splits: {', '.join(splits)}")
        return out
    if isinstance(data, list) and all(isinstance(i, dict) and "image" in i and "caption" in i for i in data):
        # BLIP / ALBEF files (flickr30k_test.json, coco_karpathy_test.json): one file per split
        return [(i["image"], [i["caption"]] if isinstance(i["caption"], str) else list(i["caption"])) for i in data]
    raise ValueError(f"{path} is neither a Karpathy split file ({{'images': [...]}}) nor a BLIP-style list of "
                     "{'image', 'caption'} entries")


def read_karpathy(json_path: str | os.PathLike, image_root: str | os.PathLike, split: str = "test",
                  name: str | None = None) -> RetrievalSet:
    """Flickr30k or MS-COCO captions in the Karpathy split format (or BLIP's per-split lists).

    Image files are looked up under `image_root`; a missing one is a FileNotFoundError naming it.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"caption file not found: {json_path}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        raise ValueError(f"{json_path} is not valid JSON: {exc}") from None
    images, captions, text_to_image = [], [], []
    for relative, sentences in _entries(data, json_path, split):
        path = image_root / relative
        if not path.is_file() and (image_root / Path(relative).name).is_file():
            path = image_root / Path(relative).name  # images unpacked flat
        for sentence in sentences:
            captions.append(sentence)
            text_to_image.append(len(images))
        images.append(path)
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(images)} images listed in {json_path} are missing under "
                                f"{image_root}, e.g. {missing[0]}")
    return RetrievalSet(name=name or json_path.stem, images=images, captions=captions, text_to_image=text_to_image,
                        meta={"source": str(json_path), "split": split})


def captioned_source(path: str) -> bool:
    """Whether `path` is a folder of images with NAME.txt captions (no .tar shards at its top) or a caption
    table (.csv / .tsv / .jsonl / .parquet): what `clipkit shards` writes shards of, and what training reads
    as it is (`clipkit train`, `train-rerank --data`)."""
    from clipkit.data.shardspec import SHARD_SUFFIXES
    from clipkit.data.urls import URL_TABLE_SUFFIXES, table_suffix

    if os.path.isdir(path):
        return not any(name.endswith(SHARD_SUFFIXES) for name in os.listdir(path))
    return os.path.isfile(path) and table_suffix(path) in URL_TABLE_SUFFIXES and table_suffix(path) != ".txt"


def read_any_set(path: str, name: str | None = None) -> RetrievalSet:
    """The retrieval set at `path`: webdataset shards (a .tar, a brace pattern or glob of them, or a folder of
    them: called `name`, default the path's last part), a caption table, or a folder of images with NAME.txt
    captions."""
    from clipkit.data.shardspec import is_shard_spec
    from clipkit.data.urls import URL_TABLE_SUFFIXES, table_suffix

    if is_shard_spec(path):
        return read_shard_set(path, name=name or Path(path).name)
    if os.path.isfile(path) and table_suffix(path) in URL_TABLE_SUFFIXES:
        return read_table_set(path)
    return read_folder_set(path)


def read_folder_set(folder: str | os.PathLike) -> RetrievalSet:
    """A folder of images with same-name `.txt` caption files (one caption a line) as a retrieval set;
    images without captions are left out."""
    from clipkit.data.folder import read_captions, scan_images

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} (give --dataset folder:DIR with images and NAME.txt captions)")
    images, captions, text_to_image, uncaptioned, first = [], [], [], 0, None
    for path in scan_images(folder):
        lines = read_captions(path)
        if lines:
            captions += lines
            text_to_image += [len(images)] * len(lines)
            images.append(path)
        else:
            uncaptioned, first = uncaptioned + 1, first or path
    if not images:
        raise ValueError(f"no image in {folder} has a caption file (NAME.txt beside NAME.jpg, one caption a line)")
    if uncaptioned:
        logging.getLogger("clipkit").warning("%d of the %d images in %s have no captions (e.g. %s) and are left out",
                                             uncaptioned, uncaptioned + len(images), folder, first)
    return RetrievalSet(name=f"folder:{folder.name}", images=images, captions=captions, text_to_image=text_to_image)


def read_table_set(path: str | os.PathLike, image_column: str = "image", caption_column: str = "caption"
                   ) -> RetrievalSet:
    """A caption table (CSV / TSV / JSONL / parquet, as `clipkit index` and `clipkit shards` read it: rows of
    one image merged) as a retrieval set; images listed without a caption, and files that are gone, are left
    out (the latter with a warning)."""
    import logging

    from clipkit.data.tables import read_table

    images, captions, text_to_image, missing = [], [], [], []
    with read_table(path, image_column, caption_column) as rows:
        for image, lines in rows.items():
            if not lines:
                continue
            if not os.path.isfile(image):
                missing.append(image)
                continue
            captions += lines
            text_to_image += [len(images)] * len(lines)
            images.append(Path(image))
    if missing:
        logging.getLogger("clipkit").warning("%d image(s) listed in %s are missing (e.g. %s): evaluated without them",
                                             len(missing), path, missing[0])
    if not images:
        raise ValueError(f"no image listed in {path} with a caption exists on disk")
    return RetrievalSet(name=Path(path).name, images=images, captions=captions, text_to_image=text_to_image,
                        meta={"source": str(path)})


def synthetic_set(n_images: int = 1000, seed: int = 0, split: str = "test", size: int = 64,
                  workers: int | None = None) -> RetrievalSet:
    """The synthetic split as an in-memory retrieval set, distractors included in the gallery."""
    from clipkit.data.images import decode_image
    from clipkit.data.synthetic import generate

    images, captions, text_to_image, groups = [], [], [], []
    for sample in generate(n_images, seed=seed, split=split, size=size, image_format="png", workers=workers):
        for caption in sample.captions:
            captions.append(caption)
            text_to_image.append(len(images))
        images.append(decode_image(sample.image))
        groups.append(sample.meta["group_id"])
    return RetrievalSet(name=f"synthetic-{split}", images=images, captions=captions, text_to_image=text_to_image,
                        group_ids=groups, meta={"seed": seed, "split": split, "size": size})


def read_shard_set(urls, name: str = "wds", limit: int | None = None) -> RetrievalSet:
    """A retrieval set from webdataset shards (image + `txt` captions, one per line), in shard order."""
    import webdataset as wds

    from clipkit.data.images import decode_image
    from clipkit.data.folder import caption_lines
    from clipkit.data.shardspec import CAPTION_KEY, expand_shards, image_key_of

    images, captions, text_to_image = [], [], []
    for sample in wds.WebDataset(expand_shards(urls), shardshuffle=False, empty_check=False):
        image_key = image_key_of(sample)
        lines = caption_lines(sample.get(CAPTION_KEY, b""), errors="replace")
        if image_key is None or not lines:
            continue
        for caption in lines:
            captions.append(caption)
            text_to_image.append(len(images))
        images.append(decode_image(sample[image_key], sample.get("__key__", "?")))
        if limit is not None and len(images) == limit:
            break
    if not images:
        raise ValueError(f"no image-caption samples in {urls!r}")
    return RetrievalSet(name=name, images=images, captions=captions, text_to_image=text_to_image,
                        meta={"source": str(urls)})
