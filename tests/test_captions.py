"""Captions in the index (NAME.txt beside NAME.jpg) and image -> text / text -> text search."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import clipkit
from clipkit.cli import main
from clipkit.data.synthetic import write_synthetic
from clipkit.index import Index
from clipkit.index.store import Store
from conftest import RERANK_ATOL


@pytest.fixture(scope="module")
def demo():
    return clipkit.load_model("clipkit-demo", device="cpu")


@pytest.fixture
def folder(tmp_path) -> Path:
    photos = tmp_path / "photos"
    write_synthetic(photos, 40, seed=5, split="test", layout="folder", workers=1, progress=False)
    return photos


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def test_captions_are_indexed_incrementally(folder, demo, tmp_path):
    index = Index.from_folder(folder, demo)
    index.save(tmp_path / "ix")
    expected = {f"{p.with_suffix('.jpg').resolve()}#{n}": text for p in folder.glob("*.txt")
                for n, text in enumerate(lines(p))}
    captions = Index.load(tmp_path / "ix").captions
    assert sorted(captions.ids()) == sorted(expected)
    assert {r["id"]: r["caption"] for r in captions.get(list(expected))} == expected
    np.testing.assert_allclose(captions.embeddings(list(expected)[:5]),
                               clipkit.encode(list(expected.values())[:5], model=demo), atol=1e-5)

    loaded = Index.load(tmp_path / "ix")
    assert loaded.sync_folder(folder, demo).captions.added == 0  # nothing changed: nothing embedded
    edited, gone = sorted(folder.glob("*.txt"))[:2]
    old = len(lines(edited))
    edited.write_text("a brand new caption\nand another one\n")
    gone.with_suffix(".jpg").unlink()
    report = loaded.sync_folder(folder, demo).captions
    assert report.added == 2 and report.removed == old + len(lines(gone))
    ids = loaded.captions.ids()
    assert f"{edited.with_suffix('.jpg').resolve()}#1" in ids
    assert not any(i.startswith(str(gone.with_suffix(".jpg").resolve())) for i in ids)


def test_a_folder_sync_touches_the_folder_s_captions_only(folder, demo, tmp_path, monkeypatch):
    """Syncing one folder reads its own captions, not every item and caption id of the index: an image
    moved in from another indexed folder takes its captions along (the old ones go), captions left without
    an image under the folder (a run stopped between the two stores) are swept, and another folder's
    captions stay as they are."""
    other = tmp_path / "other"
    other.mkdir()
    moved = sorted(folder.glob("*.jpg"))[0]
    index = Index.from_folder(folder, demo)
    index.sync_folder(other, demo)
    index.save(tmp_path / "ix")
    stray = str(other.resolve() / "gone.jpg") + "#0"  # a caption whose image is not indexed
    index.captions.add(clipkit.encode(["a stray caption"], model=demo), ids=[stray],
                       metadata=[{"caption": "a stray caption", "image_id": stray[:-2], "path": None}])
    before = set(index.captions.ids())
    shutil.move(moved, other / moved.name)
    shutil.move(moved.with_suffix(".txt"), other / moved.with_suffix(".txt").name)
    monkeypatch.setattr(Store, "ids", lambda self: pytest.fail("a folder sync read every id"))
    report = index.sync_folder(other, demo)  # the image is new here; its old item stays until its folder syncs
    assert report.captions.added == len(lines(other / moved.with_suffix(".txt").name))
    assert report.captions.removed == 1  # the stray caption
    new = str((other / moved.name).resolve())
    after = set(index.captions.find(list(before | {f"{new}#0"})))
    assert f"{new}#0" in after and f"{moved.resolve()}#0" in after and stray not in after
    report = index.sync_folder(folder, demo)
    assert report.removed == 1 and report.captions.removed == len(lines(other / moved.with_suffix(".txt").name))
    after = set(index.captions.find(list(before | {f"{new}#0"})))
    assert f"{new}#0" in after and f"{moved.resolve()}#0" not in after
    assert {c for c in before if not c.startswith(str(moved.resolve()) + "#") and c != stray} <= after


def test_a_moved_folder_s_captions_go_with_it_not_embedded_again(folder, demo, tmp_path, monkeypatch, capsys):
    """A renamed folder is re-pointed without embedding its images again; its captions move with them,
    embeddings kept (a caption edited on the way is the one embedded anew)."""
    import importlib

    encode_module = importlib.import_module("clipkit.encode")  # (clipkit.encode is also the function)
    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(folder), "--index", ix]) == 0
    before = Index.load(ix).captions
    old = {c: (r["caption"], v) for c, r, v in zip(before.ids(), before.get(before.ids()),
                                                   before.embeddings(before.ids()))}
    renamed = tmp_path / "renamed"
    folder.rename(renamed)
    edited = sorted(renamed.glob("*.txt"))[0]
    edited.write_text("an edited caption\n" + "".join(line + "\n" for line in lines(edited)[1:]))
    embedded = []
    real = encode_module.encode_texts
    monkeypatch.setattr(encode_module, "encode_texts", lambda texts, *a, **k: embedded.extend(texts) or real(texts, *a, **k))
    assert main(["index", str(renamed), "--index", ix]) == 0
    out = capsys.readouterr().out
    assert "0 new, 0 changed), 40 moved" in out and embedded == ["an edited caption"]
    after = Index.load(ix).captions
    assert len(after) == len(old)  # each moved; the edited one's old text replaced by its new one
    assert f"captions: 1 embedded, {len(old)} moved with their images, 0 unchanged, 1 removed" in out, out
    old_root, new_root = str(folder.resolve()), str(renamed.resolve())
    for caption_id, record, vector in zip(after.ids(), after.get(after.ids()), after.embeddings(after.ids())):
        assert caption_id.startswith(new_root) and record["image_id"] == record["path"] == caption_id.rpartition("#")[0]
        text, old_vector = old[old_root + caption_id[len(new_root):]]
        if record["caption"] != "an edited caption":
            assert record["caption"] == text and np.allclose(vector, old_vector, atol=1e-6)
    hits = clipkit.search("an edited caption", Index.load(ix), k=1, modality="text")
    assert hits[0].path == str(edited.with_suffix(".jpg").resolve())


def test_a_moved_folder_moves_a_chunk_at_a_time_and_a_stopped_run_loses_nothing(folder, demo, tmp_path,
                                                                                monkeypatch):
    """A moved folder is re-pointed MOVE_CHUNK files a transaction (so a folder of millions never holds its
    vectors at once), its captions with each chunk; a run stopped in the third chunk (which takes back the
    caption copies it made), with the ids it removed spilled to disk, run again after the folder moved on
    moves the rest: every image and caption at its new id, nothing embedded, none left at an old id."""
    import clipkit.index.sync as sync
    from clipkit._io import SpillList

    ix = tmp_path / "ix"
    Index.from_folder(folder, demo).save(ix)
    before = Index.load(ix)
    old_images = {i: v for i, v in zip(before.ids(), before.embeddings(before.ids()))}
    old_captions = {i: (r["caption"], v) for i, r, v in zip(before.captions.ids(), before.captions.get(before.captions.ids()),
                                                            before.captions.embeddings(before.captions.ids()))}
    renamed = tmp_path / "renamed"
    folder.rename(renamed)
    monkeypatch.setattr(sync, "MOVE_CHUNK", 7)
    monkeypatch.setattr(SpillList.__init__, "__defaults__", (3,))
    sizes, real_move = [], Store.move
    monkeypatch.setattr(Store, "move", lambda self, moves: sizes.append(len(moves)) or real_move(self, moves))
    real_chunk = sync._move_chunk

    def stopped(moves, *args):
        if len(sizes) == 2:
            raise KeyboardInterrupt  # (inside the third chunk's transaction)
        return real_chunk(moves, *args)

    monkeypatch.setattr(sync, "_move_chunk", stopped)
    index = Index.load(ix)
    with pytest.raises(KeyboardInterrupt):
        index.sync_folder(renamed, demo)
    monkeypatch.setattr(sync, "_move_chunk", real_chunk)
    index = Index.load(ix)
    assert len(index) == 40 and sum(i.startswith(str(renamed.resolve())) for i in index.ids()) == 14
    images = set(index.ids())  # the failed chunk took its caption copies back: none without its image
    assert len(index.captions) == len(old_captions) and {r["image_id"] for r in index.captions.get(
        index.captions.ids())} == images
    renamed = renamed.rename(tmp_path / "renamed again")  # (and moved on before the next run)
    report = index.sync_folder(renamed, demo)
    assert (report.moved, report.added, report.updated, report.unchanged) == (40, 0, 0, 0)
    assert sizes == [7, 7] + [7, 7, 7, 7, 7, 5] and report.captions.added == 0
    after = Index.load(ix)
    old_root, new_root = str(folder.resolve()), str(renamed.resolve())
    assert sorted(after.ids()) == sorted(new_root + i[len(old_root):] for i in old_images)
    np.testing.assert_allclose(after.embeddings([new_root + i[len(old_root):] for i in old_images]),
                               np.stack(list(old_images.values())), atol=1e-6)
    captions = after.captions
    assert sorted(captions.ids()) == sorted(new_root + c[len(old_root):] for c in old_captions)
    for caption_id, record, vector in zip(captions.ids(), captions.get(captions.ids()),
                                          captions.embeddings(captions.ids())):
        text, old_vector = old_captions[old_root + caption_id[len(new_root):]]
        assert record["caption"] == text and record["image_id"] == caption_id.rpartition("#")[0]
        np.testing.assert_allclose(vector, old_vector, atol=1e-6)
    assert [r["path"] for r in after.roots()] == [new_root]


def test_deleted_files_go_a_chunk_at_a_time_and_a_stopped_run_finishes_next_time(folder, demo, tmp_path,
                                                                               monkeypatch):
    """Files deleted from a folder are removed GONE_CHUNK a transaction (their keys alone held), their captions
    with them; a run stopped in the second chunk keeps the first's removal, and the next run removes the rest."""
    import clipkit.index.sync as sync

    ix = tmp_path / "ix"
    Index.from_folder(folder, demo).save(ix)
    deleted = sorted(folder.glob("*.jpg"))[:10]
    for path in deleted:
        path.unlink()
    monkeypatch.setattr(sync, "GONE_CHUNK", 4)
    real, calls = sync._remove_chunk, []

    def stopped(ids, *args):
        calls.append(len(ids))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ids, *args)

    monkeypatch.setattr(sync, "_remove_chunk", stopped)
    with pytest.raises(KeyboardInterrupt):
        Index.load(ix).sync_folder(folder, demo)
    assert len(Index.load(ix)) == 36
    monkeypatch.setattr(sync, "_remove_chunk", real)
    report = Index.load(ix).sync_folder(folder, demo)
    assert (report.removed, report.added, report.unchanged) == (6, 0, 30) and calls == [4, 4]
    after = Index.load(ix)
    kept = {str(p.resolve()) for p in folder.glob("*.jpg")}
    assert set(after.ids()) == kept
    assert {r["image_id"] for r in after.captions.get(after.captions.ids())} == kept


