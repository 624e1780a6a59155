"""Reading webdataset shards for training: deterministic, resumable, split by rank and worker.

The order of samples is a pure function of (seed, epoch, rank, world size, number of workers):
shards are shuffled with one generator shared by all ranks, dealt out by rank and then by worker,
and samples pass a shuffle buffer seeded per (seed, epoch, rank, worker). Raw bytes sit in the
buffer; images are decoded after it. A bad sample is skipped and counted, never fatal, but a shard
set whose samples all lack the image or caption key is an error at once (rather than a silent
endless loop, as seen in open_clip #1016).
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.data.folder import caption_lines
from clipkit.data.images import decode_image
from clipkit.data.shardspec import CAPTION_KEY, IMAGE_KEYS, expand_shards, image_key_of
from clipkit.data.synthetic import RELATION_TARGETS, relation_targets

log = logging.getLogger(__name__)

_PROBE = 50  # this many samples in a row without image or caption, from the start: a wrong key, not bad data


def _seed(*parts: Any) -> int:
    return zlib.crc32("-".join(str(p) for p in parts).encode())


class RateLimitedLog:
    """Logs the first few events, then every n-th, so a broken shard set cannot flood the log."""

    def __init__(self, first: int = 5, every: int = 1000):
        self.count, self.first, self.every = 0, first, every

    def __call__(self, message: str, *args) -> None:
        self.count += 1
        if self.count <= self.first or self.count % self.every == 0:
            log.warning(f"{message} (%d so far)", *args, self.count)


@dataclass
class LoaderSpec:
    """Everything that fixes the order of batches."""

    urls: list[str]
    batch_size: int
    seed: int = 0
    epoch: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    drop_last: bool = True
    skip_batches: int = 0
    group_batches: bool = False
    hard_negatives: bool = False
    relations: bool = False


class ShardStream(IterableDataset):
    """Yields batches {'pixels', 'tokens', 'image_ids', 'captions', 'keys', 'skipped'} from shards."""

    def __init__(self, spec: LoaderSpec, preprocess: Callable, tokenizer: Callable):
        super().__init__()
        self.spec, self.preprocess, self.tokenizer = spec, preprocess, tokenizer

    # -- the order --------------------------------------------------------------------------

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def shard_order(self, worker: int, workers: int) -> Iterator[str]:
        spec = self.spec
        if spec.resampled:  # with replacement, endless: for step-based multi-epoch training
            rng = random.Random(_seed(spec.seed, spec.epoch, spec.rank, worker, "resample"))
            while True:
                yield spec.urls[rng.randrange(len(spec.urls))]
        order = list(spec.urls)
        random.Random(_seed(spec.seed, spec.epoch)).shuffle(order)  # same on every rank
        mine = order[spec.rank::spec.world_size]
        yield from mine[worker::workers]

    def raw_samples(self, worker: int, workers: int) -> Iterator[dict]:
        spec = self.spec
        shards = ({"url": url} for url in self.shard_order(worker, workers))
        warn = RateLimitedLog()

        def handler(exc: Exception) -> bool:
            warn("skipped unreadable shard data: %s", exc)
            return True

        samples = wds.tarfile_to_samples(handler=handler)(shards)
        if spec.group_batches:  # shuffle whole groups, so a group's samples stay side by side
            units, size = consecutive_groups(samples), max(1, spec.shuffle_buffer // 2)
        else:
            units, size = samples, spec.shuffle_buffer
        if size > 1:
            rng = random.Random(_seed(spec.seed, spec.epoch, spec.rank, worker, "buffer"))
            units = wds.filters._shuffle(units, size, min(100, size), rng=rng)
        return (sample for group in units for sample in group) if spec.group_batches else units

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, sample: dict) -> tuple[torch.Tensor, str, int, str | None, list[int] | None] | str:
        """(pixels, caption, image_id, a hard-negative caption or None, relation targets or None), or a reason
        string when the sample is unusable. The hard negative (with `hard_negatives`) is one of the json
        member's `negatives`; the targets (with `relations`) are `synthetic.relation_targets` of it."""
        image_key = image_key_of(sample)
        if image_key is None or CAPTION_KEY not in sample:
            return "missing key"
        key = sample.get("__key__", "")
        try:
            captions = caption_lines(sample[CAPTION_KEY])
        except UnicodeDecodeError:
            return "caption is not UTF-8"
        if not captions:
            return "empty caption"
        try:
            image = decode_image(sample[image_key], f"{sample.get('__url__', '?')}:{key}")
        except ValueError as exc:
            return str(exc)
        rng = random.Random(_seed(self.spec.seed, self.spec.epoch, key))
        caption = captions[rng.randrange(len(captions))]
        negatives = _meta_list(sample, "negatives") if self.spec.hard_negatives else []
        targets = relation_targets(_meta(sample)) if self.spec.relations else None
        return (self.preprocess(image), caption, image_id_of(sample), rng.choice(negatives) if negatives else None,
                targets)

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        physical, workers = self._worker()
        # The DataLoader takes batch i from worker i % workers, starting again at worker 0 after a resume.
        # So after skipping, physical worker p plays the part of worker (p + skip) % workers, and skips
        # that worker's share of the batches already consumed.
        worker = (physical + spec.skip_batches) % workers
        to_skip = spec.skip_batches // workers + (1 if worker < spec.skip_batches % workers else 0)
        raw = self.raw_samples(worker, workers)
        for _ in range(to_skip * spec.batch_size):
            if next(raw, None) is None:
                return
        warn = RateLimitedLog()
        pixels, captions, ids, keys, negatives, targets = [], [], [], [], [], []
        skipped = seen = 0
        for sample in raw:
            seen += 1
            decoded = self.decode(sample)
            if isinstance(decoded, str):
                skipped += 1
                if decoded == "missing key" and skipped == seen == _PROBE:
                    found = sorted(k for k in sample if not k.startswith("__"))
                    raise ValueError(f"the first {_PROBE} samples of {spec.urls[0]}... lack an image "
                                     f"({'/'.join(IMAGE_KEYS)}) or caption ({CAPTION_KEY}) member; keys found: "
                                     f"{', '.join(found) or 'none'}")
                warn("skipped sample %s: %s", sample.get("__key__"), decoded)
                continue
            pixels.append(decoded[0])
            captions.append(decoded[1])
            ids.append(decoded[2])
            keys.append(sample.get("__key__"))
            negatives.append(decoded[3])
            targets.append(decoded[4])
            if len(pixels) == spec.batch_size:
                yield self._batch(pixels, captions, ids, keys, skipped, negatives, targets)
                pixels, captions, ids, keys, negatives, targets, skipped = [], [], [], [], [], [], 0
        if pixels and not spec.drop_last:
            yield self._batch(pixels, captions, ids, keys, skipped, negatives, targets)

    def _batch(self, pixels, captions, ids, keys, skipped, negatives, targets) -> dict:
        batch = {"pixels": torch.stack(pixels), "tokens": self.tokenizer(captions), "captions": captions,
                 "image_ids": torch.tensor(ids, dtype=torch.long), "keys": keys, "skipped": skipped}
        if self.spec.hard_negatives:  # extra text negatives: one per sample that has any
            extra = [n for n in negatives if n is not None]
            batch["negative_tokens"] = self.tokenizer(extra) if extra else None
            batch["negative_owners"] = torch.tensor([i for i, n in enumerate(negatives) if n is not None],
                                                    dtype=torch.long)
        if self.spec.relations:  # -100 (ignored by cross-entropy) for samples without a related pair
            missing = [-100] * len(RELATION_TARGETS)
            batch["relation_targets"] = torch.tensor([t or missing for t in targets], dtype=torch.long)
        return batch


