"""BLIP-2 (transformers `Blip2ForImageTextRetrieval`, tiny and random, written by the test) as a model: one
vector per query token an image, its ITC similarity the best of them, through `clipkit index` and `search`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import clipkit  # noqa: E402
from clipkit.cli import main  # noqa: E402
from clipkit.encode import load_image  # noqa: E402
from test_rerankers import blip2_dir, blip2_reference  # noqa: E402

TEXTS = ["a red circle", "a blue square", "a green triangle", "the yellow one"]


def itc_reference(path: Path, images: list, texts: list[str]) -> np.ndarray:
    """transformers' own BLIP-2 ITC similarity of every (image, text): logits_per_image without the ITM head."""
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(path).eval()
    processor = transformers.Blip2Processor.from_pretrained(path)
    with torch.no_grad():
        tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                     max_length=model.config.qformer_config.max_position_embeddings)
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return model(pixel_values=pixels, **tokens, use_image_text_matching_head=False).logits_per_image.numpy()


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
    # one checkpoint retrieves (ITC) and re-ranks (its ITM head): the default re-ranker of its index
    hits = clipkit.search(TEXTS[1], index, k=3, rerank=True, rerank_k=12)
    candidates = clipkit.search(TEXTS[1], index, k=12)
    probabilities = blip2_reference(path, [load_image(Path(h.path)) for h in candidates], [TEXTS[1]] * 12)
    order = np.argsort(-probabilities, kind="stable")[:3]
    assert [h.id for h in hits] == [candidates[i].id for i in order]
    np.testing.assert_allclose([h.score for h in hits], probabilities[order], atol=1e-4)


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


def test_eval_with_blip2_ranks_by_its_itc_and_reranks_with_its_itm(tmp_path):
    from clipkit.evaluate import load_dataset, run_benchmark

    path = blip2_dir(tmp_path, spread=0.3)
    data = load_dataset("synthetic", n_images=10)
    similarity = itc_reference(path, [load_image(i) if isinstance(i, Path) else i for i in data.images],
                               data.captions).T  # (captions, images), transformers' own
    truth_rank = np.array([int((row > row[target]).sum()) + 1 for row, target in zip(similarity, data.text_to_image)])
    report = run_benchmark("synthetic", model=str(path), rerank=True, rerank_k=4, n_images=10, device="cpu",
                           json_path=str(tmp_path / "eval.json"))
    assert report["itc"]["t2i"]["R@1"] == pytest.approx(float((truth_rank <= 1).mean()))
    assert report["itc"]["t2i"]["R@5"] == pytest.approx(float((truth_rank <= 5).mean()))
    assert report["rerank"] is not None and report["reranker"] is not None


def test_an_item_s_stored_vectors_are_a_query_and_one_whose_file_went_is_searched_by_them(tmp_path, image_folder,
                                                                                         capsys):
    """An item of a BLIP-2 index holds one vector per query token. `search(index.embeddings([id])[0], index)`
    (a 2-D float array: one query of several vectors) scores each item by its best pair, as numpy does; it was
    refused ("an array query must be a 1-D embedding"), and so was `clipkit search ID` once ID's file had gone
    (the CLI then searches by the stored vectors)."""
    path = blip2_dir(tmp_path, spread=0.3)
    index_path = tmp_path / "ix"
    assert main(["-q", "index", str(image_folder), "--index", str(index_path), "--model", str(path)]) == 0
    index = clipkit.Index.load(index_path)
    ids = index.ids()
    query = index.embeddings([ids[0]])[0]
    assert query.shape == (4, 16)
    stored = index.embeddings(ids)
    expected = np.einsum("qd,nvd->nqv", query, stored).max(axis=(1, 2))
    hits = clipkit.search(query, index, k=len(ids))
    assert [h.id for h in hits][0] == ids[0]
    np.testing.assert_allclose(sorted(h.score for h in hits), np.sort(expected), atol=1e-5)
    np.testing.assert_allclose([h.score for h in hits], [expected[ids.index(h.id)] for h in hits], atol=1e-5)
    Path(ids[0]).unlink()  # (its stored vectors are what the index holds of it)
    capsys.readouterr()
    assert main(["search", ids[0], "--index", str(index_path), "-k", "3", "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == [h.id for h in hits[:3]]
