"""The model an index records stands in for it until it is used (clipkit.recorded.RecordedModel): a run that
embeds nothing never loads it, nor imports torch; one that embeds gets exactly the recorded model."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import clipkit
from clipkit.cli import main
from clipkit.errors import ModelMismatchError
from clipkit.index import Index
from clipkit.recorded import RecordedModel
from conftest import draw_shape, make_checkpoint


def test_its_record_is_answered_without_loading_and_it_embeds_as_the_model(tiny_model):
    recorded = RecordedModel(tiny_model.info, device="cpu")
    assert (recorded.name, recorded.pretrained, recorded.dim, recorded.fingerprint, recorded.image_shape) == (
        tiny_model.name, tiny_model.pretrained, tiny_model.dim, tiny_model.fingerprint, tiny_model.image_shape)
    assert recorded.info == tiny_model.info and not recorded.is_loaded and "not loaded yet" in repr(recorded)
    image = draw_shape("red", "circle")
    assert np.array_equal(clipkit.encode([image], model=recorded), clipkit.encode([image], model=tiny_model))
    texts = ["a red circle"]
    assert np.array_equal(clipkit.encode(texts, model=recorded), clipkit.encode(texts, model=tiny_model))
    assert recorded.is_loaded and recorded.device == torch.device("cpu") and recorded.loaded is recorded.loaded
    with pytest.raises(ValueError, match="records no model"):
        RecordedModel(None)
    with pytest.raises(ValueError, match="records no model by name"):  # (model_info given by hand, say)
        RecordedModel({"dim": 64})
    assert RecordedModel({"name": "clipkit-tiny", "pretrained": tiny_model.pretrained}).dim == 64  # (loaded for it)
    from clipkit.recorded import names_the_record

    info = tiny_model.info
    assert names_the_record(info, "clipkit-tiny", info["pretrained"])
    assert names_the_record(info, "clipkit-tiny", os.path.relpath(info["pretrained"]))  # (where it leads)
    assert not names_the_record(info, "clipkit-tiny", None) and not names_the_record(info, "clipkit-demo", None)
    assert not names_the_record(None, "clipkit-tiny", None) and not names_the_record(info, None, info["pretrained"])
    with pytest.raises(ValueError, match="unknown device"):  # (said at once, not at the first image to embed)
        RecordedModel(tiny_model.info, device="gpu")


def test_weights_changed_since_they_were_recorded_are_refused_when_first_needed(tmp_path):
    weights = make_checkpoint(tmp_path / "w.pt", seed=1)
    info = clipkit.load_model("clipkit-tiny", weights, device="cpu").info
    make_checkpoint(weights, seed=2)  # another training run wrote over the file
    recorded = RecordedModel(info, device="cpu")
    assert recorded.dim == info["dim"]  # (the record: nothing loaded yet)
    with pytest.raises(ModelMismatchError, match="other weights now"):
        recorded.encode_text(["a red circle"])
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no longer there"):
        RecordedModel(info).preprocess


def _photos(root, n: int):
    root.mkdir(exist_ok=True)
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")][:n]):
        if (root / f"{i}.png").exists():
            continue
        draw_shape(colour, shape).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {colour} {shape}\n")
    return root


def test_indexing_an_unchanged_folder_loads_no_model_and_a_new_image_gets_the_recorded_one(tmp_path, tiny_ckpt,
                                                                                             tiny_model):
    photos, index_path = _photos(tmp_path / "photos", 2), tmp_path / "ix"
    assert main(["-q", "index", str(photos), "--index", str(index_path), "--model", "clipkit-tiny",
                 "--pretrained", str(tiny_ckpt)]) == 0
    run = textwrap.dedent(f"""
        import sys
        from clipkit.cli import main
        code = main(["index", {str(photos)!r}, "--index", {str(index_path)!r}])
        print("rc", code, "torch", "torch" in sys.modules, "open_clip", "open_clip" in sys.modules)
    """)
    unchanged = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120)
    assert "rc 0 torch False open_clip False" in unchanged.stdout, unchanged.stdout + unchanged.stderr
    assert "2 unchanged" in unchanged.stdout and "captions: 0 embedded, 2 unchanged" in unchanged.stdout
    named = run.replace("])", f", '--model', 'clipkit-tiny', '--pretrained', {os.path.relpath(tiny_ckpt)!r}])")
    unchanged = subprocess.run([sys.executable, "-c", named], capture_output=True, text=True, timeout=120)
    assert "rc 0 torch False" in unchanged.stdout, unchanged.stdout + unchanged.stderr  # (the recorded one, named)
    _photos(photos, 3)  # a third image and caption
    grown = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120)
    assert "rc 0 torch True" in grown.stdout and "(1 new, 0 changed)" in grown.stdout, grown.stdout + grown.stderr
    index = Index.load(index_path)
    third = str((photos / "2.png").resolve())
    np.testing.assert_allclose(index.embeddings([third])[0], clipkit.encode([photos / "2.png"], model=tiny_model)[0],
                               atol=1e-6)
    caption = index.captions.embeddings([f"{third}#0"])[0]
    np.testing.assert_allclose(caption, clipkit.encode(["a green triangle"], model=tiny_model)[0], atol=1e-6)


def test_searching_by_an_indexed_photo_loads_no_model_until_the_photo_changes(tmp_path, tiny_ckpt, tiny_model):
    """`clipkit search photos/0.png` (a photo of the index, by a relative path) searched by its stored embedding:
    no model loaded (~2 s where loading one took ~6); once the file changed since indexing, by the file as it is
    now (its embedding embedded again)."""
    photos, index_path = _photos(tmp_path / "photos", 3), tmp_path / "ix"
    assert main(["-q", "index", str(photos), "--index", str(index_path), "--model", "clipkit-tiny",
                 "--pretrained", str(tiny_ckpt)]) == 0
    run = textwrap.dedent(f"""
        import sys
        from clipkit.cli import main
        code = main(["search", "photos/0.png", "--index", {str(index_path)!r}, "-k", "3", "--json"])
        print("rc", code, "open_clip", "open_clip" in sys.modules)
    """)
    index = Index.load(index_path)
    first = str((photos / "0.png").resolve())
    for changed in (False, True):
        if changed:  # (another picture, the size and mtime of the file changed)
            draw_shape("blue", "square", size=(40, 30)).save(photos / "0.png")
        done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        *lines, last = done.stdout.strip().splitlines()
        assert last == f"rc 0 open_clip {changed}", done.stdout + done.stderr
        vector = clipkit.encode([photos / "0.png"], model=tiny_model)[0] if changed else index.embeddings([first])[0]
        scores, ids = index.search(vector, 3)
        hits = json.loads(lines[-1])
        assert [h["id"] for h in hits] == ids[0].tolist()
        np.testing.assert_allclose([h["score"] for h in hits], scores[0], atol=1e-5)


def test_an_index_opened_again_syncs_with_the_model_it_records(tmp_path, tiny_model):
    photos = _photos(tmp_path / "photos", 2)
    Index.from_folder(photos, tiny_model, progress=False).save(tmp_path / "ix")
    _photos(photos, 3)
    index = Index.load(tmp_path / "ix")
    report = index.sync_folder(photos, progress=False)  # no model given: the one the index records
    assert (report.added, report.unchanged) == (1, 2) and isinstance(index.model, RecordedModel)
    np.testing.assert_allclose(index.embeddings([str((photos / "2.png").resolve())])[0],
                               clipkit.encode([photos / "2.png"], model=tiny_model)[0], atol=1e-6)


def test_weights_moved_are_recorded_where_they_are_now_when_given_from_there(tmp_path, capsys):
    photos, index_path = _photos(tmp_path / "photos", 2), tmp_path / "ix"
    weights = make_checkpoint(tmp_path / "w.pt")
    assert main(["-q", "index", str(photos), "--index", str(index_path), "--model", "clipkit-tiny",
                 "--pretrained", str(weights)]) == 0
    moved = weights.rename(tmp_path / "kept.pt")
    _photos(photos, 3)
    assert main(["index", str(photos), "--index", str(index_path)]) == 2  # the recorded file is gone
    assert "no longer there" in capsys.readouterr().err
    assert main(["info", str(index_path)]) == 0
    assert f"missing: {weights.resolve()} (moved?" in capsys.readouterr().out
    other = make_checkpoint(tmp_path / "other.pt", seed=9)  # other weights are not the recorded ones
    assert main(["index", str(photos), "--index", str(index_path), "--model", "clipkit-tiny",
                 "--pretrained", str(other)]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert main(["-q", "index", str(photos), "--index", str(index_path), "--model", "clipkit-tiny",
                 "--pretrained", str(moved)]) == 0
    assert Index.load(index_path).model_info["pretrained"] == str(moved.resolve())
    assert main(["info", str(index_path)]) == 0 and "missing" not in capsys.readouterr().out
    (photos / "2.png").unlink()
    (photos / "2.txt").unlink()
    assert main(["-q", "index", str(photos), "--index", str(index_path)]) == 0
    _photos(photos, 3)  # drawn again: embedded by the weights where the record says they are now
    assert main(["index", str(photos), "--index", str(index_path)]) == 0
    assert "(1 new, 0 changed)" in capsys.readouterr().out and len(Index.load(index_path)) == 3


def test_a_moved_transformers_folder_counts_as_the_sameweights_moved(tmp_path):
    """A transformers checkpoint records its folder as its name: moved, the same weights from the new folder are
    recorded there; a folder still in place, other weights, or a path that is no file are not."""
    from clipkit.recorded import weights_moved

    old, new = tmp_path / "clip-old", tmp_path / "clip-new"
    new.mkdir()
    recorded = {"name": str(old), "pretrained": None, "dim": 8, "fingerprint": "abc"}
    assert weights_moved(recorded, {**recorded, "name": str(new)})
    assert not weights_moved(recorded, {**recorded, "name": str(new), "fingerprint": "abd"})
    assert not weights_moved(recorded, {**recorded, "name": "clip-new"})  # (no folder of that name here)
    assert not weights_moved(recorded, recorded)
    old.mkdir()
    assert not weights_moved(recorded, {**recorded, "name": str(new)})  # the recorded folder is still there