def stop_at_page(monkeypatch, page: int) -> list:
    """`sync.remove_page` made to stop (KeyboardInterrupt) at its `page`th call, once; the sizes of the pages it
    took."""
    import clipkit.index.sync as sync

    real, taken, calls = sync.remove_page, [], []

    def stopping(*args):
        calls.append(1)
        if len(calls) == page:
            taken.append("stopped")
            raise KeyboardInterrupt
        count, *rest = real(*args)
        taken.append(count)
        return count, *rest

    monkeypatch.setattr(sync, "remove_page", stopping)
    return taken


def test_removing_a_folder_goes_a_page_at_a_time_and_a_stopped_removal_finishes_next_time(folder, demo, tmp_path,
                                                                                       monkeypatch):
    """`clipkit remove FOLDER` removes REMOVE_CHUNK items a transaction (their keys alone held), captions with
    them: stopped in its third page, the index keeps the first two pages' removal and every other item and
    caption; the same command again removes the rest."""
    import clipkit.index.sync as sync

    ix = tmp_path / "ix"
    shards = write_synthetic(folder / "shards", 12, seed=2, split="test", maxcount=6, workers=1, progress=False)
    index = Index.from_folder(folder, demo)
    index.sync_shards([str(s) for s in shards], demo, progress=False)
    index.save(ix)
    images, captions = len(index), len(index.captions)
    monkeypatch.setattr(sync, "REMOVE_CHUNK", 7)
    taken = stop_at_page(monkeypatch, 3)
    assert main(["-q", "remove", str(folder), "--index", str(ix)]) == 130  # (interrupted: run it again)
    assert taken == [7, 7, "stopped"]
    stopped = Index.load(ix)
    assert len(stopped) == images - 14
    image_ids = set(stopped.ids())
    assert {r["image_id"] for r in stopped.captions.get(stopped.captions.ids())} == image_ids  # none dangling
    assert len(stopped.captions) < captions
    taken.clear()
    assert main(["remove", str(folder), "--index", str(ix)]) == 0
    assert taken == [7] * ((images - 14) // 7) + [(images - 14) % 7]
    after = Index.load(ix)
    assert len(after) == 0 and len(after.captions) == 0 and after.roots() == []
    assert after.store.shard_records() == {}  # (indexing a shard again reads it anew)
    after.sync_shards([str(shards[0])], demo, progress=False)
    assert len(after) == 6


@pytest.mark.parametrize("how", ["folder", "missing"])
def test_a_removal_killed_between_images_and_captions_leaves_no_caption_behind(folder, demo, tmp_path, how):
    """kill -9 after a page's images were removed and before their captions went: the same command run again
    drops those captions too (no caption is left whose image is gone, for image -> text search to return)."""
    import subprocess
    import sys

    ix = tmp_path / "ix"
    Index.from_folder(folder, demo).save(ix)
    if how == "missing":
        shutil.rmtree(folder)
    command = ["remove", "--missing"] if how == "missing" else ["remove", str(folder)]
    script = ("import os, sys\n"
              "import clipkit.index.sync as sync, clipkit.index.captions as captions\n"
              "from clipkit.cli import main\n"
              "sync.REMOVE_CHUNK = 15\n"
              "real, calls = captions.captions_of_images, []\n"
              "def dying(*args):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        os._exit(9)  # the second page's images removed, its captions not\n"
              "    return real(*args)\n"
              "captions.captions_of_images = dying\n"
              "main(sys.argv[1:])\n")
    assert subprocess.run([sys.executable, "-c", script, *command, "--index", str(ix)]).returncode == 9
    stopped = Index.load(ix)
    assert len(stopped) == 10
    assert {r["image_id"] for r in stopped.captions.get(stopped.captions.ids())} > set(stopped.ids())  # (left)
    assert main(["-q", *command, "--index", str(ix)]) == 0
    after = Index.load(ix)
    assert len(after) == 0 and len(after.captions) == 0


def test_index_remove_killed_between_images_and_captions_is_finished_by_the_same_call(folder, demo, tmp_path):
    """`Index.remove(ids)` killed after its images went and before their captions: the same call again removes
    those captions (the ids count as there) instead of refusing them as unknown; an unknown id is still a
    ValueError that removes nothing."""
    import subprocess
    import sys

    ix = tmp_path / "ix"
    Index.from_folder(folder, demo).save(ix)
    ids = sorted(Index.load(ix).ids())[:5]
    script = ("import json, os, sys\n"
              "import clipkit.index.captions as captions\n"
              "from clipkit.index import Index\n"
              "captions.captions_of_images = lambda *args: os._exit(9)  # the images removed, not their captions\n"
              "Index.load(sys.argv[1]).remove(json.loads(sys.argv[2]))\n")
    assert subprocess.run([sys.executable, "-c", script, str(ix), json.dumps(ids)]).returncode == 9
    stopped = Index.load(ix)
    assert len(stopped) == 35 and {r["image_id"] for r in stopped.captions.get(stopped.captions.ids())} >= set(ids)
    with pytest.raises(ValueError, match="1 id\\(s\\) not in the index"):
        stopped.remove(ids + ["never indexed"])
    assert len(stopped.captions) == len(Index.load(ix).captions)  # (nothing removed)
    assert stopped.remove(ids[:2] + [sorted(stopped.ids())[0]]) == 3
    after = Index.load(ix)  # that removal also took the captions the killed call still owed (ids[2:])
    assert len(after) == 34
    assert {r["image_id"] for r in after.captions.get(after.captions.ids())} == set(after.ids())
    assert after.store.caption_debt() == []
    with pytest.raises(ValueError, match="3 id\\(s\\) not in the index"):
        stopped.remove(ids[2:])  # (gone for good now, as any unknown id)


@pytest.mark.parametrize("how", ["api", "folder"])
def test_a_removal_killed_before_its_captions_and_never_run_again_leaves_them_to_the_next_writer(folder, demo,
                                                                                                 tmp_path, how):
    """The images' ids are recorded in the transaction that removes them: killed before their captions went,
    and not run again, the next command that writes the index (here a save, and `clipkit index` of another
    folder) removes those captions (image -> text search would return captions of images no longer indexed)."""
    import subprocess
    import sys

    ix = tmp_path / "ix"
    Index.from_folder(folder, demo).save(ix)
    ids = sorted(Index.load(ix).ids())[:5]
    call = (f"Index.load(sys.argv[1]).remove({ids!r})" if how == "api" else
            f"from clipkit.cli import main; main(['remove', {str(folder)!r}, '--index', sys.argv[1]])")
    script = ("import os, sys\n"
              "import clipkit.index.captions as captions\n"
              "from clipkit.index import Index\n"
              "captions.captions_of_images = lambda *args: os._exit(9)  # the images removed, not their captions\n"
              f"{call}\n")
    assert subprocess.run([sys.executable, "-c", script, str(ix)]).returncode == 9
    stopped = Index.load(ix)
    left = {r["image_id"] for r in stopped.captions.get(stopped.captions.ids())} - set(stopped.ids())
    assert len(left) == (5 if how == "api" else 40) and stopped.store.caption_debt(100) != []
    if how == "api":
        stopped.save()
    else:
        other = tmp_path / "other"
        write_synthetic(other, 3, seed=9, split="test", layout="folder", workers=1, progress=False)
        assert main(["-q", "index", str(other), "--index", str(ix)]) == 0
    after = Index.load(ix)
    assert {r["image_id"] for r in after.captions.get(after.captions.ids())} == set(after.ids())
    assert len(after) == (35 if how == "api" else 3) and after.store.caption_debt() == []


def test_a_sync_drops_the_captions_of_deleted_files_before_it_embeds(folder, demo, tmp_path):
    """A folder's sync dropped the captions of its deleted files at its end, after embedding every new image
    (hours on a large folder, while image -> text search returned them; a run stopped midway left them). They
    go now with their images, before anything is embedded."""
    from PIL import Image

    ix = tmp_path / "ix"
    Index.from_folder(folder, demo).save(ix)
    deleted = sorted(folder.glob("*.jpg"))[:2]
    for image in deleted:
        image.unlink()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "new.png")

    def stopped_engine(paths, model, **options):  # (the run is stopped as it starts embedding)
        raise KeyboardInterrupt
        yield

    with pytest.raises(KeyboardInterrupt):
        Index.load(ix).sync_folder(folder, demo, engine=stopped_engine)
    after = Index.load(ix)
    left = {r["image_id"] for r in after.captions.get(after.captions.ids())}
    assert len(after) == 38 and left == set(after.ids())
    report = Index.load(ix).sync_folder(folder, demo).captions  # (the run again: nothing more to drop)
    assert report.removed == 0


