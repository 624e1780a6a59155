"""Indexing webdataset shards in place: items read from the tars, captions from their txt members, served
and re-ranked from the bytes inside the shard."""

from __future__ import annotations

import gzip
import json
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipkit
from clipkit.cli import main
from clipkit.data.synthetic import write_synthetic
from clipkit.index import Index


@pytest.fixture(scope="module")
def demo():
    return clipkit.load_model("clipkit-demo", device="cpu")


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    return write_synthetic(tmp_path / "shards", 30, seed=8, split="test", maxcount=10, workers=1, progress=False)


def members(shard: Path) -> dict[str, dict[str, bytes]]:
    """key -> extension -> bytes, read with tarfile (the reference)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, extension = member.name.partition(".")
            out.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return out


def test_index_shards_in_place(shards, demo, tmp_path, capsys):
    spec = str(shards[0].parent / "test-{000000..000002}.tar")
    assert main(["index", spec, "--index", str(tmp_path / "ix")]) == 0
    assert "indexed 30 image(s) (30 new" in capsys.readouterr().out
    assert main(["index", str(shards[0].parent / "test-*.tar"), "--index", str(tmp_path / "ix")]) == 0  # a glob too
    assert "0 new, 0 changed), 0 moved, 30 unchanged" in capsys.readouterr().out
    index = Index.load(tmp_path / "ix")
    expected = {f"{shard.resolve()}#{key}": parts for shard in shards for key, parts in members(shard).items()}
    assert sorted(index.ids()) == sorted(expected)
    some = sorted(expected)[:6]
    images = [Image.open(io.BytesIO(expected[i]["jpg"])) for i in some]
    np.testing.assert_allclose(index.embeddings(some), clipkit.encode(images, model=demo), atol=1e-5)
    captions = {f"{i}#{n}": line for i, parts in expected.items()
                for n, line in enumerate(l.strip() for l in parts["txt"].decode().splitlines() if l.strip())}
    assert {r["id"]: r["caption"] for r in index.captions.get(sorted(captions))} == captions
    assert index.get([some[0]])[0]["caption"] == captions[some[0] + "#0"]

    hits = clipkit.search("a large red square", index, k=4, rerank=True, rerank_k=10)  # ITM reads the tars
    assert len(hits) == 4 and all("itc_score" in h.metadata and h.path is None for h in hits)
    image_hits = clipkit.search(images[2], index, k=3, modality="text")
    assert image_hits[0].metadata["image_id"] in expected

    assert main(["index", spec, "--index", str(tmp_path / "ix")]) == 0  # unchanged shards are skipped
    assert "0 new, 0 changed), 0 moved, 30 unchanged" in capsys.readouterr().out
    os.utime(shards[1], (1e9, 1e9))  # touched: read again, nothing embedded
    assert main(["index", spec, "--index", str(tmp_path / "ix")]) == 0
    assert "indexed 0 image(s)" in capsys.readouterr().out
    rewritten = shards[2]
    keep = sorted(members(rewritten))[:4]
    with tarfile.open(rewritten) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name.partition(".")[0] in keep]
    with tarfile.open(rewritten, "w") as tar:  # the shard rewritten with 4 of its 10 samples
        for member, data in kept:
            tar.addfile(member, io.BytesIO(data))
    index = Index.load(tmp_path / "ix")
    report = index.sync_shards(spec, demo)
    assert report.removed == 6 and report.embedded == 0 and len(index) == 24
    left = {i for i in captions if i.rpartition("#")[0] in set(index.ids())}  # the removed samples' captions went
    assert sorted(index.captions.ids()) == sorted(left) and len(left) < len(captions)


def test_moved_shards_are_re_pointed_not_embedded_again(shards, demo, tmp_path, capsys, monkeypatch):
    """Shards moved to another folder keep their items (new ids, the same embeddings) and captions; none is
    embedded again, no hit comes twice; a shard that is gone and not re-found is pointed out."""
    import importlib

    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(shards[0].parent / "test-{000000..000002}.tar"), "--index", ix]) == 0
    before = Index.load(ix)
    vectors = {i[len(str(shards[0].parent.resolve())):]: v for i, v in zip(before.ids(), before.embeddings())}
    captions = {c[len(str(shards[0].parent.resolve())):]: r["caption"]
                for c, r in zip(before.captions.ids(), before.captions.get(before.captions.ids()))}
    moved = tmp_path / "moved"
    shards[0].parent.rename(moved)
    encode = importlib.import_module("clipkit.encode")
    monkeypatch.setattr(encode, "embed_image_files", lambda *a, **k: pytest.fail("a moved shard was embedded again"))
    assert main(["index", str(moved / "test-{000000..000001}.tar"), "--index", ix]) == 0
    out = capsys.readouterr()
    carried = sum(c.startswith(("/test-000000.tar#", "/test-000001.tar#")) for c in captions)
    assert "0 new, 0 changed), 20 moved" in out.out
    assert f"captions: 0 embedded, {carried} moved with their images, 0 unchanged, 0 removed" in out.out
    assert f"10 item(s) of {shards[2].resolve()}, which no longer exists" in out.err  # not yet found again
    assert main(["-q", "index", str(moved / "test-{000000..000002}.tar"), "--index", ix]) == 0
    after = Index.load(ix)
    root = str(moved.resolve())
    assert len(after) == 30 and all(i.startswith(root) for i in after.ids())
    for item_id, vector in zip(after.ids(), after.embeddings()):
        np.testing.assert_allclose(vector, vectors[item_id[len(root):]], atol=1e-6)
    assert {c[len(root):]: r["caption"] for c, r in zip(after.captions.ids(), after.captions.get(after.captions.ids()))} \
        == captions
    hits = clipkit.search("a large red square", after, k=30)
    assert len({h.id for h in hits}) == 30 and all(h.metadata["shard"].startswith(root) for h in hits)
    # a shard laid out exactly like a gone one (sizes, keys, captions) but with other bytes is not taken for it
    monkeypatch.undo()
    data = bytearray((moved / "test-000002.tar").read_bytes())
    with tarfile.open(moved / "test-000002.tar") as tar:
        first = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data[first.offset_data + first.size // 2] ^= 0xFF
    (moved / "test-000002.tar").unlink()
    (tmp_path / "forged").mkdir()
    (tmp_path / "forged" / "test-000002.tar").write_bytes(bytes(data))
    assert main(["index", str(tmp_path / "forged" / "test-000002.tar"), "--index", ix]) == 0
    assert "(10 new, 0 changed), 0 moved" in capsys.readouterr().out


def test_a_folder_of_shards_is_indexed_as_its_shards(shards, demo, tmp_path, capsys):
    """`clipkit index SHARDS_DIR` (what `clipkit shards` and img2dataset write: .tar files, no images) indexes
    the shards in it, and a later run mirrors the folder: a deleted shard's items and captions go, a renamed
    one keeps its embeddings, an unchanged one is not read; a folder that also holds images is a folder."""
    folder, ix = shards[0].parent, str(tmp_path / "ix")
    (folder / "train.json").write_text("{}")  # what else such a folder holds
    assert main(["index", str(folder), "--index", ix]) == 0
    assert "indexed 30 image(s) (30 new" in capsys.readouterr().out
    index = Index.load(ix)
    reference = {f"{s.resolve()}#{k}": parts for s in shards for k, parts in members(s).items()}
    assert sorted(index.ids()) == sorted(reference)
    assert sorted(Index.from_folder(folder, demo).ids()) == sorted(reference)  # the API takes it alike
    captions = len(index.captions)
    gone = sum(len(p["txt"].decode().strip().splitlines()) for i, p in reference.items() if i.startswith(str(shards[0])))
    vectors = dict(zip(index.ids(), index.embeddings()))
    shards[0].unlink()
    shards[1].rename(folder / "renamed.tar")
    assert main(["index", str(folder), "--index", ix, "--check"]) == 0  # what it would do, reading no shard
    assert capsys.readouterr().out.splitlines() == [
        "would read 0 new and 0 changed shard(s) (their new images embedded), move 1, remove 1 gone (10 item(s)); "
        "1 unchanged (10 item(s))", f'  removed: "{shards[0].resolve()}"',
        f'  moved: "{shards[1].resolve()} -> {(folder / "renamed.tar").resolve()}"']
    assert len(Index.load(ix)) == 30
    assert main(["index", str(folder), "--index", ix]) == 0
    out = capsys.readouterr().out
    assert "0 new, 0 changed), 10 moved, 10 unchanged, 10 removed" in out
    after = Index.load(ix)
    assert len(after) == 20 and len(after.captions) == captions - gone
    assert f"{gone} removed; {captions - gone} in the index" in out
    for item_id in after.ids():
        old = item_id.replace("renamed.tar", shards[1].name)
        np.testing.assert_array_equal(after.embeddings([item_id])[0], vectors[old])
    assert not any(i.startswith(str(shards[0])) for i in after.captions.ids())
    assert main(["index", str(folder), "--index", ix]) == 0
    assert f"captions: 0 embedded, {captions - gone} unchanged, 0 removed" in capsys.readouterr().out
    Image.new("RGB", (32, 32), "red").save(folder / "cover.jpg")  # images beside them: a folder of images
    assert main(["index", str(folder), "--index", str(tmp_path / "other")]) == 0
    assert Index.load(tmp_path / "other").ids() == [str((folder / "cover.jpg").resolve())]
    (tmp_path / "photos.tar").mkdir()  # a folder of images whose name ends in .tar is a folder
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "photos.tar" / "a.jpg")
    assert main(["-q", "index", str(tmp_path / "photos.tar"), "--index", str(tmp_path / "third")]) == 0
    assert Index.load(tmp_path / "third").ids() == [str((tmp_path / "photos.tar" / "a.jpg").resolve())]


def test_shards_are_embedded_together_and_a_stopped_run_resumes(shards, demo, tmp_path):
    """The new samples of many shards go to the engine in one call (Ray starts an actor pool a call: once a
    shard made 30 shards of 10 images take 208 s instead of 7), and a run stopped midway (the engine failing
    after its first batch) records no shard it did not finish: run again, it ends with every item once."""
    from clipkit.encode import embed_image_files

    calls = []

    def engine(images, model, **options):
        calls.append(len(images))
        yield from embed_image_files(images, model, **options)

    index = Index(demo.dim, model=demo)
    report = index.sync_shards([str(s) for s in shards], demo, engine=engine, batch_size=4)
    assert calls == [30] and report.added == 30 and len(index) == 30
    reference = sorted(index.ids())
    calls.clear()
    index = Index(demo.dim, model=demo)
    assert index.sync_shards([str(s) for s in shards], demo, engine=engine, chunk=10).added == 30 and calls == [10] * 3
    calls.clear()
    engine.items_per_call = 20  # (RayEngine's: how much it takes a call)
    assert Index(demo.dim, model=demo).sync_shards([str(s) for s in shards], demo, engine=engine).added == 30
    assert calls == [20, 10]

    def failing(images, model, **options):
        batches = embed_image_files(images, model, **options)
        yield next(batches)
        raise RuntimeError("the engine stopped")

    index = Index(demo.dim, model=demo)
    index.save(tmp_path / "ix")
    with pytest.raises(RuntimeError):
        index.sync_shards([str(s) for s in shards], demo, engine=failing, batch_size=4)
    stopped = Index.load(tmp_path / "ix")
    assert len(stopped) == 4 and not stopped.store.shard_records()
    report = stopped.sync_shards([str(s) for s in shards], demo)
    assert (report.unchanged, report.added) == (4, 26) and sorted(stopped.ids()) == reference
    assert len(stopped.captions) == sum(len(p["txt"].decode().strip().splitlines())
                                        for s in shards for p in members(s).values())


def test_a_shard_set_split_over_processes_merges_to_the_whole(shards, tmp_path, capsys):
    """`--shard I/N` (torchrun's ranks, or machines) splits a webdataset's shard files over N indexes, each
    file in one of them; merged, they are the one-process index, captions and shard records too."""
    folder = str(shards[0].parent)
    assert main(["-q", "index", folder, "--index", str(tmp_path / "whole")]) == 0
    for rank in range(2):
        assert main(["-q", "index", folder, "--index", str(tmp_path / "part{rank}"), "--shard", f"{rank}/2"]) == 0
    parts = [Index.load(tmp_path / f"part{rank}") for rank in range(2)]
    files = [{i.partition("#")[0] for i in part.ids()} for part in parts]
    assert all(files) and not files[0] & files[1]  # each shard file in one part
    assert main(["-q", "merge", str(tmp_path / "merged"), str(tmp_path / "part0"), str(tmp_path / "part1")]) == 0
    merged, whole = Index.load(tmp_path / "merged"), Index.load(tmp_path / "whole")
    assert sorted(merged.ids()) == sorted(whole.ids()) and sorted(merged.captions.ids()) == sorted(whole.captions.ids())
    np.testing.assert_allclose(merged.embeddings(whole.ids()), whole.embeddings(), atol=1e-6)
    assert main(["index", folder, "--index", str(tmp_path / "merged")]) == 0  # its shards are known: none read
    assert "0 new, 0 changed), 0 moved, 30 unchanged" in capsys.readouterr().out


def test_shard_items_are_served_from_the_tar(shards, demo, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    index = Index(demo.dim, model=demo)
    index.sync_shards([str(s) for s in shards[:2]], demo)
    reference = {f"{s.resolve()}#{k}": parts for s in shards[:2] for k, parts in members(s).items()}
    with TestClient(create_app(index)) as client:
        results = client.post("/search", json={"text": "a small blue circle", "k": 3}).json()["results"]
        first = results[0]
        assert "path" not in first and client.get(first["image_url"]).content == reference[first["item_id"]]["jpg"]
        thumb = client.get(first["thumbnail_url"] + "&size=32")
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        knn = client.post("/knn-service", json={"text": "a small blue circle", "num_images": 3}).json()
        assert knn[0]["url"].endswith(first["image_url"]) and "image_path" not in knn[0] and knn[0]["caption"]
        similar = client.post("/knn-service", json={"image_url": knn[1]["url"], "num_images": 3}).json()
        assert similar[0]["id"] == knn[1]["id"]


def test_search_by_an_indexed_item(shards, demo, tmp_path, capsys, monkeypatch):
    """An id that search printed (SHARD.tar#KEY, its shard path relative or absolute) is a query for that item:
    its image, read from the shard (so it re-ranks too), or its stored vector where it has no image; a shard
    sample that is not indexed is refused, not searched as text."""
    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(shards[0]), "--index", ix]) == 0
    index = Index.load(ix)
    item = sorted(index.ids())[3]
    monkeypatch.chdir(shards[0].parent)
    relative = f"{shards[0].name}#{item.rpartition('#')[2]}"
    for query in (item, relative):
        assert main(["search", query, "--index", ix, "-k", "3", "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert hits[0]["id"] == item and hits[0]["score"] > 0.999
    assert main(["search", relative, "--index", ix, "-k", "2", "--captions", "--rerank", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and all("itc_score" in h["metadata"] for h in hits)
    Index.from_embeddings(index.embeddings(), ids=index.ids(), model=demo).save(tmp_path / "copy")  # no images
    assert main(["search", item, "--index", str(tmp_path / "copy"), "-k", "1", "--paths"]) == 0
    assert capsys.readouterr().out.strip() == item
    shards[0].rename(shards[0].with_suffix(".moved"))  # its shard gone: the stored vector is the query
    assert main(["search", item, "--index", ix, "-k", "1", "--paths"]) == 0
    assert capsys.readouterr().out.strip() == item
    other = f"{shards[1].resolve()}#{sorted(members(shards[1]))[0]}"
    assert main(["search", other, "--index", ix]) == 2
    err = capsys.readouterr().err
    assert "is not in" in err and "add --text" in err
    assert main(["search", other, "--text", "--index", ix, "-k", "1", "-q"]) == 0


def test_a_folder_of_images_names_the_shards_it_leaves_out(shards, tmp_path, capsys):
    """A folder of images that also holds .tar shards indexes its images and says which shards it left out
    (and how to index them), until the index holds them."""
    from conftest import draw_shape

    mixed = shards[0].parent
    draw_shape("red", "circle").save(mixed / "photo.png")
    ix = str(tmp_path / "ix")
    assert main(["index", str(mixed), "--index", ix]) == 0
    captured = capsys.readouterr()
    assert "indexed 1 image(s)" in captured.out and "holds 3 webdataset shard(s)" in captured.err
    assert str(shards[0]) in captured.err and "*.tar" in captured.err
    assert main(["-q", "index", str(mixed / "*.tar"), "--index", ix]) == 0
    assert main(["index", str(mixed), "--index", ix]) == 0
    assert "webdataset shard" not in capsys.readouterr().err and len(Index.load(ix)) == 31


def test_shards_in_several_folders_are_indexed_as_their_glob_indexes_them(shards, tmp_path, capsys):
    """A folder whose shards sit in subfolders (part1/, part2/) and that holds no image is indexed as the shards
    below it (it warned and indexed nothing before), the same items as its glob SOURCE/**/*.tar."""
    top = tmp_path / "collection"
    for n, shard in enumerate(shards):
        (top / f"part{n % 2}").mkdir(parents=True, exist_ok=True)
        shard.rename(top / f"part{n % 2}" / shard.name)
    ix = str(tmp_path / "ix")
    assert main(["index", str(top), "--index", ix]) == 0
    assert "webdataset shard" not in capsys.readouterr().err
    assert main(["-q", "index", str(top / "**" / "*.tar"), "--index", str(tmp_path / "glob")]) == 0
    assert len(Index.load(ix)) == 30 and sorted(Index.load(ix).ids()) == sorted(Index.load(tmp_path / "glob").ids())
    assert main(["index", str(top), "--index", ix]) == 0
    assert "0 new" in capsys.readouterr().out


def test_shard_errors(shards, tmp_path, capsys):
    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(shards[0].read_bytes()))
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "train-0.tar.gz").write_bytes(packed.read_bytes())
    for args, message in (([str(packed)], "not an uncompressed tar"),
                          ([str(tmp_path / "none-{0..1}.tar")], "shard not found"),
                          ([str(tmp_path / "none-*.tar")], "no shard matches"),
                          ([str(packed.parent / "gz")], "not an uncompressed tar"),  # a folder of .tar.gz shards
                          ([str(shards[0]), "--shard", "2/2"], "need 0 <= I < N")):
        assert main(["index", *args, "--index", str(tmp_path / "ix")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_ids_with_prefix_equals_a_scan():
    ids = ["/s/a.tar#1", "/s/a.tar#2", "/s/a.tarx#1", "/s/a.ta#1", "/s/a.tar", "/s/a.tar$", "/s/ä.tar#1",
           "/s/a.tar#\U0010fffe", 7, 12, "/t/b.tar#1"]
    index = Index.from_embeddings(np.eye(len(ids), 16, dtype=np.float32) + 0.1, ids=ids)
    for prefix in ("/s/a.tar#", "/s/", "/s/ä", "/", "/t/b.tar#1", "/nothing#"):
        expected = [i for i in ids if isinstance(i, str) and i.startswith(prefix)]
        assert index.ids_with_prefix(prefix) == expected, prefix
    with pytest.raises(ValueError, match="empty prefix"):
        index.ids_with_prefix("")


def test_shard_items_are_found_by_a_range_not_a_scan():
    """Removing a folder's or a shard's items finds them through the id index (a removal costs what it
    removes, not the size of the index), and only items of shards the predicate picks."""
    ids = ["/s/a.tar#1", "/s/a.tar#2", "/s/a.tarx#1", "/s/sub/b.tar#1", "/s2/c.tar#1", "/s/file.jpg", 7]
    meta = [{"shard": i.rpartition("#")[0]} if "#" in str(i) else {} for i in ids]
    index = Index.from_embeddings(np.eye(len(ids), 8, dtype=np.float32) + 0.1, ids=ids, metadata=meta)
    store, every = index.store, lambda shard: True
    by_id = dict(zip(ids, index.keys(ids)))
    assert list(store.shard_keys("/s/a.tar#", every)) == [by_id["/s/a.tar#1"], by_id["/s/a.tar#2"]]
    assert sorted(store.shard_keys("/s/", every)) == sorted(by_id[i] for i in ids[:4])
    assert list(store.shard_keys("/s/", lambda shard: shard.endswith("b.tar"))) == [by_id["/s/sub/b.tar#1"]]
    assert sorted(store.shards()) == ["/s/a.tar", "/s/a.tarx", "/s/sub/b.tar", "/s2/c.tar"]
    plan = store.db.execute("EXPLAIN QUERY PLAN SELECT key FROM items WHERE id >= ? AND id < ? AND path IS NULL",
                            ("/s/", "/s0")).fetchall()
    assert "USING INDEX" in str(plan) and "SCAN" not in str(plan)


def test_shard_records_of_an_older_store_move_to_their_table(shards, tmp_path, capsys):
    """Stores before the `shards` table kept the shard records as one JSON value (rewritten after every
    shard: quadratic over a LAION-size set). Such a store is read as it is, and its first writer moves the
    records into the table: its shards are still known (skipped, not read again)."""
    import json
    import sqlite3

    spec = str(shards[0].parent / "test-{000000..000002}.tar")
    assert main(["-q", "index", spec, "--index", str(tmp_path / "ix")]) == 0
    db = sqlite3.connect(tmp_path / "ix" / "meta.sqlite", isolation_level=None)
    rows = db.execute("SELECT path, size, mtime FROM shards").fetchall()
    assert len(rows) == 3
    db.execute("DROP TABLE shards")  # as an older clipkit wrote it
    db.execute("INSERT INTO info(name, value) VALUES ('shards', ?)", (json.dumps({p: [s, m] for p, s, m in rows}),))
    db.close()
    old = Index.load(tmp_path / "ix")
    assert old.store.shard_record(rows[0][0])[:2] == [rows[0][1], rows[0][2]]  # read where it is
    assert main(["index", spec, "--index", str(tmp_path / "ix")]) == 0
    assert "0 new, 0 changed), 0 moved, 30 unchanged" in capsys.readouterr().out
    db = sqlite3.connect(tmp_path / "ix" / "meta.sqlite")
    assert sorted(db.execute("SELECT path, size, mtime FROM shards").fetchall()) == sorted(rows)
    assert db.execute("SELECT 1 FROM info WHERE name = 'shards'").fetchone() is None


def test_a_merge_carries_the_shard_records_so_its_shards_are_not_read_again(shards, tmp_path, capsys, monkeypatch):
    """Shards indexed into several indexes and merged are known to the merged index: indexing the whole set
    into it reads none of them again (at LAION size, days of reading for nothing)."""
    folder = shards[0].parent
    assert main(["-q", "index", str(folder / "test-{000000..000001}.tar"), "--index", str(tmp_path / "p0")]) == 0
    assert main(["-q", "index", str(shards[2]), "--index", str(tmp_path / "p1")]) == 0
    assert main(["-q", "merge", str(tmp_path / "m"), str(tmp_path / "p0"), str(tmp_path / "p1")]) == 0
    merged = Index.load(tmp_path / "m")
    assert sorted(merged.store.shard_records()) == sorted(str(s.resolve()) for s in shards)

    def unread(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr("clipkit.index.shards.read_shard", unread)
    assert main(["index", str(folder / "test-{000000..000002}.tar"), "--index", str(tmp_path / "m")]) == 0
    assert "0 new, 0 changed), 0 moved, 30 unchanged" in capsys.readouterr().out


def test_shard_specs_expand_as_webdataset_expands_them(shards, monkeypatch):
    """clipkit names shards without importing webdataset (which imports torch): the same URLs as its
    `expand_urls`, for braces, `::` lists and ${NAME} from WDS_NAME."""
    from webdataset.shardlists import expand_urls

    from clipkit.data.shardspec import _expand_braces, expand_shards

    folder = shards[0].parent
    monkeypatch.setenv("WDS_SET", "test")
    for spec in (f"{folder}/test-{{000000..000002}}.tar", f"{folder}/test-000000.tar::{folder}/test-{{000001,000002}}.tar",
                 f"{folder}/${{SET}}-{{000000..000001}}.tar", "pipe:curl -s http://host/a-{00..03}.tar"):
        assert _expand_braces(spec) == expand_urls(spec), spec
    assert expand_shards(f"{folder}/${{SET}}-{{000000..000002}}.tar") == [str(s) for s in shards]
    with pytest.raises(ValueError, match="set WDS_NOPE"):
        expand_shards(f"{folder}/${{NOPE}}.tar")


def test_indexing_unchanged_shards_imports_no_torch(shards, tmp_path):
    import subprocess
    import sys
    import textwrap

    index_path = tmp_path / "ix"
    assert main(["-q", "index", str(shards[0].parent), "--index", str(index_path)]) == 0
    run = textwrap.dedent(f"""
        import sys
        from clipkit.cli import main
        code = main(["index", {str(shards[0].parent)!r}, "--index", {str(index_path)!r}])
        print("rc", code, "torch", "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120)
    assert "rc 0 torch False" in done.stdout and "30 unchanged" in done.stdout, done.stdout + done.stderr


def test_a_folder_of_shard_folders_is_indexed_and_mirrored(tmp_path, capsys):
    """img2dataset runs side by side (`laion/run1/*.tar`, `laion/run2/*.tar`, nothing at the top): `clipkit index
    laion` indexes every shard below it, as the glob of them does, and a shard deleted there leaves the index.
    A tree with an image anywhere is a folder of images; training's `--data FOLDER` still reads its top only."""
    from clipkit.data.shardspec import expand_shards, is_shard_folder

    root = tmp_path / "laion"
    write_synthetic(root / "run1", 20, seed=1, split="test", maxcount=10, workers=1, progress=False)
    write_synthetic(root / "run2", 10, seed=2, split="test", maxcount=10, workers=1, progress=False)
    assert main(["-q", "index", str(root), "--index", str(tmp_path / "ix")]) == 0
    assert main(["-q", "index", str(root / "*" / "*.tar"), "--index", str(tmp_path / "glob")]) == 0
    nested, globbed = Index.load(tmp_path / "ix"), Index.load(tmp_path / "glob")
    assert len(nested) == 30 and sorted(nested.ids()) == sorted(globbed.ids())
    np.testing.assert_allclose(nested.embeddings(sorted(nested.ids())), globbed.embeddings(sorted(nested.ids())),
                               atol=1e-6)
    (root / "run1" / "test-000001.tar").unlink()
    capsys.readouterr()
    assert main(["index", str(root), "--index", str(tmp_path / "ix")]) == 0
    assert "10 removed" in capsys.readouterr().out and len(Index.load(tmp_path / "ix")) == 20
    assert is_shard_folder(str(root), nested=True) and not is_shard_folder(str(root))
    Image.new("RGB", (8, 8)).save(root / "run2" / "cover.jpg")
    assert not is_shard_folder(str(root), nested=True)  # (an image anywhere: a folder of images)
    with pytest.raises(ValueError, match="a folder without .tar shards"):
        expand_shards(str(root))
