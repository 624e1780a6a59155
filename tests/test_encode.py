import os
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipkit
from clipkit.errors import ImageReadError
from clipkit.models import register_configs

from conftest import draw_shape, make_checkpoint

SHORT = ["a red circle", "dog", "two blue squares left of a green triangle"]
LONG = [" ".join(["a very long caption about a red circle and a blue square"] * 8),  # past the context length
        "an image of " + ", ".join(f"object {i}" for i in range(30))]


def reference(name: str, checkpoint: Path):
    """open_clip's own model, loaded by open_clip's own checkpoint code: the independent reference."""
    register_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def test_encode_rejects_nothing_but_returns_float32_unit_rows(tiny_model):
    out = clipkit.encode(SHORT, model=tiny_model)
    assert out.dtype == np.float32 and out.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("name", ["clipkit-tiny", "clipkit-tiny-rn"])
def test_text_parity_with_open_clip(tmp_path, name):
    checkpoint = make_checkpoint(tmp_path / f"{name}.pt", name=name, seed=7)
    ref, _, tokenizer = reference(name, checkpoint)
    texts = SHORT + LONG
    with torch.no_grad():
        expected = F.normalize(ref.encode_text(tokenizer(texts)), dim=-1).numpy()
    ours = clipkit.encode(texts, model=clipkit.load_model(name, pretrained=checkpoint, device="cpu"), batch_size=2)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["clipkit-tiny", "clipkit-tiny-rn"])
def test_image_parity_with_open_clip(tmp_path, name):
    checkpoint = make_checkpoint(tmp_path / f"{name}.pt", name=name, seed=11)
    ref, preprocess, _ = reference(name, checkpoint)
    sizes = [(32, 32), (100, 60), (61, 203), (300, 500), (17, 9)]
    images = [draw_shape(c, s, size, seed=i) for i, (c, s, size) in
              enumerate(zip(["red", "blue", "green", "yellow", "purple"],
                            ["circle", "square", "triangle", "circle", "square"], sizes))]
    with torch.no_grad():
        expected = F.normalize(ref.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1).numpy()
    model = clipkit.load_model(name, pretrained=checkpoint, device="cpu")
    np.testing.assert_allclose(clipkit.encode(images, model=model, batch_size=2), expected, atol=1e-4)
    # the same pixels given as paths and as arrays
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"im{i}.png")
        image.save(paths[-1])
    np.testing.assert_allclose(clipkit.encode(paths, model=model), expected, atol=1e-4)
    np.testing.assert_allclose(clipkit.encode(images=[str(p) for p in paths], model=model), expected, atol=1e-4)
    np.testing.assert_allclose(clipkit.encode([np.asarray(im) for im in images], model=model), expected, atol=1e-4)


def test_batch_size_does_not_change_results(tiny_model):
    texts = [f"caption number {i} with {'words ' * (i % 7)}" for i in range(23)]
    a = clipkit.encode(texts, model=tiny_model, batch_size=1)
    b = clipkit.encode(texts, model=tiny_model, batch_size=64)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_image_modes_are_converted(tiny_model):
    rgb = draw_shape("red", "circle", (48, 48))
    palette = rgb.quantize(colors=16)
    variants = [rgb, rgb.convert("RGBA"), np.asarray(rgb), palette, palette.convert("RGB"),
                rgb.convert("L"), np.asarray(rgb.convert("L"))]
    out = clipkit.encode(variants, model=tiny_model)
    np.testing.assert_allclose(out[1:3], out[[0, 0]], atol=1e-5)
    np.testing.assert_allclose(out[3], out[4], atol=1e-5)
    np.testing.assert_allclose(out[5], out[6], atol=1e-5)
    # transparency is composited onto white
    clear = Image.new("RGBA", (48, 48), (255, 0, 0, 0))
    white = Image.new("RGB", (48, 48), (255, 255, 255))
    np.testing.assert_allclose(*clipkit.encode([clear, white], model=tiny_model), atol=1e-5)


def test_model_by_name(tiny_model):
    out = clipkit.encode(["hello"], model="clipkit-tiny")
    assert out.shape == (1, 64)


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ("a single string", "must be a list"),
    (["text", Image.new("RGB", (8, 8))], "mixed input: item 0 is text but item 1 is image"),
    ([Path("x.png"), "a caption"], "mixed input"),
    ([1, 2], "unsupported type int"),
    ([np.zeros((8, 8, 3), np.float32)], "must be uint8"),
    ([np.zeros((8, 8, 5), np.uint8)], "HxWx3"),
    ([None], "unsupported type NoneType"),
])
def test_bad_inputs_are_value_errors(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        clipkit.encode(bad, model=tiny_model)


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="exactly one of"):
        clipkit.encode(["a"], texts=["b"], model=tiny_model)
    with pytest.raises(ValueError, match="exactly one of"):
        clipkit.encode(model=tiny_model)
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        clipkit.encode(texts=["a", 3], model=tiny_model)
    with pytest.raises(ValueError, match="batch_size"):
        clipkit.encode(["a"], model=tiny_model, batch_size=0)
    with pytest.raises(ValueError, match="no model given"):
        clipkit.encode(["a"])


