"""The GPU check: clipkit's CUDA paths measured against stock open_clip on one GPU, as a markdown table.

    python benchmarks/gpu_check.py [--device cuda] [--model ViT-B-32] [--quick] [--out gpu_check.md]

Rows (each side by side in this one process, so that the ratio holds on a shared machine):
- image encoding from PIL images: clipkit.encode (decoding threads, autocast bf16, pinned batches) against
  the loop an open_clip user writes (its transform on each image, stack, encode_image under the same
  autocast), images/s;
- the image tower alone on the same preprocessed tensors: clipkit's Model.encode_image against open_clip's
  encode_image (what clipkit adds around the model: should be ~1.0);
- text encoding, clipkit.encode against open_clip's tokenizer and encode_text, texts/s;
- training: `clipkit train` steps with AMP (ITC + ITM head) on synthetic shards, samples/s, and its loss
  finite at every step;
- search through the index the project builds (FAISS on the GPU when it sees one, else the CPU path the
  project takes when FAISS has no GPU: the wheels a GPU machine can be given are the CPU build's).
Weights are open_clip's fixed-seed initialisation (no network is needed: speed does not depend on them).
`benchmarks/gpu_check.sh` installs what a bare GPU machine lacks, runs the suite's CUDA tests and this.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import open_clip
import torch
import torch.nn.functional as F

import clipkit
from clipkit.data.synthetic import render, scenes
from clipkit.models import cuda_half_dtype


def synchronised(fn, device: torch.device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def side_by_side(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured interleaved after one warm-up call of each."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((ours, a), (theirs, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def encoder_rows(name: str, device: torch.device, n_images: int, repeats: int) -> list[dict]:
    model = clipkit.load_model(name, pretrained="scratch", device=device)
    stock = model.clip  # the same open_clip module: the baseline is open_clip's own calls on it
    dtype = cuda_half_dtype() if device.type == "cuda" else torch.bfloat16
    images = [render(spec, size=model.image_size) for spec in scenes(n_images, seed=0, split="test")]
    pixels = torch.stack([model.preprocess(image) for image in images])
    texts = [f"a {c} {s} left of a {c2} {s2}" for c, s, c2, s2 in
             zip(["red", "blue", "green", "yellow"] * (n_images // 4), ["circle", "square"] * (n_images // 2),
                 ["purple", "orange"] * (n_images // 2), ["triangle", "star", "cross", "heart"] * (n_images // 4))]
    batch = 256

    def stock_images(from_pil: bool):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                for s in range(0, len(images), batch):
                    chunk = (torch.stack([model.preprocess(image) for image in images[s:s + batch]]) if from_pil
                             else pixels[s:s + batch])
                    F.normalize(stock.encode_image(chunk.to(device, non_blocking=True)), dim=-1).float().cpu()
        return run

    def tower():
        for s in range(0, len(pixels), batch):
            model.encode_image(pixels[s:s + batch]).cpu()

    def stock_texts():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            for s in range(0, len(texts), batch):
                F.normalize(stock.encode_text(model.tokenize(texts[s:s + batch]).to(device)), dim=-1).float().cpu()

    rows = []
    for what, ours, theirs, count, unit, baseline in (
            ("image encoding from PIL images", lambda: clipkit.encode(images, model=model, batch_size=batch),
             stock_images(True), len(images), "images/s", "open_clip: its transform on each image, encode_image"),
            ("image tower on preprocessed tensors", tower, stock_images(False), len(images), "images/s",
             "open_clip's encode_image on the same tensors"),
            ("text encoding", lambda: clipkit.encode(texts, model=model, batch_size=batch), stock_texts,
             len(texts), "texts/s", "open_clip: its tokenizer, encode_text")):
        mine, base = side_by_side(synchronised(ours, device), synchronised(theirs, device), repeats)
        rows.append({"row": f"{what}, {name} ({str(dtype).removeprefix('torch.')} autocast)",
                     "clipkit": round(count / mine, 1), "baseline": round(count / base, 1),
                     "ratio": round(base / mine, 2), "unit": unit, "baseline_is": baseline})
    return rows


def training_row(device: torch.device, steps: int, out: Path, batch: int = 128) -> dict:
    from clipkit.train import TrainConfig, train

    config = TrainConfig(data=f"synthetic:{16 * batch}", out=str(out), model="clipkit-demo", pretrained="scratch",
                         val=None, steps=steps, batch_size=batch, lr=5e-4, warmup=5, precision="auto", itm=True,
                         workers=2, log_every=5, ckpt_every=steps, device=str(device))
    start = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:] or [steps * batch / seconds]
    if not losses or not all(np.isfinite(losses)):
        raise SystemExit(f"training losses not finite: {losses}")
    return {"row": f"training step, clipkit-demo, ITC + ITM, AMP, batch {batch} ({steps} steps)",
            "clipkit": round(statistics.median(rates), 1), "baseline": None, "ratio": None, "unit": "samples/s",
            "baseline_is": f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, all finite"}


def search_row(n: int, dim: int = 512, queries: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    index = clipkit.Index.from_embeddings(vectors)
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    q = vectors[:queries] + 0.1 * rng.standard_normal((queries, dim)).astype(np.float32)
    mine, base = side_by_side(lambda: index.search(q, 10), lambda: flat.search(q, 10), 3)
    where = "GPU" if faiss.get_num_gpus() else "CPU (FAISS sees no GPU)"
    return {"row": f"exact search, {n} x {dim}, k=10, on the {where}", "clipkit": round(queries / mine, 1),
            "baseline": round(queries / base, 1), "ratio": round(base / mine, 2), "unit": "queries/s",
            "baseline_is": "bare FAISS IndexFlatIP (CPU)"}


def actor_busy_rows(name: str, device: torch.device, n_images: int, out: Path, batch_size: int = 64,
                    halved: bool = False) -> list[dict]:
    """What one Ray actor of `clipkit index --engine ray` runs on its GPU (`embed_ray_batch` over JPEG
    files: decoding threads feeding the model), and how busy the GPU is meanwhile (nvidia-smi's utilization,
    sampled every 100 ms). Ray itself is not on the GPU machine (its wheel is too large to carry): it only
    schedules batches to this loop. An actor's decoding threads are the CPUs that go with its GPU
    (`RayEngine._pool`), here this machine's share; `halved`: also with half as many (is the default enough?)."""
    from clipkit.encode_ray import GPU_BATCHES, embed_ray_batch

    model = clipkit.load_model(name, pretrained="scratch", device=device)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, spec in enumerate(scenes(n_images, seed=1, split="test")):
        paths.append(out / f"{number}.jpg")
        render(spec, size=256).resize((320, 240)).save(paths[-1], quality=90)
    threads = max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count() if device.type == "cuda" else 1))
    ray_batch = batch_size * GPU_BATCHES  # (GPU_BATCHES model batches of `clipkit index`'s default --batch-size)
    rows = []
    for workers in dict.fromkeys([threads, max(1, threads // 2)] if halved else [threads]):
        def actor_loop(files) -> int:
            return sum(int((embed_ray_batch(files[at:at + ray_batch], model, batch_size, workers)["reason"] == ""
                            ).sum()) for at in range(0, len(files), ray_batch))

        actor_loop(paths[:ray_batch])  # warm-up
        with gpu_busy(device) as samples:
            start = time.perf_counter()
            count = actor_loop(paths)
            seconds = time.perf_counter() - start
        busy = statistics.mean(samples) if samples else float("nan")
        rows.append({"row": f"one Ray actor's loop: {count} JPEGs 320x240 decoded and embedded, {name}, "
                            f"{workers} decoding threads, Ray batches of {ray_batch}, model batches of {batch_size}, "
                            f"{count / seconds:.0f} images/s", "clipkit": round(busy, 1), "baseline": 80,
                     "ratio": round(busy / 80, 2), "unit": "% GPU busy (nvidia-smi)", "baseline_is": "issue 30's goal"})
    return rows


@contextlib.contextmanager
def gpu_busy(device: torch.device):
    """nvidia-smi's GPU utilization (%), sampled every 100 ms while the block runs (on a GPU only)."""
    samples: list[int] = []
    if device.type != "cuda":
        yield samples
        return
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                            "-lms", "100", "-i", str(device.index or 0)], stdout=subprocess.PIPE, text=True)
    reader = threading.Thread(target=lambda: samples.extend(int(line) for line in smi.stdout
                                                             if line.strip().isdigit()), daemon=True)
    reader.start()
    try:
        yield samples
    finally:
        smi.terminate()
        reader.join(timeout=5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu (a dry run of the script)")
    parser.add_argument("--model", default="ViT-B-32", help="the encoder measured (open_clip architecture)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run)")
    parser.add_argument("--out", default="gpu_check.md", help="the markdown table (and .json beside it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --device cpu for a dry run")
    quick = args.quick
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = [f"GPU check on {name} (torch {torch.__version__}, open_clip {open_clip.__version__}, "
              f"faiss {faiss.__version__}, {faiss.get_num_gpus()} GPU(s) seen by FAISS)", "",
              "| row | clipkit | baseline | ratio | unit | baseline is |", "|---|---|---|---|---|---|"]
    steps = [("encoders", lambda tmp: encoder_rows(args.model, device, 64 if quick else 2048, 2 if quick else 5)),
             ("training", lambda tmp: [training_row(device, 4 if quick else 60, tmp / "run", 32 if quick else 128)]),
             ("search", lambda tmp: [search_row(2000 if quick else 200_000)]),
             ("actor loop", lambda tmp: actor_busy_rows(args.model, device, 128 if quick else 4096, tmp,
                                                        halved=not quick))]
    rows: list[dict] = []
    for what, step in steps:  # (a row that fails is written as such, and the others still run: one lease may
        try:                  # be all there is; the table is rewritten after each step, should time run out)
            with tempfile.TemporaryDirectory() as tmp:
                rows += step(Path(tmp))
        except Exception as exc:  # noqa: BLE001
            rows.append({"row": f"{what}: FAILED {type(exc).__name__}: {str(exc)[:300]}", "clipkit": None,
                         "baseline": None, "ratio": None, "unit": "", "baseline_is": ""})
        _write(args.out, header, rows, name)
    print(Path(args.out).read_text())
    return 1 if any("FAILED" in row["row"] for row in rows) else 0


def _write(out: str, header: list[str], rows: list[dict], name: str) -> None:
    lines = header + [f"| {r['row']} | {r['clipkit']} | {r['baseline']} | {r['ratio']} | {r['unit']} | "
                      f"{r['baseline_is']} |" for r in rows]
    Path(out).write_text("\n".join(lines) + "\n")
    Path(out).with_suffix(".json").write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
