"""Every script in benchmarks/ runs, end to end, on tiny inputs (a script that no test runs rots). These check
that each finishes and writes its table and JSON; the numbers themselves are the scripts' business."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_script_has_a_smoke_test():
    tested = {"throughput.py", "ann.py", "retrieval.py", "serve_load.py", "train_demo.py", "gpu_check.py",
              "scale.py", "engines.py", "multivector.py", "live_ops.py", "tables.py"}
    assert {p.name for p in BENCHMARKS.glob("*.py")} == tested


def test_throughput_quick(tmp_path):
    out = run("throughput.py", "--smoke", "--models", "clipkit-demo", "--ann-size", "0", "--no-train", "--json",
              str(tmp_path / "t.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert "ITM re-rank, 32 candidates" in {r["row"] for r in rows} and "| clipkit-demo |" in out
    assert all(r["clipkit_per_s"] > 0 for r in rows)


def test_ann_past_the_exact_limit(tmp_path):
    run("ann.py", "--n", "60000", "--dim", "32", "--queries", "200", "--json", str(tmp_path / "a.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["structure"] != "Flat" and r["measured_recall_at_10"] >= 0.9 for r in rows), rows
    assert all(r[f"measured_recall_at_{k}"] >= 0.9 for r in rows for k in (1, 50, 100)), rows


def test_retrieval(tmp_path):
    out = run("retrieval.py", "--dataset", "synthetic", "--n-images", "60", "--rerank", "--json",
              str(tmp_path / "r.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_images"] == 60 and set(report["rerank"]) == {"t2i", "i2t"} and "R@1" in out


def test_serve_load(tmp_path):
    out = run("serve_load.py", "--images", "20", "--vectors", "500", "--requests", "10", "--clients", "1", "2",
              "--search-batch", "1", "8", "--json", str(tmp_path / "s.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "s.json").read_text())
    assert "p99" in out and [(r["search_batch"], r["clients"]) for r in report["rows"]] == [(1, 1), (1, 2), (8, 1),
                                                                                              (8, 2)]
    assert report["mean_batch"]["1"]["search"] == 1.0 and all(r["requests"] == 10 for r in report["rows"])


def test_train_demo_tiny(tmp_path):
    bundled = (BENCHMARKS.parent / "clipkit" / "weights" / "clipkit-demo.pt").read_bytes()
    run("train_demo.py", "--out", str(tmp_path / "run"), "--steps", "2", "--train-images", "64", "--batch-size", "16",
        "--rerank-steps", "2", "--rerank-galleries", "1", "--gallery-size", "40", "--test-images", "30", "--export",
        str(tmp_path / "demo.pt"), cwd=tmp_path)
    report = json.loads((tmp_path / "run" / "demo_eval.json").read_text())
    assert report["steps"] == 2 and report["stage2"]["rerank_weight_i2t"] is not None
    assert (tmp_path / "demo.pt").is_file()
    assert (BENCHMARKS.parent / "clipkit" / "weights" / "clipkit-demo.pt").read_bytes() == bundled  # untouched
    run("train_demo.py", "--check-unseen", "--unseen-seeds", "2", "--unseen-sizes", "20", "--export",
        str(tmp_path / "demo.pt"), "--json", str(tmp_path / "unseen.json"), cwd=tmp_path)
    unseen = json.loads((tmp_path / "unseen.json").read_text())
    assert [(g["images"], g["seed"]) for g in unseen["galleries"]] == [(20, 0), (20, 1)]
    change = [g["i2t_rerank"] - g["i2t_itc"] for g in unseen["galleries"]]
    assert unseen["summary"]["i2t"]["mean_change"] == pytest.approx(sum(change) / 2, abs=1e-3)
    assert unseen["summary"]["i2t"]["lowered"] == sum(c < 0 for c in change)


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """The GPU check's script as it runs there, on the CPU with a tiny model; its shell wrapper parses."""
    out = run("gpu_check.py", "--device", "cpu", "--quick", "--model", "clipkit-tiny", "--out", str(tmp_path / "g.md"),
              cwd=tmp_path)
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["clipkit"] > 0 and r["row"] for r in rows[:5]) and "| training step" in out
    assert [r["row"].split(",")[0] for r in rows[:3]] == ["image encoding from PIL images",
                                                          "image tower on preprocessed tensors", "text encoding"]
    assert "one Ray actor's loop: 128 JPEGs" in rows[5]["row"]  # (how busy the GPU is: nvidia-smi, there only)
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")]).returncode == 0


def test_scale_tiny(tmp_path):
    out = run("scale.py", "--sizes", "3000", "--dim", "128", "--model", "clipkit-demo", "--work", str(tmp_path / "w"),
              "--json", str(tmp_path / "s.json"), cwd=tmp_path)
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert row["n"] == 3000 and row["recall_at_10"] >= 0.999 and row["added_and_removed"] == 300  # float16: ties
    assert row["searchable_after_s"] < 600 and row["serve_peak_gib"] > 0 and "| 3000 |" in out


def test_multivector_tiny(tmp_path):
    out = run("multivector.py", "--items", "15000", "--vectors", "4", "--dim", "16", "--work", str(tmp_path / "w"),
              "--json", str(tmp_path / "m.json"), cwd=tmp_path)
    row = json.loads((tmp_path / "m.json").read_text())["rows"][0]
    assert row["structure"] != "Flat" and row["recall_at_10"] >= 0.9 and row["speedup"] > 1 and "| 15000 |" in out


def test_engines_tiny(tmp_path):
    pytest.importorskip("ray.data")
    out = run("engines.py", "--images", "12", "--size", "96x64", "--repeats", "1", "--quick", "--json",
              str(tmp_path / "e.json"), cwd=tmp_path)
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["images"] == 12 and row["local_s"] > 0 and row["ray_s"] > 0 and "| 12 | 96x64 |" in out


def test_live_ops_tiny(tmp_path):
    pytest.importorskip("pyarrow")
    out = run("live_ops.py", "--sizes", "500", "2000", "--dim", "16", "--repeats", "2", "--work", str(tmp_path / "w"),
              "--json", str(tmp_path / "l.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [500, 2000] and "| 2000 |" in out
    assert rows[1]["items"] == 2000 + 2 - 4 and rows[1]["captions"] == 2000 - 4  # (2 added, 4 removed)
    assert all(r[c] > 0 for r in rows for c in ("open_ms", "add_seen_ms", "remove_one_ms", "remove_seen_ms"))


def test_tables_tiny(tmp_path):
    out = run("tables.py", "--sizes", "300", "--work", str(tmp_path), "--json", str(tmp_path / "t.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["stage"] for r in rows][:3] == ["read + check", "list read", "caption sync"] and len(rows) == 7
    assert [r["stage"] for r in rows][-2:] == ["folder moved", "folder removed"]  # (they assert every file moved
    # with its caption, then every item and caption removed)
    assert "MB per 1M rows" in out
    assert all(r["seconds"] >= 0 and r["rows"] == 300 for r in rows)
