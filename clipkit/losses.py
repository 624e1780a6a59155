"""Contrastive losses (InfoNCE, CLIP's; sigmoid, SigLIP's) and the image-text matching loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    (all_reduce + slice rather than reduce_scatter, which gloo lacks.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return gather_no_grad(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank (equal shapes); gradients flow back to each rank's own slice."""
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(_world()[1])]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def _batch_ids(image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids: torch.Tensor | None,
               distributed: bool | None) -> tuple[torch.Tensor, bool]:
    """(the pairs' image ids, unique across ranks when not given; whether to gather across ranks)."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image and text embeddings must both be (B, D), got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    rank, world = _world()
    if image_ids is None:
        batch = image_emb.shape[0]
        image_ids = torch.arange(batch, device=image_emb.device) + rank * batch
    return image_ids, world > 1 if distributed is None else distributed


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
             image_ids: torch.Tensor | None = None, *, distributed: bool | None = None,
             extra_texts: torch.Tensor | None = None, extra_owners: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) over a batch of (image, caption) pairs.

    `image_emb`, `text_emb`: (B, D), normalised. `logit_scale` is already exponentiated (as
    open_clip's `ClipLoss` takes it). With `image_ids`, every caption of the same image is a positive
    (uniform soft targets over them), in both directions. Under torch.distributed (default: whenever
    it is initialised with several ranks) features and ids are gathered from all ranks with gradients
    through the local slice; each rank's loss covers its own rows, so the mean over ranks equals the
    single-process loss on the whole batch.

    `extra_texts` (M, D): captions that match no image (NegCLIP's hard negatives, such as the captions of
    each image's attribute-swapped twin), extra columns of the image -> text direction only; under
    torch.distributed each rank's own. `extra_owners` (M,): the local row each extra caption was written
    for; it is then a negative of that image only. (A swapped twin's caption is false of the image it was
    written for but true of the twin, which group batches put in the same batch: a negative for every
    row would push the twin away from its own description.)
    """
    image_ids, distributed = _batch_ids(image_emb, text_emb, image_ids, distributed)
    if distributed:
        all_images, all_texts = gather_with_grad(image_emb), gather_with_grad(text_emb)
        all_ids = gather_no_grad(image_ids)
    else:
        all_images, all_texts, all_ids = image_emb, text_emb, image_ids
    logits_per_text = logit_scale * text_emb @ all_images.T
    positives = (image_ids[:, None] == all_ids[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)  # one-hot when ids are unique: CLIP's loss
    image_targets = targets
    if extra_texts is not None and len(extra_texts):
        all_texts = torch.cat([all_texts, extra_texts])
        image_targets = torch.cat([targets, targets.new_zeros(len(targets), len(extra_texts))], dim=1)
    logits_per_image = logit_scale * image_emb @ all_texts.T  # local rows x all columns
    if extra_owners is not None and extra_texts is not None and len(extra_texts):
        logits_per_image = logits_per_image.masked_fill(~_owned(logits_per_image, extra_owners),
                                                        torch.finfo(logits_per_image.dtype).min / 4)
    return (soft_cross_entropy(logits_per_image, image_targets) + soft_cross_entropy(logits_per_text, targets)) / 2


def _owned(logits: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """(rows, columns) True where a pair counts: every batch column, and each extra column (the last
    len(owners)) in its owner's row only."""
    rows, columns = logits.shape
    keep = torch.ones(rows, columns, dtype=torch.bool, device=logits.device)
    keep[:, columns - len(owners):] = torch.arange(rows, device=logits.device)[:, None] == owners[None, :]
    return keep


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                 logit_bias: torch.Tensor | float, image_ids: torch.Tensor | None = None, *,
                 distributed: bool | None = None, extra_texts: torch.Tensor | None = None,
                 extra_owners: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, caption) pair of the batch is a binary match / no-match
    problem on logit_scale * cosine + logit_bias; summed over pairs, divided by the (local) batch size.

    Equal to open_clip's `SigLipLoss` in value and gradients (which take the positives from the diagonal);
    with `image_ids`, every caption of the same image is a positive. Under torch.distributed each rank's
    images meet every rank's captions, gathered with gradients through their own rank's slice; the mean
    over ranks equals the single-process loss on the whole batch. `extra_texts`, `extra_owners`: hard-negative
    captions and the rows they were written for, as for `info_nce`.
    """
    image_ids, distributed = _batch_ids(image_emb, text_emb, image_ids, distributed)
    batch = image_emb.shape[0]
    all_texts, all_ids = (gather_with_grad(text_emb), gather_no_grad(image_ids)) if distributed \
        else (text_emb, image_ids)
    labels = 2 * (image_ids[:, None] == all_ids[None, :]).to(image_emb.dtype) - 1
    if extra_texts is not None and len(extra_texts):
        all_texts = torch.cat([all_texts, extra_texts])
        labels = torch.cat([labels, -labels.new_ones(len(labels), len(extra_texts))], dim=1)
    logits = logit_scale * image_emb @ all_texts.T + logit_bias
    terms = -F.logsigmoid(labels * logits)
    if extra_owners is not None and extra_texts is not None and len(extra_texts):
        terms = terms * _owned(logits, extra_owners)
    return terms.sum() / batch


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the ITM head's 2-way logits (1 = match); returns (loss, accuracy)."""
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return loss, accuracy.detach()


def relation_loss(logits: torch.Tensor, targets: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    """Cross-entropy of several classification fields read from one (B, sum(classes)) logit matrix, averaged
    over the fields; `targets` (B, len(classes)), -100 where a sample has no label (0 when none has)."""
    if targets.shape[1] != len(classes) or logits.shape[1] != sum(classes):
        raise ValueError(f"expected {len(classes)} target fields and {sum(classes)} logits, got "
                         f"{targets.shape[1]} and {logits.shape[1]}")
    losses = [F.cross_entropy(part.float(), targets[:, i], ignore_index=-100)
              for i, part in enumerate(logits.split(list(classes), dim=1)) if bool((targets[:, i] >= 0).any())]
    return torch.stack(losses).mean() if losses else logits.sum() * 0.0