def test_shards_gone_from_a_folder_go_a_page_at_a_time_and_keep_their_records_till_empty(tmp_path, demo,
                                                                                      monkeypatch):
    """Shards deleted from an indexed folder of shards are removed REMOVE_CHUNK items a transaction; a run
    stopped midway keeps the records that find the rest (a gone shard's record goes with its last item), so
    the next run removes them; `remove --missing` pages the same way."""
    import clipkit.index.sync as sync

    shards = write_synthetic(tmp_path / "shards", 30, seed=3, split="test", maxcount=10, workers=1, progress=False)
    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(shards[0].parent), "--index", ix]) == 0
    shards[0].unlink()
    shards[1].unlink()
    monkeypatch.setattr(sync, "REMOVE_CHUNK", 6)
    taken = stop_at_page(monkeypatch, 3)
    assert main(["-q", "index", str(shards[0].parent), "--index", ix]) == 130
    stopped = Index.load(ix)
    assert len(stopped) == 18 and set(stopped.store.shard_records()) == {str(s) for s in shards[1:]}
    taken.clear()
    assert main(["-q", "index", str(shards[0].parent), "--index", ix]) == 0
    after = Index.load(ix)
    assert taken == [6, 2] and len(after) == 10 and set(after.store.shard_records()) == {str(shards[2])}
    assert all(i.startswith(f"{shards[2]}#") for i in after.ids() + after.captions.ids())
    shards[2].unlink()
    taken.clear()
    assert main(["-q", "remove", "--missing", "--index", ix]) == 0
    assert taken == [6, 4] and len(Index.load(ix)) == 0


