"""The doors hostile testing found open (issue "every door"): each case as a user or an attacker meets it, with
real files, real processes and real HTTP."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipkit
from clipkit.cli import main
from clipkit.data.synthetic import write_synthetic
from clipkit.index import Index

from conftest import draw_shape


@pytest.fixture(scope="module")
def demo():
    return clipkit.load_model("clipkit-demo", device="cpu")


# -- data lost ---------------------------------------------------------------------------------


def test_folder_sync_keeps_the_captions_of_shards_inside_it(tmp_path, demo, capsys):
    mix = tmp_path / "mix"
    shards = write_synthetic(mix / "shards", 10, seed=3, split="test", maxcount=10, workers=1, progress=False)
    draw_shape("red", "circle").save(mix / "photo.png")
    (mix / "photo.txt").write_text("a red circle\n")
    ix = str(tmp_path / "ix")
    assert main(["index", str(shards[0]), "--index", ix]) == 0
    before = sorted(Index.load(ix).captions.ids())
    assert len(before) >= 10
    capsys.readouterr()
    assert main(["index", str(mix), "--index", ix]) == 0
    out = capsys.readouterr().out
    assert "captions: 1 embedded" in out and ", 0 removed" in out, out
    index = Index.load(ix)
    assert sorted(set(index.captions.ids()) - {f"{mix / 'photo.png'}#0"}) == before
    assert main(["remove", str(mix / "photo.png"), "--index", ix]) == 0  # the folder's own captions still follow
    assert sorted(Index.load(ix).captions.ids()) == before


def test_shard_captions_lost_by_an_older_folder_sync_come_back(tmp_path, demo, capsys):
    shards = write_synthetic(tmp_path / "shards", 10, seed=3, split="test", maxcount=10, workers=1, progress=False)
    ix = str(tmp_path / "ix")
    assert main(["index", str(shards[0]), "--index", ix]) == 0
    index = Index.load(ix)
    expected = sorted(index.captions.ids())
    index.captions.remove(expected)  # what clipkit 0.x's folder sync did to them
    assert main(["index", str(shards[0]), "--index", ix]) == 0
    assert "indexed 0 image(s)" in capsys.readouterr().out  # nothing embedded again
    assert sorted(Index.load(ix).captions.ids()) == expected


def _committed_wal_index(path: Path) -> None:
    """An index at `path` whose last commits sit in a non-empty meta.sqlite-wal (its writer was killed)."""
    script = ("import os, sys, numpy as np\n"
              "from clipkit.index import Index\n"
              "vectors = np.random.default_rng(0).normal(size=(2003, 16))\n"
              "index = Index.from_embeddings(vectors[:2000], ids=[f'old{i}' for i in range(2000)])\n"
              "index.save(sys.argv[1])\n"
              "index.add(vectors[2000:], ids=[f'old{i}' for i in range(2000, 2003)])\n"
              "os._exit(0)  # no close: the commits stay in the WAL\n")
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert (path / "meta.sqlite-wal").stat().st_size > 0


def test_save_over_an_index_with_a_wal_never_splices_two_stores(tmp_path):
    """A crash after the new store is renamed in but before the old WAL is gone must not let SQLite replay
    the old WAL onto the new file: the old WAL is folded (or gone) before the new store takes the name."""
    target = tmp_path / "ix"
    _committed_wal_index(target)
    script = (
        "import os, sys, numpy as np\n"
        "import clipkit.index.core as core\n"
        "from clipkit.index import Index\n"
        "real = core.atomic_path\n"
        "import contextlib\n"
        "@contextlib.contextmanager\n"
        "def dying(target):\n"
        "    with real(target) as tmp:\n"
        "        yield tmp\n"
        "    os._exit(9)  # killed right after the new store took the name\n"
        "core.atomic_path = dying\n"
        "vectors = np.random.default_rng(1).normal(size=(1500, 16))\n"
        "Index.from_embeddings(vectors, ids=[f'new{i}' for i in range(1500)]).save(sys.argv[1])\n")
    assert subprocess.run([sys.executable, "-c", script, str(target)]).returncode == 9
    db = sqlite3.connect(target / "meta.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    loaded = Index.load(target)
    ids = set(loaded.ids())
    assert ids in ({f"old{i}" for i in range(2003)}, {f"new{i}" for i in range(1500)}), len(ids)
