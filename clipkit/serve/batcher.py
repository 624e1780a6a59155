"""Micro-batching: concurrent requests' queries are encoded together in one model call.

Every use of the model (query encoding, ITM re-ranking) runs on one worker thread, so the model is
never entered by two threads at once (the token-state helpers flip module flags while they run).
While a batch is on that thread, new queries wait in the queue; the next batch takes all of them
(up to `max_batch`), so the batch size, and the throughput, grow with the load without any timer.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

TEXT, IMAGE = "text", "image"


class ModelWorker:
    """One thread that runs every call into one model."""

    def __init__(self, model):
        self.model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"clipkit-{model.name}")

    async def run(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Batcher:
    """Queue of (kind, input) queries for one model; `encode` returns the query's unit-norm embedding.

    Text inputs are strings; image inputs are preprocessed pixel tensors (C, H, W).
    """

    def __init__(self, worker: ModelWorker, max_batch: int = 64):
        self.worker = worker
        self.max_batch = max_batch
        self.batches = 0  # model calls made, for /healthz and the tests
        self.items = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def encode(self, kind: str, value: Any) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():  # first call, or a new event loop
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((kind, value, future))
        return await future

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [entry for entry in batch if not entry[2].cancelled()]
            if not batch:
                continue
            try:
                vectors = await self.worker.run(self._encode, [(kind, value) for kind, value, _ in batch])
            except Exception as exc:  # every waiting request gets the error, the loop goes on
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), vector in zip(batch, vectors):
                if not future.done():
                    future.set_result(vector)

    def _encode(self, entries: list[tuple[str, Any]]) -> list[np.ndarray]:
        """One text call and one image call for the whole batch (runs on the model thread)."""
        model = self.worker.model
        out: list[np.ndarray | None] = [None] * len(entries)
        for kind in (TEXT, IMAGE):
            positions = [i for i, (k, _) in enumerate(entries) if k == kind]
            if not positions:
                continue
            values = [entries[i][1] for i in positions]
            with torch.inference_mode():
                if kind == TEXT:
                    vectors = model.encode_text(values)
                else:
                    vectors = model.encode_image(torch.stack(values).to(model.device))
            vectors = vectors.float().cpu().numpy()
            for position, vector in zip(positions, vectors):
                out[position] = vector
        self.batches += 1
        self.items += len(entries)
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
