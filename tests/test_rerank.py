import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clipkit
from clipkit.cli import main
from clipkit.data.captions import synthetic_set
from clipkit.encode import load_image
from clipkit.evaluate import evaluate
from clipkit.itm import encode_image_tokens, encode_text_tokens, padding_mask
from clipkit.models import load_model

from conftest import draw_shape


@pytest.fixture(scope="module")
def itm_model(tmp_path_factory):
    """clipkit-tiny with a (briefly trained) ITM head, from a checkpoint the test writes."""
    from clipkit.data.synthetic import write_synthetic
    from clipkit.train import TrainConfig, train

    root = tmp_path_factory.mktemp("itm")
    write_synthetic(root / "data", 64, size=32)
    train(TrainConfig(data=str(root / "data" / "train-000000.tar"), out=str(root / "run"), steps=2, batch_size=16,
                      workers=0, val=None, itm_width=32, itm_layers=1, itm_heads=2, ckpt_every=2))
    return load_model("clipkit-tiny", pretrained=root / "run" / "ckpt-0000002.pt", device="cpu")


def itm_score(model, text: str, pixels: torch.Tensor) -> float:
    """One pair at a time, straight through the towers and the head: the independent reference."""
    with torch.no_grad():
        tokens = model.tokenize([text])
        states = encode_text_tokens(model.clip, tokens)[1]
        patches = encode_image_tokens(model.clip, pixels[None])[1]
        logits = model.itm(states, padding_mask(tokens), patches)[0]
    return float(logits[1] - logits[0])


def reranked_order(scores_top: dict, ranking: list) -> list:
    top = sorted(scores_top, key=lambda item: -scores_top[item])
    return top + [item for item in ranking if item not in scores_top]


def test_evaluation_rerank_matches_pairwise_reference(itm_model):
    data = synthetic_set(24, seed=5, size=32)
    k, weight = 4, 0.5
    result = evaluate(itm_model, data, rerank=True, rerank_k=k, weight=weight, batch_size=7)
    pixels = torch.stack([itm_model.preprocess(im) for im in data.images])
    sim = clipkit.encode(data.captions, model=itm_model) @ clipkit.encode(data.images, model=itm_model).T
    t2i_ranks = []
    for t, caption in enumerate(data.captions):
        ranking = list(np.argsort(-sim[t]))
        scores = {i: itm_score(itm_model, caption, pixels[i]) + weight * sim[t, i] for i in ranking[:k]}
        t2i_ranks.append(reranked_order(scores, ranking).index(data.text_to_image[t]) + 1)
    i2t_ranks = []
    for i in range(len(data.images)):
        ranking = list(np.argsort(-sim[:, i]))
        scores = {t: itm_score(itm_model, data.captions[t], pixels[i]) + weight * sim[t, i] for t in ranking[:k]}
        order = reranked_order(scores, ranking)
        i2t_ranks.append(min(order.index(t) + 1 for t in np.where(data.text_to_image == i)[0]))
    for K in (1, 5, 10):
        assert result.rerank[f"t2i_R@{K}"] == pytest.approx((np.array(t2i_ranks) <= K).mean())
        assert result.rerank[f"i2t_R@{K}"] == pytest.approx((np.array(i2t_ranks) <= K).mean())
    assert result.rerank["t2i_R@10"] == result.itc["t2i_R@10"]  # beyond the re-ranked top 4 nothing moves
    assert set(result.seconds) == {"encode_images", "encode_texts", "itc_search", "itm_rerank"}


def test_search_rerank_orders_by_itm(itm_model, image_folder):
    index = clipkit.Index.from_folder(image_folder, model=itm_model)
    hits = clipkit.search("a red circle", index, k=5, rerank=True, rerank_k=8)
    itc = clipkit.search("a red circle", index, k=8)
    expected = sorted(((itm_score(itm_model, "a red circle",
                                  itm_model.preprocess(load_image(Path(h.path), itm_model.image_size))), h.id)
                       for h in itc), reverse=True)[:5]
    assert [h.id for h in hits] == [i for _, i in expected]
    assert all(h.score == pytest.approx(s, abs=1e-4) for h, (s, _) in zip(hits, expected))
    assert all("itc_score" in h.metadata for h in hits)


