"""Training: symmetric InfoNCE plus ITM on in-batch hard negatives, from one process to `torchrun`.

    clipkit train --data 'shards/train-{000000..000019}.tar' --out runs/demo --steps 2000
    torchrun --nproc_per_node 2 -m clipkit.train --data ... --out ...

AdamW (no weight decay on norms, biases, embeddings and the logit scale), cosine schedule with
linear warm-up, gradient accumulation, AMP on CUDA (bf16, or fp16 with a grad scaler), gradient
clipping, logit scale clamped at ln(100). Checkpoints hold everything needed to continue exactly:
weights, ITM head, optimizer, scheduler, scaler, step, RNG states and the data position; they are
written atomically by rank 0 and the last few are kept. `--resume latest` continues a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from clipkit._progress import progress_bar
from clipkit._io import atomic_write_with
from clipkit.errors import CheckpointError, ClipkitError, first_line
from clipkit.itm import (build_itm_head, encode_image_tokens, encode_text_tokens, itm_logits_and_labels, padding_mask,
                         tower_widths)
from clipkit.data.synthetic import RELATION_TARGETS
from clipkit.losses import info_nce, itm_loss, relation_loss, sigmoid_loss
from clipkit.models import CHECKPOINT_FORMAT, Model, checkpoint_paths, cuda_half_dtype, load_model, resolve_device
from clipkit.train.schedule import cosine_schedule

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)


class TrainingDiverged(ClipkitError):
    """The loss became NaN or infinite; no checkpoint was written for that step."""


@dataclass
class TrainConfig:
    data: str = field(metadata={"help": "webdataset shards: pattern(s) or folder(s) of .tar files, comma-separated; "
                                        "a folder of images with NAME.txt captions or a caption table (.csv, "
                                        ".jsonl, .parquet: written into shards once, in OUT/data); or synthetic:N "
                                        "(made in OUT/data)"})
    out: str = field(metadata={"help": "run folder: checkpoints, log.jsonl, config.json"})
    model: str = field(default="clipkit-tiny", metadata={"help": "a clipkit or open_clip architecture name, a "
                                                                "transformers folder or hf:ORG/REPO, or an "
                                                                "open_clip hub model hf-hub:ORG/REPO"})
    pretrained: str | None = field(default=None, metadata={"help": "initial weights: tag or local file"})
    val: str | None = field(default="synthetic:300", metadata={
        "help": "validation set, scored by recall both ways: synthetic:N, webdataset shards (as --data), "
                "a folder of images with NAME.txt captions, a caption table (.csv, .jsonl, .parquet), or none"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps in all"})
    batch_size: int = field(default=64, metadata={"help": "samples per micro-batch per process"})
    accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW, cosine decay after warm-up)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on gains, biases, logit scale)"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    precision: str = field(default="auto", metadata={"help": "auto, fp32, bf16 or fp16 (bf16/fp16 on CUDA only)"})
    loss: str = field(default="infonce", metadata={
        "help": "contrastive loss: infonce (CLIP's) or sigmoid (SigLIP's; uses the model's logit_bias, or a "
                "learnable one from -10)"})
    itm: bool | None = field(default=None, metadata={"help": "train the ITM head on hard negatives (default: when "
                                                             "the image tower gives token states: ViTs, timm towers)"})
    itm_weight: float = field(default=1.0, metadata={"help": "weight of the ITM loss beside the contrastive one"})
    itm_width: int = field(default=128, metadata={"help": "ITM head: width of its fusion layers"})
    itm_layers: int = field(default=2, metadata={"help": "ITM head: fusion layers"})
    itm_heads: int = field(default=4, metadata={"help": "ITM head: attention heads"})
    itm_easy_mix: float = field(default=0.0, metadata={
        "help": "share of ITM negatives drawn uniformly instead of by similarity (0: all hard, as ALBEF/BLIP)"})
    seed: int = field(default=0, metadata={"help": "random seed (initialisation, data order, negatives)"})
    workers: int = field(default=2, metadata={"help": "data loader processes per rank"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "samples in the shuffle buffer (raw bytes)"})
    hard_negatives: bool = field(default=False, metadata={
        "help": "add each sample's hard-negative caption (json 'negatives': the synthetic data's swapped-twin "
                "captions) as an extra text negative in the contrastive loss, NegCLIP-style"})
    group_batches: bool = field(default=False, metadata={
        "help": "shuffle whole groups (json group_id: an image and its distractors) so they share a batch, "
                "as ITM hard negatives"})
    relation_weight: float = field(default=0.0, metadata={
        "help": "weight of an auxiliary loss on the synthetic data's relation labels (json scene: which object of "
                "the related pair is left or on top, each one's colour and shape), read from both the image and "
                "the caption embedding by one shared linear head, so both towers learn where things are (0: off)"})
    synthetic_size: int = field(default=64, metadata={"help": "image side for synthetic:N data"})
    log_every: int = field(default=10, metadata={"help": "log the loss every N steps"})
    val_every: int = field(default=0, metadata={"help": "validate every N steps (0: only at the end)"})
    ckpt_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept in OUT (older ones are deleted)"})
    resume: str | None = field(default=None, metadata={"help": "'latest' (in OUT) or a checkpoint file"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (default: cuda:$LOCAL_RANK "
                                                              "under torchrun, else CUDA if present, else the CPU)"})
    stop_after: int | None = field(default=None, metadata={"help": "end this run after N steps, as if killed"})

    def validate(self) -> None:
        for name in ("steps", "batch_size", "accum_steps", "log_every", "ckpt_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0 or self.warmup < 0 or self.val_every < 0:
            raise ValueError("workers, warmup and val_every must not be negative")
        if not 0.0 <= self.itm_easy_mix <= 1.0:
            raise ValueError(f"itm_easy_mix must be in [0, 1], got {self.itm_easy_mix}")
        if self.relation_weight < 0:
            raise ValueError(f"relation_weight must not be negative, got {self.relation_weight}")
        if self.loss not in ("infonce", "sigmoid"):
            raise ValueError(f"loss must be infonce or sigmoid, got {self.loss!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.out and os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out} is a file: give a folder for the run's checkpoints and log")


# ---------------------------------------------------------------------------------------------
# The model being trained


class Trainable(nn.Module):
    """The dual encoder and the ITM head in one module, so DDP sees every parameter in forward."""

    def __init__(self, clip: nn.Module, head: nn.Module | None, uniform_mix: float = 0.0, loss: str = "infonce",
                 relation_head: nn.Module | None = None):
        super().__init__()
        self.clip, self.head, self.uniform_mix, self.loss = clip, head, uniform_mix, loss
        self.relation_head = relation_head  # embedding -> relation labels, shared by both towers
        # the sigmoid loss needs a bias; a model without one (CLIP) gets SigLIP's initial -10, trained with it
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) \
            if loss == "sigmoid" and getattr(clip, "logit_bias", None) is None else None

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, image_ids: torch.Tensor,
                generator: torch.Generator | None = None,
                negative_tokens: torch.Tensor | None = None, negative_owners: torch.Tensor | None = None,
                relation_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.head is not None:  # the ITM head reads the towers' token states
            image_emb, image_states = encode_image_tokens(self.clip, pixels)
            text_emb, text_states = encode_text_tokens(self.clip, tokens)
        else:  # the embeddings alone: any tower (a ResNet gives no token states)
            image_emb, text_emb = self.clip.encode_image(pixels), self.clip.encode_text(tokens)
        image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
        extra = F.normalize(encode_text_tokens(self.clip, negative_tokens)[0].float(), dim=-1) \
            if negative_tokens is not None else None  # hard-negative captions (NegCLIP)
        scale = self.clip.logit_scale.exp()
        if self.loss == "sigmoid":
            bias = self.logit_bias if self.logit_bias is not None else self.clip.logit_bias
            itc = sigmoid_loss(image_emb, text_emb, scale, bias, image_ids=image_ids, extra_texts=extra,
                               extra_owners=negative_owners)
        else:
            itc = info_nce(image_emb, text_emb, scale, image_ids=image_ids, extra_texts=extra,
                           extra_owners=negative_owners)
        out = {"itc": itc, "loss": itc, "logit_scale": scale.detach()}
        if self.relation_head is not None and relation_targets is not None:
            out["relation"] = self._relation_loss(image_emb, text_emb, relation_targets)
        if self.head is not None:
            # Hard negatives are drawn from softmax over the contrastive *logits* (ALBEF/BLIP scale by the
            # temperature too): over raw cosines in [-1, 1] the softmax is nearly flat, the "hard"
            # negatives are random ones, and the head never learns to tell distractors apart.
            similarity = scale.detach() * image_emb.detach() @ text_emb.detach().T
            padding = padding_mask(tokens, getattr(self.clip, "pad_id", 0))
            logits, labels = itm_logits_and_labels(self.head, text_states, padding, image_states,
                                                   similarity, image_ids, generator, self.uniform_mix)
            out["itm"], out["itm_acc"] = itm_loss(logits, labels)
        return out

    def _relation_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The relation labels read from both (normalised) embeddings by the one shared head, mean of the two."""
        gain = image_emb.shape[1] ** 0.5  # unit-norm rows -> entries of about unit size, as nn.Linear expects
        return (relation_loss(self.relation_head(image_emb * gain), targets, RELATION_TARGETS)
                + relation_loss(self.relation_head(text_emb * gain), targets, RELATION_TARGETS)) / 2


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on norms, biases, embeddings or the logit scale.

    Token embeddings are left out too, so rows of words never seen in training keep their initial values.
    """
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = (parameter.ndim < 2 or "logit_scale" in name or "embedding" in name
                  or re.search(r"(^|\.)(ln|norm|bn)[\w]*\.", name) is not None)
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# Data


def shard_urls(config: TrainConfig, rank: int) -> str | list[str]:
    """The training shards; synthetic:N, a folder of captioned images or a caption table written into shards
    once (rank 0) in OUT/data."""
    from clipkit.data.captions import captioned_source

    parts = [u.strip() for u in config.data.split(",") if u.strip()]
    if len(parts) == 1 and captioned_source(parts[0]):
        return _source_shards(config, parts[0], rank)
    if not config.data.startswith("synthetic:"):
        return parts
    from clipkit.data.synthetic import write_synthetic

    n = _synthetic_count(config.data)
    folder = Path(config.out) / "data"
    manifest = folder / "train.json"
    expected = {"n": n, "seed": config.seed, "size": config.synthetic_size}
    if rank == 0 and not _manifest_matches(folder / "made.json", expected):
        write_synthetic(folder, n, seed=config.seed, split="train", size=config.synthetic_size,
                        maxcount=max(1, min(1000, n // 8)))
        (folder / "made.json").write_text(json.dumps(expected))
    if dist.is_initialized():
        dist.barrier()
    return str(folder / json.loads(manifest.read_text())["pattern"])


def _source_shards(config: TrainConfig, source: str, rank: int) -> str:
    """The shards of a captioned folder or caption table, written once (rank 0) into OUT/data/source and kept
    for the runs that go on in OUT (a set made from another source, or stopped midway, is written again)."""
    from clipkit._io import SkipList
    from clipkit.data.shards import samples_from_source, write_shards

    folder, expected = Path(config.out) / "data" / "source", {"source": str(Path(source).resolve())}
    if rank == 0 and not _manifest_matches(folder / "made.json", expected):
        _clear_made_shards(folder)
        skipped = SkipList()  # (one summary for them all: a folder of millions may hold many uncaptioned images)
        written = write_shards(samples_from_source(source, skipped), folder, prefix="train", progress=None)
        if skipped:
            log.warning("--data %s: %d image(s) left out, e.g. %s", source, len(skipped),
                        "; ".join(f"{path}: {reason}" for path, reason in skipped[:3]))
        if not written:
            raise ValueError(f"--data {source}: no image with a caption in it (a folder needs NAME.txt captions "
                             "beside its images; a table, image and caption columns)")
        (folder / "made.json").write_text(json.dumps(expected))
        log.info("wrote the shards of %s into %s (kept for runs in %s; delete it to write them again)", source,
                 folder, config.out)
    if dist.is_initialized():
        dist.barrier()
    return str(folder / json.loads((folder / "train.json").read_text())["pattern"])


def _clear_made_shards(folder: Path) -> None:
    """Remove the shards (and their lists, and the temporary files of a write stopped midway) that
    `_source_shards` wrote in `folder`; anything else there is refused, never deleted."""
    ours = re.compile(r"(train-\d{6}\.tar|train\.json|made\.json|\.(train-\d{6}\.tar|train\.json)\..*\.tmp)")
    files = list(folder.iterdir()) if folder.is_dir() else []
    others = [p.name for p in files if not (p.is_file() and ours.fullmatch(p.name))]
    if others:
        raise ValueError(f"{folder} holds files clipkit did not write there ({others[0]}, ...): give another --out")
    for path in files:
        path.unlink()


def _wants_itm(config: TrainConfig, clip: nn.Module) -> bool:
    """config.itm, or when unset, whether the image tower gives the token states the ITM head reads."""
    if config.itm is not None:
        return config.itm
    try:
        tower_widths(clip)
    except ValueError:
        log.info("training without an ITM head: the image tower (%s) gives no token states",
                 type(getattr(clip, "visual", clip)).__name__)
        return False
    return True


def loader_workers(urls: str | list[str], workers: int, world: int) -> int:
    """Loader workers for this many shards: at most the shards each process reads (a worker without a shard
    would leave its rank short of batches); fewer shards than processes is the loader's error."""
    from clipkit.data.shardspec import expand_shards

    shards = len(expand_shards(urls)) // max(1, world)
    if 1 <= shards < workers:
        log.info("%d shard(s) per process: reading them with %d loader worker(s), not %d", shards, shards, workers)
        return shards
    return workers