def test_a_str_naming_an_image_file_is_text_and_says_so(tmp_path, tiny_model, monkeypatch):
    """str means text; a str that names an image file is a common slip, so it is said (Path is the image)."""
    monkeypatch.chdir(tmp_path)
    draw_shape("red", "circle").save("cat.jpg")
    index = clipkit.Index.from_embeddings(clipkit.encode([Path("cat.jpg")], model=tiny_model), ids=["cat.jpg"],
                                          model=tiny_model)
    with pytest.warns(UserWarning, match=r"'cat.jpg' is taken as text.*pathlib.Path\('cat.jpg'\)") as caught:
        as_text = clipkit.encode(["a dog", "cat.jpg"], model=tiny_model)
    assert caught[0].filename == __file__  # points at the caller's line
    assert np.allclose(as_text, clipkit.encode(texts=["a dog", "cat.jpg"], model=tiny_model), atol=1e-6)
    with pytest.warns(UserWarning, match="taken as text") as caught:
        hit = clipkit.search("cat.jpg", index, k=1, model=tiny_model)[0]
    assert caught[0].filename == __file__ and hit.score < 0.999  # the words, not the picture
    assert clipkit.search(Path("cat.jpg"), index, k=1, model=tiny_model)[0].score == pytest.approx(1, abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the kind is explicit, or the file is not an image
        clipkit.encode(texts=["cat.jpg"], model=tiny_model)
        Path("notes.txt").write_text("x")
        clipkit.encode(["notes.txt", "missing.jpg"], model=tiny_model)


def test_missing_and_broken_image_files(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="image file not found"):
        clipkit.encode([tmp_path / "missing.png"], model=tiny_model)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageReadError, match="cannot read image"):
        clipkit.encode([broken], model=tiny_model)


def test_fast_text_path_is_exact_for_vit_b_32_and_falls_back_where_it_cannot_be():
    """Running the tower only to the longest caption equals open_clip's full-context encode_text."""
    from clipkit.models import exact_text_length

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()  # random weights: exactness, not quality
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    words = "a small red circle sits left of two big blue squares near the green triangle".split()
    short = [" ".join(words[:n]) for n in range(4, 15)]
    model = clipkit.models.Model(name="ViT-B-32", pretrained=None, clip=clip, preprocess=None, tokenizer=tokenizer,
                                 device=torch.device("cpu"), dim=512, image_size=224, context_length=77,
                                 fingerprint="random")
    for texts in (short, short + LONG):
        tokens = tokenizer(texts)
        with torch.no_grad():
            expected = F.normalize(clip.encode_text(tokens), dim=-1).numpy()
        np.testing.assert_allclose(clipkit.encode(texts, model=model, batch_size=4), expected, atol=1e-4)
    assert exact_text_length(clip, tokenizer(short)) == 16  # start + 14 words + end, not 77
    # where cutting is not exact, every position is used
    clip.text_pool_type = "last"
    assert exact_text_length(clip, tokenizer(short)) is None
    clip.text_pool_type = "argmax"
    clip.attn_mask = None  # bidirectional attention: padding positions reach the pooled token
    assert exact_text_length(clip, tokenizer(short)) is None


def test_mixed_precision_only_on_cuda(tiny_model):
    import contextlib

    assert isinstance(tiny_model.autocast(), contextlib.nullcontext)  # CPU: float32, exact against open_clip
    from clipkit.encode import _batch, default_workers

    rows = [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]
    assert not _batch(rows, torch.device("cpu")).is_pinned()
    assert default_workers("cpu") <= max(0, (os.cpu_count() or 1) - torch.get_num_threads())


@pytest.mark.parametrize("cores, device, expected", [(16, "cuda", 15), (128, "cuda:1", 32), (2, "cuda", 1),
                                                     (16, None, 8), (1, "cuda", 1)])
def test_a_gpu_is_fed_by_every_core_but_one(monkeypatch, cores, device, expected):
    """Decoding threads for a model on a GPU: every core but the one that feeds it (up to 32); 8 was the cap
    whatever the machine, which leaves a GPU waiting on JPEG decoding on a machine of 16 or more cores."""
    from clipkit.encode import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_workers(device) == expected


def test_jpeg_draft_decoding_is_reduced_yet_close(tmp_path, tiny_model):
    from clipkit.data.images import read_image

    photo = draw_shape("red", "circle", (1600, 1200), seed=3)
    photo.save(tmp_path / "big.jpg", quality=92)
    photo.save(tmp_path / "big.png")
    full, reduced = read_image(tmp_path / "big.jpg"), read_image(tmp_path / "big.jpg", min_side=224)
    assert full.size == (1600, 1200) and reduced.size == (400, 300)  # 1/4 scale: both sides still >= 224
    assert read_image(tmp_path / "big.png", min_side=224).size == (1600, 1200)  # only JPEG has a draft mode
    exact = clipkit.encode([tmp_path / "big.jpg"], model=tiny_model, draft=False)[0]
    fast = clipkit.encode([tmp_path / "big.jpg"], model=tiny_model)[0]
    assert float(exact @ fast) > 0.99
    np.testing.assert_allclose(exact, clipkit.encode([full], model=tiny_model)[0], atol=1e-5)
