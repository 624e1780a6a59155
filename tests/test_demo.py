import numpy as np
import pytest
import torch
from PIL import Image

import clipkit
from clipkit.cli import main
from clipkit.bundled import bundled_models
from clipkit.models import SCRATCH, export_compact, load_model, read_checkpoint

pytestmark = pytest.mark.skipif("clipkit-demo" not in bundled_models(), reason="demo weights not bundled")


def test_bundled_demo_model_loads_offline_with_its_itm_head():
    model = load_model("clipkit-demo", device="cpu")
    assert model.dim == 128 and model.image_size == 64 and model.itm is not None
    path = bundled_models()["clipkit-demo"]
    assert path.stat().st_size < 5_000_000
    torch.load(path, weights_only=True)  # loads without code
    assert model.fingerprint != load_model("clipkit-demo", SCRATCH).fingerprint


def test_demo_command_writes_images_index_and_grid(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--n", "60"]) == 0
    out = capsys.readouterr().out
    assert "query: image:" in out and "results.png" in out
    # each text query twice, by ITC and re-ranked by the head, side by side in the grid
    assert out.count("  by ITC:") == out.count("  re-ranked by the ITM head:") == out.count("query: ") - 1 > 0
    grid = Image.open(tmp_path / "d" / "results.png")
    assert grid.size[0] > 2 * 5 * 96 and grid.size[1] > 500
    index = clipkit.Index.load(tmp_path / "d" / "photos.clipkit")
    assert len(index) == 60 and index.model_info["name"] == "clipkit-demo"

    assert main(["-q", "demo", "--out", str(tmp_path / "one"), "--n", "1"]) == 0  # was an IndexError
    assert (tmp_path / "one" / "results.png").is_file()
    assert main(["-q", "demo", "--out", str(tmp_path / "one"), "--n", "1"]) == 0  # an earlier demo: again
    mine = tmp_path / "mine"  # a folder of the user's: its photos/ would have been written into and indexed
    (mine / "photos").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    for out in (mine, mine / "notes.txt"):
        assert main(["-q", "demo", "--out", str(out)]) == 2
        assert "give a new" in capsys.readouterr().err
    assert sorted(p.name for p in mine.rglob("*")) == ["notes.txt", "photos"]


def test_compact_export_keeps_what_training_touched(tmp_path):
    from clipkit.data.synthetic import write_synthetic
    from clipkit.train import TrainConfig, train

    write_synthetic(tmp_path / "data", 64, size=32)
    train(TrainConfig(data=str(tmp_path / "data" / "train-000000.tar"), out=str(tmp_path / "run"), steps=2,
                      batch_size=16, workers=0, val=None, itm_width=32, itm_layers=1, itm_heads=2, ckpt_every=2,
                      pretrained=SCRATCH, device="cpu"))
    full = tmp_path / "run" / "ckpt-0000002.pt"
    stats = export_compact(full, tmp_path / "small.pt")
    assert 0 < stats["rows_kept"] < 1000 and stats["bytes"] < full.stat().st_size / 3
    assert "optimizer" not in torch.load(tmp_path / "small.pt", weights_only=True)
    trained = load_model("clipkit-tiny", pretrained=full, device="cpu")
    small = load_model("clipkit-tiny", pretrained=tmp_path / "small.pt", device="cpu")
    captions = ["a red circle left of a blue square", "a small green star"]  # words seen in training
    np.testing.assert_allclose(clipkit.encode(captions, model=small), clipkit.encode(captions, model=trained),
                               atol=2e-3)  # fp16 storage
    assert small.itm is not None and read_checkpoint(tmp_path / "small.pt")["meta"]["itm_config"]["width"] == 32
    # a compact checkpoint exported again (a stage-1 model made elsewhere, given a new head) loses nothing
    again = export_compact(tmp_path / "small.pt", tmp_path / "again.pt")
    assert again["rows_kept"] == stats["rows_kept"] and again["step"] == stats["step"] == 2
    np.testing.assert_array_equal(clipkit.encode(captions, model=load_model("clipkit-tiny", pretrained=tmp_path /
                                                                            "again.pt", device="cpu")),
                                  clipkit.encode(captions, model=small))
