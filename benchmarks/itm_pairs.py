"""Where ITM re-ranking can win on the synthetic set: within-group pair accuracy per swap kind, ITC vs ITM,
and where ITC's text->image top-1 errors go.

    python benchmarks/itm_pairs.py [--model clipkit-demo] [--pretrained FILE] [--images 1000] [--json OUT]

A synthetic scene's distractors are the same scene with two objects' colours, shapes, sizes or places
swapped. For each caption and each distractor in its group, a pair is won when the caption's own image
scores higher than the distractor (chance: 0.5), by ITC cosine and by the ITM head's match log-odds.
An ITM head that binds attributes to objects wins far more of these than ITC does. The second table splits
ITC's top-1 over the gallery: right, a distractor from the caption's own group, or another group's image
(a partial match that is not a binding error).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import clipkit
from clipkit.data.captions import synthetic_set
from clipkit.data.synthetic import scenes
from clipkit.evaluate import encode_gallery
from clipkit.itm import match_scores, require_itm, text_states
from clipkit.models import load_model


def pair_table(model, n_images: int = 1000, seed: int = 0) -> dict:
    """{"pairs": {kind: {"n", "itc", "itm"}}, "itc_top1": {"right", "own_group", "other_group"}} (fractions)."""
    head = require_itm(model)
    data = synthetic_set(n_images, seed=seed, split="test", size=model.image_size)
    kinds = [scene.kind for scene in scenes(n_images, seed=seed, split="test")]
    groups = np.asarray(data.group_ids)
    image_emb, patches = encode_gallery(model, data.images, 256, states=True)
    similarity = clipkit.encode(data.captions, model=model) @ image_emb.T
    texts, padding = text_states(model, data.captions)

    rows, own, other, pair_kinds = [], [], [], []
    for t, i in enumerate(data.text_to_image):
        for j in np.flatnonzero(groups == groups[i]):
            if j != i:
                rows.append(t)
                own.append(i)
                other.append(j)
                pair_kinds.append(kinds[j] if kinds[j] != "original" else kinds[i])
    rows, own, other = (np.asarray(v, dtype=np.int64) for v in (rows, own, other))
    itc_won = similarity[rows, own] > similarity[rows, other]
    pair_texts, pair_padding = texts[torch.from_numpy(rows)], padding[torch.from_numpy(rows)]
    itm_won = (match_scores(head, pair_texts, pair_padding, patches, torch.from_numpy(own))
               > match_scores(head, pair_texts, pair_padding, patches, torch.from_numpy(other))).numpy()
    pairs: dict = defaultdict(lambda: {"n": 0, "itc": 0.0, "itm": 0.0})
    for kind, a, b in zip(pair_kinds, itc_won, itm_won):
        pairs[kind]["n"] += 1
        pairs[kind]["itc"] += float(a)
        pairs[kind]["itm"] += float(b)
    for entry in pairs.values():
        entry["itc"] /= entry["n"]
        entry["itm"] /= entry["n"]

    top = similarity.argmax(axis=1)
    truth = data.text_to_image
    right = top == truth
    own_group = ~right & (groups[top] == groups[truth])
    top1 = {"right": float(right.mean()), "own_group": float(own_group.mean()),
            "other_group": float((~right & ~own_group).mean())}
    return {"pairs": dict(sorted(pairs.items())), "itc_top1": top1, "n_images": len(data.images),
            "n_texts": len(data.captions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipkit-demo")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = load_model(args.model, args.pretrained, device="cpu")
    result = pair_table(model, args.images)
    print(f"synthetic test split: {result['n_images']} images, {result['n_texts']} captions, model {args.model}\n")
    print("| swap kind | pairs | ITC wins | ITM wins |\n|---|---|---|---|")
    for kind, entry in result["pairs"].items():
        print(f"| {kind} | {entry['n']} | {entry['itc']:.3f} | {entry['itm']:.3f} |")
    top1 = result["itc_top1"]
    print("\n| ITC text->image top-1 | share |\n|---|---|")
    for key, label in (("right", "the caption's image"), ("own_group", "a distractor of its group"),
                       ("other_group", "another group's image")):
        print(f"| {label} | {top1[key]:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, **result}, indent=2))


if __name__ == "__main__":
    main()
