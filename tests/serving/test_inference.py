"""The inference thread with a real tiny served model: same answers as in-process, batches that never mix models."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from components.config import BatchingParams
from components.matcher import load_served_model
from serving.inference import InferenceQueue, TorchLanes


@pytest.fixture(scope="module")
def two_models(served_files):
    def load():
        return load_served_model(
            served_files.encoder_dir, served_files.index_dir, "tiny", "7", served_files.checksum, batch_size=2
        )

    return load(), load()


def _images(served_files) -> list:
    return [Image.open(path).convert("RGB") for path in served_files.iconic.values()]


def test_answers_equal_in_process_matching(two_models, served_files):
    served, _ = two_models
    images = _images(served_files)
    queue = InferenceQueue(BatchingParams(max_images=16), TorchLanes(2))
    try:

        async def ask():
            return await asyncio.gather(
                *(queue.match(served, [image], 3) for image in images), queue.embed(served, images[:2])
            )

        *answers, vectors = asyncio.run(ask())
    finally:
        queue.close()
    expected = served.match(images, 3)
    assert [[hit["sku_id"] for hit in answer[0]] for answer in answers] == [
        [hit["sku_id"] for hit in hits] for hits in expected
    ]
    assert [hit["score"] for answer in answers for hit in answer[0]] == pytest.approx(
        [hit["score"] for hits in expected for hit in hits], abs=1e-5
    )
    np.testing.assert_allclose(vectors, served.embed(images[:2]), atol=1e-5)


def test_queued_requests_share_a_call_but_never_mix_models(two_models, served_files):
    first, second = two_models
    images = _images(served_files)
    calls: list[tuple[object, int]] = []
    queue = InferenceQueue(
        BatchingParams(max_images=4, max_wait_ms=200), on_batch=lambda model, count: calls.append((model, count))
    )
    try:

        async def ask():
            # Submitted together: the thread waits up to 200 ms to fill batches of at most 4 images.
            return await asyncio.gather(
                *(queue.match(first if n % 3 else second, [image], 1) for n, image in enumerate(images))
            )

        answers = asyncio.run(ask())
    finally:
        queue.close()
    assert [answer[0][0]["sku_id"] for answer in answers] == list(served_files.iconic)
    assert sum(count for _, count in calls) == len(images)
    assert max(count for _, count in calls) > 1  # requests were batched
    assert all(count <= 4 for _, count in calls)
    assert {model for model, _ in calls} == {first, second}


def test_max_images_one_is_no_batching(two_models, served_files):
    served, _ = two_models
    calls: list[int] = []
    queue = InferenceQueue(BatchingParams(max_images=1, max_wait_ms=100), on_batch=lambda _, count: calls.append(count))
    try:

        async def ask():
            return await asyncio.gather(*(queue.match(served, [image], 1) for image in _images(served_files)))

        asyncio.run(ask())
        # A request with more images than max_images is still answered whole, in one call.
        asyncio.run(queue.match(served, _images(served_files)[:3], 1))
    finally:
        queue.close()
    assert calls == [1] * len(served_files.iconic) + [3]


def test_a_failing_call_fails_its_requests_and_the_thread_goes_on(two_models, served_files):
    served, _ = two_models
    queue = InferenceQueue(BatchingParams())
    try:
        # Whatever the model raises on a non-image must reach the caller, not end the thread.
        with pytest.raises(Exception):  # noqa: B017
            asyncio.run(queue.match(served, ["not an image"], 1))
        assert asyncio.run(queue.match(served, _images(served_files)[:1], 1))[0][0]["sku_id"] == next(
            iter(served_files.iconic)
        )
    finally:
        queue.close()


def test_in_short_lived_thread_hands_back_the_result_or_the_error():
    import threading

    from serving.inference import in_short_lived_thread

    caller = threading.get_ident()
    assert in_short_lived_thread(lambda a, b: (a + b, threading.get_ident() != caller), 2, 3) == (5, True)
    with pytest.raises(ZeroDivisionError):
        in_short_lived_thread(lambda: 1 / 0)


def test_a_request_whose_caller_has_gone_is_never_computed(two_models, served_files):
    # A timed-out request left queued would still cost a model call, and answering it raised on
    # the inference thread and stopped it: every later request then waited out the route's timeout.
    served, _ = two_models
    images = _images(served_files)
    embedded: list[int] = []
    queue = InferenceQueue(BatchingParams(max_images=1), on_batch=lambda model, count: embedded.append(count))
    try:

        async def ask():
            busy = asyncio.ensure_future(queue.match(served, images * 4, 1))  # keeps the thread busy
            gone = asyncio.ensure_future(queue.match(served, images[:2], 1))
            await asyncio.sleep(0)  # both submitted
            gone.cancel()  # what the route's timeout does to a waiting handler
            await busy
            after = await asyncio.wait_for(queue.match(served, images[:3], 1), timeout=60)
            return gone, after

        gone, after = asyncio.run(ask())
    finally:
        queue.close()
    assert gone.cancelled() and len(after) == 3
    assert embedded == [len(images) * 4, 3]  # the two images of the cancelled request never embedded


def test_lanes_share_one_photos_view_rows_and_keep_their_own_torch_threads(two_models, served_files):
    import threading

    import torch

    served, _ = two_models
    photo = _images(served_files)[:1]
    lanes = TorchLanes(2, threads=1)
    passes: list[tuple[str, int]] = []
    second_lane_started = threading.Event()

    def record(_module, _inputs):
        name = threading.current_thread().name
        passes.append((name, torch.get_num_threads()))
        if len({lane for lane, _ in passes}) > 1:
            second_lane_started.set()
        # The first lane holds its rows until the other lane has taken the second part: rows
        # handed to the lanes together run side by side, whichever thread the pool wakes first.
        second_lane_started.wait(timeout=30)

    hook = served.encoder.backbone.register_forward_pre_hook(record)
    try:
        shared = served.embed(photo, lanes)
    finally:
        hook.remove()
        lanes.close()
    # Both lanes embed rows of the one photo, each on its own single torch thread.
    assert len({name for name, _ in passes}) == 2 and all(name.startswith("skumatch-lane") for name, _ in passes)
    assert {threads for _, threads in passes} == {1}
    np.testing.assert_allclose(shared, served.embed(photo), atol=1e-6)
    with pytest.raises(ValueError, match="at least 1"):
        TorchLanes(0)
