"""Load test of `clipkit serve`: queries/s and latency percentiles at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_load.py [--images 300] [--requests 400] [--clients 1 8 32] [--json OUT]

Builds a folder of synthetic images, indexes it with the demo model, starts `clipkit serve` as a
separate process on a free loopback port, and drives POST /search (text queries, k=10) from N
concurrent HTTP clients. Prints a markdown table and writes JSON (default serve_load.json).
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


def start_server(index_path: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "clipkit", "-q", "serve", "--index", str(index_path),
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


async def drive(url: str, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient):
        for n in counter:
            start = time.perf_counter()
            response = await http.post(url + "search", json={"text": WORDS[n % len(WORDS)], "k": 10})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", default="serve_load.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        photos, index_path = Path(tmp) / "photos", Path(tmp) / "photos.clipkit"
        write_synthetic(photos, args.images, seed=1, layout="folder", progress=False)
        model = load_model("clipkit-demo", device="cpu")
        Index.from_folder(photos, model).save(index_path)
        port = free_port()
        server = start_server(index_path, port)
        try:
            url = f"http://127.0.0.1:{port}/"
            rows = [asyncio.run(drive(url, clients, args.requests)) for clients in args.clients]
            health = httpx.get(url + "healthz").json()
        finally:
            server.terminate()
            server.wait(timeout=30)
    batch = health["encoded_queries"] / max(1, health["encoder_calls"])
    print(f"clipkit serve, {args.images} images, clipkit-demo on CPU ({os.cpu_count()} cores), POST /search text k=10")
    print("| clients | requests | queries/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['requests']} | {row['qps']} | {row['p50_ms']} | {row['p99_ms']} |")
    print(f"mean queries per encoder call over the whole run: {batch:.2f}")
    report = {"images": args.images, "model": "clipkit-demo", "device": "cpu", "cpu_count": os.cpu_count(),
              "rows": rows, "mean_batch": round(batch, 2)}
    Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
