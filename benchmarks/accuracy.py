"""Accuracy benchmark: zero-shot backbone vs the fine-tuned model, both protocols, in one run.

    python -m benchmarks.accuracy --data ../shared/datasets/grocery-store --queries val
    python -m benchmarks.accuracy --queries val --ablation          # also the recipe ablation

The baseline (the pretrained backbone's own features, no training) and the fine-tuned model are
measured in the same run on the same data, so the ratio between them is meaningful whatever the
machine. Figures go to ``benchmarks/results/accuracy.md`` with the machine noted.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.reporting import benchmark_parser, command_line, results_page, table, write_results
from components.config import Params, load_params
from components.data import data_version, load_manifest
from components.evaluate import evaluate_encoder, protocol_sets
from components.model import build_encoder, load_encoder, resolve_device
from components.training import train_encoder

LOGGER = logging.getLogger("benchmarks.accuracy")
RESULTS = Path(__file__).parent / "results" / "accuracy.md"
METRIC_COLUMNS = ("top1", "top3", "top5", "delta_similarity", "map")

# What each ablation row changes from the default recipe (params.yaml). A row that keeps the
# backbone frozen costs about a minute (the cached features are shared); a row that fine-tunes
# the backbone costs as much as the default recipe, so only the choices that matter most are
# here. Exploration beyond these is recorded by hand in the results file's notes.
ABLATION: dict[str, list[str]] = {
    "head only: no backbone fine-tuning (stage 1 alone)": ["train.schedule.epochs=10"],
    # Measured in earlier runs, kept in the results file's notes with the run they come from:
    # "train.schedule.frozen_stage=crops train.schedule.epochs=10 train.schedule.frozen_epochs=2",
    # "train.sampler.catalogue_in_batches=true", "train.schedule.freeze_batchnorm=false",
    # "train.schedule.ema_decay=0.995".
}
# Rows that change only how the trained model embeds at inference (test-time augmentation): they
# re-evaluate the default row's model, so each costs an evaluation, not a training run.
INFERENCE_ABLATION: dict[str, list[str]] = {
    "queries at zoom 1 only (model.query_zooms=[1.0])": ["model.query_zooms=[1.0]"],
    "no test-time augmentation (no flip, no query zooms)": ["model.flip_tta=false", "model.query_zooms=[1.0]"],
}
INFERENCE_ONLY = {"flip_tta", "query_zooms"}


def _evaluate(encoder, preprocess, manifest, params: Params, query_split: str) -> tuple[dict, float]:
    """Metrics of both protocols and the embedding throughput (images/s) of that evaluation."""
    sets = protocol_sets(manifest, query_split, params.data.train_split)
    n_images = len(set(sets.queries["image_path"]).union(*(g["image_path"] for g in sets.galleries.values())))
    device = resolve_device(params.train.device)
    started = time.perf_counter()
    metrics = evaluate_encoder(
        encoder.to(device), preprocess, manifest, query_split, params.data.train_split, params.evaluate, device=device
    )
    return metrics, n_images / (time.perf_counter() - started)


def zero_shot(params: Params, manifest, query_split: str) -> dict:
    """The pretrained backbone's own (pooled, normalised) features, with no projection and no training."""
    raw = params.model.model_copy(update={"embed_dim": 0})
    encoder, preprocess = build_encoder(raw)
    metrics, throughput = _evaluate(encoder, preprocess, manifest, params, query_split)
    return {"metrics": metrics, "images_per_s": throughput, "train_wall_time_s": 0.0}


def fine_tuned(params: Params, manifest, query_split: str, version: str, scratch: str) -> dict:
    """Train with the recipe from scratch (no resume) and evaluate the saved model.

    ``scratch`` is shared by the runs of one benchmark: training never resumes there, but
    variants that differ only in how the head trains reuse the cached backbone features, as a
    user's reruns do. The first run that needs a set of features pays for it in its wall time.
    """
    io = params.train.io.model_copy(
        update={"checkpoint_dir": f"{scratch}/checkpoints", "output_dir": f"{scratch}/model", "resume": False}
    )
    run = params.model_copy(update={"train": params.train.model_copy(update={"io": io})})
    result = train_encoder(run, manifest, data_version=version, progress=False)
    encoder, preprocess, _ = load_encoder(result.model_dir)
    metrics, throughput = _evaluate(encoder, preprocess, manifest, params, query_split)
    return {
        "metrics": metrics,
        "images_per_s": throughput,
        "train_wall_time_s": result.wall_time_s,
        "model_dir": result.model_dir,
    }


def check_inference_only(name: str, params: Params, variant: Params) -> None:
    """Refuse a test-time row that changes more than test-time settings: its figures would be wrong."""
    changed = {key for key, value in variant.model.model_dump().items() if value != getattr(params.model, key)}
    if not changed <= INFERENCE_ONLY or variant.train != params.train or variant.data != params.data:
        raise ValueError(
            f"inference ablation {name!r} changes more than model.{sorted(INFERENCE_ONLY)}: "
            "it would need a training run of its own"
        )


