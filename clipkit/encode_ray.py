"""Embedding image files on a Ray cluster with Ray Data: `clipkit index SOURCE --engine ray`.

The driver (the process that holds the index's writer lock) plans what to embed, as on one machine; Ray
Data streams that list through a pool of actors that each load the index's model once (one actor per GPU
when the cluster has GPUs, else CPU actors), with backpressure, and the embedded batches come back to the
driver, which commits each to the index as it arrives. Ray retries tasks whose actor was lost; unreadable
images are skipped with a reason, as on one machine. A run stopped at any moment (the driver killed
included) and run again embeds only what was not committed: the index's plan finds it.

Without an address, a local Ray is started on this machine for the run (and stopped after it); with one
(`--ray-address auto` or `ray://HOST:10001`), the run joins that cluster, whose workers must see the image
paths (a shared file system) and have clipkit installed. Ray is the optional extra `clipkit[ray]`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import socket
import sys
import threading
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from clipkit.data.images import image_item, item_text
from clipkit.errors import EngineError, first_line

GPU_BATCHES = 8  # model batches in a Ray batch for a GPU actor (--batch-size 64: 512 images a Ray task)


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'clipkit[ray]'") from None
    return ray


class RayEngine:
    """Where `Index.sync_folder(engine=...)` embeds images: a Ray cluster (a local one without `address`).

    `actors`: the size of the model's actor pool (default: one per GPU of the cluster, else one per CPU);
    `cpus_per_actor`, each actor's decoding threads (default: on GPUs, the CPUs that go with its GPU on a GPU
    node; else an equal share of the cluster's CPUs) and `gpus_per_actor` (default: 1 when the cluster has
    GPUs). After a run, `stats` says how many images each actor embedded and how many batches Ray delivered
    twice (a task retried after its results came back).
    `items_per_call`: how many images a run hands Ray at a time (a folder, URL table or shard set goes in chunks):
    each call starts an actor pool, which loads the model (6.5 s a call on a 2-core machine), so a call should
    take a minute or more to embed (on 100 GPUs, 20M images; the driver holds a call's files, ~290 bytes an
    image, and Ray's object store its rows, ~70: docs/scaling.md).
    """

    def __init__(self, address: str | None = None, *, actors: int | None = None,
                 cpus_per_actor: float | None = None, gpus_per_actor: float | None = None,
                 items_per_call: int = 500_000):
        if actors is not None and actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        if items_per_call < 1:
            raise ValueError(f"items_per_call must be >= 1, got {items_per_call}")
        self.items_per_call = items_per_call
        self.address, self.actors = address, actors
        self.cpus_per_actor, self.gpus_per_actor = cpus_per_actor, gpus_per_actor
        self.stats: dict = {}
        self._started = False  # whether this engine started the (local) Ray it uses: `close` stops it

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the local Ray this engine started, if any (a run calls the engine once per chunk of images:
        Ray starts once)."""
        if self._started:
            require_ray().shutdown()
            self._started = False
        _no_colour_reset_at_exit()

    def __call__(self, paths: Sequence, model, *, batch_size: int = 64, workers: int | None = None
                 ) -> Iterator[tuple[np.ndarray, list[int], list[tuple[int, str, str]]]]:
        """Yield (vectors, positions in `paths`, failures as (position, reason, kind)) batch by batch, in the
        order Ray finishes them, as `clipkit.encode.embed_image_files` does on one machine."""
        if not len(paths):
            return
        ray = require_ray()
        self._started |= self._connect(ray)
        try:
            with _quiet_ray_core():
                yield from self._stream(ray, paths, model, batch_size)
        except ray.exceptions.RayError as exc:  # a worker's error, or tasks that failed past their retries
            cause = getattr(exc, "cause", None) or exc
            raise EngineError(f"Ray stopped embedding ({type(cause).__name__}: {first_line(cause)}); the batches "
                              "committed before are kept: run the same command again to go on") from None

    def _connect(self, ray) -> bool:
        """Join the cluster at `address`, or start a local one; True when this run started Ray."""
        if ray.is_initialized():
            return False
        options = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        if self.address is None:
            ray.init(num_cpus=os.cpu_count() or 1, **options)
        else:
            try:
                _reachable(self.address)
                ray.init(address=self.address, **options)
            except (OSError, RuntimeError, ValueError) as exc:
                raise ValueError(f"--ray-address {self.address}: cannot join a Ray cluster there ({exc}); "
                                 "start one with `ray start --head`, or leave --ray-address out for a local one"
                                 ) from None
        return True

    def _pool(self, ray) -> dict:
        """map_batches' resources: the actor pool's size and each actor's CPUs and GPUs. A GPU actor takes the
        CPUs that go with its share of a GPU node (16 CPUs and 2 GPUs: 8 each), all of them decoding threads
        that feed its GPU (with one CPU it would wait on JPEG decoding most of the time)."""
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        per_gpu = self.gpus_per_actor if self.gpus_per_actor is not None else (1 if gpus else 0)
        actors = self.actors or (max(1, int(gpus // per_gpu)) if per_gpu else max(1, cpus))
        default = max(1, int(_cpus_per_gpu(ray) * per_gpu)) if per_gpu else max(1, cpus // actors)
        return {"actors": actors, "num_cpus": self.cpus_per_actor or default, "num_gpus": per_gpu}

    def _stream(self, ray, paths: Sequence, model, batch_size: int) -> Iterator:
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notices: clipkit's bar says it
        pool = self._pool(ray)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # clipkit's own bar counts what is committed
        ray_batch = batch_size * (GPU_BATCHES if pool["num_gpus"] else 1)
        blocks = max(1, min(-(-len(paths) // ray_batch), 10_000))
        pool["actors"] = min(pool["actors"], blocks)  # no actor without a block to embed
        dataset = _blocks(ray, paths, blocks)
        embedded = dataset.map_batches(
            _Embedder, fn_constructor_kwargs={"info": model.info, "threads": max(1, int(pool["num_cpus"])),
                                               "pixel_limit": Image.MAX_IMAGE_PIXELS, "batch_size": batch_size},
            batch_size=ray_batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool["actors"]),
            num_cpus=pool["num_cpus"], num_gpus=pool["num_gpus"])  # Ray Data restarts lost actors, retries their tasks
        seen = np.zeros(len(paths), bool)
        self.stats.setdefault("per_actor", {})
        self.stats["actors"] = max(self.stats.get("actors", 0), pool["actors"])
        self.stats.setdefault("delivered_twice", 0)
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            positions = batch["position"].astype(np.int64)
            again = seen[positions]
            if again.any():  # a retried task's results, already committed
                self.stats["delivered_twice"] += 1
            seen[positions] = True
            for actor in batch["actor"][~again].tolist():
                self.stats["per_actor"][actor] = self.stats["per_actor"].get(actor, 0) + 1
            yield self._unpack(batch, ~again)

    @staticmethod
    def _unpack(batch: dict, fresh: np.ndarray) -> tuple[np.ndarray, list[int], list[tuple[int, str, str]]]:
        ok = fresh & (batch["reason"] == "")
        failed = fresh & ~ok
        failures = [(int(p), str(r), str(k)) for p, r, k in
                    zip(batch["position"][failed], batch["reason"][failed], batch["kind"][failed])]
        return np.asarray(batch["vector"][ok], np.float32), batch["position"][ok].astype(int).tolist(), failures


def _blocks(ray, paths: Sequence, blocks: int):
    """A Ray dataset of `blocks` Arrow blocks of (position, path) rows: about 70 bytes an image, copied into
    Ray's object store (a dict a row, as `from_items` takes them, held 230 more in the driver for the call)."""
    import pyarrow as pa

    table = pa.table({"position": np.arange(len(paths), dtype=np.int64), "path": [item_text(p) for p in paths]})
    step = -(-len(paths) // blocks)
    return ray.data.from_arrow([table.slice(start, step) for start in range(0, len(paths), step)])


def _cpus_per_gpu(ray) -> float:
    """The CPUs a GPU has on the cluster's GPU nodes (the fewest, so that an actor fits on any of them)."""
    shares = [node["Resources"].get("CPU", 0) / node["Resources"]["GPU"] for node in ray.nodes()
              if node.get("Alive", True) and node.get("Resources", {}).get("GPU")]
    return min(shares) if shares else 1.0


def _no_colour_reset_at_exit() -> None:
    """Ray's CLI logger calls colorama.init() as Ray starts, which registers an exit hook that writes ESC[0m to
    stdout: on a terminal, a stray line after clipkit's summary. clipkit colours nothing, so the hook goes."""
    initialise = sys.modules.get("colorama.initialise")
    if initialise is not None and hasattr(initialise, "reset_all"):
        atexit.unregister(initialise.reset_all)


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address (HOST:PORT or ray://HOST:PORT) where nothing listens: Ray would retry it for
    minutes. "auto" (the cluster this machine runs or belongs to) is Ray's to find."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not HOST:PORT, ray://HOST:PORT or auto: {address!r}")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
        pass


# Lines Ray's C++ core writes to the driver's stderr that ask nothing of the user: every Ray Data actor pool
# gets its constructor's arguments through the object store, and Ray (2.5x-2.6x) then logs an error-level line
# about restarts that Ray Data handles itself (ray-project/ray#57733).
RAY_NOISE = (b"has constructor arguments in the object store",)


@contextlib.contextmanager
def _quiet_ray_core():
    """Pass file descriptor 2 through a pipe whose reader forwards everything as it comes (progress bars
    included) but the `RAY_NOISE` lines. Entered after Ray has started: no process Ray starts inherits the pipe."""
    try:
        original = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        yield
        return
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    reader = threading.Thread(target=_forward, args=(read_end, original), daemon=True, name="clipkit-stderr")
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last write end closes: the reader reads what is left, then stops
        reader.join(timeout=5)
        if not reader.is_alive():
            os.close(read_end)
            os.close(original)


def _forward(read_end: int, out: int) -> None:
    pending = b""
    while chunk := os.read(read_end, 65536):
        *ended, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
        kept = b"".join(line for line in ended if not any(noise in line for noise in RAY_NOISE))
        if pending and not pending.startswith(b"["):  # not the start of a log line: a bar being drawn
            kept, pending = kept + pending, b""
        _write_all(out, kept)
    _write_all(out, pending)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class _Embedder:
    """A Ray actor: the index's model loaded once (checked against the index's fingerprint), embedding
    batches of image paths; unreadable images come back with their reason instead of a vector."""

    def __init__(self, info: dict, threads: int, pixel_limit: int | None = None, batch_size: int | None = None):
        import torch

        from clipkit.models import load_recorded_model

        Image.MAX_IMAGE_PIXELS = pixel_limit  # (the driver's: `clipkit index --max-pixels`)
        torch.set_num_threads(threads)
        self.info, self.threads, self.batch_size = info, threads, batch_size
        self.model = load_recorded_model(self.info, device="cuda" if torch.cuda.is_available() else "cpu")
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        paths = [image_item(str(p)) for p in batch["path"]]  # (a URL is fetched by the actor)
        out = embed_ray_batch(paths, self.model, self.batch_size or len(paths), self.threads)
        return {"position": batch["position"], **out, "actor": np.full(len(paths), self.name)}


def embed_ray_batch(paths: Sequence, model, batch_size: int, threads: int) -> dict[str, np.ndarray]:
    """What an actor does with one Ray batch: its images embedded `batch_size` at a time by `threads` decoding
    threads, which prepare the next model batch while the model runs one (on a GPU, a Ray batch is
    GPU_BATCHES model batches, so that the GPU waits on decoding only for the first). {'vector', 'reason',
    'kind'}: a row per path, the reason and kind empty where it was read."""
    from clipkit.encode import embed_image_files

    vectors = np.zeros((len(paths), *model.image_shape), np.float32)
    reasons, kinds = np.full(len(paths), "", object), np.full(len(paths), "", object)
    for found, positions, failures in embed_image_files(paths, model, batch_size=batch_size, workers=threads):
        vectors[positions] = found
        for position, reason, kind in failures:
            reasons[position], kinds[position] = reason, kind
    return {"vector": vectors, "reason": reasons.astype(str), "kind": kinds.astype(str)}
