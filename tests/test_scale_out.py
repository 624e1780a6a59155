"""Rank-sharded indexing from two processes, then a merge: the same index as one process makes."""

import os
import subprocess
import sys

import numpy as np
import pytest

from clipkit.cli import main
from clipkit.data.synthetic import write_synthetic
from clipkit.index import Index, shard_of


def test_two_processes_index_shards_and_the_merge_equals_one_process(tmp_path, tiny_ckpt, capsys):
    photos = tmp_path / "photos"
    write_synthetic(photos, 80, seed=9, layout="folder", workers=1, progress=False)
    model_args = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt), "--batch-size", "8", "--device", "cpu"]
    pattern = str(tmp_path / "part-{rank}.clipkit")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    processes = [  # one with explicit I/N, one as torchrun would start it (RANK / WORLD_SIZE)
        subprocess.Popen([sys.executable, "-m", "clipkit", "-q", "index", str(photos), "--index", pattern,
                          "--shard", "0/2", *model_args], env=env, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-m", "clipkit", "-q", "index", str(photos), "--index", pattern,
                          "--shard", "auto", *model_args], env={**env, "RANK": "1", "WORLD_SIZE": "2"},
                         stderr=subprocess.PIPE, text=True),
    ]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    parts = [Index.load(tmp_path / f"part-{rank}.clipkit") for rank in (0, 1)]
    root = photos.resolve()
    for rank, part in enumerate(parts):
        assert len(part) > 10 and all(shard_of(os.path.relpath(i, root), 2) == rank for i in part.ids())
    assert not set(parts[0].ids()) & set(parts[1].ids())

    assert main(["merge", str(tmp_path / "all.clipkit"), str(tmp_path / "part-0.clipkit"),
                 str(tmp_path / "part-1.clipkit")]) == 0
    assert "merged 2 index(es): 80 items" in capsys.readouterr().out
    assert main(["-q", "index", str(photos), "--index", str(tmp_path / "single.clipkit"), *model_args]) == 0
    merged, single = Index.load(tmp_path / "all.clipkit"), Index.load(tmp_path / "single.clipkit")
    ids = single.ids()
    assert sorted(merged.ids()) == sorted(ids) and len(ids) == 80
    np.testing.assert_allclose(merged.embeddings(ids), single.embeddings(ids), atol=1e-5)
    assert [r["size"] for r in merged.get(ids)] == [r["size"] for r in single.get(ids)]
    # the merged index is a normal one: a re-run over the folder finds nothing to do
    assert main(["index", str(photos), "--index", str(tmp_path / "all.clipkit")]) == 0
    assert "indexed 0 image(s)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--shard", "2/2"], "need 0 <= I < N"),
    (["--shard", "x"], "must be I/N"),
    (["--shard", "auto"], "RANK and WORLD_SIZE"),
])
def test_bad_shard_arguments(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["index", str(tmp_path), "--index", str(tmp_path / "i"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_merge_refuses_mixed_models_and_existing_output(tmp_path, capsys):
    a = Index.from_embeddings(np.eye(4, dtype=np.float32), model_info={"name": "m1", "dim": 4, "fingerprint": "a"})
    b = Index.from_embeddings(np.eye(4, dtype=np.float32), ids=[10, 11, 12, 13],
                              model_info={"name": "m2", "dim": 4, "fingerprint": "b"})
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert main(["merge", str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is given twice"):
        Index.merge([tmp_path / "a", tmp_path / "a"])


def test_merge_of_overlapping_parts_says_what_to_do_and_streams(tmp_path, capsys, monkeypatch, caplog):
    """Parts whose ids overlap stop the merge with a message that says so (not "remove them first"); the
    folder left is named for what it is when other parts are given; a part's damaged rows are left out
    with a warning; parts are read in one streamed pass (never every id at once)."""
    from clipkit.index.store import Store

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    Index.from_embeddings(vectors[:20], ids=list(range(20)), precision="float32").save(tmp_path / "a")
    Index.from_embeddings(vectors[10:], ids=list(range(10, 30))).save(tmp_path / "b")
    monkeypatch.setattr(Store, "ids", lambda self: pytest.fail("merge held every id at once"))
    assert main(["merge", str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "id 10 of" in err and "do not overlap" in err and "remove them first" not in err
    assert main(["merge", str(tmp_path / "out"), str(tmp_path / "a")]) == 2
    assert "holds an unfinished merge of other parts" in capsys.readouterr().err

    [segment] = (tmp_path / "a" / "vectors").glob("*.vec")
    data = bytearray(segment.read_bytes())
    data[5 * 32:5 * 32 + 4] = np.float32("nan").tobytes()  # item 5's first number
    segment.write_bytes(bytes(data))
    assert main(["merge", str(tmp_path / "out2"), str(tmp_path / "a")]) == 0
    assert "1 damaged embedding(s)" in caplog.text
    merged = Index.load(tmp_path / "out2")
    assert len(merged) == 19 and list(merged.find(list(range(20)))) == [i for i in range(20) if i != 5]
    kept = [i for i in range(20) if i != 5]
    np.testing.assert_allclose(merged.embeddings(kept), vectors[kept] / np.linalg.norm(vectors[kept], axis=1,
                                                                                        keepdims=True), atol=1e-6)
