"""Re-rankers behind one interface: a BLIP ITM model (transformers, tiny and random, written by the test)
and clipkit's own ITM head, against transformers' outputs and the library's search."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import clipkit  # noqa: E402
from clipkit.cli import main  # noqa: E402
from clipkit.encode import load_image  # noqa: E402
from clipkit.rerankers import Blip2Reranker, BlipReranker, HeadReranker, load_images  # noqa: E402
from conftest import RERANK_ATOL, draw_shape  # noqa: E402


def blip_dir(root: Path) -> Path:
    """A tiny random BlipForImageTextRetrieval with a word-piece vocabulary of letters and BLIP's processors."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *(f"##{c}" for c in string.ascii_lowercase)]
    tokenizer = transformers.BertTokenizer(vocab={token: n for n, token in enumerate(vocab)})
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=24)
    torch.manual_seed(0)
    path = root / "tiny-blip-itm"
    transformers.BlipForImageTextRetrieval(config).save_pretrained(path)
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return blip_dir(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def demo():
    return clipkit.load_model("clipkit-demo", device="cpu")


PAIRS = [("red", "circle", "a red circle"), ("blue", "square", "a red circle"), ("green", "triangle", "a green one"),
         ("yellow", "cross", "a small yellow cross left of a big blue square")]


def blip_reference(path: Path, images: list, texts: list[str]) -> np.ndarray:
    """transformers' own ITM match probability of each pair: softmax(itm_score)[:, 1]."""
    model = transformers.BlipForImageTextRetrieval.from_pretrained(path).eval()
    processor = transformers.BlipProcessor.from_pretrained(path)
    with torch.no_grad():
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        return torch.softmax(model(**inputs, use_itm_head=True).itm_score, dim=-1)[:, 1].numpy()


def test_blip_scores_equal_transformers(blip):
    reranker = clipkit.load_reranker(str(blip), device="cpu")
    assert isinstance(reranker, BlipReranker) and reranker.weight == 0
    images = [draw_shape(c, s, size=(40, 40), seed=n) for n, (c, s, _) in enumerate(PAIRS)]
    texts = [t for _, _, t in PAIRS]
    expected = blip_reference(blip, images, texts)
    np.testing.assert_allclose(clipkit.score_pairs(images, texts, reranker=reranker), expected, atol=1e-4)
    np.testing.assert_allclose(reranker.score_pairs(images[::-1], texts[::-1]), expected[::-1], atol=1e-4)
    with pytest.raises(ValueError, match="pairs"):
        clipkit.score_pairs(images, texts[:2], reranker=reranker)


def blip2_dir(root: Path, spread: float = 0.02) -> Path:
    """A tiny random Blip2ForImageTextRetrieval (ViT, Q-Former with 4 queries) with a letter word-piece
    vocabulary and BLIP's image processor; `spread`: the weights' initial standard deviation (larger: the
    query tokens' outputs depend more on the image)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *(f"##{c}" for c in string.ascii_lowercase)]
    tokenizer = transformers.BertTokenizer(vocab={token: n for n, token in enumerate(vocab)})
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=spread),
        qformer_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                            cross_attention_frequency=1, use_qformer_text_input=True, initializer_range=spread),
        num_query_tokens=4, image_text_hidden_size=16)
    torch.manual_seed(0)
    model = transformers.Blip2ForImageTextRetrieval(config)
    with torch.no_grad():  # random query tokens and ITM head: scores that differ from pair to pair
        model.query_tokens.normal_(0, 1)
        model.itm_head.weight.normal_(0, 1)
    path = root / "tiny-blip2-itm"
    model.save_pretrained(path)
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    transformers.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def blip2_reference(path: Path, images: list, texts: list[str]) -> np.ndarray:
    """transformers' own BLIP-2 ITM match probability of each pair: softmax(logits_per_image)[:, 1]."""
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(path).eval()
    processor = transformers.Blip2Processor.from_pretrained(path)
    with torch.no_grad():
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        out = model(**inputs, use_image_text_matching_head=True)
        return torch.softmax(out.logits_per_image, dim=-1)[:, 1].numpy()


def test_blip2_itm_scores_equal_transformers(tmp_path, demo, image_folder):
    path = blip2_dir(tmp_path)
    reranker = clipkit.load_reranker(str(path), device="cpu")
    assert isinstance(reranker, Blip2Reranker) and reranker.weight == 0
    images = [draw_shape(c, s, size=(40, 40), seed=n) for n, (c, s, _) in enumerate(PAIRS)]
    texts = [t for _, _, t in PAIRS]
    expected = blip2_reference(path, images, texts)
    assert np.ptp(expected) > 1e-3  # the pairs score differently: the comparison means something
    np.testing.assert_allclose(clipkit.score_pairs(images, texts, reranker=reranker), expected, atol=1e-4)
    np.testing.assert_allclose(reranker.score_pairs(images[::-1], texts[::-1]), expected[::-1], atol=1e-4)
    # a text of 62 of the 64 positions: the Q-Former's positions number the text's tokens alone (its 4 queries
    # have none), so it is read whole, as transformers reads it (it was cut to 64 - 4 = 60)
    (tmp_path / "wide").mkdir()
    wide = blip2_dir(tmp_path / "wide", spread=0.3)  # (the text's last tokens move the score)
    long_texts = [" ".join(["ab"] * 29 + [end]) for end in ("zy", "qx")]
    assert len(transformers.Blip2Processor.from_pretrained(wide).tokenizer(long_texts[0])["input_ids"]) == 62
    expected = blip2_reference(wide, images[:1] * 2, long_texts)
    assert abs(expected[0] - expected[1]) > 1e-5  # the texts differ in their last word only
    np.testing.assert_allclose(clipkit.load_reranker(str(wide), device="cpu").score_pairs(images[:1] * 2, long_texts),
                               expected, atol=1e-6)
    assert clipkit.load_model(str(path), device="cpu").vectors_per_image == 4  # the same checkpoint retrieves
    index = clipkit.Index.from_folder(image_folder, demo)  # and as search's re-ranker
    hits = clipkit.search("a red circle", index, k=3, rerank=True, rerank_k=8, reranker=reranker)
    candidates = clipkit.search("a red circle", index, k=8)
    probabilities = blip2_reference(path, [load_image(Path(h.path)) for h in candidates], ["a red circle"] * 8)
    order = np.argsort(-probabilities, kind="stable")[:3]
    assert [h.id for h in hits] == [candidates[i].id for i in order]
    np.testing.assert_allclose([h.score for h in hits], probabilities[order], atol=1e-4)


def test_search_reranks_with_blip_both_ways(blip, demo, image_folder, tmp_path):
    reranker = clipkit.load_reranker(str(blip), device="cpu")
    index = clipkit.Index.from_folder(image_folder, demo)
    hits = clipkit.search("a red circle", index, k=4, rerank=True, rerank_k=10, reranker=reranker)
    candidates = clipkit.search("a red circle", index, k=10)
    pictures = [load_image(Path(h.path)) for h in candidates]  # decoded in full, as score_pairs does
    probabilities = blip_reference(blip, pictures, ["a red circle"] * len(candidates))
    order = np.argsort(-probabilities, kind="stable")[:4]
    assert [h.id for h in hits] == [candidates[i].id for i in order]
    np.testing.assert_allclose([h.score for h in hits], probabilities[order], atol=1e-4)
    assert [h.metadata["itc_score"] for h in hits] == pytest.approx([candidates[i].score for i in order], abs=1e-5)
    weighted = clipkit.search("a red circle", index, k=10, rerank=True, rerank_k=10, reranker=reranker, weight=0.5)
    by_id = {h.id: (p, h.score) for h, p in zip(candidates, probabilities)}  # BLIP + weight x the hits' ITC cosine
    np.testing.assert_allclose([h.score for h in weighted], [by_id[h.id][0] + 0.5 * by_id[h.id][1] for h in weighted],
                               atol=1e-4)

    # image -> text: an image query re-ranks the captions of the caption collection
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "one red cross"]
    texts = clipkit.Index.from_embeddings(clipkit.encode(captions, model=demo), ids=captions,
                                          metadata=[{"caption": c} for c in captions], model=demo)
    query = draw_shape("red", "circle", size=(40, 40))
    by_blip = clipkit.search(query, texts, k=5, rerank=True, reranker=reranker)
    expected = blip_reference(blip, [query] * 5, [h.id for h in by_blip])
    np.testing.assert_allclose([h.score for h in by_blip], expected, atol=1e-4)
    assert [h.score for h in by_blip] == sorted([h.score for h in by_blip], reverse=True)


