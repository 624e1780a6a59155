import importlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipkit
from clipkit.index import Index
from conftest import make_checkpoint


def test_from_folder_indexes_every_good_image_once(image_folder, tiny_model):
    index = Index.from_folder(image_folder, model=tiny_model)
    report = index.last_sync
    good = sorted(str(p.resolve()) for p in image_folder.rglob("*")
                  if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tiff"}
                  and not p.name.startswith(".") and p.name != "broken.jpg")
    assert len(good) == 12
    assert sorted(index.ids()) == good
    assert report.added == 12 and [Path(p).name for p, _ in report.skipped] == ["broken.jpg"]
    record = index.get([good[0]])[0]
    assert record["path"] == good[0] and record["size"] == os.path.getsize(good[0])


def test_folder_embeddings_equal_encode_of_the_same_files(image_folder, tiny_model):
    index = Index.from_folder(image_folder, model=tiny_model, batch_size=5)
    ids = index.ids()
    np.testing.assert_allclose(index.embeddings(ids), clipkit.encode([Path(p) for p in ids], model=tiny_model),
                               atol=1e-5)


def test_sync_is_incremental(image_folder, tiny_model, tmp_path):
    index = Index.from_folder(image_folder, model=tiny_model)
    index.save(tmp_path / "ix")
    red = image_folder / "red circle.png"
    Image.new("RGB", (30, 30), "black").save(red)
    os.utime(red, (1, 1))  # a changed mtime and size
    (image_folder / "nested" / "blue circle.gif").unlink()
    Image.new("RGB", (20, 20), "white").save(image_folder / "new one.png")
    reloaded = Index.load(tmp_path / "ix")
    report = reloaded.sync_folder(image_folder, tiny_model)
    assert (report.added, report.updated, report.removed, report.unchanged) == (1, 1, 1, 10)
    assert len(reloaded) == 12
    new_vector = clipkit.encode([red], model=tiny_model)[0]
    np.testing.assert_allclose(reloaded.embeddings([str(red.resolve())])[0], new_vector, atol=1e-5)
    again = reloaded.sync_folder(image_folder, tiny_model)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 12)


def test_search_by_text_image_and_vector(image_folder, tiny_model):
    index = Index.from_folder(image_folder, model=tiny_model)
    target = str((image_folder / "nested" / "deeper" / "green circle.JPEG").resolve())
    by_path = clipkit.search(Path(target), index, k=3)
    assert by_path[0].id == target and by_path[0].path == target
    assert by_path[0].score == pytest.approx(1.0, abs=1e-4)
    assert by_path[0].score >= by_path[1].score >= by_path[2].score
    by_pil = clipkit.search(Image.open(target), index, k=1)
    by_array = clipkit.search(np.asarray(Image.open(target).convert("RGB")), index, k=1)
    assert by_pil[0].id == by_array[0].id == target
    by_bytes = clipkit.search(Path(target).read_bytes(), index, k=3)  # an image file's bytes (an upload, a download)
    assert [(h.id, h.score) for h in by_bytes] == [(h.id, h.score) for h in by_path]
    assert np.array_equal(clipkit.encode([bytearray(Path(target).read_bytes())], model=tiny_model),
                          clipkit.encode([Path(target)], model=tiny_model))
    with pytest.raises(ValueError, match="not a recognised image format"):
        clipkit.search(b"not an image", index, k=1)
    vector = index.embeddings([target])[0]
    assert clipkit.search(vector, index, k=1)[0].id == target
    text_hits = clipkit.search("a red square", index, k=100)
    assert len(text_hits) == 12
    expected = clipkit.encode(["a red square"], model=tiny_model)[0] @ index.embeddings(index.ids()).T
    assert [h.id for h in text_hits] == [index.ids()[i] for i in np.argsort(-expected, kind="stable")]


def test_search_with_the_index_model_after_reload(image_folder, tiny_ckpt, tmp_path):
    model = clipkit.load_model("clipkit-tiny", pretrained=tiny_ckpt)
    Index.from_folder(image_folder, model=model).save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")  # no live model: reloaded from the recorded name and weights file
    hits = clipkit.search("a blue circle", loaded, k=2)
    assert loaded.model.fingerprint == model.fingerprint and len(hits) == 2
    for path in (tmp_path / "ix", str(tmp_path / "ix")):  # the index folder's path serves as the index
        assert [h.id for h in clipkit.search("a blue circle", path, k=2)] == [h.id for h in hits]


