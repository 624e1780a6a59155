"""Indexing webdataset shards (uncompressed .tar files on disk) in place.

Each sample's image becomes an item with id `SHARD#KEY` (SHARD the shard's absolute path, KEY the sample's
key) whose metadata says where its bytes lie in the tar (`shard`, `member`, `offset`, `size`), so that
search, re-ranking and the server read the image in place, without unpacking; its first caption is the
item's `caption`, and all its captions (the `txt` member, one a line) go to the caption collection.

Incremental: a shard whose size and mtime are those recorded when it was last read in full is skipped. A
new or changed one is read: samples whose image member is where it was (name, offset, size) are kept,
the others embedded, those no longer in it removed. An interrupted run therefore resumes where it stopped.
A shard moved or renamed (a recorded shard that is gone, of the same size, whose samples all lie where the
new one's do) is re-pointed: its items and captions take the new path, their embeddings kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from clipkit._progress import progress_bar
from clipkit.data.images import TarMember
from clipkit.data.folder import caption_lines
from clipkit.data.shardspec import IMAGE_KEYS, expand_shards, local_path
from clipkit.index.sync import SyncReport

log = logging.getLogger("clipkit.index")

SHARD_FIELDS = ("shard", "member", "offset", "size")


@dataclass
class ShardSample:
    key: str
    image: TarMember | None
    captions: list[str] = field(default_factory=list)


def local_shards(urls: str | Sequence[str]) -> list[str]:
    """Absolute paths of the shards `urls` names (brace patterns expanded; a folder without shards at its top
    stands for those of its subfolders); remote URLs are refused."""
    paths = []
    for url in expand_shards(urls, nested=True):
        path = local_path(url)
        if path is None:
            raise ValueError(f"{url}: clipkit indexes shards on this machine's disks (copy them here first)")
        paths.append(os.path.abspath(path))
    return paths


def read_shard(path: str) -> Iterator[ShardSample]:
    """The samples of an uncompressed tar shard: its members grouped by key as webdataset groups them (the
    member name up to the first dot of its base name), in order."""
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.ReadError as exc:
        raise ValueError(f"{path} is not an uncompressed tar file ({exc}); clipkit indexes .tar shards "
                         "in place (decompress .tar.gz ones first)") from None
    with tar:
        key, members = None, {}
        for member in tar:
            directory, _, base = member.name.rpartition("/")
            stem, dot, extension = base.partition(".")
            if not member.isfile() or not dot:
                continue
            sample_key = f"{directory}/{stem}" if directory else stem
            if sample_key != key and members:
                yield _sample(tar, path, key, members)
                members = {}
            key = sample_key
            members[extension.lower()] = member
        if members:
            yield _sample(tar, path, key, members)


def _sample(tar: tarfile.TarFile, path: str, key: str, members: dict) -> ShardSample:
    image = next((members[e] for e in IMAGE_KEYS if e in members), None)
    captions = caption_lines(tar.extractfile(members["txt"]).read(), errors="replace") if "txt" in members else []
    member = TarMember(path, image.name, image.offset_data, image.size) if image is not None else None
    return ShardSample(key, member, captions)


def item_image(path: str | None, metadata: dict) -> Path | TarMember | None:
    """Where an item's image is: its file, its place in a shard, or None (an item added from embeddings)."""
    if path:
        return Path(path)
    if all(metadata.get(name) is not None for name in SHARD_FIELDS):
        return TarMember(metadata["shard"], metadata["member"], int(metadata["offset"]), int(metadata["size"]))
    return None


CHUNK_SAMPLES = 50_000  # samples of new or changed shards embedded in one engine call (one Ray actor pool)


