"""A living index, offline: one writer keeps a folder's index up to date while a reader (a server, a notebook)
searches it, without reloading and without ever seeing a removed image.

    python examples/living_index.py [--out DIR]

The writer is `clipkit index FOLDER` (or `Index.sync_folder`), run again whenever the folder changes: only new
and changed files are embedded, renamed or moved ones are re-pointed, deleted ones removed, each batch
committed on its own. The reader is any `Index.load` of the same folder: `clipkit.search` (and `clipkit serve`)
see every commit on their next query. Here both run in one process, one after the other, to show the steps.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import clipkit
from clipkit.data import write_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write images and the index")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="clipkit-living-"))
    photos, index_path = out / "photos", out / "photos.clipkit"

    write_synthetic(out / "first", 60, seed=1, split="test", layout="folder", image_format="png", progress=False)
    shutil.copytree(out / "first", photos)
    model = clipkit.load_model("clipkit-demo")
    writer = clipkit.Index.from_folder(photos, model=model, progress=False)
    writer.save(index_path)
    reader = clipkit.Index.load(index_path)  # e.g. in a server process
    print(f"reader sees {len(reader)} images")

    write_synthetic(out / "more", 40, seed=2, split="test", layout="folder", image_format="png", progress=False)
    for file in (out / "more").iterdir():  # new photos arrive
        shutil.copy(file, photos / f"new-{file.name}")
    best = clipkit.search("a large red circle", reader, k=1)[0]
    for file in photos.glob(Path(best.path).stem + ".*"):  # and the best match for a query is deleted
        file.unlink()
    (photos / "renamed").mkdir()
    moved = sorted(photos.glob("test-*.png"))[0]
    moved.rename(photos / "renamed" / moved.name)  # and one is moved

    report = writer.sync_folder(photos, progress=False)  # = `clipkit index photos --index photos.clipkit`
    print(f"writer: {report.embedded} embedded, {report.moved} moved (not embedded again), {report.removed} "
          f"removed")
    hits = clipkit.search("a large red circle", reader, k=5)  # the reader follows, no reload
    print(f"reader sees {len(reader)} images; the deleted one among the hits: "
          f"{any(hit.path == best.path for hit in hits)}")
    print(f"the moved image is found at {clipkit.search(photos / 'renamed' / moved.name, reader, k=1)[0].path}")


if __name__ == "__main__":
    main()
