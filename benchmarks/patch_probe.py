"""What a model's image tokens know per patch: probes for the colour and shape under each patch.

    python benchmarks/patch_probe.py [--model clipkit-demo] [--train 3000] [--test 600] [--json OUT]

On the synthetic set each patch is labelled with the object that covers it (from the drawn geometry).
Linear probes on the frozen final patch tokens report colour, shape and colour+shape accuracy on
held-out scenes; then two trainable self-attention layers over the frozen tokens report shape again.
The ITM head binds words to these tokens, so what they do not carry, re-ranking cannot use (issue 6).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from clipkit.data.synthetic import COLOURS, SHAPES, draw_object, render, scenes
from clipkit.itm import encode_image_tokens
from clipkit.models import load_model

COLOUR_NAMES, SHAPE_NAMES = sorted(COLOURS), sorted(SHAPES)


def patch_data(model, n: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens (n * grid * grid, width), label per patch: colour * n_shapes + shape, or -1)."""
    side, grid = model.image_size, model.clip.visual.grid_size[0]
    cell = side // grid
    specs = scenes(n, seed=seed, split=split)
    pixels = torch.stack([model.preprocess(render(s, side, noise_seed=i)) for i, s in enumerate(specs)])
    with torch.no_grad():
        tokens = torch.cat([encode_image_tokens(model.clip, pixels[i:i + 250])[1] for i in range(0, n, 250)])
    labels = np.full((len(specs), grid, grid), -1)
    for k, spec in enumerate(specs):
        for obj in spec.objects:  # objects drawn later cover earlier ones
            canvas = Image.new("L", (side, side), 0)
            draw_object(ImageDraw.Draw(canvas), obj, side, 255)
            cells = np.asarray(canvas).reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3)
            covered = cells.reshape(grid, grid, cell * cell).mean(-1) > 128
            labels[k][covered] = COLOUR_NAMES.index(obj.colour) * len(SHAPE_NAMES) + SHAPE_NAMES.index(obj.shape)
    return tokens.reshape(-1, tokens.shape[-1]), torch.from_numpy(labels.reshape(-1))


def linear_probe(train_x, train_y, test_x, test_y, classes: int) -> float:
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 1e-4 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def attention_probe(train_x, train_y, test_x, test_y, patches: int, steps: int = 600) -> float:
    """Shape per patch from two self-attention layers over a scene's frozen tokens."""
    torch.manual_seed(0)
    width = train_x.shape[1]
    layers = [nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True, norm_first=True)
              for _ in range(2)]
    net = nn.Sequential(nn.Linear(width, 128), *layers, nn.Linear(128, len(SHAPE_NAMES)))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
    scenes_x, scenes_y = train_x.reshape(-1, patches, width), train_y.reshape(-1, patches)
    for _ in range(steps):
        pick = torch.randint(len(scenes_x), (64,))
        out, labels = net(scenes_x[pick]), scenes_y[pick]
        mask = labels >= 0
        loss = F.cross_entropy(out[mask], labels[mask] % len(SHAPE_NAMES))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out, labels = net(test_x.reshape(-1, patches, width)), test_y.reshape(-1, patches)
    mask = labels >= 0
    return float((out[mask].argmax(-1) == labels[mask] % len(SHAPE_NAMES)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipkit-demo")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--train", type=int, default=3000, help="training scenes")
    parser.add_argument("--test", type=int, default=600, help="held-out scenes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = load_model(args.model, args.pretrained, device="cpu")
    train_x, train_y = patch_data(model, args.train, 1, "train")
    test_x, test_y = patch_data(model, args.test, 0, "test")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    on_train, on_test = train_y >= 0, test_y >= 0
    n_shapes = len(SHAPE_NAMES)
    results = {}
    for name, target, classes in (("colour", lambda y: y // n_shapes, len(COLOUR_NAMES)),
                                  ("shape", lambda y: y % n_shapes, n_shapes),
                                  ("colour+shape", lambda y: y, len(COLOUR_NAMES) * n_shapes)):
        results[name] = linear_probe(train_x[on_train], target(train_y[on_train]), test_x[on_test],
                                     target(test_y[on_test]), classes)
    patches = model.clip.visual.grid_size[0] * model.clip.visual.grid_size[1]
    results["shape, 2 attention layers"] = attention_probe(train_x, train_y, test_x, test_y, patches)
    print(f"{args.model}: {int(on_train.sum())} training and {int(on_test.sum())} test patches covered by an object")
    print("| probe on frozen patch tokens | accuracy |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, **results}, handle, indent=2)


if __name__ == "__main__":
    main()