def _synthetic_count(spec: str) -> int:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"expected synthetic:N with an integer N, got {spec!r}") from None
    if n < 1:
        raise ValueError(f"synthetic:N needs N >= 1, got {spec!r}")
    return n


def _manifest_matches(path: Path, expected: dict) -> bool:
    try:
        return json.loads(path.read_text()) == expected
    except (OSError, ValueError):
        return False


def validation_set(config: TrainConfig):
    if not config.val or config.val.lower() == "none":
        return None
    if config.val.startswith("synthetic:"):
        from clipkit.data.captions import synthetic_set

        return synthetic_set(_synthetic_count(config.val), seed=config.seed, split="val", size=config.synthetic_size)
    from clipkit.data.shardspec import is_shard_spec
    from clipkit.evaluate import load_dataset

    parts = [u.strip() for u in config.val.split(",") if u.strip()]
    if config.val.startswith("folder:") or len(parts) == 1 and os.path.exists(parts[0]) and not is_shard_spec(parts[0]):
        return load_dataset(config.val)  # images with NAME.txt captions, or a caption table
    return load_dataset("wds", root=parts)  # shards, as --data


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_training_checkpoint(path: Path, state: dict, keep_last: int) -> None:
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))
    for old in checkpoint_paths(path.parent)[:-keep_last]:
        old.unlink(missing_ok=True)


