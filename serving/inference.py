"""The service's inference thread: model work off the event loop, concurrent requests batched.

One thread runs every model call of a worker process, so the event loop stays free for health
probes, metrics and request parsing while a match runs, and torch's intra-op threads are set
once, on the thread that uses them. Torch work elsewhere (loading, self-tests) runs on threads
that end with it (:func:`in_short_lived_thread`), so torch keeps one OpenMP pool per process.
Requests queue; the thread takes the first, adds queued requests for the same model until
``max_images`` images (never splitting a request) or until ``max_wait_ms`` has passed, embeds
them in one call and searches the index for each request.

A request names the model it was accepted under (see ``serving.swap``), so a batch never mixes
two models, and one that arrived before a hot swap is answered by the model it arrived under.

A request whose caller has gone (the route's timeout cancelled it, or the client left) is dropped
when the thread reaches it, before any model work. Answering it anyway raised on the thread and
stopped it: after one timeout under load, every later request of that worker waited out the
route's 30 s timeout.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from components.config import BatchingParams

LOGGER = logging.getLogger(__name__)


@dataclass
class _Job:
    served: Any  # components.matcher.ServedModel
    images: list
    top_k: Optional[int]  # None: embed only
    done: Future = field(default_factory=Future)


def in_short_lived_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` run on a new thread that ends with it; its result, or its exception raised here.

    For torch work outside the inference thread (loading a model, a swap's self-test). Torch's
    OpenMP runtime keeps a pool of worker threads for every thread that ran parallel work, for as
    long as that thread lives; once the pools outnumber the cores it stops spinning between
    operations, and a match on the inference thread took 224 against 133 ms (EfficientNet-Lite0,
    2 cores) after the model had been loaded on the long-lived main thread.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=run, name="skumatch-torch-once")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# Put on the queue by close(): the thread finishes what came before it, then stops.
_STOP = object()
BatchObserver = Callable[[Any, int], None]


class InferenceQueue:
    """A single inference thread fed by a queue, batching requests that arrive together.

    Args:
        batching: ``serve.batching`` (images per model call, wait for more).
        torch_threads: intra-op threads for the inference thread (None: torch's default).
        on_batch: called after each model call with the model and its image count (metrics).
    """

    def __init__(
        self, batching: BatchingParams, torch_threads: int | None = None, on_batch: BatchObserver | None = None
    ) -> None:
        self.batching, self.torch_threads, self.on_batch = batching, torch_threads, on_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="skumatch-inference", daemon=True)
        self._thread.start()

    async def match(self, served, images: list, top_k: int) -> list[list[dict[str, Any]]]:
        """``served.match(images, top_k)``, run on the inference thread."""
        return await self._submit(_Job(served, images, top_k))

    async def embed(self, served, images: list) -> np.ndarray:
        """``served.embed(images)``, run on the inference thread."""
        return await self._submit(_Job(served, images, None))

    async def _submit(self, job: _Job):
        self._queue.put(job)
        return await asyncio.wrap_future(job.done)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued work and stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        carried = None
        while True:
            first = carried if carried is not None else self._queue.get()
            carried = None
            if first is _STOP:
                return
            if not first.done.set_running_or_notify_cancel():
                continue  # its caller has gone (timed out or disconnected): no model work for nobody
            batch, carried = self._gather(first)
            self._answer(batch)

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first`` and the queued jobs that join its batch; the job that did not fit, if any."""
        batch, images = [first], len(first.images)
        deadline = time.monotonic() + self.batching.max_wait_ms / 1000
        while images < self.batching.max_images:
            wait = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP or nxt.served is not first.served or images + len(nxt.images) > self.batching.max_images:
                return batch, nxt
            if not nxt.done.set_running_or_notify_cancel():
                continue
            batch.append(nxt)
            images += len(nxt.images)
        return batch, None

    def _answer(self, batch: list[_Job]) -> None:
        served = batch[0].served
        try:
            vectors = served.embed([image for job in batch for image in job.images])
        except BaseException as err:  # noqa: BLE001 - every waiting request must hear of it
            for job in batch:
                job.done.set_exception(err)
            return
        if self.on_batch:
            self.on_batch(served, len(vectors))
        start = 0
        for job in batch:
            rows = vectors[start : start + len(job.images)]
            start += len(job.images)
            try:
                job.done.set_result(rows if job.top_k is None else served.match_vectors(rows, job.top_k))
            except BaseException as err:  # noqa: BLE001
                job.done.set_exception(err)
