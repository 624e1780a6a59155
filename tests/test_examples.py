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
