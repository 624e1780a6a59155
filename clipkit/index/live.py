"""The ANN structure kept in step with the store: what `Index` delegates to for its structure's life.

- catching up with what other processes committed (the keys added since the last one in, and the removal
  log), without reading every key or vector;
- rebuilding it from the store (exactly as recorded, or planned and tuned anew by a writer's build), in RAM
  while that fits the memory budget, else streamed from the vector files (clipkit/index/tune.py);
- trusting the saved structure's files only while they provably match the store (checksum, then caught up
  from the generation they were saved at and checked against the key-set digest);
- recording what a build chose, so that readers and later loads rebuild the same structure.

The state lives on the index (`_structure`, `_generation`, `_last_key`, `_structure_version`, `_tuning`);
these functions take the index and run under its lock.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import numpy as np

from clipkit.errors import BrokenIndexError, first_line
from clipkit.index.ann import ExactStructure, Structure, budget_or_default, candidates, choose_structure, streams
from clipkit.index.persist import FAISS_FILE, read_config
from clipkit.index.store import DB_FILE
from clipkit.index import ondisk
from clipkit.index.tune import Collection, build_streaming, build_structure, retune
from clipkit.index.vectors import damaged_rows, keys_sum, prepare_vectors

log = logging.getLogger("clipkit.index")

LISTS_SHARE = 4  # a streaming build holds at most this fraction of the memory budget as inverted lists in RAM


def catch_up(index) -> bool:
    """Under index._lock: bring the structure to the store's generation: the items added since (keys above
    the last one in) and the keys the removal log lists since then. Nothing reads every key or vector."""
    index._looked_at = time.monotonic()
    if index.store.generation() == index._generation:
        return False
    with index.store.snapshot():
        generation = index.store.generation()
        if index.store.info("structure_version", 0) != index._structure_version and load_saved_structure(index):
            return True
        new = list(index.store.vectors_after(index._last_key))
        removed = index.store.removed_since(index._generation)
        count, last = index.store.count(), index.store.last_key()
    if not apply(index, new, removed) or index._structure.ntotal != count:
        rebuild(index)  # a structure without removal, or removals older than the log (pruned by compaction)
        return True
    warn_damaged(index)
    index._generation, index._last_key = generation, last
    log.debug("caught up with generation %s: +%s -%s", generation, sum(len(k) for k, _ in new), len(removed))
    return True


def warn_damaged(index) -> None:
    """Say once which items' stored embeddings were found damaged (they are never found by a search)."""
    damaged = sorted(index.store.damaged)
    if len(damaged) > index._damaged_told:
        index._damaged_told = len(damaged)
        first = (index.store.records_by_key(damaged[:1]).get(damaged[0]) or {}).get("id")
        log.warning("%s item(s) of %s have damaged embeddings (NaN or not unit length; e.g. %r) and are never "
                    "found: `clipkit index FOLDER` embeds files again; remove and add others", len(damaged),
                    index.path or "this index", first)


def apply(index, new, removed: np.ndarray) -> bool:
    """Put committed changes into the structure: `new` (keys, vectors) batches, `removed` keys; False
    when the structure cannot remove (the caller rebuilds it from the store)."""
    done, index._last_key = put_changes(index._structure, index._last_key, new, removed)
    return done


def put_changes(structure: Structure, last_key: int, new, removed: np.ndarray) -> tuple[bool, int]:
    """(whether it could, the largest key in it now): `removed` keys out of a structure holding keys up to
    `last_key`, then the `new` (keys, vectors) batches in."""
    removed = removed[removed <= last_key]  # others were added and removed since: never in it
    if len(removed) and not structure.remove(removed):
        return False, last_key
    for keys, vectors in new:
        if len(keys):
            structure.add(vectors, keys)
            last_key = max(last_key, int(keys[-1]))
    return True, last_key