def test_a_move_killed_between_captions_and_images_leaves_nothing_dangling(folder, demo, tmp_path):
    """kill -9 after a chunk's captions were copied and before its images moved leaves those copies; run
    again after the folder moved on elsewhere, the sync drops them: every caption at its image, none without."""
    import subprocess
    import sys

    ix = tmp_path / "ix"
    Index.from_folder(folder, demo).save(ix)
    before = Index.load(ix).captions
    texts, count = sorted(r["caption"] for r in before.get(before.ids())), len(before)
    first = tmp_path / "first"
    folder.rename(first)
    script = ("import os, sys\n"
              "import clipkit, clipkit.index.sync as sync\n"
              "from clipkit.index import Index\n"
              "sync.MOVE_CHUNK = 15\n"
              "real, calls = sync._move_chunk, []\n"
              "def dying(*args):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        os._exit(9)  # the second chunk's captions copied, its images not moved\n"
              "    return real(*args)\n"
              "sync._move_chunk = dying\n"
              "Index.load(sys.argv[1]).sync_folder(sys.argv[2], clipkit.load_model('clipkit-demo', device='cpu'))\n")
    assert subprocess.run([sys.executable, "-c", script, str(ix), str(first)]).returncode == 9
    stopped = Index.load(ix)
    assert len(stopped.captions) > count  # (the copies the kill left)
    second = first.rename(tmp_path / "second")
    report = Index.load(ix).sync_folder(second, demo)
    assert (report.moved, report.added) == (40, 0) and report.captions.added == 0
    after = Index.load(ix)
    records = after.captions.get(after.captions.ids())
    assert sorted(r["caption"] for r in records) == texts
    assert {r["image_id"] for r in records} <= set(after.ids())
    assert all(r["id"].startswith(str(second.resolve()) + "/") for r in records)


def test_image_to_text_and_text_to_text_search(folder, demo, tmp_path):
    index = Index.from_folder(folder, demo)
    image = sorted(folder.glob("*.jpg"))[3]
    hits = clipkit.search(image, index, k=5, modality="text")
    assert len(hits) == 5 and all(h.metadata["caption"] and h.path == h.metadata["image_id"] for h in hits)
    vectors = index.captions.embeddings([h.id for h in hits])
    query = clipkit.encode([image], model=demo)[0]
    np.testing.assert_allclose([h.score for h in hits], vectors @ query, atol=1e-5)  # cosine, best first
    text = lines(image.with_suffix(".txt"))[0]
    assert clipkit.search(text, index, k=1, modality="text")[0].metadata["caption"] == text  # text -> text
    reranked = clipkit.search(image, index, k=5, modality="text", rerank=True)  # the same ITM head scores them
    assert all("itc_score" in h.metadata for h in reranked)
    with pytest.raises(ValueError, match="without re-ranking"):
        clipkit.search(text, index, k=5, modality="text", rerank=True)
    with pytest.raises(ValueError, match="'image' or 'text'"):
        clipkit.search(text, index, modality="audio")
    bare = Index.from_embeddings(clipkit.encode(["x"], model=demo))
    with pytest.raises(ValueError, match="holds no captions"):
        clipkit.search("x", bare, modality="text")


def test_most_images_find_one_of_their_captions(folder, demo):
    """The issue's bar for the demo model: an image's own caption in its top 5 for most images."""
    index = Index.from_folder(folder, demo)
    images = sorted(folder.glob("*.jpg"))
    found = [any(h.metadata["image_id"] == str(p.resolve())
                 for h in clipkit.search(p, index, k=5, modality="text")) for p in images]
    assert np.mean(found) >= 0.6, np.mean(found)


def test_cli_captions_and_a_moved_folder(folder, tmp_path, capsys):
    index_path = tmp_path / "ix"
    assert main(["index", str(folder), "--index", str(index_path)]) == 0
    total = sum(len(lines(p)) for p in folder.glob("*.txt"))
    assert f"captions: {total} embedded" in capsys.readouterr().out
    image = sorted(folder.glob("*.jpg"))[0]
    assert main(["search", str(image), "--index", str(index_path), "--captions", "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all("(" in line and ".jpg)" in line for line in out)
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    assert main(["index", str(moved), "--index", str(index_path)]) == 0
    assert "0 new" in capsys.readouterr().out
    ids = Index.load(index_path).captions.ids()
    assert len(ids) == total and all(i.startswith(str(moved.resolve())) for i in ids)


def test_eval_on_a_caption_folder_agrees_with_search(folder, demo, capsys):
    from clipkit.evaluate import run_benchmark

    report = run_benchmark(f"folder:{folder}", model="clipkit-demo", device="cpu")
    index = Index.from_folder(folder, demo)
    pairs = [(text, str(p.with_suffix(".jpg").resolve())) for p in sorted(folder.glob("*.txt")) for text in lines(p)]
    assert report["n_texts"] == len(pairs) and report["n_images"] == 40
    top1 = np.mean([clipkit.search(text, index, k=1)[0].id == image for text, image in pairs])
    assert abs(report["itc"]["t2i"]["R@1"] - top1) < 1e-9  # the benchmark's recall, by the search path
    ranks = [[h.id for h in clipkit.search(text, index, k=40)].index(image) + 1 for text, image in pairs]
    assert report["itc"]["t2i"]["mean_rank"] == pytest.approx(np.mean(ranks))
    assert report["itc"]["t2i"]["median_rank"] == pytest.approx(np.median(ranks))
    i2t = np.mean([any(h.metadata["image_id"] == str(p.resolve())
                       for h in clipkit.search(p, index, k=5, modality="text")) for p in sorted(folder.glob("*.jpg"))])
    assert abs(report["itc"]["i2t"]["R@5"] - i2t) < 1e-9
    assert main(["eval", "--dataset", "folder:/no/such/folder"]) == 2


def test_images_without_captions_are_left_out_of_an_evaluation_and_counted(folder, caplog):
    from clipkit.data.captions import read_folder_set

    for path in sorted(folder.glob("*.txt"))[:3]:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        data = read_folder_set(folder)
    assert len(data.images) == 37
    assert f"3 of the 40 images in {folder} have no captions" in caplog.text


def test_removing_images_removes_their_captions(folder, demo, tmp_path):
    index = Index.from_folder(folder, demo)
    index.save(tmp_path / "ix")
    first = str(sorted(folder.glob("*.jpg"))[0].resolve())
    before = index.captions.ids()
    with pytest.MonkeyPatch.context() as patch:  # a removal reads no list of every id (items or captions)
        patch.setattr(Store, "ids", lambda self: pytest.fail("a removal read every id"))
        index.remove([first])
    assert index.captions.ids() == [c for c in before if not c.startswith(first + "#")] != before
    shutil.rmtree(folder)
    assert main(["remove", "--missing", "--index", str(tmp_path / "ix")]) == 0
    assert len(Index.load(tmp_path / "ix").captions) == 0


@pytest.mark.parametrize("rerank", [False, True])
def test_server_searches_captions_as_the_library_does(folder, demo, rerank):
    pytest.importorskip("fastapi")
    import base64

    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    index = Index.from_folder(folder, demo)
    image = sorted(folder.glob("*.jpg"))[2]
    with TestClient(create_app(index)) as client:
        body = {"image": base64.b64encode(image.read_bytes()).decode(), "k": 5, "modality": "text", "rerank": rerank}
        results = client.post("/search", json=body).json()["results"]
        expected = clipkit.search(image, index, k=5, modality="text", rerank=rerank)
        assert [r["item_id"] for r in results] == [h.id for h in expected]
        np.testing.assert_allclose([r["score"] for r in results], [h.score for h in expected], atol=RERANK_ATOL)
        assert all(r["caption"] and r["path"] == index.get_by_key([r["id"]])[0]["path"] for r in results)
        refused = client.post("/search", json={"text": "a red circle", "modality": "text", "rerank": True})
        assert refused.status_code == 400 and "without re-ranking" in refused.json()["detail"]
        images = client.post("/search", json={"text": "a red circle", "k": 5, "rerank": rerank}).json()["results"]
        # image hits carry their first caption (what the page shows under each picture, as clip-retrieval's do)
        assert [r["caption"] for r in images] == [lines(Path(r["path"]).with_suffix(".txt"))[0] for r in images]


def test_clip_retrieval_text_modality_searches_captions(folder, demo):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    index = Index.from_folder(folder, demo)
    with TestClient(create_app(index)) as client:
        body = '{"text": "a small red circle", "modality": "text", "num_images": 4, "deduplicate": true}'
        reply = client.post("/knn-service", content=body, headers={"content-type": "text/plain"}).json()
    expected = clipkit.search("a small red circle", index, k=16, modality="text")
    assert len(reply) == 4 and all(item["caption"] and item["url"] for item in reply)
    assert reply[0]["caption"] == expected[0].metadata["caption"]
    np.testing.assert_allclose(reply[0]["similarity"], expected[0].score, atol=1e-4)


def test_page_searches_captions_by_image_in_chromium(folder, demo, tmp_path):
    """clipkit's own page: with "Find captions", an uploaded image lists the captions nearest to it."""
    pytest.importorskip("fastapi")
    from conftest import chromium, running_server

    index = Index.from_folder(folder, demo)
    index.save(tmp_path / "ix")
    image = sorted(folder.glob("*.jpg"))[3]
    expected = clipkit.search(image, index, k=20, modality="text")
    with running_server("--index", str(tmp_path / "ix")) as url, chromium() as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select, WebDriverWait

        wait = WebDriverWait(driver, 60)
        driver.get(url)
        wait.until(lambda d: "images indexed" in d.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "modality-field").is_displayed()  # the index holds captions
        Select(driver.find_element(By.ID, "modality")).select_by_value("text")
        driver.find_element(By.ID, "image-input").send_keys(str(image))
        wait.until(lambda d: "captions for" in d.find_element(By.ID, "status").text)
        shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#results .caption")]
        assert shown == [h.metadata["caption"] for h in expected]
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))


