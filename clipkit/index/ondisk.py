"""IVF inverted lists on disk, memory-mapped: what an IVF structure's lists become when it is saved.

FAISS holds an IVF index's lists in RAM (fast-scan ones whatever the read flag). A saved IVF structure is
two files instead: the *head* (FAISS's serialisation of the index up to its lists: coarse quantizer, PQ
tables; small) and the *lists file*, in the layout of FAISS's `OnDiskInvertedLists` (per list: codes for
`capacity` entries, then their ids), which FAISS opens memory-mapped and read-only: a search touches only
the pages of the lists it probes, and the page cache, not the process, holds them. Fast-scan lists keep
their packing in blocks of 32 codes (capacity rounded up to whole blocks, padding ids -1); fast-scan search
reads them through the same interface as its in-RAM blocks.

The lists file starts with its own table (magic, list sizes, capacities and offsets, the largest key), so
that it can be opened wherever the index folder has moved. Merging writes a new lists file list by list
from several sources (the sealed lists, a delta's), leaving some keys out (removed items): memory is one
list at a time.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import faiss
import numpy as np

from clipkit.index.vectors import in_sorted

MAGIC = b"CKLISTS1"
ALIGN = 4096  # the table is padded to a page: list offsets stay aligned for SIMD loads


def _ivf(index: faiss.Index) -> faiss.IndexIVF:
    return faiss.downcast_index(faiss.extract_index_ivf(index))


@dataclass(frozen=True)
class Layout:
    """How an IVF index stores a list: `entry_bytes` of codes per entry (fast-scan: a 32-entry block's bytes
    / 32), entries packed in blocks of `per_block` (1: plain codes)."""
    nlist: int
    entry_bytes: int
    per_block: int

    def capacity(self, n):
        return -(-n // self.per_block) * self.per_block

    @classmethod
    def of(cls, index: faiss.Index) -> "Layout":
        ivf = _ivf(index)
        if isinstance(ivf, faiss.IndexIVFFastScan):
            return cls(int(ivf.nlist), int(ivf.M2) // 2, int(ivf.bbs))
        return cls(int(ivf.nlist), int(ivf.code_size), 1)


def sealable(index: faiss.Index) -> bool:
    """Whether this structure's lists can live on disk: an IVF index whose serialisation ends with them."""
    return head_or_none(index) is not None


def head_or_none(index: faiss.Index) -> bytes | None:
    """`head_bytes(index)`, or None for an index whose lists cannot live on disk."""
    if faiss.try_extract_index_ivf(index) is None:
        return None
    try:
        return head_bytes(index)
    except (ValueError, RuntimeError):
        return None


def head_bytes(index: faiss.Index) -> bytes:
    """FAISS's serialisation of an IVF index without its lists (they are what follows: see `open_sealed`)."""
    ivf = _ivf(index)
    placeholder = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, "")
    old, own = ivf.invlists, ivf.own_invlists
    ivf.own_invlists = False  # swapped out for the serialisation only: never freed by the swap
    ivf.replace_invlists(placeholder, False)
    try:
        data = faiss.serialize_index(index).tobytes()
    finally:
        ivf.replace_invlists(old, own)
    tail = len(_ilod(ivf.nlist, ivf.code_size, np.zeros((ivf.nlist, 3), np.uint64), "", 0))
    if len(data) < tail or data[-tail:-tail + 4] != b"ilod":
        raise ValueError(f"{type(faiss.downcast_index(index)).__name__} does not end with its lists")
    return data[:-tail]


def _ilod(nlist: int, code_size: int, table: np.ndarray, filename: str, totsize: int) -> bytes:
    """FAISS's serialisation of an `OnDiskInvertedLists` (table rows: size, capacity, offset)."""
    name = os.fsencode(filename)
    return (b"ilod" + struct.pack("<QQQ", nlist, code_size, nlist) + np.ascontiguousarray(table, "<u8").tobytes()
            + struct.pack("<QQ", 0, len(name)) + name + struct.pack("<Q", totsize))


@dataclass
class ListsTable:
    sizes: np.ndarray
    capacities: np.ndarray
    offsets: np.ndarray
    last_key: int
    layout: Layout

    @property
    def count(self) -> int:
        return int(self.sizes.sum())


