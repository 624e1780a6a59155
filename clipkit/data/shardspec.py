"""What a SOURCE that names webdataset shards stands for: brace patterns (`shards/{000000..000009}.tar`), globs,
a folder of shards, local paths and file: URLs; and which members of a sample are its image and caption.

It imports neither torch nor webdataset (whose package imports torch): `clipkit index` of shards that have not
changed needs none of them.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Sequence

from clipkit.data.folder import is_image_name

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"


def image_key_of(sample: dict) -> str | None:
    """The sample's image member (jpg, jpeg, png or webp), or None."""
    return next((k for k in IMAGE_KEYS if k in sample), None)


#: Files that hold the makings of shards, not shards: `clipkit shards` turns them into shards.
_SHARD_SOURCES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".json", ".txt")


def expand_shards(urls: str | Sequence[str], nested: bool = False) -> list[str]:
    """Brace-expanded shard URLs; local paths (and file: URLs) must exist. A local folder stands for the
    .tar shards in it (what `clipkit shards` writes; `nested`: a folder without any at its top, for those of its
    subfolders, as `clipkit index` takes it); a folder of images or a caption table is an error that says how to
    make shards of it."""
    listed = [urls] if isinstance(urls, str) else list(urls)
    expanded = [shard for spec in listed for url in _expand_braces(spec)
                for shard in _local_folder_shards(url, nested)]
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    for url in expanded:
        path = local_path(url)
        if path is None:
            continue
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard not found: {path} (from {urls!r})")
        if path.lower().endswith(_SHARD_SOURCES):
            raise ValueError(f"{path} is not a webdataset shard (.tar): make shards of a caption table with "
                             f"`clipkit shards {path} SHARDS_DIR`, then give SHARDS_DIR")
    return expanded


def local_path(url: str) -> str | None:
    """The path a shard URL names on this machine (a plain path or a file: URL); None for a pipe: or remote one."""
    if url.startswith("pipe:") or "://" in url:
        return None
    return url[len("file:"):] if url.startswith("file:") else url


def _local_folder_shards(url: str, nested: bool = False) -> list[str]:
    """[url], or for a local folder the .tar shards in it, or for a local glob (`shards/*.tar`: what users type,
    though webdataset takes brace patterns) the files it matches, in name order."""
    path = local_path(url)
    if path is not None and not os.path.exists(path) and any(mark in path for mark in "*?["):
        matches = sorted(glob.glob(path))
        if not matches:
            raise FileNotFoundError(f"no shard matches {path}")
        return matches
    if path is None or not os.path.isdir(path):
        return [url]
    shards = sorted(str(p) for p in Path(path).iterdir() if p.name.endswith(SHARD_SUFFIXES))
    if not shards and nested:  # (none at its top: those of its subfolders)
        shards = sorted(os.path.join(where, name) for where, files in _walk(path) for name in files
                        if name.endswith(SHARD_SUFFIXES))
    if not shards:
        raise ValueError(f"{path} is a folder without .tar shards: make shards of a folder of images with NAME.txt "
                         f"captions with `clipkit shards {path} SHARDS_DIR`, then give SHARDS_DIR")
    return shards


def _expand_braces(spec: str) -> list[str]:
    """The URLs of a shard spec as webdataset expands them (`webdataset.shardlists.expand_urls`, without importing
    it): `::` separates specs, ${NAME} is the environment's WDS_NAME, braces expand (braceexpand, as there)."""
    from braceexpand import braceexpand

    def variable(match: re.Match) -> str:
        if "WDS_" + match.group(1) not in os.environ:
            raise ValueError(f"{spec!r} names ${{{match.group(1)}}}: set WDS_{match.group(1)} "
                             "(webdataset's convention)")
        return os.environ["WDS_" + match.group(1)]

    return [url for part in spec.split("::") for url in braceexpand(re.sub(r"\$\{(\w+)\}", variable, part))]


def is_shard_spec(source: str, nested: bool = False) -> bool:
    """Whether a `clipkit index` SOURCE names shards (`x.tar`, `shards/{000..009}.tar`, or a folder of shards:
    .tar files and no images at its top level, as `clipkit shards` and img2dataset write; `nested`: or in its
    subfolders, none at its top, and no image anywhere) rather than a folder."""
    if os.path.isdir(source):  # (a folder of images may be called x.tar)
        return is_shard_folder(source, nested)
    return source.endswith(".tar") or (".tar" in source and "{" in source)


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # (compressed ones: refused when read, saying why)


def is_shard_folder(path: str, nested: bool = False) -> bool:
    """Whether `path` is a folder of shards: its top level holds .tar files and no images; or, `nested`, its top
    level holds neither and its subfolders hold shards and no image (img2dataset runs side by side)."""
    top = _top_level(path)
    if top == "tars":
        return True
    return nested and top == "neither" and _tree_of_shards(path)


def _top_level(path: str) -> str | None:
    """What the folder's top level holds (`_holds`), or None when it is no folder."""
    try:
        with os.scandir(path) as entries:
            return _holds(entry.name for entry in entries)
    except OSError:  # not a folder (or unreadable: then the folder sync says so)
        return None


def _tree_of_shards(path: str) -> bool:
    """Whether the tree under `path` holds shards and no image (stopping at the first image)."""
    tars = False
    for _, files in _walk(path):
        held = _holds(files)
        if held == "images":
            return False
        tars = tars or held == "tars"
    return tars


def _holds(names) -> str:
    """"images" (at the first image's name: found at once however big the folder), "tars" or "neither", of these
    names (hidden ones left out)."""
    tars = False
    for name in names:
        if name.startswith("."):
            continue
        if is_image_name(name):
            return "images"
        tars = tars or name.endswith(SHARD_SUFFIXES)
    return "tars" if tars else "neither"


def _walk(path: str):
    """(folder, its file names) of the tree under `path`, hidden files and folders left out, in name order;
    links to folders are not followed."""
    for where, folders, files in os.walk(path):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        yield where, sorted(f for f in files if not f.startswith("."))
