"""Load test of `clipkit serve`: queries/s and latency percentiles at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_load.py [--images 300] [--vectors 0] [--requests 400] [--clients 1 8 32]
                                    [--search-batch 1 256] [--rerank] [--json OUT]

Builds a folder of synthetic images, indexes it with the demo model (plus `--vectors` random unit vectors,
so that a search costs what it costs in a large collection), serves it as `clipkit serve` does, in a separate
process on a free loopback port, and drives POST /search (text queries, k=10) from N concurrent HTTP clients.
Each `--search-batch` value is served in turn (the most queued searches made in one index search; 1: each
request searched alone), side by side in one run. Prints a markdown table and writes JSON (default
serve_load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from clipkit import Index, load_model
from clipkit.data.synthetic import write_synthetic

WORDS = ([f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
          for s in ("circle", "square", "triangle", "star", "heart", "cross", "hexagon", "diamond")])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_path: Path, port: int, search_batch: int) -> subprocess.Popen:
    """`clipkit serve --index INDEX` (its `serve` function, with the search batch asked for)."""
    code = ("import sys; from clipkit.serve import ServeConfig; from clipkit.serve.app import serve; "
            "serve([sys.argv[1]], port=int(sys.argv[2]), config=ServeConfig(max_search_batch=int(sys.argv[3])), "
            "log_level='warning')")
    process = subprocess.Popen([sys.executable, "-c", code, str(index_path), str(port), str(search_batch)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"clipkit serve did not start: {process.stderr.read().decode(errors='replace')[-2000:]}")


async def drive(url: str, clients: int, requests: int, rerank: bool = False) -> dict:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient):
        for n in counter:
            start = time.perf_counter()
            response = await http.post(url + "search", json={"text": WORDS[n % len(WORDS)], "k": 10, "rerank": rerank})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        await http.post(url + "search", json={"text": "warm up", "k": 10})
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "seconds": round(seconds, 3),
            "qps": round(len(latencies) / seconds, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def build_index(folder: Path, images: int, vectors: int) -> Path:
    photos, index_path = folder / "photos", folder / "photos.clipkit"
    write_synthetic(photos, images, seed=1, layout="folder", progress=False)
    index = Index.from_folder(photos, load_model("clipkit-demo", device="cpu"))
    rng = np.random.default_rng(0)
    for start in range(0, vectors, 50_000):
        block = rng.standard_normal((min(50_000, vectors - start), index.dim)).astype(np.float32)
        index.add(block / np.linalg.norm(block, axis=1, keepdims=True),
                  ids=[f"vector-{n}" for n in range(start, start + len(block))])
    index.save(index_path)
    return index_path


def measure(index_path: Path, search_batch: int, clients: list[int], requests: int,
            rerank: bool = False) -> tuple[list[dict], dict]:
    port = free_port()
    server = start_server(index_path, port, search_batch)
    try:
        url = f"http://127.0.0.1:{port}/"
        rows = [{"search_batch": search_batch, **asyncio.run(drive(url, n, requests, rerank))} for n in clients]
        return rows, httpx.get(url + "healthz").json()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--vectors", type=int, default=0, help="random unit vectors added beside the images")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--search-batch", type=int, nargs="+", default=[1, 256],
                        help="the server's max_search_batch values, served in turn")
    parser.add_argument("--rerank", action="store_true", help="re-ranked queries (the demo model's ITM head, 32 "
                        "candidates; images only, no --vectors)")
    parser.add_argument("--json", default="serve_load.json")
    args = parser.parse_args()
    if args.rerank and args.vectors:
        parser.error("--rerank re-ranks images: the random --vectors have none (leave one out)")

    rows, batches = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        index_path = build_index(Path(tmp), args.images, args.vectors)
        for search_batch in args.search_batch:
            measured, health = measure(index_path, search_batch, args.clients, args.requests, args.rerank)
            rows += measured
            batches[search_batch] = {
                "encoder": round(health["encoded_queries"] / max(1, health["encoder_calls"]), 2),
                "search": round(health["searched_queries"] / max(1, health["index_searches"]), 2)}
    structure = next(iter(health["indexes"].values()))["structure"]
    print(f"clipkit serve, {args.images} images + {args.vectors} vectors ({structure}), clipkit-demo on CPU "
          f"({os.cpu_count()} cores), POST /search text k=10{', re-ranked' if args.rerank else ''}")
    base = {row["clients"]: row["qps"] for row in rows if row["search_batch"] == args.search_batch[0]}
    print(f"| search batch | clients | requests | queries/s | x batch {args.search_batch[0]} | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["speedup"] = round(row["qps"] / base[row["clients"]], 2)
        print(f"| {row['search_batch']} | {row['clients']} | {row['requests']} | {row['qps']} | {row['speedup']} "
              f"| {row['p50_ms']} | {row['p99_ms']} |")
    for search_batch, mean in batches.items():
        print(f"search batch {search_batch}: mean queries per encoder call {mean['encoder']}, "
              f"per index search {mean['search']}")
    report = {"images": args.images, "vectors": args.vectors, "structure": structure, "model": "clipkit-demo",
              "rerank": args.rerank,
              "device": "cpu", "cpu_count": os.cpu_count(), "rows": rows, "mean_batch": batches}
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