def _meta(sample: dict) -> dict:
    """The sample's json member as a dict ({} when it has none or it is not a JSON object), parsed once:
    the loader reads several fields of it per sample."""
    if "__meta__" not in sample:
        try:
            meta = json.loads(sample["json"]) if sample.get("json") else {}
        except ValueError:
            meta = {}
        sample["__meta__"] = meta if isinstance(meta, dict) else {}
    return sample["__meta__"]


def _meta_field(sample: dict, field: str):
    """A field of the sample's json member, or None (no member, not JSON, no such field)."""
    return _meta(sample).get(field)


def _meta_list(sample: dict, field: str) -> list[str]:
    """A list of strings from the sample's json member ([] when it has none)."""
    value = _meta_field(sample, field)
    return [v for v in value if isinstance(v, str) and v.strip()] if isinstance(value, list) else []


def _meta_int(sample: dict, field: str) -> int | None:
    value = _meta_field(sample, field)
    return value if isinstance(value, int) else None


def consecutive_groups(samples: Iterator[dict]) -> Iterator[list[dict]]:
    """Runs of consecutive samples sharing a `group_id` in their json member (an image and its
    distractors, as the synthetic writer stores them); a sample without one is a group of its own."""
    run: list[dict] = []
    current = None
    for sample in samples:
        group = _meta_int(sample, "group_id")
        if run and (group is None or group != current):
            yield run
            run = []
        run.append(sample)
        current = group
    if run:
        yield run


