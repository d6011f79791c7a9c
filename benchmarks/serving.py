"""/match latency through a real ``bentoml serve``, against the same model matched in-process.

    python -m benchmarks.serving [--requests 30] [--catalogue 200] [--repeats 2] [--clients 4]
                                 [--workers 1 2] [--batch 16]

What a caller of the deployed service waits for: one photo uploaded as multipart to ``/match``,
checked by the upload guard, decoded, embedded at every query zoom with its mirror, searched in
the FAISS index and answered as JSON. The baseline, in the same run, is the same packaged model
matched in-process on the same files (``serving.uploads.decode_image`` then
``ServedModel.match``, what the service's handler calls), so the ratio is what HTTP, BentoML's
request handling and the upload guard add to the model's own work.

The model is the params' encoder as built (by default the packaged, pretrained
EfficientNet-Lite0 with an untrained projection: latency does not depend on the weights),
saved, indexed over ``--catalogue`` seeded noise photos (``--skus-of`` photos per SKU) and
packaged with ``serving.build.package_model`` into a throwaway BentoML home, as the retrain
flow packages a champion. The service runs from source (``bentoml serve
serving.service:Matcher``): a built Bento runs the same service code, and building one needs uv
and a minute more. Queries are seeded noise photos of Grocery Store's largest size, as JPEG.

Latency: the two sides alternate ``--repeats`` times over the same ``--requests`` photos, one
request at a time (what one caller waits for); the first two requests of each side are a
warm-up and are not counted. Throughput: ``--clients`` callers at once each send every photo,
against the in-process side matching them one after another (what one process on this machine
can do). Batches: the same callers send the photos ``--batch`` at a time to ``/match_batch``,
against ``ServedModel.match`` over the same batches in-process; images per second, with the
one-after-another baseline's rate as the ratio's base. All three are measured for each of ``--workers`` (BentoML worker processes, set through
``BENTOML_CONFIG_OVERRIDES`` as a deployment would), one server after another. Every HTTP answer
must be 200 with as many matches as asked (for every image of a batch), or the run fails. Figures go to
``benchmarks/results/serving.md`` with the machine noted; its ``## Notes`` section is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.accuracy import machine, write_results
from benchmarks.inference import noise_images
from components.config import IndexParams, Params, load_params
from serving import MAX_BATCH_IMAGES, SERVICE_NAME

RESULTS = Path(__file__).parent / "results" / "serving.md"
REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE = "in-process: decode_image + ServedModel.match (baseline)"
MODEL_NAME = "skumatch-serving-benchmark"
WARM_UP = 2


def write_photos(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` seeded noise photos saved as JPEG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, image in enumerate(noise_images(count, seed=seed)):
        paths.append(folder / f"{number:05d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def package(params: Params, scratch: Path, catalogue: int, skus_of: int) -> tuple[str, object]:
    """Build, save, index and package the params' encoder; ``(BentoML model tag, ServedModel)``.

    BentoML's store must already point into ``scratch`` (``BENTOML_HOME``), see :func:`main`.
    """
    import pandas as pd

    from components.index import build_catalogue_index, save_index
    from components.model import build_encoder, save_encoder
    from components.registry import ResolvedModel, load_served_model
    from serving.build import package_model

    torch.manual_seed(params.train.seed)
    encoder, preprocess = build_encoder(params.model)
    encoder_dir = save_encoder(encoder, preprocess, params.model, scratch / "encoder")
    photos = write_photos(scratch / "catalogue", catalogue, seed=3)
    rows = pd.DataFrame({"image_path": [str(p) for p in photos],
                         "sku_id": [f"sku-{number // skus_of:05d}" for number in range(len(photos))]})
    index = build_catalogue_index(encoder, preprocess, rows, IndexParams(use_gpu="never"),
                                  meta={"model_name": MODEL_NAME, "model_version": "1"})
    checksum = save_index(index, scratch / "index")
    resolved = ResolvedModel(MODEL_NAME, "1", encoder_dir, scratch / "index", checksum, {})
    tag = package_model(resolved, params.serve.model_copy(update={"bento_model_name": MODEL_NAME}))
    return tag, load_served_model(encoder_dir, scratch / "index", MODEL_NAME, "1", checksum, params.serve.batch_size)


def in_process_ms(served, queries: list[Path], top_k: int, batch: int = 1) -> list[float]:
    """Per-call milliseconds of what the service's handler runs, without HTTP: ``batch`` photos a call."""
    from serving.uploads import decode_image

    latencies = []
    for chunk in batches(queries, batch):
        started = time.perf_counter()
        served.match([decode_image(path) for path in chunk], top_k)
        latencies.append(1000 * (time.perf_counter() - started))
    return latencies


