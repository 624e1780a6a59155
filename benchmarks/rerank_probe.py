"""Try a re-ranking head quickly: train it on a frozen model's ITC-mined candidates, report re-ranked R@1.

    python benchmarks/rerank_probe.py [--model clipkit-demo] [--galleries 30] [--steps 1500]
        [--scorer itm|late] [--init model|fresh] [--pixel-stem] [--weight 25] [--random 0] [--json OUT]

Re-ranking (issue 6) only ever sees ITC's top K images for a caption, so that is what the head is
trained on here. The towers stay frozen. Each gallery is 1,000 synthetic training-split images (seeds
1..N; the test gallery is seed 0 of the test split, as in `retrieval.py`). For every gallery the probe
caches the ITC embeddings, the head's inputs (text token states, patch tokens, and pixels for
--pixel-stem), and each caption's top K images by ITC. A step takes --captions captions of one
gallery, with their K candidates (the caption's own image replaces the last one when ITC missed it;
--random of them are replaced by random images, easy negatives). The loss is a softmax over
candidates of score + w x cosine, where score is the scorer's match log-odds and w is learned
(starting at --weight). This is the re-ranking objective itself.

Scorers: `itm`, the ITM fusion head (`--init model` starts from the model's own head), and `late`,
late interaction (each text token's best cosine over the image tokens, averaged over tokens, as in
FILIP). `--pixel-stem` appends a small conv net's tokens (stride 8) over the pixels to the patch
tokens. Reported on the test gallery, every --eval-every steps: t2i R@1 and R@10 of ITC alone, of the
scorer alone, and of the blend.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipkit import rerank_train
from clipkit.data.captions import synthetic_set
from clipkit.itm import ITMHead, PixelStem, encode_image_tokens, require_itm, tower_widths
from clipkit.models import load_model


@dataclass
class Gallery:
    image_emb: torch.Tensor  # (images, dim) unit norm
    patches: torch.Tensor  # (images, tokens, width) the ITM head's image input
    pixels: torch.Tensor  # (images, 3, H, W) preprocessed, or empty
    text_emb: torch.Tensor  # (captions, dim) unit norm
    texts: torch.Tensor  # (captions, length, width) token states
    padding: torch.Tensor  # (captions, length) True at padding
    text_to_image: torch.Tensor  # (captions,)
    top: torch.Tensor  # (captions, k) images by ITC, best first


@torch.inference_mode()
def cache_gallery(model, n_images: int, seed: int, split: str, k: int, pixels: bool) -> Gallery:
    g = rerank_train.cache_gallery(model, synthetic_set(n_images, seed=seed, split=split, size=model.image_size), k)
    # the towers' patch tokens, whatever head the model ships (a late-interaction head reads its own stem)
    patches = torch.cat([encode_image_tokens(model.clip, g.pixels[s:s + 256].to(model.device))[1].cpu()
                         for s in range(0, len(g.pixels), 256)])
    return Gallery(g.image_emb, patches, g.pixels if pixels else torch.empty(0), g.text_emb, g.texts, g.padding,
                   g.text_to_image, g.top)


class LateInteraction(nn.Module):
    """Match log-odds = scale x mean over text tokens (not the first) of the best cosine over image tokens."""

    def __init__(self, text_width: int, image_width: int, width: int = 128):
        super().__init__()
        self.text = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width))
        self.image = nn.Sequential(nn.LayerNorm(image_width), nn.Linear(image_width, width))
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, text, padding, image, image_index):
        text = F.normalize(self.text(text), dim=-1)
        image = F.normalize(self.image(image), dim=-1)[image_index]
        best = torch.einsum("rld,rpd->rlp", text, image).amax(dim=-1)
        keep = (~padding).float()
        keep[:, 0] = 0
        score = self.scale * (best * keep).sum(1) / keep.sum(1).clamp_min(1)
        return torch.stack([torch.zeros_like(score), score], dim=1)


class Scorer(nn.Module):
    def __init__(self, head: nn.Module, stem: nn.Module | None, weight: float):
        super().__init__()
        self.head, self.stem = head, stem
        self.weight = nn.Parameter(torch.tensor(float(weight)))

    def forward(self, g: Gallery, captions: torch.Tensor, candidates: torch.Tensor):
        """(scorer log-odds, cosine), each (captions, k)."""
        rows, k = candidates.shape
        used, local = torch.unique(candidates.reshape(-1), return_inverse=True)
        image = g.patches[used].float()
        if self.stem is not None:
            image = torch.cat([image, self.stem(g.pixels[used].float())], dim=1)
        texts = g.texts[captions].float().repeat_interleave(k, 0)
        padding = g.padding[captions].repeat_interleave(k, 0)
        logits = self.head(texts, padding, image, image_index=local).float()
        cosine = (g.text_emb[captions, None, :] * g.image_emb[candidates]).sum(-1)
        return (logits[:, 1] - logits[:, 0]).view(rows, k), cosine


def candidates_for(g: Gallery, captions: torch.Tensor, k: int, random: int = 0, generator=None):
    """(candidate images (captions, k), index of the caption's own image among them)."""
    candidates = g.top[captions, :k].clone()
    if random:
        candidates[:, k - random:] = torch.randint(len(g.image_emb), (len(captions), random), generator=generator)
    own = g.text_to_image[captions]
    missing = ~(candidates == own[:, None]).any(dim=1)
    candidates[missing, -1] = own[missing]
    return candidates, (candidates == own[:, None]).float().argmax(dim=1)


@torch.no_grad()
def rerank_recall(scorer: Scorer, g: Gallery, batch: int = 64) -> dict:
    """t2i R@1/R@10 after re-ranking ITC's top k by score + w x cosine; also ITC alone and the scorer alone."""
    scorer.eval()
    hits = {"itc": [], "scorer": [], "blend": []}
    for start in range(0, len(g.text_to_image), batch):
        captions = torch.arange(start, min(start + batch, len(g.text_to_image)))
        candidates = g.top[captions]
        own = g.text_to_image[captions]
        score, cosine = scorer(g, captions, candidates)
        for name, values in (("itc", cosine), ("scorer", score), ("blend", score + scorer.weight * cosine)):
            ranked = candidates.gather(1, values.argsort(dim=1, descending=True, stable=True))
            hits[name].append(ranked == own[:, None])
    scorer.train()
    out = {}
    for name, rows in hits.items():
        rows = torch.cat(rows)
        out[name] = {f"R@{k}": float(rows[:, :k].any(dim=1).float().mean()) for k in (1, 10)}
    return out


def build_scorer(model, scorer: str, init: str, pixel_stem: bool, weight: float) -> Scorer:
    text_width, image_width = tower_widths(model.clip)
    if scorer == "late":
        head = LateInteraction(text_width, image_width)
    elif init == "model":
        head = copy.deepcopy(require_itm(model)).float()
        if not isinstance(head, ITMHead):
            raise ValueError(f"--init model needs a fusion ITM head; model {model.name!r} has a "
                             f"{type(head).__name__} (use --init fresh)")
    else:
        config = model.itm.config if model.itm is not None else {}
        head = ITMHead(text_width, image_width, **{k: config[k] for k in ("width", "layers", "heads") if k in config})
    stem = PixelStem(model.image_size, image_width) if pixel_stem else None
    return Scorer(head.train(), stem, weight)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipkit-demo")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--galleries", type=int, default=30, help="training galleries (synthetic train seeds 1..N)")
    parser.add_argument("--images", type=int, default=1000, help="images per gallery")
    parser.add_argument("--k", type=int, default=16, help="ITC candidates per caption")
    parser.add_argument("--scorer", choices=("itm", "late"), default="itm")
    parser.add_argument("--init", choices=("model", "fresh"), default="model", help="itm: the model's head or new")
    parser.add_argument("--pixel-stem", action="store_true")
    parser.add_argument("--weight", type=float, default=25.0, help="initial w in score + w x cosine")
    parser.add_argument("--random", type=int, default=0, help="candidates per caption replaced by random images")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--captions", type=int, default=16, help="captions per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(args.model, args.pretrained, device="cpu")
    start = time.perf_counter()
    test = cache_gallery(model, args.images, 0, "test", args.k, args.pixel_stem)
    train = [cache_gallery(model, args.images, seed, "train", args.k, args.pixel_stem)
             for seed in range(1, args.galleries + 1)]
    cache_seconds = time.perf_counter() - start
    scorer = build_scorer(model, args.scorer, args.init, args.pixel_stem, args.weight)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    history = [{"step": 0, "loss": None, "weight": args.weight, **rerank_recall(scorer, test)}]
    print("| step | loss | w | ITC R@1 | scorer R@1 | blend R@1 | blend R@10 |\n|---|---|---|---|---|---|---|")
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        g = train[int(torch.randint(len(train), (1,), generator=generator))]
        captions = torch.randint(len(g.text_to_image), (args.captions,), generator=generator)
        candidates, target = candidates_for(g, captions, args.k, args.random, generator)
        score, cosine = scorer(g, captions, candidates)
        loss = F.cross_entropy(score + scorer.weight * cosine, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            history.append({"step": step, "loss": sum(losses) / len(losses), "weight": scorer.weight.item(),
                            **rerank_recall(scorer, test)})
            losses = []
    for row in history:
        loss = "–" if row["loss"] is None else f"{row['loss']:.3f}"
        print(f"| {row['step']} | {loss} | {row['weight']:.1f} | {row['itc']['R@1']:.3f} | {row['scorer']['R@1']:.3f} "
              f"| {row['blend']['R@1']:.3f} | {row['blend']['R@10']:.3f} |")
    report = {"model": args.model, "args": vars(args), "cache_seconds": round(cache_seconds, 1),
              "train_seconds": round(time.perf_counter() - start, 1), "history": history}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
