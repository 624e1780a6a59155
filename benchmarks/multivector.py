"""Items of several vectors (BLIP-2's query tokens): approximate search against exact, side by side.

    python benchmarks/multivector.py [--items 200000] [--vectors 32] [--dim 256] [--work DIR] [--json multivector.json]

Synthetic items like BLIP-2 image embeddings: each item's vectors are correlated (a topic, the item's own
offset, then each query token's), queries sit across a modality gap. The index (`Index(vectors_per_item=V,
index_type="auto")`) is filled in chunks, built with 2,000 sample queries of the queries' kind, and saved;
then, on 1,000 other queries: recall@10 against exact search (numpy, chunked over the regenerated items:
max over each item's vectors), queries/s of the approximate structure and of clipkit's exact search over
the same stored vectors, and one query's p50. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 5_000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def space(dim: int) -> tuple[np.ndarray, np.ndarray]:
    fixed = np.random.default_rng(777)
    scale = (1 + np.arange(dim)) ** -0.5
    return fixed.standard_normal((1000, dim)) * scale * 1.5, fixed.standard_normal(dim) * scale


def items(start: int, n: int, vectors: int, dim: int) -> np.ndarray:
    """Items start .. start + n - 1 (the same every time they are asked for)."""
    topics, _ = space(dim)
    scale = (1 + np.arange(dim)) ** -0.5
    rng = np.random.default_rng(start)
    base = topics[rng.integers(0, len(topics), n)] + rng.standard_normal((n, dim)) * scale * 0.6
    tokens = base[:, None, :] + rng.standard_normal((n, vectors, dim)) * scale * 0.5
    return unit(tokens)


def queries(n: int, dim: int, seed: int) -> np.ndarray:
    topics, gap = space(dim)
    scale = (1 + np.arange(dim)) ** -0.5
    rng = np.random.default_rng(seed)
    return unit(topics[rng.integers(0, len(topics), n)] + rng.standard_normal((n, dim)) * scale * 0.7 + gap)


def exact_top10(asked: np.ndarray, count: int, vectors: int, dim: int) -> np.ndarray:
    best_scores = np.full((len(asked), 10), -np.inf, np.float32)
    best = np.zeros((len(asked), 10), np.int64)
    for start in range(0, count, CHUNK):
        block = items(start, min(CHUNK, count - start), vectors, dim).astype(np.float16).astype(np.float32)
        scores = (asked @ block.reshape(-1, dim).T).reshape(len(asked), len(block), vectors).max(axis=2)
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged = np.concatenate([best, top + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1)[:, :10]
        best_scores, best = np.take_along_axis(merged_scores, keep, 1), np.take_along_axis(merged, keep, 1)
    return best


def run(count: int, vectors: int, dim: int, work: Path) -> dict:
    from clipkit.index import Index
    from clipkit.index.live import exact_structure

    path = work / f"mv-{count}x{vectors}x{dim}"
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    index = Index(dim, vectors_per_item=vectors, index_type="auto", precision="float16")
    index.save(path)
    for first in range(0, count, CHUNK):
        index.add(items(first, min(CHUNK, count - first), vectors, dim), ids=list(range(first, first + CHUNK))[
            :min(CHUNK, count - first)])
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    index.build(sample_queries=queries(2000, dim, seed=1))
    index.save()
    build_s = time.perf_counter() - start
    asked = queries(1000, dim, seed=2)
    truth = exact_top10(asked, count, vectors, dim)
    index.search(asked[:50], 10)
    start = time.perf_counter()
    found = index.search(asked, 10)[1]
    ann_s = time.perf_counter() - start
    one = []
    for q in asked[:200]:
        t = time.perf_counter()
        index.search(q[None], 10)
        one.append(time.perf_counter() - t)
    exact = exact_structure(index)
    start = time.perf_counter()
    exact.search(asked[:100], 10)
    exact_s = (time.perf_counter() - start) * 10
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())]))
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"items": count, "vectors_per_item": vectors, "dim": dim, "structure": index.structure,
            "fill_s": fill_s, "build_s": build_s, "bytes_per_item": disk / count,
            "estimated_recall": (index.tuning or {}).get("estimated_recall", 1.0), "recall_at_10": recall,
            "ann_qps": len(asked) / ann_s, "exact_qps": len(asked) / exact_s, "speedup": exact_s / ann_s,
            "p50_ms": 1000 * float(np.median(one))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--vectors", type=int, default=32, help="vectors per item (BLIP-2: 32 query tokens)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--work", default="multivector-work")
    parser.add_argument("--json", default="multivector.json")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    row = run(args.items, args.vectors, args.dim, work)
    columns = list(row)
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    Path(args.json).write_text(json.dumps({"rows": [row]}, indent=2))
    sys.exit(0 if row["recall_at_10"] >= 0.9 else 1)


if __name__ == "__main__":
    main()