def test_head_reranker_and_score_pairs_match_search(demo, image_folder):
    """score_pairs with a model scores as search's re-ranking does: ITM log-odds + the head's weight x cosine."""
    reranker = clipkit.load_reranker("clipkit-demo", device="cpu")
    assert isinstance(reranker, HeadReranker) and reranker.weight == demo.itm.config["rerank_weight"]
    index = clipkit.Index.from_folder(image_folder, demo)
    hits = clipkit.search("a red circle", index, k=5, rerank=True, rerank_k=8)
    pictures = [Path(h.path) for h in hits]
    scores = clipkit.score_pairs(pictures, ["a red circle"] * len(hits), model=demo)
    assert clipkit.score_pairs([], [], model=demo).shape == reranker.score_pairs([], []).shape == (0,)
    another = clipkit.load_model("clipkit-demo")  # (another model's cosine: the path that decodes first)
    assert clipkit.score_pairs([], [], reranker=reranker, model=another, weight=1).shape == (0,)
    np.testing.assert_allclose(scores, [h.score for h in hits], atol=RERANK_ATOL)
    with_head = clipkit.search("a red circle", index, k=5, rerank=True, rerank_k=8, reranker=reranker)
    assert [h.id for h in with_head] == [h.id for h in hits]
    # the cosine's image embeddings come from the tower pass that gives the head its tokens: the model's own
    decoded = load_images(pictures)
    states, embedded = reranker.embedded_images(decoded)
    np.testing.assert_allclose(embedded, clipkit.encode(decoded, model=demo), atol=1e-5)
    torch.testing.assert_close(states, reranker.image_inputs(decoded))
    captions = ["a red circle", "a small blue square on a big green triangle", "x"]
    (text_states, padding), embedded = reranker.embedded_texts(captions)  # and the texts' likewise
    np.testing.assert_allclose(embedded, clipkit.encode(captions, model=demo), atol=1e-5)
    torch.testing.assert_close((text_states, padding), reranker.text_inputs(captions))


