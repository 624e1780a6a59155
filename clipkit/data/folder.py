"""Finding image files under a folder."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under `root` (extensions in any case), sorted, hidden files and folders skipped.

    Symlinked folders are followed once: a folder reached again through a link loop is skipped.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    found: list[Path] = []
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
            try:
                if entry.is_dir():
                    if recursive:
                        stack.append(Path(entry.path))
                elif entry.is_file() and is_image_name(entry.name):
                    found.append(Path(entry.path))
            except OSError:
                continue
    return sorted(found)
