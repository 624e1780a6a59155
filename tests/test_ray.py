"""`clipkit index --engine ray`: the same index as one process, through a local Ray, resumable after a kill -9."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from clipkit.cli import main
from clipkit.index import Index
from conftest import draw_shape

pytest.importorskip("ray.data")

SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """600 small images in two folders, plus one that is not an image."""
    root = tmp_path_factory.mktemp("ray") / "photos"
    for number in range(600):
        folder = root / ("a" if number % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        colour = ("red", "green", "blue", "yellow", "purple", "orange")[number % 6]
        draw_shape(colour, SHAPES[number % 3], (24 + number % 9, 24), seed=number).save(folder / f"{number}.png")
    (root / "broken.jpg").write_text("not an image")
    return root


KILLED_AFTER_TWO_BATCHES = """
import os, sys
from clipkit.index import Index
from clipkit.cli import main
real, calls = Index._replace_files, []
def dying(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)  # the driver killed: no clean-up, no save
    return out
Index._replace_files = dying
sys.exit(main(sys.argv[1:]))
"""


def test_engine_ray_killed_midway_and_run_again_equals_one_process(many_images, tmp_path, tiny_ckpt, capfd):
    model = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt), "--batch-size", "64"]
    assert main(["-q", "index", str(many_images), "--index", str(tmp_path / "local"), *model]) == 0
    ray_index = str(tmp_path / "ray")
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_BATCHES, "-q", "index", str(many_images), "--index",
                             ray_index, "--engine", "ray", "--ray-actors", "2", *model], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr[-2000:]
    committed = len(Index.load(ray_index))
    assert 0 < committed < 600  # the two batches committed before the kill
    capfd.readouterr()
    assert main(["index", str(many_images), "--index", ray_index, "--engine", "ray", "--ray-actors", "2",
                 *model]) == 0
    out, err = capfd.readouterr()  # (what Ray's C++ core writes to the file descriptor included)
    rest = 600 - committed
    assert f"indexed {rest} image(s) ({rest} new" in out and "600 in" in out  # only what the kill left out
    assert "broken.jpg" in err and "1 skipped" in out and "ray: 2 actor(s)" in out
    assert "core_worker" not in err  # Ray's line about its own actors' restarts (ray#57733) is not the user's
    local, resumed = Index.load(tmp_path / "local"), Index.load(ray_index)
    ids = sorted(local.ids())
    assert sorted(resumed.ids()) == ids and len(ids) == 600
    np.testing.assert_allclose(resumed.embeddings(ids), local.embeddings(ids), atol=2e-3)  # float16 rounding
    query = local.embeddings(ids[:5])
    assert resumed.search(query, 3)[1][:, 0].tolist() == ids[:5]


@pytest.mark.parametrize("argv, message", [
    (["--engine", "ray", "--ray-actors", "0"], "--ray-actors"),
    (["--ray-actors", "2"], "go with --engine ray"),
    (["--ray-address", "auto"], "go with --engine ray"),
    (["--ray-items-per-call", "1000"], "go with --engine ray"),
    (["--engine", "ray", "--ray-items-per-call", "0"], "--ray-items-per-call"),
])
def test_engine_arguments_are_checked_before_anything_is_indexed(argv, message, image_folder, tmp_path, capsys):
    assert main(["index", str(image_folder), "--index", str(tmp_path / "ix"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()


def test_engine_ray_indexes_shards_in_place_as_one_process_does(tmp_path, capsys, monkeypatch):
    """Three shards, two engine calls (--ray-items-per-call 15, whole shards), one local Ray: the members
    travel to the actors as (tar, offset, size), read in place there; the same items and embeddings as one
    process."""
    import ray

    from clipkit.data.synthetic import write_synthetic
    from clipkit.encode_ray import RayEngine

    shards = write_synthetic(tmp_path / "shards", 30, seed=8, split="test", maxcount=10, workers=1, progress=False)
    spec = str(shards[0].parent / "test-{000000..000002}.tar")
    starts = []
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **k: starts.append(1) or real_init(*a, **k))
    calls, real_stream = [], RayEngine._stream
    monkeypatch.setattr(RayEngine, "_stream", lambda self, *a: calls.append(len(a[1])) or real_stream(self, *a))
    assert main(["-q", "index", spec, "--index", str(tmp_path / "local")]) == 0
    assert main(["index", spec, "--index", str(tmp_path / "ray"), "--engine", "ray", "--ray-actors", "1",
                 "--ray-items-per-call", "15"]) == 0
    assert "indexed 30 image(s) (30 new" in capsys.readouterr().out
    assert len(starts) == 1 and not ray.is_initialized()  # started once for the run, stopped after it
    assert calls == [20, 10]  # (whole shards a call, past 15 in the first)
    local, spread = Index.load(tmp_path / "local"), Index.load(tmp_path / "ray")
    ids = sorted(local.ids())
    assert sorted(spread.ids()) == ids and len(ids) == 30
    np.testing.assert_allclose(spread.embeddings(ids), local.embeddings(ids), atol=2e-3)
    assert [r["offset"] for r in spread.get(ids)] == [r["offset"] for r in local.get(ids)]


def test_engine_ray_refuses_an_unreachable_cluster(tmp_path, image_folder, capsys):
    assert main(["index", str(image_folder), "--index", str(tmp_path / "ix2"), "--engine", "ray",
                 "--ray-address", "127.0.0.1:1"]) == 2
    assert "cannot join a Ray cluster" in capsys.readouterr().err


def test_a_failing_ray_run_keeps_what_it_committed_and_says_how_to_go_on(image_folder, tmp_path, tiny_ckpt, capsys,
                                                                         monkeypatch):
    """Ray gives up (a task failed past its retries): one line, exit 2, and the batches committed before it
    stay; the same command run again goes on from there."""
    import ray

    from clipkit.encode_ray import RayEngine

    def failing_stream(self, ray_module, paths, model, batch_size):
        good = [n for n, path in enumerate(paths) if not str(path).endswith("broken.jpg")][:4]
        yield model.encode_image(torch_pixels(model, 4)).numpy(), good, []  # a first batch lands, is committed
        raise ray.exceptions.RayTaskError("embed", "Traceback: worker died", ValueError("worker died"))

    def torch_pixels(model, n):
        import torch

        return torch.zeros(n, 3, model.image_size, model.image_size)

    monkeypatch.setattr(RayEngine, "_connect", lambda self, ray_module: False)
    monkeypatch.setattr(RayEngine, "_stream", failing_stream)
    model = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt), "--batch-size", "4"]
    index_path = tmp_path / "ix"
    assert main(["index", str(image_folder), "--index", str(index_path), "--engine", "ray", *model]) == 2
    err = capsys.readouterr().err
    assert "Ray stopped embedding" in err and "run the same command again" in err and "Traceback" not in err
    assert len(Index.load(index_path)) == 4  # kept
    monkeypatch.undo()
    assert main(["-q", "index", str(image_folder), "--index", str(index_path), *model]) == 0
    assert len(Index.load(index_path)) == 12  # went on: the 4 kept, the other 8 added


def test_ray_leaves_no_colour_reset_for_the_terminal_at_exit():
    """Ray's CLI logger calls colorama.init() as Ray starts; its exit hook wrote ESC[0m to the terminal after
    clipkit's summary (a stray line on every --engine ray run). The engine unregisters that hook: a process
    on a terminal (a pty here) that started Ray's colours ends without it, and one that keeps them does not."""
    import os
    import pty

    pytest.importorskip("ray")

    def on_a_terminal(code: str) -> bytes:
        master, slave = pty.openpty()
        subprocess.run([sys.executable, "-c", "import sys; from clipkit.encode_ray import require_ray, "
                        "_no_colour_reset_at_exit; require_ray(); sys.modules['colorama.initialise'].init(strip=False)"
                        f"; {code}; print('done')"], stdout=slave, stderr=slave, timeout=120, check=True)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # (the terminal's other end closed)
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
        return out

    assert b"\x1b[0m" in on_a_terminal("pass")  # Ray's hook, left alone
    done = on_a_terminal("_no_colour_reset_at_exit()")
    assert b"done" in done and b"\x1b[0m" not in done


