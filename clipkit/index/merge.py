"""Merging indexes (the shards of `clipkit index --shard i/n`) into one, in bounded memory and resumably.

With a target folder the merge is written there chunk by chunk: the folder's store records which parts it
merges (`merging`) and how many are done (`merge_done`), so a run killed midway, given the same parts
again, goes on from where it stopped; a finished merge clears the record, and a folder that holds anything
else is refused. Captions are merged the same way, into the target's caption collection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from clipkit.errors import ModelMismatchError
from clipkit.index.captions import CAPTIONS_DIR
from clipkit.index.store import DB_FILE


def merge(cls, parts: Sequence, *, out: str | os.PathLike | None = None, index_type: str = "flat",
          chunk: int = 50_000, **options):
    """`cls.merge` (see `clipkit.index.Index.merge`): `cls` is the Index class."""
    loaded = [p if isinstance(p, cls) else cls.load(p) for p in parts]
    if not loaded:
        raise ValueError("nothing to merge: give at least one index")
    _check_compatible(loaded)
    names = [str(p.path.resolve()) if p.path is not None else f"memory:{id(p)}" for p in loaded]
    merged = _target(cls, out, names, loaded[0], index_type, options)
    resume = merged.store.info("merge_done", 0)
    for number, part in enumerate(loaded[resume:], resume):
        _add_part(merged, part, chunk, resume=number == resume)
        if out is not None:
            with merged.store.transaction(bump=False):
                merged.store.set_info("merge_done", number + 1)
    if index_type != "flat":
        merged.build()
    captions = [part.captions for part in loaded if part.captions is not None]
    target = None if out is None else Path(out) / CAPTIONS_DIR
    if captions and target is not None and (target / DB_FILE).is_file() and \
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
        if (Path(out) / DB_FILE).is_file():
            existing = cls.load(out)
            if existing.store.info("merging") == names:
                return existing
        raise ValueError(f"{out} already exists; merge into a new folder")
    merged = cls(first.dim, model=first.model, model_info=first.model_info, index_type=index_type,
                 vectors_per_item=first.vectors_per_item, **options)
    if out is not None:
        with merged.store.transaction(bump=False):
            merged.store.set_info("merging", names)
        merged.save(out)
    return merged


def _add_part(merged, part, chunk: int, resume: bool) -> None:
    """Add `part`'s items in chunks (`resume`: those an interrupted run committed are there already)."""
    ids = part.ids()
    for start in range(0, len(ids), chunk):
        batch = ids[start:start + chunk]
        if resume:
            have = merged.store.keys_for(batch)
            batch = [i for i in batch if i not in have]
        if batch:
            records = part.get(batch)
            for record in records:
                record.pop("id")
            merged.add(part.embeddings(batch), ids=batch, metadata=records)
