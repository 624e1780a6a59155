"""The vectors outside SQLite: memory-mapped append-only segments, their crash safety, compaction, precision and
the migration of older stores (clipkit/index/segments.py, clipkit/index/store.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import clipkit.index.segments as segments
from clipkit.errors import BrokenIndexError
from clipkit.index import DB_FILE, Index
from clipkit.index.segments import VECTORS_DIR
from clipkit.index.vectors import prepare_vectors

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    return prepare_vectors(np.random.default_rng(seed).standard_normal((n, dim)), dim)


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def columns(path) -> list[str]:
    with sqlite3.connect(path / DB_FILE) as db:
        return [row[1] for row in db.execute("PRAGMA table_info(items)")]


def test_vectors_live_in_segment_files_across_several_segments(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "SEGMENT_ROWS", 1000)
    base, queries = unit(2500, 16, 0), unit(30, 16, 1)
    index = Index(16)
    index.save(tmp_path / "ix")
    for start in range(0, 2500, 700):  # batches that straddle segment ends
        index.add(base[start:start + 700], ids=list(range(start, min(start + 700, 2500))))
    assert "embedding" not in columns(tmp_path / "ix")
    files = sorted(p.name for p in (tmp_path / "ix" / VECTORS_DIR).iterdir())
    # keys given one by one run without a gap: no key files (the store records each segment's first key)
    assert len([f for f in files if f.endswith(".vec")]) == 3 and not [f for f in files if f.endswith(".key")]
    loaded = Index.load(tmp_path / "ix")
    np.testing.assert_allclose(loaded.embeddings(), base, rtol=0, atol=2e-7)  # float32 (float16 would be 1e-3 off)
    np.testing.assert_allclose(loaded.embeddings([2499, 0, 1000]), base[[2499, 0, 1000]], rtol=0, atol=2e-7)
    _, ids = loaded.search(queries, 10)
    np.testing.assert_array_equal(ids, brute_force(base, queries, 10))
    # gaps: compaction after removals (inside the first segment, and the last items), then keys that go on
    # past the gap in the last segment, whose run then ends: those segments get key files
    index.remove(list(range(10, 20)) + list(range(2495, 2500)))
    index.compact()
    more = unit(100, 16, 2)
    index.add(more, ids=list(range(2500, 2600)))
    kept = {i: base[i] for i in range(2495) if not 10 <= i < 20} | {2500 + i: more[i] for i in range(100)}
    files = sorted(p.name for p in (tmp_path / "ix" / VECTORS_DIR).iterdir())
    assert [f.split("-")[1] for f in files if f.endswith(".key")] == ["00000.key", "00002.key"]
    for opened in (index, Index.load(tmp_path / "ix")):
        ids = sorted(kept)
        np.testing.assert_allclose(opened.embeddings(ids), np.stack([kept[i] for i in ids]), rtol=0, atol=2e-7)
        _, found = opened.search(queries, 10)
        stacked = np.stack([kept[i] for i in ids])
        np.testing.assert_array_equal(found, np.asarray(ids)[brute_force(stacked, queries, 10)])


def test_a_kill_between_writing_rows_and_committing_them_loses_only_that_batch(tmp_path):
    base = unit(300, 16, 0)
    index = Index.from_embeddings(base[:200])
    index.save(tmp_path / "ix")
    script = ("import sys, os, numpy as np\n"
              "from clipkit.index import Index\n"
              "import clipkit.index.store as store\n"
              "real = store.Store.set_info\n"
              "def dying(self, name, value):\n"
              "    if name == 'vectors':\n"
              "        os._exit(9)  # the rows are written and fsynced; the transaction never commits\n"
              "    real(self, name, value)\n"
              "store.Store.set_info = dying\n"
              "index = Index.load(sys.argv[1])\n"
              "index.add(np.load(sys.argv[2]), ids=list(range(200, 250)))\n")
    np.save(tmp_path / "more.npy", base[200:250])
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ix"), str(tmp_path / "more.npy")], env=ENV)
    assert done.returncode == 9
    vec = next((tmp_path / "ix" / VECTORS_DIR).glob("*.vec"))
    assert vec.stat().st_size == 250 * 16 * 4  # the dead process's rows are there, uncommitted
    index = Index.load(tmp_path / "ix")
    assert len(index) == 200 and 200 not in index
    index.add(base[250:300], ids=list(range(250, 300)))  # the next writer overwrites them
    assert vec.stat().st_size == 250 * 16 * 4
    np.testing.assert_allclose(Index.load(tmp_path / "ix").embeddings(), np.concatenate([base[:200], base[250:]]),
                               rtol=0, atol=2e-7)


def test_removed_rows_are_compacted_away_on_save_and_a_live_reader_keeps_searching(tmp_path):
    base, queries = unit(2000, 16, 0), unit(20, 16, 1)
    writer = Index.from_embeddings(base)
    writer.save(tmp_path / "ix")
    reader = Index.load(tmp_path / "ix")
    reader.refresh_interval = 0
    folder = tmp_path / "ix" / VECTORS_DIR
    before = sum(f.stat().st_size for f in folder.iterdir())
    writer.remove(range(0, 2000, 2))
    assert writer.store.dead_rows() == 1000
    writer.save()
    assert writer.store.dead_rows() == 0
    # half the rows; their keys now have gaps, so the segment has its key file (8 B a row)
    assert sum(f.stat().st_size for f in folder.iterdir()) == before // 2 + 1000 * 8
    kept = base[1::2]
    for index in (reader, writer, Index.load(tmp_path / "ix")):
        _, ids = index.search(queries, 5)
        np.testing.assert_array_equal(ids, np.arange(1, 2000, 2)[brute_force(kept, queries, 5)])
        np.testing.assert_allclose(index.embeddings([1, 1999]), base[[1, 1999]], atol=1e-6)


def test_a_batch_of_removed_rows_alone_is_read_past(tmp_path, monkeypatch):
    """Rows of removed items fill whole read batches until a save drops them (a folder moved away and back):
    the pass that checks every stored vector, and a rebuild, read past them instead of failing."""
    from clipkit.index.store import Store

    base = unit(300, 16, 0)
    writer = Index.from_embeddings(base, ids=[f"item{i}" for i in range(300)])
    writer.save(tmp_path / "ix")
    writer.remove([f"item{i}" for i in range(200)])
    writer.add(base[:200], ids=[f"again{i}" for i in range(200)])  # (the same vectors under new keys)
    assert writer.store.dead_rows() == 200
    real = Store.live_vectors
    monkeypatch.setattr(Store, "live_vectors", lambda self, batch=65_536: real(self, batch=50))
    reader = Index.load(tmp_path / "ix")
    reader.store.check_vectors()
    assert not reader.store.damaged
    batches = list(reader.store.live_vectors())
    assert all(len(keys) for keys, _ in batches) and sum(len(keys) for keys, _ in batches) == 300
    reader._rebuild()
    _, ids = reader.search(base[:3], 1)
    assert list(ids[:, 0]) == ["again0", "again1", "again2"]


def test_precision_auto_keeps_float32_while_exact_and_halves_for_an_approximate_structure(tmp_path):
    base, queries = unit(3000, 32, 0), unit(50, 32, 1)
    exact = Index.from_embeddings(base, index_type="auto")
    assert exact.store.vectors_state()["dtype"] == "float32"
    index = Index.from_embeddings(base, index_type="IVF16,PQ16x4fs,RFlat")
    assert index.store.vectors_state()["dtype"] == "float16"
    stored = index.embeddings()
    assert np.abs(stored - base).max() < 1e-3 and not np.array_equal(stored, base)
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert loaded.store.vectors_state()["dtype"] == "float16"
    scores, ids = loaded.search(queries, 10)
    truth = brute_force(base, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
    assert recall >= 0.9
    np.testing.assert_allclose(scores[:, 0], np.einsum("ij,ij->i", queries, stored[ids[:, 0]]), atol=1e-5)
    assert sum(f.stat().st_size for f in (tmp_path / "ix" / VECTORS_DIR).glob("*.vec")) == 3000 * 32 * 2
    with pytest.raises(ValueError, match="precision"):
        Index(8, precision="int8")


def test_a_format_2_store_is_migrated_out_of_sqlite_without_embedding_again(tmp_path):
    base = unit(30, 8, 0)
    old = tmp_path / "old.clipkit"
    old.mkdir()
    with sqlite3.connect(old / DB_FILE) as db:  # the version 2 layout: embeddings as float32 blobs in SQLite
        db.executescript("CREATE TABLE items (key INTEGER PRIMARY KEY, id UNIQUE NOT NULL, root INTEGER, path TEXT, "
                         "mtime REAL, size INTEGER, caption TEXT, extra TEXT, embedding BLOB NOT NULL);"
                         "CREATE TABLE roots (root INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL);"
                         "CREATE TABLE info (name TEXT PRIMARY KEY, value TEXT NOT NULL);")
        for key, vector in enumerate(base):
            if key != 3:  # a removed item: keys are not dense
                db.execute("INSERT INTO items VALUES (?,?,?,?,?,?,?,?,?)",
                           (key, f"item{key}", None, None, None, None, f"caption {key}", None, vector.tobytes()))
        for name, value in (("format", "clipkit-index"), ("format_version", 2), ("dim", 8), ("generation", 7),
                            ("next_key", 30), ("index_type", "flat")):
            db.execute("INSERT INTO info VALUES (?, ?)", (name, json.dumps(value)))
    migrated = Index.load(old)
    assert migrated.store.info("format_version") == 4 and "embedding" not in columns(old)
    assert len(migrated) == 29
    np.testing.assert_array_equal(migrated.embeddings([f"item{k}" for k in (0, 29)]), base[[0, 29]])
    assert migrated.get(["item5"])[0]["caption"] == "caption 5"
    _, ids = migrated.search(base[7], 1)
    assert ids[0, 0] == "item7"
    migrated.add(unit(1, 8, 5), ids=["new"])
    assert Index.load(old).keys(["new"]) == [30]


def test_a_truncated_or_missing_vector_file_is_a_one_line_error(tmp_path):
    base = unit(100, 8, 0)
    Index.from_embeddings(base).save(tmp_path / "ix")
    vec = next((tmp_path / "ix" / VECTORS_DIR).glob("*.vec"))
    with open(vec, "r+b") as file:
        file.truncate(50 * 8 * 4)
    index = Index.load(tmp_path / "ix")  # opening reads no vectors
    with pytest.raises(BrokenIndexError, match="shorter than the store records"):
        index.search(base[0], 1)
    vec.unlink()
    with pytest.raises(BrokenIndexError, match="missing"):
        Index.load(tmp_path / "ix").search(base[0], 1)


def clustered(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Embedding-like vectors: clusters around fixed centres, optionally shifted (queries across a gap)."""
    fixed = np.random.default_rng(99)
    centres, offset = fixed.standard_normal((300, dim)), fixed.standard_normal(dim)
    rng = np.random.default_rng(seed)
    return prepare_vectors(centres[rng.integers(0, 300, n)] + 0.6 * rng.standard_normal((n, dim)) + shift * offset,
                           dim)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist())]))


