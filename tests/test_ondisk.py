"""IVF lists on disk: a saved IVF structure searches memory-mapped, read-only lists; what is added after goes
into a delta beside them, what is removed is filtered until a merge; opening catches up from the store."""

from __future__ import annotations

import json
import subprocess
import sys

import faiss
import numpy as np
import pytest

import clipkit.index.persist as persist
from clipkit.index import CONFIG_FILE, Index
from clipkit.index import ondisk
from clipkit.index.ann import empty_structure
from clipkit.index.persist import structure_files

DIM, N = 16, 3000


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_top(base: dict, queries: np.ndarray, k: int) -> list[list]:
    ids = np.asarray(list(base))
    scores = queries @ np.stack([base[i] for i in ids]).T
    return [ids[np.argsort(-row, kind="stable")[:k]].tolist() for row in scores]


def every_list(index: Index) -> None:
    """Probe every list: IVF-Flat then searches exactly, so results can be compared with numpy."""
    structure = index._structure
    structure.set_params({**structure.params, "nprobe": faiss.extract_index_ivf(structure.index).nlist})


@pytest.fixture
def saved(tmp_path):
    base = unit(N, DIM, 0)
    index = Index(DIM, index_type="IVF8,Flat", precision="float32")
    index.add(base, ids=list(range(N)))
    index.build()
    index.save(tmp_path / "ix")
    every_list(index)
    return index, {i: base[i] for i in range(N)}, tmp_path / "ix"


@pytest.mark.parametrize("factory", ["IVF8,Flat", "IVF8,PQ8x4fs", "IVF8_HNSW32,PQ16", "IVF8,PQ5x4fs",
                                     "OPQ6_18,IVF8_HNSW32,PQ6x4fs"])
def test_lists_written_to_disk_search_as_they_did_in_ram(tmp_path, factory):
    dim = 20 if "PQ5" in factory else DIM
    base = unit(2000, dim, 1)
    structure = empty_structure(factory, base)
    structure.add(base, np.arange(2000) * 3)
    structure.set_params({"nprobe": 4})
    queries = unit(40, dim, 2)
    before = structure.search(queries, 10)
    structure.write_files(tmp_path, "t")
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(structure.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only  # nothing of them in RAM
    after = structure.search(queries, 10)
    assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])
    # the delta beside them, and removals from them
    structure.add(unit(50, dim, 3), np.arange(6000, 6050))
    structure.remove(np.arange(0, 600, 3))
    assert structure.ntotal == 2000 + 50 - 200 and structure.pending() == 250
    scores, keys = structure.search(queries, 10)
    assert not np.isin(keys, np.arange(0, 600, 3)).any()
    merged = structure.write_files(tmp_path, "u")  # a merge: one set of lists again
    assert structure.pending() == 0 and structure.ntotal == 1850
    assert ondisk.read_table(tmp_path / merged["lists_file"]).count == 1850
    merged_scores, merged_keys = structure.search(queries, 10)  # (fast-scan ties may come in another order)
    assert np.allclose(merged_scores, scores, atol=1e-6) and (merged_keys == keys).mean() > 0.95


def test_changes_after_save_go_beside_the_lists_and_a_fresh_open_catches_up(saved, caplog):
    index, base, path = saved
    queries = unit(30, DIM, 5)
    assert structure_files(path)["lists"].is_file()
    new = unit(200, DIM, 6)
    index.add(new, ids=list(range(N, N + 200)))
    index.remove(list(range(0, N, 7)))
    base.update({N + i: new[i] for i in range(200)})
    for i in range(0, N, 7):
        del base[i]
    assert index._structure.sealed is not None and index._structure.pending() == 200 + len(range(0, N, 7))
    assert index.search(queries, 10)[1].tolist() == numpy_top(base, queries, 10)
    reader = Index.load(path)  # saved before the changes: catches up from the store, no rebuild
    assert "rebuilding" not in caplog.text and reader._structure.sealed is not None
    every_list(reader)
    assert reader.search(queries, 10)[1].tolist() == numpy_top(base, queries, 10)
    files = structure_files(path)
    index.save()  # few changes: the lists stay as they are (a later open catches up again)
    assert structure_files(path) == files and len(Index.load(path)) == len(base)
    index.compact()  # compaction merges them in
    assert structure_files(path) != files and index._structure.pending() == 0
    assert ondisk.read_table(structure_files(path)["lists"]).count == len(base)
    every_list(index)
    assert index.search(queries, 10)[1].tolist() == numpy_top(base, queries, 10)