def image_id_of(sample: dict) -> int:
    """The sample's image id (from its json member), else a stable hash of its key."""
    value = _meta_int(sample, "image_id")
    if value is not None:
        return value
    return zlib.crc32(str(sample.get("__key__", "")).encode()) & 0x7FFFFFFF


def make_loader(urls: str | Sequence[str], preprocess: Callable, tokenizer: Callable, batch_size: int, *,
                seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000, resampled: bool = False,
                num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
                drop_last: bool = True, skip_batches: int = 0, group_batches: bool = False,
                pin_memory: bool = False, hard_negatives: bool = False, relations: bool = False) -> DataLoader:
    """A DataLoader of training batches from webdataset shards.

    `urls`: a brace pattern (`"shards/train-{000000..000099}.tar"`), a list, `file:` or `pipe:` URLs.
    `rank`/`world_size` default to torch.distributed's when it is initialised. The batch order is
    fixed by (seed, epoch, rank, world_size, num_workers); `skip_batches` resumes after that many batches.
    `group_batches`: the shuffle moves whole groups (consecutive samples with one json `group_id`), so
    an image and its distractors share a batch, where ITM draws its hard negatives. `hard_negatives`: each
    batch also holds `negative_tokens`, one caption per sample from its json `negatives` (the synthetic
    writer's swapped-twin captions), extra text negatives for the contrastive loss (NegCLIP), and
    `negative_owners`, the row of the sample each was drawn for. `relations`:
    each batch also holds `relation_targets` (B, 5), the synthetic scenes' related-pair labels
    (`clipkit.data.synthetic.relation_targets`; -100 where a sample has none).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if rank is None or world_size is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        world_size = torch.distributed.get_world_size() if distributed else 1
    expanded = expand_shards(urls)
    readers = world_size * max(1, num_workers)
    if not resampled and len(expanded) < readers:
        # otherwise some workers get no shard and, under DDP, ranks wait on each other forever (webdataset #188)
        raise ValueError(f"{len(expanded)} shard(s) cannot feed {world_size} rank(s) x {max(1, num_workers)} "
                         "worker(s): write more, smaller shards, use fewer workers, or use resampled=True")
    spec = LoaderSpec(urls=expanded, batch_size=batch_size, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                      resampled=resampled, rank=rank, world_size=world_size, num_workers=num_workers,
                      drop_last=drop_last, skip_batches=skip_batches, group_batches=group_batches,
                      hard_negatives=hard_negatives, relations=relations)
    stream = ShardStream(spec, preprocess, tokenizer)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=pin_memory)  # only for a CUDA run: pinning makes a CUDA context on GPU 0
