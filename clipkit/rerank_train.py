"""Second training stage: fit an ITM head for re-ranking on a frozen model's ITC-mined candidates: a new
late-interaction head (`clipkit.itm.LateInteractionHead`, kind "late") or the model's own fusion head
(`clipkit.itm.ITMHead`, kind "fusion", fine-tuned from stage 1 with the same candidates as hard negatives).

The towers stay frozen, so ITC retrieval does not change. For each training gallery (a RetrievalSet)
the stage caches the ITC embeddings, the text tower's token states, the head's image input (the
preprocessed pixels, or the image tower's tokens for the fusion head), and each caption's top `k` images
by ITC. A step takes `captions` captions of one gallery; their candidates are the union of their top-k
lists, their own images and `random` random images of the gallery (a few hundred images); the loss is
cross-entropy of each caption's scores over all of them. So every step holds the hard negatives
re-ranking will face (images sharing the caption's words: ITC put them on top) and easy ones, and every
caption is scored against every candidate, which late interaction makes cheap. The fusion head scores
each pair with cross-attention, so there a caption is scored against its own top k only (its own image
put in where ITC missed it): the list re-ranking will give it. Beside that loss (`i2t_weight`), each of
the step's images is scored against its own top k captions by ITC, as image -> text re-ranking will: a head
trained only to tell images apart for a caption scores different captions on different scales. Last, the
cosine weight of the re-ranked score (score + w x cosine) is chosen for each direction by re-ranked R@1
over ITC's top k, on galleries the head did not train on where there are some (`held_out_galleries`).

Progress shows with tqdm; with `state_path` the stage saves its state every `save_every` steps and
continues from it when run again with the same settings.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipkit._progress import progress_bar
from clipkit._io import atomic_write_with
from clipkit.data.captions import RetrievalSet
from clipkit.encode import encode_gallery, encode_texts
from clipkit.itm import (ITMHead, LateInteractionHead, build_itm_head, encode_text_tokens, match_scores,
                         text_states)
from clipkit.train.schedule import cosine_schedule

log = logging.getLogger(__name__)

KINDS = ("late", "fusion")
WEIGHT_GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0, 512.0)
ITC_ALONE = math.inf  # as a weight: the cosine alone orders the candidates (R@1 without re-ranking)


@dataclass
class RerankConfig:
    kind: str = "late"  # "late": a new late-interaction head; "fusion": the model's own fusion head, fine-tuned
    steps: int = 2000
    captions: int = 16  # captions per step
    k: int = 16  # ITC candidates per caption, as re-ranking will see them
    random: int = 32  # random images of the gallery added per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    width: int = 128
    i2t_weight: float = 1.0  # weight of the image -> text loss beside the text -> image one (0: text -> image only)
    seed: int = 0
    save_every: int = 100

    def validate(self) -> None:
        for name in ("steps", "captions", "k", "width"):
            least = 0 if name == "steps" and self.kind == "fusion" else 1
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}" + (
                    " (0 steps: --kind fusion, which keeps the model's own head and fits its weights)"
                    if name == "steps" and self.steps == 0 else ""))
        for name, holds, rule in (("random", self.random >= 0, ">= 0"), ("i2t_weight", self.i2t_weight >= 0, ">= 0"),
                                  ("lr", self.lr > 0, "> 0")):
            if not holds:  # (NaN holds no rule)
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass
class CachedGallery:
    image_emb: torch.Tensor  # (images, dim) unit norm
    images: torch.Tensor  # the head's image input: (images, 3, H, W) pixels (late) or image tower tokens (fusion)
    text_emb: torch.Tensor  # (captions, dim) unit norm
    texts: torch.Tensor  # (captions, length, width) text tower token states
    padding: torch.Tensor  # (captions, length) True at padding
    text_to_image: torch.Tensor  # (captions,)
    top: torch.Tensor  # (captions, k) images by ITC, best first


@torch.inference_mode()
def cache_gallery(model, data: RetrievalSet, k: int, batch_size: int = 256, kind: str = "late") -> CachedGallery:
    image_emb, images = encode_gallery(model, data.images, batch_size, states="pixels" if kind == "late" else True)
    image_emb = torch.from_numpy(image_emb)
    text_emb = torch.from_numpy(encode_texts(data.captions, model, batch_size))
    texts, padding = text_states(model, data.captions, batch_size)
    length = int((~padding).sum(dim=1).max())
    top = (text_emb @ image_emb.T).topk(min(k, len(image_emb)), dim=1).indices
    return CachedGallery(image_emb, images.cpu(), text_emb, texts[:, :length].float().cpu(),
                         padding[:, :length].cpu(), torch.as_tensor(data.text_to_image, dtype=torch.long), top)


def split_set(data: RetrievalSet, size: int) -> list[RetrievalSet]:
    """`data` cut into galleries of `size` images (the last may be smaller), each with its own captions."""
    if size < 2:
        raise ValueError(f"a gallery needs at least 2 images, got size {size}")
    parts = []
    for start in range(0, len(data.images), size):
        stop = min(start + size, len(data.images))
        rows = [t for t, i in enumerate(data.text_to_image) if start <= i < stop]
        parts.append(RetrievalSet(name=f"{data.name}[{start}:{stop}]", images=data.images[start:stop],
                                  captions=[data.captions[t] for t in rows],
                                  text_to_image=data.text_to_image[rows] - start, meta=data.meta))
    return parts


def training_galleries(spec: str, gallery_size: int = 1000, image_size: int = 64,
                       split: str = "train") -> list[RetrievalSet]:
    """Galleries for the stage: 'synthetic:N' (`split`'s seeds 1, 2, ... of `gallery_size` images, none of
    them the test split's), a folder of captioned images or a caption table, or webdataset shard URLs
    (read in order, cut into galleries)."""
    from clipkit.data.captions import read_any_set, synthetic_set

    if spec.startswith("synthetic:"):
        try:
            n_images = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"expected synthetic:N (a number of images), got {spec!r}") from None
        if n_images < gallery_size:
            raise ValueError(f"{spec} holds fewer images than one gallery of {gallery_size}")
        return [synthetic_set(gallery_size, seed=seed, split=split, size=image_size)
                for seed in range(1, n_images // gallery_size + 1)]
    return split_set(read_any_set(spec, name="train"), gallery_size)


def held_out_galleries(spec: str, galleries: list[RetrievalSet], gallery_size: int = 1000,
                       image_size: int = 64) -> tuple[list[RetrievalSet], list[RetrievalSet]]:
    """(the galleries to train on, the galleries to fit the cosine weights on, which the head never sees):
    for 'synthetic:N', all N images and up to 4 galleries of the validation split; for a user's data of two
    galleries or more of at least half `gallery_size`, all but the last of them, and that one; else all and
    none (the weights are then fitted on training galleries)."""
    if spec.startswith("synthetic:"):
        return galleries, training_galleries(f"synthetic:{min(4, len(galleries)) * gallery_size}", gallery_size,
                                             image_size, split="val")
    sizable = [n for n, gallery in enumerate(galleries) if 2 * len(gallery.images) >= gallery_size]
    if len(sizable) < 2:
        return galleries, []
    return [g for n, g in enumerate(galleries) if n != sizable[-1]], [galleries[sizable[-1]]]


def step_loss(head: torch.nn.Module, g: CachedGallery, captions: torch.Tensor, random: int,
              generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy of each caption's scores over the step's candidates: for the late-interaction head,
    every caption against the union of their top-k, own and random images; for the fusion head, each caption
    against its own top k (its own image in place of the last when ITC missed it)."""
    own = g.text_to_image[captions]
    if isinstance(head, LateInteractionHead):
        extra = torch.randint(len(g.images), (random,), generator=generator)
        candidates = torch.unique(torch.cat([g.top[captions].reshape(-1), own, extra]))
        target = (candidates[None, :] == own[:, None]).float().argmax(dim=1)
        scores = head.score_matrix(g.texts[captions], g.padding[captions], head.image_input(g.images[candidates]))
        return F.cross_entropy(scores, target)
    candidates = g.top[captions].clone()
    missed = ~(candidates == own[:, None]).any(dim=1)
    candidates[missed, -1] = own[missed]
    target = (candidates == own[:, None]).float().argmax(dim=1)
    rows, k = candidates.shape
    used, local = torch.unique(candidates.reshape(-1), return_inverse=True)
    logits = head(g.texts[captions].repeat_interleave(k, 0), g.padding[captions].repeat_interleave(k, 0),
                  g.images[used].float(), image_index=local).float()
    return F.cross_entropy((logits[:, 1] - logits[:, 0]).view(rows, k), target)


def i2t_loss(head: torch.nn.Module, g: CachedGallery, images: torch.Tensor, k: int) -> torch.Tensor:
    """Image -> text re-ranking's loss: each image's scores over its top k captions by ITC (one of its own put
    in last where ITC missed them all), minus the log of the softmax mass on its own captions (an image has
    several). Without it a head learns to tell images apart for a caption, not captions apart for an image:
    its scores for different captions are on different scales."""
    k = min(k, len(g.text_to_image))
    candidates = (g.image_emb[images] @ g.text_emb.T).topk(k, dim=1).indices
    missed = ~(g.text_to_image[candidates] == images[:, None]).any(dim=1)
    if missed.any():
        order = torch.argsort(g.text_to_image, stable=True)
        candidates[missed, -1] = order[torch.searchsorted(g.text_to_image[order], images[missed])]
    own = g.text_to_image[candidates] == images[:, None]
    pictures = g.images[images]
    pictures = head.image_input(pictures) if isinstance(head, LateInteractionHead) else pictures.float()
    flat = candidates.reshape(-1)
    logits = head(g.texts[flat], g.padding[flat], pictures,
                  image_index=torch.arange(len(images)).repeat_interleave(k)).float()
    scores = (logits[:, 1] - logits[:, 0]).view(len(images), k)
    return (torch.logsumexp(scores, dim=1) - torch.logsumexp(scores.masked_fill(~own, float("-inf")), dim=1)).mean()


def head_images(head: torch.nn.Module, g: CachedGallery, batch: int = 256) -> torch.Tensor:
    """The gallery's images as `head` takes them: the late head's own tokens from the pixels, or the cached
    image tower tokens."""
    if isinstance(head, LateInteractionHead):
        return torch.cat([head.image_input(g.images[s:s + batch]) for s in range(0, len(g.images), batch)])
    return g.images.float()


@torch.no_grad()
def rerank_top1(head: torch.nn.Module, g: CachedGallery, weights=WEIGHT_GRID,
                batch: int = 256) -> dict[float, float]:
    """Text-to-image R@1 after re-ranking ITC's top k by score + w x cosine, for each w (`ITC_ALONE`: by the
    cosine alone)."""
    was_training = head.training
    head.eval()
    images = head_images(head, g, batch)
    hits = {w: 0 for w in weights}
    for start in range(0, len(g.text_to_image), batch):
        rows = torch.arange(start, min(start + batch, len(g.text_to_image)))
        candidates = g.top[rows]
        k = candidates.shape[1]
        score = match_scores(head, g.texts[rows].repeat_interleave(k, 0), g.padding[rows].repeat_interleave(k, 0),
                             images, candidates.reshape(-1)).view(len(rows), k)
        cosine = (g.text_emb[rows, None, :] * g.image_emb[candidates]).sum(-1)
        own = candidates == g.text_to_image[rows, None]
        for w in weights:
            hits[w] += _first(cosine if w == ITC_ALONE else score + w * cosine, own)
    head.train(was_training)
    return {w: h / len(g.text_to_image) for w, h in hits.items()}


def _first(scores: torch.Tensor, own: torch.Tensor) -> int:
    """Rows whose own candidate (any, where a row has several) scores above every other candidate: R@1 as
    `clipkit.metrics` counts it, a tie with another candidate a miss (identical captions of two images tie)."""
    best_own = scores.masked_fill(~own, float("-inf")).max(dim=1).values
    best_other = scores.masked_fill(own, float("-inf")).max(dim=1).values
    return int((best_own > best_other).sum())


@torch.no_grad()
def rerank_top1_i2t(head: torch.nn.Module, g: CachedGallery, weights=WEIGHT_GRID,
                    batch: int = 256) -> dict[float, float]:
    """Image-to-text R@1 (any of the image's captions first) after re-ranking each image's top k captions by
    ITC (k: the gallery's, as text -> image uses) by score + w x cosine, for each w (`ITC_ALONE`: by the
    cosine alone)."""
    was_training = head.training
    head.eval()
    images = head_images(head, g, batch)
    k = min(g.top.shape[1], len(g.text_to_image))
    hits = {w: 0 for w in weights}
    for start in range(0, len(g.image_emb), batch):
        rows = torch.arange(start, min(start + batch, len(g.image_emb)))
        cosine, candidates = (g.image_emb[rows] @ g.text_emb.T).topk(k, dim=1)
        flat = candidates.reshape(-1)
        score = match_scores(head, g.texts[flat], g.padding[flat], images,
                             rows.repeat_interleave(k)).view(len(rows), k)
        own = g.text_to_image[candidates] == rows[:, None]
        for w in weights:
            hits[w] += _first(cosine if w == ITC_ALONE else score + w * cosine, own)
    head.train(was_training)
    return {w: h / len(g.image_emb) for w, h in hits.items()}


def fit_weight(head: torch.nn.Module, galleries: list[CachedGallery],
               direction: str = "t2i") -> tuple[float, dict[float, float], float]:
    """The cosine weight with the best mean re-ranked R@1 over `galleries` in `direction` ("t2i", "i2t";
    ties: the smallest weight), the mean R@1 of each weight, and R@1 without re-ranking."""
    top1 = rerank_top1 if direction == "t2i" else rerank_top1_i2t
    weights = (*WEIGHT_GRID, ITC_ALONE)
    totals = {w: 0.0 for w in weights}
    for g in galleries:
        for w, r in top1(head, g, weights).items():
            totals[w] += r / len(galleries)
    itc = totals.pop(ITC_ALONE)
    best = max(WEIGHT_GRID, key=lambda w: (round(totals[w], 6), -w))
    return best, totals, itc


def fit_weights(head: torch.nn.Module, galleries: list[CachedGallery]) -> dict:
    """Both directions' cosine weights fitted on `galleries`, written into the head's config; a report, whose
    "lowers" names the directions where even the best weight re-ranks below ITC alone there (warned)."""
    report, lowers = {}, []
    for direction, suffix in (("t2i", ""), ("i2t", "_i2t")):
        weight, by_weight, itc = fit_weight(head, galleries, direction)
        head.config[f"rerank_weight{suffix}"] = weight
        report.update({f"rerank_weight{suffix}": weight, f"train{suffix}_r1_by_weight": by_weight,
                       f"itc{suffix}_r1": itc})
        if round(by_weight[weight], 6) < round(itc, 6):
            lowers.append(f"{direction} R@1 {by_weight[weight]:.4f} re-ranked, {itc:.4f} by ITC alone")
    if lowers:
        log.warning("re-ranking with this head lowers R@1 on the galleries its weights were fitted on (%s): "
                    "train it longer (more steps or data), or search without re-ranking", "; ".join(lowers))
    return {**report, "lowers": lowers}


def train_rerank_head(model, galleries: list[RetrievalSet], config: RerankConfig | None = None, *,
                      state_path: str | Path | None = None, progress: bool = True,
                      fitting: list[RetrievalSet] | None = None) -> tuple[torch.nn.Module, dict]:
    """Train a re-ranking head for `model` (towers frozen) on `galleries`; returns (head, report).

    The head's `config['rerank_weight']` (and `'rerank_weight_i2t'`) is set to the cosine weight fitted on
    `fitting`: galleries the head does not train on (`held_out_galleries`), else (None) on the first 4 it trains
    on, which favour the head (their captions are the ones it learnt). `model.itm` is not changed (kind "fusion"
    fine-tunes a copy of it).
    """
    config = config or RerankConfig()
    config.validate()
    if not galleries:
        raise ValueError("train_rerank_head needs at least one training gallery")
    torch.manual_seed(config.seed)
    head = new_head(model, config)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, config.warmup, config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    state_path = Path(state_path) if state_path else None
    step, losses = _resume(state_path, {"config": asdict(config), "galleries": len(galleries)},
                           head, optimizer, scheduler, generator)

    def save() -> None:
        payload = {"config": asdict(config), "galleries": len(galleries), "head": head.state_dict(),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "generator": generator.get_state(), "step": step, "losses": losses}
        atomic_write_with(state_path, lambda tmp: torch.save(payload, tmp))

    cached = [cache_gallery(model, data, config.k, kind=config.kind)
              for data in progress_bar(progress, galleries, desc="caching galleries")]
    head.train()
    bar = progress_bar(progress, total=config.steps, initial=step, desc="re-ranking head", unit="step")
    while step < config.steps:
        g = cached[int(torch.randint(len(cached), (1,), generator=generator))]
        captions = torch.randint(len(g.text_to_image), (config.captions,), generator=generator)
        loss = step_loss(head, g, captions, config.random, generator)
        if config.i2t_weight:  # the step's captions' own images, each against its top k captions
            loss = loss + config.i2t_weight * i2t_loss(head, g, torch.unique(g.text_to_image[captions]), config.k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if state_path is not None and (step % config.save_every == 0 or step == config.steps):
            save()
    bar.close()
    held_out = [cache_gallery(model, data, config.k, kind=config.kind) for data in fitting or []]
    fitted = fit_weights(head, held_out or cached[:4])
    head.eval()
    report = {"config": asdict(config), "galleries": len(galleries), "weights_fitted_on": len(held_out) or None,
              **fitted,
              "loss_first_50": _mean(losses[:50]), "loss_last_50": _mean(losses[-50:])}
    return head, report


def _resume(state_path: Path | None, run: dict, head, optimizer, scheduler, generator) -> tuple[int, list]:
    """(step, losses) of the run saved at `state_path`, its head, optimizer, schedule and random state loaded;
    (0, []) where none is saved; a ValueError where it saved a run of other settings than `run`'s."""
    if state_path is None or not state_path.exists():
        return 0, []
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if any(state.get(name) != value for name, value in run.items()):
        raise ValueError(f"{state_path} holds a re-ranking run with other settings; delete it to start over")
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    log.info("resumed the re-ranking head from %s at step %d", state_path, state["step"])
    return state["step"], state["losses"]


def refit_head(model, galleries: list[RetrievalSet], config: RerankConfig, progress: bool = True
               ) -> tuple[torch.nn.Module, dict]:
    """A copy of `model`'s own fusion ITM head with both cosine weights fitted on `galleries` (data it never
    trained on: a user's own, where the shipped weights may not suit it), and the report."""
    if not isinstance(getattr(model, "itm", None), ITMHead):
        raise ValueError("--steps 0 fits the weights of the model's own ITM head, and this model has none: "
                         "train one (--steps N)")
    head = copy.deepcopy(model.itm).float().cpu().eval()
    cached = [cache_gallery(model, data, config.k, kind="fusion")
              for data in progress_bar(progress, galleries, desc="caching galleries")]
    fitted = fit_weights(head, cached)
    return head, {"config": asdict(config), "galleries": 0, "weights_fitted_on": len(cached), **fitted,
                  "loss_first_50": None, "loss_last_50": None}


def new_head(model, config: RerankConfig) -> torch.nn.Module:
    """The head stage 2 trains: a new late-interaction head, or a copy of the model's fusion head (a new one
    when the model has none)."""
    if config.kind == "late":
        text_width = encode_text_tokens(model.clip, model.tokenize(["a"]).to(model.device))[1].shape[-1]
        return LateInteractionHead(text_width, model.image_size, config.width)
    if isinstance(model.itm, ITMHead):
        head = copy.deepcopy(model.itm).float().cpu()
        head.config.pop("rerank_weight", None)
        head.config.pop("rerank_weight_i2t", None)
        return head
    return build_itm_head(model.clip, width=config.width)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


# ---------------------------------------------------------------------------------------------
# `clipkit train-rerank`


def train_rerank(model: str, data: str, out: str | os.PathLike, *, pretrained: str | None = None,
                 gallery_size: int = 1000, config: RerankConfig | None = None, device: str | None = None,
                 progress: bool = True) -> dict:
    """Fit a re-ranking head on `model`'s frozen towers, write OUT (resumable through OUT.state while
    running; it loads as `--pretrained`), return the report."""
    from clipkit.models import load_model, save_checkpoint

    out = Path(out)
    if not out.parent.exists():
        raise FileNotFoundError(f"no folder {out.parent} to write {out.name} into")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give the checkpoint file to write (such as {out / 'rerank.pt'})")
    config = config or RerankConfig()
    config.validate()
    loaded = load_model(model, pretrained, device=device)
    state = out.with_name(out.name + ".state")
    if config.steps == 0:  # the model's own head, its weights fitted to this data (synthetic: its validation split)
        head, report = refit_head(loaded, training_galleries(data, gallery_size, loaded.image_size, split="val"),
                                  config, progress=progress)
    else:
        galleries, fitting = held_out_galleries(data, training_galleries(data, gallery_size, loaded.image_size),
                                                gallery_size, loaded.image_size)
        head, report = train_rerank_head(loaded, galleries, config, state_path=state, progress=progress,
                                         fitting=fitting)
    loaded.itm = head.to(loaded.device)
    save_checkpoint(loaded, out)
    state.unlink(missing_ok=True)
    return report