def test_a_build_over_its_memory_budget_streams_from_the_stored_vectors(tmp_path, monkeypatch):
    from clipkit.index.store import Store

    base, queries = clustered(60_000, 32, 0), clustered(300, 32, 1, shift=0.5)
    index = Index(32, index_type="auto", memory_budget=10_000_000)  # the float32 copies would be 38 MB
    index.save(tmp_path / "ix")
    for start in range(0, 60_000, 20_000):
        index.add(base[start:start + 20_000])

    def never(*args, **kwargs):
        raise AssertionError("a streaming build read every vector into RAM")

    monkeypatch.setattr(Store, "all_vectors", never)
    index.build(sample_queries=clustered(1000, 32, 2, shift=0.5))
    assert index.structure.startswith("IVF256,PQ8x4fs,RFlat")  # 4 bytes of codes a vector, re-ranked exactly
    assert index.tuning["queries"] == "sample queries" and index.tuning["estimated_recall"] >= 0.95
    assert index.store.vectors_state()["dtype"] == "float16"
    truth = brute_force(base, queries, 10)
    assert recall(index.search(queries, 10)[1], truth) >= 0.93
    index.save()
    loaded = Index.load(tmp_path / "ix")
    assert loaded.structure == index.structure
    assert recall(loaded.search(queries, 10)[1], truth) >= 0.93
    more = clustered(500, 32, 3)
    loaded.add(more, ids=list(range(60_000, 60_500)))
    loaded.remove(range(0, 500))
    _, ids = loaded.search(more[:50], 1)
    assert ids[:, 0].tolist() == list(range(60_000, 60_050))
    assert not set(loaded.search(queries, 10)[1].ravel().tolist()) & set(range(500))
    loaded.build()  # the remembered queries again; without them, held-out items out of the structure while tuned
    assert loaded.tuning["queries"] == "sample queries"
    held = Index(32, index_type="IVF64,PQ8x4fs,RFlat", memory_budget=1_000_000)
    held.add(base[:20_000])
    held.build()
    assert held.tuning["queries"] == "held-out items" and len(held) == 20_000
    assert recall(held.search(base[:200], 10)[1], brute_force(base[:20_000], base[:200], 10)) >= 0.9