def _strip_txt(folder: Path) -> dict[str, list[str]]:
    """Remove the folder's caption files; file name -> its captions."""
    captions = {}
    for txt in sorted(folder.glob("*.txt")):
        captions[txt.with_suffix(".jpg").name] = lines(txt)
        txt.unlink()
    return captions


def test_eval_takes_the_user_s_data_by_its_path(folder, tmp_path, capsys, caplog):
    """`clipkit eval --dataset PATH`: the same pairs as a folder, as shards (a folder of them, a .tar, a glob)
    and as a caption table give the same recall; a table's missing images are left out with a warning."""
    from clipkit.data.shards import samples_from_folder, write_shards

    shards = write_shards(samples_from_folder(folder), tmp_path / "shards", maxcount=15, progress=False)
    rows = [(str(p.with_suffix(".jpg")), text) for p in sorted(folder.glob("*.txt")) for text in lines(p)]
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n" + "".join(f'{image},"{text}"\n' for image, text in rows + [("gone.jpg", "x")]))
    results = {}
    for dataset in (f"folder:{folder}", str(folder), str(tmp_path / "shards"), f"folder:{tmp_path / 'shards'}",
                    str(tmp_path / "shards" / "*.tar"), str(table)):
        assert main(["eval", "--dataset", dataset, "--json", str(tmp_path / "r.json")]) == 0, dataset
        report = json.loads((tmp_path / "r.json").read_text())
        results[dataset] = (report["n_images"], report["n_texts"], report["itc"])
    assert len(shards) == 3 and len({json.dumps(r, sort_keys=True) for r in results.values()}) == 1, results
    assert results[str(table)][:2] == (40, len(rows)) and "1 image(s) listed in" in caplog.text
    assert main(["eval", "--dataset", str(shards[0])]) == 0
    assert "15 images" in capsys.readouterr().out
    assert main(["eval", "--dataset", "no-such-set"]) == 2
    assert "or the path of a folder" in capsys.readouterr().err


def test_eval_of_an_index_uses_its_stored_embeddings(folder, tmp_path, capsys, monkeypatch):
    """`clipkit eval --dataset INDEX`: the recall of the captioned images an index holds, from the embeddings it
    stores (no model loaded: the same numbers as embedding the folder again); --n-images: a random sample."""
    import clipkit.models

    assert main(["eval", "--dataset", str(folder), "--json", str(tmp_path / "folder.json")]) == 0
    assert main(["-q", "index", str(folder), "--index", str(tmp_path / "ix")]) == 0
    monkeypatch.setattr(clipkit.models, "load_model", lambda *a, **k: pytest.fail("no model is needed"))
    assert main(["eval", "--dataset", str(tmp_path / "ix"), "--json", str(tmp_path / "ix.json")]) == 0
    assert "index:ix: 40 images" in capsys.readouterr().out  # (was: "no image in ix has a caption file")
    embedded, stored = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("folder", "ix"))
    assert stored["model"] == "clipkit-demo" and (stored["n_images"], stored["n_texts"]) == (
        embedded["n_images"], embedded["n_texts"])
    for direction in ("t2i", "i2t"):
        for name, value in embedded["itc"][direction].items():
            assert stored["itc"][direction][name] == pytest.approx(value, abs=1e-6), (direction, name)
    assert main(["eval", "--dataset", str(tmp_path / "ix"), "--n-images", "10", "--json",
                 str(tmp_path / "s.json")]) == 0
    sample = json.loads((tmp_path / "s.json").read_text())
    assert sample["n_images"] == 10 and 10 <= sample["n_texts"] < embedded["n_texts"]
    monkeypatch.undo()
    for name, dataset in (("folder", folder), ("ix", tmp_path / "ix")):  # re-ranked: the index's model loaded
        assert main(["eval", "--dataset", str(dataset), "--rerank", "--json", str(tmp_path / f"{name}.json")]) == 0
    embedded, stored = (json.loads((tmp_path / f"{name}.json").read_text())["rerank"] for name in ("folder", "ix"))
    for direction in ("t2i", "i2t"):
        assert stored[direction] == pytest.approx(embedded[direction], abs=1e-6), direction
    assert main(["eval", "--dataset", str(tmp_path / "ix"), "--model", "clipkit-tiny"]) == 2
    assert "leave out --model to evaluate them with it" in capsys.readouterr().err
    Index.from_embeddings(np.eye(3, 8, dtype=np.float32)).save(tmp_path / "bare")
    assert main(["eval", "--dataset", str(tmp_path / "bare")]) == 2
    assert "holds no captions to evaluate with" in capsys.readouterr().err


def test_itc_ranks_a_block_at_a_time_equal_the_dense_matrix_s(monkeypatch):
    """ITC alone never holds the captions x images matrix: its blocks give the ranks the dense matrix gives,
    images of one vector or of several (BLIP-2)."""
    import clipkit.evaluate as evaluate

    rng = np.random.default_rng(0)
    texts = rng.standard_normal((50, 8)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=-1, keepdims=True)
    mapping = np.concatenate([np.arange(20), rng.integers(0, 20, 30)])
    for shape in ((20, 8), (20, 4, 8)):
        images = rng.standard_normal(shape).astype(np.float32)
        images /= np.linalg.norm(images, axis=-1, keepdims=True)
        t2i, i2t, dense = evaluate._itc_ranks(texts, images, mapping, dense=True)
        monkeypatch.setattr(evaluate, "BLOCK_CELLS", 30)  # (a row or two at a time)
        blocked = evaluate._itc_ranks(texts, images, mapping, dense=False)
        monkeypatch.undo()
        assert dense.shape == (50, 20) and blocked[2] is None
        assert (blocked[0] == t2i).all() and (blocked[1] == i2t).all() and t2i.min() == 1 and t2i.max() > 1


