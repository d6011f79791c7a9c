"""Accuracy benchmark: zero-shot backbone vs the fine-tuned model, both protocols, in one run.

    python -m benchmarks.accuracy --data ../shared/datasets/grocery-store --queries val
    python -m benchmarks.accuracy --queries val --ablation          # also the recipe ablation

The baseline (the pretrained backbone's own features, no training) and the fine-tuned model are
measured in the same run on the same data, so the ratio between them is meaningful whatever the
machine. Figures go to ``benchmarks/results/accuracy.md`` with the machine noted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from components.config import Params, load_params
from components.data import data_version, load_manifest
from components.evaluate import evaluate_encoder, protocol_sets
from components.model import build_encoder, load_encoder, resolve_device
from components.train import train_encoder

LOGGER = logging.getLogger("benchmarks.accuracy")
RESULTS = Path(__file__).parent / "results" / "accuracy.md"
METRIC_COLUMNS = ("top1", "top3", "top5", "delta_similarity", "map")

# What each ablation row changes from the default recipe (params.yaml). A row that keeps the
# backbone frozen costs about a minute (the cached features are shared); a row that fine-tunes
# the backbone costs as much as the default recipe, so only the choices that matter most are
# here. Exploration beyond these is recorded by hand in the results file's notes.
ABLATION: dict[str, list[str]] = {
    "head only: no backbone fine-tuning (stage 1 alone)": ["train.epochs=10"],
    # Measured in earlier runs, kept in the results file's notes with the run they come from:
    # "train.frozen_stage=crops train.epochs=10 train.frozen_epochs=2", "train.catalogue_in_batches=true",
    # "train.freeze_batchnorm=false", "train.ema_decay=0.995".
}
# Rows that change only how the trained model embeds at inference (test-time augmentation): they
# re-evaluate the default row's model, so each costs an evaluation, not a training run.
INFERENCE_ABLATION: dict[str, list[str]] = {
    "queries at zoom 1 only (model.query_zooms=[1.0])": ["model.query_zooms=[1.0]"],
    "no test-time augmentation (no flip, no query zooms)": ["model.flip_tta=false", "model.query_zooms=[1.0]"],
}
INFERENCE_ONLY = {"flip_tta", "query_zooms"}


def machine() -> str:
    """One line naming the hardware and software the figures come from."""
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def _evaluate(encoder, preprocess, manifest, params: Params, query_split: str) -> tuple[dict, float]:
    """Metrics of both protocols and the embedding throughput (images/s) of that evaluation."""
    sets = protocol_sets(manifest, query_split, params.data.train_split)
    n_images = len(set(sets.queries["image_path"]).union(*(g["image_path"] for g in sets.galleries.values())))
    device = resolve_device(params.train.device)
    started = time.perf_counter()
    metrics = evaluate_encoder(encoder.to(device), preprocess, manifest, query_split, params.data.train_split,
                               params.evaluate, device=device)
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
    run = params.model_copy(update={"train": params.train.model_copy(update={
        "checkpoint_dir": f"{scratch}/checkpoints", "output_dir": f"{scratch}/model", "resume": False})})
    result = train_encoder(run, manifest, data_version=version, progress=False)
    encoder, preprocess, _ = load_encoder(result.model_dir)
    metrics, throughput = _evaluate(encoder, preprocess, manifest, params, query_split)
    return {"metrics": metrics, "images_per_s": throughput, "train_wall_time_s": result.wall_time_s,
            "model_dir": result.model_dir}


def check_inference_only(name: str, params: Params, variant: Params) -> None:
    """Refuse a test-time row that changes more than test-time settings: its figures would be wrong."""
    changed = {key for key, value in variant.model.model_dump().items() if value != getattr(params.model, key)}
    if not changed <= INFERENCE_ONLY or variant.train != params.train or variant.data != params.data:
        raise ValueError(f"inference ablation {name!r} changes more than model.{sorted(INFERENCE_ONLY)}: "
                         "it would need a training run of its own")


def re_evaluated(model_dir: Path, variant: Params, manifest, query_split: str) -> dict:
    """A trained model evaluated with the variant's test-time settings (flip, query zooms); no training."""
    encoder, preprocess, _ = load_encoder(model_dir)
    encoder.flip_average, encoder.query_zooms = variant.model.flip_tta, tuple(variant.model.query_zooms)
    metrics, throughput = _evaluate(encoder, preprocess, manifest, variant, query_split)
    return {"metrics": metrics, "images_per_s": throughput, "train_wall_time_s": 0.0}


