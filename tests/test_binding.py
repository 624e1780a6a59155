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
    owners = batch["negative_owners"].tolist()  # each negative's own sample, in order
    assert len(owners) == len(batch["negative_tokens"]) and owners == sorted(set(owners)) and max(owners) < 16
    run = TrainConfig(data=str(tmp_path / "shards" / "train-{000000..000001}.tar"), out=str(tmp_path / "run"),
                      steps=3, batch_size=16, warmup=1, workers=0, val=None, log_every=1, ckpt_every=3, itm=False,
                      hard_negatives=True, device="cpu")
    train(run)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 3 and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_relation_targets_name_the_left_or_upper_object():
    from clipkit.data.synthetic import COLOURS, RELATION_TARGETS, SHAPES, relation_targets, scenes, swapped

    colours, shapes = list(COLOURS), list(SHAPES)
    seen = set()
    for scene in scenes(300, seed=2, split="train"):
        meta = {"scene": scene.to_json()}
        targets = relation_targets(meta)
        if scene.relation is None:
            assert targets is None
            continue
        axis, c1, s1, c2, s2 = targets
        a, b = scene.objects[:2]
        # by hand: the first object is the one with the smaller x (across) or smaller y (up-down; y grows down)
        first, second = (a, b) if (a.x < b.x if axis == 0 else a.y < b.y) else (b, a)
        assert axis == (scene.relation in ("above", "below"))
        assert (colours[c1], shapes[s1], colours[c2], shapes[s2]) == (first.colour, first.shape, second.colour,
                                                                      second.shape)
        assert all(0 <= t < n for t, n in zip(targets, RELATION_TARGETS))
        twin = relation_targets({"scene": swapped(scene, "relation_swap").to_json()})
        assert twin == [axis, c2, s2, c1, s1]  # places exchanged: the same objects in the other order
        seen.add(scene.relation)
    assert seen == {"left", "right", "above", "below"}
    assert relation_targets({}) is None and relation_targets({"scene": {"relation": "left", "objects": []}}) is None


def test_relation_loss_by_hand():
    import torch
    import torch.nn.functional as F

    from clipkit.losses import relation_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g)
    targets = torch.tensor([[1, 0], [0, 2], [-100, -100], [1, -100]])
    expected = (F.cross_entropy(logits[[0, 1, 3], :2], torch.tensor([1, 0, 1]))
                + F.cross_entropy(logits[[0, 1], 2:], torch.tensor([0, 2]))) / 2
    assert torch.allclose(relation_loss(logits, targets, (2, 3)), expected)
    empty = relation_loss(logits.requires_grad_(), torch.full((4, 2), -100), (2, 3))
    assert empty.item() == 0.0 and torch.isfinite(empty)
    empty.backward()  # no labels in a batch: a zero loss that still backpropagates
    with pytest.raises(ValueError, match="target fields"):
        relation_loss(logits, targets[:, :1], (2, 3))


def test_training_reads_relations_from_both_towers(tmp_path):
    import torch

    from clipkit.data.loader import make_loader
    from clipkit.data.synthetic import relation_targets, scenes, write_synthetic
    from clipkit.train import TrainConfig, train

    write_synthetic(tmp_path / "shards", 64, seed=1, maxcount=32, size=32, workers=1, progress=False)
    urls = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    model = clipkit.load_model("clipkit-tiny", device="cpu")
    batch = next(iter(make_loader(urls, model.preprocess, model.tokenizer, 16, relations=True)))
    by_id = {s.image_id: relation_targets({"scene": s.to_json()}) for s in scenes(64, seed=1)}
    expected = [by_id[int(i)] or [-100] * 5 for i in batch["image_ids"]]
    assert batch["relation_targets"].tolist() == expected and any(t[0] == -100 for t in expected) \
        and any(t[0] >= 0 for t in expected)
    config = dict(data=urls, out=str(tmp_path / "run"), steps=4, batch_size=16, warmup=1, workers=0, val=None,
                  log_every=1, ckpt_every=2, itm=False, relation_weight=2.0, device="cpu")
    train(TrainConfig(**config, stop_after=2))
    train(TrainConfig(**config, resume="latest"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 < r["relation"] < 3 for r in rows)
    assert all(r["loss"] == pytest.approx(r["itc"] + 2.0 * r["relation"], rel=1e-5) for r in rows)
    state = torch.load(tmp_path / "run" / "ckpt-0000004.pt", weights_only=True)
    assert state["relation_head"]["weight"].shape == (sum((2, 10, 8, 10, 8)), model.dim)
    with pytest.raises(ValueError, match="relation_weight"):
        TrainConfig(data=urls, out="x", relation_weight=-1).validate()


def test_hard_negatives_count_only_in_their_own_rows_by_hand():
    import torch
    import torch.nn.functional as F

    from clipkit.losses import info_nce, sigmoid_loss

    g = torch.Generator().manual_seed(1)
    image, text, extra = (F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (3, 3, 2))
    owners = torch.tensor([2, 0])  # extra 0 was written for image 2, extra 1 for image 0
    loss = info_nce(image, text, 10.0, extra_texts=extra, extra_owners=owners)
    by_image = []
    for row in range(3):
        columns = torch.cat([text, extra[owners == row]])
        by_image.append(-F.log_softmax(10.0 * image[row] @ columns.T, dim=0)[row])
    by_text = -F.log_softmax(10.0 * text @ image.T, dim=1)[torch.arange(3), torch.arange(3)].mean()
    assert torch.allclose(loss, (torch.stack(by_image).mean() + by_text) / 2, atol=1e-6)
    assert not torch.allclose(loss, info_nce(image, text, 10.0, extra_texts=extra))
    # sigmoid: each extra caption is one more (image, caption) non-match, for its owner only
    logits = 10.0 * image @ torch.cat([text, extra]).T - 5.0
    labels = -torch.ones(3, 5)
    labels[torch.arange(3), torch.arange(3)] = 1
    counted = torch.ones(3, 5, dtype=torch.bool)
    counted[:, 3:] = torch.arange(3)[:, None] == owners[None, :]
    expected = -(F.logsigmoid(labels * logits) * counted).sum() / 3
    assert torch.allclose(sigmoid_loss(image, text, 10.0, -5.0, extra_texts=extra, extra_owners=owners), expected)