def read_table(path) -> ListsTable:
    with open(path, "rb") as handle:
        fixed = handle.read(len(MAGIC) + 32)
        if len(fixed) < len(MAGIC) + 32 or fixed[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a clipkit lists file")
        nlist, entry_bytes, per_block, last_key = struct.unpack("<QQQq", fixed[len(MAGIC):])
        table = np.frombuffer(handle.read(24 * nlist), "<u8")
    if len(table) != 3 * nlist:
        raise ValueError(f"{path} is truncated")
    table = table.reshape(nlist, 3).astype(np.int64)
    return ListsTable(table[:, 0], table[:, 1], table[:, 2], int(last_key), Layout(nlist, entry_bytes, per_block))


def open_sealed(head: bytes, path) -> tuple[faiss.Index, ListsTable]:
    """The IVF index of `head` searching the lists file `path`, memory-mapped read-only, and the file's table."""
    table = read_table(path)
    layout = table.layout
    ivf_code_size = layout.entry_bytes  # fast-scan: the PQ code size, which is the per-entry block share
    rows = np.stack([table.sizes, table.capacities, table.offsets], 1).astype(np.uint64)
    section = _ilod(layout.nlist, ivf_code_size, rows, os.path.abspath(path), os.path.getsize(path))
    index = faiss.deserialize_index(np.frombuffer(head + section, np.uint8), faiss.IO_FLAG_READ_ONLY)
    ivf = _ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    lists.prefetch_nthread = 0  # no prefetch threads per search: the page cache serves the probed lists
    index.ntotal = ivf.ntotal = table.count
    return index, table


def empty_copy(head: bytes, like: faiss.Index) -> faiss.Index:
    """An index like `head`'s (same quantizer and codes), which is `like`'s, with empty lists in RAM: the
    delta beside sealed lists."""
    ivf = _ivf(like)
    index = faiss.deserialize_index(np.frombuffer(head + _empty_array_lists(ivf.nlist, ivf.code_size), np.uint8))
    ivf = _ivf(index)
    if isinstance(ivf, faiss.IndexIVFFastScan):
        packer = ivf.get_CodePacker()
        packer.thisown = False  # the block lists own it
        lists = faiss.BlockInvertedLists(ivf.nlist, packer)
        lists.thisown = False
        ivf.replace_invlists(lists, True)
    index.ntotal = ivf.ntotal = 0
    return index


def _empty_array_lists(nlist: int, code_size: int) -> bytes:
    return b"ilar" + struct.pack("<QQ", nlist, code_size) + b"sprs" + struct.pack("<Q", 0)


def write_lists(path, sources: list[faiss.Index], drops: list | None = None) -> ListsTable:
    """Write the lists of `sources` (IVF indexes over the same quantizer and codes: sealed or in RAM), list by
    list, into a new lists file at `path` (fsynced), leaving out of each source the keys in its `drops` entry
    (sorted; None: none). Lists are copied as they are where nothing of them changes, else unpacked,
    filtered, joined and packed again."""
    layout = Layout.of(sources[0])
    ivfs = [_ivf(s) for s in sources]
    lists = [faiss.downcast_InvertedLists(ivf.invlists) for ivf in ivfs]
    packer = ivfs[0].get_CodePacker() if layout.per_block > 1 else None
    drops = [np.zeros(0, np.int64) if d is None else np.unique(np.asarray(d, np.int64))  # (sorted: looked up)
             for d in (drops or [None] * len(lists))]
    table = np.zeros((layout.nlist, 3), np.int64)
    start = -(-(len(MAGIC) + 32 + 24 * layout.nlist) // ALIGN) * ALIGN
    last_key = -1
    with open(path, "wb") as handle:
        handle.seek(start)
        position = start
        for list_no in range(layout.nlist):
            codes, ids = _joined(list_no, lists, layout, packer, drops)
            capacity = layout.capacity(len(ids))
            handle.write(codes)
            handle.write(np.concatenate([ids, np.full(capacity - len(ids), -1, np.int64)]).tobytes())
            table[list_no] = (len(ids), capacity, position)
            position += capacity * (layout.entry_bytes + 8)
            last_key = max(last_key, int(ids.max()) if len(ids) else -1)
        handle.seek(0)
        handle.write(MAGIC + struct.pack("<QQQq", layout.nlist, layout.entry_bytes, layout.per_block, last_key))
        handle.write(table.astype("<u8").tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    return ListsTable(table[:, 0], table[:, 1], table[:, 2], last_key, layout)


def _joined(list_no: int, lists: list, layout: Layout, packer, drops: list) -> tuple[bytes, np.ndarray]:
    """(codes as stored, ids) of one list across sources, each source's `drops` left out."""
    parts, keep = [], []
    for source, drop in zip(lists, drops):
        n = int(source.list_size(list_no))
        if n:
            ids = faiss.rev_swig_ptr(source.get_ids(list_no), n).copy()
            codes = faiss.rev_swig_ptr(source.get_codes(list_no), layout.capacity(n) * layout.entry_bytes)
            parts.append((codes, ids))
            keep.append(~in_sorted(ids, drop) if len(drop) else np.ones(n, bool))
    if not parts:
        return b"", np.zeros(0, np.int64)
    if len(parts) == 1 and keep[0].all():
        return parts[0][0].tobytes(), parts[0][1]
    flat = np.concatenate([_unpack(codes, len(ids), layout, packer)[mask] for (codes, ids), mask in zip(parts, keep)])
    ids = np.concatenate([ids[mask] for (_, ids), mask in zip(parts, keep)])
    return _pack(flat, layout, packer), ids


def _unpack(codes: np.ndarray, n: int, layout: Layout, packer) -> np.ndarray:
    """(n, code bytes) plain codes of a stored list."""
    if packer is None:
        return codes[:n * layout.entry_bytes].reshape(n, layout.entry_bytes)
    blocks = layout.capacity(n) // layout.per_block
    block_bytes = layout.per_block * layout.entry_bytes
    out = np.empty((blocks * layout.per_block, packer.code_size), np.uint8)
    codes = np.ascontiguousarray(codes)
    for b in range(blocks):
        packer.unpack_all(faiss.swig_ptr(codes[b * block_bytes:]), faiss.swig_ptr(out[b * layout.per_block:]))
    return out[:n]


def _pack(flat: np.ndarray, layout: Layout, packer) -> bytes:
    if packer is None:
        return np.ascontiguousarray(flat).tobytes()
    capacity = layout.capacity(len(flat))
    padded = np.zeros((capacity, packer.code_size), np.uint8)
    padded[:len(flat)] = flat
    block_bytes = layout.per_block * layout.entry_bytes
    out = np.zeros(capacity // layout.per_block * block_bytes, np.uint8)
    for b in range(capacity // layout.per_block):
        packer.pack_all(faiss.swig_ptr(padded[b * layout.per_block:]), faiss.swig_ptr(out[b * block_bytes:]))
    return out.tobytes()


@dataclass
class Sealed:
    """What a structure's memory-mapped lists are: the head they go with, the lists file's name, the largest
    key in them (every later key is in the delta) and how many entries they hold."""
    head: bytes
    lists_file: str
    last_key: int
    count: int