def resolve_resume(config: TrainConfig) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "latest":
        found = checkpoint_paths(Path(config.out))
        if not found:
            log.warning("--resume latest: no checkpoint in %s yet; starting from scratch", config.out)
            return None
        return found[-1]
    path = Path(config.resume)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


#: Options whose change makes a resumed run go on otherwise than the uninterrupted run would have.
_COURSE = ("data", "batch_size", "accum_steps", "warmup", "grad_clip", "loss", "itm_weight", "itm_easy_mix", "seed",
           "shuffle_buffer", "hard_negatives", "group_batches", "relation_weight")


def _warn_changed_course(saved: dict, config: TrainConfig, kept: dict) -> None:
    """Warn of options given otherwise than the resumed run had them (`saved`, its config): those that change
    its course, and those (`kept`: option -> the value its optimizer's state holds) that it keeps anyway."""
    changed = [f"--{name.replace('_', '-')} {saved[name]} -> {getattr(config, name)}" for name in _COURSE
               if name in saved and saved[name] != getattr(config, name)]
    if changed:
        log.warning("resuming with changed options (%s): the run goes on, but not as it would have without the "
                    "interruption", ", ".join(changed))
    ignored = [f"--{name.replace('_', '-')} {getattr(config, name)} (it keeps {value})" for name, value in kept.items()
               if not math.isclose(value, getattr(config, name))]
    if ignored:
        log.warning("a resumed run keeps its optimizer's settings: %s not used", ", ".join(ignored))