def test_an_evaluation_past_memory_is_refused_with_what_to_do():
    from clipkit.evaluate import check_fits

    check_fits(25_000, 5_000)  # COCO's test split: fine
    with pytest.raises(ValueError, match="--n-images N"):
        check_fits(50_000_000, 10_000_000)


def test_index_a_caption_table(folder, demo, tmp_path, capsys):
    """`clipkit index TABLE.csv`: the images it lists, with its captions; incremental on the table's rows."""
    captions = _strip_txt(folder)
    names = sorted(captions)[:30]
    table = folder / "captions.csv"
    rows = [(name, text) for name in names for text in captions[name]] + [("gone.jpg", "a missing image")]
    table.write_text("image,caption\n" + "".join(f'{name},"{text}"\n' for name, text in rows))
    assert main(["-q", "index", str(table), "--index", str(tmp_path / "ix")]) == 0
    index = Index.load(tmp_path / "ix")
    assert sorted(Path(i).name for i in index.ids()) == names  # the ten images it does not list are left out
    expected = {f"{(folder / name).resolve()}#{n}": text for name in names for n, text in enumerate(captions[name])}
    assert {r["id"]: r["caption"] for r in index.captions.get(sorted(expected))} == expected
    assert len(index.captions) == len(expected)

    rows[0] = (names[0], "an edited caption")  # one row edited: only its caption is embedded again
    table.write_text("image,caption\n" + "".join(f'{name},"{text}"\n' for name, text in rows))
    assert main(["index", str(table), "--index", str(tmp_path / "ix")]) == 0
    out = capsys.readouterr()
    assert "0 new, 0 changed" in out.out and "captions: 1 embedded" in out.out and "gone.jpg" in out.err
    hits = clipkit.search("an edited caption", Index.load(tmp_path / "ix"), k=1, modality="text")
    assert hits[0].metadata["caption"] == "an edited caption" and hits[0].score > 0.999


def test_caption_table_beside_a_folder_is_remembered(folder, demo, tmp_path):
    """`clipkit index FOLDER --captions TABLE.jsonl`: the table's captions for the images it lists, NAME.txt
    for the others; later runs without --captions keep using the table."""
    txt = sorted(folder.glob("*.txt"))
    listed = [p.with_suffix(".jpg").name for p in txt[:5]]
    table = tmp_path / "meta" / "captions.jsonl"
    table.parent.mkdir()
    table.write_text("".join(json.dumps({"file": name, "text": [f"table caption {n}", f"second {n}"]}) + "\n"
                             for n, name in enumerate(listed)))
    args = ["-q", "index", str(folder), "--index", str(tmp_path / "ix"), "--captions", str(table),
            "--image-column", "file", "--caption-column", "text", "--root", str(folder)]
    assert main(args) == 0
    captions = Index.load(tmp_path / "ix").captions
    by_id = {r["id"]: r["caption"] for r in captions.get(captions.ids())}
    assert by_id[f"{(folder / listed[2]).resolve()}#1"] == "second 2"
    other = txt[7].with_suffix(".jpg").resolve()
    assert by_id[f"{other}#0"] == lines(txt[7])[0]
    assert len(by_id) == 10 + sum(len(lines(p)) for p in txt[5:])
    index = Index.load(tmp_path / "ix")
    assert index.sync_folder(folder, demo).captions.added == 0  # the table is remembered: nothing changes
    assert len(index.captions) == len(by_id)


def test_a_moved_folder_keeps_its_caption_table(folder, demo, tmp_path, capsys):
    """A folder indexed with a caption table inside it, then renamed: its captions move with its images and
    the table is remembered at its new place (they were all dropped: NAME.txt was looked for instead)."""
    for txt in folder.glob("*.txt"):
        txt.unlink()
    names = sorted(p.name for p in folder.glob("*.jpg"))[:6]
    (folder / "captions.csv").write_text("image,caption\n" + "".join(f"{n},the caption of {n}\n" for n in names))
    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(folder), "--index", ix, "--captions", str(folder / "captions.csv")]) == 0
    renamed = tmp_path / "renamed"
    folder.rename(renamed)
    (renamed / "captions.csv").write_text("image,caption\n" + "".join(f"{n},the caption of {n}\n" for n in names)
                                          + f"{sorted(p.name for p in renamed.glob('*.jpg'))[7]},one more\n")
    assert main(["index", str(renamed), "--index", ix]) == 0
    assert "captions: 1 embedded, 6 moved with their images, 0 unchanged, 0 removed" in capsys.readouterr().out
    captions = Index.load(ix).captions
    expected = {f"{renamed.resolve() / n}#0": f"the caption of {n}" for n in names}
    assert {r["id"]: r["caption"] for r in captions.get(captions.ids())} == {
        **expected, f"{renamed.resolve() / sorted(p.name for p in renamed.glob('*.jpg'))[7]}#0": "one more"}
    assert Index.load(ix).sync_folder(renamed, demo).captions.added == 0  # remembered for the new place


def test_a_tsv_caption_table_and_files_that_are_no_source(folder, tmp_path, capsys):
    """A tab-separated caption table (commas inside captions) is read like a CSV one; an image file, a .txt
    of captions or another file given as SOURCE is a one-line error saying what SOURCE may be."""
    name = sorted(p.name for p in folder.glob("*.jpg"))[0]
    (folder / "captions.tsv").write_text(f"image\tcaption\n{name}\ta caption, with a comma\n")
    assert main(["-q", "index", str(folder / "captions.tsv"), "--index", str(tmp_path / "ix")]) == 0
    captions = Index.load(tmp_path / "ix").captions
    assert [r["caption"] for r in captions.get(captions.ids())] == ["a caption, with a comma"]
    for source, says in ((folder / name, "is an image file: index the folder it is in"),
                         (folder / name.replace(".jpg", ".txt"), "neither an http(s) URL nor an image file's path"),
                         (tmp_path / "ix" / "config.json", "is no table clipkit reads")):
        assert main(["index", str(source), "--index", str(tmp_path / "other")]) == 2
        err = capsys.readouterr().err
        assert says in err and "SOURCE is a folder of images" in err and err.count("\n") == 1
    assert not (tmp_path / "other").exists()


