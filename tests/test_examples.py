import ast
import subprocess
import sys
from pathlib import Path

import pytest

from clipkit.bundled import bundled_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif("clipkit-demo" not in bundled_models(), reason="demo weights not bundled")
def test_quickstart_runs_offline(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "indexed 200 images" in run.stdout and "image query" in run.stdout and "(2, 128) float32" in run.stdout


def _example(name: str, *args: str) -> str:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.skipif("clipkit-demo" not in bundled_models(), reason="demo weights not bundled")
def test_living_index_example(tmp_path):
    out = _example("living_index.py", "--out", str(tmp_path))
    assert "writer: 40 embedded, 1 moved (not embedded again), 1 removed" in out
    assert "reader sees 99 images; the deleted one among the hits: False" in out
    assert f"found at {tmp_path / 'photos' / 'renamed'}" in out


def test_own_embeddings_example(tmp_path):
    out = _example("own_embeddings.py", "--out", str(tmp_path), "--n", "20000")
    top, exact = (line.split(":", 1)[1] for line in out.splitlines() if line.startswith(("top 3:", "exact:")))
    assert [item.split("'")[1] for item in top.split("(")[1:]] == ast.literal_eval(exact.strip())  # as numpy
    assert "read back: same ids True" in out and "exported 20000 rows in 3 parts" in out