def _row(name: str, result: dict) -> str:
    cells = [name]
    for protocol in ("catalogue", "nn"):
        cells += [f"{result['metrics'][protocol][m]:.3f}" for m in METRIC_COLUMNS]
    cells += [f"{result['train_wall_time_s'] / 60:.1f}", f"{result['images_per_s']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def render(results: dict[str, dict], ablation: dict[str, dict], params: Params, query_split: str,
           version: str, n_queries: int, training_ablation: bool = False) -> str:
    """The results file: the recipe, the machine, the comparison and the ablation table."""
    header = ("| model | cat top-1 | cat top-3 | cat top-5 | cat Δsim | cat mAP | nn top-1 | nn top-3 | nn top-5 "
              "| nn Δsim | nn mAP | train min | eval img/s |\n" + "|---" * 13 + "|")
    base, tuned = results["zero-shot backbone"], results["fine-tuned (default recipe)"]
    ratios = ", ".join(
        f"{protocol} top-1 ×{tuned['metrics'][protocol]['top1'] / max(base['metrics'][protocol]['top1'], 1e-9):.2f}"
        for protocol in ("catalogue", "nn"))
    lines = [
        "# Accuracy benchmark",
        "",
        f"- Run: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, `python -m benchmarks.accuracy "
        f"--queries {query_split}{' --ablation' if training_ablation else ''}`",
        f"- Machine: {machine()}",
        f"- Data: `{params.data.root}` (DVC hash `{version}`), queries = `{query_split}` ({n_queries} photos), "
        f"`nn` gallery = `{params.data.train_split}`, `catalogue` gallery = the catalogue images",
        f"- Backbone: `{params.model.backbone}`, image size {params.model.image_size or 'native'}, "
        f"embedding {params.model.embed_dim}",
        f"- Test time (every row): flip TTA {params.model.flip_tta}, query zooms {params.model.query_zooms}",
        f"- Recipe (`train` in params.yaml): `{json.dumps(params.train.model_dump(exclude={'checkpoint_dir', 'output_dir'}))}`",
        "",
        "Top-k over distinct SKUs; Δsim = similarity to the true SKU minus the mean similarity to the other SKUs.",
        "",
        header,
        *(_row(name, result) for name, result in results.items()),
        "",
        f"Fine-tuned vs zero-shot in this run: {ratios}.",
    ]
    if ablation:
        heading = ("## Ablation (each row: the default recipe with one change, same run; \"train min\" 0.0 = "
                   "the default row's model re-evaluated)")
        lines += ["", heading, "", header,
                  *(_row(name, result) for name, result in ablation.items())]
    return "\n".join(lines) + "\n"


NOTES_HEADING = "\n## Notes"


def kept_notes(results_file: Path) -> str:
    """The hand-written ``## Notes`` section of an earlier results file (exploration, caveats), kept across runs."""
    if not results_file.exists():
        return ""
    text = results_file.read_text()
    return text[text.index(NOTES_HEADING):] if NOTES_HEADING in text else ""


def write_results(results_file: str | Path, text: str) -> str:
    """Write a benchmark's results file: ``text``, then the earlier file's kept ``## Notes``. Returns what was written."""
    path = Path(results_file)
    text += kept_notes(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset root (default: data.root of params.yaml)")
    parser.add_argument("--queries", default=None, help="query split: any <name>.txt of the layout (default: data.query_split)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", "-S", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--ablation", action="store_true",
                        help="also train and evaluate the training ablation variants (the test-time rows always run)")
    parser.add_argument("--out", default=str(RESULTS))
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
        results = {"zero-shot backbone": zero_shot(params, manifest, query_split),
                   "fine-tuned (default recipe)": fine_tuned(params, manifest, query_split, version, scratch)}
        ablation = {}
        for name, changes in INFERENCE_ABLATION.items():
            variant = load_params(args.params, overrides + changes + [f"data.query_split={query_split}"])
            check_inference_only(name, params, variant)
            # Before the training rows: they overwrite the default row's model in scratch.
            ablation[name] = re_evaluated(results["fine-tuned (default recipe)"]["model_dir"], variant, manifest,
                                          query_split)
        if args.ablation:
            for name, changes in ABLATION.items():
                variant = load_params(args.params, overrides + changes + [f"data.query_split={query_split}"])
                ablation[name] = fine_tuned(variant, manifest, query_split, version, scratch)
    print(write_results(args.out, render(results, ablation, params, query_split, version, n_queries, args.ablation)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
