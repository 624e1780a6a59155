"""Scale benchmark: an index of embedding-like vectors at growing sizes, through the public CLI and API.

    python benchmarks/scale.py [--sizes 1000000 3000000 10000000] [--model ViT-B-32 --dim 512] [--work DIR]
        [--json scale.json] [--data power-law|zipf-topics]

`--data zipf-topics` is a collection of another kind (lopsided topic sizes, near-duplicates, another
spectrum and gap: benchmarks/ann.py), to check that the build and the tuner adapt to the data they get.

Per size N (each step in a fresh process, so memory and open times are a user's):
- the vectors (a power-law spectrum like CLIP embeddings', benchmarks/ann.py) are written in clip-retrieval's
  layout, 100,000 rows a part, float16, and indexed with `clipkit index EMB_DIR --index-type auto
  --tune-queries` (2,000 other queries across the gap, as a user gives queries like theirs): build seconds,
  peak RSS and peak anonymous memory (RSS also counts the pages of memory-mapped vector files it read);
- bytes per vector on disk (the whole index folder);
- in a fresh process: the seconds to import clipkit (torch and the model libraries: paid once by any
  program using clipkit), to open the index and to answer the first query, its peak RSS (memory-mapped pages read count
  there too) and its anonymous memory after 1,200 queries, and p50 / p99 of one query;
- recall@10 against exact search (chunked brute force over the parts) on 1,000 queries across a modality
  gap (shifted away from the data, as text queries sit beside image embeddings);
- 10,000 added and 10,000 removed by a writer while a reader process has the index open: the writer's
  commit seconds, the seconds until the reader finds the new items and loses the removed ones, and the
  writer's save seconds, and the seconds a compaction (dropping the removed rows) takes;
- `clipkit serve`'s resident memory on the index.
Prints a markdown table and writes JSON. The issue "An index past memory" sets the goals it checks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import GENERATORS  # noqa: E402

PART = 100_000


def write_parts(folder: Path, n: int, dim: int, generate) -> None:
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, n, PART)):
        rows = min(PART, n - start)
        np.save(folder / "img_emb" / f"img_emb_{number}.npy", generate(rows, dim, seed=number).astype(np.float16))


def exact_top10(folder: Path, queries: np.ndarray) -> np.ndarray:
    """Global row numbers of each query's exact top 10, by chunked brute force over the parts."""
    best_scores = np.full((len(queries), 10), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 10), np.int64)
    start = 0
    for path in sorted((folder / "img_emb").glob("*.npy"), key=lambda p: int(p.stem.rpartition("_")[2])):
        part = np.load(path, mmap_mode="r")
        vectors = np.asarray(part, dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = queries @ vectors.T
        rows = np.argpartition(-scores, 10, axis=1)[:, :10]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, rows, 1)], axis=1)
        merged_rows = np.concatenate([best_rows, rows + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1)[:, :10]
        best_scores, best_rows = np.take_along_axis(merged_scores, keep, 1), np.take_along_axis(merged_rows, keep, 1)
        start += len(part)
    return best_rows


def measured(argv: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in GiB, stdout) of a command in a process of its own; its peak anonymous memory
    (sampled every 0.2 s: RSS also counts the memory-mapped vector pages it read) in `measured.anon_gib`.
    The peak RSS is the process's own high-water mark (VmHWM, sampled): the kernel's ru_maxrss for a child
    also counts this benchmark's own RSS at the fork, which is larger than the child's after a big size."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0, 0.0]
    sampler = threading.Thread(target=_sample_anon, args=(process.pid, peak), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    measured.anon_gib = peak[0]
    out, err = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {err[-2000:]}")
    return seconds, peak[1] or usage.ru_maxrss / 2**20, out


def _sample_anon(pid: int, peak: list) -> None:
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        anon = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("RssAnon")), None)
        if anon is None:  # a zombie: it has ended
            return
        high = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM")), 0)
        peak[0], peak[1] = max(peak[0], anon / 2**20), max(peak[1], high / 2**20)
        time.sleep(0.2)


OPEN_AND_QUERY = """
import json, sys, time
import numpy as np
begin = time.perf_counter()
from clipkit.index import Index
start = time.perf_counter()
index = Index.load(sys.argv[1])
opened = time.perf_counter()
queries = np.load(sys.argv[2])
scores, ids = index.search(queries[:1], 10)
first = time.perf_counter()
one = []
for q in queries[:200]:
    t = time.perf_counter(); index.search(q[None], 10); one.append(time.perf_counter() - t)
_, ids = index.search(queries, 10)
np.save(sys.argv[3], np.asarray([[-1 if i is None else i for i in row] for row in ids], np.int64))
anon = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")) / 2**20
print(json.dumps({"import_s": start - begin, "open_s": opened - start, "first_query_s": first - opened,
                  "anon_gib": anon,
                  "p50_ms": 1000 * float(np.percentile(one, 50)), "p99_ms": 1000 * float(np.percentile(one, 99)),
                  "structure": index.structure}))
"""

