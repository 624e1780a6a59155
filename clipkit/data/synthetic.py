"""A synthetic compositional image-caption data set, where retrieval is hard the way real retrieval is.

Each image holds 1-3 objects (shape, colour, size, position); the first two stand in a spatial
relation. Each image has 2-5 captions from paraphrasing templates. For a large share of the
multi-object images the data set also holds *distractors*: the same scene with two objects' colours,
shapes or sizes swapped, or with their positions swapped (the relation reversed). A distractor's
captions use the same words as the original's, so only a model that binds attributes to objects
separates them. Samples record their `image_id`, the `group_id` shared with their distractors, and
the `kind` of swap.

Everything is a pure function of (seed, split, index): the same seed gives byte-identical output, and
images are rendered in several processes.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import multiprocessing
import random
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from clipkit.data.images import encode_image
from clipkit._io import atomic_write_bytes
from clipkit.data.shards import Sample, shard_name, write_manifest, write_shard

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 75, 220), "yellow": (245, 215, 35),
    "purple": (130, 55, 185), "orange": (250, 135, 25), "pink": (245, 135, 195), "cyan": (55, 205, 215),
    "white": (248, 248, 248), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
SIZES = {"small": 0.11, "large": 0.19}  # radius as a fraction of the image side
RELATIONS = ("left", "right", "above", "below")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
SWAPS = ("colour_swap", "shape_swap", "size_swap", "relation_swap")
SPLITS = {"train": 0, "val": 1, "test": 2}
SPLIT_ID_OFFSET = 100_000_000  # image ids of split s lie in [s * offset, (s + 1) * offset)
_MARGIN = 0.03
_SUPERSAMPLE = 2

_REL_PHRASES = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
# "{A}, {B} <phrase>": where B is when A is <relation> of B
_ITS_PHRASES = {"left": "on its right", "right": "on its left", "above": "below it", "below": "above it"}


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, fractions of the side
    y: float
    radius: float
    rgb: tuple[int, int, int]
    rotation: float = 0.0

    def words(self, with_size: bool) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj]
    relation: str | None  # objects[0] is <relation> of objects[1]
    background: tuple[int, int, int]
    texture: str  # plain | noise | gradient | stripes
    texture_strength: float
    kind: str = "original"
    image_id: int = 0
    group_id: int = 0
    captions: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)  # captions of its swapped twins: false of it, same words

    def to_json(self) -> dict:
        """Plain JSON types (dataclasses.asdict deep-copies, which costs more than drawing the image)."""
        objects = [{**vars(o), "rgb": list(o.rgb)} for o in self.objects]
        return {**vars(self), "objects": objects, "background": list(self.background),
                "captions": list(self.captions), "negatives": list(self.negatives)}


# ---------------------------------------------------------------------------------------------
# Scenes


def _rng(*key: int) -> random.Random:
    """A generator for one (seed, split, group): string seeds are hashed with SHA-512, so stable."""
    return random.Random("-".join(str(int(k)) for k in key))


def _relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    dx, dy = b.x - a.x, b.y - a.y  # y grows downwards
    if relation in ("left", "right"):
        along, across = (dx if relation == "left" else -dx), dy
    else:
        along, across = (dy if relation == "above" else -dy), dx
    return along > a.radius + b.radius + _MARGIN and abs(across) < 0.6 * along


def _apart(a: Obj, others: list[Obj]) -> bool:
    return all(math.hypot(a.x - o.x, a.y - o.y) > a.radius + o.radius + _MARGIN for o in others)


_LOW, _HIGH = SIZES["large"] * 1.1 + _MARGIN, 1 - SIZES["large"] * 1.1 - _MARGIN
# centres stay in [_LOW, _HIGH]: the largest radius off the border, so swapping two objects' places
# keeps both in frame


def _clamp(value, low, high):
    return min(max(value, low), high)


def _new_object(rng: random.Random) -> Obj:
    size = rng.choice(("small", "large"))
    colour = rng.choice(list(COLOURS))
    rgb = tuple(_clamp(v + rng.randint(-12, 12), 0, 255) for v in COLOURS[colour])
    return Obj(shape=rng.choice(SHAPES), colour=colour, size=size,
               x=float(rng.uniform(_LOW, _HIGH)), y=float(rng.uniform(_LOW, _HIGH)),
               radius=float(SIZES[size] * rng.uniform(0.9, 1.1)), rgb=rgb,
               rotation=float(rng.uniform(-10, 10)))


def _place_pair(a: Obj, b: Obj, relation: str, rng: random.Random) -> None:
    """Move a and b so that `a <relation> b` holds clearly (constructive, no rejection loop)."""
    need = a.radius + b.radius + 2 * _MARGIN
    start = float(rng.uniform(_LOW, _HIGH - need))
    end = float(rng.uniform(start + need, _HIGH))
    along = end - start
    across_a = float(rng.uniform(_LOW, _HIGH))
    across_b = _clamp(across_a + rng.uniform(-0.5, 0.5) * along, _LOW, _HIGH)
    first, second = (start, end) if relation in ("left", "above") else (end, start)
    if relation in ("left", "right"):
        a.x, b.x, a.y, b.y = first, second, across_a, across_b
    else:
        a.y, b.y, a.x, b.x = first, second, across_a, across_b


def random_scene(rng: random.Random) -> Scene:
    """A scene of 1-3 objects; the first two (when there are two) stand in a clear spatial relation."""
    n_objects = rng.choices((1, 2, 3), weights=(0.2, 0.5, 0.3))[0]
    relation = rng.choice(RELATIONS) if n_objects >= 2 else None
    objects = [_new_object(rng) for _ in range(min(n_objects, 2))]
    if relation:
        while objects[0].words(True) == objects[1].words(True):  # identical objects make relations ambiguous
            objects[1] = _new_object(rng)
        _place_pair(objects[0], objects[1], relation, rng)
    if n_objects == 3:
        for _ in range(50):  # a third object where it fits; none if the pair leaves no room
            third = _new_object(rng)
            if _apart(third, objects) and not any(_confusable(third, o) for o in objects):
                objects.append(third)
                break
    level = rng.randint(95, 164)
    background = tuple(_clamp(level + rng.randint(-15, 15), 0, 255) for _ in range(3))
    texture = rng.choice(("plain", "noise", "gradient", "stripes"))
    return Scene(objects=objects, relation=relation, background=background, texture=texture,
                 texture_strength=float(rng.uniform(4, 12)))


def _confusable(third: Obj, other: Obj) -> bool:
    """A third object with the same colour and shape as a related one would make captions ambiguous."""
    return third.colour == other.colour and third.shape == other.shape


def possible_swaps(scene: Scene) -> list[str]:
    if len(scene.objects) < 2:
        return []
    a, b = scene.objects[:2]
    swaps = []
    if a.colour != b.colour:
        swaps.append("colour_swap")
    if a.shape != b.shape:
        swaps.append("shape_swap")
    if a.size != b.size:
        swaps.append("size_swap")
    swaps.append("relation_swap")
    return swaps


def swapped(scene: Scene, kind: str) -> Scene:
    """The distractor: `scene` with one attribute (or the places) of its first two objects exchanged."""
    a, b = scene.objects[:2]
    if kind == "colour_swap":
        a2, b2 = replace(a, colour=b.colour, rgb=b.rgb), replace(b, colour=a.colour, rgb=a.rgb)
    elif kind == "shape_swap":
        a2, b2 = replace(a, shape=b.shape), replace(b, shape=a.shape)
    elif kind == "size_swap":
        a2, b2 = replace(a, size=b.size, radius=b.radius), replace(b, size=a.size, radius=a.radius)
    elif kind == "relation_swap":
        a2, b2 = replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)
    else:
        raise ValueError(f"unknown swap {kind!r}; known: {', '.join(SWAPS)}")
    relation = INVERSE[scene.relation] if kind == "relation_swap" else scene.relation
    return replace(scene, objects=[a2, b2, *scene.objects[2:]], relation=relation, kind=kind, captions=[])


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption_variants(scene: Scene, rng: random.Random) -> list[str]:
    """Every caption template filled in for `scene` (size words included at random)."""
    objects = scene.objects
    # sizes are named at random, and always when two objects differ by nothing else
    with_size = rng.random() < 0.5 or len({o.words(False) for o in objects}) < len(objects)
    names = [o.words(with_size) for o in objects]
    if len(objects) == 1:
        (a,) = names
        short = objects[0].words(False)
        return [_article(a), f"{_article(objects[0].words(True))} on a plain background".replace(
            "plain", "textured" if scene.texture != "plain" else "plain"), f"one {short}",
            f"a picture of {_article(a)}", f"a single {short}"]
    relation = scene.relation
    rel = rng.choice(_REL_PHRASES[relation])
    inv = rng.choice(_REL_PHRASES[INVERSE[relation]])
    a, b = names[0], names[1]
    pair = [f"{_article(a)} {rel} {_article(b)}",
            f"{_article(b)} {inv} {_article(a)}",
            f"{a}, {b} {_ITS_PHRASES[relation]}",
            f"there is {_article(a)} {rel} {_article(b)}",
            f"{_article(a)} and {_article(b)}, the {objects[0].shape} {rel} the {objects[1].shape}"
            if objects[0].shape != objects[1].shape else f"{_article(b)} with {_article(a)} {rel} it"]
    if len(objects) == 2:
        return pair
    c = _article(names[2])
    return [f"{pair[0]}, and {c}", f"{c} and {pair[1]}", f"{pair[2]}, and {c}",
            f"{pair[3]}, next to {c}", f"three shapes: {pair[0]}, and {c}"]


def captions_for(scene: Scene, rng: random.Random) -> list[str]:
    variants = caption_variants(scene, rng)
    count = rng.randint(2, 5)
    return [variants[i] for i in sorted(rng.sample(range(len(variants)), count))]


def negative_captions(scene: Scene, rng: random.Random) -> list[str]:
    """One caption of each of the scene's swapped twins, each false of the scene in the same words (NegCLIP's
    hard negatives). A size swap's caption counts only where it names the sizes. Drawn from `rng` alone,
    so adding them changes nothing else the data set holds."""
    negatives = []
    for kind in possible_swaps(scene):
        caption = rng.choice(caption_variants(swapped(scene, kind), rng))
        if kind == "size_swap" and not any(word in caption.split() for word in SIZES):
            continue
        if caption not in negatives:
            negatives.append(caption)
    return negatives


def iter_scenes(seed: int = 0, split: str = "train", distractor_share: float = 0.6) -> Iterator[Scene]:
    """The scenes of a split, in order, without end (captions, ids and groups filled in).

    Each group is an original followed by its 0-2 distractors, all drawn from one generator keyed by
    (seed, split, group), so every scene is a pure function of its position.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    id_base = SPLITS[split] * SPLIT_ID_OFFSET
    count = 0
    for group in itertools.count():
        rng = _rng(seed, SPLITS[split], group)
        original = random_scene(rng)
        members = [original]
        swaps = possible_swaps(original)
        if swaps and rng.random() < distractor_share:
            for kind in rng.sample(swaps, min(1 + int(rng.random() < 0.4), len(swaps))):
                members.append(swapped(original, kind))
        for scene in members:
            scene.image_id = id_base + count
            scene.group_id = id_base + group
            scene.captions = captions_for(scene, rng)
            scene.negatives = negative_captions(scene, _rng(seed, SPLITS[split], group, scene.image_id, 1))
            count += 1
            yield scene