def sync_shards(index, urls: str | Sequence[str], model, *, batch_size: int = 64, progress: bool | None = None,
                on_shard: Callable[[str, dict[str, list[str]] | None], None] | None = None, engine=None,
                chunk: int | None = None, part: tuple[int, int] | None = None) -> SyncReport:
    """Bring `index` (whose writer lock the caller holds) up to date with the shards `urls` names.
    `on_shard(path, captions)` is called once a shard's items are all in, with their captions (id ->
    captions), and with None for each shard left alone (unchanged). `engine`: where the images are embedded
    (as `clipkit.index.sync.sync_folder`'s); the shards read are embedded together, `chunk` samples or more a
    call (default: the engine's `items_per_call`, else CHUNK_SAMPLES: Ray starts its actors once a call).
    `part=(i, n)`: only the shards of part i of n (every n-th from the i-th, in name order, as webdataset's
    split_by_node splits them). A folder in `urls` stands for the .tar shards in it (`Index.sync_shards` then
    removes those recorded there whose file is gone)."""
    paths = _shard_paths(urls, part)
    chunk = chunk or getattr(engine, "items_per_call", None) or CHUNK_SAMPLES
    report, recorded_shards = SyncReport(), _RecordedShards(index)
    read, waiting = [], 0  # shards read whose new samples wait to be embedded; how many samples
    with progress_bar(progress, total=len(paths), unit="shard", desc="indexing", bar_format=_BAR) as bar:
        for path in paths:
            stat = os.stat(path)
            if _unchanged(index, path, stat):
                report.unchanged += index.count_with_prefix(path + "#")
                if on_shard is not None:
                    on_shard(path, None)
                bar.update(1)
                continue
            read.append(_read_shard(index, path, stat, report, recorded_shards))
            waiting += len(read[-1].samples)
            if waiting >= chunk:
                _embed_shards(index, read, model, batch_size, report, engine, on_shard, bar)
                read, waiting = [], 0
        _embed_shards(index, read, model, batch_size, report, engine, on_shard, bar)
    report.orphaned.update(_gone_shards(index))
    return report


@dataclass
class ShardPlan:
    """What `sync_shards` would do (`clipkit index SHARDS --check`), reading no shard: shard paths by state."""

    new: list[str] = field(default_factory=list)  # never read in full
    changed: list[str] = field(default_factory=list)  # size or mtime differ from when they were read
    unchanged: dict[str, int] = field(default_factory=dict)  # -> items indexed from it
    gone: dict[str, int] = field(default_factory=dict)  # recorded in a folder given, no longer there -> items
    moved: list[tuple[str, str]] = field(default_factory=list)  # (gone shard, new one of its size and digest)


def plan_shards(index, urls: str | Sequence[str], part: tuple[int, int] | None = None) -> ShardPlan:
    """What syncing the shards `urls` names would do, changing nothing (as `sync_shards` decides it: by each
    shard's size and mtime against its record; a new shard of a gone one's size and digest is that one moved,
    which `sync_shards` re-points once it finds every sample where it was)."""
    plan = ShardPlan()
    for path in _shard_paths(urls, part):
        if not index.store.shard_record(path):
            plan.new.append(path)
        elif _unchanged(index, path, os.stat(path)):
            plan.unchanged[path] = index.count_with_prefix(path + "#")
        else:
            plan.changed.append(path)
    folders, recorded = set(local_folders(urls)), _RecordedShards(index)
    plan.gone = {shard: index.count_with_prefix(shard + "#") for shard in index.store.shard_records()
                 if os.path.dirname(shard) in folders and not os.path.isfile(shard)}
    for path in list(plan.new):
        old = next(iter(recorded.gone(path)), None)
        if old is not None:
            plan.moved.append((old, path))
            plan.new.remove(path)
            plan.gone.pop(old, None)
            recorded.forget(os.stat(path).st_size, old)
    return plan


def _shard_paths(urls: str | Sequence[str], part: tuple[int, int] | None) -> list[str]:
    """The shards `urls` names; of part i of n (`part`), every n-th from the i-th in name order (sorted: the
    same part on every run of an unchanged set)."""
    paths = local_shards(urls)
    return paths if part is None else sorted(paths)[part[0]::part[1]]


def _unchanged(index, path: str, stat: os.stat_result) -> bool:
    """Whether the shard at `path` is as it was when last read in full (its recorded size and mtime), with
    its captions in place: then it is not read again."""
    recorded = index.store.shard_record(path) or []
    return recorded[:2] == [stat.st_size, stat.st_mtime] and not _captions_lost(index, path)


