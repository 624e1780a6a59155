"""Finding image files under a folder, and reading the NAME.txt captions beside them."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic",
                              ".heif"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def caption_lines(data: bytes, errors: str = "strict") -> list[str]:
    """Non-empty, stripped lines of a caption file or shard member (one caption per line): UTF-8, or UTF-16 or
    UTF-32 with a byte order mark (Windows Notepad's "Unicode")."""
    from clipkit._io import decode_text

    return [line.strip() for line in decode_text(data, errors).splitlines() if line.strip()]


def caption_file(image_path: str | os.PathLike) -> str:
    """NAME.txt beside NAME.jpg (string work: no pathlib per image of a folder of millions)."""
    return os.path.splitext(os.fspath(image_path))[0] + ".txt"


def read_captions(image_path: str | os.PathLike) -> list[str]:
    """The captions of an image: the non-empty lines of the NAME.txt beside it ([] without one, or when it is
    unreadable or no regular file: a FIFO named so cannot hang a run); bytes that do not decode are replaced."""
    from clipkit._io import read_regular

    try:
        return caption_lines(read_regular(caption_file(image_path)), errors="replace")
    except OSError:
        return []


def _excluded(relative: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def scan_images(root: str | os.PathLike, recursive: bool = True, exclude: Sequence[str] = ()) -> list[Path]:
    """Image files under `root` (extensions in any case), sorted: `scan_image_paths` as `Path`s."""
    return [Path(path) for path in scan_image_paths(root, recursive, exclude)]


def scan_image_paths(root: str | os.PathLike, recursive: bool = True, exclude: Sequence[str] = ()) -> list[str]:
    """The paths of the image files under `root` (extensions in any case), sorted, as text (a tenth of the
    memory of `Path`s): `iter_image_files` with one name kept per file, in memory (indexing a folder keeps them
    on disk instead: `clipkit.index.plan`).

    Skipped: hidden files and folders (`.*`, which covers macOS `._*` resource forks), anything whose
    name or path relative to `root` matches an `exclude` glob (a matching folder drops its subtree),
    folders reached again through a symlink loop, and second names (symlinks, hard links) of a file
    already found, so one file is listed once (by its real name rather than a symlink's). Unreadable folders
    are passed over.
    """
    chosen: dict[tuple[int, int], tuple[bool, str]] = {}  # one name per file: a real one before a symlink's,
    for path, stat, link in iter_image_files(root, recursive, exclude):  # then the first in sorted order
        identity, candidate = (stat.st_dev, stat.st_ino), (link, path)
        if identity not in chosen or candidate < chosen[identity]:
            chosen[identity] = candidate
    return sorted(path for _, path in chosen.values())


def relative_path(path: str, folder: str) -> str:
    """`path` (a file under `folder`) relative to it, with '/' between names: string slicing, where pathlib
    parses (and interns) every part of every name, a cost a folder of millions pays per file."""
    relative = path[len(folder.rstrip(os.sep)) + 1:]
    return relative if os.sep == "/" else relative.replace(os.sep, "/")


def iter_image_files(root: str | os.PathLike, recursive: bool = True, exclude: Sequence[str] = (),
                     on_shard: Callable[[str], None] | None = None,
                     on_odd: Callable[[str, str], None] | None = None) -> Iterator[tuple[str, os.stat_result, bool]]:
    """(path, the file's stat (through a symlink), whether the name is a symlink) of each image file name under
    `root`, folder by folder, holding nothing per file: a file with several names (symlinks, hard links) comes
    once for each; the caller keeps one (`scan_image_paths`). Skipped as `scan_image_paths` says.
    `on_shard(path)`: called for each webdataset shard (.tar) met, which a folder's listing leaves out.
    `on_odd(path, reason)`: for each image name that is no regular file (a FIFO, a device, a dangling link),
    which is never opened."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    if isinstance(exclude, str):
        exclude = [exclude]
    seen_dirs: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        directory = stack.pop()
        try:
            stat = os.stat(directory)
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        for entry in entries:
            if entry.name.startswith(".") or exclude and _excluded(relative_path(entry.path, str(root)), entry.name,
                                                                     exclude):
                continue
            try:
                if entry.is_dir():
                    if recursive:
                        stack.append(entry.path)
                elif entry.is_file() and is_image_name(entry.name):
                    yield entry.path, entry.stat(), entry.is_symlink()  # (stat follows symlinks: the file itself)
                elif on_shard is not None and entry.name.endswith(".tar") and entry.is_file():
                    on_shard(entry.path)
                elif on_odd is not None and is_image_name(entry.name) and not entry.is_file():
                    on_odd(entry.path, "a link to nothing (its target is gone)" if not os.path.exists(entry.path)
                           else "not a regular file (a FIFO, socket or device): not read")
            except OSError:  # a link that cannot be followed (a loop), or a file gone since the listing
                if on_odd is not None and is_image_name(entry.name) and entry.is_symlink():
                    on_odd(entry.path, "a link that cannot be followed (a loop of links)")
