"""Model registry and loading.

Where weights come from:
- an open_clip architecture name with a pretrained tag (`ViT-B-32`, `laion2b_s34b_b79k`): taken from the
  local cache, or downloaded through open_clip when the hub can be reached; offline and uncached fails at
  once with a message;
- a local file (`pretrained="path/to/file"`): an open_clip state dict (`.bin`, `.pt`, `.pth`,
  `.safetensors`) or a clipkit checkpoint, always read with `torch.load(weights_only=True)`;
- clipkit's own small configs (`clipkit-tiny`, `clipkit-tiny-rn`), registered with open_clip on first use;
  without weights they get a fixed-seed random initialisation, so the same name always gives the same model.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from clipkit import DEFAULT_MODEL
from clipkit.bundled import CONFIG_DIR, bundled_models
from clipkit._net import (hf_hub_address, hub_cached, hub_offline_when_unreachable, hub_reachable, offline_forced,
                          reachable, require_hub, url_address)
from clipkit.errors import CheckpointError, ModelMismatchError, OfflineError, first_line
from clipkit.itm.heads import build_head_from_config
from clipkit.itm.states import exact_text_length, flags_lock, text_forward

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "clipkit-checkpoint"
#: `pretrained=SCRATCH`: the fixed-seed random initialisation, even for a model with bundled weights.
SCRATCH = "scratch"
#: `pretrained=TOWERS`: a model built from separate towers (a timm image tower, a Hugging Face text tower) starts
#: from those towers' own pretrained weights (timm / Hugging Face hub, or their caches), e.g. BERT + ResNet-50.
TOWERS = "towers"
HF_HUB_PREFIX = "hf-hub:"  # open_clip's own hub names: hf-hub:ORG/REPO
_INIT_SEED = 0
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(eq=False)
class Model:
    """A dual-encoder model ready for inference.

    `clip` is the underlying open_clip module; `preprocess` maps a PIL image to a CHW tensor;
    `tokenizer` maps a list of strings to a LongTensor of token ids.
    """

    name: str
    pretrained: str | None
    clip: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    dim: int
    image_size: int
    context_length: int
    fingerprint: str
    itm: torch.nn.Module | None = None
    channels_last: bool = False  # image batches go in NHWC (convolutional towers on CUDA)
    precision: str = "auto"  # "auto": half precision under autocast on CUDA; "fp32": never
    vectors_per_image: int = 1  # BLIP-2: one image embedding per query token, (N, vectors_per_image, dim)
    untrained: bool = False  # no weights were given or bundled: the fixed-seed random initialisation

    @property
    def info(self) -> dict:
        """What an index records about the model that built it."""
        info = {"name": self.name, "pretrained": self.pretrained, "dim": self.dim, "fingerprint": self.fingerprint}
        if self.vectors_per_image > 1:
            info["vectors_per_image"] = self.vectors_per_image
        return info

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image's embedding: (dim,), or (vectors_per_image, dim)."""
        return (self.dim,) if self.vectors_per_image == 1 else (self.vectors_per_image, self.dim)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Unit-norm float32 text embeddings `(N, dim)` for a list of strings (or token ids).

        Runs the text tower only as far as the longest caption in the batch where that is exact
        (see `exact_text_length`), else over the whole context as open_clip does.
        """
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        tokens = tokens.to(self.device)
        length = exact_text_length(self.clip, tokens)
        with self.autocast(), flags_lock(self.clip):
            if length is None or length >= tokens.shape[1]:
                features = self.clip.encode_text(tokens)
            else:
                features = text_forward(self.clip, tokens[:, :length])[0]
        return F.normalize(features.float(), dim=-1)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm float32 image embeddings `(N, dim)` for a preprocessed batch `(N, 3, H, W)` ((N, vectors,
        dim) for a model with several vectors an image, each unit-norm)."""
        pixels = pixels.to(self.device, non_blocking=True)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with self.autocast(), flags_lock(self.clip):
            features = self.clip.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)

    def autocast(self):
        """Mixed precision for inference on CUDA (bf16 where supported, else fp16); a no-op on the CPU,
        where results match open_clip's float32 exactly. precision="fp32" (CLIPKIT_FP32=1) turns it off."""
        if self.device.type != "cuda" or self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=cuda_half_dtype())

    def __repr__(self) -> str:
        return (f"Model(name={self.name!r}, pretrained={self.pretrained!r}, dim={self.dim}, "
                f"device={str(self.device)!r})")


