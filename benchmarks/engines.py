"""`clipkit index --engine ray` beside the one-process path, on the same folder of images, in one run.

    python benchmarks/engines.py [--images 2000] [--size 256x192] [--model clipkit-demo] [--repeats 5]
                                [--json engines.json] [--quick]

Writes a folder of JPEG photos-like images (noise over gradients, 256 x 192 or --size), then indexes it into a fresh
index with `clipkit index` (this process embeds) and with `clipkit index --engine ray` (a local Ray started
for the run, one model actor per CPU), each in a fresh process as a user runs it, interleaved (local, ray,
local, ray, ...), and the same two on a one-image folder: what a run costs apart from its images (importing,
loading the model, starting Ray and its actors, stopping them). Reports wall seconds, images/s, Ray's fixed
cost over the local path's, and Ray's images/s once started ((images - 1) / (wall - one-image wall)) as a
ratio of the local path's. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, n: int, size: tuple[int, int] = (256, 192)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    ramp = np.linspace(0, 255, width)[None, :, None]
    for number in range(n):
        pixels = ramp * rng.random(3) + rng.normal(0, 40, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{number:05d}.jpg", quality=90)


def index_seconds(folder: Path, model: str, engine: str, work: Path) -> float:
    target = work / f"ix-{engine}"
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clipkit", "-q", "index", str(folder), "--index", str(target),
                    "--model", model, "--engine", engine], check=True)
    return time.perf_counter() - start


def measure(images: int, model: str, repeats: int, work: Path, quick: bool = False,
            shape: tuple[int, int] = (256, 192)) -> dict:
    many, one = work / f"many-{shape[0]}x{shape[1]}", work / f"one-{shape[0]}x{shape[1]}"
    if not many.is_dir():
        write_images(many, images, shape)
    if not one.is_dir():
        write_images(one, 1, shape)
    sizes = (("many", many),) if quick else (("many", many), ("one", one))
    runs = {(engine, size): [] for engine in ("local", "ray") for size, _ in sizes}
    for _ in range(repeats):
        for size, folder in sizes:
            for engine in ("local", "ray"):
                runs[engine, size].append(index_seconds(folder, model, engine, work))
    if quick:  # no one-image runs: the fixed costs are taken as zero
        runs.update({(engine, "one"): [0.0] for engine in ("local", "ray")})
    median = {key: statistics.median(values) for key, values in runs.items()}
    rate = {engine: (images - 1) / max(1e-9, median[engine, "many"] - median[engine, "one"])
            for engine in ("local", "ray")}
    return {"images": images, "size": f"{shape[0]}x{shape[1]}", "model": model, "cpus": os.cpu_count(),
            "repeats": repeats, "local_s": median["local", "many"], "ray_s": median["ray", "many"],
            "local_images_per_s": images / median["local", "many"], "ray_images_per_s": images / median["ray", "many"],
            "local_fixed_s": median["local", "one"], "ray_fixed_s": median["ray", "one"],
            "ray_startup_over_local_s": median["ray", "one"] - median["local", "one"],
            "local_images_per_s_after_start": rate["local"], "ray_images_per_s_after_start": rate["ray"],
            "ray_over_local_after_start": rate["ray"] / rate["local"], "runs": {f"{e}/{s}": v for (e, s), v in
                                                                              runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="clipkit-demo")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, interleaved (medians; the machine's "
                        "noise moves a difference of two wall times by a second)")
    parser.add_argument("--work", default=None, help="where the images and indexes go (default: a temporary folder)")
    parser.add_argument("--json", default="engines.json")
    parser.add_argument("--quick", action="store_true", help="no one-image runs (fixed costs not measured)")
    parser.add_argument("--size", default="256x192", help="the images' WIDTHxHEIGHT (photos: e.g. 1600x1200)")
    args = parser.parse_args()
    size = tuple(int(side) for side in args.size.lower().split("x"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="clipkit-engines-"))
    try:
        row = measure(args.images, args.model, args.repeats, work, args.quick, size)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    columns = ["images", "size", "cpus", "local_s", "ray_s", "local_images_per_s", "ray_images_per_s",
               "ray_startup_over_local_s", "local_images_per_s_after_start", "ray_images_per_s_after_start",
               "ray_over_local_after_start"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
