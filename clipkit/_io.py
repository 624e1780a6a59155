"""Crash-safe file writing: write to a temporary name in the same directory, fsync, rename."""

from __future__ import annotations

import codecs
import contextlib
import errno
import itertools
import json
import os
import sqlite3
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On error the temporary file is removed and `path` is left exactly as it was. `durable=False` skips
    the fsyncs (still never a half-written file under the real name; for many small regenerable files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get the usual mode
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    with atomic_path(path, durable) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Call `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file; OSError for anything else (a FIFO, a device, a folder), which is never
    opened for reading in a way that could block: a FIFO named like a caption file cannot hang a run."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            return handle.read()
    finally:
        if fd >= 0:
            os.close(fd)


def sqlite_temp_folder() -> str:
    """Where SQLite writes a private temporary database (`sqlite3.connect("")`): the first writable folder of
    $SQLITE_TMPDIR, $TMPDIR, /var/tmp, /usr/tmp, /tmp (SQLite's order, not Python's `tempfile`, which tries
    /tmp before /var/tmp), else the current folder."""
    for folder in (os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"), "/var/tmp", "/usr/tmp", "/tmp"):
        if folder and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            return folder
    return "."


@contextlib.contextmanager
def temp_space(what: str, sqlite: bool = True) -> Iterator[None]:
    """Inside, a full disk met while writing to the temporary folder (a run's private SQLite database, or with
    `sqlite=False` a spill file from Python's `tempfile`: `what`) is a `TempFullError` that says which folder
    and how to choose another."""
    from clipkit.errors import TempFullError

    try:
        yield
    except (sqlite3.OperationalError, OSError) as exc:
        if not (getattr(exc, "errno", None) == errno.ENOSPC or "full" in str(exc).lower()):
            raise
        folder = sqlite_temp_folder() if sqlite else tempfile.gettempdir()
        variable = "SQLITE_TMPDIR" if sqlite and os.environ.get("SQLITE_TMPDIR") else "TMPDIR"
        raise TempFullError(f"no space left in the temporary folder {folder} for {what} (about 300 bytes a file or "
                            f"row): set {variable} to a folder on a disk with room and run the same command again; "
                            "nothing already indexed is lost") from None


def batches(values: Iterable, size: int) -> Iterator[list]:
    """`values` (any iterable, read once) `size` at a time, each batch a list."""
    values = iter(values)
    while batch := list(itertools.islice(values, size)):
        yield batch


class SpillList:
    """Entries (what JSON writes: ids, pairs) appended in order and read back in that order, as a list reads
    them. The first `kept` are held in memory; the rest go to an unnamed temporary file, so that a run that
    gathers millions (skipped files, the ids a sync removed) stays in bounded memory and still lists each."""

    def __init__(self, kept: int = 10_000):
        self.kept, self._head, self._spill, self._count = kept, [], None, 0

    def append(self, entry) -> None:
        self.extend((entry,))

    def extend(self, entries) -> None:
        entries = iter(entries)
        head = list(itertools.islice(entries, max(self.kept - len(self._head), 0)))
        self._head += head
        self._count += len(head)
        for chunk in batches(entries, 10_000):  # (the rest: one write a chunk)
            with temp_space("a run's list of skipped files or removed ids", sqlite=False):
                if self._spill is None:
                    self._spill = tempfile.TemporaryFile("w+", encoding="utf-8", errors="surrogateescape")
                self._spill.seek(0, os.SEEK_END)
                self._spill.write("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in chunk))
            self._count += len(chunk)

    def _read(self, value):
        """An entry as it was appended, from its JSON."""
        return value

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator:
        yield from self._head
        if self._spill is not None:
            self._spill.flush()
            self._spill.seek(0)
            for line in self._spill:
                yield self._read(json.loads(line))

    def __getitem__(self, at):
        if isinstance(at, slice) and (at.stop is not None and 0 <= at.stop <= len(self._head)):
            return self._head[at]
        return list(self)[at]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} entries)"


class SkipList(SpillList):
    """The (path, reason) pairs of what a run skipped, in order, as a list reads them (bounded memory)."""

    def append(self, entry: tuple[str, str]) -> None:
        path, reason = entry
        super().append((path, reason))

    def _read(self, value) -> tuple[str, str]:
        return tuple(value)

    def __repr__(self) -> str:
        return f"SkipList({len(self)} skipped)"


def printable(name: str) -> str:
    """A file name with undecodable bytes written as \\xNN, fit to print and to write as JSON."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# Text files as editors write them: UTF-8 (with or without Excel's and Notepad's byte order mark), or UTF-16 /
# UTF-32 with a byte order mark (Windows' "Unicode", PowerShell's `>`). UTF-32 LE's mark starts as UTF-16 LE's.
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def text_encoding(head: bytes) -> str:
    """The encoding of text that starts with the bytes `head` (4 are enough): the UTF-16 or UTF-32 its byte
    order mark names, else UTF-8 (a mark there skipped)."""
    return next((name for mark, name in BYTE_ORDER_MARKS if head.startswith(mark)), "utf-8-sig")


def decode_text(data: bytes, errors: str = "strict") -> str:
    """The text of a file's bytes, in the encoding its byte order mark names (`text_encoding`)."""
    return data.decode(text_encoding(data[:4]), errors)


def file_encoding(path: str | os.PathLike, opener: Callable = open) -> str:
    """`text_encoding` of a regular file's first bytes (through `opener`, e.g. gzip.open); UTF-8 for a pipe or
    a FIFO, whose first bytes cannot be read twice."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "utf-8-sig"
        with opener(path, "rb") as raw:
            return text_encoding(raw.read(4))
    except OSError:
        return "utf-8-sig"  # (opening it again says what is wrong)