def rebuild(index, tune: bool = False, sample_queries: np.ndarray | None = None,
             index_type: str | None = None) -> Structure:
    """The structure built anew from the store; made current. Without `tune`, the structure last recorded
    with its search parameters, as they are (a reader never re-plans: that is a writer's `build`, which
    records what it built). With `tune`, the one `index_type` (default: the index's) plans, tuned; it
    leaves its report in `index._tuning` for `_record_structure`."""
    with index.store.snapshot():  # one committed state throughout
        generation, last = index.store.generation(), index.store.last_key()
        params, queries_are = index.store.info("search_params"), "sample queries"
        if tune:  # choose and tune anew (the collection may have outgrown the structure chosen for it)
            index_type, params = index_type or index.index_type, None
            if sample_queries is None:
                sample_queries, queries_are = tuning_queries(index)
        else:  # the structure last built (exact until a build), with its tuned parameters
            index_type = index.store.info("structure") or "Flat"
        options = dict(sample_queries=sample_queries, queries_are=queries_are, params=params,
                       target_recall=index.store.info("target_recall", 0.95))
        structure, index._tuning = build_from_store(index, index_type, options)
    structure.attach_vectors(partial(stored_vectors, index))  # the re-rank reads the stored vectors, not a copy
    index._structure, index._last_key, index._generation = structure, last, generation
    return structure


def build_from_store(index, index_type: str, options: dict) -> tuple[Structure, Any]:
    """Inside a snapshot: the structure of `index_type` over every stored item, with the collection in RAM
    while that fits the memory budget, else streamed from the stored vectors (clipkit/index/tune.py)."""
    count, budget, per_item = index.store.count(), index.store.info("memory_budget"), index.store.vectors_per_item
    planned = candidates(index_type, count * per_item, index.dim, budget)  # (planned for every vector)
    if planned == ["Flat"]:
        return exact_structure(index), None
    if streams(count * per_item, index.dim, budget) or per_item > 1:
        collection = stored_collection(index)
        try:
            return build_streaming(planned, collection, **options)
        finally:
            index.store.segments.release()  # the rows tuning re-ranked with: page cache, not this process
    keys, vectors = index.store.all_vectors()
    structure, tuning = build_structure(index_type, vectors, keys, memory_budget=budget, **options)
    if structure.factory == "Flat":  # the tuner found exact search fastest: it reads the stored vectors
        structure = exact_structure(index)
    return structure, tuning


def stored_collection(index) -> Collection:
    """The store's vectors as a streaming build or a re-tune reads them (never all in RAM)."""
    budget = index.store.info("memory_budget")
    return Collection(index.store.count(), index.dim, index.store.sample_items, index.store.live_vectors,
                      partial(stored_vectors, index), lists_budget=budget_or_default(budget) // LISTS_SHARE,
                      spill_dir=index.path, per_item=index.store.vectors_per_item)


RETUNE_GROWTH = 2  # a save re-tunes an IVF structure's search parameters once the collection doubled since


def retune_if_grown(index) -> bool:
    """Under the writer lock: re-tune the structure's search parameters (no rebuild) when the collection has
    grown RETUNE_GROWTH-fold since they were tuned, on the queries a build would tune on; recorded for
    readers and later loads. Whether it did."""
    structure, count = index._structure, index.store.count()
    tuned_at = index.store.info("tuned_count") or index.store.info("built_count")
    if tuned_at is None or count < RETUNE_GROWTH * int(tuned_at) or structure.factory == "Flat" or not (
            structure.sealed is not None or ondisk.sealable(structure.index)):  # (IVF: it can hold items out)
        return False
    with index.store.snapshot():
        queries, queries_are = tuning_queries(index)
        index._tuning = retune(structure, stored_collection(index), sample_queries=queries, queries_are=queries_are,
                               target_recall=index.store.info("target_recall", 0.95))
    index.store.segments.release()
    with index.store.transaction(bump=False):  # readers and later loads take the new parameters
        index._structure_version = int(index.store.info("structure_version", 0)) + 1
        index.store.set_info("structure_version", index._structure_version)
        index.store.set_info("search_params", structure.params)
        index.store.set_info("tuning", index._tuning.to_dict())
        index.store.set_info("tuned_count", count)
    return True


