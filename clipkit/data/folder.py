"""Finding image files under a folder."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Sequence

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic",
                              ".heif"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _excluded(relative: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def scan_images(root: str | os.PathLike, recursive: bool = True, exclude: Sequence[str] = ()) -> list[Path]:
    """Image files under `root` (extensions in any case), sorted.

    Skipped: hidden files and folders (`.*`, which covers macOS `._*` resource forks), anything whose
    name or path relative to `root` matches an `exclude` glob (a matching folder drops its subtree),
    folders reached again through a symlink loop, and second names (symlinks, hard links) of a file
    already found, so one file is listed once (by its real name rather than a symlink's). Unreadable folders are passed over.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    if isinstance(exclude, str):
        exclude = [exclude]
    found: list[tuple[Path, tuple[int, int], bool]] = []
    seen_dirs: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            stat = directory.stat()
            entries = list(os.scandir(directory))
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative = Path(entry.path).relative_to(root).as_posix()
            if exclude and _excluded(relative, entry.name, exclude):
                continue
            try:
                if entry.is_dir():
                    if recursive:
                        stack.append(Path(entry.path))
                elif entry.is_file() and is_image_name(entry.name):
                    target = entry.stat()  # follows symlinks: the file itself
                    found.append((Path(entry.path), (target.st_dev, target.st_ino), entry.is_symlink()))
            except OSError:  # a dangling link, or a file gone since the listing
                continue
    # one name per file: the real one before a symlink's, then the first in sorted order
    chosen: dict[tuple[int, int], tuple[bool, str, Path]] = {}
    for path, identity, is_link in found:
        candidate = (is_link, str(path), path)
        if identity not in chosen or candidate[:2] < chosen[identity][:2]:
            chosen[identity] = candidate
    return sorted((path for _, _, path in chosen.values()), key=str)
