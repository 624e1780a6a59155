"""The vectors of an index: append-only segment files outside SQLite, memory-mapped for passes over them,
read row by row (`preadv`) for gathers such as a re-rank's shortlist.

    vectors/SET-00000.vec   rows of `dim` numbers (float16 or float32), raw, in the order they were added
    vectors/SET-00000.key   the int64 key of each row: ascending (keys only grow), so a key's row is one
                            binary search away and nothing maps keys to rows in RAM; only for a segment
                            whose keys do not run without a gap (most do: keys are given one by one, and
                            the state records such a segment's first key instead: `runs`, 8 B a row less)

A segment holds up to `segment_rows` rows; the last one grows. SET names one generation of files: a
compaction writes the live rows into a new set and the old set's files are deleted once the store points
at the new one. What is committed is recorded in the store (`info.vectors`: set, rows, dtype,
segment_rows, runs), in the same transaction as the items that own the rows: rows are written and fsynced at the
committed end *before* that transaction commits, so a kill at any moment leaves the rows of the whole batch
or of none (bytes past the committed end are garbage the next writer overwrites). Readers map only the
committed rows, and a writer never truncates below them, so a map is never cut under a reader.

A removed item's row stays (a tombstone: the store no longer lists its key) until compaction. An index
that was never saved keeps its rows in memory, in the same layout.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from clipkit._io import fsync_dir
from clipkit.errors import BrokenIndexError

VECTORS_DIR = "vectors"
SEGMENT_ROWS = 1 << 20  # rows per segment file: 1 GiB of float16 at 512-d
PREFETCH_ROWS = 8192  # gathers up to this many rows ask for their pages up front (a re-rank's shortlist)
DTYPES = ("float16", "float32")


def new_state(dtype: str = "float32", segment_rows: int | None = None) -> dict:
    """What the store records about its vectors when it is created (no rows yet)."""
    if dtype not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {"set": uuid.uuid4().hex[:12], "rows": 0, "dtype": dtype, "segment_rows": int(segment_rows or SEGMENT_ROWS)}


class Segments:
    """The segment files of one index folder (or, for `folder=None`, the same rows in memory)."""

    def __init__(self, folder: Path | None, dim: int, readonly: bool = False):
        self.folder = folder / VECTORS_DIR if folder is not None else None
        self.dim, self.readonly = dim, readonly
        self._state: dict | None = None  # the committed state the maps below cover
        self._maps: list[tuple[np.ndarray, np.ndarray]] = []  # per segment: (keys, vectors), committed rows only
        self._firsts = np.zeros(0, np.int64)  # first key of each segment
        self._dense: list[bool] = []  # per segment: its keys run first, first + 1, ... (no gap)
        self._memory: tuple[np.ndarray, np.ndarray] | None = None  # in memory: (keys, vectors) with spare capacity
        self._readers: dict[int, int | None] = {}  # segment -> a descriptor of the file its map is of
        self._nowait = hasattr(os, "RWF_NOWAIT")  # reads can ask for cached pages only (Linux)

    # -- reading ---------------------------------------------------------------------------------

    def view(self, state: dict) -> None:
        """Map the rows `state` (as committed in the store) says there are."""
        if self._state == state:
            return
        if self.folder is None:
            self._view_memory(state)
        else:
            self._view_files(state)
        self._state = dict(state)
        self._firsts = np.asarray([keys[0] for keys, _ in self._maps], np.int64)
        # segments whose keys run without a gap (most: keys only grow): a key's row is key - first, no search
        self._dense = [int(keys[-1]) - int(keys[0]) == len(keys) - 1 for keys, _ in self._maps]

    def _view_memory(self, state: dict) -> None:
        keys, vectors = self._memory if self._memory is not None else (np.zeros(0, np.int64), None)
        rows = int(state["rows"])
        self._maps = [(keys[:rows], vectors[:rows])] if rows else []

    def _view_files(self, state: dict) -> None:
        same_set = self._state is not None and self._state["set"] == state["set"]
        per, rows = int(state["segment_rows"]), int(state["rows"])
        count = -(-rows // per)
        kept = self._maps[:-1] if same_set else []  # full segments never change; the last one may have grown
        maps = list(kept[:count])
        readers = {number: self._readers[number] for number in range(len(maps))}
        runs = state.get("runs") or []
        try:
            for number in range(len(maps), count):
                length = min(per, rows - number * per)
                first = runs[number] if number < len(runs) else None
                keys = Run(first, length) if first is not None else \
                    self._map(state, number, "key", np.int64, (length,))[0]
                vectors, readers[number] = self._map(state, number, "vec", state["dtype"], (length, self.dim))
                maps.append((keys, vectors))
        finally:  # the descriptors of maps no longer viewed (or, on failure, of those not viewed yet) close
            keep = self._readers if len(maps) < count else readers
            _close({*self._readers.values(), *readers.values()} - set(keep.values()))
        self._maps, self._readers = maps, readers

    def _map(self, state: dict, number: int, kind: str, dtype, shape: tuple) -> tuple[np.ndarray, int | None]:
        """(the file mapped read-only, and for a vector file a descriptor of the same file for gathers: they
        read the file the map is of, even once a compaction deleted it; None where there is none)."""
        file = self.file(state, number, kind)
        try:
            with _with_descriptors(lambda: open(file, "rb")) as handle:  # (a map holds a descriptor too)
                array = _with_descriptors(lambda: np.memmap(handle, dtype=dtype, mode="r", shape=shape))
                reader = _descriptor(handle.fileno()) if kind == "vec" else None
            if kind == "vec" and hasattr(mmap, "MADV_RANDOM"):  # rows are read at random: no read-ahead
                with contextlib.suppress(OSError, ValueError):
                    array._mmap.madvise(mmap.MADV_RANDOM)
            return array, reader
        except FileNotFoundError:
            raise BrokenIndexError(f"the vector file {file} is missing: the index is incomplete; rebuild it") from None
        except ValueError as exc:  # shorter than the rows the store records
            raise BrokenIndexError(f"the vector file {file} is shorter than the store records ({exc}): it is "
                                   "damaged; rebuild the index") from None

    def file(self, state: dict, number: int, kind: str) -> Path:
        return self.folder / f"{state['set']}-{number:05d}.{kind}"

    def rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment, row within it) of each key, -1 where no row holds it."""
        keys = np.asarray(keys, np.int64)
        segment = np.searchsorted(self._firsts, keys, side="right") - 1
        row = np.full(len(keys), -1, np.int64)
        for number in np.unique(segment[segment >= 0]):
            chosen = segment == number
            stored = self._maps[number][0]
            if self._dense[number]:
                found = keys[chosen] - self._firsts[number]
                row[chosen] = np.where(found < len(stored), found, -1)
                continue
            found = np.minimum(np.searchsorted(stored, keys[chosen]), len(stored) - 1)
            row[chosen] = np.where(stored[found] == keys[chosen], found, -1)
        return np.where(row >= 0, segment, -1), row

    def vectors(self, keys: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(vectors of `keys` as `dtype`, None: as stored; found mask): rows without a key are zero. Rows are
        read in file order with plain reads (`_read_rows`), not through the maps: a re-rank's random rows then
        cost a read each (~2 us where cached), not a page fault that maps a page-cache folio into this process."""
        segment, row = self.rows(keys)
        dtype = dtype or (self._maps[0][1].dtype if self._maps else np.float32)
        out = np.zeros((len(segment), self.dim), dtype)
        order = np.lexsort((row, segment))  # in file order: consecutive rows are read together
        order = order[segment[order] >= 0]
        if self.folder is not None:
            out[order] = self._read_rows(segment[order], row[order], advise=len(order) <= PREFETCH_ROWS)
            return out, segment >= 0
        for number in np.unique(segment[order]):
            chosen = order[segment[order] == number]
            out[chosen] = self._maps[number][1][row[chosen]]
        return out, segment >= 0

    def _read_rows(self, segment: np.ndarray, rows: np.ndarray, advise: bool) -> np.ndarray:
        """Rows (in file order) of the vector files, each run of consecutive rows in one read. Reads first take
        only what the page cache holds (RWF_NOWAIT: no wait, no disk); for the rest, with `advise`, the kernel is
        asked for all of them at once (POSIX_FADV_WILLNEED) before they are read, so rows that are not cached
        cost about one disk round trip together, not one each."""
        dtype = np.dtype(self._state["dtype"])
        size = self.dim * dtype.itemsize
        out = np.empty((len(rows), self.dim), dtype)
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(segment) != 0)) + 1
        starts, stops = np.concatenate([[0], breaks]).astype(np.int64), np.concatenate([breaks, [len(rows)]])
        handles = {number: self._readers[number] for number in np.unique(segment).tolist()}
        spans = list(zip(segment[starts].tolist(), (starts * size).tolist(), (stops * size).tolist(),
                         (rows[starts] * size).tolist()))
        buffer = memoryview(out).cast("B")  # (slicing a memoryview costs less than slicing the array)
        if None in handles.values():  # segments without a descriptor (none was left): copied from their maps
            for number, start, stop, offset in (span for span in spans if handles[span[0]] is None):
                rows_of = self._maps[number][1][offset // size:(offset + stop - start) // size]
                buffer[start:stop] = memoryview(np.ascontiguousarray(rows_of)).cast("B")
            spans = [span for span in spans if handles[span[0]] is not None]
        missed = self._read_cached(spans, handles, buffer) if self._nowait else spans
        if advise and missed and hasattr(os, "posix_fadvise"):
            for number, start, stop, offset in missed:
                os.posix_fadvise(handles[number], offset, stop - start, os.POSIX_FADV_WILLNEED)
        for number, start, stop, offset in missed:
            if os.preadv(handles[number], [buffer[start:stop]], offset) != stop - start:
                raise BrokenIndexError(f"the vector file {self.file(self._state, number, 'vec')} is shorter than "
                                       "the store records: it is damaged; rebuild the index")
        return out

    def _read_cached(self, spans: list, handles: dict, buffer: memoryview) -> list:
        """Read the spans the page cache holds whole; the spans still to read."""
        missed = []
        for span in spans:
            number, start, stop, offset = span
            try:
                if os.preadv(handles[number], [buffer[start:stop]], offset, os.RWF_NOWAIT) == stop - start:
                    continue
            except BlockingIOError:
                pass
            except OSError:  # a file system without non-blocking reads: read as usual from now on
                self._nowait = False
            missed.append(span)
        return missed

    def __del__(self) -> None:
        _close(set(getattr(self, "_readers", {}).values()))

    def release(self) -> None:
        """Let the pages a long pass read through the maps go from this process's resident memory (they stay
        in the page cache; the next read maps them back)."""
        for keys, vectors in self._maps:
            for array in (keys, vectors):
                handle = getattr(array, "_mmap", None)
                if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
                    with contextlib.suppress(OSError, ValueError):
                        handle.madvise(mmap.MADV_DONTNEED)

    def keys_at(self, rows: np.ndarray) -> np.ndarray:
        """The key of each of these global row numbers (0 .. committed rows - 1)."""
        per = int(self._state["segment_rows"]) if self._state else 1
        out = np.empty(len(rows), np.int64)
        for number in np.unique(rows // per):
            chosen = rows // per == number
            out[chosen] = self._maps[number][0][rows[chosen] - number * per]
        return out

    def batches(self, batch: int = 65_536, read: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, float32 vectors) of every committed row, tombstones included, in key order. Through the maps
        (searches: pages stay cached), or with `read` by plain reads (one pass over a large collection: the
        pages it reads are the page cache's, not this process's resident memory) from the descriptors opened
        with the maps, so a pass outlives a compaction that deleted the files meanwhile."""
        for number, (keys, vectors) in enumerate(self._maps):
            for start in range(0, len(keys), batch):
                stop = min(len(keys), start + batch)
                if read and self.folder is not None:
                    rows = self._read_rows(np.full(stop - start, number), np.arange(start, stop), advise=False)
                    yield np.array(keys[start:stop]), rows.astype(np.float32, copy=False)
                else:
                    yield np.array(keys[start:stop]), np.asarray(vectors[start:stop], np.float32)

    # -- writing (the caller holds the writer lock, inside the store transaction that records the result) --

    def append(self, state: dict, keys: np.ndarray, vectors: np.ndarray) -> dict:
        """Write rows after the committed ones and make them durable; the state to commit with them."""
        keys = np.asarray(keys, np.int64)
        data = np.ascontiguousarray(vectors, dtype=state["dtype"])
        rows = int(state["rows"])
        if self.folder is None:
            self._append_memory(rows, keys, data)
            return {**state, "rows": rows + len(keys)}
        runs = self._append_files(state, rows, keys, data)
        return {**state, "rows": rows + len(keys), "runs": runs}

    def _append_memory(self, rows: int, keys: np.ndarray, data: np.ndarray) -> None:
        stored_keys, stored = self._memory if self._memory is not None else (np.zeros(0, np.int64), None)
        need = rows + len(keys)
        if stored is None or need > len(stored):  # grow by doubling (readers keep views of the old arrays)
            capacity = max(need, 2 * len(stored_keys), 1024)
            grown_keys, grown = np.zeros(capacity, np.int64), np.zeros((capacity, self.dim), data.dtype)
            if stored is not None:
                grown_keys[:rows], grown[:rows] = stored_keys[:rows], stored[:rows]
            stored_keys, stored = grown_keys, grown
        stored_keys[rows:need], stored[rows:need] = keys, data
        self._memory = (stored_keys, stored)

    def _append_files(self, state: dict, rows: int, keys: np.ndarray, data: np.ndarray) -> list:
        """Write the rows (and the keys of segments that need a key file); the state's `runs` after it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        per, done, created = int(state["segment_rows"]), 0, False
        runs = list(state.get("runs") or [])
        while done < len(keys):
            number, offset = divmod(rows + done, per)
            take = min(per - offset, len(keys) - done)
            runs += [None] * (number + 1 - len(runs))  # (segments of states before runs have key files)
            created |= self._write_keys(state, runs, number, offset, keys[done:done + take])
            part = data[done:done + take]
            created |= _write_at(self.file(state, number, "vec"), offset * part.itemsize * part.shape[1], part)
            done += take
        if created:
            fsync_dir(self.folder)
        return runs

    def _write_keys(self, state: dict, runs: list, number: int, offset: int, keys: np.ndarray) -> bool:
        """Record the keys of rows `offset`.. of segment `number`: as its run while they go on without a gap
        (nothing written), else in its key file (the run so far written first); whether a file was made."""
        first, gapless = runs[number], int(keys[-1]) - int(keys[0]) == len(keys) - 1
        if gapless and offset == 0:
            runs[number] = int(keys[0])
            return False
        if gapless and first is not None and int(keys[0]) == first + offset:
            return False
        if first is not None:  # the run ends here: the segment gets its key file, from its first row
            keys, offset, runs[number] = np.concatenate([np.arange(first, first + offset, dtype=np.int64), keys]), 0, None
        return _write_at(self.file(state, number, "key"), offset * keys.itemsize, keys)

    def rewrite(self, state: dict, source: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Write (keys, vectors) batches, in ascending key order, as a new set (compaction, a copy into
        another folder); the state to commit. The old set stays until `drop_other_sets`."""
        fresh = {**new_state(state["dtype"], state["segment_rows"])}
        if self.folder is None:
            self._memory = None
        for keys, vectors in source:
            fresh = self.append(fresh, keys, vectors)
        return fresh

    def drop_other_sets(self, state: dict) -> None:
        """Delete the files of sets other than `state`'s (after the store committed it; readers that still map
        old files keep reading them until they let go)."""
        if self.folder is None or self.readonly or not self.folder.is_dir():
            return
        for file in self.folder.iterdir():
            if not file.name.startswith(state["set"] + "-"):
                with contextlib.suppress(OSError):
                    file.unlink()

    def disk_bytes(self) -> int:
        if self.folder is None or not self.folder.is_dir():
            return 0
        return sum(f.stat().st_size for f in self.folder.iterdir())