def test_a_streaming_build_sizes_its_codes_by_the_shortlist_recall_it_estimates_from_a_sample(monkeypatch):
    """Coded in a 3,000-item sample, a true neighbour's rank scaled by 20 is its rank among all 60,000: the
    estimate matches the shortlists of the whole collection, and the build keeps the shortest codes that
    meet the goal."""
    import faiss

    from clipkit.index import tune
    from clipkit.index.ann import Structure, empty_structure, split_refine

    monkeypatch.setattr(tune, "SHORTLIST_FACTOR", 8)
    n, dim = 60_000, 32
    base, queries = clustered(n, dim, 0), clustered(400, dim, 1, shift=0.5)
    keys, rng = np.arange(n, dtype=np.int64), np.random.default_rng(5)
    collection = tune.Collection(n, dim, None, lambda: iter([(keys, base)]),
                                 lambda wanted: (base[wanted], np.ones(len(wanted), bool)))
    truth = brute_force(base, queries, 10)
    drawn = rng.permutation(n)[:3000]
    sample = (base[drawn], keys[drawn], np.zeros(0, np.int64))
    factories = ["IVF64,PQ4x4fs,RFlat", "IVF64,PQ8x4fs,RFlat"]
    estimates = {}
    for factory in factories:
        structure = empty_structure(factory, sample[0])
        estimates[factory] = tune._shortlist_recall(structure, sample, collection, queries, truth, 10)
        whole = Structure(faiss.clone_index(structure.index), split_refine(factory)[0])
        whole.add(base, keys)
        whole.set_params({"nprobe": 64 // tune.PROBED_SHARE})  # as the estimate probes
        actual = recall(whole.search(queries, 80)[1], truth)
        assert abs(estimates[factory] - actual) <= 0.05, (factory, estimates[factory], actual)
    assert estimates[factories[0]] + 0.1 < estimates[factories[1]]  # longer codes hold more of the neighbours
    middle = (estimates[factories[0]] + estimates[factories[1]]) / 2
    assert tune._pick_codes(factories, sample, collection, queries, truth, middle, 10).factory == factories[1]
    low = estimates[factories[0]] - 0.05
    assert tune._pick_codes(factories, sample, collection, queries, truth, low, 10).factory == factories[0]


def test_a_merge_killed_midway_goes_on_when_run_again(tmp_path, capsys):
    base = unit(900, 8, 0)
    for number in range(3):
        part = Index.from_embeddings(base[number * 300:(number + 1) * 300], ids=list(range(number * 300,
                                                                                         (number + 1) * 300)))
        part.save(tmp_path / f"part{number}")
    parts = [str(tmp_path / f"part{number}") for number in range(3)]
    script = ("import os, sys\n"
              "from clipkit.index import Index\n"
              "real, calls = Index.add, []\n"
              "def dying(self, *args, **kwargs):\n"
              "    real(self, *args, **kwargs)\n"
              "    calls.append(1)\n"
              "    if len(calls) == 4:\n"
              "        os._exit(9)  # killed inside the second part\n"
              "Index.add = dying\n"
              "Index.merge(sys.argv[2:], out=sys.argv[1], chunk=100)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), *parts], env=ENV)
    assert done.returncode == 9 and len(Index.load(tmp_path / "out")) == 400
    from clipkit.cli import main

    assert main(["merge", str(tmp_path / "out"), *parts]) == 0
    assert "900 items" in capsys.readouterr().out
    merged = Index.load(tmp_path / "out")
    assert sorted(merged.ids()) == list(range(900))
    np.testing.assert_allclose(merged.embeddings(list(range(900))), base, rtol=0, atol=2e-7)
    assert main(["merge", str(tmp_path / "out"), *parts]) == 2  # finished: a new merge needs a new folder
    assert "already exists" in capsys.readouterr().err


def test_a_compaction_killed_before_its_commit_leaves_the_index_as_it_was(tmp_path):
    base = unit(400, 8, 0)
    index = Index.from_embeddings(base)
    index.save(tmp_path / "ix")
    index.remove(range(0, 400, 2))
    script = ("import os, sys\n"
              "from clipkit.index import Index\n"
              "import clipkit.index.store as store\n"
              "real = store.Store.set_info\n"
              "def dying(self, name, value):\n"
              "    if name == 'vectors':\n"
              "        os._exit(9)  # the new set is written; the store still points at the old one\n"
              "    real(self, name, value)\n"
              "store.Store.set_info = dying\n"
              "Index.load(sys.argv[1]).compact()\n")
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path / "ix")], env=ENV).returncode == 9
    folder = tmp_path / "ix" / VECTORS_DIR
    assert len(list(folder.glob("*.vec"))) == 2  # the old set and the orphaned new one
    loaded = Index.load(tmp_path / "ix")
    np.testing.assert_allclose(loaded.embeddings(), base[1::2], rtol=0, atol=2e-7)
    assert loaded.compact() > 0
    assert len(list(folder.glob("*.vec"))) == 1
    np.testing.assert_allclose(Index.load(tmp_path / "ix").embeddings(), base[1::2], rtol=0, atol=2e-7)