class _Cluster:
    """What RayEngine._pool asks of Ray: the cluster's resources and its nodes."""

    def __init__(self, *nodes):
        self._nodes = [{"Alive": True, "Resources": dict(node)} for node in nodes]

    def cluster_resources(self):
        totals = {}
        for node in self._nodes:
            for name, amount in node["Resources"].items():
                totals[name] = totals.get(name, 0) + amount
        return totals

    def nodes(self):
        return self._nodes


@pytest.mark.parametrize("nodes, options, expected", [
    ([{"CPU": 2}], {}, {"actors": 2, "num_cpus": 1, "num_gpus": 0}),  # this machine: one actor per CPU
    ([{"CPU": 16, "GPU": 1}], {}, {"actors": 1, "num_cpus": 16, "num_gpus": 1}),  # the GPU fed by every CPU
    ([{"CPU": 96, "GPU": 8}, {"CPU": 64}], {}, {"actors": 8, "num_cpus": 12, "num_gpus": 1}),  # CPU nodes aside
    ([{"CPU": 16, "GPU": 2}, {"CPU": 8, "GPU": 2}], {}, {"actors": 4, "num_cpus": 4, "num_gpus": 1}),  # fits both
    ([{"CPU": 16, "GPU": 1}], {"gpus_per_actor": 0.5}, {"actors": 2, "num_cpus": 8, "num_gpus": 0.5}),
    ([{"CPU": 16, "GPU": 1}], {"cpus_per_actor": 3}, {"actors": 1, "num_cpus": 3, "num_gpus": 1}),
])
def test_a_gpu_actor_gets_the_cpus_of_its_gpu_to_decode_with(nodes, options, expected):
    """One CPU per GPU actor left its GPU waiting on JPEG decoding; an actor now takes the CPUs that go with its
    GPU on the GPU nodes (the fewest there are, so that it fits on each), unless told otherwise."""
    from clipkit.encode_ray import RayEngine

    assert RayEngine(**options)._pool(_Cluster(*nodes)) == expected


