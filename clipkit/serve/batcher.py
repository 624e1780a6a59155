"""Micro-batching: concurrent requests' queries are encoded together in one model call, and searched
together in one index search.

Every use of the model (query encoding, ITM re-ranking) runs on one worker thread, so the model is
never entered by two threads at once (the token-state helpers flip module flags while they run).
While a batch is on that thread, new queries wait in the queue; the next batch takes all of them
(up to `max_batch`), so the batch size, and the throughput, grow with the load without any timer.
Searches queue the same way (`SearchBatcher`): one structure search for many queries costs little more
than for one (FAISS spreads a batch over the cores; a flat scan reads the rows once for all of them).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import numpy as np
import torch
from fastapi.concurrency import run_in_threadpool

from clipkit.search import Hit, nearest_hits_many

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


class MicroBatcher:
    """A queue of requests handled a batch at a time: while `handle` runs on a batch, new requests wait in
    the queue, and the next batch takes all of them (up to `max_batch`). `handle(entries)` returns one result
    per entry; an exception among them is that request's error, an exception raised is every request's."""

    def __init__(self, handle: Callable[[list], Awaitable[list]], max_batch: int):
        self.handle = handle
        self.max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, entry: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():  # first call, or a new event loop
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        await self._queue.put((entry, future))
        return await future

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [(entry, future) for entry, future in batch if not future.cancelled()]
            if not batch:
                continue
            try:
                results = await self.handle([entry for entry, _ in batch])
            except Exception as exc:  # every waiting request gets the error, the loop goes on
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class Batcher(MicroBatcher):
    """Queue of (kind, input) queries for one model; `encode` returns the query's unit-norm embedding.

    Text inputs are strings; image inputs are preprocessed pixel tensors (C, H, W).
    """

    def __init__(self, worker: ModelWorker, max_batch: int = 64):
        super().__init__(lambda entries: worker.run(self._encode, entries), max_batch)
        self.worker = worker
        self.batches = 0  # model calls made, for /healthz and the tests
        self.items = 0

    async def encode(self, kind: str, value: Any) -> np.ndarray:
        return await self.submit((kind, value))

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


class SearchBatcher(MicroBatcher):
    """Queue of nearest-item searches (index, unit query vector, depth, folder): the queued searches of one
    index, depth and folder are made in one `nearest_hits_many` call, the library's search, on a pool thread
    (different ones side by side)."""

    def __init__(self, max_batch: int = 256):
        super().__init__(self._search, max_batch)
        self.batches = 0  # index searches made, for /healthz and the tests
        self.items = 0

    async def nearest(self, index, vector: np.ndarray, depth: int, under: str | None = None) -> list[Hit]:
        return await self.submit((index, vector, depth, under))

    async def _search(self, entries: list[tuple]) -> list:
        groups: dict[tuple, list[int]] = {}
        for i, (index, _, depth, under) in enumerate(entries):
            groups.setdefault((id(index), depth, under), []).append(i)
        found = await asyncio.gather(*(run_in_threadpool(self._search_group, [entries[i] for i in positions])
                                       for positions in groups.values()))
        out: list = [None] * len(entries)
        for positions, results in zip(groups.values(), found):
            for i, result in zip(positions, results):
                out[i] = result
        return out

    def _search_group(self, entries: list[tuple]) -> list:
        index, _, depth, under = entries[0]
        self.batches += 1
        self.items += len(entries)
        try:
            return nearest_hits_many(index, [vector for _, vector, _, _ in entries], depth, under=under)
        except Exception as exc:  # this group's requests get the error (a folder that is not there, ...)
            return [exc] * len(entries)