def test_the_gpu_copy_of_exact_search_holds_neither_removed_nor_damaged_rows():
    """What ExactStructure copies to a GPU (where one is): the live rows, damaged ones told and left out."""
    from clipkit.index.ann import ExactStructure

    vectors = unit(50, 8, 0)
    vectors[7] = np.nan
    vectors[9] *= 3  # not unit length: flipped bytes
    keys, told = np.arange(50, dtype=np.int64), []
    exact = ExactStructure(8, lambda: iter([(keys[:25], vectors[:25]), (keys[25:], vectors[25:])]), 50,
                           dead=np.array([3, 30]), on_damaged=told.extend)
    kept = np.concatenate([k for k, _ in exact.live_rows()])
    assert sorted(told) == [7, 9] and set(kept.tolist()) == set(range(50)) - {3, 7, 9, 30}
    assert all(np.isfinite(v).all() for _, v in exact.live_rows())


def test_a_streaming_build_writes_its_lists_in_parts_past_their_budget(tmp_path, monkeypatch):
    """Inverted lists past their share of the memory budget go to part files, merged on disk at the end: the
    built structure searches them memory-mapped, and held-out items come back (and go again) beside them."""
    from clipkit.index import tune

    parts = []
    written = tune._written
    monkeypatch.setattr(tune, "_written", lambda *args: parts.append(1) or written(*args))
    base = clustered(20_000, 32, 0)
    index = Index(32, index_type="IVF64,PQ8x4fs,RFlat", memory_budget=400_000)  # 100 KB of lists: ~8,000 codes
    index.save(tmp_path / "ix")
    index.add(base)
    index.build()  # tuned on held-out items: out of the merged lists while tuned, then back in beside them
    assert parts and index._structure.sealed is not None
    assert index.tuning["queries"] == "held-out items" and len(index) == 20_000
    truth = brute_force(base, base[:200], 10)
    assert recall(index.search(base[:200], 10)[1], truth) >= 0.9
    index.remove(list(range(0, 20_000, 2)))
    assert len(index) == 10_000
    assert all(i % 2 for i in index.search(base[:400], 10)[1].ravel().tolist() if i is not None)
    index.save()
    assert not [p for p in (tmp_path / "ix").iterdir() if p.name.endswith(".tmp")]
    loaded = Index.load(tmp_path / "ix")
    assert len(loaded) == 10_000 and loaded.structure == index.structure
    found = loaded.search(base[1:400:2], 1)[1][:, 0].tolist()
    assert np.mean([f == i for f, i in zip(found, range(1, 400, 2))]) >= 0.9