def test_a_save_merges_many_changes_into_new_lists_and_readers_follow(saved, monkeypatch):
    index, base, path = saved
    reader = Index.load(path)
    reader.refresh_interval = 0
    first = structure_files(path)
    monkeypatch.setattr(persist, "MERGE_AT_LEAST", 0)
    queries = unit(30, DIM, 7)
    for round_ in range(2):
        new = unit(400, DIM, 10 + round_)
        start = N + 400 * round_
        index.add(new, ids=list(range(start, start + 400)))
        gone = [i for i in list(base)[:: 5]][:300]
        index.remove(gone)
        base.update({start + i: new[i] for i in range(400)})
        for i in gone:
            del base[i]
        index.save()
        assert index._structure.pending() == 0
        assert ondisk.read_table(structure_files(path)["lists"]).count == len(base)
        reader.search(queries, 1)  # sees the new structure version: opens the new lists
        assert reader._structure.sealed.lists_file == structure_files(path)["lists"].name
        for one in (index, reader):
            every_list(one)
            assert one.search(queries, 10)[1].tolist() == numpy_top(base, queries, 10)
    assert not first["lists"].exists() and not first["faiss"].exists()  # two saves later: dropped
    assert json.loads((path / CONFIG_FILE).read_text())["count"] == len(base)


KILLED_MERGE = """
import os, sys
import numpy as np
import clipkit.index.ondisk as ondisk
import clipkit.index.persist as persist
from clipkit.index import Index
persist.MERGE_AT_LEAST = 0
joined = ondisk._joined
def dying(list_no, *args):
    if list_no == 5:
        os._exit(9)  # as kill -9 would, halfway through writing the merged lists
    return joined(list_no, *args)
ondisk._joined = dying
index = Index.load(sys.argv[1])
index.add(np.load(sys.argv[2]), ids=list(range(3000, 3400)))
index.remove(list(range(0, 1000)))
index.save()
"""


def test_a_kill_during_the_merge_leaves_the_old_lists_and_loses_nothing(saved, tmp_path, caplog):
    index, base, path = saved
    index.close()
    new = unit(400, DIM, 8)
    np.save(tmp_path / "new.npy", new)
    run = subprocess.run([sys.executable, "-c", KILLED_MERGE, str(path), str(tmp_path / "new.npy")])
    assert run.returncode == 9
    base.update({N + i: new[i] for i in range(400)})
    for i in range(1000):
        del base[i]
    loaded = Index.load(path)  # the committed changes are in the store; the old lists still serve
    assert "rebuilding" not in caplog.text and len(loaded) == len(base)
    every_list(loaded)
    queries = unit(30, DIM, 9)
    assert loaded.search(queries, 10)[1].tolist() == numpy_top(base, queries, 10)
    loaded.save()  # the merge done this time; the half-written file is gone
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]
    every_list(loaded)
    assert loaded.search(queries, 10)[1].tolist() == numpy_top(base, queries, 10)


def test_a_truncated_lists_file_is_not_trusted(saved, caplog):
    index, base, path = saved
    lists = structure_files(path)["lists"]
    lists.write_bytes(lists.read_bytes()[:-100])
    loaded = Index.load(path)
    assert "does not match the store" in caplog.text
    every_list(loaded)
    queries = unit(10, DIM, 11)
    assert loaded.search(queries, 5)[1].tolist() == numpy_top(base, queries, 5)


def test_garbage_in_the_lists_never_gives_a_wrong_score(saved):
    """The lists are not checksummed (opening reads none of them): every score comes from the stored vectors."""
    index, base, path = saved
    lists = structure_files(path)["lists"]
    data = bytearray(lists.read_bytes())
    rng = np.random.default_rng(0)
    for position in rng.choice(np.arange(8192, len(data)), 2000, replace=False):
        data[position] ^= 0xFF
    lists.write_bytes(bytes(data))
    loaded = Index.load(path)
    every_list(loaded)
    queries = unit(20, DIM, 12)
    scores, ids = loaded.search(queries, 5)
    for row, (s, i) in enumerate(zip(scores, ids)):
        found = [(score, key) for score, key in zip(s, i) if key is not None]
        for score, key in found:
            assert abs(score - float(queries[row] @ base[key])) < 1e-5


def test_auto_replans_its_lists_only_when_the_collection_grew_or_shrank_fourfold():
    """A count crossing one of choose_structure's list-count steps keeps the structure (its lists just grow):
    only another family, or lists planned for a collection 4x smaller or larger, means a new build."""
    from clipkit.index import live
    from clipkit.index.ann import choose_structure

    index = Index(512, index_type="auto")
    with index.store.transaction(bump=False):
        index.store.set_info("planned", choose_structure("auto", 1_000_000, 512))
        index.store.set_info("built_count", 1_000_000)
    assert choose_structure("auto", 2_200_000, 512) != choose_structure("auto", 1_000_000, 512)  # a step crossed
    assert not live.outgrown(index, 1_000_001) and not live.outgrown(index, 2_200_000)
    assert not live.outgrown(index, 3_900_000) and live.outgrown(index, 4_000_000)
    assert live.outgrown(index, 240_000)  # a quarter
    assert live.outgrown(index, 40_000)  # exact search again