READER = """
import sys, time
import numpy as np
from clipkit.index import Index
index = Index.load(sys.argv[1]); index.refresh_interval = 0
new, gone = np.load(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
start = time.perf_counter()
deadline = start + 600
while time.perf_counter() < deadline:
    _, ids = index.search(new[:1], 1)
    if ids[0][0] == int(sys.argv[4]) and gone not in index:
        break
    time.sleep(0.01)
print(time.perf_counter() - start, flush=True)
"""


def living(ix: Path, n: int, dim: int, generate) -> dict:
    """10k (a tenth, for small n) added and as many removed while a reader has the index open."""
    from clipkit.index import Index

    count = min(10_000, n // 10)
    new = generate(count, dim, seed=10**6).astype(np.float32)
    np.save(ix.parent / "new.npy", new)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(ix), str(ix.parent / "new.npy"), "0", str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        index = Index.load(ix)
        reader.stdin.write("go\n")
        reader.stdin.flush()
        start = time.perf_counter()
        index.add(new, ids=list(range(n, n + count)))
        index.remove(list(range(count)))
        committed = time.perf_counter() - start
        searchable = float(reader.stdout.readline())
    finally:
        reader.kill()
        reader.wait()
    start = time.perf_counter()
    index.save()
    saved = time.perf_counter() - start
    start = time.perf_counter()
    index.compact()
    return {"added_and_removed": count, "add_remove_commit_s": committed, "searchable_after_s": searchable,
            "save_s": saved, "compact_s": time.perf_counter() - start}


def serve_rss(ix: Path) -> float:
    import urllib.request

    port = 8765
    process = subprocess.Popen([sys.executable, "-m", "clipkit", "-q", "serve", "--index", str(ix), "--port",
                                str(port), "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                if process.poll() is not None:
                    raise SystemExit(f"clipkit serve --index {ix} exited with code {process.returncode}") from None
                time.sleep(0.5)
        status = Path(f"/proc/{process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 2**20
    finally:
        process.terminate()
        process.wait()


def one_size(n: int, dim: int, work: Path, model: str, data: str = "power-law") -> dict:
    suffix = "" if data == "power-law" else f"-{data}"
    emb, ix, generate = work / f"emb-{n}{suffix}", work / f"ix-{n}{suffix}", GENERATORS[data]
    shutil.rmtree(ix, ignore_errors=True)
    if not (emb / "img_emb").is_dir():
        write_parts(emb, n, dim, generate)
    queries = generate(1000, dim, seed=10**7, shift=1.0)  # across a modality gap
    np.save(work / "queries.npy", queries)
    np.save(work / "tune.npy", generate(2000, dim, seed=10**8, shift=1.0))  # other queries of that kind
    build_s, build_gib, _ = measured([sys.executable, "-m", "clipkit", "-q", "index", str(emb), "--index", str(ix),
                                      "--index-type", "auto", "--model", model, "--tune-queries",
                                      str(work / "tune.npy")])
    build_anon = measured.anon_gib  # (of the build's process: read before the next measurement)
    disk = sum(f.stat().st_size for f in ix.rglob("*") if f.is_file())
    _, open_gib, out = measured([sys.executable, "-c", OPEN_AND_QUERY, str(ix), str(work / "queries.npy"),
                                 str(work / "found.npy")])
    row = {"n": n, "dim": dim, "data": data, "build_s": build_s, "build_peak_gib": build_gib, "build_anon_gib": build_anon,
           "bytes_per_vector": disk / n,
           "open_peak_gib": open_gib, **json.loads(out)}
    exact, found = exact_top10(emb, queries), np.load(work / "found.npy")
    row["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)]))
    row.update(living(ix, n, dim, generate))
    row["serve_peak_gib"] = serve_rss(ix)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--model", default="ViT-B-32",
                        help="the model recorded for the vectors (its dimension is --dim; ViT-B-32 without weights "
                             "is open_clip's fixed-seed initialisation, offline), which clipkit serve loads")
    parser.add_argument("--dim", type=int, default=512, help="the vectors' dimension: the model's")
    parser.add_argument("--work", default="scale-work", help="where the vectors and indexes are written")
    parser.add_argument("--json", default="scale.json")
    parser.add_argument("--data", choices=sorted(GENERATORS), default="power-law",
                        help="the kind of collection: power-law (CLIP-like spectrum) or zipf-topics (lopsided topic "
                             "sizes, near-duplicates: a collection the defaults were not tuned on)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:  # each size's row is written as soon as it is measured
        rows.append(one_size(n, args.dim, work, args.model, args.data))
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    columns = ["n", "data", "structure", "build_s", "build_peak_gib", "build_anon_gib", "bytes_per_vector", "import_s",
               "open_s", "first_query_s", "open_peak_gib", "anon_gib", "p50_ms", "p99_ms", "recall_at_10",
               "add_remove_commit_s",
               "searchable_after_s", "save_s", "compact_s", "serve_peak_gib"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