# ---------------------------------------------------------------------------------------------
# Registry


#: what clipkit adds to a bundled config under its key "clipkit": {"conv_stem": [channels...]} (clipkit.conv_stem)
_EXTENSIONS: dict[str, dict] = {}


@lru_cache(maxsize=None)
def _add_config_dir() -> None:
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def register_configs() -> None:
    """Make clipkit's JSON configs known to open_clip (on first use, not at import), and keep clipkit's own
    keys out of them: open_clip reads every registered config file again whenever anyone adds one."""
    from open_clip import factory

    _add_config_dir()
    for file in CONFIG_DIR.glob("*.json"):  # clipkit's own keys: taken out before open_clip builds the model
        config = factory._MODEL_CONFIGS.get(file.stem)
        if config is not None and "clipkit" in config:
            _EXTENSIONS[file.stem] = config.pop("clipkit")


def _apply_extensions(clip: torch.nn.Module, name: str) -> None:
    extensions = _EXTENSIONS.get(name, {})
    if "conv_stem" in extensions:
        from clipkit.conv_stem import apply_conv_stem

        apply_conv_stem(clip, extensions["conv_stem"])


def list_models() -> list[str]:
    """Every architecture name `load_model` accepts (clipkit's own first)."""
    import open_clip

    register_configs()
    own = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    return own + [m for m in open_clip.list_models() if m not in own]


def list_pretrained(name: str) -> list[str]:
    """Pretrained tags open_clip knows for architecture `name`."""
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(name))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A concrete device: None picks CUDA when available, else the CPU; "cuda" without an index is this
    process's GPU, `cuda:$LOCAL_RANK` (under torchrun each process gets its own, not all GPU 0)."""
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device is None:
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    return device


def env_flag(name: str, default: bool = False) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (anything else: the default)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def cuda_half_dtype() -> torch.dtype:
    """bf16 where the GPU runs it natively, else fp16 (emulated bf16, as on V100/T4, is slow)."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def _unknown_model_message(name: str) -> str:
    if Path(name).is_dir():
        from clipkit.hf import folder_problem

        return (f"{name} is a folder but not a model clipkit can load ({folder_problem(Path(name))}): a transformers "
                "checkpoint folder holds a config.json with a model_type (save_pretrained writes one); open_clip "
                "weights are given as --pretrained FILE beside an architecture name")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
        return (f"unknown model {name!r}: a Hugging Face hub model is named hf:{name} (it is neither in the local "
                "hub cache nor reachable now), an open_clip one published there hf-hub:ORG/REPO")
    names = list_models()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    own = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    return (f"unknown model {name!r}.{hint} clipkit models: {own}; open_clip architectures: "
            f"{len(names)} in all, e.g. ViT-B-32, ViT-B-16, RN50 (clipkit.list_models() lists them).")


# ---------------------------------------------------------------------------------------------
# Weights: pretrained tags


def _tag_address(tag_cfg: dict) -> tuple[str, int]:
    """(host, port) a pretrained tag downloads from: the hub ($HF_ENDPOINT) or its URL's."""
    return hf_hub_address() if tag_cfg.get("hf_hub") else url_address(tag_cfg.get("url", ""))