def test_gathered_rows_equal_the_stored_ones_cached_or_not_and_a_file_cut_short_is_a_one_line_error(tmp_path):
    rng = np.random.default_rng(3)
    store = segments.Segments(tmp_path, 8)
    state = segments.new_state("float16", segment_rows=100)
    stored = rng.standard_normal((250, 8)).astype(np.float16)
    keys = np.arange(5, 255)
    state = store.append(state, keys[:130], stored[:130])
    state = store.append(state, keys[130:], stored[130:])  # three segments, the second written in two parts
    store.view(state)
    asked = np.concatenate([rng.choice(keys, 60), [0, 999, -1], keys[95:110]])  # duplicates, absent keys, a run
    expected = np.where((asked >= 5) & (asked < 255), 1, 0)[:, None] * stored[np.clip(asked - 5, 0, 249)]
    for nowait in (True, False):  # page-cache-only reads first (Linux), or plain reads
        store._nowait = nowait and hasattr(segments.os, "RWF_NOWAIT")
        for dtype in (None, np.float32):
            rows, found = store.vectors(asked, dtype=dtype)
            assert rows.dtype == (np.float16 if dtype is None else np.float32)
            np.testing.assert_array_equal(found, (asked >= 5) & (asked < 255))
            np.testing.assert_array_equal(rows.astype(np.float32), expected.astype(np.float32))
    reader = segments.Segments(tmp_path, 8, readonly=True)  # a live reader that has not read a row yet
    reader.view(state)
    passing = reader.batches(60, read=True)  # and one in the middle of a sequential pass
    first = next(passing)
    fresh = store.rewrite(state, store.batches())  # a compaction: a new set, and the old one's files deleted
    store.drop_other_sets(fresh)
    assert not list(tmp_path.glob(f"{VECTORS_DIR}/{state['set']}-*"))
    np.testing.assert_array_equal(reader.vectors(asked)[0], expected.astype(np.float32))  # still the old files
    passed = [first, *passing]  # the pass goes on over the files it began with
    np.testing.assert_array_equal(np.concatenate([k for k, _ in passed]), keys)
    np.testing.assert_array_equal(np.concatenate([v for _, v in passed]), stored.astype(np.float32))
    reader.view(store.rewrite(state, iter([(keys[:50], stored[:50])])))  # then one segment where were three
    store.view(fresh)
    if os.path.isdir("/proc/self/fd"):  # and nothing holds the deleted set open any more (its space is freed)
        held = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # (the listing's own descriptor is gone by now)
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
        assert not [link for link in held if state["set"] in link]
    with open(store.file(fresh, 2, "vec"), "r+b") as file:  # cut under a reader that mapped it whole
        file.truncate(10 * 8 * 2)
    with pytest.raises(BrokenIndexError, match="shorter than the store records"):
        store.vectors(np.asarray([254]))