def exact_structure(index) -> ExactStructure:
    """Exact search over the stored vectors as committed now (removed items' rows left out)."""
    per_item = index.store.vectors_per_item
    return ExactStructure(index.dim, lambda: index.store.segments.batches(max(256, 16_384 // per_item)),
                          index.store.count(), index.store.dead_keys(), on_damaged=index.store.damaged.update,
                          per_item=per_item)


def stored_vectors(index, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vectors as stored: float16 or float32, found) of keys, from the store's segment files (an `,RFlat`
    re-rank reads these)."""
    return index.store.segments.vectors(keys, dtype=None)


def tuning_queries(index, most: int = 2000) -> tuple[np.ndarray | None, str]:
    """What a build tunes on when not given queries: those an earlier build was given (remembered in the
    store), else up to `most` of the index's caption embeddings (text-side queries: they sit across the
    modality gap from the images, as users' text queries do), else None (held-out items)."""
    remembered = index.store.tune_queries(index.dim)
    if remembered is not None:
        return remembered, "sample queries"
    try:
        captions = index.captions
    except (BrokenIndexError, PermissionError):
        captions = None
    if captions is not None and len(captions) >= 20:  # drawn from the vector files' rows: no list of every id
        _, vectors = captions.store.sample_items(most, seed=0)
        vectors = vectors[~damaged_rows(vectors, captions.vectors_per_item)]
        if len(vectors) >= 20:
            return vectors, "caption embeddings"
    return None, "held-out items"


REPLAN_GROWTH = 4  # "auto" re-plans its structure's lists once the collection has grown (or shrunk) this much


def outgrown(index, count: int) -> bool:
    """Whether "auto" must now build another structure than the one it built: another family (exact, IVF
    in RAM, streamed codes: the size or the budget crossed a line), or lists planned for a collection
    REPLAN_GROWTH times smaller or larger. Growth alone within that is served by the structure as it is (its
    lists grow; additions go beside them): no rebuild of the world each time a count crosses a step."""
    if index.index_type != "auto":
        return False
    built = index.store.info("planned", "Flat")
    now = choose_structure("auto", count * index.store.vectors_per_item, index.dim, index.store.info("memory_budget"))
    if built == now:
        return False
    if _family(built) != _family(now):
        return True
    at = index.store.info("built_count")
    return at is None or not int(at) / REPLAN_GROWTH < count < int(at) * REPLAN_GROWTH


def _family(factory: str) -> str:
    return "exact" if factory == "Flat" else "codes" if "PQ" in factory else "ivf"


def build(index, sample_queries: Any, index_type: str | None = None) -> None:
    if sample_queries is not None:
        sample_queries = prepare_vectors(sample_queries, index.dim, what="sample_queries")
    with index.writer(on_wait=log.warning):
        halve_for(index, index_type or index.index_type)
        previous = (index._structure, index._last_key, index._generation)
        try:
            structure = rebuild(index, tune=True, sample_queries=sample_queries, index_type=index_type)
            with index.store.transaction():  # the type and what was built, in one commit: a kill before it
                if index_type is not None:  # leaves the index wholly as it was
                    index.store.set_info("index_type", index_type)
                if sample_queries is not None:  # remembered: later builds (the collection grown) tune on them
                    index.store.set_tune_queries(sample_queries)
                record_structure(index, structure, structure.ntotal)
        except BaseException:  # a build that fails leaves the index as it was
            index._structure, index._last_key, index._generation = previous
            raise
        index._generation = index.store.generation()


def halve_for(index, index_type: str) -> None:
    """Precision "auto": the vectors become float16 when an approximate structure is about to be built
    (it re-ranks with them; exact search keeps float32)."""
    if index.store.info("precision", "float32") != "auto" or index.store.vectors_state()["dtype"] == "float16":
        return
    if choose_structure(index_type, index._structure.ntotal, index.dim, index.store.info("memory_budget")) != "Flat":
        index.store.compact(dtype="float16")


def record_structure(index, structure: Structure, count: int) -> None:
    """Inside a transaction: the structure in use and how it was tuned, so readers and later loads
    rebuild the same one."""
    index._structure_version = int(index.store.info("structure_version", 0)) + 1
    index.store.set_info("structure_version", index._structure_version)
    index.store.set_info("structure", structure.factory)
    index.store.set_info("search_params", structure.params)
    index.store.set_info("planned", choose_structure(index.index_type, count * index.store.vectors_per_item,
                                                    index.dim, index.store.info("memory_budget")))
    index.store.set_info("built_count", count)
    index.store.set_info("tuned_count", count)
    index.store.set_info("tuning", index._tuning.to_dict() if index._tuning is not None else None)


def load_saved_structure(index, config: dict | None = None) -> bool:
    """Use the structure's saved files if they provably hold the store as it was at the generation recorded
    (checksum), then catch up with what was committed since (the keys added after the last one in them, the
    removal log) and check the key-set digest; False (rebuild) when any of that fails."""
    config = read_config(index.path) if config is None else config
    if (index.store.info("structure") or "Flat") == "Flat":  # exact: nothing cached to trust or distrust
        index._structure = exact_structure(index)
        index._generation, index._last_key = index.store.generation(), index.store.last_key()
        index._structure_version = index.store.info("structure_version", 0)
        return True
    record = {"faiss_file": FAISS_FILE, **config}
    generation, last = record.get("faiss_generation"), record.get("faiss_last_key")
    if not isinstance(generation, int) or generation > index.store.generation() or not record["faiss_file"] or (
            last is None and generation != index.store.generation()):  # (formats before 14 record no last key)
        if index.store.count():
            log.info("the saved structure is missing or not the store's; rebuilding it from %s", DB_FILE)
        return False
    try:
        structure = Structure.read(index.path, record, config.get("structure", "Flat"), config.get("search_params"),
                                   index.store.vectors_per_item)
        if structure.dim != index.dim:
            raise ValueError("it holds vectors of another size than the store")
        with index.store.snapshot():  # one committed state to catch up with
            _catch_up_saved(index, structure, generation, index.store.last_key() if last is None else int(last),
                            int(record.get("faiss_key_sum", 0)))
            now, now_last = index.store.generation(), index.store.last_key()
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("%s does not match the store (%s); rebuilding it from %s", record["faiss_file"],
                    first_line(exc), DB_FILE)
        return False
    structure.attach_vectors(partial(stored_vectors, index))  # the file holds codes; the re-rank reads the vectors
    index._structure, index._generation, index._last_key = structure, now, now_last
    index._structure_version = config.get("structure_version", 0)
    return True


def _catch_up_saved(index, structure: Structure, generation: int, last: int, key_sum: int) -> None:
    """Bring a structure saved at `generation` (keys up to `last`, key digest `key_sum`) to the store now;
    ValueError when the result does not hold exactly the store's keys (a removal log pruned since, say)."""
    removed, added = index.store.removed_since(generation), [0]

    def counted():  # the store's later additions, their key digest summed as they go in
        for keys, vectors in index.store.vectors_after(last):
            added[0] += keys_sum(keys)
            yield keys, vectors

    if not put_changes(structure, last, counted(), removed)[0]:
        raise ValueError("items were removed since it was saved and it cannot remove them")
    removed = removed[removed <= last]
    if structure.ntotal != index.store.count() or (key_sum + added[0] - keys_sum(removed)) % 2**64 != int(
            index.store.key_sum()):
        raise ValueError("its key set does not match the store's")