def test_image_query_reranks_captions(itm_model):
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    index = clipkit.Index.from_embeddings(clipkit.encode(captions, model=itm_model), ids=captions,
                                          metadata=[{"caption": c} for c in captions], model=itm_model)
    image = draw_shape("red", "circle", (32, 32))
    hits = clipkit.search(image, index, k=4, rerank=True)
    pixels = itm_model.preprocess(image)
    assert [h.id for h in hits] == sorted(captions, key=lambda c: -itm_score(itm_model, c, pixels))


def test_rerank_errors(itm_model, tiny_model, image_folder):
    index = clipkit.Index.from_folder(image_folder, model=tiny_model)
    with pytest.raises(ValueError, match="has no ITM head"):
        clipkit.search("a red circle", index, rerank=True)
    with pytest.raises(ValueError, match="has no ITM head"):
        evaluate(tiny_model, synthetic_set(5, size=32), rerank=True)
    images = clipkit.Index.from_folder(image_folder, model=itm_model)
    with pytest.raises(ValueError, match="image-to-image search cannot be re-ranked"):
        clipkit.search(next(image_folder.glob("*.png")), images, rerank=True)
    with pytest.raises(ValueError, match="vector query"):
        clipkit.search(images.embeddings(images.ids()[:1])[0], images, rerank=True)