def http_ms(client, url: str, queries: list[Path], top_k: int) -> list[float]:
    """Per-request milliseconds of ``POST /match`` with each photo; fails on any wrong answer."""
    latencies = []
    for path in queries:
        body = path.read_bytes()
        started = time.perf_counter()
        response = client.post(f"{url}/match", files={"image": (path.name, body, "image/jpeg")},
                               data={"top_k": str(top_k)})
        latencies.append(1000 * (time.perf_counter() - started))
        if response.status_code != 200 or len(response.json()["matches"]) != top_k:
            raise RuntimeError(f"/match answered {response.status_code}: {response.text[:500]}")
    return latencies


def batches(queries: list[Path], size: int) -> list[list[Path]]:
    """``queries`` cut into consecutive lists of ``size`` (the last one shorter)."""
    return [queries[start:start + size] for start in range(0, len(queries), size)]


def http_batch_ms(client, url: str, queries: list[Path], top_k: int, batch: int) -> list[float]:
    """Per-request milliseconds of ``POST /match_batch``, ``batch`` photos a request; fails on any wrong answer."""
    latencies = []
    for chunk in batches(queries, batch):
        files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in chunk]
        started = time.perf_counter()
        response = client.post(f"{url}/match_batch", files=files, data={"top_k": str(top_k)})
        latencies.append(1000 * (time.perf_counter() - started))
        results = response.json().get("results") if response.status_code == 200 else None
        if results is None or len(results) != len(chunk) or any(len(r["matches"]) != top_k for r in results):
            raise RuntimeError(f"/match_batch answered {response.status_code}: {response.text[:500]}")
    return latencies


def catalogue_skus(images: int, images_per_sku: int) -> int:
    """How many SKUs ``package`` labels ``images`` catalogue photos with, ``images_per_sku`` each."""
    return math.ceil(images / images_per_sku)


def summary(latencies: list[float]) -> dict[str, float]:
    """Median, 95th percentile and mean of a list of milliseconds."""
    ordered = sorted(latencies)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "mean": statistics.fmean(ordered), "n": len(ordered)}


def served_side(workers: int) -> str:
    """The row name of a ``bentoml serve`` with ``workers`` worker processes."""
    return f"HTTP POST /match to bentoml serve, {workers} worker{'s' if workers > 1 else ''}"


def batch_side(workers: int | None, batch: int) -> str:
    """The row name of batches of ``batch`` photos: in-process when ``workers`` is None, else served."""
    if workers is None:
        return f"in-process: ServedModel.match over batches of {batch}"
    return f"HTTP POST /match_batch ({batch} photos a request) to bentoml serve, {workers} worker{'s' if workers > 1 else ''}"


def in_process_throughput(served, queries: list[Path], top_k: int, batch: int = 1) -> dict[str, float]:
    """Images per second matched in-process, ``batch`` at a time one call after another, with per-call latencies."""
    started = time.perf_counter()
    latencies = in_process_ms(served, queries, top_k, batch)
    return {"per_s": len(queries) / (time.perf_counter() - started), **summary(latencies), "n": len(queries)}


def http_throughput(client, url: str, queries: list[Path], top_k: int, clients: int,
                    batch: int | None = None) -> dict[str, float]:
    """Images per second with ``clients`` callers at once, each sending every query once.

    One photo per ``/match`` request, or ``batch`` photos per ``/match_batch`` request; the
    latencies are per request either way, ``n`` counts images.
    """
    def one_caller(_) -> list[float]:
        return http_ms(client, url, queries, top_k) if batch is None else http_batch_ms(client, url, queries, top_k,
                                                                                         batch)

    with ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        per_client = list(pool.map(one_caller, range(clients)))
        elapsed = time.perf_counter() - started
    images = clients * len(queries)
    return {"per_s": images / elapsed, **summary([ms for client_ms in per_client for ms in client_ms]), "n": images}


