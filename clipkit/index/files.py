"""Reading an indexed item's image back only while it is still the file that was indexed.

An image file is read through one open file: its size and mtime (of what was opened, so no rename between a
check and the read can swap it) must be those recorded when it was indexed, it must be a regular file, and
an item under an indexed folder that resolves outside that folder (a symlink into a photo library elsewhere)
must hold exactly the bytes that were indexed (their content hash). A shard member is read only while the
shard's size and mtime are those recorded when it was last read in full. So a file replaced by a symlink to
`/etc/passwd`, or rewritten, is not read: whoever can write into an indexed folder cannot read other files
through a server over the index.
"""

from __future__ import annotations

import os
import stat as stat_module

from clipkit.data.images import TarMember
from clipkit.index.sync import bytes_hash, is_under


def read_indexed(index, record: dict, source, max_bytes: int) -> bytes:
    """The bytes of `record`'s image (`source`: its file Path, or its TarMember), or a ValueError saying
    why they are not what was indexed; at most `max_bytes`."""
    if isinstance(source, TarMember):
        recorded = index.store.shard_record(source.tar)
        if recorded is None:
            raise ValueError("its shard was never read in full (index it again)")
        with _open_regular(source.tar) as handle:
            _same(os.fstat(handle.fileno()), recorded[:2], "its shard")
            handle.seek(source.offset)
            data = handle.read(source.size)
        if len(data) != source.size:
            raise ValueError("its shard was cut short")
        return data
    path = str(source)
    outside = _outside_its_folder(index, path)
    with _open_regular(path) as handle:
        _same(os.fstat(handle.fileno()), [record.get("size"), record.get("mtime")], "the file")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"the file is larger than the {max_bytes} byte limit")
    if outside is not None and bytes_hash(data) != record.get("content_hash"):
        raise ValueError(f"it resolves outside its indexed folder {outside} to a file other than the one indexed")
    return data


def as_indexed(record: dict) -> bool:
    """Whether an item's stored embedding is still its file's: the file as indexed (its size and mtime as
    recorded), or none to compare (gone since, an item of a shard, of a URL or added from embeddings)."""
    path = record.get("path")
    if not path:
        return True
    try:
        _same(os.stat(path), [record.get("size"), record.get("mtime")], "the file")
    except OSError:  # (gone since: what the index holds is the item)
        return True
    except ValueError:  # (changed since)
        return False
    return True


def _open_regular(path: str):
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise ValueError("the file is no longer there") from None
    if not stat_module.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise ValueError("it is no longer a regular file")
    return handle


def _same(stat: os.stat_result, recorded: list, what: str) -> None:
    """`stat` has the [size, mtime] recorded (either None: not recorded, an item added with a path)."""
    size, mtime = recorded
    if size is not None and stat.st_size != int(size) or mtime is not None and stat.st_mtime != float(mtime):
        raise ValueError(f"{what} changed since it was indexed (index it again)")


def _outside_its_folder(index, path: str) -> str | None:
    """The indexed folder `path` lies under when it resolves outside it (through a symlink), else None."""
    for root in index.roots():
        folder = root["path"]
        if is_under(path, folder):
            return None if is_under(os.path.realpath(path), os.path.realpath(folder)) else folder
    return None
