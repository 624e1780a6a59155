"""Fixtures: tiny models, checkpoints the tests write themselves, and folders of synthetic images."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("CLIPKIT_OFFLINE", "1")  # tests never reach for the network
for _variable in ("no_proxy", "NO_PROXY"):  # the tests' own servers on 127.0.0.1: never through a proxy
    os.environ[_variable] = ",".join(filter(None, [os.environ.get(_variable), "127.0.0.1", "localhost"]))


def make_checkpoint(path: Path, name: str = "clipkit-tiny", seed: int = 123) -> Path:
    """An open_clip state dict with weights unlike clipkit's fixed-seed initialisation."""
    import open_clip

    from clipkit.models import register_configs

    register_configs()
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


# Re-ranked scores add weight x cosine (the demo's weights: 96 both ways): a cosine's
# float32 rounding in another batch shape (~2e-7) moves them by ~1e-4, so two paths agree to this.
RERANK_ATOL = 1e-3


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


def shape_folder(folder: Path, n: int, colour: str = "red", shape: str = "square") -> Path:
    """`folder` (made) with n images of one shape, `0.png` ... (seeds 0..n-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_shape(colour, shape, seed=i).save(folder / f"{i}.png")
    return folder


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


# ---------------------------------------------------------------------------------------------
# `clipkit serve` in a process of its own, and Chromium to drive pages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TLS = Path(__file__).parent / "tls"  # a self-signed certificate for 127.0.0.1 and localhost, valid 100 years


def trusting_tls():
    """An SSL context that trusts the tests' certificate (httpx's `verify=`)."""
    import ssl

    return ssl.create_default_context(cafile=str(TLS / "localhost.crt"))


@contextlib.contextmanager
def running_server(*args: str, token: str | None = None, tls: bool = False):
    """`clipkit -q serve ARGS --port P --device cpu` in a process (asking for `token`, given by the environment
    as users are told to; over https with the tests' certificate if `tls`); yields its base URL once it answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if token:
        env["CLIPKIT_SERVE_TOKEN"] = token
    https = ["--tls-cert", str(TLS / "localhost.crt"), "--tls-key", str(TLS / "localhost.key")] if tls else []
    process = subprocess.Popen([sys.executable, "-m", "clipkit", "-q", "serve", *args, *https, "--port", str(port),
                                "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    try:
        while True:  # wait for the server to answer (model loading takes a few seconds)
            try:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                answer = httpx.get(url + "healthz", timeout=2, headers=headers, verify=trusting_tls())
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"clipkit serve did not start: {process.stdout.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 900):
    """A headless Chromium driven by selenium; skipped (failed under CI) where it is not installed."""
    if not (CHROMIUM and CHROMEDRIVER):
        message = ("Chromium and chromedriver are not installed (Debian: bash tests/install-chromium.sh, or "
                   "apt-get install chromium chromium-driver); the browser tests need them")
        if os.environ.get("CI"):
            pytest.fail(message + " and CI must run them")
        pytest.skip(message)
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