def test_a_save_retunes_the_search_parameters_once_the_collection_doubled(tmp_path):
    """Grown within its structure, the index keeps its lists and tunes its parameters anew on the collection as
    it is now (held-out items out of the lists meanwhile, back beside them after)."""
    centers = unit(200, DIM, 20)

    def clustered(n, seed):
        r = np.random.default_rng(seed)
        x = centers[r.integers(0, 200, n)] + 0.15 * r.standard_normal((n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    base = clustered(6000, 1)
    index = Index(DIM, index_type="IVF64,Flat", precision="float32")
    index.add(base[:2500], ids=list(range(2500)))
    index.build()
    index.save(tmp_path / "ix")
    reader = Index.load(tmp_path / "ix")
    reader.refresh_interval = 0
    before = index.store.info("tuned_count")
    index.add(base[2500:], ids=list(range(2500, 6000)))
    index.save()
    assert before == 2500 and index.store.info("tuned_count") == 6000
    assert index.tuning["estimated_recall"] >= 0.95 and len(index) == 6000
    assert json.loads((tmp_path / "ix" / CONFIG_FILE).read_text())["search_params"] == index._structure.params
    queries = clustered(200, 2)
    truth = numpy_top({i: base[i] for i in range(6000)}, queries, 10)
    for one in (index, reader, Index.load(tmp_path / "ix")):
        found = one.search(queries, 10)[1].tolist()
        assert one._structure.params == index._structure.params
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]) >= 0.93


def test_saved_lists_on_read_only_storage_search_and_catch_up(tmp_path):
    """Memory-mapped read-only lists, a delta built from the store's later commits, and nothing written."""
    from test_living_index import _tmpfs, _unmount

    media = tmp_path / "media"
    if not _tmpfs(media, "16m"):
        pytest.skip("needs root and tmpfs mounts")
    try:
        base = unit(N, DIM, 30)
        index = Index(DIM, index_type="IVF8,Flat", precision="float32")
        index.add(base[:2500], ids=list(range(2500)))
        index.build()
        index.save(media / "ix")
        index.add(base[2500:], ids=list(range(2500, N)))  # committed, never saved into the lists
        index.remove(list(range(100)))
        index.close()
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        loaded = Index.load(media / "ix")
        assert loaded.readonly and len(loaded) == N - 100 and loaded._structure.pending() == 500 + 100
        every_list(loaded)
        queries = unit(20, DIM, 31)
        alive = {i: base[i] for i in range(100, N)}
        assert loaded.search(queries, 10)[1].tolist() == numpy_top(alive, queries, 10)
        loaded.close()
    finally:
        _unmount(media)


def test_rotated_codes_live_on_disk_like_the_others(tmp_path):
    """A structure of `code_ladder`'s rotated rungs (OPQ into a wider space, 4-bit codes) is saved as head and
    lists, reopened in a fresh open, changed and merged like any IVF; the re-rank's answers are numpy's."""
    base = unit(N, DIM, 0)
    index = Index(DIM, index_type="OPQ6_18,IVF8,PQ6x4fs,RFlat", precision="float32")
    index.add(base, ids=list(range(N)))
    index.build()
    index.save(tmp_path / "ix")
    assert isinstance(index._structure.index, faiss.IndexPreTransform) and index._structure.sealed is not None
    new = unit(100, DIM, 8)
    index.add(new, ids=list(range(N, N + 100)))
    index.remove(list(range(0, N, 5)))
    expected = {**{i: base[i] for i in range(N) if i % 5}, **{N + i: new[i] for i in range(100)}}
    queries = unit(20, DIM, 9)
    reader = Index.load(tmp_path / "ix")
    for opened in (index, reader):
        opened._structure.set_params({"nprobe": 8, "k_factor": N})  # the shortlist: every item
        assert opened.search(queries, 10)[1].tolist() == numpy_top(expected, queries, 10)
    index.compact()
    assert index._structure.pending() == 0 and isinstance(Index.load(tmp_path / "ix")._structure.index,
                                                         faiss.IndexPreTransform)
    index._structure.set_params({"nprobe": 8, "k_factor": N})
    assert index.search(queries, 10)[1].tolist() == numpy_top(expected, queries, 10)
