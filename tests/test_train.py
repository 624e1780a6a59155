import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipkit.cli import main
from clipkit.errors import CheckpointError
from conftest import draw_shape
from clipkit.train import TrainConfig, TrainingDiverged, Trainable, checkpoint_paths, parameter_groups, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from clipkit.data.synthetic import write_synthetic

    folder = tmp_path_factory.mktemp("train-shards")
    write_synthetic(folder, 384, seed=2, maxcount=48, size=32)
    return str(folder / "train-{000000..000007}.tar")


def config(out, shards, **overrides) -> TrainConfig:
    base = dict(data=shards, out=str(out), steps=8, batch_size=16, lr=1e-3, warmup=2, workers=0, shuffle_buffer=64,
                val=None, log_every=1, ckpt_every=4, itm_width=32, itm_layers=1, itm_heads=2, seed=1,
                device="cpu")  # these tests mean the CPU; a GPU machine runs them there too
    base.update(overrides)
    return TrainConfig(**base)


def log_rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_a_few_steps_lower_the_loss(tmp_path, shards):
    train(config(tmp_path, shards, steps=40, ckpt_every=40, batch_size=24))
    rows = [r for r in log_rows(tmp_path) if "loss" in r]
    first, final = sum(r["itc"] for r in rows[:5]) / 5, sum(r["itc"] for r in rows[-5:]) / 5
    assert final < first - 0.15, (first, final)
    assert all(0 < r["logit_scale"] <= 100 for r in rows)
    assert {"itm", "itm_acc", "lr", "samples_per_s"} <= set(rows[-1])