def serve_env(tag: str, workers: int) -> dict[str, str]:
    """The server's environment: the packaged model, no telemetry, the repo importable, ``workers``."""
    overrides = {"services": {SERVICE_NAME: {"workers": workers}}}
    return {**os.environ, "SKUMATCH_BENTO_MODEL": tag, "BENTOML_DO_NOT_TRACK": "True", "DO_NOT_TRACK": "1",
            "BENTOML_CONFIG_OVERRIDES": json.dumps(overrides),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def measure(params: Params, scratch: Path, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Latency, throughput and batch summaries per side: the baseline, then one server per worker count."""
    import httpx

    from serving.local import start_server, stop_server, wait_ready

    tag, served = package(params, scratch, args.catalogue, args.skus_of)
    queries = write_photos(scratch / "queries", args.requests + WARM_UP, seed=4)
    latencies: dict[str, list[float]] = {BASELINE: []}
    throughput: dict[str, dict[str, float]] = {}
    batched: dict[str, dict[str, float]] = {}
    for workers in args.workers:
        side = served_side(workers)
        server = start_server("serving.service:Matcher", serve_env(tag, workers), scratch / f"serve-{workers}.log",
                              cwd=REPO_ROOT)
        try:
            if not wait_ready(server, timeout=180):
                raise RuntimeError(f"bentoml serve did not become ready:\n{server.output()[-3000:]}")
            latencies[side] = []
            # Enough connections that no caller waits for one: the server is what is measured.
            limits = httpx.Limits(max_connections=args.clients + 1)
            with httpx.Client(timeout=120, limits=limits) as client:
                for _ in range(args.repeats):
                    latencies[BASELINE] += in_process_ms(served, queries, args.top_k)[WARM_UP:]
                    latencies[side] += http_ms(client, server.url, queries, args.top_k)[WARM_UP:]
                    print({name: round(statistics.median(values), 1) for name, values in latencies.items()},
                          flush=True)
                throughput.setdefault(BASELINE, in_process_throughput(served, queries[WARM_UP:], args.top_k))
                throughput[side] = http_throughput(client, server.url, queries[WARM_UP:], args.top_k, args.clients)
                print({name: round(figures["per_s"], 2) for name, figures in throughput.items()}, flush=True)
                batched.setdefault(BASELINE, throughput[BASELINE])
                batched.setdefault(batch_side(None, args.batch),
                                   in_process_throughput(served, queries[WARM_UP:], args.top_k, args.batch))
                batched[batch_side(workers, args.batch)] = http_throughput(
                    client, server.url, queries[WARM_UP:], args.top_k, args.clients, batch=args.batch)
                print({name: round(figures["per_s"], 2) for name, figures in batched.items()}, flush=True)
        finally:
            stop_server(server)
    return {side: summary(values) for side, values in latencies.items()}, throughput, batched


# (header, summary key, decimals) of the two tables' figure columns.
LATENCY_COLUMNS = [("p50 ms", "p50", 1), ("p95 ms", "p95", 1), ("mean ms", "mean", 1)]
THROUGHPUT_COLUMNS = [("per second", "per_s", 2), ("p50 ms", "p50", 1), ("p95 ms", "p95", 1)]
# Latencies here are per request (a whole batch); the rate counts images.
BATCH_COLUMNS = [("images per second", "per_s", 2), ("p50 ms per request", "p50", 1), ("p95 ms per request", "p95", 1)]


def table(results: dict[str, dict[str, float]], columns: list[tuple[str, str, int]], counted: str = "requests") -> list[str]:
    """A markdown table, one row per side: the ``counted`` number, ``columns``, and the first column over the baseline's."""
    first_header, first_key, _ = columns[0]
    lines = [f"| side | {counted} | {' | '.join(header for header, _, _ in columns)} | "
             f"{first_header.removesuffix(' ms')} vs baseline |", "|---|---|" + "---|" * (len(columns) + 1)]
    for side, figures in results.items():
        cells = " | ".join(f"{figures[key]:.{decimals}f}" for _, key, decimals in columns)
        lines.append(f"| {side} | {figures['n']} | {cells} | ×{figures[first_key] / results[BASELINE][first_key]:.2f} |")
    return lines


def render(latency: dict[str, dict[str, float]], throughput: dict[str, dict[str, float]],
           batched: dict[str, dict[str, float]], params: Params, args: argparse.Namespace) -> str:
    """The results file: latency, throughput and batch tables, each side's figure over the baseline's."""
    model = params.model
    lines = ["# Serving benchmark (/match through bentoml serve vs in-process)", "",
             f"- Run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python -m benchmarks.serving --requests {args.requests} "
             f"--catalogue {args.catalogue} --skus-of {args.skus_of} --repeats {args.repeats} --top-k {args.top_k} "
             f"--clients {args.clients} --workers {' '.join(map(str, args.workers))} --batch {args.batch}`",
             f"- Machine: {machine()}, torch threads {torch.get_num_threads()} (benchmark process; the server "
             "runs as BentoML configures it)",
             f"- Encoder: `{model.backbone}` (pretrained {model.pretrained}), image size {model.image_size or 'native'}, "
             f"embedding {model.embed_dim}, flip TTA {model.flip_tta}, query zooms {list(model.query_zooms)}",
             f"- Catalogue: {args.catalogue} images of {catalogue_skus(args.catalogue, args.skus_of)} SKUs in the FAISS "
             f"index; queries: {args.requests} JPEG noise photos",
             "", f"## Latency: one request at a time, {args.repeats} alternating passes per side after {WARM_UP} "
             "warm-up requests each", "",
             *table(latency, LATENCY_COLUMNS),
             "", f"## Throughput: the baseline one query after another; each server with {args.clients} callers "
             "at once, each sending every query", "",
             *table(throughput, THROUGHPUT_COLUMNS),
             "", f"## Batches: {args.batch} photos a request to /match_batch, {args.clients} callers at once, each "
             "sending every query; the baseline as above", "",
             *table(batched, BATCH_COLUMNS, counted="images")]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--requests", type=int, default=30, help="timed /match requests per pass and side")
    parser.add_argument("--catalogue", type=int, default=200, help="catalogue images in the index")
    parser.add_argument("--skus-of", type=int, default=2, help="catalogue images per SKU")
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes per side")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4, help="callers at once in the throughput phase")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="BentoML worker counts to serve with, one server after another")
    parser.add_argument("--batch", type=int, default=16, help="photos per /match_batch request")
    parser.add_argument("--set", "-S", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if min(args.requests, args.catalogue, args.skus_of, args.repeats, args.top_k, args.clients, args.batch,
           *args.workers) < 1:
        parser.error("--requests, --catalogue, --skus-of, --repeats, --top-k, --clients, --batch and --workers "
                     "must be at least 1")
    if args.batch > MAX_BATCH_IMAGES:
        parser.error(f"--batch {args.batch} is more than /match_batch takes ({MAX_BATCH_IMAGES})")
    if args.top_k > (skus := catalogue_skus(args.catalogue, args.skus_of)):
        parser.error(f"--top-k {args.top_k} is more than the catalogue's {skus} SKUs")
    params = load_params(args.params, args.overrides)
    with tempfile.TemporaryDirectory(prefix="skumatch-serving-bench-") as scratch:
        # BentoML reads its home once per process: point it at the scratch folder before anything
        # imports bentoml, so the benchmark never writes into the user's model store.
        if "bentoml" in sys.modules:
            raise RuntimeError("benchmarks.serving must set BENTOML_HOME before bentoml is imported")
        previous_home = os.environ.get("BENTOML_HOME")
        os.environ["BENTOML_HOME"] = str(Path(scratch) / "bentoml_home")
        try:
            latency, throughput, batched = measure(params, Path(scratch), args)
        finally:
            if previous_home is None:
                os.environ.pop("BENTOML_HOME", None)
            else:
                os.environ["BENTOML_HOME"] = previous_home
    write_results(args.out, render(latency, throughput, batched, params, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
