"""Winoground-style binding: the synthetic (scene, swapped twin) pairs and the text / image / group scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

import clipkit
from clipkit.cli import main
from clipkit.data.synthetic import binding_pairs
from clipkit.evaluate import _winoground, binding


def test_winoground_scores_by_hand():
    # (i0 c0, i0 c1, i1 c0, i1 c1)
    scores = np.array([[0.9, 0.1, 0.2, 0.8],   # both right: text, image, group
                       [0.9, 0.1, 0.95, 0.99],  # images prefer their captions; caption 0 prefers image 1
                       [0.5, 0.6, 0.4, 0.3],   # image 0 prefers caption 1: not text; caption 1 prefers image 0
                       [0.5, 0.5, 0.5, 0.5]])  # ties count against
    wins = _winoground(scores)
    assert wins["text"].tolist() == [True, True, False, False]
    assert wins["image"].tolist() == [True, False, False, False]
    assert wins["group"].tolist() == [True, False, False, False]


def test_pairs_are_twins_with_captions_true_of_one_only():
    pairs = binding_pairs(40, seed=3, split="test", size=32)
    assert len(pairs) == 40 and {p.kind for p in pairs} <= {"colour_swap", "shape_swap", "size_swap",
                                                            "relation_swap"}
    for pair in pairs:
        assert pair.captions[0] != pair.captions[1]
        assert pair.images[0].size == (32, 32) and pair.images[0].tobytes() != pair.images[1].tobytes()
        if pair.kind == "size_swap":
            assert all({"small", "large"} & set(c.split()) for c in pair.captions)
    assert [p.captions for p in binding_pairs(5, seed=3)] == [p.captions for p in pairs[:5]]


def test_binding_report_against_the_model_scores():
    model = clipkit.load_model("clipkit-demo", device="cpu")
    pairs = binding_pairs(30, seed=11)
    report = binding(model, pairs, rerank=True)
    images = clipkit.encode([i for p in pairs for i in p.images], model=model)
    texts = clipkit.encode([c for p in pairs for c in p.captions], model=model)
    cosine = images.reshape(-1, 2, 1, images.shape[1]) * texts.reshape(-1, 1, 2, texts.shape[1])
    itc = cosine.sum(-1).reshape(-1, 4)
    expected = {name: float(won.mean()) for name, won in _winoground(itc).items()}
    assert report["itc"] == pytest.approx(expected)
    reranked = clipkit.score_pairs([i for p in pairs for i in (p.images[0], p.images[0], p.images[1], p.images[1])],
                                   [c for p in pairs for c in (p.captions[0], p.captions[1]) * 2], model=model)
    assert report["rerank"] == pytest.approx({n: float(w.mean()) for n, w in _winoground(reranked.reshape(-1, 4))
                                              .items()})
    assert sum(report["itc_by_kind"][k]["group"] * sum(p.kind == k for p in pairs)
               for k in report["itc_by_kind"]) == pytest.approx(report["itc"]["group"] * len(pairs))


def test_eval_binding_option(tmp_path, capsys):
    assert main(["eval", "--n-images", "30", "--binding", "20", "--seed", "4", "--json",
                 str(tmp_path / "r.json")]) == 0
    assert "binding (Winoground-style, 20 pairs" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["binding"]["itc"]) == {"text", "image", "group"} and "rerank" not in report["binding"]


def test_scenes_carry_hard_negative_captions_false_of_them():
    import random

    from clipkit.data.synthetic import caption_variants, scenes

    checked = 0
    for scene in scenes(200, seed=5, split="train"):
        if len(scene.objects) < 2:
            assert scene.negatives == []
            continue
        assert scene.negatives, scene
        true_of_it = {c for n in range(60) for c in caption_variants(scene, random.Random(n))}
        for negative in scene.negatives:
            assert negative not in true_of_it and sorted(set(negative.split()) - {"a", "an"})
            checked += 1
    assert checked > 100


def test_info_nce_takes_extra_text_negatives_by_hand():
    import torch
    import torch.nn.functional as F

    from clipkit.losses import info_nce

    g = torch.Generator().manual_seed(0)
    image, text, extra = (F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (3, 3, 2))
    loss = info_nce(image, text, 10.0, extra_texts=extra)
    logits = 10.0 * image @ torch.cat([text, extra]).T
    by_image = -F.log_softmax(logits, dim=1)[torch.arange(3), torch.arange(3)].mean()
    by_text = -F.log_softmax(10.0 * text @ image.T, dim=1)[torch.arange(3), torch.arange(3)].mean()
    assert torch.allclose(loss, (by_image + by_text) / 2, atol=1e-6)
    assert loss > info_nce(image, text, 10.0)  # more negatives, a larger loss


def test_training_batches_hold_the_hard_negatives(tmp_path):
    from clipkit.data.loader import make_loader
    from clipkit.data.synthetic import write_synthetic
    from clipkit.train import TrainConfig, train

    write_synthetic(tmp_path / "shards", 64, seed=1, maxcount=32, size=32, workers=1, progress=False)
    model = clipkit.load_model("clipkit-tiny", device="cpu")
    loader = make_loader(str(tmp_path / "shards" / "train-{000000..000001}.tar"), model.preprocess, model.tokenizer,
                         16, hard_negatives=True)
    batch = next(iter(loader))
    assert batch["negative_tokens"] is not None and 0 < len(batch["negative_tokens"]) <= 16
    run = TrainConfig(data=str(tmp_path / "shards" / "train-{000000..000001}.tar"), out=str(tmp_path / "run"),
                      steps=3, batch_size=16, warmup=1, workers=0, val=None, log_every=1, ckpt_every=3, itm=False,
                      hard_negatives=True, device="cpu")
    train(run)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 3 and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
