"""The service's inference thread: model work off the event loop, concurrent requests batched.

One thread takes every model call of a worker process, so the event loop stays free for health
probes, metrics and request parsing while a match runs. It shares each call's view rows out to
the worker's lanes (:class:`TorchLanes`), threads whose torch thread counts are set once, on the
threads that use them. Torch work elsewhere (loading, self-tests) runs on threads that end with
it (:func:`in_short_lived_thread`), so the process keeps no OpenMP pools it does not use.
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


def threads_per_worker(threads: int, workers: int) -> int:
    """Torch intra-op threads for one worker: a process's ``threads`` shared out among the workers, at least 1."""
    return max(1, threads // workers)


def lane_count(setting: int | str, torch_threads: int, device: str) -> int:
    """How many lanes a worker embeds on (``serve.lanes``): ``auto`` is one per torch thread on a
    CPU and one on a GPU, where a single stream of larger passes keeps the device busy."""
    if setting != "auto":
        return int(setting)
    return 1 if device.startswith("cuda") else torch_threads


class TorchLanes:
    """``count`` threads that run torch side by side, each with ``threads`` intra-op threads.

    What :meth:`components.matcher.ServedModel.embed` shares a batch's view rows out to. On 2 CPU
    cores, two lanes of one thread matched 1.04 to 1.16 times the photos per second of one call on
    two intra-op threads (EfficientNet-Lite0, ``benchmarks/results/serving.md``): the network's small
    layers leave torch's threads waiting on each other. Torch's thread count is per thread, so each
    lane sets its own once, when it starts, and keeps it.
    """

    def __init__(self, count: int, threads: int = 1) -> None:
        if count < 1 or threads < 1:
            raise ValueError(f"lanes need count and threads of at least 1, got {count} and {threads}")
        self.count, self.threads = count, threads
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="skumatch-lane", initializer=self._start_lane)
        # Start every lane now, so the first request does not pay for it.
        list(self._pool.map(time.sleep, [0.01] * count))

    def _start_lane(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    def map(self, function: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """``function`` over ``items`` on the lanes, results in order."""
        return self._pool.map(function, items)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# Put on the queue by close(): the thread finishes what came before it, then stops.
_STOP = object()
BatchObserver = Callable[[Any, int], None]


class InferenceQueue:
    """A single inference thread fed by a queue, batching requests that arrive together.

    Args:
        batching: ``serve.batching`` (images per model call, wait for more).
        lanes: where the model's view rows run (None: on the inference thread, torch's threads).
        on_batch: called after each model call with the model and its image count (metrics).
    """

    def __init__(
        self, batching: BatchingParams, lanes: TorchLanes | None = None, on_batch: BatchObserver | None = None
    ) -> None:
        self.batching, self.lanes, self.on_batch = batching, lanes, on_batch
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
        """Finish the queued work and stop the thread and its lanes."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self.lanes:
            self.lanes.close()

    def _run(self) -> None:
        if self.lanes:
            import torch

            # What is left here (joining rows, pooling) is small: one thread keeps this thread from
            # holding an OpenMP pool of its own beside the lanes (see in_short_lived_thread).
            torch.set_num_threads(1)
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
            vectors = served.embed([image for job in batch for image in job.images], self.lanes)
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
