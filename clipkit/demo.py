"""`clipkit demo`: offline, on the bundled demo model.

Writes a folder of synthetic test images (with their captions beside them), indexes it, runs text
queries (captions of images whose attribute-swapped twins are also in the folder, plus free text) and
one image query, prints the top hits, and draws a PNG grid of queries and results.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from clipkit.data.synthetic import write_synthetic
from clipkit.index import Index
from clipkit.models import load_model
from clipkit.search import Hit, search

FREE_TEXT = ["a large yellow star", "a red circle left of a blue square"]
THUMB = 96


@dataclass
class QueryResult:
    label: str
    query_image: Path | None
    expected: str | None  # the id of the image the query describes, when known
    hits: list[Hit]
    expected_rank: int | None = None


def default_out() -> Path:
    return Path(f"clipkit-demo-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")


def _pick_queries(photos: Path, count: int) -> list[tuple[str, Path]]:
    """Captions of images that have a distractor in the folder: the hard cases."""
    metas = [json.loads(p.read_text()) | {"_image": p.with_suffix(".png")} for p in sorted(photos.glob("*.json"))]
    groups: dict[int, list[dict]] = {}
    for meta in metas:
        groups.setdefault(meta["group_id"], []).append(meta)
    picked = []
    for members in groups.values():
        if len(members) > 1:
            distractor = next(m for m in members if m["kind"] != "original")
            picked.append((distractor["captions"][0], distractor["_image"]))
        if len(picked) == count:
            break
    return picked


def run_demo(out: Path | None = None, n_images: int = 300, model_name: str = "clipkit-demo", k: int = 5,
             seed: int = 0, progress: bool | None = None) -> tuple[Path, list[QueryResult]]:
    out = Path(out) if out is not None else default_out()
    photos = out / "photos"
    write_synthetic(photos, n_images, seed=seed, split="test", layout="folder", image_format="png", progress=progress)
    model = load_model(model_name)
    index = Index.from_folder(photos, model=model, progress=progress)
    index.save(out / "photos.clipkit")
    results = []
    for caption, image in _pick_queries(photos, 4):
        ranking = [hit.path for hit in search(caption, index, k=len(index))]
        expected = str(image.resolve())
        results.append(QueryResult(caption, None, expected, search(caption, index, k=k),
                                   expected_rank=ranking.index(expected) + 1))
    for text in FREE_TEXT:
        results.append(QueryResult(text, None, None, search(text, index, k=k)))
    query_image = sorted(photos.glob("*.png"))[7]
    results.append(QueryResult(f"image: {query_image.name}", query_image, str(query_image.resolve()),
                               search(query_image, index, k=k)))
    draw_grid(results, out / "results.png")
    return out, results


def _caption_of(path: str) -> str:
    try:
        return Path(path).with_suffix(".txt").read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


def draw_grid(results: list[QueryResult], path: Path) -> None:
    """One row per query: the query (text or image) on the left, its top hits with scores to the right."""
    font = ImageFont.load_default()
    label_width, pad = 260, 8
    columns = max(len(r.hits) for r in results)
    row_height = THUMB + 34
    grid = Image.new("RGB", (label_width + columns * (THUMB + pad) + pad, len(results) * row_height + pad), "white")
    draw = ImageDraw.Draw(grid)
    for row, result in enumerate(results):
        top = pad + row * row_height
        if result.query_image is not None:
            grid.paste(Image.open(result.query_image).convert("RGB").resize((THUMB, THUMB), Image.NEAREST), (pad, top))
            draw.text((pad + THUMB + 6, top), "image query", fill="black", font=font)
        else:
            label = "\n".join(textwrap.wrap(result.label, 40))
            if result.expected_rank is not None:
                label += f"\n(described image: rank {result.expected_rank})"
            draw.multiline_text((pad, top), label, fill="black", font=font)
        for column, hit in enumerate(result.hits):
            left = label_width + column * (THUMB + pad)
            thumb = Image.open(hit.path).convert("RGB").resize((THUMB, THUMB), Image.NEAREST)
            grid.paste(thumb, (left, top))
            if result.expected is not None and hit.path == result.expected:
                draw.rectangle((left - 3, top - 3, left + THUMB + 2, top + THUMB + 2), outline=(20, 170, 60), width=3)
            draw.text((left, top + THUMB + 4), f"{hit.score:.3f}", fill="black", font=font)
    grid.save(path)


def print_results(results: list[QueryResult]) -> None:
    for result in results:
        rank = f"  [described image ranked {result.expected_rank}]" if result.expected_rank else ""
        print(f"\nquery: {result.label}{rank}")
        for rank, hit in enumerate(result.hits, 1):
            mark = "  <- the image the query describes" if hit.path == result.expected else ""
            print(f"  {rank}. {hit.score:.3f}  {Path(hit.path).name}  ({_caption_of(hit.path)}){mark}")
