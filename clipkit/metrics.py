"""Retrieval metrics: Recall@K in both directions, mean and median rank (LAION CLIP_benchmark's definitions).

text->image: a caption scores a hit at K when its image is among its top K images.
image->text: an image scores a hit at K when any of its captions is among its top K captions.
Ranks start at 1. A tie counts against the query: an item scored equal to the right answer ranks
ahead of it (pessimistic, so a constant model gets chance-level recall, never perfect recall).
Everything is computed in blocks of rows, never with a full argsort.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

_BLOCK = 1024


def _validate(n_texts: int, n_images: int, text_to_image) -> np.ndarray:
    mapping = np.asarray(text_to_image)
    if mapping.ndim != 1 or len(mapping) != n_texts:
        raise ValueError(f"text_to_image must have one entry per caption ({n_texts}), got shape {mapping.shape}")
    if not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError("text_to_image must hold integer image indices")
    if n_texts == 0 or n_images == 0:
        raise ValueError("need at least one caption and one image")
    if mapping.min() < 0 or mapping.max() >= n_images:
        raise ValueError(f"text_to_image holds indices outside 0..{n_images - 1}")
    return mapping.astype(np.int64)


def text_to_image_ranks(rows: Callable[[int, int], np.ndarray], n_texts: int, mapping: np.ndarray,
                        block: int = _BLOCK) -> np.ndarray:
    """Rank of each caption's image; `rows(start, stop)` gives similarity rows (captions x images)."""
    ranks = np.empty(n_texts, dtype=np.int64)
    for start in range(0, n_texts, block):
        sims = np.asarray(rows(start, min(start + block, n_texts)), dtype=np.float32)
        target = sims[np.arange(len(sims)), mapping[start:start + len(sims)]]
        ranks[start:start + len(sims)] = (sims >= target[:, None]).sum(axis=1)  # includes itself
    return ranks


def image_to_text_ranks(columns: Callable[[int, int], np.ndarray], n_images: int, mapping: np.ndarray,
                        block: int = _BLOCK) -> np.ndarray:
    """Rank of each image's best-ranked caption; `columns(start, stop)` gives (images x captions) blocks."""
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, block):
        sims = np.asarray(columns(start, min(start + block, n_images)), dtype=np.float32)
        own = mapping[None, :] == np.arange(start, start + len(sims))[:, None]  # (block, n_texts)
        best_own = np.where(own, sims, -np.inf).max(axis=1)
        # captions of other images scored at least as high, plus one for the best own caption
        ranks[start:start + len(sims)] = ((sims >= best_own[:, None]) & ~own).sum(axis=1) + 1
        ranks[start:start + len(sims)][~own.any(axis=1)] = sims.shape[1] + 1  # an image with no caption never hits
    return ranks


def summarize(t2i: np.ndarray, i2t: np.ndarray, ks: Sequence[int]) -> dict:
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i <= k).mean())
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t <= k).mean())
    out.update(t2i_mean_rank=float(t2i.mean()), t2i_median_rank=float(np.median(t2i)),
               i2t_mean_rank=float(i2t.mean()), i2t_median_rank=float(np.median(i2t)))
    return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


def recall_at_k(similarity, text_to_image, ks: Sequence[int] = (1, 5, 10), block: int = _BLOCK) -> dict:
    """Recall@K both ways and mean/median ranks from a (n_texts, n_images) similarity matrix.

    `similarity` may be a numpy array or a memory-mapped one; it is read in blocks of rows/columns.
    """
    ks = _check_ks(ks)
    if getattr(similarity, "ndim", None) != 2:
        similarity = np.asarray(similarity)
        if similarity.ndim != 2:
            raise ValueError(f"similarity must be 2-D (n_texts, n_images), got shape {similarity.shape}")
    n_texts, n_images = similarity.shape
    mapping = _validate(n_texts, n_images, text_to_image)
    t2i = text_to_image_ranks(lambda a, b: similarity[a:b], n_texts, mapping, block)
    i2t = image_to_text_ranks(lambda a, b: np.asarray(similarity[:, a:b]).T, n_images, mapping, block)
    return summarize(t2i, i2t, ks)


def recall_from_embeddings(text_emb: np.ndarray, image_emb: np.ndarray, text_to_image,
                           ks: Sequence[int] = (1, 5, 10), block: int = _BLOCK) -> dict:
    """Like `recall_at_k` with similarity = text_emb @ image_emb.T, computed block by block (never whole)."""
    ks = _check_ks(ks)
    text_emb, image_emb = np.asarray(text_emb, np.float32), np.asarray(image_emb, np.float32)
    mapping = _validate(len(text_emb), len(image_emb), text_to_image)
    t2i = text_to_image_ranks(lambda a, b: text_emb[a:b] @ image_emb.T, len(text_emb), mapping, block)
    i2t = image_to_text_ranks(lambda a, b: image_emb[a:b] @ text_emb.T, len(image_emb), mapping, block)
    return summarize(t2i, i2t, ks)