def load_training_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "optimizer" not in state:
        raise CheckpointError(f"{path} is not a clipkit training checkpoint")
    return state


# ---------------------------------------------------------------------------------------------
# The loop


def _distributed_setup(config: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device): `cuda:$LOCAL_RANK` for "cuda" or no device on a GPU
    machine, set as the current device before the process group starts (NCCL binds to it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.device or None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        _OWNED_GROUP.append(True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


_OWNED_GROUP: list[bool] = []


def _restore_generator(generator: torch.Generator, saved: list, rank: int) -> None:
    """The sampler's random state from a checkpoint; one from another device kind (a CPU state on a GPU
    run or back: their sizes differ) cannot be restored, so the sampler goes on from its seed."""
    if rank >= len(saved):
        return
    try:
        generator.set_state(saved[rank].cpu())
    except RuntimeError:
        log.warning("the checkpoint's sampler state is from another device kind; hard negatives are drawn "
                    "from the run's seed from here on")  # whether train() created the process group (and so tears it down)


def _precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"precision {config.precision} needs CUDA; use fp32 on {device.type}")
    if config.precision == "auto":
        if device.type != "cuda":
            return None
        return cuda_half_dtype()
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]


class _Run:
    """One training run: the model and ITM head, optimiser, schedule, scaler, the hard-negative sampler's
    random state, where it is (step, epoch, batches consumed) and its log. `train` drives it."""

    def __init__(self, config: TrainConfig):
        self.config = config
        earlier = checkpoint_paths(Path(config.out)) if not config.resume else []
        if earlier:  # a new run there would write over (and prune) another run's checkpoints
            raise ValueError(f"{config.out} already holds a run's checkpoints ({earlier[-1].name}): continue it with "
                             "--resume latest, or train into another --out")
        self.rank, self.world, self.device = _distributed_setup(config)
        self.out = Path(config.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(".ckpt-*.tmp"):  # left by a run killed while writing a checkpoint
                stale.unlink(missing_ok=True)
        torch.manual_seed(config.seed)
        self.model = load_model(config.model, config.pretrained, device=self.device)
        self.clip = self.model.clip.train()
        self.head = build_itm_head(self.clip, config.itm_width, config.itm_layers, config.itm_heads).to(self.device) \
            if _wants_itm(config, self.clip) else None
        relation_head = nn.Linear(self.model.dim, sum(RELATION_TARGETS)) if config.relation_weight > 0 else None
        self.trainable = Trainable(self.clip, self.head, config.itm_easy_mix, config.loss,
                                   relation_head).to(self.device)
        self.wrapped = nn.parallel.DistributedDataParallel(
            self.trainable, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.world > 1 else self.trainable
        self.optimizer = torch.optim.AdamW(parameter_groups(self.trainable, config.weight_decay), lr=config.lr,
                                           betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_schedule(s, config.warmup, config.steps))
        self.amp_dtype = _precision(config, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + self.rank)
        self.step, self.epoch, self.consumed, self.micro = 0, 0, 0, 0  # micro: batches since the last step
        self.last: dict[str, Any] = {}

    def resume(self) -> None:
        path = resolve_resume(self.config)
        if path is None:
            return
        state = load_training_checkpoint(path)
        saved = state.get("config") or {}
        try:
            self.clip.load_state_dict(state["model"])
        except RuntimeError:
            raise CheckpointError(f"{path} is a run of {state.get('model_name')!r}, whose weights do not fit --model "
                                  f"{self.config.model!r}: resume with the run's own options (its config.json)") \
                from None
        if self.head is not None:
            if state.get("itm") is None:
                raise CheckpointError(f"{path} has no ITM head but this run trains one (--itm)")
            try:
                self.head.load_state_dict(state["itm"])
            except RuntimeError:
                shape = "/".join(str(saved.get(f"itm_{name}")) for name in ("width", "layers", "heads"))
                raise CheckpointError(f"{path} has an ITM head of another shape: resume with the run's --itm-width/"
                                      f"--itm-layers/--itm-heads ({shape})") from None
        if self.trainable.relation_head is not None:
            if state.get("relation_head") is None:
                raise CheckpointError(f"{path} has no relation head but this run trains one (--relation-weight)")
            self.trainable.relation_head.load_state_dict(state["relation_head"])
        if self.trainable.logit_bias is not None and state.get("logit_bias") is not None:
            with torch.no_grad():
                self.trainable.logit_bias.copy_(state["logit_bias"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        kept = {"lr": self.scheduler.base_lrs[0],
                "weight_decay": max(group["weight_decay"] for group in self.optimizer.param_groups)}
        _warn_changed_course(saved, self.config, kept)
        self.config = dataclasses.replace(self.config, **kept)  # what the run does, as its records will say
        if state.get("scaler") and self.scaler.is_enabled():  # empty when the run it resumes had no fp16 scaler
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        torch.set_rng_state(state["rng"]["torch"])
        _restore_generator(self.generator, state["rng"]["sampler"], self.rank)
        log.info("resumed from %s at step %d", path, self.step)

    def open_log(self) -> None:
        config = self.config
        if self.rank == 0:  # (after a resume: a resume refused leaves the run's record as it was)
            (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        self.val_data = validation_set(config) if self.rank == 0 else None
        self.log_file = open(self.out / "log.jsonl", "a") if self.rank == 0 else None
        self.bar = progress_bar(None if self.rank == 0 else False, total=config.steps, initial=self.step,
                                unit="step", desc="training")
        self.stop_at = min(config.steps, self.step + config.stop_after) if config.stop_after else config.steps
        self.window_start, self.window_samples = time.perf_counter(), 0

    def batches(self):
        """Training batches from where the run stands, epoch after epoch, until `stop_at`."""
        from clipkit.data.loader import make_loader

        config, urls = self.config, shard_urls(self.config, self.rank)
        workers = loader_workers(urls, config.workers, self.world)
        while self.step < self.stop_at:
            given = 0
            for batch in make_loader(urls, self.model.preprocess, self.model.tokenizer, config.batch_size,
                                     seed=config.seed, epoch=self.epoch, shuffle_buffer=config.shuffle_buffer,
                                     num_workers=workers, group_batches=config.group_batches,
                                     pin_memory=self.device.type == "cuda", rank=self.rank, world_size=self.world,
                                     skip_batches=self.consumed, hard_negatives=config.hard_negatives,
                                     relations=config.relation_weight > 0):
                given += 1
                yield batch
            if given == 0 and self.consumed == 0:  # (a resumed run may start at an epoch's very end)
                raise ValueError(f"the training shards ({config.data}) gave not one batch of {config.batch_size} "
                                 "samples: check that they are webdataset tars of images with txt captions and hold "
                                 "at least a batch per process (see `clipkit shards`)")
            self.epoch, self.consumed = self.epoch + 1, 0

    def forward_backward(self, batch: dict) -> tuple[dict, torch.Tensor]:
        config, device = self.config, self.device
        autocast = torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        sync = self.wrapped.no_sync() if self.world > 1 and self.micro + 1 < config.accum_steps else nullcontext()
        with autocast, sync:
            negatives, owners, relations = (batch.get(k) for k in ("negative_tokens", "negative_owners",
                                                                   "relation_targets"))
            losses = self.wrapped(batch["pixels"].to(device, non_blocking=True), batch["tokens"].to(device),
                                  batch["image_ids"].to(device), self.generator, *(
                                      t.to(device) if t is not None else None for t in (negatives, owners, relations)))
            total = losses["itc"] + (config.itm_weight * losses["itm"] if self.head is not None else 0)
            if "relation" in losses:
                total = total + config.relation_weight * losses["relation"]
            if not torch.isfinite(total):
                raise TrainingDiverged(f"loss became {total.item()} at step {self.step}; the last good checkpoint "
                                       f"is kept in {self.out}: lower --lr or resume from it")
            self.scaler.scale(total / config.accum_steps).backward()
        self.consumed += 1
        self.micro += 1
        self.window_samples += len(batch["keys"]) * self.world
        return losses, total

    def optimizer_step(self) -> None:
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.micro = 0
        self.step += 1
        self.bar.update(1)

    def record(self, losses: dict, total: torch.Tensor) -> None:
        """After a step: the log line, validation and the checkpoint, each when it is due."""
        config, step = self.config, self.step
        if step % config.log_every == 0 or step == self.stop_at:
            elapsed = time.perf_counter() - self.window_start
            self.last = {"step": step, "epoch": self.epoch, "loss": total.item(), "itc": losses["itc"].item(),
                         "logit_scale": float(losses["logit_scale"]), "lr": self.scheduler.get_last_lr()[0],
                         "samples_per_s": self.window_samples / max(elapsed, 1e-9)}
            if self.head is not None:
                self.last.update(itm=losses["itm"].item(), itm_acc=losses["itm_acc"].item())
            if "relation" in losses:
                self.last["relation"] = losses["relation"].item()
            self.window_start, self.window_samples = time.perf_counter(), 0
            if self.log_file:
                self.log_file.write(json.dumps(self.last) + "\n")
                self.log_file.flush()
                self.bar.set_postfix(loss=f"{self.last['loss']:.3f}")
        if self.val_data is not None and config.val_every and step % config.val_every == 0 and step < config.steps:
            _validate(self.model, self.clip, self.val_data, step, self.log_file, self.last)
        if step % config.ckpt_every == 0 or step == config.steps:
            state = self.checkpoint_state()
            if self.rank == 0:
                save_training_checkpoint(self.out / f"ckpt-{step:07d}.pt", state, config.keep_last)

    def checkpoint_state(self) -> dict:
        samplers = [self.generator.get_state()]
        if self.world > 1:
            samplers = [None] * self.world
            dist.all_gather_object(samplers, self.generator.get_state())
        head = self.head
        return {"format": CHECKPOINT_FORMAT, "version": 1, "model_name": self.config.model,
                "model": {k: v.detach().cpu() for k, v in self.clip.state_dict().items()},
                "itm": {k: v.detach().cpu() for k, v in head.state_dict().items()} if head is not None else None,
                "itm_config": head.config if head is not None else None,
                "logit_bias": self.trainable.logit_bias.detach().cpu() if self.trainable.logit_bias is not None
                else None,
                "relation_head": {k: v.detach().cpu() for k, v in self.trainable.relation_head.state_dict().items()}
                if self.trainable.relation_head is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "consumed": self.consumed, "rng": {"torch": torch.get_rng_state(), "sampler": samplers},
                "config": dataclasses.asdict(self.config)}

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        if getattr(self, "log_file", None):
            self.log_file.close()
        if _OWNED_GROUP and dist.is_initialized():
            dist.destroy_process_group()
            _OWNED_GROUP.clear()


def train(config: TrainConfig) -> dict:
    """Run (or continue) training; returns the last logged metrics and validation results."""
    config.validate()
    run = _Run(config)
    try:
        run.resume()
        run.open_log()
        for batch in run.batches():
            losses, total = run.forward_backward(batch)
            if run.micro < config.accum_steps:
                continue  # checkpoints fall only between optimizer steps
            run.optimizer_step()
            run.record(losses, total)
            if run.step >= run.stop_at:
                break
        if run.step == config.steps and run.val_data is not None:
            _validate(run.model, run.clip, run.val_data, run.step, run.log_file, run.last)
    finally:
        run.close()
    return run.last


def _validate(model: Model, clip: nn.Module, data, step: int, log_file, last: dict) -> None:
    from clipkit.evaluate import evaluate

    live = dataclasses.replace(model, clip=clip)
    was_training = clip.training
    clip.eval()
    try:
        results = evaluate(live, data, batch_size=256).itc
    finally:
        clip.train(was_training)
    last["val"] = results
    if log_file:
        log_file.write(json.dumps({"step": step, "val": results}) + "\n")
        log_file.flush()
    log.info("step %d validation: t2i R@1 %.3f R@5 %.3f, i2t R@1 %.3f", step, results["t2i_R@1"],
             results["t2i_R@5"], results["i2t_R@1"])
