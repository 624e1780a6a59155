"""Merging indexes (the shards of `clipkit index --shard i/n`) into one, in bounded memory and resumably.

With a target folder the merge is written there chunk by chunk: the folder's store records which parts it
merges (`merging`) and how many are done (`merge_done`), so a run killed midway, given the same parts
again, goes on from where it stopped; a finished merge clears the record, and a folder that holds anything
else is refused. Captions are merged the same way, into the target's caption collection.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from clipkit.errors import ModelMismatchError
from clipkit.index.captions import CAPTIONS_DIR
from clipkit.index.store import is_index
from clipkit.index.vectors import damaged_rows

log = logging.getLogger("clipkit.index")


def merge(cls, parts: Sequence, *, out: str | os.PathLike | None = None, index_type: str = "flat",
          chunk: int = 50_000, **options):
    """`cls.merge` (see `clipkit.index.Index.merge`): `cls` is the Index class."""
    loaded = [p if isinstance(p, cls) else cls.load(p) for p in parts]
    if not loaded:
        raise ValueError("nothing to merge: give at least one index")
    _check_compatible(loaded)
    names = [str(p.path.resolve()) if p.path is not None else f"memory:{id(p)}" for p in loaded]
    twice = next((name for n, name in enumerate(names) if name in names[:n]), None)
    if twice is not None:
        raise ValueError(f"{twice} is given twice: give each part once")
    merged = _target(cls, out, names, loaded[0], index_type, options)
    resume = merged.store.info("merge_done", 0)
    for number, part in enumerate(loaded[resume:], resume):
        _add_part(merged, part, chunk, resume=number == resume)
        with merged.store.transaction(bump=False):
            for shard, (size, mtime, digest) in part.store.shard_records().items():
                merged.store.record_shard(shard, size, mtime, digest)  # read in full: not read again
            if out is not None:
                merged.store.set_info("merge_done", number + 1)
    if index_type != "flat":
        merged.build()
    captions = [part.captions for part in loaded if part.captions is not None]
    target = None if out is None else Path(out) / CAPTIONS_DIR
    if captions and target is not None and is_index(target) and \
            cls.load(target).store.info("merging") is None:  # merged before the interruption
        merged._captions = None
    elif captions:  # the parts' caption collections, merged alike
        merged._captions = merge(cls, captions, out=target)
    if out is not None:
        with merged.store.transaction(bump=False):
            merged.store.set_info("merging", None)
        merged.save()
    return merged


def _check_compatible(loaded: list) -> None:
    first = loaded[0]
    for position, part in enumerate(loaded[1:], 1):
        if part.dim != first.dim:
            raise ValueError(f"part {position} holds {part.dim}-d embeddings, part 0 {first.dim}-d ones")
        if part.vectors_per_item != first.vectors_per_item:
            raise ValueError(f"part {position} keeps {part.vectors_per_item} vectors an item, part 0 "
                             f"{first.vectors_per_item}")
        if (part.model_info or {}).get("fingerprint") != (first.model_info or {}).get("fingerprint"):
            names = [(p.model_info or {}).get("name") for p in (part, first)]
            raise ModelMismatchError(f"part {position} was built by another model than part 0 ({names[0]} vs "
                                     f"{names[1]})")


def _target(cls, out, names: list[str], first, index_type: str, options: dict):
    """The index a merge writes: in memory, a new one at `out`, or the one an interrupted merge of the same
    parts left there."""
    if out is not None and Path(out).exists():
        if is_index(out):
            existing = cls.load(out)
            if existing.store.info("merging") == names:
                return existing
            if existing.store.info("merging") is not None:
                raise ValueError(f"{out} holds an unfinished merge of other parts "
                                 f"({', '.join(existing.store.info('merging'))}): give those parts again to "
                                 "finish it, or delete it and merge into a new folder")
        raise ValueError(f"{out} already exists; merge into a new folder")
    merged = cls(first.dim, model=first.model, model_info=first.model_info, index_type=index_type,
                 vectors_per_item=first.vectors_per_item, **options)
    if out is not None:
        with merged.store.transaction(bump=False):
            merged.store.set_info("merging", names)
        merged.save(out)
    return merged


def _add_part(merged, part, chunk: int, resume: bool) -> None:
    """Add `part`'s items a chunk at a time, streamed in key order from one committed state of the part
    (memory: one chunk). `resume`: those an interrupted run committed are there already; otherwise an id the
    merged index holds (from an earlier part) is a ValueError. Damaged rows (NaN, infinite, not unit length:
    flipped bytes on disk) are left out, with a warning."""
    per_item, damaged = part.vectors_per_item, 0
    with part._lock, part.store.snapshot():
        for keys, vectors in part.store.live_vectors(chunk):
            good = ~damaged_rows(vectors, per_item)
            damaged += int((~good).sum())
            keys, vectors = keys[good], vectors[good]
            by_key = part.store.records_by_key([int(k) for k in keys])
            records = [{name: value for name, value in by_key[int(k)].items() if name != "key"} for k in keys]
            ids = [record.pop("id") for record in records]
            have = merged.store.keys_for(ids)
            if have and not resume:
                raise ValueError(f"id {next(iter(have))!r} of {part.path or 'a part'} is in an earlier part too: "
                                 "merge parts whose ids do not overlap (each a `clipkit index --shard i/n`)")
            keep = [n for n, i in enumerate(ids) if i not in have]
            if keep:
                rows = vectors[keep] if per_item == 1 else vectors[keep].reshape(len(keep), per_item, -1)
                merged.add(rows, ids=[ids[n] for n in keep], metadata=[records[n] for n in keep])
    if damaged:
        log.warning("%d damaged embedding(s) of %s left out of the merge: re-index their images", damaged,
                    part.path or "a part")