def test_re_ranking_holds_a_decoded_picture_only_while_it_is_preprocessed(demo, image_folder, monkeypatch):
    """A full-size picture is preprocessed in the thread that decoded it and dropped: a re-ranking never holds
    its candidates' full-size pictures all at once (32 photos of 12 MP were 1.7 GB a query), and scores as
    before."""
    import threading
    import weakref

    from clipkit import rerankers

    index = clipkit.Index.from_folder(image_folder, demo)
    expected = [(h.id, h.score) for h in clipkit.search("a red circle", index, k=12, rerank=True, rerank_k=12)]
    lock, alive, most = threading.Lock(), [0], [0]

    def gone():
        with lock:
            alive[0] -= 1

    def tracked_load(item, min_side=None):
        picture = load_image(item, min_side)
        with lock:
            alive[0] += 1
            most[0] = max(most[0], alive[0])
        weakref.finalize(picture, gone)
        return picture

    monkeypatch.setattr(rerankers, "load_image", tracked_load)
    monkeypatch.setattr(rerankers, "_PIXELS", rerankers.Kept(rerankers._PIXELS.limit, rerankers._PIXELS.size))
    monkeypatch.setattr(rerankers, "PIXEL_CACHE_BYTES", 0)  # (none kept: every search decodes its candidates)
    hits = clipkit.search("a red circle", index, k=12, rerank=True, rerank_k=12)
    assert len(hits) == 12 and 1 <= most[0] <= min(getattr(rerankers, "DECODE_WORKERS", 4), 11) and alive[0] == 0
    assert [h.id for h in hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [score for _, score in expected], atol=1e-5)
    # searches re-ranking at once (a server's requests) share the decoding threads: the bound is the process's
    from concurrent.futures import ThreadPoolExecutor

    most[0] = 0
    with ThreadPoolExecutor(4) as searches:
        answers = list(searches.map(lambda _: clipkit.search("a red circle", index, k=12, rerank=True, rerank_k=12),
                                    range(4)))
    assert all([h.id for h in answer] == [i for i, _ in expected] for answer in answers)
    assert 1 <= most[0] <= getattr(rerankers, "DECODE_WORKERS", 4) < 8 and alive[0] == 0


