"""In-batch hard negatives for ITM training (ALBEF/BLIP): for each caption an image and for each image a
caption, drawn in proportion to the softmax of their contrastive similarity, never from the same image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def itm_logits_and_labels(head: torch.nn.Module, text_states: torch.Tensor, text_padding: torch.Tensor,
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
