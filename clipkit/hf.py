"""Hugging Face `transformers` checkpoints as clipkit dual encoders (needs the `hf` extra).

`clipkit.load_model(DIR)` takes a directory written by `save_pretrained` (CLIPModel, SiglipModel, or any
transformers model with `get_text_features` / `get_image_features`), and `clipkit.load_model("hf:ORG/REPO")`
a hub repository through transformers' own cache (offline and not cached: an error at once). Images are
preprocessed and texts tokenised by the checkpoint's own image processor and tokenizer, so embeddings
equal transformers' `get_image_features` / `get_text_features`, unit-normalised. BLIP-2
(`Blip2ForImageTextRetrieval`) retrieves through its Q-Former (`Blip2DualEncoder`): one vector per query
token an image.

Texts: batches are padded to their longest text and the attention mask is passed where that is exact
(towers that pool a real token: CLIP, BERT-style); towers that pool the last position (SigLIP) or
tokenizers without masks get texts padded to the full context, as in training. Token id tensors mark
padding as -1, so the mask travels with them (through training batches too).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipkit._net import hub_cached, require_hub
from clipkit.errors import first_line

HF_PREFIX = "hf:"
# text towers that pool the last position, padding or not: their texts are padded to the full context, as
# in training, since any other padding changes what that position holds
LAST_TOKEN_POOLING = ("siglip", "siglip2")
PAD = -1  # padding positions in token id tensors (the attention mask, carried in the ids)


def is_hf_name(name: str) -> bool:
    """Whether `load_model(name)` means a transformers checkpoint: `hf:ORG/REPO`, or a directory holding one."""
    if name.startswith(HF_PREFIX):
        return True
    path = Path(name)
    if not (path / "config.json").is_file() or (path / "open_clip_config.json").is_file():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def folder_problem(path: Path) -> str:
    """Why a folder is no transformers checkpoint, in a few words."""
    config = path / "config.json"
    if not config.is_file():
        return "no config.json in it" if any(path.iterdir()) else "it is empty"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"its config.json is unreadable: {first_line(exc)}"
    return "its config.json has no model_type" if isinstance(data, dict) else "its config.json is not an object"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("loading Hugging Face transformers checkpoints needs the hf extra: "
                         "pip install 'clipkit[hf]'") from None
    return transformers


def hf_source(name: str) -> tuple[str, str, bool]:
    """(what from_pretrained takes, the name a model records, local files only) for `hf:ORG/REPO` or a
    directory. A repository not in the cache is downloaded only when the hub is reachable."""
    if not name.startswith(HF_PREFIX):
        return str(Path(name).resolve()), str(Path(name).resolve()), True
    repo = name[len(HF_PREFIX):]
    if repo.count("/") > 1 or not repo.strip("/"):
        raise ValueError(f"{name!r}: a hub model is named hf:ORG/REPO (such as hf:openai/clip-vit-base-patch32)")
    if hub_cached(repo, "config.json"):
        return repo, name, True
    require_hub(repo, alternative=", or pass a local directory")
    return repo, name, False


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def load_transformers(name: str, device: torch.device) -> dict[str, Any]:
    """The parts of a clipkit Model for a transformers checkpoint: {'clip', 'preprocess', 'tokenizer',
    'dim', 'image_size', 'context_length', 'name'}."""
    transformers = require_transformers()
    source, recorded, local_only = hf_source(name)
    with quiet_transformers():
        blip2 = _from_pretrained(transformers.AutoConfig, source, name, local_only).model_type == "blip-2"
        kind = transformers.Blip2ForImageTextRetrieval if blip2 else transformers.AutoModel
        model = _from_pretrained(kind, source, name, local_only)
        if not blip2 and not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise ValueError(f"{name} holds a {type(model).__name__}, not a dual encoder: clipkit loads transformers "
                             "models with get_text_features and get_image_features (CLIPModel, SiglipModel, ...)")
        tokenizer = _from_pretrained(transformers.AutoTokenizer, source, name, local_only)
        processor = _from_pretrained(transformers.AutoImageProcessor, source, name, local_only)
    check_tokenizer(tokenizer, source, name, local_only)
    tower = (Blip2DualEncoder if blip2 else HFDualEncoder)(model, tokenizer).to(device).eval()
    text = HFTokenizer(tokenizer, tower.context_length() if blip2 else context_length(model, tokenizer),
                       pad_to_max=model.config.model_type in LAST_TOKEN_POOLING)
    with torch.inference_mode():
        dim = tower.encode_text(text(["a"]).to(device)).shape[-1]
    return {"clip": tower, "preprocess": HFPreprocess(processor), "tokenizer": text, "dim": int(dim),
            "image_size": image_size(model.config.vision_config, processor), "context_length": text.context_length,
            "name": recorded, "vectors_per_image": int(model.config.num_query_tokens) if blip2 else 1}


def _from_pretrained(kind, source: str, name: str, local_only: bool):
    """`kind.from_pretrained(source)`, any failure (a truncated weights file, a broken config) as a one-line
    CheckpointError that names the checkpoint."""
    from clipkit.errors import CheckpointError

    try:
        return kind.from_pretrained(source, local_files_only=local_only)
    except ImportError:
        raise
    except Exception as exc:  # transformers and safetensors raise many types for a bad file
        raise CheckpointError(f"cannot load the transformers checkpoint {name}: {first_line(exc)}") from None


def check_tokenizer(tokenizer, source: str, name: str, local_only: bool) -> None:
    """Refuse a tokenizer that cannot tell texts apart: transformers falls back to an empty one when a
    checkpoint folder lacks its tokenizer files, and every text would then get the same embedding."""
    from clipkit.errors import CheckpointError

    missing = local_only and Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES)
    ids = tokenizer(["a cat", "a dog"])["input_ids"]
    if missing or ids[0] == ids[1]:
        raise CheckpointError(f"{name} has no usable tokenizer (no {', '.join(TOKENIZER_FILES[:3])} ... there, or "
                              "'a cat' and 'a dog' get the same tokens): save the tokenizer beside the model "
                              "(tokenizer.save_pretrained(DIR), or copy its files from the original checkpoint)")


def image_size(vision_config, processor) -> int:
    """The side of the images the vision tower takes (NaFlex towers, such as SigLIP 2's, take patches of any
    shape: their processor's largest square is the size images are read at)."""
    if getattr(vision_config, "image_size", None):
        return int(vision_config.image_size)
    patches = getattr(processor, "max_num_patches", None) or getattr(vision_config, "num_patches", 256)
    return int(round(patches ** 0.5)) * int(vision_config.patch_size)


class quiet_transformers:
    """Within it, transformers prints no progress bars ('Loading weights') and no warnings (its config
    notices): clipkit's commands say what matters themselves, and -q means quiet."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.level, self.bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)
        if self.bars:
            hf_logging.enable_progress_bar()


def context_length(model: nn.Module, tokenizer) -> int:
    """The longest text the text tower takes: its position table, or the tokenizer's limit if shorter."""
    positions = getattr(model.config.text_config, "max_position_embeddings", None) or 512
    limit = getattr(tokenizer, "model_max_length", None)
    return int(min(positions, limit)) if isinstance(limit, int) and limit > 0 else int(positions)


class HFTokenizer:
    """Texts -> a LongTensor of token ids (N, L), padding marked -1 where the tokenizer gives attention masks.

    Batches are padded to their longest text where that is exact (an attention mask hides the padding
    from a tower that pools a real token: CLIP's end of text, BERT's CLS), else to the full context."""

    def __init__(self, tokenizer, context_length: int, pad_to_max: bool = False):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.masked = "attention_mask" in tokenizer.model_input_names
        self.pad_to_max = pad_to_max or not self.masked

    def __call__(self, texts) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(texts, padding="max_length" if self.pad_to_max else "longest", truncation=True,
                                 max_length=self.context_length, return_tensors="pt")
        ids = encoded["input_ids"]
        if self.masked:
            ids = ids.masked_fill(encoded["attention_mask"] == 0, PAD)
        return ids


class HFPreprocess:
    """A PIL image -> the float tensor the checkpoint's image processor makes of it: CHW pixels, or for NaFlex
    processors (SigLIP 2: patches of any aspect ratio) its (patches, values) rows packed with each patch's
    attention mask and the image's patch grid, three more columns (`unpack_naflex` takes them apart), so that
    every path that stacks preprocessed images into batches carries them."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        out = self.processor(images=image, return_tensors="pt")
        if "spatial_shapes" not in out:
            return out["pixel_values"][0]
        pixels, mask, (height, width) = out["pixel_values"][0], out["pixel_attention_mask"][0], out["spatial_shapes"][0]
        grid = torch.tensor([float(height), float(width)]).expand(len(pixels), 2)
        return torch.cat([pixels, mask[:, None].to(pixels.dtype), grid.to(pixels.dtype)], dim=1)


def unpack_naflex(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keyword arguments of a NaFlex vision tower from a batch of `HFPreprocess` rows."""
    return {"pixel_values": packed[..., :-3], "pixel_attention_mask": packed[..., -3].round().long(),
            "spatial_shapes": packed[:, 0, -2:].float().round().long()}


class HFDualEncoder(nn.Module):
    """A transformers dual encoder behind open_clip's interface (`encode_image`, `encode_text`,
    `logit_scale`, `logit_bias`), plus the token states the ITM head reads (`image_tokens`, `text_tokens`)."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.naflex = "spatial_shapes" in inspect.signature(model.get_image_features).parameters

    def _image_inputs(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return unpack_naflex(pixels) if self.naflex else {"pixel_values": pixels}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)

    def token_widths(self) -> tuple[int, int]:
        config = self.model.config
        return int(config.text_config.hidden_size), int(config.vision_config.hidden_size)

    def image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embedding, unnormalised; the vision tower's token states)."""
        inputs = self._image_inputs(pixels)
        out = self.model.get_image_features(**inputs)
        if torch.is_tensor(out):  # transformers < 5: features only
            return out, self.model.vision_model(**inputs).last_hidden_state
        return out.pooler_output, out.last_hidden_state

    def text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text embedding, unnormalised; the text tower's token states) of ids as HFTokenizer makes them."""
        mask = tokens != PAD
        ids = tokens.masked_fill(~mask, self.pad_id)
        out = self.model.get_text_features(input_ids=ids, attention_mask=mask.long() if not mask.all() else None)
        if torch.is_tensor(out):
            return out, self.model.text_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out.pooler_output, out.last_hidden_state

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(**self._image_inputs(pixels))
        return out if torch.is_tensor(out) else out.pooler_output

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_tokens(tokens)[0]


class Blip2DualEncoder(nn.Module):
    """BLIP-2's image-text contrastive path (transformers `Blip2ForImageTextRetrieval`) behind the dual-encoder
    interface: `encode_image` gives one vector per learned query token (N, queries, dim) — the Q-Former's
    queries cross-attend to the frozen vision tower's tokens, then the vision projection — and `encode_text`
    one vector per text from the Q-Former's text path ([CLS], the text projection). Their similarity is the
    best query token's cosine, as `Blip2ForImageTextRetrieval(use_image_text_matching_head=False)` computes
    it; an index of such images keeps all the query vectors of each (`Index(vectors_per_item=...)`)."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def context_length(self) -> int:
        config = self.model.config
        return int(config.qformer_config.max_position_embeddings)

    @property
    def logit_scale(self) -> torch.Tensor:
        return torch.tensor(math.log(1 / 0.07))  # BLIP-2's contrastive temperature (it keeps it fixed here)

    @property
    def logit_bias(self) -> None:
        return None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        model = self.model
        states = model.vision_model(pixel_values=pixels).last_hidden_state
        queries = model.query_tokens.expand(len(states), -1, -1)
        encoded = model.qformer(query_embeds=queries, encoder_hidden_states=states,
                                encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long,
                                                                  device=states.device)).last_hidden_state
        return model.vision_projection(encoded.to(model.vision_projection.weight.dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        mask = tokens != PAD
        ids = tokens.masked_fill(~mask, self.pad_id)
        encoded = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0,
                                attention_mask=mask.long()).last_hidden_state
        return model.text_projection(encoded[:, 0, :].to(model.text_projection.weight.dtype))