def cached_tag_file(tag_cfg: dict, cache_dir: str | None) -> str | None:
    """The local file for a pretrained tag if it is already downloaded, else None."""
    if tag_cfg.get("file"):
        return tag_cfg["file"]
    hf_hub = tag_cfg.get("hf_hub", "")
    if hf_hub:
        try:
            from huggingface_hub import try_to_load_from_cache
            from open_clip.pretrained import _get_safe_alternatives
            from open_clip.constants import HF_WEIGHTS_NAME
        except ImportError:
            return None
        # Same rule as open_clip.download_pretrained: 'org/repo/' means the default file name.
        repo_id, filename = os.path.split(hf_hub)
        filename = filename or HF_WEIGHTS_NAME
        for candidate in [*_get_safe_alternatives(filename), filename]:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = tag_cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return str(target) if target.is_file() else None
    return None


def resolve_pretrained_tag(name: str, tag: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """Local weights file for open_clip's (name, tag), downloading it when the hub is reachable."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = list_pretrained(name)
        known = ", ".join(tags) if tags else "none (use a local weights file)"
        raise ValueError(f"unknown pretrained tag {tag!r} for {name}; known tags: {known}. "
                         "A local weights file path also works.")
    cached = cached_tag_file(tag_cfg, cache_dir)
    if cached:
        return cached, tag_cfg
    host, port = _tag_address(tag_cfg)
    if offline_forced() or not reachable(host, port=port):
        raise OfflineError(
            f"weights for {name}/{tag} are not cached and {host or 'the hub'} cannot be reached. "
            f"On a machine with network, run clipkit.load_model({name!r}, pretrained={tag!r}) once to cache "
            f"them, or pass pretrained='path/to/weights.bin' (a local file), or use the offline "
            f"model load_model({DEFAULT_MODEL!r}).")
    log.info("downloading %s/%s from %s", name, tag, host)
    try:
        path = download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as exc:  # network errors come in many types
        raise OfflineError(f"could not download weights for {name}/{tag}: {exc}") from exc
    if not path:
        raise OfflineError(f"open_clip has no download location for {name}/{tag}")
    return path, tag_cfg


# ---------------------------------------------------------------------------------------------
# Weights: local files


def looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith(_WEIGHT_SUFFIXES) or os.path.exists(value)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a weights file safely; returns {'model': state_dict, 'itm': state_dict|None, 'meta': {...}}.

    Accepts clipkit checkpoints, open_clip state dicts (optionally under 'state_dict', optionally with
    DDP's 'module.' prefix) and .safetensors files. Pickles that need code to load are refused.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the weights file inside it")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        global_name = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if global_name:
            raise CheckpointError(
                f"refusing to load {path}: it asks to run code ({global_name.group(1)}) while unpickling, which "
                "weights_only=True forbids. If you trust it, re-save it as a plain state dict") from exc
        raise CheckpointError(f"cannot read weights file {path}: not a PyTorch or safetensors weights file, or "
                              "damaged") from exc
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"cannot read weights file {path}: not a PyTorch or safetensors weights file, or "
                              f"damaged ({type(exc).__name__}{': ' + first if first else ''})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(raw).__name__})")
    itm = None
    meta: dict = {}
    if raw.get("format") == CHECKPOINT_FORMAT:
        state, itm = dict(raw.get("model") or {}), raw.get("itm")
        meta = {k: v for k, v in raw.items() if k in ("model_name", "step", "version", "itm_config")}
        for name, sparse in (raw.get("sparse") or {}).items():  # compact export: absent rows are zero
            dense = torch.zeros(tuple(sparse["shape"]), dtype=sparse["values"].dtype)
            dense[sparse["rows"]] = sparse["values"]
            state[name] = dense
    elif isinstance(raw.get("state_dict"), dict):
        state = raw["state_dict"]
    else:
        state = raw
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no tensors in a state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {"model": state, "itm": itm, "meta": meta}


def _fit_logit_params(clip: torch.nn.Module, state: dict) -> None:
    """open_clip's own fixes for logit_scale / logit_bias (SigLIP): scalar vs 1-d, and a bias that a
    checkpoint of a model without one lacks (zero, as open_clip's load_checkpoint does)."""
    for name in ("logit_scale", "logit_bias"):
        current = getattr(clip, name, None)
        if name in state and current is not None and current.ndim != state[name].ndim:
            state[name] = state[name].reshape(current.shape)
    bias = getattr(clip, "logit_bias", None)
    if bias is not None and "logit_bias" not in state:
        state["logit_bias"] = torch.zeros_like(bias)


def load_state_into(clip: torch.nn.Module, state: dict, source: str, made_for: str | None = None) -> None:
    """Load an open_clip state dict, applying open_clip's own format conversions first (`made_for`: the model
    name the checkpoint records, named in the error when the weights do not fit)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = dict(state)
    try:
        state = convert_state_dict(clip, state)
        if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        _fit_logit_params(clip, state)
        position_ids = "text.transformer.embeddings.position_ids"  # transformers >= 4.31 text towers lack it
        if position_ids in state and position_ids not in clip.state_dict():
            del state[position_ids]
        resize_pos_embed(state, clip)
        resize_text_pos_embed(state, clip)
        clip.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:  # (open_clip's resizers assert)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if not line.startswith("Error(s) in loading")), type(exc).__name__)
        hint = f"; they were made for {made_for}: pass --model {made_for}" if made_for else ""
        raise CheckpointError(f"weights in {source} do not fit this model ({detail[:200]}){hint}") from exc


# ---------------------------------------------------------------------------------------------
# Loading


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash that tells different weights apart (samples every tensor, cheap for big models)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step][:256].to("cpu", torch.float32).contiguous().numpy()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def _preprocess_overrides(tag_cfg: dict) -> dict:
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
            "resize_mode": "image_resize_mode"}
    return {arg: tag_cfg[key] for key, arg in keys.items() if key in tag_cfg}


def _model_named_by(weights_file: str) -> str:
    """The model a weights file of `clipkit train` / `train-rerank` was made for (given as a model's name).
    Its tensors are memory-mapped, not read (the file is read once, when the model loads it); a file that
    cannot be mapped (not a zip-format torch file) is read through `read_checkpoint`, which says what it is."""
    try:
        raw = torch.load(weights_file, map_location="cpu", weights_only=True, mmap=True)
        made_for = raw.get("model_name") if raw.get("format") == CHECKPOINT_FORMAT else None
    except Exception:  # noqa: BLE001 - read_checkpoint reads it in full, or gives the error worth showing
        made_for = read_checkpoint(weights_file)["meta"].get("model_name")
    if not made_for:
        raise ValueError(f"{weights_file} is a weights file that does not name its model: give the model's name, "
                         f"with --pretrained {weights_file}")
    return made_for


def load_model(name: str, pretrained: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               cache_dir: str | None = None, precision: str | None = None,
               channels_last: bool | None = None) -> Model:
    """Load a dual encoder by open_clip architecture name (or a bundled clipkit model).

    `pretrained` is an open_clip tag (`"laion2b_s34b_b79k"`), a local weights file, None (a bundled
    model's own weights, else a fixed-seed random initialisation) or "scratch" (always that fixed-seed
    initialisation). `device=None` picks CUDA when available, else CPU. `precision`: "auto" (half precision
    under autocast on CUDA) or "fp32"; None: "fp32" when CLIPKIT_FP32 is on. `channels_last`: NHWC image
    batches (None: for convolutional towers on CUDA, unless CLIPKIT_CHANNELS_LAST=0).
    """
    if precision is None:
        precision = "fp32" if env_flag("CLIPKIT_FP32") else "auto"
    if precision not in ("auto", "fp32"):
        raise ValueError(f"precision must be 'auto' or 'fp32', got {precision!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if pretrained is None and os.path.isdir(name) and checkpoint_paths(Path(name)):  # a `clipkit train` run
        name = weights_in(name)
    if pretrained is None and name.lower().endswith(_WEIGHT_SUFFIXES) and os.path.isfile(name):
        return load_model(_model_named_by(name), name, device=device, cache_dir=cache_dir, precision=precision,
                          channels_last=channels_last)
    from clipkit.hf import HF_PREFIX, is_hf_name

    if is_hf_name(name) or _bare_hub_repo(name):
        name = name if is_hf_name(name) else HF_PREFIX + name
        return _load_transformers_model(name, pretrained, resolve_device(device), precision)
    device = resolve_device(device)
    if name.startswith(HF_HUB_PREFIX):  # an open_clip model published on the hub: config and weights there
        clip, preprocess, config = _create_from_hub(name)
        weights_file, recorded = _local_weights(pretrained)
    else:
        clip, preprocess, config, weights_file, recorded = _create_open_clip(name, pretrained, cache_dir)
    checkpoint = read_checkpoint(weights_file) if weights_file else None
    if checkpoint is not None:
        load_state_into(clip, checkpoint["model"], weights_file, checkpoint["meta"].get("model_name"))
    clip.to(device).eval()

    tokenizer = _tokenizer(name, config, cache_dir)
    model = Model(
        name=name,
        pretrained=recorded,
        clip=clip,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        dim=int(config["embed_dim"]),
        image_size=_image_size(clip),
        context_length=int(getattr(tokenizer, "context_length", config["text_cfg"].get("context_length", 77))),
        fingerprint=fingerprint(clip),
    )
    if checkpoint is not None and checkpoint["itm"] is not None:
        model.itm = _load_itm_head(checkpoint, weights_file, device)
    model.precision = precision
    model.untrained = weights_file is None and recorded != TOWERS and not name.startswith(HF_HUB_PREFIX)
    if channels_last if channels_last is not None else wants_channels_last(clip, device):
        set_channels_last(model)
    return model


def warn_untrained(model: Model) -> None:
    """Say so when `model` has random weights (an architecture named without --pretrained): its embeddings
    index and search without error, and mean nothing."""
    if model.untrained:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model.name)
        hint = f" (open_clip's tags for it: {', '.join(tags[:4])})" if tags else ""
        log.warning("%s is untrained here: no weights were given, so it has a random initialisation and its "
                    "embeddings mean nothing; pass --pretrained TAG or a weights file%s", model.name, hint)


def _bare_hub_repo(name: str) -> bool:
    """Whether `name` is a Hugging Face hub repository typed without `hf:` (`openai/clip-vit-base-patch32`):
    ORG/REPO that is no path here and no open_clip name, whose config.json is cached or the hub reachable."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or os.path.exists(name) or name in list_models():
        return False
    return hub_cached(name, "config.json") or hub_reachable()


def _create_open_clip(name: str, pretrained, cache_dir: str | None) -> tuple:
    """(model with clipkit's fixed-seed initialisation, preprocess, model config, the weights file to load
    or None, what the model records as `pretrained`) of an open_clip architecture name."""
    import open_clip

    register_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(_unknown_model_message(name))
    towers = pretrained == TOWERS
    weights_file, tag_cfg, recorded = (None, {}, TOWERS) if towers else _resolve_weights(name, pretrained, cache_dir)
    if towers and not _separate_towers(config):
        raise ValueError(f"pretrained='towers' is for models built from a timm image tower and a Hugging Face "
                         f"text tower (such as clipkit-bert-resnet50); {name} is not one")
    try:
        hub = hub_offline_when_unreachable() if _separate_towers(config) else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), _quiet_open_clip(), hub:  # (a tower from the hub: its cache)
            torch.manual_seed(_INIT_SEED)
            clip, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, pretrained_image=towers, pretrained_text=towers,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)), **_preprocess_overrides(tag_cfg))
            _apply_extensions(clip, name)
    except OSError as exc:  # a Hugging Face tower's files: neither cached nor reachable
        raise OfflineError(f"{name}: its towers' files could not be loaded ({first_line(exc)}); load it once on a "
                           "machine online, or copy the Hugging Face cache (~/.cache/huggingface/hub)") from exc
    return clip, preprocess, config, weights_file, recorded


