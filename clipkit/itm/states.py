"""The towers' token states that ITM heads read: a caption's token states after the text tower's final
norm, an image's patch tokens, their padding, and the text tower run only as far as a batch needs."""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn as nn

_FLAG_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_FLAG_LOCKS_LOCK = threading.Lock()


def flags_lock(clip: nn.Module) -> threading.RLock:
    """The lock of a model whose towers' `output_tokens` flags the token helpers below set while they run: held
    by them and by `Model.encode_text` / `encode_image`, so that a thread encoding never meets a flag another
    thread set (one model shared by threads: an `Index`'s, or one `clipkit.search` keeps for searches by path)."""
    with _FLAG_LOCKS_LOCK:
        lock = _FLAG_LOCKS.get(clip)
        if lock is None:
            lock = _FLAG_LOCKS[clip] = threading.RLock()
        return lock


def exact_text_length(clip: torch.nn.Module, tokens: torch.Tensor) -> int | None:
    """How many leading token positions determine this batch's pooled text features exactly, or None.

    In CLIP's text tower attention is causal and the pooled feature is read at the end-of-text token
    ('argmax' / 'eos' pooling) or the first one, so positions after the batch's last end-of-text token
    cannot change it. Towers without a causal mask, pooling at the last position, or not built from
    open_clip's own text transformer (Hugging Face towers) need every position: None.
    """
    if not hasattr(clip, "token_embedding") or getattr(clip, "attn_mask", None) is None:
        return None
    pool = getattr(clip, "text_pool_type", "argmax")
    if pool == "first":
        return 1
    if pool == "argmax":
        ends = tokens.argmax(dim=-1)
    elif pool == "eos" and getattr(clip, "text_eos_id", None) is not None:
        ends = (tokens == clip.text_eos_id).int().argmax(dim=-1)
    else:
        return None
    return int(ends.max()) + 1 if len(ends) else None


def text_forward(clip: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled text feature as encode_text computes it, unnormalised; token states after the final norm).

    `tokens` may be cut to fewer positions than the context (see `exact_text_length`): the
    positional embedding and the causal mask are cut to match.
    """
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    mask = clip.attn_mask
    x = clip.transformer(x, attn_mask=mask[:length, :length] if mask is not None else None)
    states = clip.ln_final(x)
    pooled = text_global_pool(states, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if isinstance(pooled, tuple):
        pooled = pooled[0]
    projection = clip.text_projection
    if projection is not None:
        pooled = projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
    return pooled, states


def tower_widths(clip: nn.Module) -> tuple[int, int]:
    """(text token width, image token width) of a model whose towers yield token states: an open_clip ViT or
    timm (e.g. ResNet: its last feature map's positions) image tower, and a CLIP or Hugging Face text tower."""
    from open_clip.transformer import VisionTransformer

    if hasattr(clip, "token_widths"):  # towers that say so themselves (transformers models)
        return clip.token_widths()
    visual = clip.visual
    if isinstance(visual, VisionTransformer):
        image_width = visual.transformer.width
    elif _timm_tower(visual):
        image_width = visual.trunk.num_features
    else:
        raise ValueError(f"ITM needs an image tower that yields token states (a ViT or a timm tower); "
                         f"{type(visual).__name__} does not: train it without one (clipkit train --no-itm)")
    if hasattr(clip, "token_embedding"):
        text_width = clip.transformer.width
    elif hasattr(getattr(clip.text, "transformer", None), "config"):  # a Hugging Face text tower (BERT, ...)
        text_width = clip.text.transformer.config.hidden_size
    else:
        text_width = clip.text.transformer.width
    return text_width, image_width


def _timm_tower(visual: nn.Module) -> bool:
    return hasattr(getattr(visual, "trunk", None), "forward_features")


def encode_image_tokens(clip: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embedding as encode_image computes it, unnormalised; patch token states)."""
    if hasattr(clip, "image_tokens"):  # towers that give their tokens themselves (transformers models)
        return clip.image_tokens(pixels)
    visual = clip.visual
    if _timm_tower(visual):  # open_clip's TimmModel: trunk (features, then its pooling) and a projection head
        features = visual.trunk.forward_features(pixels)
        pooled = visual.head(visual.trunk.forward_head(features))
        return pooled, features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
    with flags_lock(clip):
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = previous
    return pooled, tokens


def encode_text_tokens(clip: nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text embedding exactly as encode_text computes it, unnormalised; token states after the final norm)."""
    if hasattr(clip, "text_tokens"):
        return clip.text_tokens(text)
    if not hasattr(clip, "token_embedding") and hasattr(getattr(clip.text, "transformer", None), "config"):
        # open_clip's Hugging Face text tower (BERT, ...): its pooled output as it computes it, and every
        # position's state (its own token output leaves the CLS position out, so it no longer lines up with
        # the ids' padding mask)
        tower = clip.text
        mask = (text != tower.config.pad_token_id).long()
        out = tower.transformer(input_ids=text, attention_mask=mask)
        return tower.proj(tower.pooler(out, mask)), out.last_hidden_state
    if not hasattr(clip, "token_embedding"):  # CustomTextCLIP: the text tower can return its tokens
        tower = clip.text
        with flags_lock(clip):
            previous = tower.output_tokens
            tower.output_tokens = True
            try:
                return tower(text)
            finally:
                tower.output_tokens = previous
    return text_forward(clip, text)


def padding_mask(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """True where a position is padding (never the first token, so no row is all padding). Token ids with
    padding marked -1 (transformers tokenizers that give attention masks, see clipkit.hf) say so themselves."""
    mask = tokens < 0 if bool((tokens < 0).any()) else tokens == pad_id
    mask[:, 0] = False
    return mask


@torch.inference_mode()
def text_states(model, texts: list[str], batch_size: int = 256, pooled: bool = False) -> tuple:
    """(token states, padding mask) of captions, for the ITM head; with `pooled`, also their unit embeddings
    from the same pass (as `Model.encode_text` gives them), float32 on the CPU."""
    states, masks, embeddings = [], [], []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenize(texts[start:start + batch_size]).to(model.device)
        embedding, state = encode_text_tokens(model.clip, tokens)
        states.append(state)
        masks.append(padding_mask(tokens, getattr(model.clip, "pad_id", 0)))
        embeddings += [nn.functional.normalize(embedding.float(), dim=-1).cpu()] if pooled else []
    return (torch.cat(states), torch.cat(masks)) + ((torch.cat(embeddings),) if pooled else ())


@torch.inference_mode()
def image_states(model, pixels: torch.Tensor) -> torch.Tensor:
    """The ITM head's image input for a preprocessed image batch: the tower's patch token states, or for a
    head with its own image stem (`image_input`), that stem's tokens."""
    pixels = pixels.to(model.device)
    head = getattr(model, "itm", None)
    if head is not None and hasattr(head, "image_input"):
        return head.image_input(pixels.to(next(head.parameters()).dtype))
    return encode_image_tokens(model.clip, pixels)[1]
