"""Captions in the index: the lines of `NAME.txt` beside each indexed `NAME.jpg`, embedded by the index's own
model into a caption collection (an `Index` of its own in the index folder's `captions/`), so that images
can search captions (image -> text) and texts can search captions (text -> text).

Caption items have ids `IMAGE_ID#LINE` and carry their text (`caption`), their image's id (`image_id`) and
path (`path`). Syncing compares each image's caption file with what is stored: unchanged captions are kept,
changed or new ones embedded, those of changed, moved or removed images dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("clipkit.index")

CAPTIONS_DIR = "captions"


@dataclass
class CaptionReport:
    added: int = 0
    removed: int = 0
    kept: int = 0


def caption_file(image_path: str | Path) -> Path:
    return Path(image_path).with_suffix(".txt")


def image_of(caption_id: str) -> str:
    """The id of a caption item's image (caption ids are `IMAGE_ID#LINE`)."""
    return caption_id.rpartition("#")[0]


def read_captions(image_path: str | Path) -> list[str]:
    """The captions of an image: the non-empty lines of the .txt file beside it ([] without one)."""
    from clipkit.data.loader import caption_lines

    try:
        return caption_lines(caption_file(image_path).read_bytes(), errors="replace")
    except OSError:  # no caption file, or unreadable: no captions
        return []


def wanted_captions(image_ids: list[str]) -> dict[str, dict]:
    """caption id -> its metadata, for every line of every image's caption file."""
    wanted = {}
    for image_id in image_ids:
        for line, text in enumerate(read_captions(image_id)):
            wanted[f"{image_id}#{line}"] = {"caption": text, "image_id": image_id, "path": image_id}
    return wanted


def sync_captions(collection, image_ids: list[str], prefix: str, indexed: set, model,
                  batch_size: int = 256) -> CaptionReport:
    """Bring `collection` (the caption Index) in step with the caption files of `image_ids` (the images
    under the folder `prefix` synced); captions of images no longer `indexed` at all (removed, or moved
    to another folder and so to other ids) are dropped too."""
    from clipkit.encode import encode_texts

    wanted = wanted_captions(image_ids)
    have = {}
    for item_id in collection.ids():
        if item_id.startswith(prefix) or image_of(item_id) not in indexed:
            have[item_id] = None
    if have:
        for record in collection.get(list(have)):
            have[record["id"]] = record.get("caption")
    drop = [i for i, text in have.items() if i not in wanted or wanted[i]["caption"] != text]
    add = [i for i, meta in wanted.items() if have.get(i, object()) != meta["caption"]]
    report = CaptionReport(removed=len(drop), kept=len(have) - len(drop))
    if drop:
        collection.remove(drop)
    for start in range(0, len(add), batch_size):
        chunk = add[start:start + batch_size]
        vectors = encode_texts([wanted[i]["caption"] for i in chunk], model, batch_size)
        collection.add(vectors, ids=chunk, metadata=[wanted[i] for i in chunk])
        report.added += len(chunk)
    return report