def local_folders(urls: str | Sequence[str]) -> list[str]:
    """The absolute paths of the local folders `urls` names (each standing for the shards in it)."""
    listed = [urls] if isinstance(urls, str) else list(urls)
    paths = [local_path(url) for url in listed]
    return [os.path.abspath(path) for path in paths if path is not None and os.path.isdir(path)]


def _gone_shards(index) -> dict[str, int]:
    """Recorded shards whose folder is gone (one look a folder, not one a shard: a LAION-size set has
    100,000s) -> how many of their items are still indexed."""
    shards = index.store.shard_records()
    gone_folders = {folder for folder in {os.path.dirname(s) for s in shards} if not os.path.isdir(folder)}
    counts = {s: index.count_with_prefix(s + "#") for s in shards if os.path.dirname(s) in gone_folders}
    return {shard: count for shard, count in counts.items() if count}


class _RecordedShards:
    """The recorded shards by size and digest, read once a sync (not once a shard): where a new shard may
    have been moved from."""

    def __init__(self, index):
        self.index, self._by_size = index, None

    def gone(self, path: str) -> list[str]:
        """The recorded shards whose file is no longer there and whose size and digest are
        those of the shard at `path` (its digest is read only when some recorded shard has its size)."""
        if self._by_size is None:
            self._by_size = {}
            for shard, (size, _, digest) in self.index.store.shard_records().items():
                if digest is not None:
                    self._by_size.setdefault(size, []).append((shard, digest))
        candidates = self._by_size.get(os.stat(path).st_size, [])
        digest = shard_digest(path) if candidates else None
        return [shard for shard, d in candidates if d == digest and not os.path.isfile(shard)]

    def forget(self, size: int, shard: str) -> None:
        self._by_size[size] = [(s, d) for s, d in self._by_size[size] if s != shard]


def _captions_lost(index, path: str) -> bool:
    """Whether the shard's items have captions that the caption collection lacks (as a folder sync over the
    shard's folder by clipkit 0.x left them): then the shard is read again, its captions restored, nothing
    embedded again."""
    if index.captions is not None and index.captions.count_with_prefix(path + "#"):
        return False
    ids = index.ids_with_prefix(path + "#")
    return bool(ids) and any(record.get("caption") for record in index.get(ids))


def _shard_items(index, path: str) -> dict[str, dict]:
    """id -> record of the items indexed from the shard at `path`."""
    ids = index.ids_with_prefix(path + "#")
    return {record["id"]: record for record in index.get(ids)} if ids else {}


@dataclass
class _ReadShard:
    """A shard read: its samples to embed as (item id, sample, whether an item is replaced), its captions."""

    path: str
    stat: os.stat_result
    samples: list[tuple[str, ShardSample, bool]]
    captions: dict[str, list[str]]


def _read_shard(index, path: str, stat: os.stat_result, report: SyncReport, recorded: _RecordedShards) -> _ReadShard:
    """Read a new or changed shard: its unchanged items stay, those gone from it are removed, a moved shard
    is re-pointed; what is left to embed is returned."""
    existing = _shard_items(index, path)
    samples, captions = [], {}
    for sample in read_shard(path):
        item_id = f"{path}#{sample.key}"
        if sample.image is None:
            report.skip(item_id, f"{item_id}: the sample has no image member ({', '.join(IMAGE_KEYS)})", "no image")
            continue
        captions[item_id] = sample.captions
        old = existing.pop(item_id, None)
        if old is not None and item_image(None, old) == sample.image and old.get("caption") == _first(sample):
            report.unchanged += 1
        else:
            samples.append((item_id, sample, old is not None))
    if samples and not existing and not any(replaced for _, _, replaced in samples) and \
            _repoint_moved_shard(index, path, [sample for _, sample, _ in samples], report, recorded):
        report.moved += len(samples)
        return _ReadShard(path, stat, [], captions)
    gone = list(existing) + [item_id for item_id, _, replaced in samples if replaced]
    if gone:
        index.remove(gone)
    report.removed += len(existing)
    return _ReadShard(path, stat, samples, captions)