def test_the_rerank_of_float16_rows_equals_numpy_with_absent_damaged_and_negative_rows():
    from clipkit.index.ann import rerank

    rng = np.random.default_rng(4)
    rows = unit(400, 32, 5).astype(np.float16)
    queries = unit(6, 32, 6)
    shortlist = rng.integers(0, 400, (6, 120))
    shortlist[0, :30] = -1  # fewer than asked
    damaged = rows.copy()
    damaged[rng.choice(400, 80, replace=False)] = np.float16(40.0)  # flipped bytes: far past a unit vector's score
    damaged[:5] = np.nan
    absent = np.zeros(400, bool)
    absent[rng.choice(400, 300, replace=False)] = True  # most not found: the rest may all score below zero

    def reference(table, gone):
        scores = np.einsum("qwd,qd->qw", table[np.maximum(shortlist, 0)].astype(np.float32), queries)
        scores[(shortlist < 0) | gone[np.maximum(shortlist, 0)] | ~(np.abs(scores) <= 1.01)] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        return np.take_along_axis(scores, top, 1), np.where(np.isfinite(np.take_along_axis(scores, top, 1)),
                                                             np.take_along_axis(shortlist, top, 1), -1)

    for table, gone in ((rows, np.zeros(400, bool)), (damaged, np.zeros(400, bool)), (rows, absent),
                        (-np.abs(rows), absent)):
        def lookup(keys, table=table, gone=gone):
            found = (keys >= 0) & ~gone[np.maximum(keys, 0)]
            return np.where(found[:, None], table[np.maximum(keys, 0)], np.float16(0)), found

        scores, keys = rerank(queries, shortlist, 10, lookup)
        want_scores, want_keys = reference(table, gone)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
        finite = np.isfinite(want_scores)
        np.testing.assert_array_equal(keys[~finite], -1)
        np.testing.assert_array_equal(np.sort(np.where(finite, keys, -1), axis=1), np.sort(want_keys, axis=1))


