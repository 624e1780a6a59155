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
                      workers=0, val=None, itm_width=32, itm_layers=1, itm_heads=2, ckpt_every=2, device="cpu"))
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
                                  itm_model.preprocess(load_image(Path(h.path)))), h.id)
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
    assert set(report["itc"]) == {"t2i", "i2t"}
    assert set(report["rerank"]["t2i"]) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
    assert "| R@1 | R@5 | R@10 | mean rank | median rank |" in table
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
