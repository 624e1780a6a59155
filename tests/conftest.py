"""Fixtures: tiny models, checkpoints the tests write themselves, and folders of synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("CLIPKIT_OFFLINE", "1")  # tests never reach for the network


def make_checkpoint(path: Path, name: str = "clipkit-tiny", seed: int = 123) -> Path:
    """An open_clip state dict with weights unlike clipkit's fixed-seed initialisation."""
    import open_clip

    from clipkit.models import _register_configs

    _register_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    with torch.no_grad():
        for parameter in model.parameters():  # non-trivial values everywhere, biases and norms included
            parameter.add_(torch.randn_like(parameter) * 0.02)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from clipkit import load_model

    return load_model("clipkit-tiny", pretrained=tiny_ckpt, device="cpu")


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "purple": (140, 50, 170), "orange": (250, 140, 20)}


def draw_shape(colour: str, shape: str, size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(image)
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(w * 0.5, h * 0.15), (w * 0.85, h * 0.85), (w * 0.15, h * 0.85)], fill=COLOURS[colour])
    return image


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """12 good images in assorted formats, sizes and extension cases, nested; plus a broken and a hidden file."""
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("JPEG", "JPEG"), ("webp", "WEBP"), ("gif", "GIF"), ("bmp", "BMP"),
               ("tiff", "TIFF"), ("PNG", "PNG")]
    shapes = ["circle", "square", "triangle"]
    n = 0
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(shapes[:2]):
            ext, fmt = formats[n % len(formats)]
            folder = root if n % 3 == 0 else root / "nested" if n % 3 == 1 else root / "nested" / "deeper"
            size = (40 + 13 * n, 30 + 7 * n)
            draw_shape(colour, shape, size, seed=n).save(folder / f"{colour} {shape}.{ext}", format=fmt)
            n += 1
    (root / "broken.jpg").write_text("this is not an image")
    (root / ".hidden.png").write_bytes((root / "red circle.png").read_bytes())
    (root / "notes.txt").write_text("not an image either, and not an image name")
    return root
