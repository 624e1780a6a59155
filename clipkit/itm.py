"""Image-text matching (ITM): a fusion head over the two towers' token states, and hard negatives.

As in ALBEF/BLIP: the caption's token states pass a few fusion layers (self-attention over the text,
cross-attention to the image's patch tokens, feed-forward); a linear layer on the first token says
match / no match. Training pairs per batch: the B positives, plus for each caption one hard-negative
image and for each image one hard-negative caption, drawn in proportion to the softmax of their
contrastive similarity, never from the same image.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def __init__(self, text_width: int, image_width: int, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.config = {"text_width": text_width, "image_width": image_width, "width": width, "layers": layers,
                       "heads": heads}
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
                 kind: str = "late"):
        super().__init__()
        if kind != "late":
            raise ValueError(f"LateInteractionHead is kind 'late', not {kind!r}")
        self.config = {"kind": "late", "text_width": text_width, "image_size": image_size, "width": width,
                       "rerank_weight": float(rerank_weight)}
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


def rerank_weight(head: nn.Module, weight: float | None) -> float:
    """The cosine weight of a re-ranked score: the caller's, else the one the head was fitted with (else 0)."""
    if weight is not None:
        return float(weight)
    return float(getattr(head, "config", {}).get("rerank_weight", 0.0))


def tower_widths(clip: nn.Module) -> tuple[int, int]:
    """(text token width, image token width) of an open_clip model with a ViT image tower."""
    from open_clip.transformer import VisionTransformer

    visual = clip.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"ITM needs an image tower that yields patch tokens (a ViT); {type(visual).__name__} does not")
    image_width = visual.transformer.width
    text_width = clip.transformer.width if hasattr(clip, "token_embedding") else clip.text.transformer.width
    return text_width, image_width


def build_itm_head(clip: nn.Module, width: int = 128, layers: int = 2, heads: int = 4) -> ITMHead:
    text_width, image_width = tower_widths(clip)
    return ITMHead(text_width, image_width, width=width, layers=layers, heads=heads)


def encode_image_tokens(clip: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embedding as encode_image computes it, unnormalised; patch token states)."""
    visual = clip.visual
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(pixels)
    finally:
        visual.output_tokens = previous
    return pooled, tokens


def encode_text_tokens(clip: nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text embedding exactly as encode_text computes it, unnormalised; token states after the final norm)."""
    if not hasattr(clip, "token_embedding"):  # CustomTextCLIP: the text tower can return its tokens
        tower = clip.text
        previous = tower.output_tokens
        tower.output_tokens = True
        try:
            return tower(text)
        finally:
            tower.output_tokens = previous
    from clipkit.models import text_forward

    return text_forward(clip, text)


def padding_mask(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """True where a position is padding (never the first token, so no row is all padding)."""
    mask = tokens == pad_id
    mask[:, 0] = False
    return mask


@torch.no_grad()
def sample_hard_negatives(similarity: torch.Tensor, image_ids: torch.Tensor,
                          generator: torch.Generator | None = None,
                          uniform_mix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One hard negative per caption (an image) and per image (a caption) from a (B, B) image-to-text similarity.

    Candidates sharing the anchor's image id are never drawn (not only the diagonal). Drawn with
    probability proportional to softmax(similarity), computed in fp32; rows whose valid candidates all
    underflow fall back to uniform over them; rows with no valid candidate at all are dropped.
    `uniform_mix` in [0, 1] mixes in the uniform distribution over valid candidates (easy negatives),
    which lets the head learn when the contrastive model already makes every softmax negative hard.
    Returns (negative image for each text, its row mask, negative text for each image, its row mask).
    """
    sim = torch.nan_to_num(similarity.detach().float(), nan=0.0, posinf=1e4, neginf=-1e4)
    valid = image_ids[:, None] != image_ids[None, :]  # symmetric: valid[i, j] when i and j show different images

    def draw(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = F.softmax(scores, dim=1).masked_fill(~valid, 0.0)
        underflow = (weights.sum(dim=1) <= 0) & valid.any(dim=1)
        weights[underflow] = valid[underflow].float()
        if uniform_mix > 0:
            hard = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
            easy = valid.float() / valid.sum(dim=1, keepdim=True).clamp_min(1)
            weights = (1 - uniform_mix) * hard + uniform_mix * easy
        has = valid.any(dim=1)
        picked = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        if has.any():
            picked[has] = torch.multinomial(weights[has], 1, generator=generator).squeeze(1)
        return picked, has

    negative_image, text_has = draw(sim.T)  # row t: candidate images for caption t
    negative_text, image_has = draw(sim)  # row i: candidate captions for image i
    return negative_image, text_has, negative_text, image_has


def itm_logits_and_labels(head: ITMHead, text_states: torch.Tensor, text_padding: torch.Tensor,
                          image_states: torch.Tensor, similarity: torch.Tensor, image_ids: torch.Tensor,
                          generator: torch.Generator | None = None,
                          uniform_mix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ITM head's logits on B positives + up to 2B hard negatives, and their labels (1 = match)."""
    negative_image, text_has, negative_text, image_has = sample_hard_negatives(similarity, image_ids, generator,
                                                                               uniform_mix)
    rows = torch.arange(len(image_ids), device=image_ids.device)
    texts = torch.cat([rows, rows[text_has], negative_text[image_has]])
    images = torch.cat([rows, negative_image[text_has], rows[image_has]])
    labels = torch.cat([torch.ones(len(rows)), torch.zeros(int(text_has.sum()) + int(image_has.sum()))]).long()
    logits = head(text_states[texts], text_padding[texts], image_states, image_index=images)
    return logits, labels.to(logits.device)


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


@torch.inference_mode()
def text_states(model, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(token states, padding mask) of captions, for the ITM head."""
    states, masks = [], []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(texts[start:start + batch_size]).to(model.device)
        states.append(encode_text_tokens(model.clip, tokens)[1])
        masks.append(padding_mask(tokens))
    return torch.cat(states), torch.cat(masks)


@torch.inference_mode()
def image_states(model, pixels: torch.Tensor) -> torch.Tensor:
    """The ITM head's image input for a preprocessed image batch: the tower's patch token states, or for a
    head with its own image stem (`image_input`), that stem's tokens."""
    pixels = pixels.to(model.device)
    head = getattr(model, "itm", None)
    if head is not None and hasattr(head, "image_input"):
        return head.image_input(pixels.to(next(head.parameters()).dtype))
    return encode_image_tokens(model.clip, pixels)[1]


def require_itm(model) -> ITMHead:
    if getattr(model, "itm", None) is None:
        raise ValueError(f"model {model.name!r} has no ITM head, so it cannot re-rank; use a model trained with "
                         "--itm (such as clipkit-demo) or search without rerank")
    return model.itm
