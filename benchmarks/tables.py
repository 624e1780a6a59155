"""Caption tables, lists of files and folders at growing sizes: the memory the index's listing stages need.

    python benchmarks/tables.py [--sizes 100000 1000000] [--work DIR] [--json tables.json]

Per size N, a folder of N (empty) image files, a caption table (CSV: image, caption) and a list (.txt) of
them, and an index of the N files with one stored caption each (random vectors: nothing is embedded). Each
stage runs in a fresh process, after the imports a run of `clipkit index` has made (torch included), and
reports its seconds and the memory it added to the process's high-water mark (VmHWM after minus before):
- `read + check`: `CaptionTable.read` and `listed_files`, what `clipkit index TABLE` does before it touches
  the index (the table is read into an on-disk `TableRows`);
- `list read`: the same for the .txt list of files;
- `caption sync`: `sync_index_captions` of the N images against the table, nothing changed (what every later
  run of `clipkit index TABLE` does);
- `folder plan, first run` and `folder plan, re-run`: `plan_folder` of the folder against an empty index (N
  new files) and against the index (N unchanged): what `clipkit index FOLDER` lists before it embeds anything;
- `folder moved`: `Index.sync_folder` of the folder renamed (with the demo model: 128-d), its caption table
  inside it: N files re-pointed without embedding, their N captions carried, the table found where it went;
- `folder removed`: `Index.remove_folder` of the folder (what `clipkit remove FOLDER` does): N items and their
  N captions removed.
A stage whose memory grows with N holds the table (or the listing) in memory; the column "MB per 1M rows"
makes that plain.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("read + check", "list read", "caption sync", "folder plan, first run", "folder plan, re-run", "folder moved",
          "folder removed")  # (the last: it empties the index)
DIM = 128  # (the demo model's, for the moved folder's sync)


def image_path(folder: Path, i: int) -> str:
    return f"{folder}/sub{i % 100}/img_{i:08d}.jpg"


def make(work: Path, n: int) -> None:
    """The table, the list, the image files (a few distinct bytes each: a moved file is known by its content)
    and the index (with its caption collection, and the table remembered for the folder) of `n` images under
    work/photos."""
    from clipkit.index import CaptionTable, Index
    from clipkit.index.sync import bytes_hash

    folder = (work / "photos").resolve()
    for sub in range(min(n, 100)):
        (folder / f"sub{sub}").mkdir(parents=True, exist_ok=True)
    for i in range(n):  # what is measured is the table's path, not images
        Path(image_path(folder, i)).write_bytes(b"%d" % i)
    with open(folder / "captions.csv", "w") as table, open(folder / "list.txt", "w") as listing:
        table.write("image,caption\n")
        for i in range(n):
            table.write(f"sub{i % 100}/img_{i:08d}.jpg,a photo number {i} of a red cat sitting on a mat\n")
            listing.write(f"sub{i % 100}/img_{i:08d}.jpg\n")
    images, captions, rng = Index(DIM), Index(DIM, vectors_per_item=1), np.random.default_rng(0)
    for start in range(0, n, 50_000):
        ids = [image_path(folder, i) for i in range(start, min(start + 50_000, n))]
        images.add(rng.standard_normal((len(ids), DIM)).astype(np.float32), ids=ids, metadata=[
            {"path": i, "size": os.stat(i).st_size, "mtime": os.stat(i).st_mtime,
             "content_hash": bytes_hash(b"%d" % (start + k))} for k, i in enumerate(ids)])
        captions.add(rng.standard_normal((len(ids), DIM)).astype(np.float32), ids=[f"{i}#0" for i in ids],
                     metadata=[{"caption": f"a photo number {start + k} of a red cat sitting on a mat", "image_id": i,
                                "path": i} for k, i in enumerate(ids)])
    images.save(work / "index")
    captions.save(work / "index" / "captions")
    store = Index.load(work / "index").store
    with store.transaction():  # (what indexing the folder with its table records: the folder, the table)
        store.adopt(store.add_root(str(folder)), str(folder), str(folder))
        store.set_info("caption_tables", {str(folder): CaptionTable.of(folder / "captions.csv").to_json()})


def high_water_mb() -> float:
    text = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("VmHWM")) / 1024


def stage(name: str, work: Path) -> dict:
    """One stage, in this process: its seconds and the MB it added to the high-water mark."""
    from clipkit.index import CaptionTable, Index
    from clipkit.index.captions import sync_index_captions

    folder = work / "photos"
    loaded = name in ("caption sync", "folder plan, re-run", "folder moved", "folder removed")
    index = Index.load(work / "index") if loaded else Index(DIM)
    if name == "folder moved":
        return moved(index, folder)
    if name == "folder removed":
        return removed(index)
    before, start = high_water_mb(), time.perf_counter()
    if name.startswith("folder plan"):
        plan = index.plan_folder(folder)
        counts = (len(plan.new) > 0, plan.unchanged > 0, len(plan.changed))  # all new, or all unchanged
        assert counts == ((True, False, 0) if name.endswith("first run") else (False, True, 0)), counts
        return {"seconds": time.perf_counter() - start, "added_mb": high_water_mb() - before}
    table = CaptionTable.of(folder / ("list.txt" if name == "list read" else "captions.csv"))
    with table.read() as rows:
        if name == "caption sync":
            report = sync_index_captions(index, f"{folder}/", None, rows)
            assert report.added == report.removed == 0, report
        else:
            table.listed_files(rows)
    return {"seconds": time.perf_counter() - start, "added_mb": high_water_mb() - before}


def moved(index, folder: Path) -> dict:
    """The `folder moved` stage: the folder renamed, synced (nothing embedded), renamed back."""
    import clipkit

    model = clipkit.load_model("clipkit-demo", device="cpu")
    renamed = folder.with_name(f"moved-{os.getpid()}")  # (a name no earlier run left its items under)
    folder.rename(renamed)
    try:
        before, start = high_water_mb(), time.perf_counter()
        report = index.sync_folder(renamed, model, progress=False)
        seconds = time.perf_counter() - start
        assert report.moved == len(index) and report.embedded == 0, report
        assert report.captions.moved == len(index.captions) and report.captions.added == 0, report.captions
        return {"seconds": seconds, "added_mb": high_water_mb() - before}
    finally:
        renamed.rename(folder)


def removed(index) -> dict:
    """The `folder removed` stage: every item and caption removed (from the folder's place in the index: the
    `folder moved` stage leaves it at the name it moved to)."""
    count, (root,) = len(index), [r["path"] for r in index.roots()]
    before, start = high_water_mb(), time.perf_counter()
    assert index.remove_folder(root, progress=False) == count
    seconds = time.perf_counter() - start
    assert len(index) == 0 and len(index.captions) == 0
    return {"seconds": seconds, "added_mb": high_water_mb() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=None, help="where the tables and indexes go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=Path("tables.json"))
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # (one stage, in a child process)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.work)))
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        for n in args.sizes:
            work = Path(scratch) / str(n)
            make(work, n)
            for name in STAGES:
                done = subprocess.run([sys.executable, __file__, "--stage", name, "--work", str(work)], check=True,
                                      capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"rows": n, "stage": name, **result, "mb_per_million": result["added_mb"] * 1e6 / n})
    print("| rows | stage | seconds | MB added | MB per 1M rows |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['rows']:,} | {row['stage']} | {row['seconds']:.1f} | {row['added_mb']:.0f} | "
              f"{row['mb_per_million']:.0f} |")
    args.json.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