def _separate_towers(config: dict) -> bool:
    return "timm_model_name" in config.get("vision_cfg", {}) or "hf_model_name" in config.get("text_cfg", {})


def _create_from_hub(name: str) -> tuple[torch.nn.Module, Callable, dict]:
    """(model, preprocess, model config) of open_clip's `hf-hub:ORG/REPO` (open_clip_config.json and weights
    in the repository), from the Hugging Face cache, or downloaded when the hub is reachable."""
    import open_clip

    repo = name[len(HF_HUB_PREFIX):]
    if not hub_cached(repo, "open_clip_config.json") or not any(hub_cached(repo, f) for f in HUB_WEIGHT_FILES):
        require_hub(repo)
    try:
        with _quiet_open_clip(), hub_offline_when_unreachable():
            clip, _, preprocess = open_clip.create_model_and_transforms(name)
        config = open_clip.get_model_config(name) or _hub_model_config(repo)
    except (OSError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"cannot load {name} through open_clip: {first_line(exc)}") from exc
    return clip, preprocess, config


HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's, on the hub


def _tokenizer(name: str, config: dict, cache_dir: str | None):
    """open_clip's tokenizer of `name`. One kept in a hub repository (text_cfg's hf_tokenizer_name: SigLIP,
    SigLIP 2, CLIPA, MetaCLIP 2, NLLB-CLIP, ...) is read from the Hugging Face cache without a request while
    the hub cannot be reached (huggingface_hub retried each file for up to a minute first); not cached, it is
    downloaded where the hub is reachable, else a one-line error at once."""
    import open_clip

    from clipkit.hf import TOKENIZER_FILES

    repo = (config.get("text_cfg") or {}).get("hf_tokenizer_name") or ""
    if not repo and not name.startswith(HF_HUB_PREFIX):
        return open_clip.get_tokenizer(name, cache_dir=cache_dir)
    if repo and not os.path.isdir(repo) and not any(hub_cached(repo, f, cache_dir)
                                                    for f in ("tokenizer_config.json", *TOKENIZER_FILES)):
        require_hub(repo, what=f"{name}'s tokenizer")
    try:
        with _quiet_open_clip(), hub_offline_when_unreachable():
            return open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except OSError as exc:  # (cached in part)
        raise OfflineError(f"{name}: its tokenizer ({repo or name}) could not be loaded ({first_line(exc)}); load "
                           "it once on a machine online, or copy the Hugging Face cache (~/.cache/huggingface/hub)"
                           ) from exc


