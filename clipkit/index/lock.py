"""One writer per index at a time: an OS file lock in the index folder, held for a whole run.

`flock` locks belong to the open file, so the kernel releases them when the process ends, however it
ends (a SIGKILL included): a crashed writer never leaves the index locked. Readers never take it.
Within one process the lock is re-entrant (the CLI holds it for a run; the index's own write methods
take it again around each change), and threads of the process take turns.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from clipkit.errors import IndexBusyError, ReadOnlyIndexError

LOCK_FILE = "writer.lock"

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock does the same job
    fcntl = None
    import msvcrt


class _Held:
    def __init__(self):
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.handle = None


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def holder(folder: str | os.PathLike) -> dict:
    """Who holds (or last held) the lock: {'pid', 'command', 'since'}; {} when unknown."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} ({info.get('command', '?')}, since {since})"


def _try_lock(handle) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _unlock(handle) -> None:
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        else:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    handle.close()


def _open(folder: Path):
    try:
        return open(folder / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as exc:
        if not os.access(folder, os.W_OK):
            raise ReadOnlyIndexError(f"the index at {folder} is read-only ({exc.strerror}): it can be searched but "
                                     "not changed; copy it to writable storage to change it") from None
        raise


def _acquire(folder: Path, wait: bool, on_wait: Callable[[str], None] | None, timeout: float | None):
    handle = _open(folder)
    if not _try_lock(handle):
        who = describe(holder(folder))
        if not wait:
            handle.close()
            raise IndexBusyError(f"the index at {folder} is being written by {who}; try again when it is done "
                                 "(or wait for it: drop --no-wait)")
        if on_wait is not None:
            on_wait(f"waiting for the index at {folder}: it is being written by {who}")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while not _try_lock(handle):
            if deadline is not None and time.monotonic() > deadline:
                handle.close()
                raise IndexBusyError(f"the index at {folder} is still being written by {who} after {timeout:g} s")
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)
    handle.seek(0)
    handle.truncate()
    command = " ".join([os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]])
    handle.write(json.dumps({"pid": os.getpid(), "command": command[:200], "since": time.time()}))
    handle.flush()
    return handle


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, *, wait: bool = True, on_wait: Callable[[str], None] | None = None,
                timeout: float | None = None) -> Iterator[None]:
    """Hold the index folder's writer lock for the body (re-entrant within this process).

    Another process holding it: wait for it (`on_wait` is told once, with who holds it), or with
    `wait=False` raise `IndexBusyError` naming that process.
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    with _HELD_GUARD:
        held = _HELD.setdefault(key, _Held())
    with held.thread_lock:
        if held.depth == 0:
            held.handle = _acquire(folder, wait, on_wait, timeout)
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                _unlock(held.handle)
                held.handle = None


def held_here(folder: str | os.PathLike) -> bool:
    """Whether this process holds the writer lock of `folder` now."""
    held = _HELD.get(os.path.realpath(folder))
    return held is not None and held.depth > 0