def scenes(n: int, seed: int = 0, split: str = "train", distractor_share: float = 0.6) -> list[Scene]:
    """The first `n` scenes of a split (a group may be cut short at the end)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return list(itertools.islice(iter_scenes(seed, split, distractor_share), n))


RELATION_TARGETS = (2, len(COLOURS), len(SHAPES), len(COLOURS), len(SHAPES))  # classes per target field


def relation_targets(meta: dict) -> list[int] | None:
    """Labels of where a scene's related pair stands, from a sample's json member (the scene as the writer
    stores it): [axis (0 across, 1 up-down), the first object's colour and shape, the second's], where the
    first is the one on the left (or on top). None for a scene without a related pair. Both the image and
    every caption of the scene say this, so a model can be taught it on either side; a relation-swapped
    twin has the same objects in the other order."""
    scene = meta.get("scene") if isinstance(meta, dict) else None
    if not isinstance(scene, dict) or scene.get("relation") not in INVERSE or len(scene.get("objects") or ()) < 2:
        return None
    a, b = scene["objects"][:2]
    first, second = (a, b) if scene["relation"] in ("left", "above") else (b, a)
    colours, shapes = list(COLOURS), list(SHAPES)
    try:
        return [int(scene["relation"] in ("above", "below")), colours.index(first["colour"]),
                shapes.index(first["shape"]), colours.index(second["colour"]), shapes.index(second["shape"])]
    except (KeyError, ValueError, TypeError):
        return None


@dataclass
class BindingPair:
    """Winoground-style: a scene and its twin (attribute- or place-swapped), each with a caption that is true
    of it and false of the other, in the same words."""

    images: tuple[Image.Image, Image.Image]
    captions: tuple[str, str]
    kind: str


def binding_pairs(n: int, seed: int = 0, split: str = "test", size: int = 64) -> list[BindingPair]:
    """The first `n` (original, distractor) pairs of a split, each with its first caption. A size swap counts
    only where both captions name the sizes (otherwise each is true of both scenes)."""
    pairs: list[BindingPair] = []
    original = None
    for scene in iter_scenes(seed, split):
        if scene.kind == "original":
            original = scene
            continue
        first, second = original.captions[0], scene.captions[0]
        if first == second or (scene.kind == "size_swap" and not all(
                any(word in caption.split() for word in SIZES) for caption in (first, second))):
            continue
        images = tuple(render(s, size, noise_seed=seed * SPLIT_ID_OFFSET * 4 + s.image_id) for s in (original, scene))
        pairs.append(BindingPair(images=images, captions=(first, second), kind=scene.kind))
        if len(pairs) == n:
            return pairs
    return pairs


# ---------------------------------------------------------------------------------------------
# Rendering


def _polygon(cx: float, cy: float, r: float, points: list[tuple[float, float]], rotation: float) -> list:
    angle = math.radians(rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (px * cos - py * sin), cy + r * (px * sin + py * cos)) for px, py in points]


def _regular(n: int, start: float = -90.0) -> list[tuple[float, float]]:
    return [(math.cos(math.radians(start + 360 * i / n)), math.sin(math.radians(start + 360 * i / n)))
            for i in range(n)]


_STAR = [(math.cos(math.radians(-90 + 36 * i)) * (1 if i % 2 == 0 else 0.45),
          math.sin(math.radians(-90 + 36 * i)) * (1 if i % 2 == 0 else 0.45)) for i in range(10)]
_CROSS = [(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1), (-0.33, 1),
          (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)]
_OUTLINES = {"square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
             "triangle": _regular(3), "hexagon": _regular(6, 0), "star": _STAR, "cross": _CROSS,
             "diamond": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]}


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, side: int, fill) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.38 * r)))
    else:
        draw.polygon(_polygon(cx, cy, r, _OUTLINES[obj.shape], obj.rotation), fill=fill)


def render(scene: Scene, size: int = 64, noise_seed: int | None = None) -> Image.Image:
    """Draw `scene` at `size`x`size`. With a noise seed, texture and pixel noise are added (deterministic)."""
    side = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(canvas)
    if noise_seed is not None and scene.texture == "stripes":
        shade = tuple(max(0, v - int(scene.texture_strength)) for v in scene.background)
        step = max(4, side // 8)
        for offset in range(-side, side, step):
            draw.line((offset, 0, offset + side, side), fill=shade, width=step // 3)
    for obj in scene.objects:
        draw_object(draw, obj, side, obj.rgb)
    image = canvas.resize((size, size), Image.BOX)
    if noise_seed is None:
        return image
    bank = _noise_bank(size)
    pick = random.Random(noise_seed)
    top, left = pick.randrange(size), pick.randrange(size)
    noise = bank[pick.randrange(len(bank)), top:top + size, left:left + size]  # a view, no copy
    amplitude = round(scene.texture_strength) if scene.texture == "noise" else 3
    pixels = np.asarray(image, dtype=np.int16)
    pixels += noise * amplitude // 16
    if scene.texture == "gradient":
        pixels += np.linspace(-scene.texture_strength, scene.texture_strength, size).astype(np.int16)[None, :, None]
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int, count: int = 8) -> np.ndarray:
    """Fixed uniform noise tiles (values -16..16, twice the image side); each image crops its own window."""
    return np.random.default_rng(20261123).integers(-16, 17, (count, 2 * size, 2 * size, 3), dtype=np.int16)


def _render_sample(job: tuple[Scene, int, int, str]) -> Sample:
    scene, size, seed, image_format = job
    image = render(scene, size, noise_seed=seed * SPLIT_ID_OFFSET * 4 + scene.image_id)
    meta = {"image_id": scene.image_id, "group_id": scene.group_id, "kind": scene.kind,
            "captions": scene.captions, "negatives": scene.negatives, "source": "synthetic", "scene": scene.to_json()}
    return Sample(key=f"{scene.image_id:09d}", image=encode_image(image, image_format), image_format=image_format,
                  captions=list(scene.captions), meta=meta)


def _pool(workers: int):
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return context.Pool(workers)


MAX_SIZE = 4096  # pixels a side: past this an image is memory (100,000 a side is 30 GB), not detail


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer from 16 to {MAX_SIZE} pixels, got {size!r}")


def generate(n: int, seed: int = 0, split: str = "train", size: int = 64, image_format: str = "jpg",
             workers: int | None = None, distractor_share: float = 0.6) -> Iterator[Sample]:
    """Rendered samples of a split, in order, rendered by `workers` processes (default: all cores)."""
    _check_size(size)
    jobs = ((scene, size, seed, image_format) for scene in scenes(n, seed, split, distractor_share))
    workers = workers or os.cpu_count() or 1
    if workers == 1 or n < 256:
        yield from map(_render_sample, jobs)
        return
    with _pool(workers) as pool:
        yield from pool.imap(_render_sample, jobs, chunksize=64)


def _write_chunk(job: tuple) -> tuple[str, int]:
    chunk, out_dir, prefix, number, size, seed, image_format, layout = job
    samples = (_render_sample((scene, size, seed, image_format)) for scene in chunk)
    if layout == "shards":
        path = Path(out_dir) / shard_name(prefix, number)
        return str(path), write_shard(path, samples)
    count = 0
    for sample in samples:
        stem = Path(out_dir) / f"{prefix}-{sample.key}"
        atomic_write_bytes(f"{stem}.{sample.image_format}", sample.image, durable=False)
        atomic_write_bytes(f"{stem}.txt", ("\n".join(sample.captions) + "\n").encode(), durable=False)
        atomic_write_bytes(f"{stem}.json", json.dumps(sample.meta, sort_keys=True).encode(), durable=False)
        count += 1
    return str(out_dir), count


def write_synthetic(out_dir: str | os.PathLike, n: int, seed: int = 0, split: str = "train", size: int = 64,
                    layout: str = "shards", image_format: str = "jpg", maxcount: int = 1000,
                    workers: int | None = None, distractor_share: float = 0.6,
                    progress: bool | None = None) -> list[Path]:
    """Write a split as webdataset shards (`SPLIT-000000.tar` ... and `SPLIT.json`) or as a folder of
    `SPLIT-ID.jpg` + `.txt` (captions) + `.json` (metadata). Each worker process renders and writes
    whole shards, so output bytes do not depend on the number of workers."""
    from clipkit._progress import progress_bar

    _check_size(size)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if layout not in ("shards", "folder"):
        raise ValueError(f"layout must be 'shards' or 'folder', got {layout!r}")
    if not isinstance(maxcount, int) or maxcount < 1:
        raise ValueError(f"maxcount must be a positive integer, got {maxcount!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scene_stream = itertools.islice(iter_scenes(seed, split, distractor_share), n)
    n_chunks = -(-n // maxcount)
    # lazily made, so drawing up scenes overlaps with the workers' rendering
    jobs = ((list(itertools.islice(scene_stream, maxcount)), str(out_dir), split, number, size, seed, image_format,
             layout) for number in range(n_chunks))
    workers = min(workers or os.cpu_count() or 1, n_chunks)
    results: list[tuple[str, int]] = []
    with progress_bar(progress, total=n, unit="img", desc=f"writing {split}") as bar:
        runner = map(_write_chunk, jobs) if workers == 1 else None
        pool = _pool(workers) if runner is None else None
        try:
            for result in runner or pool.imap(_write_chunk, jobs):
                results.append(result)
                bar.update(result[1])
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    if layout == "shards":
        write_manifest(out_dir, split, results)
        return [Path(p) for p, _ in results]
    return sorted(out_dir.glob(f"{split}-*.{image_format}"))
