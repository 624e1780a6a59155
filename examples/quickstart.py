"""Python API quickstart, offline: make a folder of images, index it, search it by text and by image.

    python examples/quickstart.py [--out DIR] [--model NAME] [--pretrained TAG_OR_FILE]

By default it uses the bundled `clipkit-demo` model, which knows the synthetic data set's words
(colours, shapes, sizes, left/right/above/below). With a real model, e.g. `--model ViT-B-32
--pretrained laion2b_s34b_b79k` on a machine that can reach the hub, point it at your own photos.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import clipkit
from clipkit.data import write_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write images and the index")
    parser.add_argument("--model", default="clipkit-demo")
    parser.add_argument("--pretrained", default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="clipkit-quickstart-"))

    write_synthetic(out / "photos", 200, split="test", layout="folder", image_format="png")  # images + captions
    model = clipkit.load_model(args.model, pretrained=args.pretrained)
    print(f"model: {model}")

    index = clipkit.Index.from_folder(out / "photos", model=model)
    index.save(out / "photos.clipkit")
    print(f"indexed {len(index)} images into {out / 'photos.clipkit'}")

    index = clipkit.Index.load(out / "photos.clipkit")  # later: load it, and search with the index's own model
    queries = ["a large red circle", "a blue square left of a yellow star"]
    for query, hits in zip(queries, clipkit.search_batch(queries, index, k=3)):  # (one query: clipkit.search)
        print(f"\ntext query: {query!r}")
        for hit in hits:
            caption = Path(hit.path).with_suffix(".txt").read_text().splitlines()[0]
            print(f"  {hit.score:+.3f}  {Path(hit.path).name}  ({caption})")

    query_image = sorted((out / "photos").glob("*.png"))[0]
    print(f"\nimage query: {query_image.name}")
    for hit in clipkit.search(query_image, index, k=3):
        print(f"  {hit.score:+.3f}  {Path(hit.path).name}")

    embeddings = clipkit.encode(["a red circle", "a blue square"], model=model)
    norms = np.linalg.norm(embeddings, axis=1).round(4)
    print(f"\nclipkit.encode -> {embeddings.shape} {embeddings.dtype}, row norms {norms}")


if __name__ == "__main__":
    main()