def test_a_gpu_actor_takes_ray_batches_of_several_model_batches(many_images, tiny_model, monkeypatch):
    """On a cluster with GPUs (here one declared to a local Ray: the actor runs on the CPU) the actor gets Ray
    batches of GPU_BATCHES model batches, embedded a model batch at a time, its decoding threads preparing the
    next while the model runs one; the vectors are those of one process."""
    import ray
    import ray.data

    from clipkit.encode import embed_image_files
    from clipkit.encode_ray import GPU_BATCHES, RayEngine, embed_ray_batch

    paths = sorted(many_images.rglob("*.png"))[:40] + [many_images / "broken.jpg"]
    out = embed_ray_batch(paths[:5], tiny_model, 2, 1)  # sub-batches of 2 within one call
    assert out["vector"].shape == (5, tiny_model.dim) and list(out["reason"]) == [""] * 5
    reference = np.zeros((len(paths), tiny_model.dim), np.float32)
    for vectors, positions, _ in embed_image_files(paths, tiny_model, batch_size=64):
        reference[positions] = vectors
    asked, real = [], ray.data.Dataset.map_batches
    monkeypatch.setattr(ray.data.Dataset, "map_batches",
                        lambda self, fn, **kw: asked.append(kw) or real(self, fn, **kw))
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        engine = RayEngine()
        got, failed = np.zeros_like(reference), []
        for vectors, positions, failures in engine(paths, tiny_model, batch_size=2):
            got[positions] = vectors
            failed += [position for position, _, _ in failures]
    finally:
        ray.shutdown()
    assert engine.stats["actors"] == 1 and failed == [len(paths) - 1]
    assert asked[0]["batch_size"] == 2 * GPU_BATCHES and asked[0]["num_gpus"] == 1 and asked[0]["num_cpus"] == 2
    assert asked[0]["fn_constructor_kwargs"]["batch_size"] == 2
    np.testing.assert_allclose(got[:-1], reference[:-1], atol=1e-5)
