"""`clipkit demo`: offline, on the bundled demo model.

Writes a folder of synthetic test images (with their captions beside them), indexes it, runs text
queries (captions of images whose attribute-swapped twins are also in the folder, plus free text) and
one image query, prints the top hits, and draws a PNG grid of queries and results. When the model has an
ITM head, each text query is answered twice, side by side: by ITC (cosine) alone and re-ranked by the head,
so the grid shows what re-ranking changes.
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
from clipkit.models import load_model, warn_untrained
from clipkit.search import Hit, search

FREE_TEXT = ["a large yellow star", "a red circle left of a blue square"]
THUMB = 96
PAD = 8  # between thumbnails, and around the grid
RERANK_K = 32  # ITC candidates the ITM head re-orders


@dataclass
class QueryResult:
    label: str
    query_image: Path | None
    expected: str | None  # the id of the image the query describes, when known
    hits: list[Hit]  # by ITC (cosine)
    expected_rank: int | None = None
    reranked: list[Hit] | None = None  # ITC's candidates re-ordered by the ITM head
    reranked_rank: int | None = None


def default_out() -> Path:
    return Path(f"clipkit-demo-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")


DEMO_FILES = {"photos", "photos.clipkit", "results.png"}


def _check_out(out: Path) -> None:
    """`out`: a new folder, an empty one, or an earlier demo's (written again); never a folder of other things,
    whose `photos/` the demo would write into and index."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a new folder for the demo")
    others = sorted(p.name for p in out.iterdir() if p.name not in DEMO_FILES) if out.is_dir() else []
    if others:
        raise ValueError(f"--out {out} already holds other things ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}): give a new or empty folder for the demo")


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
    _check_out(out)
    photos = out / "photos"
    write_synthetic(photos, n_images, seed=seed, split="test", layout="folder", image_format="png", progress=progress)
    model = load_model(model_name)
    warn_untrained(model)
    index = Index.from_folder(photos, model=model, progress=progress)
    index.save(out / "photos.clipkit")
    rerank = model.itm is not None
    results = [_text_query(caption, index, k, str(image.resolve()), rerank)
               for caption, image in _pick_queries(photos, 4)]
    results += [_text_query(text, index, k, None, rerank) for text in FREE_TEXT]
    images = sorted(photos.glob("*.png"))
    query_image = images[min(7, len(images) - 1)]
    results.append(QueryResult(f"image: {query_image.name}", query_image, str(query_image.resolve()),
                               search(query_image, index, k=k)))
    draw_grid(results, out / "results.png")
    return out, results


def _text_query(text: str, index: Index, k: int, expected: str | None, rerank: bool) -> QueryResult:
    """A text query's ITC top k and, with `rerank`, its re-ranked top k (with the described image's ranks)."""
    depth = len(index) if expected is not None else k
    ranking = search(text, index, k=depth)
    result = QueryResult(text, None, expected, ranking[:k], expected_rank=_rank_of(expected, ranking))
    if rerank:
        full = search(text, index, k=RERANK_K, rerank=True, rerank_k=RERANK_K)
        result.reranked = full[:k]
        if expected is not None:  # beyond the re-ranked candidates, ITC's order stands
            result.reranked_rank = _rank_of(expected, full) or result.expected_rank
    return result


def _rank_of(expected: str | None, hits: list[Hit]) -> int | None:
    ranking = [hit.path for hit in hits]
    return ranking.index(expected) + 1 if expected in ranking else None


def _ranks(result: QueryResult) -> str:
    """'rank 3, re-ranked 1' for the image a query describes ('' when none is)."""
    if result.expected_rank is None:
        return ""
    reranked = f", re-ranked {result.reranked_rank}" if result.reranked_rank is not None else ""
    return f"rank {result.expected_rank}{reranked}"


def _caption_of(path: str) -> str:
    try:
        return Path(path).with_suffix(".txt").read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


def draw_grid(results: list[QueryResult], path: Path) -> None:
    """One row per query: the query (text or image) on the left, its top hits with scores to the right; for
    re-ranked text queries, ITC's top hits and then the re-ranked ones, under two headings."""
    font = ImageFont.load_default()
    label_width, gap, head = 260, 24, 16
    columns = max(len(r.hits) for r in results)
    two = any(r.reranked is not None for r in results)
    block = columns * (THUMB + PAD)
    row_height = THUMB + 34
    width = label_width + block * (2 if two else 1) + (gap if two else 0) + PAD
    grid = Image.new("RGB", (width, head + len(results) * row_height + PAD), "white")
    draw = ImageDraw.Draw(grid)
    if two:
        draw.text((label_width, 2), "by ITC (cosine)", fill="black", font=font)
        draw.text((label_width + block + gap, 2), "re-ranked by the ITM head", fill="black", font=font)
    for row, result in enumerate(results):
        top = head + PAD + row * row_height
        _draw_query(grid, draw, result, top, font)
        _draw_hits(grid, draw, result.hits, result.expected, label_width, top, font)
        if result.reranked is not None:
            _draw_hits(grid, draw, result.reranked, result.expected, label_width + block + gap, top, font)
    grid.save(path)


def _draw_query(grid: Image.Image, draw: ImageDraw.ImageDraw, result: QueryResult, top: int, font) -> None:
    if result.query_image is not None:
        grid.paste(Image.open(result.query_image).convert("RGB").resize((THUMB, THUMB), Image.NEAREST), (PAD, top))
        draw.text((PAD + THUMB + 6, top), "image query", fill="black", font=font)
        return
    label = "\n".join(textwrap.wrap(result.label, 40))
    if _ranks(result):
        label += f"\n(described image: {_ranks(result)})"
    draw.multiline_text((PAD, top), label, fill="black", font=font)


def _draw_hits(grid: Image.Image, draw: ImageDraw.ImageDraw, hits: list[Hit], expected: str | None, left0: int,
               top: int, font) -> None:
    for column, hit in enumerate(hits):
        left = left0 + column * (THUMB + PAD)
        grid.paste(Image.open(hit.path).convert("RGB").resize((THUMB, THUMB), Image.NEAREST), (left, top))
        if expected is not None and hit.path == expected:
            draw.rectangle((left - 3, top - 3, left + THUMB + 2, top + THUMB + 2), outline=(20, 170, 60), width=3)
        draw.text((left, top + THUMB + 4), f"{hit.score:.3f}", fill="black", font=font)


def print_results(results: list[QueryResult]) -> None:
    for result in results:
        rank = f"  [described image: {_ranks(result)}]" if _ranks(result) else ""
        print(f"\nquery: {result.label}{rank}")
        _print_hits(result.hits, result.expected, "by ITC" if result.reranked is not None else None)
        if result.reranked is not None:
            _print_hits(result.reranked, result.expected, "re-ranked by the ITM head")


def _print_hits(hits: list[Hit], expected: str | None, heading: str | None) -> None:
    if heading:
        print(f"  {heading}:")
    for rank, hit in enumerate(hits, 1):
        mark = "  <- the image the query describes" if hit.path == expected else ""
        print(f"  {rank}. {hit.score:.3f}  {Path(hit.path).name}  ({_caption_of(hit.path)}){mark}")
