"""Python API quickstart, offline: make a folder of images, index it, search it by text and by image.

    python examples/quickstart.py [--out DIR] [--model NAME] [--pretrained TAG_OR_FILE]

With no --model it uses `clipkit-tiny`, a small untrained model that needs no download: the code path
is the real one, but its rankings mean nothing. Pass a trained model for meaningful results, e.g.
`--model ViT-B-32 --pretrained laion2b_s34b_b79k` on a machine that can reach the hub.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import clipkit

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")


def make_images(folder: Path) -> None:
    """12 small pictures: every colour with every shape."""
    folder.mkdir(parents=True, exist_ok=True)
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            image = Image.new("RGB", (96, 96), "white")
            draw = ImageDraw.Draw(image)
            if shape == "circle":
                draw.ellipse((20, 20, 76, 76), fill=rgb)
            elif shape == "square":
                draw.rectangle((20, 20, 76, 76), fill=rgb)
            else:
                draw.polygon([(48, 14), (82, 80), (14, 80)], fill=rgb)
            image.save(folder / f"{colour}_{shape}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write images and the index")
    parser.add_argument("--model", default="clipkit-tiny")
    parser.add_argument("--pretrained", default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="clipkit-quickstart-"))

    make_images(out / "photos")
    model = clipkit.load_model(args.model, pretrained=args.pretrained)
    print(f"model: {model}")

    index = clipkit.Index.from_folder(out / "photos", model=model)
    index.save(out / "photos.clipkit")
    print(f"indexed {len(index)} images into {out / 'photos.clipkit'}")

    index = clipkit.Index.load(out / "photos.clipkit")  # later: load, and search with the index's own model
    for query in ["a red circle", "a blue triangle"]:
        print(f"\ntext query: {query!r}")
        for hit in clipkit.search(query, index, k=3):
            print(f"  {hit.score:+.3f}  {Path(hit.path).name}")

    query_image = out / "photos" / "green_square.png"
    print(f"\nimage query: {query_image.name}")
    for hit in clipkit.search(query_image, index, k=3):
        print(f"  {hit.score:+.3f}  {Path(hit.path).name}")

    embeddings = clipkit.encode(["a red circle", "a blue square"], model=model)
    norms = np.linalg.norm(embeddings, axis=1).round(4)
    print(f"\nclipkit.encode -> {embeddings.shape} {embeddings.dtype}, row norms {norms}")


if __name__ == "__main__":
    main()
