"""Embedding speed of the encoder's memory layout: channels-last (as built) vs the plain NCHW layout.

    python -m benchmarks.inference [--repeats 3]

``build_encoder`` (and so ``load_encoder``, evaluation and the Bento service) puts the
convolution weights in channels-last layout. This measures what that buys on the two
workloads that embed images without training, with the params' backbone (by default the
packaged, pretrained EfficientNet-Lite0, so no download):

- a ``/match`` query: one photo, embedded at every query zoom with its mirror image
  (``embed_batch(..., as_queries=True)``, 6 forward passes with the default params);
- gallery embedding: batches of ``evaluate.batch_size`` images with their mirrors
  (what evaluation and index builds do).

The baseline, in the same run, is the same weights converted back to NCHW. The two layouts
alternate ``--repeats`` times and each keeps its fastest repeat, so a slower spell of the
machine does not land on one side only. Images are seeded noise at Grocery Store's largest
photo size (348 px; timing does not depend on content). The largest difference between the
two layouts' embeddings is reported too: the layout must change speed only. Figures go to
``benchmarks/results/inference.md`` with the machine noted; its ``## Notes`` section is kept.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.reporting import benchmark_parser, command_line, results_page, table, torch_threads, write_results
from components.config import Params, load_params
from components.model import Encoder, Preprocess, build_encoder, embed_batch

RESULTS = Path(__file__).parent / "results" / "inference.md"
PHOTO_PX = 348  # the largest Grocery Store photos
BASELINE = "NCHW (baseline)"
BUILT = "channels-last (as built)"


def noise_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Seeded RGB noise photos of ``PHOTO_PX`` square."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(PHOTO_PX, PHOTO_PX, 3), dtype=np.uint8)) for _ in range(count)]


def seconds_per_image(
    encoder: Encoder, preprocess: Preprocess, images: list, batch_size: int, as_queries: bool
) -> float:
    """Wall time of embedding ``images`` in batches of ``batch_size``, per image."""
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        embed_batch(encoder, preprocess, images[start : start + batch_size], as_queries=as_queries)
    return (time.perf_counter() - started) / len(images)


def measure(params: Params, queries: int, gallery_batches: int, repeats: int) -> dict[str, dict]:
    """Per workload: both layouts' fastest ms per image, and the largest embedding difference."""
    torch.manual_seed(params.train.seed)
    built, preprocess = build_encoder(params.model)
    plain = copy.deepcopy(built).to(memory_format=torch.contiguous_format)
    batch_size = params.evaluate.batch_size
    workloads = {
        f"/match query (1 photo, {2 * len(built.query_zooms)} passes)": (noise_images(queries, seed=1), 1, True),
        f"gallery (batches of {batch_size}, 2 passes each)": (
            noise_images(batch_size * gallery_batches, seed=2),
            batch_size,
            False,
        ),
    }
    results = {}
    for name, (images, size, as_queries) in workloads.items():
        for encoder in (plain, built):  # warm-up: oneDNN picks its kernels on the first call
            seconds_per_image(encoder, preprocess, images[:size], size, as_queries)
        fastest = {BASELINE: float("inf"), BUILT: float("inf")}
        for _ in range(repeats):
            for layout, encoder in ((BASELINE, plain), (BUILT, built)):
                fastest[layout] = min(fastest[layout], seconds_per_image(encoder, preprocess, images, size, as_queries))
        sample = images[:size]
        difference = (
            (
                embed_batch(built, preprocess, sample, as_queries=as_queries)
                - embed_batch(plain, preprocess, sample, as_queries=as_queries)
            )
            .abs()
            .max()
            .item()
        )
        results[name] = {
            "ms": {layout: 1000 * s for layout, s in fastest.items()},
            "max_difference": difference,
            "images": len(images),
        }
        print(name, results[name], flush=True)
    return results


def render(results: dict[str, dict], params: Params, repeats: int, command: str) -> str:
    """The results file: one row per workload and layout, with the ratio to the baseline."""
    model = params.model
    headline = table(
        (
            "workload",
            "images",
            "NCHW ms per image (baseline)",
            "channels-last ms per image",
            "channels-last vs baseline",
            "max abs embedding difference",
        ),
        (
            (
                name,
                r["images"],
                f"{r['ms'][BASELINE]:.1f}",
                f"{r['ms'][BUILT]:.1f}",
                f"×{r['ms'][BUILT] / r['ms'][BASELINE]:.2f}",
                f"{r['max_difference']:.1e}",
            )
            for name, r in results.items()
        ),
    )
    setup = [
        f"Encoder: `{model.backbone}` (pretrained {model.pretrained}), image size "
        f"{model.image_size or 'native'}, embedding {model.embed_dim}, flip TTA {model.flip_tta}, "
        f"query zooms {list(model.query_zooms)}; {PHOTO_PX} px noise photos",
        f"Each layout's fastest of {repeats} alternating repeats. Baseline: the same weights in NCHW layout.",
    ]
    how_to_read = (
        '"channels-last vs baseline" is the time per image in the layout the encoder is built in '
        "divided by the same weights' time in NCHW, in the same run: below ×1.00, channels-last is "
        "faster. The embedding difference stays at float rounding: the layout changes speed only."
    )
    return results_page(
        "Inference layout benchmark (channels-last vs NCHW)",
        headline,
        command,
        setup,
        how_to_read,
        machine_note=f", {torch_threads()}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--queries", type=int, default=24, help="query photos per repeat")
    parser.add_argument("--gallery-batches", type=int, default=6, help="gallery batches per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if min(args.queries, args.gallery_batches, args.repeats) < 1:
        parser.error("--queries, --gallery-batches and --repeats must be at least 1")
    params = load_params(args.params, args.overrides)
    results = measure(params, args.queries, args.gallery_batches, args.repeats)
    command = command_line("benchmarks.inference", args, ("queries", "gallery_batches", "repeats"), parser)
    write_results(args.out, render(results, params, args.repeats, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
