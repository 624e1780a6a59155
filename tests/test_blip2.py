"""BLIP-2 (transformers `Blip2ForImageTextRetrieval`, tiny and random, written by the test) as a model: one
vector per query token an image, its ITC similarity the best of them, through `clipkit index` and `search`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import clipkit  # noqa: E402
from clipkit.cli import main  # noqa: E402
from clipkit.encode import load_image  # noqa: E402
from test_rerankers import blip2_dir  # noqa: E402

TEXTS = ["a red circle", "a blue square", "a green triangle", "the yellow one"]


def itc_reference(path: Path, images: list, texts: list[str]) -> np.ndarray:
    """transformers' own BLIP-2 ITC similarity of every (image, text): logits_per_image without the ITM head."""
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(path).eval()
    processor = transformers.Blip2Processor.from_pretrained(path)
    with torch.no_grad():
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        return model(**inputs, use_image_text_matching_head=False).logits_per_image.numpy()


def test_blip2_itc_through_encode_index_and_search_equals_transformers(tmp_path, image_folder):
    path = blip2_dir(tmp_path, spread=0.3)
    model = clipkit.load_model(str(path), device="cpu")
    assert model.vectors_per_image == 4 and model.image_shape == (4, 16)
    files = sorted(p for p in image_folder.rglob("*") if p.suffix.lower() == ".png" and not p.name.startswith("."))
    images = [load_image(p) for p in files]
    expected = itc_reference(path, images, TEXTS)
    assert np.ptp(expected) > 1e-3  # the pairs score differently: the comparison means something
    image_embeddings = clipkit.encode(images=images, model=model)
    text_embeddings = clipkit.encode(TEXTS, model=model)
    assert image_embeddings.shape == (len(images), 4, 16) and text_embeddings.shape == (len(TEXTS), 16)
    ours = np.einsum("nqd,td->ntq", image_embeddings, text_embeddings).max(axis=2)
    np.testing.assert_allclose(ours, expected, atol=1e-4)

    index_path = tmp_path / "ix"
    assert main(["-q", "index", str(image_folder), "--index", str(index_path), "--model", str(path)]) == 0
    index = clipkit.Index.load(index_path)
    assert index.vectors_per_item == 4 and len(index) == 12
    for column, text in enumerate(TEXTS):  # text -> image: every image, scored by its best query token
        hits = clipkit.search(text, index, k=12)
        scores = {Path(h.path).resolve(): h.score for h in hits}
        np.testing.assert_allclose([scores[f.resolve()] for f in files], expected[:, column], atol=1e-4)


def test_blip2_image_queries_search_captions_by_their_best_query_token(tmp_path, image_folder):
    path = blip2_dir(tmp_path, spread=0.3)
    for n, text in enumerate(TEXTS):
        (image_folder / f"caption{n}.png").write_bytes((image_folder / "red circle.png").read_bytes())
        (image_folder / f"caption{n}.txt").write_text(text)
    index_path = tmp_path / "ix"
    assert main(["-q", "index", str(image_folder), "--index", str(index_path), "--model", str(path)]) == 0
    index = clipkit.Index.load(index_path)
    query = image_folder / "red circle.png"
    hits = clipkit.search(query, index, k=4, modality="text")  # image -> text: the ITC of every caption
    expected = itc_reference(path, [load_image(query)], [h.metadata["caption"] for h in hits])[0]
    np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {h.metadata["caption"] for h in hits} == set(TEXTS)