def test_a_list_of_image_files_is_indexed_as_listed(folder, demo, tmp_path, capsys):
    """A .txt list of image files (as `find photos -name '*.jpg' > list.txt` writes it: relative or absolute
    paths) or a table of the image column alone indexes exactly the files listed, with their NAME.txt captions;
    a line taken out takes its image out. A list of files outside its own folder says which --root takes them."""
    names = sorted(p.name for p in folder.glob("*.jpg"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"photos/{names[0]}\n\n{folder / names[1]}\nphotos/{names[2]}\n")
    ix = str(tmp_path / "ix")
    assert main(["index", str(listing), "--index", ix]) == 0
    assert "indexed 3 image(s) (3 new" in capsys.readouterr().out
    index = Index.load(ix)
    assert sorted(Path(i).name for i in index.ids()) == names[:3]
    expected = {f"{(folder / n).resolve()}#{line}": text for n in names[:3]
                for line, text in enumerate(lines(folder / n.replace(".jpg", ".txt")))}
    assert {r["id"]: r["caption"] for r in index.captions.get(index.captions.ids())} == expected
    listing.write_text(f"photos/{names[0]}\nphotos/{names[2]}\n")
    assert main(["-q", "index", str(listing), "--index", ix]) == 0
    assert sorted(Path(i).name for i in Index.load(ix).ids()) == [names[0], names[2]]
    one_column = tmp_path / "one.csv"
    one_column.write_text(f"image\nphotos/{names[5]}\n")
    assert main(["-q", "index", str(one_column), "--index", str(tmp_path / "ix2")]) == 0
    assert [Path(i).name for i in Index.load(tmp_path / "ix2").ids()] == [names[5]]
    elsewhere = tmp_path / "lists" / "list.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text(f"{folder / names[0]}\n{folder / names[1]}\n")
    assert main(["index", str(elsewhere), "--index", str(tmp_path / "ix3")]) == 2
    assert f"pass --root {folder}" in capsys.readouterr().err
    assert main(["-q", "index", str(elsewhere), "--root", str(folder), "--index", str(tmp_path / "ix3")]) == 0
    assert len(Index.load(tmp_path / "ix3")) == 2
    assert main(["shards", str(listing), str(tmp_path / "shards")]) == 2
    assert "has no captions, which shards need" in capsys.readouterr().err


def test_a_caption_table_is_read_once_a_run(folder, tmp_path, monkeypatch, capsys):
    """`clipkit index TABLE` checks the table before it touches the index and then indexes it from the same
    read (a million rows: 7.6 s a read); a table of files elsewhere is refused after one read too."""
    import clipkit.data.tables as tables

    table = folder / "captions.csv"
    table.write_text("image,caption\n" + "".join(f"{p.name},a caption of {p.stem}\n" for p in folder.glob("*.jpg")))
    real, reads = tables.read_table, []
    monkeypatch.setattr(tables, "read_table", lambda *args, **kwargs: reads.append(args[0]) or real(*args, **kwargs))
    for run in range(2):  # (the first indexes, the second finds everything unchanged)
        assert main(["-q", "index", str(table), "--index", str(tmp_path / "ix")]) == 0
        assert reads == [str(table)] * (run + 1)
    index = Index.load(tmp_path / "ix")
    assert len(index) == 40 and len(index.captions) == 40
    elsewhere = tmp_path / "lists" / "list.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text("".join(f"{p}\n" for p in sorted(folder.glob("*.jpg"))[:3]))
    reads.clear()
    assert main(["index", str(elsewhere), "--index", str(tmp_path / "ix2")]) == 2
    assert reads == [str(elsewhere)] and f"pass --root {folder}" in capsys.readouterr().err
    assert not (tmp_path / "ix2").exists()


def test_files_saved_by_windows_tools_with_a_byte_order_mark_are_read(folder, tmp_path):
    """Excel's "CSV UTF-8" and Notepad start a file with a byte order mark (and end lines with CRLF): the table's
    first column, a list's first path and a caption's first word must not carry it."""
    names = sorted(p.name for p in folder.glob("*.jpg"))
    bom = "\ufeff".encode()
    (folder / "captions.csv").write_bytes(bom + f"image,caption\r\n{names[0]},a red circle\r\n".encode())
    (folder / names[1].replace(".jpg", ".txt")).write_bytes(bom + b"a blue square\r\n")
    (folder / "list.txt").write_bytes(bom + f"{names[1]}\r\n".encode())
    assert main(["-q", "index", str(folder / "captions.csv"), "--index", str(tmp_path / "ix")]) == 0
    assert main(["-q", "index", str(folder / "list.txt"), "--index", str(tmp_path / "ix2")]) == 0
    for ix, name, caption in (("ix", names[0], "a red circle"), ("ix2", names[1], "a blue square")):
        index = Index.load(tmp_path / ix)
        assert [Path(i).name for i in index.ids()] == [name]
        assert [r["caption"] for r in index.captions.get(index.captions.ids())] == [caption]
    from clipkit.data.urls import UrlTable, is_url_table

    (tmp_path / "urls.txt").write_bytes(bom + b"https://example.com/a.jpg\r\n")
    (tmp_path / "urls.csv").write_bytes(bom + b"url,caption\r\nhttps://example.com/a.jpg,a cat\r\n")
    assert is_url_table(tmp_path / "urls.txt") and is_url_table(tmp_path / "urls.csv")
    assert UrlTable.of(tmp_path / "urls.csv").columns() == ["url", "caption"]


def test_utf16_and_utf32_text_files_are_read_as_their_byte_order_mark_says(folder, demo, tmp_path, capsys):
    """Notepad's "Unicode" and PowerShell's `>` write UTF-16 with a byte order mark: a caption file read as UTF-8
    became garbage captions ('\\x00' between letters), a table was refused, a query file was refused as binary."""
    import gzip
    import os

    from clipkit._io import file_encoding

    names = sorted(p.name for p in folder.glob("*.jpg"))
    for name, encoding in zip(names, ("utf-16", "utf-16-be", "utf-32")):
        mark = "\ufeff" if encoding == "utf-16-be" else ""  # (Python's utf-16 and utf-32 write their own mark)
        (folder / name.replace(".jpg", ".txt")).write_bytes(f"{mark}a {encoding} caption\r\nsecond line\r\n"
                                                            .encode(encoding))
    rows = f"{names[3]},a red circle caf\u00e9\r\n{names[4]},a blue square\r\n"
    (folder / "captions.csv").write_bytes(f"image,caption\r\n{rows}".encode("utf-16"))
    absolute = rows.replace(names[3], str(folder / names[3])).replace(names[4], str(folder / names[4]))
    (tmp_path / "captions.csv.gz").write_bytes(gzip.compress(f"image,caption\r\n{absolute}".encode("utf-16")))
    for source, ix in ((folder, "ix"), (folder / "captions.csv", "ix2"), (tmp_path / "captions.csv.gz", "ix3")):
        assert main(["-q", "index", str(source), "--index", str(tmp_path / ix)]) == 0
    captions = Index.load(tmp_path / "ix").captions
    got = {r["id"]: r["caption"] for r in captions.get(captions.ids())}
    for name, encoding in zip(names, ("utf-16", "utf-16-be", "utf-32")):
        image = (folder / name).resolve()
        assert (got[f"{image}#0"], got[f"{image}#1"]) == (f"a {encoding} caption", "second line")
    for ix in ("ix2", "ix3"):
        captions = Index.load(tmp_path / ix).captions
        assert sorted(r["caption"] for r in captions.get(captions.ids())) == ["a blue square", "a red circle caf\u00e9"]

    (tmp_path / "queries.txt").write_bytes("a red circle\r\n".encode("utf-16"))
    assert main(["search", "--index", str(tmp_path / "ix"), "--queries", str(tmp_path / "queries.txt"), "-k", "2",
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["query"] == "a red circle"
    expected = clipkit.search("a red circle", Index.load(tmp_path / "ix"), k=2, model=demo)
    assert [h["id"] for h in answer["hits"]] == [h.id for h in expected]
    os.mkfifo(tmp_path / "fifo")  # (opened to look at its first bytes, it would wait for a writer for ever)
    assert file_encoding(tmp_path / "fifo") == "utf-8-sig"


def test_index_a_parquet_table(folder, demo, tmp_path, capsys):
    """A parquet table (img2dataset's and clip-retrieval's format) of image paths and captions, some null."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    captions = _strip_txt(folder)
    names = sorted(captions)[:8]
    table = tmp_path / "listing.parquet"
    pq.write_table(pa.table({"image_path": [str(folder / name) for name in names],
                             "caption": [captions[name][0] if n % 2 else None for n, name in enumerate(names)],
                             "url": [f"https://example.com/{name}" for name in names]}), table)
    assert main(["-q", "index", str(table), "--image-column", "image_path", "--root", str(folder), "--index",
                 str(tmp_path / "ix")]) == 0
    index = Index.load(tmp_path / "ix")
    assert sorted(Path(i).name for i in index.ids()) == names
    expected = {f"{(folder / name).resolve()}#0": captions[name][0] for n, name in enumerate(names) if n % 2}
    assert {r["id"]: r["caption"] for r in index.captions.get(index.captions.ids())} == expected
    assert main(["-q", "index", str(table), "--index", str(tmp_path / "ix2")]) == 0  # image_path: found unnamed
    assert sorted(Index.load(tmp_path / "ix2").ids()) == sorted(index.ids())
    assert main(["index", str(table), "--image-column", "file", "--index", str(tmp_path / "ix3")]) == 2
    err = capsys.readouterr().err
    assert "lacks column 'file'" in err and "image_path" in err and "Traceback" not in err


def test_caption_table_errors(folder, tmp_path, capsys):
    bad = tmp_path / "captions.csv"
    bad.write_text("file_name,description\nx.jpg,a caption\n")
    (tmp_path / "semicolons.csv").write_text("image;caption\nx.jpg;a caption\n")  # (Excel in many countries)
    (tmp_path / "latin1.csv").write_bytes("image,caption\nx.jpg,un caf\u00e9\n".encode("latin-1"))
    for args, message in (([str(folder), "--captions", str(tmp_path / "none.csv")], "caption table not found"),
                          ([str(folder), "--captions", str(folder / sorted(folder.glob('*.txt'))[0].name)],
                           ".jsonl or .parquet"),
                          ([str(bad)], "lacks column 'image' or 'caption' (columns: file_name, description)"),
                          ([str(tmp_path / "semicolons.csv")], "look separated by ';'"),
                          ([str(tmp_path / "latin1.csv")], "is not UTF-8 text (byte b'\\xe9' at 26): save it as UTF-8"),
                          ([str(bad), "--captions", str(bad)], "not both")):
        assert main(["index", *args, "--index", str(tmp_path / "ix")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "ix" / "meta.sqlite").exists()


def test_merge_carries_captions(folder, demo, tmp_path):
    for part in range(2):
        assert main(["-q", "index", str(folder), "--index", str(tmp_path / "part{rank}"), "--shard", f"{part}/2"]) == 0
    assert main(["-q", "merge", str(tmp_path / "merged"), str(tmp_path / "part0"), str(tmp_path / "part1")]) == 0
    merged = Index.load(tmp_path / "merged")
    whole = Index.from_folder(folder, demo)
    assert sorted(merged.captions.ids()) == sorted(whole.captions.ids())
    image = sorted(folder.glob("*.jpg"))[6]
    assert [h.id for h in clipkit.search(image, merged, k=5, modality="text")] == \
        [h.id for h in clipkit.search(image, whole, k=5, modality="text")]


def test_a_caption_table_is_read_onto_disk_not_into_memory(tmp_path):
    """A table's rows go into an on-disk TableRows, looked up by image: reading 60,000 rows holds next to
    nothing in Python memory (the dict of rows it replaced peaked at 52 MB here, 900 bytes a row), and the rows read
    back as the table gives them (rows of one image merged in order, images in the order first named)."""
    import tracemalloc

    from clipkit.data.tables import read_table

    table = tmp_path / "captions.csv"
    with open(table, "w") as f:
        f.write("image,caption\n")
        for i in range(60_000):
            f.write(f"sub/img_{i:06d}.jpg,a caption of image {i} that is as long as captions are\n")
        f.write("sub/img_000007.jpg,  its second caption \nsub/img_000007.jpg,\nlisted_alone.jpg,\n")
    tracemalloc.start()
    with read_table(table, captions=False) as rows:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB of Python objects held while reading the table"
        assert len(rows) == 60_001 and f"{tmp_path}/sub/img_059999.jpg" in rows and "img_000001.jpg" not in rows
        assert rows.get(f"{tmp_path}/sub/img_000007.jpg") == ["a caption of image 7 that is as long as captions are",
                                                             "its second caption"]
        assert rows.get(f"{tmp_path}/listed_alone.jpg") == [] and rows.get("/elsewhere.jpg") is None
        items = list(rows.items())
        assert [image for image, _ in items[:2]] == [f"{tmp_path}/sub/img_000000.jpg", f"{tmp_path}/sub/img_000001.jpg"]
        assert items[-1] == (f"{tmp_path}/listed_alone.jpg", []) and list(rows)[7] == items[7][0]


def test_caption_sync_in_pages_matches_one_pass(demo, tmp_path):
    """The caption sync reads the images and captions a page at a time (bounded memory): with pages of 2 it
    ends exactly as with one page, across names that sort around the '#' of caption ids ('a.jpg!.jpg',
    'a.jpg#2.jpg'), changed, added and dropped lines, a shard sample's captions inside the folder (kept),
    and orphans: captions of a gone image, and of one no longer indexed (a run stopped between the stores)."""
    from clipkit.index.captions import new_captions, sync_index_captions

    names = ["a.jpg", "a.jpg!.jpg", "a.jpg#2.jpg", "a.jpg 2.jpg", "b.jpg", "c.jpg", "d.jpg"]
    images = [f"{tmp_path}/p/{name}" for name in names]
    sample = f"{tmp_path}/p/s.tar#000"  # a shard's sample inside the folder: not a file, its captions stay
    stored = {f"{images[0]}#0": "a cat", f"{images[0]}#1": "dropped line", f"{images[1]}#0": "old text",
              f"{images[2]}#0": "a dog", f"{images[4]}#0": "kept", f"{tmp_path}/p/gone.jpg#0": "gone",
              f"{tmp_path}/p/stopped.jpg#0": "orphan", f"{sample}#0": "a sample's caption"}
    table = {images[0]: ["a cat"], images[1]: ["new text"], images[2]: ["a dog", "a second dog"],
             images[3]: ["added"], images[4]: ["kept"], images[5]: [], images[6]: ["d"]}
    results = []
    for page in (2, 10_000):
        index = Index(demo.dim, model=demo)
        index.add(clipkit.encode(names + ["s"], model=demo), ids=images + [sample],
                  metadata=[{"path": i, "size": 1, "mtime": 1.0} for i in images] + [{}])
        collection = new_captions(index, demo)
        collection.add(clipkit.encode(list(stored.values()), model=demo), ids=list(stored),
                       metadata=[{"caption": t, "image_id": image_of_id(i)} for i, t in stored.items()])
        report = sync_index_captions(index, f"{tmp_path}/p/", demo, table, gone=[f"{tmp_path}/p/gone.jpg"], page=page)
        results.append((report, {r["id"]: r["caption"] for r in collection.get(collection.ids())}))
    assert results[0] == results[1]
    report, captions = results[0]
    assert captions == {f"{images[0]}#0": "a cat", f"{images[1]}#0": "new text", f"{images[2]}#0": "a dog",
                        f"{images[2]}#1": "a second dog", f"{images[3]}#0": "added", f"{images[4]}#0": "kept",
                        f"{images[6]}#0": "d", f"{sample}#0": "a sample's caption"}
    assert (report.added, report.removed, report.kept) == (4, 4, 3)


def image_of_id(caption_id: str) -> str:
    return caption_id.rpartition("#")[0]
