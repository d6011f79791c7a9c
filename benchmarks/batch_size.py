"""Embedding speed by batch size on this machine, against ``evaluate.batch_size`` (the baseline).

    python -m benchmarks.batch_size [--batch-sizes 1 2 4 8 16 32] [--images 64] [--repeats 3]

Evaluation, index builds and the frozen stage's feature cache embed images in batches of
``evaluate.batch_size``; ``/match_batch`` embeds a request's photos ``serve.batch_size`` at a time. On a GPU larger
batches are faster per image; on a CPU they need not be, because a batch's activations outgrow
the caches. This measures the three workloads at each batch size, with the params' backbone (by
default the packaged, pretrained EfficientNet-Lite0, so no download):

- gallery: each image with its mirror (``embed_batch``), what evaluation and index builds do;
- queries: each photo at every query zoom with its mirror (``embed_batch(..., as_queries=True)``),
  what evaluation's queries and ``/match_batch`` do;
- features: the backbone alone, one view (``Encoder.features``), what the feature cache does.

The batch sizes alternate ``--repeats`` times over the same ``--images`` seeded noise photos
(Grocery Store's largest size; timing does not depend on content), and each keeps its fastest
repeat, so a slower spell of the machine does not land on one size only. The largest difference
from the baseline's embeddings is reported: the batch size must change speed only. Figures go to
``benchmarks/results/batch_size.md`` with the machine noted; its ``## Notes`` section is kept.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.inference import PHOTO_PX, noise_images
from benchmarks.reporting import benchmark_parser, command_line, results_page, table, torch_threads, write_results
from components.config import Params, load_params
from components.model import build_encoder, embed_batch

RESULTS = Path(__file__).parent / "results" / "batch_size.md"


def workloads(params: Params) -> dict[str, Callable[[list], torch.Tensor]]:
    """Each workload's name and the function that embeds one batch of PIL images with it."""
    torch.manual_seed(params.train.seed)
    encoder, preprocess = build_encoder(params.model)
    encoder.eval()
    passes = 2 * len(encoder.query_zooms)

    def features(images: list) -> torch.Tensor:
        pixels = torch.stack([preprocess(image) for image in images])
        return encoder.features(pixels.contiguous(memory_format=torch.channels_last))

    return {
        "gallery (image + mirror, 2 passes)": lambda images: embed_batch(encoder, preprocess, images),
        f"queries (every zoom + mirror, {passes} passes)": lambda images: embed_batch(
            encoder, preprocess, images, as_queries=True
        ),
        "backbone features (1 pass, the feature cache)": features,
    }


@torch.no_grad()
def embed_all(embed: Callable[[list], torch.Tensor], images: list, batch_size: int) -> tuple[float, torch.Tensor]:
    """Seconds per image to embed ``images`` in batches of ``batch_size``, and the embeddings."""
    started = time.perf_counter()
    rows = [embed(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return (time.perf_counter() - started) / len(images), torch.cat(rows)


def measure(params: Params, batch_sizes: list[int], images: int, repeats: int) -> dict[str, dict[int, dict]]:
    """Per workload and batch size: the fastest ms per image and the largest difference from the baseline's rows."""
    photos = noise_images(images, seed=5)
    baseline = params.evaluate.batch_size
    results = {}
    for name, embed in workloads(params).items():
        for size in batch_sizes:  # warm-up: oneDNN picks its kernels on the first call of each shape
            embed_all(embed, photos[:size], size)
        fastest = dict.fromkeys(batch_sizes, float("inf"))
        rows = {}
        for _ in range(repeats):
            for size in batch_sizes:
                seconds, rows[size] = embed_all(embed, photos, size)
                fastest[size] = min(fastest[size], seconds)
        results[name] = {
            size: {"ms": 1000 * fastest[size], "max_difference": (rows[size] - rows[baseline]).abs().max().item()}
            for size in batch_sizes
        }
        print(name, {size: round(r["ms"], 1) for size, r in results[name].items()}, flush=True)
    return results


def _label(size: int, baseline: int) -> str:
    return f"{size} (baseline)" if size == baseline else str(size)


def render(results: dict[str, dict[int, dict]], params: Params, args: argparse.Namespace, command: str) -> str:
    """The results file: every workload's ratios to the baseline, then one table per workload, a row per batch size."""
    model, baseline = params.model, params.evaluate.batch_size
    sizes = list(next(iter(results.values())))
    headline = table(
        ("batch size", *results),
        (
            (
                _label(size, baseline),
                *(f"×{by_size[size]['ms'] / by_size[baseline]['ms']:.2f}" for by_size in results.values()),
            )
            for size in sizes
        ),
    )
    setup = [
        f"Encoder: `{model.backbone}` (pretrained {model.pretrained}), image size "
        f"{model.image_size or 'native'}, embedding {model.embed_dim}, flip TTA {model.flip_tta}, "
        f"query zooms {list(model.query_zooms)}; {args.images} {PHOTO_PX} px noise photos",
        f"Each batch size's fastest of {args.repeats} alternating repeats. Baseline: batches of "
        f"{baseline} (`evaluate.batch_size`).",
    ]
    how_to_read = (
        "each cell above is the time per image at that batch size divided by the time per image in "
        f"batches of {baseline} (the baseline), for the same workload in the same run: below ×1.00 is "
        "faster. What a batch size buys depends on the machine (on a GPU larger batches are faster, on a "
        "CPU they need not be), so the ratios are this machine's. The tables below give the milliseconds "
        "and the largest difference from the baseline's embeddings, which stays at float rounding: the "
        "batch size changes speed only."
    )
    details = []
    for name, by_size in results.items():
        base = by_size[baseline]["ms"]
        details += [
            f"## {name}",
            "",
            *table(
                ("batch size", "ms per image", "vs baseline", "max abs difference from the baseline's embeddings"),
                (
                    (_label(size, baseline), f"{r['ms']:.1f}", f"×{r['ms'] / base:.2f}", f"{r['max_difference']:.1e}")
                    for size, r in by_size.items()
                ),
            ),
            "",
        ]
    return results_page(
        "Batch-size benchmark (embedding time per image)",
        headline,
        command,
        setup,
        how_to_read,
        details,
        machine_note=f", {torch_threads()}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--images", type=int, default=64, help="photos embedded per repeat and batch size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if min(args.images, args.repeats, *args.batch_sizes) < 1:
        parser.error("--images, --repeats and --batch-sizes must be at least 1")
    params = load_params(args.params, args.overrides)
    # The baseline is always measured, once, and sizes keep the order given.
    args.batch_sizes = list(dict.fromkeys([*args.batch_sizes, params.evaluate.batch_size]))
    results = measure(params, args.batch_sizes, args.images, args.repeats)
    command = command_line("benchmarks.batch_size", args, ("batch_sizes", "images", "repeats"), parser)
    write_results(args.out, render(results, params, args, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