def test_a_search_keeps_its_candidates_pixels_for_the_next_while_their_files_stay(demo, image_folder, monkeypatch):
    """Re-ranked searches decode a candidate file once: the next search that meets it (same size and
    modification time, a re-ranker of the same preprocessing) takes its pixels as kept; a changed file is
    decoded again; the kept pixels stay within PIXEL_CACHE_BYTES."""
    from clipkit import rerankers

    monkeypatch.setattr(rerankers, "_PIXELS", rerankers.Kept(rerankers._PIXELS.limit, rerankers._PIXELS.size))
    decoded = []
    monkeypatch.setattr(rerankers, "load_image", lambda item, min_side=None: decoded.append(str(item)) or
                        load_image(item, min_side))
    index = clipkit.Index.from_folder(image_folder, demo)
    first = clipkit.search("a red circle", index, k=6, rerank=True, rerank_k=8)
    assert len(decoded) == 8
    again = clipkit.search("a red circle", index, k=6, rerank=True, rerank_k=8)
    assert len(decoded) == 8 and [(h.id, h.score) for h in again] == [(h.id, h.score) for h in first]
    changed = Path(first[0].path)  # now another picture, under the same name
    draw_shape("blue", "square", Image.open(changed).size, seed=5).save(changed, format=Image.open(changed).format)
    later = clipkit.search("a red circle", index, k=8, rerank=True, rerank_k=8)
    assert decoded[8:] == [str(changed)]
    fresh = clipkit.score_pairs([Path(h.path) for h in later], ["a red circle"] * 8, model=demo)
    np.testing.assert_allclose([h.score for h in later], fresh, atol=RERANK_ATOL)
    monkeypatch.setattr(rerankers, "PIXEL_CACHE_BYTES", 3 * rerankers._PIXELS.entries[next(iter(
        rerankers._PIXELS.entries))].nbytes)
    clipkit.search("a green square", index, k=6, rerank=True, rerank_k=12)
    assert len(rerankers._PIXELS) == 3 and rerankers._PIXELS.total <= rerankers.PIXEL_CACHE_BYTES


def test_cli_and_server_take_a_reranker(blip, demo, image_folder, tmp_path, capsys):
    index = clipkit.Index.from_folder(image_folder, demo)
    index.save(tmp_path / "ix")
    reranker = clipkit.load_reranker(str(blip), device="cpu")
    expected = clipkit.search("a red circle", index, k=3, rerank=True, rerank_k=6, reranker=reranker)
    assert main(["search", "a red circle", "--index", str(tmp_path / "ix"), "-k", "3", "--rerank-k", "6",
                 "--reranker", str(blip), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in printed] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in printed], [h.score for h in expected], atol=RERANK_ATOL)

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    with TestClient(create_app(index, reranker=reranker)) as client:
        assert client.get("/healthz").json()["reranker"] == str(blip.resolve())
        body = {"text": "a red circle", "k": 3, "rerank": True, "rerank_k": 6}
        results = client.post("/search", json=body).json()["results"]
    assert [r["item_id"] for r in results] == [h.id for h in expected]

    assert main(["eval", "--dataset", "synthetic", "--n-images", "20", "--rerank-k", "4", "--reranker", str(blip),
                 "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["reranker"] == str(blip.resolve()) and report["rerank"]["t2i"]["R@10"] == \
        report["itc"]["t2i"]["R@10"]  # beyond the re-ranked top 4 nothing moves
    assert "ITC + " + str(blip.resolve()) in capsys.readouterr().out


def test_reranking_is_one_score(blip, demo, tiny_model, tmp_path):
    """search's re-ranked score of a pair is score_pairs' for it: large JPEGs decoded in full for both, and a
    clipkit re-ranker over another model's index adds its own cosine (its weight was fitted to it)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for n, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                         ("red", "square"), ("yellow", "circle")]):
        draw_shape(colour, shape, size=(600, 480), seed=n).save(folder / f"{n}.jpg", quality=90)
    for reranker, index_model in ((clipkit.load_reranker(str(blip), device="cpu"), demo),
                                  (clipkit.load_reranker("clipkit-demo", device="cpu"), tiny_model)):
        index = clipkit.Index.from_folder(folder, index_model)
        hits = clipkit.search("a red circle", index, k=5, rerank=True, rerank_k=5, reranker=reranker)
        expected = clipkit.score_pairs([Path(h.path) for h in hits], ["a red circle"] * 5, reranker=reranker)
        np.testing.assert_allclose([h.score for h in hits], expected, atol=RERANK_ATOL)