def test_the_tuner_skips_shortlists_too_short_even_at_every_list_and_keeps_the_first_long_enough():
    """One search of every list, 2,560 deep, tells each k_factor's recall: it must equal what the exact re-rank
    of that shortlist gives, so the skipped lengths are exactly those that could not meet the goal."""
    from clipkit.index import tune
    from clipkit.index.ann import empty_structure

    n, dim = 20_000, 32
    base, queries = clustered(n, dim, 0), clustered(200, dim, 1, shift=0.5)
    structure = empty_structure("IVF64,PQ4x4fs,RFlat", base)
    structure.add(base, np.arange(n, dtype=np.int64))
    truth = brute_force(base, queries, 10)
    split = tune._Queries(queries, truth, queries, truth)
    measured = {}
    for k_factor in tune.K_FACTORS:
        structure.set_params({"nprobe": 64, "k_factor": k_factor})
        measured[k_factor] = recall(structure.search(queries, 10)[1], truth)
    goal = (measured[4] + measured[24]) / 2  # reached between the short and the long shortlists
    first = min(kf for kf in tune.K_FACTORS if measured[kf] >= goal)
    kept = tune._k_factors(structure, split, goal, 10, "nprobe", [1, 8, 64])
    assert kept[0] == first and kept == tune.K_FACTORS[tune.K_FACTORS.index(first):]
    assert tune._k_factors(structure, split, 1.01, 10, "nprobe", [1, 8, 64]) == tune.K_FACTORS  # none reach


LOW_LIMIT = """
import resource, sys
import numpy as np
import clipkit.index.segments as segments
resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
store = segments.Segments(segments.Path(sys.argv[1]), 4)
state = segments.new_state("float16", segment_rows=10)
stored = np.arange(4 * 1000, dtype=np.float16).reshape(1000, 4)
state = store.append(state, np.arange(1000), stored)
store.view(state)  # 100 segments: a descriptor each, past the soft limit of 48
keys = np.arange(0, 1000, 7)
assert (store.vectors(keys, dtype=None)[0] == stored[keys]).all()
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_segments_past_the_open_file_limit_raise_it_or_read_through_their_maps(tmp_path, monkeypatch):
    import errno

    run = subprocess.run([sys.executable, "-c", LOW_LIMIT, str(tmp_path / "a")], capture_output=True, text=True,
                          env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    soft = run.stdout.strip()
    assert int(soft) > 48  # raised towards the hard limit (one descriptor a segment: ~1,000 at a billion)

    def no_descriptor(handle):  # a process with no descriptor left, even past its soft limit
        raise OSError(errno.EMFILE, "Too many open files")

    real_dup = segments.os.dup
    monkeypatch.setattr(segments.os, "dup", no_descriptor)
    monkeypatch.setattr(segments, "_more_descriptors", lambda: False)
    stored = np.random.default_rng(0).standard_normal((95, 4)).astype(np.float16)
    keys = np.asarray([94, 3, 4, 5, 50, 51, 200])
    for name in ("b", "c"):
        store = segments.Segments(tmp_path / name, 4)
        state = store.append(segments.new_state("float16", segment_rows=10), np.arange(95), stored)
        store.view(state)
        rows, found = store.vectors(keys, dtype=None)
        np.testing.assert_array_equal(found, keys < 95)
        np.testing.assert_array_equal(rows[:6], stored[keys[:6]])
        if name == "b":  # then descriptors to spare, on a platform without preadv (Windows)
            monkeypatch.setattr(segments.os, "dup", real_dup)
            monkeypatch.delattr(segments.os, "preadv")