_BAR = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"  # (n: a float)


def _embed_shards(index, shards: list[_ReadShard], model, batch_size: int, report: SyncReport, engine,
                  on_shard, bar) -> None:
    """Embed the new samples of `shards` in one engine call, committing batch by batch (the shard bar moves
    by the share of their images done, and says how many went in and how fast); then record each shard as
    read in full (a run stopped before reads it again, keeping what was committed)."""
    started, count, moved = time.time(), 0, 0.0
    samples = [sample for shard in shards for sample in shard.samples]
    images = [sample.image for _, sample, _ in samples]
    if images and engine is None:  # (imported only with something to embed: it imports torch)
        from clipkit.encode import embed_image_files

        engine = embed_image_files
    batches = engine(images, model, batch_size=batch_size) if images else ()
    for vectors, positions, failures in batches:
        for position, reason, kind in failures:
            report.skip(str(images[position]), reason, kind)
        if positions:
            chosen = [samples[p] for p in positions]
            index.add(vectors, ids=[item_id for item_id, _, _ in chosen],
                      metadata=[_metadata(sample) for _, sample, _ in chosen])
            report.added += sum(not replaced for _, _, replaced in chosen)
            report.updated += sum(replaced for _, _, replaced in chosen)
        count += len(positions) + len(failures)
        bar.set_postfix_str(f"{report.embedded} img embedded, {count / max(time.time() - started, 1e-3):.0f} img/s",
                            refresh=False)
        bar.update(len(shards) * count / len(images) - moved)
        moved = len(shards) * count / len(images)
    bar.update(len(shards) - moved)
    for shard in shards:
        with index.store.transaction(bump=False):
            index.store.record_shard(shard.path, shard.stat.st_size, shard.stat.st_mtime, shard_digest(shard.path))
        if on_shard is not None:
            on_shard(shard.path, shard.captions)


def _repoint_moved_shard(index, path: str, samples: list[ShardSample], report: SyncReport,
                         recorded: _RecordedShards) -> bool:
    """Whether the new shard at `path` is a recorded one that moved (gone from its path, the same size and
    digest, every sample's image where it was, with the same caption): then its items and captions now go
    by `path`, their embeddings kept (the captions first, then the items in one change: a kill leaves the
    old items or the new ones, and no image without its captions)."""
    from clipkit.index.captions import move_with_captions
    from clipkit.index.store import meta_row

    for old in recorded.gone(path):
        items = _shard_items(index, old)
        placed = {(s.key, s.image.name, s.image.offset, s.image.size, _first(s)) for s in samples}
        if len(items) != len(samples) or placed != {(i[len(old) + 1:], r.get("member"), r.get("offset"),
                                                    r.get("size"), r.get("caption")) for i, r in items.items()}:
            continue
        moves = [(f"{old}#{s.key}", f"{path}#{s.key}") for s in samples]
        rows = [meta_row(_metadata(s)) for s in samples]

        def change(store):
            keys = store.keys_for([o for o, _ in moves])
            vectors = store.vectors([keys[o] for o, _ in moves])
            store.delete_keys(list(keys.values()))
            store.forget_shards([old])
            return None, store.insert(vectors, [n for _, n in moves], rows), vectors, list(keys.values())

        report.captions_moved += move_with_captions(index, moves, change)
        recorded.forget(os.stat(path).st_size, old)
        return True
    return False


def shard_digest(path: str, span: int = 1 << 20) -> str:
    """A digest of a shard's first and last MiB (BLAKE2b): with its size, it tells a moved shard from another
    one laid out alike."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(span))
        size = os.fstat(handle.fileno()).st_size
        if size > span:
            handle.seek(max(span, size - span))
            digest.update(handle.read(span))
    return digest.hexdigest()


def _first(sample: ShardSample) -> str | None:
    return sample.captions[0] if sample.captions else None


def _metadata(sample: ShardSample) -> dict:
    image = sample.image
    return {"caption": _first(sample), "shard": image.tar, "member": image.name, "offset": image.offset,
            "size": image.size}