def _hub_model_config(repo: str) -> dict:
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(repo, "open_clip_config.json"), encoding="utf-8") as handle:
        return json.load(handle)["model_cfg"]


def _local_weights(pretrained) -> tuple[str | None, str | None]:
    """(file to read, what the model records) for weights given as a local file (or None)."""
    if pretrained is None:
        return None, None
    pretrained = weights_in(os.fspath(pretrained))
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f"weights file not found: {pretrained}")
    return pretrained, str(Path(pretrained).resolve())


_RUN_CHECKPOINT = re.compile(r"^ckpt-(\d{7})\.pt$")  # what `clipkit train` writes into its run folder


def checkpoint_paths(out: Path) -> list[Path]:
    """The checkpoints of a `clipkit train` run folder, oldest first."""
    return sorted(p for p in out.glob("ckpt-*.pt") if _RUN_CHECKPOINT.match(p.name))


def weights_in(path: str) -> str:
    """`path`, or, for the folder of a `clipkit train` run (ckpt-NNNNNNN.pt files), its latest checkpoint."""
    if os.path.isdir(path):
        found = checkpoint_paths(Path(path))
        if found:
            log.info("%s is a training run: its latest checkpoint, %s", path, found[-1].name)
            return str(found[-1])
    return path


def _load_transformers_model(name: str, pretrained, device: torch.device, precision: str) -> Model:
    """A transformers checkpoint (`clipkit.hf`), optionally with the weights of a clipkit checkpoint
    trained from it (`pretrained`: the file `clipkit train` wrote)."""
    from clipkit.hf import load_transformers

    parts = load_transformers(name, device)
    clip, checkpoint = parts["clip"], None
    pretrained, recorded = _local_weights(pretrained)
    if pretrained is not None:
        checkpoint = read_checkpoint(pretrained)
        try:
            clip.load_state_dict(checkpoint["model"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {pretrained} do not fit {name}: {first_line(exc)}") from exc
    clip.to(device).eval()
    model = Model(name=parts["name"], pretrained=recorded, clip=clip, preprocess=parts["preprocess"],
                  tokenizer=parts["tokenizer"], device=device, dim=parts["dim"], image_size=parts["image_size"],
                  context_length=parts["context_length"], fingerprint=fingerprint(clip), precision=precision,
                  vectors_per_image=parts.get("vectors_per_image", 1))
    if checkpoint is not None and checkpoint["itm"] is not None:
        model.itm = _load_itm_head(checkpoint, pretrained, device)
    return model


def _resolve_weights(name: str, pretrained, cache_dir: str | None) -> tuple[str | None, dict, str | None]:
    """(the weights file to read or None, open_clip's tag config, what the model records as `pretrained`)."""
    import open_clip

    if pretrained is None and name in bundled_models():
        return str(bundled_models()[name]), {}, None
    if pretrained is None or pretrained == SCRATCH:
        return None, {}, None
    pretrained = os.fspath(pretrained)
    if open_clip.get_pretrained_cfg(name, pretrained):
        weights_file, tag_cfg = resolve_pretrained_tag(name, pretrained, cache_dir)
        return weights_file, tag_cfg, pretrained
    if looks_like_path(pretrained):
        pretrained = weights_in(pretrained)
        if not os.path.exists(pretrained):
            raise FileNotFoundError(f"weights file not found: {pretrained}")
        return pretrained, {}, str(Path(pretrained).resolve())
    resolve_pretrained_tag(name, pretrained, cache_dir)  # raises with the list of known tags
    return None, {}, None


def load_recorded_model(info: dict | None, *, device: str | torch.device | None = None,
                        precision: str | None = None) -> Model:
    """The model an index records (its name and weights, as `Model.info` wrote them), loaded on `device`;
    weights that are not the recorded ones any more (another file at that path) are refused."""
    if not info:
        raise ValueError("this index records no model; pass model= to embed the query, or search by vector")
    try:
        model = load_model(info["name"], info.get("pretrained"), device=device, precision=precision)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"the index was built with {info['name']} and the weights {info.get('pretrained')}, "
                                f"which are no longer there ({exc}): put the file back (a training run's "
                                "--keep-last may have pruned it), or give the same weights where they are now "
                                "(`clipkit index --model NAME --pretrained FILE`, model= in Python)") from None
    if model.fingerprint != info.get("fingerprint", model.fingerprint):
        raise ModelMismatchError(
            f"the index was built with {info['name']} and the weights {info.get('pretrained')} (fingerprint "
            f"{info.get('fingerprint')}), which are other weights now (fingerprint {model.fingerprint}): put the "
            "original weights back, or index into a new index with these")
    return model


def wants_channels_last(clip: torch.nn.Module, device: torch.device | str) -> bool:
    """Whether the image tower should run in NHWC: convolutional towers (ResNets, ConvNeXts) on CUDA,
    where cuDNN's tensor-core kernels want that layout. A ViT has one convolution (its patch embedding)
    and gains nothing. CLIPKIT_CHANNELS_LAST=0 turns it off."""
    if torch.device(device).type != "cuda" or not env_flag("CLIPKIT_CHANNELS_LAST", True) \
            or not hasattr(clip, "visual"):
        return False
    return sum(isinstance(m, torch.nn.Conv2d) for m in clip.visual.modules()) > 1


def set_channels_last(model: Model) -> None:
    """Put the image tower's weights, and from now on each image batch, in channels-last layout."""
    model.clip.visual.to(memory_format=torch.channels_last)
    model.channels_last = True


def _load_itm_head(checkpoint: dict, source: str, device: torch.device) -> torch.nn.Module:

    config = checkpoint["meta"].get("itm_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source} has ITM weights but no itm_config to build the head from")
    try:
        head = build_head_from_config(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has an itm_config clipkit cannot build a head from: {exc}") from exc
    try:
        head.load_state_dict({k: v.float() for k, v in checkpoint["itm"].items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"ITM weights in {source} do not fit its itm_config: {first_line(exc)}") from exc
    return head.to(device).eval()


class _DropOpenClipRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs through the root logger while building (e.g. 'initialized randomly' before we load
    weights ourselves); those records describe its internals, not the model the user gets."""
    drop = _DropOpenClipRecords()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _image_size(clip: torch.nn.Module) -> int:
    size = getattr(getattr(clip, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def export_compact(training_checkpoint: str | os.PathLike, path: str | os.PathLike,
                   itm: torch.nn.Module | None = None) -> dict:
    """Write a small inference checkpoint from a training one: fp16 weights, no optimizer state, and
    only the token-embedding rows that training changed (the rest are stored as absent, read as zero).
    `itm`: an ITM head to store instead of the checkpoint's own (e.g. one from `clipkit.rerank_train`).
    A compact checkpoint (this function's output) is taken as it is, its sparse rows kept.
    Returns {'rows_kept', 'bytes', 'step'} (the training step the weights are from).

    Training leaves unseen vocabulary rows at their initial values (no weight decay on embeddings),
    so dropping them changes nothing for any text made of words seen in training.
    """
    from clipkit._io import atomic_write_with

    raw = torch.load(training_checkpoint, map_location="cpu", weights_only=True)
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{training_checkpoint} is not a clipkit checkpoint")
    name = raw["model_name"]
    initial = load_model(name, SCRATCH, device="cpu").clip.state_dict()
    state = dict(raw["model"])
    sparse = dict(raw.get("sparse") or {})
    key = "token_embedding.weight"
    if key in state:
        weights = state.pop(key)
        rows = torch.nonzero((weights != initial[key]).any(dim=1)).squeeze(1)
        sparse[key] = {"shape": list(weights.shape), "rows": rows, "values": weights[rows].half()}
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "model_name": name, "step": raw.get("step"),
               "model": {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()},
               "sparse": sparse}
    itm_state = itm.state_dict() if itm is not None else raw.get("itm")
    payload["itm"] = {k: v.detach().cpu().half() for k, v in itm_state.items()} if itm_state else None
    payload["itm_config"] = itm.config if itm is not None else raw.get("itm_config")
    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))
    return {"rows_kept": int(sparse[key]["rows"].numel()) if sparse else None, "bytes": os.path.getsize(path),
            "step": raw.get("step")}


def save_checkpoint(model: Model, path: str | os.PathLike, **extra) -> None:
    """Write `model`'s weights as a clipkit checkpoint (atomically)."""
    from clipkit._io import atomic_write_with

    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "model_name": model.name,
               "model": {k: v.detach().cpu() for k, v in model.clip.state_dict().items()},
               "itm": {k: v.detach().cpu() for k, v in model.itm.state_dict().items()} if model.itm is not None else None,
               "itm_config": getattr(model.itm, "config", None), **extra}
    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))
