"""Values kept in memory for the next call that wants them, least recently used dropped past a bound: the
models of indexes searched by path, a server's thumbnails, a re-ranking's prepared pixels."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable


def file_version(path) -> tuple[int, int] | None:
    """What tells a file's present content from its others in a key: (size, modification time in ns); None
    where it cannot be read (or `path` is not a path)."""
    try:
        stat = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return stat.st_size, stat.st_mtime_ns


class Kept:
    """Values by key, safe to share between threads. Once the values' total `size` (1 each by default) passes
    `limit()`, the least recently used go. `limit` is read at each `put`, so a bound that is a setting (a module
    constant, a server's config) holds as it is now."""

    def __init__(self, limit: Callable[[], int], size: Callable[[Any], int] = lambda value: 1):
        self.limit, self.size = limit, size
        self.entries: OrderedDict = OrderedDict()
        self.total = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Hashable) -> Any:
        """The value kept at `key` (now the most recently used), or None."""
        with self.lock:
            value = self.entries.get(key)
            if value is not None:
                self.entries.move_to_end(key)
            return value

    def take(self, key: Hashable) -> Any:
        """The value kept at `key`, no longer kept (one user at a time: `put` it back after), or None."""
        with self.lock:
            value = self.entries.pop(key, None)
            if value is not None:
                self.total -= self.size(value)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        """Keep `value` at `key` (replacing what was there), as the most recently used."""
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.total -= self.size(old)
            self.entries[key] = value
            self.total += self.size(value)
            while self.total > self.limit() and self.entries:
                self.total -= self.size(self.entries.popitem(last=False)[1])