def re_evaluated(model_dir: Path, variant: Params, manifest, query_split: str) -> dict:
    """A trained model evaluated with the variant's test-time settings (flip, query zooms); no training."""
    encoder, preprocess, _ = load_encoder(model_dir)
    encoder.flip_average, encoder.query_zooms = variant.model.flip_tta, tuple(variant.model.query_zooms)
    metrics, throughput = _evaluate(encoder, preprocess, manifest, variant, query_split)
    return {"metrics": metrics, "images_per_s": throughput, "train_wall_time_s": 0.0}


HEADER = (
    "model",
    "cat top-1",
    "cat top-3",
    "cat top-5",
    "cat Δsim",
    "cat mAP",
    "nn top-1",
    "nn top-3",
    "nn top-5",
    "nn Δsim",
    "nn mAP",
    "train min",
    "eval img/s",
)


def _row(name: str, result: dict) -> list[str]:
    cells = [name]
    for protocol in ("catalogue", "nn"):
        cells += [f"{result['metrics'][protocol][m]:.3f}" for m in METRIC_COLUMNS]
    return cells + [f"{result['train_wall_time_s'] / 60:.1f}", f"{result['images_per_s']:.1f}"]


def render(
    results: dict[str, dict],
    ablation: dict[str, dict],
    params: Params,
    query_split: str,
    version: str,
    n_queries: int,
    command: str,
) -> str:
    """The results file: the comparison, the command, the machine, the recipe, then the ablation table."""
    base, tuned = results["zero-shot backbone"], results["fine-tuned (default recipe)"]
    ratios = ", ".join(
        f"{protocol} top-1 ×{tuned['metrics'][protocol]['top1'] / max(base['metrics'][protocol]['top1'], 1e-9):.2f}"
        for protocol in ("catalogue", "nn")
    )
    setup = [
        f"Data: `{params.data.root}` (DVC hash `{version}`), queries = `{query_split}` ({n_queries} photos), "
        f"`nn` gallery = `{params.data.train_split}`, `catalogue` gallery = the catalogue images",
        f"Backbone: `{params.model.backbone}`, image size {params.model.image_size or 'native'}, "
        f"embedding {params.model.embed_dim}",
        f"Test time (every row): flip TTA {params.model.flip_tta}, query zooms {params.model.query_zooms}",
        f"Recipe (`train` in params.yaml): `{json.dumps(params.train.model_dump(exclude={'io'}))}`",
    ]
    how_to_read = [
        "top-k is counted over distinct SKUs; Δsim = similarity to the true SKU minus the mean similarity to the "
        "other SKUs. `cat` columns are the catalogue protocol (the gallery is the catalogue images, one or a few per "
        "SKU), `nn` columns the nearest-neighbour protocol (the gallery is the labelled training photos); both take "
        "the same query photos. Both rows are measured in the same run on the same data, so their ratio holds "
        'whatever the machine; "train min" and "eval img/s" are this machine\'s.',
        f"Fine-tuned vs zero-shot in this run: {ratios}.",
    ]
    details = []
    if ablation:
        details = [
            '## Ablation (each row: the default recipe with one change, same run; "train min" 0.0 = '
            "the default row's model re-evaluated)",
            "",
            *table(HEADER, (_row(name, result) for name, result in ablation.items())),
        ]
    return results_page(
        "Accuracy benchmark",
        table(HEADER, (_row(name, result) for name, result in results.items())),
        command,
        setup,
        how_to_read,
        details,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results file."""
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--data", help="dataset root (default: data.root of params.yaml)")
    parser.add_argument(
        "--queries", default=None, help="query split: any <name>.txt of the layout (default: data.query_split)"
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also train and evaluate the training ablation variants (the test-time rows always run)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    overrides = args.overrides + ([f"data.root={args.data}"] if args.data else [])
    params = load_params(args.params, overrides)
    query_split = args.queries or params.data.query_split
    params = params.model_copy(update={"data": params.data.model_copy(update={"query_split": query_split})})
    manifest = load_manifest(params.data.root, params.data.layout, params.data.max_images_per_sku)
    n_queries = len(protocol_sets(manifest, query_split, params.data.train_split).queries)
    version = data_version(params.data.root)

    with tempfile.TemporaryDirectory(prefix="skumatch-bench-") as scratch:
        results = {
            "zero-shot backbone": zero_shot(params, manifest, query_split),
            "fine-tuned (default recipe)": fine_tuned(params, manifest, query_split, version, scratch),
        }
        ablation = {}
        for name, changes in INFERENCE_ABLATION.items():
            variant = load_params(args.params, overrides + changes + [f"data.query_split={query_split}"])
            check_inference_only(name, params, variant)
            # Before the training rows: they overwrite the default row's model in scratch.
            ablation[name] = re_evaluated(
                results["fine-tuned (default recipe)"]["model_dir"], variant, manifest, query_split
            )
        if args.ablation:
            for name, changes in ABLATION.items():
                variant = load_params(args.params, overrides + changes + [f"data.query_split={query_split}"])
                ablation[name] = fine_tuned(variant, manifest, query_split, version, scratch)
    args.queries = query_split
    command = command_line(
        "benchmarks.accuracy", args, ("queries", "ablation"), parser, optional=("params", "data", "out")
    )
    print(write_results(args.out, render(results, ablation, params, query_split, version, n_queries, command)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