def test_eval_command_on_a_fake_karpathy_set(tmp_path, itm_model, capsys):
    (tmp_path / "images").mkdir()
    entries = []
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        draw_shape(colour, shape, (40, 40)).save(tmp_path / "images" / f"{i}.jpg")
        entries.append({"filename": f"{i}.jpg", "split": "test",
                        "sentences": [{"raw": f"a {colour} {shape}"}, {"raw": f"{shape}, {colour}"}]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    out = tmp_path / "result.json"
    assert main(["eval", "--dataset", "flickr30k", "--root", str(tmp_path / "images"), "--captions",
                 str(tmp_path / "dataset_flickr30k.json"), "--model", "clipkit-tiny", "--pretrained",
                 itm_model.pretrained, "--rerank", "--rerank-k", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| text→image | ITC + ITM (top 2) |" in table and "seconds:" in table
    report = json.loads(out.read_text())
    assert report["n_images"] == 3 and report["n_texts"] == 6 and report["dataset"] == "flickr30k"
    assert set(report["itc"]) == {"t2i", "i2t"} and set(report["rerank"]["t2i"]) == {"R@1", "R@5", "R@10"}
    assert main(["eval", "--dataset", "coco"]) == 2
    assert "needs --root" in capsys.readouterr().err


def test_eval_on_shards(tmp_path, capsys):
    from clipkit.data.synthetic import write_synthetic

    write_synthetic(tmp_path, 30, split="test", size=32, maxcount=10)
    assert main(["eval", "--dataset", "wds", "--root", str(tmp_path / "test-{000000..000002}.tar"),
                 "--model", "clipkit-tiny"]) == 0
    assert "30 images" in capsys.readouterr().out


def test_itm_head_projects_each_image_once_and_equals_multihead_attention():
    """The head's cross-attention (keys/values projected per distinct image, gathered per pair) against
    torch's nn.MultiheadAttention run on every pair's own copy of its image."""
    from clipkit.itm import ITMHead, match_scores

    torch.manual_seed(0)
    head = ITMHead(24, 40, width=32, layers=2, heads=4).eval()
    text = torch.randn(9, 7, 24)
    padding = torch.zeros(9, 7, dtype=torch.bool)
    padding[:, 5:] = True
    padding[2, 3:] = True
    images = torch.randn(3, 6, 40)
    index = torch.tensor([0, 2, 2, 1, 0, 0, 1, 2, 1])

    def reference(text, padding, image):
        t, im = head.text_in(text), head.image_in(image)
        for layer in head.layers:
            x = layer.norm_self(t)
            t = t + layer.self_attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]
            x = layer.norm_cross(t)
            t = t + layer.cross_attn(x, im, im, need_weights=False)[0]
            t = t + layer.mlp(layer.norm_mlp(t))
        return head.classifier(head.norm(t[:, 0]))

    with torch.no_grad():
        expected = reference(text, padding, images[index])
        torch.testing.assert_close(head(text, padding, images, image_index=index), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head(text, padding, images[index]), expected, atol=1e-5, rtol=1e-5)
    scores = match_scores(head, text, padding, images, index, batch_size=4)
    torch.testing.assert_close(scores, expected[:, 1] - expected[:, 0], atol=1e-5, rtol=1e-5)


def test_itm_pairs_benchmark_matches_pair_by_pair_reference(itm_model):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from itm_pairs import pair_table

    from clipkit.data.synthetic import scenes

    n = 30
    result = pair_table(itm_model, n, seed=3)
    data = synthetic_set(n, seed=3, size=itm_model.image_size)
    specs = scenes(n, seed=3, split="test")
    sim = clipkit.encode(data.captions, model=itm_model) @ clipkit.encode(data.images, model=itm_model).T
    pixels = [itm_model.preprocess(im) for im in data.images]
    expected: dict = {}
    for t, i in enumerate(data.text_to_image):
        for j in range(n):
            if j != i and specs[j].group_id == specs[i].group_id:
                kind = specs[j].kind if specs[j].kind != "original" else specs[i].kind
                n_, itc, itm, ties = expected.get(kind, (0, 0, 0, 0))
                margin = itm_score(itm_model, data.captions[t], pixels[i]) - itm_score(itm_model, data.captions[t],
                                                                                       pixels[j])
                # batched and one-by-one scores differ in the last bits: a near-tie may go either way
                expected[kind] = (n_ + 1, itc + (sim[t, i] > sim[t, j]), itm + (margin > 0), ties + (abs(margin) < 1e-5))
    assert expected, "the test split should hold distractor groups"
    assert set(result["pairs"]) == set(expected)
    for kind, (count, itc, itm, ties) in expected.items():
        assert result["pairs"][kind]["n"] == count
        assert result["pairs"][kind]["itc"] == pytest.approx(itc / count)
        assert abs(result["pairs"][kind]["itm"] - itm / count) <= ties / count + 1e-9
    top = sim.argmax(axis=1)
    assert result["itc_top1"]["right"] == pytest.approx(float(np.mean(top == data.text_to_image)))
    assert sum(result["itc_top1"].values()) == pytest.approx(1.0)


def test_rerank_probe_scores_as_evaluation_does_and_trains(itm_model, tmp_path):
    import math
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from rerank_probe import build_scorer, cache_gallery, main as probe

    from clipkit.itm import match_scores, text_states

    common = ["--model", "clipkit-tiny", "--pretrained", str(itm_model.pretrained), "--galleries", "1",
              "--images", "30", "--k", "10", "--captions", "4", "--weight", "0.5"]
    report = probe(common + ["--steps", "3", "--eval-every", "3", "--json", str(tmp_path / "probe.json")])
    assert json.loads((tmp_path / "probe.json").read_text()) == report
    data = synthetic_set(30, seed=0, size=itm_model.image_size)
    reference = evaluate(itm_model, data, rerank=True, rerank_k=10, weight=0.5)
    before, after = report["history"]
    # before training the scorer is the model's own head: the same re-ranking as `clipkit eval`
    assert before["itc"]["R@1"] == pytest.approx(reference.itc["t2i_R@1"])
    assert before["itc"]["R@10"] == pytest.approx(reference.itc["t2i_R@10"])
    assert before["blend"]["R@10"] == pytest.approx(reference.rerank["t2i_R@10"])
    # and its scores are the ITM log-odds that evaluation re-ranks by, caption by caption
    gallery = cache_gallery(itm_model, 30, 0, "test", 10, pixels=False)
    scorer = build_scorer(itm_model, "itm", "model", pixel_stem=False, weight=0.5).eval()
    captions = torch.arange(len(data.captions))
    with torch.no_grad():
        score, cosine = scorer(gallery, captions, gallery.top)
    texts, padding = text_states(itm_model, data.captions)
    rows = captions.repeat_interleave(10)
    expected = match_scores(itm_model.itm, texts[rows], padding[rows], gallery.patches, gallery.top.reshape(-1))
    torch.testing.assert_close(score.reshape(-1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cosine, torch.gather(torch.from_numpy(
        clipkit.encode(data.captions, model=itm_model) @ clipkit.encode(data.images, model=itm_model).T), 1, gallery.top),
        atol=1e-5, rtol=1e-5)
    assert after["step"] == 3 and math.isfinite(after["loss"]) and after["weight"] != 0.5
    assert after["itc"] == before["itc"]  # the towers stay frozen
    other = probe(common + ["--steps", "2", "--scorer", "late", "--pixel-stem", "--random", "3"])
    assert math.isfinite(other["history"][-1]["loss"])
