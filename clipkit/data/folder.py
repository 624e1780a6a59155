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
    """Image files under `root` (extensions in any case), sorted: `scan_image_paths` as `Path`s."""
    return [Path(path) for path in scan_image_paths(root, recursive, exclude)]


def scan_image_paths(root: str | os.PathLike, recursive: bool = True, exclude: Sequence[str] = ()) -> list[str]:
    """The paths of the image files under `root` (extensions in any case), sorted, as text (a tenth of the
    memory of `Path`s: a folder of millions of files is listed whole).

    Skipped: hidden files and folders (`.*`, which covers macOS `._*` resource forks), anything whose
    name or path relative to `root` matches an `exclude` glob (a matching folder drops its subtree),
    folders reached again through a symlink loop, and second names (symlinks, hard links) of a file
    already found, so one file is listed once (by its real name rather than a symlink's). Unreadable folders
    are passed over.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    if isinstance(exclude, str):
        exclude = [exclude]
    chosen: dict[tuple[int, int], tuple[bool, str]] = {}  # one name per file: a real one before a symlink's,
    seen_dirs: set[tuple[int, int]] = set()               # then the first in sorted order
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            stat = os.stat(directory)
            entries = list(os.scandir(directory))
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        for entry in entries:
            if entry.name.startswith(".") or exclude and _excluded(Path(entry.path).relative_to(root).as_posix(),
                                                                     entry.name, exclude):
                continue
            try:
                if entry.is_dir():
                    if recursive:
                        stack.append(entry.path)
                elif entry.is_file() and is_image_name(entry.name):
                    target = entry.stat()  # follows symlinks: the file itself
                    identity, candidate = (target.st_dev, target.st_ino), (entry.is_symlink(), entry.path)
                    if identity not in chosen or candidate < chosen[identity]:
                        chosen[identity] = candidate
            except OSError:  # a dangling link, or a file gone since the listing
                continue
    return sorted(path for _, path in chosen.values())