def test_a_search_by_path_loads_the_model_once_and_sees_every_change(image_folder, tmp_path, monkeypatch):
    search_module = importlib.import_module("clipkit.search")  # (clipkit.search is the function)
    weights = make_checkpoint(tmp_path / "weights.pt")
    index = Index.from_folder(image_folder, model=clipkit.load_model("clipkit-tiny", pretrained=weights))
    index.save(tmp_path / "ix")
    vector = index.embeddings([index.ids()[0]])[0]
    assert clipkit.search("a blue circle", tmp_path / "ix", k=1)  # its model loaded
    monkeypatch.setattr("clipkit.models.load_recorded_model", lambda *a, **kw: pytest.fail("model loaded again"))
    assert clipkit.search("a blue circle", str(tmp_path / "ix"), k=3)  # kept
    index.add(-vector[None], ids=["opposite"])  # another writer's change: seen by the next search
    index.save()
    assert clipkit.search(-vector, tmp_path / "ix", k=1)[0].id == "opposite"
    assert clipkit.search_batch(["a red square", -vector], tmp_path / "ix", k=1)[1][0].id == "opposite"
    monkeypatch.undo()
    make_checkpoint(tmp_path / "other.pt", seed=7)
    os.replace(tmp_path / "other.pt", weights)  # other weights at the recorded path: refused, as at a first call
    with pytest.raises(clipkit.ClipkitError, match="other weights now"):
        clipkit.search("a blue circle", tmp_path / "ix", k=1)
    with open(tmp_path / "ix" / "meta.sqlite", "r+b") as store:  # damaged in place: said, as by a first search
        store.write(b"garbage!" * 512)
    with pytest.raises(clipkit.ClipkitError, match="damaged"):
        clipkit.search(vector, tmp_path / "ix", k=1)
    for n in range(search_module.MODELS_KEPT + 1):  # only the last few models are kept
        other = Index.from_folder(image_folder, model=clipkit.load_model(
            "clipkit-tiny", pretrained=make_checkpoint(tmp_path / f"w{n}.pt", seed=n)))
        other.save(tmp_path / f"other{n}")
        clipkit.search("a red square", tmp_path / f"other{n}", k=1)
    assert len(search_module._MODELS) == search_module.MODELS_KEPT

def test_weights_gone_since_the_index_was_built_are_named(image_folder, tmp_path):
    import shutil

    weights = tmp_path / "weights.pt"
    shutil.copy(make_checkpoint(tmp_path / "made.pt"), weights)
    Index.from_folder(image_folder, model=clipkit.load_model("clipkit-tiny", pretrained=weights)).save(tmp_path / "ix")
    weights.unlink()  # (pruned by a training run's --keep-last, say)
    with pytest.raises(FileNotFoundError, match=r"built with clipkit-tiny and the weights .*weights.pt, which are no "
                                                r"longer there"):
        clipkit.search("a blue circle", tmp_path / "ix", k=2)


def test_search_errors(tiny_model):
    index = Index.from_embeddings(clipkit.encode(["a", "b"], model=tiny_model), ids=["a", "b"])
    with pytest.raises(ValueError, match="records no model"):
        clipkit.search("a", index)
    assert clipkit.search("a", index, model=tiny_model)[0].id == "a"
    with pytest.raises(ValueError, match="k must be a positive integer"):
        clipkit.search("a", index, k=0, model=tiny_model)
    with pytest.raises(ValueError, match="empty"):
        clipkit.search("   ", index, model=tiny_model)
    with pytest.raises(ValueError, match="unsupported query type"):
        clipkit.search(42, index)
    with pytest.raises(ValueError, match=r"one query a call; for many at once: clipkit.search_batch"):
        clipkit.search(["a", "b"], index)
    with pytest.raises(ValueError, match="clipkit.Index"):
        clipkit.search("a", 42)
    with pytest.raises(FileNotFoundError, match="no index at not an index"):
        clipkit.search("a", "not an index")
    with pytest.raises(ValueError, match="dimension"):
        clipkit.search(np.ones(3, np.float32), index)
