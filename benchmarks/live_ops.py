"""What one change costs a living index as it grows: open, add one item and a live reader catching up, remove
one item (and its caption), remove a folder, at each size, side by side in one run.

    python benchmarks/live_ops.py [--sizes 100000 1000000] [--dim 64] [--work DIR] [--json OUT]

Each size is an index ingested from clip-retrieval's layout (`clipkit index EMB_DIR`): n images, each with a
caption and its text embedding, ids `/photos/NNNNNNNNN.jpg`. A change should cost what it changes, not the
size of the index: the columns should stay flat from the smallest size to the largest. Prints a markdown
table and writes JSON (default live_ops.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipkit.cli import main as clipkit_main
from clipkit.index import Index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import timed  # noqa: E402  (median seconds of fn() over `repeats` runs)



def write_parts(folder: Path, n: int, dim: int, part: int = 500_000) -> None:
    """n unit image embeddings, captions and their text embeddings, in parts of `part` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, n, part)):
        rows = min(part, n - start)
        images = rng.standard_normal((rows, dim)).astype(np.float32)
        texts = images + 0.5 * rng.standard_normal((rows, dim)).astype(np.float32)
        for name, array in (("img_emb", images), ("text_emb", texts)):
            array /= np.linalg.norm(array, axis=1, keepdims=True)
            np.save(folder / name / f"{name}_{number}.npy", array.astype(np.float16))
        ids = [f"/photos/{i:09d}.jpg" for i in range(start, start + rows)]
        pq.write_table(pa.table({"image_path": ids, "caption": [f"caption of photo {i}" for i in range(start, start + rows)]}),
                       folder / "metadata" / f"metadata_{number}.parquet")


def measure(path: Path, dim: int, repeats: int) -> dict:
    row = {"open_ms": 1000 * timed(lambda: len(Index.load(path)), repeats)}
    writer, reader = Index.load(path), Index.load(path)
    rng = np.random.default_rng(1)
    added = iter(range(10**6))

    def add_seen():
        writer.add(rng.standard_normal((1, dim)), ids=[f"/new/{next(added)}.jpg"])
        reader.refresh()

    row["add_seen_ms"] = 1000 * timed(add_seen, repeats)
    victims = iter(range(0, 10**9, 7))
    row["remove_one_ms"] = 1000 * timed(lambda: writer.remove([f"/photos/{next(victims):09d}.jpg"]), repeats)

    def remove_seen():
        writer.remove([f"/photos/{next(victims):09d}.jpg"])
        reader.refresh()

    row["remove_seen_ms"] = 1000 * timed(remove_seen, repeats)
    row["remove_folder_ms"] = 1000 * timed(lambda: writer.remove_folder("/nowhere/at/all"), repeats)
    row["items"], row["captions"] = len(reader), len(reader.captions)
    return row


def run(sizes: list[int], dim: int, work: Path, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        parts, path = work / f"emb-{n}", work / f"ix-{n}"
        if not path.exists():
            write_parts(parts, n, dim)
            start = time.perf_counter()
            assert clipkit_main(["-q", "index", str(parts), "--index", str(path)]) == 0
            print(f"n={n}: ingested in {time.perf_counter() - start:.0f} s", flush=True)
        rows.append({"n": n, **measure(path, dim, repeats)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| n | open ms | add one, reader sees it ms | remove one (+ caption) ms | remove one, reader sees it ms "
             "| remove a folder ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['open_ms']:.1f} | {r['add_seen_ms']:.1f} | {r['remove_one_ms']:.1f} | "
                     f"{r['remove_seen_ms']:.1f} | {r['remove_folder_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", help="folder for the data and indexes (default: a temporary one)")
    parser.add_argument("--json", default="live_ops.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = run(args.sizes, args.dim, Path(args.work or scratch), args.repeats)
    print(table(rows))
    Path(args.json).write_text(json.dumps({"dim": args.dim, "repeats": args.repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
