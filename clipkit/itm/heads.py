"""ITM heads: the ALBEF-style fusion head over the towers' token states, and the late-interaction head
with its own pixel stem; building them from a checkpoint's config, and scoring (image, text) pairs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipkit.itm.states import tower_widths


class FusionLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, text: torch.Tensor, text_padding: torch.Tensor, image: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """`image`: (n_images, patches, width); text row r attends to image `image_index[r]` (default r)."""
        x = self.norm_self(text)
        text = text + self.self_attn(x, x, x, key_padding_mask=text_padding, need_weights=False)[0]
        text = text + self.cross(self.norm_cross(text), image, image_index)
        return text + self.mlp(self.norm_mlp(text))

    def cross(self, query: torch.Tensor, image: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
        """`self.cross_attn(query, image[image_index], image[image_index])`, with the keys and values
        projected once per distinct image rather than once per pair (training scores each image against
        up to three captions, re-ranking one image against many)."""
        attn = self.cross_attn
        width, heads = query.shape[-1], attn.num_heads
        q = F.linear(query, attn.in_proj_weight[:width], attn.in_proj_bias[:width])
        kv = F.linear(image, attn.in_proj_weight[width:], attn.in_proj_bias[width:])
        if image_index is not None:
            kv = kv[image_index]
        k, v = kv.chunk(2, dim=-1)

        def split(x):  # (rows, length, width) -> (rows, heads, length, width / heads)
            return x.unflatten(-1, (heads, width // heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return attn.out_proj(out.transpose(1, 2).flatten(2))


class ITMHead(nn.Module):
    """2-way match classifier over (text token states, text padding mask, image patch tokens)."""

    def __init__(self, text_width: int, image_width: int, width: int = 128, layers: int = 2, heads: int = 4,
                 rerank_weight: float = 0.0, rerank_weight_i2t: float | None = None):
        super().__init__()
        self.config = {"text_width": text_width, "image_width": image_width, "width": width, "layers": layers,
                       "heads": heads}
        if rerank_weight:  # fitted by clipkit.rerank_train (kind "fusion"): re-ranked score = log-odds + w x cosine
            self.config["rerank_weight"] = float(rerank_weight)
        if rerank_weight_i2t is not None:  # fitted on image -> text re-ranking (default: rerank_weight)
            self.config["rerank_weight_i2t"] = float(rerank_weight_i2t)
        self.text_in = nn.Linear(text_width, width)
        self.image_in = nn.Linear(image_width, width)
        self.layers = nn.ModuleList(FusionLayer(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, 2)

    def forward(self, text_tokens: torch.Tensor, text_padding: torch.Tensor, image_tokens: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (no match, match) for each text row against image `image_index[row]` of `image_tokens`
        (default: row for row, so texts and images aligned)."""
        text = self.text_in(text_tokens)
        image = self.image_in(image_tokens)
        for layer in self.layers:
            text = layer(text, text_padding, image, image_index)
        return self.classifier(self.norm(text[:, 0]))