def _weights(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"itm.{k}": v for k, v in state["itm"].items()}}


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, shards, workers):
    whole = tmp_path / "whole"
    train(config(whole, shards, workers=workers))
    parts = tmp_path / "parts"
    train(config(parts, shards, workers=workers, stop_after=4))  # "killed" after the step-4 checkpoint
    assert [p.name for p in checkpoint_paths(parts)] == ["ckpt-0000004.pt"]
    train(config(parts, shards, workers=workers, resume="latest"))
    a, b = _weights(whole / "ckpt-0000008.pt"), _weights(parts / "ckpt-0000008.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, shards, monkeypatch):
    import clipkit.train as training

    calls = {"n": 0}
    real = training.info_nce

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "info_nce", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 2"):
        train(config(tmp_path, shards, ckpt_every=1))
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-0000001.pt", "ckpt-0000002.pt"]
    state = torch.load(tmp_path / "ckpt-0000002.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_only_the_last_checkpoints_are_kept(tmp_path, shards):
    train(config(tmp_path, shards, steps=6, ckpt_every=1, keep_last=2, itm=False))
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-0000005.pt", "ckpt-0000006.pt"]
    assert torch.load(tmp_path / "ckpt-0000006.pt", weights_only=True)["itm"] is None


def test_weight_decay_spares_norms_biases_embeddings_and_the_logit_scale():
    import clipkit
    from clipkit.itm import build_itm_head

    clip = clipkit.load_model("clipkit-tiny", device="cpu").clip
    module = Trainable(clip, build_itm_head(clip, width=32, layers=1, heads=2))
    decay, no_decay = parameter_groups(module, 0.1)
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert "clip.logit_scale" in spared and "clip.token_embedding.weight" in spared
    assert "clip.positional_embedding" in spared and "clip.ln_final.weight" in spared
    assert "clip.visual.transformer.resblocks.0.attn.in_proj_weight" in decayed
    assert "head.classifier.weight" in decayed and "head.classifier.bias" in spared
    assert not any("ln_" in n or n.endswith(".bias") for n in decayed)


def test_train_command_errors_are_one_line(tmp_path, capsys, shards):
    assert main(["train", "--data", shards, "--out", str(tmp_path), "--precision", "bf16", "--steps", "1",
                 "--device", "cpu"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert main(["train", "--data", "synthetic:x", "--out", str(tmp_path)]) == 2
    assert "synthetic:N" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none-{000000..000001}.tar"), "--out", str(tmp_path)]) == 2
    assert "shard not found" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["train", "--data", "synthetic:8", "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file: give a folder" in capsys.readouterr().err  # ([Errno 17] File exists, as it was)
    assert main(["train-rerank", "--model", "clipkit-tiny", "--data", "synthetic:8", "--out", str(tmp_path)]) == 2
    assert "is a folder: give the checkpoint file" in capsys.readouterr().err


def test_a_folder_of_shards_trains_and_validation_takes_the_user_s_own_data(tmp_path, shards, capsys):
    """--data and --val take what `clipkit shards` writes (a folder of .tar files) and --val takes a folder of
    captioned images too; the last validation row is what `clipkit eval` gives for the run's last checkpoint."""
    from clipkit.evaluate import run_benchmark

    folder = str(Path(shards).parent)
    val = shards.replace("{000000..000007}", "000007")
    train(config(tmp_path / "run", folder, steps=2, ckpt_every=2, val=val, val_every=0))
    last = [r["val"] for r in log_rows(tmp_path / "run") if "val" in r][-1]
    checkpoint = str(sorted((tmp_path / "run").glob("*.pt"))[-1])
    expected = run_benchmark("wds", model="clipkit-tiny", pretrained=checkpoint, root=val, device="cpu")["itc"]
    assert last["t2i_R@1"] == pytest.approx(expected["t2i"]["R@1"]) and last["i2t_R@5"] == pytest.approx(
        expected["i2t"]["R@5"])
    images = tmp_path / "images"
    images.mkdir()
    for n, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        draw_shape(colour, shape, (32, 32)).save(images / f"{n}.png")
        (images / f"{n}.txt").write_text(f"a {colour} {shape}\n")
    train(config(tmp_path / "run2", shards, steps=1, ckpt_every=1, val=f"folder:{images}", val_every=0))
    assert [r["val"] for r in log_rows(tmp_path / "run2") if "val" in r][-1]["t2i_R@10"] == 1.0  # 3 images
    capsys.readouterr()
    (tmp_path / "t.csv").write_text("image,caption\n0.png,a red circle\n")
    (images / "t.csv").write_text("image,caption\n0.png,a red circle\n1.png,a blue square\n")
    for n, val in enumerate((str(images), str(images / "t.csv"))):  # a folder or a caption table by its path alone
        train(config(tmp_path / f"run3-{n}", shards, steps=1, ckpt_every=1, val=val, val_every=0))
        scores = [r["val"] for r in log_rows(tmp_path / f"run3-{n}") if "val" in r][-1]
        assert scores["t2i_R@10"] == 1.0 and 1 <= scores["i2t_mean_rank"] <= (3, 2)[n]  # 3 images, then 2
    assert main(["train", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    assert "no image with a caption in it" in capsys.readouterr().err  # (its one image is not where it says)


def test_a_folder_of_captioned_images_or_a_caption_table_trains(tmp_path, caplog):
    """--data takes what `clipkit shards` takes: its shards written once into OUT/data/source, kept for the
    runs that go on in OUT, written again for another source. Images without captions are left out with one
    warning for them all (not a line each: a folder of millions may hold many)."""
    import tarfile

    images = tmp_path / "images"
    images.mkdir()
    for n, (colour, shape) in enumerate([(c, s) for c in ("red", "blue", "green", "yellow") for s in ("circle", "square")]):
        draw_shape(colour, shape, (32, 32), seed=n).save(images / f"{n}.png")
        (images / f"{n}.txt").write_text(f"a {colour} {shape}\n")
    (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"images/{n}.png,one\n" for n in range(4)))
    for name in ("extra0", "extra1", "extra2", "empty"):
        draw_shape("red", "circle", (32, 32)).save(images / f"{name}.png")
    (images / "empty.txt").write_text("\n")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        train(config(run, str(images), steps=2, batch_size=4, ckpt_every=2))
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1 and "4 image(s) left out" in left_out[0], left_out
    assert "empty.png: no captions: empty.txt is empty" in left_out[0] and "no caption file extra0.txt" in left_out[0]
    made = sorted((run / "data" / "source").glob("train-*.tar"))
    with tarfile.open(made[0]) as shard:
        captions = sorted(m.name for m in shard.getmembers() if m.name.endswith(".txt"))
    assert len(made) == 1 and len(captions) == 8 and len(checkpoint_paths(run)) == 1
    stamp = made[0].stat().st_mtime_ns
    train(config(run, str(images), steps=4, batch_size=4, ckpt_every=2, resume="latest"))  # goes on: kept
    assert made[0].stat().st_mtime_ns == stamp and len(checkpoint_paths(run)) == 2
    assert main(["-q", "train", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "run2"), "--steps", "1",
                 "--batch-size", "4", "--device", "cpu", "--val", "none", "--workers", "0"]) == 0
    assert json.loads((tmp_path / "run2" / "data" / "source" / "train.json").read_text())["total"] == 4
    (run / "data" / "source" / "mine.txt").write_text("kept")  # another source into a folder with others' files
    with pytest.raises(ValueError, match="holds files clipkit did not write"):
        train(config(run, str(tmp_path / "t.csv"), steps=6, batch_size=4, ckpt_every=2, resume="latest"))
    assert (run / "data" / "source" / "mine.txt").read_text() == "kept" and made[0].exists()
    (run / "data" / "source" / "mine.txt").unlink()  # then written again, from the table
    train(config(run, str(tmp_path / "t.csv"), steps=6, batch_size=4, ckpt_every=2, resume="latest"))
    assert json.loads((run / "data" / "source" / "train.json").read_text())["total"] == 4


def test_resuming_with_other_options_is_refused_or_said(tmp_path, shards, caplog, capsys):
    """--resume latest with another --model was an "internal error" with a screen of state_dict mismatches (and
    wrote the wrong model into the run's config.json); an ITM head of another width likewise. Options that
    change the run's course are warned of; --lr and --weight-decay, which the optimizer's saved state keeps,
    are said to be unused, and the run's records keep what it uses."""
    import logging

    out = tmp_path / "run"
    train(config(out, shards, steps=2, ckpt_every=2))
    recorded = (out / "config.json").read_text()
    assert main(["train", "--data", shards, "--out", str(out), "--model", "clipkit-demo", "--steps", "4",
                 "--resume", "latest", "--val", "none", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "whose weights do not fit --model 'clipkit-demo'" in err and len(err.strip().splitlines()) == 1
    assert (out / "config.json").read_text() == recorded
    with pytest.raises(CheckpointError, match="ITM head of another shape.*32/1/2"):
        train(config(out, shards, steps=4, itm_width=64, resume="latest"))
    with caplog.at_level(logging.WARNING, logger="clipkit"):
        train(config(out, shards, steps=3, batch_size=8, lr=0.01, resume="latest"))
    assert "--batch-size 16 -> 8" in caplog.text and "--lr 0.01 (it keeps 0.001) not used" in caplog.text
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001
    assert [r["step"] for r in log_rows(out) if "loss" in r][-1] == 3


def test_one_shard_trains_and_shards_without_a_batch_stop(tmp_path, shards, capsys):
    """One shard with the default two loader workers trains (the workers are cut to the shards); shards that
    give no batch (garbage, or fewer samples than a batch) stop with a one-line error instead of looping for
    ever over empty epochs. (Subprocesses with a timeout: the loop never ended before.)"""
    one = shards.replace("{000000..000007}", "000000")
    (tmp_path / "garbage.tar").write_bytes(os.urandom(5000))
    runs = {"one": (one, "16", 0), "garbage": (str(tmp_path / "garbage.tar"), "16", 2), "small": (one, "64", 2)}
    started = {name: subprocess.Popen([sys.executable, "-m", "clipkit", "train", "--data", data, "--out",
                                       str(tmp_path / name), "--model", "clipkit-tiny", "--steps", "2", "--batch-size",
                                       batch, "--val", "none", "--device", "cpu"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, (data, batch, _) in runs.items()}  # (side by side: three starts of torch at once)
    try:
        for name, (_, _, code) in runs.items():
            _, stderr = started[name].communicate(timeout=240)
            assert started[name].returncode == code, (name, stderr[-2000:])
            if code:
                assert "gave not one batch of" in stderr and "Traceback" not in stderr, stderr
    finally:  # (one that loops for ever is not left running)
        for process in started.values():
            process.kill()
    assert (tmp_path / "one" / "log.jsonl").exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_on_cpu(tmp_path, shards):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "clipkit.train", "--data", shards, "--out", str(out), "--steps", "3", "--batch-size", "8",
               "--workers", "0", "--ckpt-every", "3", "--itm-width", "32", "--itm-layers", "1", "--itm-heads", "2",
               "--val", "none", "--log-every", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("step 3: loss") == 1  # printed by rank 0 only
    assert [p.name for p in checkpoint_paths(out)] == ["ckpt-0000003.pt"]
    state = torch.load(out / "ckpt-0000003.pt", weights_only=True)
    assert len(state["rng"]["sampler"]) == 2 and state["step"] == 3
    rows = log_rows(out)
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # written once (rank 0), finite


def test_sigkill_mid_run_then_resume_latest_matches_an_uninterrupted_run(tmp_path, shards):
    import signal
    import time

    args = ["--data", shards, "--steps", "8", "--batch-size", "16", "--lr", "0.001", "--warmup", "2", "--workers", "0",
            "--shuffle-buffer", "64", "--val", "none", "--ckpt-every", "2", "--itm-width", "32", "--itm-layers", "1",
            "--itm-heads", "2", "--seed", "1", "--device", "cpu"]
    whole = tmp_path / "whole"
    assert main(["train", "--out", str(whole), *args]) == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "clipkit", "train", "--out", str(killed), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "ckpt-0000004.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = checkpoint_paths(killed)
    assert "ckpt-0000008.pt" not in [p.name for p in done]
    for path in done:  # whatever the moment of the kill, every checkpoint under its real name is whole
        assert torch.load(path, weights_only=True)["step"] == int(path.stem.split("-")[1])
    assert main(["train", "--out", str(killed), *args, "--resume", "latest"]) == 0
    assert not list(killed.glob(".ckpt-*.tmp"))  # a temp file the kill may have left is cleared
    a, b = _weights(whole / "ckpt-0000008.pt"), _weights(killed / "ckpt-0000008.pt")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_hard_negatives_are_drawn_from_scaled_logits(monkeypatch):
    """Softmax over raw cosines is nearly flat; the sampler must see logit_scale x cosine."""
    import clipkit
    import clipkit.train as training
    from clipkit.itm import build_itm_head

    seen = {}
    real = training.itm_logits_and_labels

    def spy(*args, **kwargs):
        seen["similarity"] = args[4]  # (head, text_states, text_padding, image_states, similarity, ...)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "itm_logits_and_labels", spy)
    model = clipkit.load_model("clipkit-tiny", device="cpu")
    module = Trainable(model.clip, build_itm_head(model.clip, width=32, layers=1, heads=2))
    tokens = model.tokenize(["a red circle", "a blue square", "a green star"])
    pixels = torch.randn(3, 3, 32, 32)
    out = module(pixels, tokens, torch.arange(3))
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.clip.encode_image(pixels), dim=-1)
        text = torch.nn.functional.normalize(model.clip.encode_text(tokens), dim=-1)
    expected = out["logit_scale"] * image @ text.T
    assert float(out["logit_scale"]) > 10 and not seen["similarity"].requires_grad
    assert torch.allclose(seen["similarity"], expected, atol=1e-4)


def test_sigmoid_loss_trains_and_resumes_its_bias(tmp_path, shards):
    """--loss sigmoid: the loss falls; a model without a logit_bias trains one from -10, kept across a resume."""
    whole = tmp_path / "whole"
    train(config(whole, shards, steps=30, ckpt_every=10, batch_size=24, loss="sigmoid", itm=False))
    rows = [r for r in log_rows(whole) if "loss" in r]
    assert sum(r["itc"] for r in rows[-5:]) / 5 < sum(r["itc"] for r in rows[:5]) / 5 - 0.5
    state = torch.load(whole / "ckpt-0000030.pt", weights_only=True)
    assert state["logit_bias"] is not None and float(state["logit_bias"]) != -10.0
    parts = tmp_path / "parts"
    train(config(parts, shards, steps=30, ckpt_every=10, batch_size=24, loss="sigmoid", itm=False, stop_after=20))
    train(config(parts, shards, steps=30, ckpt_every=10, batch_size=24, loss="sigmoid", itm=False, resume="latest"))
    resumed = torch.load(parts / "ckpt-0000030.pt", weights_only=True)
    assert torch.allclose(resumed["logit_bias"], state["logit_bias"], atol=1e-5)
    with pytest.raises(ValueError, match="infonce or sigmoid"):
        config(tmp_path / "x", shards, loss="hinge").validate()


def test_a_resnet_model_trains_without_itm_unless_asked(tmp_path, shards):
    """By default the ITM head is trained when the image tower gives token states; a ResNet tower trains
    without it (asking for it is a one-line error saying --no-itm)."""
    train(config(tmp_path / "rn", shards, model="clipkit-tiny-rn", steps=2, ckpt_every=2))
    rows = [r for r in log_rows(tmp_path / "rn") if "loss" in r]
    assert len(rows) == 2 and "itm" not in rows[-1] and all(r["itc"] > 0 for r in rows)
    with pytest.raises(ValueError, match="--no-itm"):
        train(config(tmp_path / "asked", shards, model="clipkit-tiny-rn", steps=1, itm=True))


def test_a_new_run_never_writes_over_another_run_s_checkpoints(tmp_path, shards, capsys):
    """Training into a folder that holds a run's checkpoints without --resume is refused, and its files are
    left as they were (a new run wrote over them, and pruned them, mixing two runs in one folder)."""
    train(config(tmp_path, shards, steps=2, ckpt_every=2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main(["train", "--data", shards, "--out", str(tmp_path), "--model", "clipkit-tiny-rn", "--steps", "4",
                 "--device", "cpu", "--val", "none"]) == 2
    assert "--resume latest" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    train(config(tmp_path, shards, steps=3, ckpt_every=3, resume="latest"))  # continuing it is fine
    assert [r["step"] for r in log_rows(tmp_path) if "loss" in r][-1] == 3
