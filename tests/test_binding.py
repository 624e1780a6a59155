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