class PixelStem(nn.Module):
    """Image tokens straight from the pixels: three stride-2 3x3 convolutions (32, 64, 128 channels) and one
    more, so one token per 8x8 pixels, each seeing about 30 pixels across, plus learned positions."""

    def __init__(self, image_size: int, width: int):
        super().__init__()
        layers, channels = [], 3
        for out in (32, 64, 128):
            layers += [nn.Conv2d(channels, out, 3, 2, 1), nn.GroupNorm(8, out), nn.GELU()]
            channels = out
        self.net = nn.Sequential(*layers, nn.Conv2d(channels, width, 3, 1, 1))
        self.positions = nn.Parameter(torch.randn((-(-image_size // 8)) ** 2, width) * 0.02)
        self.norm = nn.LayerNorm(width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(pixels).flatten(2).transpose(1, 2) + self.positions)


class LateInteractionHead(nn.Module):
    """Match score by late interaction (FILIP / ColBERT style) against the head's own image tokens.

    The image side is a conv stem over the pixels (`PixelStem`), not the image tower's patch tokens: a
    small ViT tower trained contrastively can match on colour alone and never learn shapes, and then no
    head reading its tokens can bind a colour to a shape. Each caption token (the text tower's causal
    states, so the token of "circle" in "a red circle" has seen "red") takes its best cosine over the
    image tokens; the score is `scale` x their mean over the caption's tokens after the first. Returned as
    logits (0, score), so the match log-odds is the score and `match_scores` serves both heads. Trained
    on frozen towers against ITC-mined candidates (`clipkit.rerank_train`); `rerank_weight` is the
    cosine weight fitted with it (re-ranked score = score + rerank_weight x cosine).
    """

    def __init__(self, text_width: int, image_size: int, width: int = 128, rerank_weight: float = 0.0,
                 kind: str = "late", rerank_weight_i2t: float | None = None):
        super().__init__()
        if kind != "late":
            raise ValueError(f"LateInteractionHead is kind 'late', not {kind!r}")
        self.config = {"kind": "late", "text_width": text_width, "image_size": image_size, "width": width,
                       "rerank_weight": float(rerank_weight)}
        if rerank_weight_i2t is not None:
            self.config["rerank_weight_i2t"] = float(rerank_weight_i2t)
        self.stem = PixelStem(image_size, width)
        self.text = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width))
        self.image = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.tensor(10.0))

    @property
    def rerank_weight(self) -> float:
        return self.config["rerank_weight"]

    def image_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """The head's image tokens (unit norm) from preprocessed pixels (the image tower is not used)."""
        return F.normalize(self.image(self.stem(pixels)), dim=-1)

    def text_input(self, text_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(text_tokens), dim=-1)

    def _pool(self, best: torch.Tensor, text_padding: torch.Tensor) -> torch.Tensor:
        """Mean of best-match cosines (rows, length, ...) over each caption's tokens after the first."""
        keep = (~text_padding).to(best.dtype)
        keep[:, 0] = 0
        keep = keep.view(*keep.shape, *([1] * (best.dim() - 2)))
        return self.scale * (best * keep).sum(1) / keep.sum(1).clamp_min(1)

    def score_matrix(self, text_tokens: torch.Tensor, text_padding: torch.Tensor,
                     image_tokens: torch.Tensor) -> torch.Tensor:
        """Scores of every caption against every image, `(captions, images)` (training)."""
        best = torch.einsum("cld,npd->clnp", self.text_input(text_tokens), image_tokens).amax(dim=-1)
        return self._pool(best, text_padding)

    def forward(self, text_tokens: torch.Tensor, text_padding: torch.Tensor, image_tokens: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (0, score) for each text row against image `image_index[row]` (default: row for row)."""
        image = image_tokens if image_index is None else image_tokens[image_index]
        best = torch.einsum("rld,rpd->rlp", self.text_input(text_tokens), image).amax(dim=-1)
        score = self._pool(best, text_padding)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def build_head_from_config(config: dict) -> nn.Module:
    """The ITM head a checkpoint's `itm_config` describes: the fusion head, or kind 'late'."""
    config = dict(config)
    kind = config.pop("kind", "fusion")
    if kind == "late":
        return LateInteractionHead(**config)
    if kind != "fusion":
        raise ValueError(f"unknown ITM head kind {kind!r} (known: fusion, late); a newer clipkit wrote it")
    return ITMHead(**config)


DIRECTIONS = ("t2i", "i2t")  # text -> image (a text query re-ranks images), image -> text


def rerank_weight(head: nn.Module, weight: float | None, direction: str = "t2i") -> float:
    """The cosine weight of a re-ranked score: the caller's, else the one the head was fitted with for that
    direction (image -> text: its own when fitted, else text -> image's; else 0)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if weight is not None:
        return float(weight)
    config = getattr(head, "config", {})
    t2i = float(config.get("rerank_weight", 0.0))
    return float(config.get("rerank_weight_i2t", t2i)) if direction == "i2t" else t2i


def build_itm_head(clip: nn.Module, width: int = 128, layers: int = 2, heads: int = 4) -> ITMHead:
    text_width, image_width = tower_widths(clip)
    return ITMHead(text_width, image_width, width=width, layers=layers, heads=heads)


@torch.inference_mode()
def match_scores(head: ITMHead, text_states: torch.Tensor, text_padding: torch.Tensor,
                 image_states: torch.Tensor, image_index: torch.Tensor | None = None,
                 batch_size: int = 256) -> torch.Tensor:
    """ITM log-odds of a match, logit(match) - logit(no match), for each text row against image
    `image_index[row]` of `image_states` (default: row for row).

    Each batch is cut to its longest caption: padding is masked as attention keys and only the first
    token is classified, so the positions after it cannot change the result. Each distinct image of a
    batch is projected once, however many captions it is scored against.
    """
    scores = []
    for start in range(0, len(text_states), batch_size):
        stop = start + batch_size
        padding = text_padding[start:stop]
        length = int((~padding).sum(dim=1).max())
        if image_index is None:
            images, local = image_states[start:stop], None
        else:
            used, local = torch.unique(image_index[start:stop].to(image_states.device), return_inverse=True)
            images = image_states[used]
        logits = head(text_states[start:stop, :length], padding[:, :length], images, image_index=local).float()
        scores.append(logits[:, 1] - logits[:, 0])
    return torch.cat(scores) if scores else torch.zeros(0)


def require_itm(model) -> ITMHead:
    if getattr(model, "itm", None) is None:
        raise ValueError(f"model {model.name!r} has no ITM head, so it cannot re-rank; use a model trained with "
                         "--itm (such as clipkit-demo) or search without rerank")
    return model.itm