class Run:
    """The keys of a segment without a key file: `first`, `first` + 1, ... for `length` rows, indexed like
    the memory-mapped key array it stands for (nothing held in RAM)."""

    def __init__(self, first: int, length: int):
        self.first, self.length = int(first), int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.length)
            return np.arange(self.first + start, self.first + stop, step, dtype=np.int64)
        if isinstance(index, (int, np.integer)):
            position = int(index) + (self.length if index < 0 else 0)
            if not 0 <= position < self.length:
                raise IndexError(f"row {index} of a segment of {self.length}")
            return np.int64(self.first + position)
        return np.asarray(index, np.int64) + self.first


def _descriptor(handle: int) -> int | None:
    """A descriptor of the file `handle` is open on, told its reads are random (no read-ahead: a re-rank reads
    one row here, one there); None if the process has none left even after raising its limit, or where
    the platform has no `preadv` (Windows): gathers then read through the map."""
    if not hasattr(os, "preadv"):
        return None
    try:
        copy = _with_descriptors(lambda: os.dup(handle))
    except OSError as exc:
        if exc.errno != errno.EMFILE:
            raise
        return None
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(copy, 0, 0, os.POSIX_FADV_RANDOM)
    return copy


def _close(descriptors) -> None:
    for handle in descriptors:
        if handle is not None:
            with contextlib.suppress(OSError):
                os.close(handle)


def _with_descriptors(make):
    """`make()`, once more after raising the soft limit of open files if the process had none left (an index
    holds two a segment, its map's and its reader's: ~2,000 at a billion vectors)."""
    try:
        return make()
    except OSError as exc:
        if exc.errno != errno.EMFILE or not _more_descriptors():
            raise
    return make()


def _more_descriptors() -> bool:
    """Raise this process's soft limit of open files towards its hard limit; whether it rose."""
    try:
        import resource
    except ImportError:  # (not on Windows)
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return True
    return False


def _write_at(file: Path, offset: int, part: np.ndarray) -> bool:
    """Write `part` at `offset` of `file`, dropping whatever lies past it (an uncommitted batch), and fsync;
    whether the file is new."""
    created = not file.exists()
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if os.fstat(fd).st_size < offset:
            raise BrokenIndexError(f"the vector file {file} is shorter than the store records: it is damaged; "
                                   "rebuild the index")
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(np.ascontiguousarray(part)).cast("B")
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return created
