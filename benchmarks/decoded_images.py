"""Memory and speed of the unfrozen stage's image store: decoded images kept vs decoded when drawn.

    python -m benchmarks.decoded_images --data ../shared/datasets/grocery-store --steps 30

Each way of holding the training images (``train.io.decoded_cache_mb``, ``train.io.loader_workers``)
builds the real :class:`components.training.stages.CropTraining` over the training split and catalogue
and runs ``--steps`` real fine-tuning steps (augmentation, forward, backward, optimiser). Every
way runs in its own process, so its peak memory is its own. The baseline, in the same run, is
the default: every decoded image kept. Figures go to ``benchmarks/results/decoded_images.md``
with the machine noted; its hand-written ``## Notes`` section is kept across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.reporting import benchmark_parser, command_line, measure_in_child, results_page, table, write_results

RESULTS = Path(__file__).parent / "results" / "decoded_images.md"
BASELINE = "all decoded images kept (default budget)"
# Name -> overrides of the default params; each runs in a fresh process.
WAYS: dict[str, list[str]] = {
    BASELINE: [],
    "none kept, decoded in the training loop": ["train.io.decoded_cache_mb=0", "train.io.loader_workers=0"],
    "none kept, decoded by 1 loader worker": ["train.io.decoded_cache_mb=0", "train.io.loader_workers=1"],
}


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure_one(params_path: str, overrides: list[str], steps: int) -> dict:
    """Build the crop stage and run ``steps`` steps in this process; its memory and times."""
    import resource

    import numpy as np
    import torch

    from components.config import load_params
    from components.data import load_manifest
    from components.training import training_setup
    from components.training.stages import CropTraining

    params = load_params(params_path, overrides)
    cfg = params.train
    torch.manual_seed(cfg.seed)
    setup = training_setup(params, load_manifest(params.data.root), torch.device("cpu"))
    labels, catalogue_rows = setup.labels, setup.catalogue_rows

    before_build = _rss_mib()
    started = time.perf_counter()
    stage = CropTraining(
        setup.preprocess, setup.paths, catalogue_rows, params.train, params.evaluate.batch_size, torch.device("cpu")
    )
    build_s = time.perf_counter() - started
    held_mib = _rss_mib() - before_build
    stage.steps_per_epoch = min(steps, stage.steps_per_epoch)  # a slice of an epoch is enough to time a step
    started = time.perf_counter()
    stage.run_epoch(
        cfg.schedule.frozen_epochs,
        setup.encoder,
        setup.head,
        setup.optimizer,
        labels,
        torch.from_numpy(labels[catalogue_rows]),
        np.random.default_rng(cfg.seed),
        progress=False,
    )
    step_s = (time.perf_counter() - started) / stage.steps_per_epoch
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN is the largest loader worker.
    return {
        "images": len(setup.rows),
        "cached": stage.images.cached_count,
        "store_px": stage.images.store.image_size,
        "build_s": build_s,
        "held_mib": held_mib,
        "step_s": step_s,
        "steps": stage.steps_per_epoch,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def render(results: dict[str, dict], data_root: str, budget_mib: int, command: str) -> str:
    """The results file: one row per way, with ratios to the baseline."""
    base = results[BASELINE]
    image_kib = 3 * base["store_px"] ** 2 / 1024
    data = (
        f"Data: `{data_root}`, {base['images']} training and catalogue images, decoded at {base['store_px']} px "
        f"({image_kib:.0f} KiB each as uint8)"
    )
    method = (
        f"Each row: its own process builds `CropTraining` and runs {base['steps']} fine-tuning steps of the "
        "default recipe (augmentation, forward, backward, AdamW). Baseline: the default, every decoded image kept."
    )
    how_to_read = [
        'the ratios divide by the first row, the default. "memory held by images" is what the store adds to '
        "the process once built; the peaks are the whole process's (and the largest loader worker's). A way that "
        "keeps no images trades that memory for decoding in each step, which the s/step column shows.",
        f"At {image_kib:.0f} KiB per decoded image, keeping a million training images would take "
        f"{image_kib * 1e6 / 2**20:.0f} GiB; the default budget (`train.io.decoded_cache_mb: {budget_mib}`) "
        f"holds {budget_mib * 1024 / image_kib:,.0f} and decodes the rest when drawn.",
    ]
    headline = table(
        (
            "way",
            "images kept",
            "build s",
            "memory held by images MiB",
            "peak RSS MiB",
            "worker peak MiB",
            "s/step",
            "step time vs baseline",
            "held memory vs baseline",
        ),
        (
            (
                name,
                r["cached"],
                f"{r['build_s']:.1f}",
                f"{r['held_mib']:.0f}",
                f"{r['peak_mib']:.0f}",
                f"{r['worker_peak_mib']:.0f}",
                f"{r['step_s']:.3f}",
                f"×{r['step_s'] / base['step_s']:.2f}",
                f"×{r['held_mib'] / max(base['held_mib'], 1.0):.2f}",
            )
            for name, r in results.items()
        ),
    )
    return results_page(
        "Decoded-image store benchmark (unfrozen training stage)", headline, command, [data, method], how_to_read
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--data", default=None, help="dataset root (default: data.root from the params)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: JSON overrides of one way
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"data.root={args.data}"] if args.data else [])
    if args.one is not None:
        print(json.dumps(measure_one(args.params, overrides + json.loads(args.one), args.steps)))
        return 0

    results = {}
    for name, way in WAYS.items():
        child = [
            sys.executable,
            "-m",
            "benchmarks.decoded_images",
            "--params",
            args.params,
            "--steps",
            str(args.steps),
            "--one",
            json.dumps(way),
        ] + [arg for o in overrides for arg in ("--set", o)]
        results[name] = measure_in_child(name, child)
    from components.config import load_params

    params = load_params(args.params, overrides)
    command = command_line("benchmarks.decoded_images", args, ("steps",), parser, optional=("params", "data", "out"))
    write_results(args.out, render(results, params.data.root, params.train.io.decoded_cache_mb, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
