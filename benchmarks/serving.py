"""/match latency through a real ``bentoml serve``, against the same model matched in-process.

    python -m benchmarks.serving [--requests 30] [--catalogue 200] [--repeats 2]

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

The two sides alternate ``--repeats`` times over the same ``--requests`` photos, one request at
a time (the latency one caller sees, not throughput under load); the first two requests of each
side are a warm-up and are not counted. Every HTTP answer must be 200 with as many matches as
asked, or the run fails. Figures go to ``benchmarks/results/serving.md`` with the machine noted;
its ``## Notes`` section is kept.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.accuracy import kept_notes, machine
from benchmarks.inference import noise_images
from components.config import Params, load_params

RESULTS = Path(__file__).parent / "results" / "serving.md"
REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE = "in-process: decode_image + ServedModel.match (baseline)"
SERVED = "HTTP POST /match to bentoml serve"
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
    index = build_catalogue_index(encoder, preprocess, rows, use_gpu="never",
                                  meta={"model_name": MODEL_NAME, "model_version": "1"})
    checksum = save_index(index, scratch / "index")
    resolved = ResolvedModel(MODEL_NAME, "1", encoder_dir, scratch / "index", checksum, {})
    tag = package_model(resolved, MODEL_NAME, default_top_k=params.serve.top_k)
    return tag, load_served_model(encoder_dir, scratch / "index", MODEL_NAME, "1", checksum)


def in_process_ms(served, queries: list[Path], top_k: int) -> list[float]:
    """Per-query milliseconds of what the service's handler runs, without HTTP."""
    from serving.uploads import decode_image

    latencies = []
    for path in queries:
        started = time.perf_counter()
        served.match([decode_image(path)], top_k)
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


def catalogue_skus(images: int, images_per_sku: int) -> int:
    """How many SKUs ``package`` labels ``images`` catalogue photos with, ``images_per_sku`` each."""
    return math.ceil(images / images_per_sku)


def summary(latencies: list[float]) -> dict[str, float]:
    """Median, 95th percentile and mean of a list of milliseconds."""
    ordered = sorted(latencies)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "mean": statistics.fmean(ordered), "n": len(ordered)}


def measure(params: Params, scratch: Path, requests: int, catalogue: int, skus_of: int, repeats: int,
            top_k: int) -> dict[str, dict[str, float]]:
    """Both sides' latency summaries over ``repeats`` alternating passes of the same queries."""
    import httpx

    from serving.local import start_server, stop_server, wait_ready

    tag, served = package(params, scratch, catalogue, skus_of)
    queries = write_photos(scratch / "queries", requests + WARM_UP, seed=4)
    env = {**os.environ, "SKUMATCH_BENTO_MODEL": tag, "BENTOML_DO_NOT_TRACK": "True", "DO_NOT_TRACK": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    server = start_server("serving.service:Matcher", env, scratch / "serve.log", cwd=REPO_ROOT)
    try:
        if not wait_ready(server, timeout=180):
            raise RuntimeError(f"bentoml serve did not become ready:\n{server.output()[-3000:]}")
        latencies: dict[str, list[float]] = {BASELINE: [], SERVED: []}
        with httpx.Client(timeout=60) as client:
            for _ in range(repeats):
                latencies[BASELINE] += in_process_ms(served, queries, top_k)[WARM_UP:]
                latencies[SERVED] += http_ms(client, server.url, queries, top_k)[WARM_UP:]
                print({side: round(statistics.median(values), 1) for side, values in latencies.items()}, flush=True)
    finally:
        stop_server(server)
    return {side: summary(values) for side, values in latencies.items()}


def render(results: dict[str, dict[str, float]], params: Params, args: argparse.Namespace) -> str:
    """The results file: one row per side, with the ratio of each figure to the baseline's."""
    model = params.model
    base = results[BASELINE]
    lines = ["# Serving benchmark (/match through bentoml serve vs in-process)", "",
             f"- Run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python -m benchmarks.serving --requests {args.requests} "
             f"--catalogue {args.catalogue} --skus-of {args.skus_of} --repeats {args.repeats} --top-k {args.top_k}`",
             f"- Machine: {machine()}, torch threads {torch.get_num_threads()} (benchmark process; the server "
             "runs as BentoML configures it)",
             f"- Encoder: `{model.backbone}` (pretrained {model.pretrained}), image size {model.image_size or 'native'}, "
             f"embedding {model.embed_dim}, flip TTA {model.flip_tta}, query zooms {list(model.query_zooms)}",
             f"- Catalogue: {args.catalogue} images of {catalogue_skus(args.catalogue, args.skus_of)} SKUs in the FAISS "
             "index; "
             f"queries: {args.requests} JPEG noise photos, one request at a time, {args.repeats} alternating passes "
             f"per side after {WARM_UP} warm-up requests each",
             "", "| side | requests | p50 ms | p95 ms | mean ms | p50 vs baseline |", "|---|---|---|---|---|---|"]
    for side, figures in results.items():
        lines.append(f"| {side} | {figures['n']} | {figures['p50']:.1f} | {figures['p95']:.1f} | {figures['mean']:.1f} "
                     f"| ×{figures['p50'] / base['p50']:.2f} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--requests", type=int, default=30, help="timed /match requests per pass and side")
    parser.add_argument("--catalogue", type=int, default=200, help="catalogue images in the index")
    parser.add_argument("--skus-of", type=int, default=2, help="catalogue images per SKU")
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes per side")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--set", "-S", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if min(args.requests, args.catalogue, args.skus_of, args.repeats, args.top_k) < 1:
        parser.error("--requests, --catalogue, --skus-of, --repeats and --top-k must be at least 1")
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
            results = measure(params, Path(scratch), args.requests, args.catalogue, args.skus_of, args.repeats,
                              args.top_k)
        finally:
            if previous_home is None:
                os.environ.pop("BENTOML_HOME", None)
            else:
                os.environ["BENTOML_HOME"] = previous_home
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, params, args) + kept_notes(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
