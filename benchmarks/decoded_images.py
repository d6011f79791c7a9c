"""Memory and speed of the unfrozen stage's image store: decoded images kept vs decoded when drawn.

    python -m benchmarks.decoded_images --data ../shared/datasets/grocery-store --steps 30

Each way of holding the training images (``train.decoded_cache_mb``, ``train.loader_workers``)
builds the real :class:`components.train._CropTraining` over the training split and catalogue
and runs ``--steps`` real fine-tuning steps (augmentation, forward, backward, optimiser). Every
way runs in its own process, so its peak memory is its own. The baseline, in the same run, is
the default: every decoded image kept. Figures go to ``benchmarks/results/decoded_images.md``
with the machine noted; its hand-written ``## Notes`` section is kept across runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.accuracy import machine, write_results

RESULTS = Path(__file__).parent / "results" / "decoded_images.md"
BASELINE = "all decoded images kept (default budget)"
# Name -> overrides of the default params; each runs in a fresh process.
WAYS: dict[str, list[str]] = {
    BASELINE: [],
    "none kept, decoded in the training loop": ["train.decoded_cache_mb=0", "train.loader_workers=0"],
    "none kept, decoded by 1 loader worker": ["train.decoded_cache_mb=0", "train.loader_workers=1"],
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
    from components.train import _CropTraining, training_setup

    params = load_params(params_path, overrides)
    cfg = params.train
    torch.manual_seed(cfg.seed)
    setup = training_setup(params, load_manifest(params.data.root), torch.device("cpu"))
    labels, catalogue_rows = setup.labels, setup.catalogue_rows

    before_build = _rss_mib()
    started = time.perf_counter()
    stage = _CropTraining(setup.preprocess, list(setup.rows["image_path"]), catalogue_rows, params, torch.device("cpu"))
    build_s = time.perf_counter() - started
    held_mib = _rss_mib() - before_build
    stage.steps_per_epoch = min(steps, stage.steps_per_epoch)  # a slice of an epoch is enough to time a step
    started = time.perf_counter()
    stage.run_epoch(cfg.frozen_epochs, setup.encoder, setup.head, setup.optimizer, labels,
                    torch.from_numpy(labels[catalogue_rows]), np.random.default_rng(cfg.seed), progress=False)
    step_s = (time.perf_counter() - started) / stage.steps_per_epoch
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN is the largest loader worker.
    return {"images": len(setup.rows), "cached": stage.images.cached_count, "store_px": stage.images.store.image_size,
            "build_s": build_s, "held_mib": held_mib, "step_s": step_s, "steps": stage.steps_per_epoch,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def render(results: dict[str, dict], params_path: str, data_root: str, steps: int, budget_mib: int) -> str:
    """The results file: one row per way, with ratios to the baseline."""

    base = results[BASELINE]
    image_kib = 3 * base["store_px"] ** 2 / 1024
    run = (f"- Run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
           f"`python -m benchmarks.decoded_images --steps {steps}` (params `{params_path}`)")
    data = (f"- Data: `{data_root}`, {base['images']} training and catalogue images, decoded at {base['store_px']} px "
            f"({image_kib:.0f} KiB each as uint8)")
    method = (f"- Each row: its own process builds `_CropTraining` and runs {base['steps']} fine-tuning steps of the "
              "default recipe (augmentation, forward, backward, AdamW). Baseline: the default, every decoded image kept.")
    header = ("| way | images kept | build s | memory held by images MiB | peak RSS MiB | worker peak MiB | s/step "
              "| step time vs baseline | held memory vs baseline |")
    lines = ["# Decoded-image store benchmark (unfrozen training stage)", "", run, f"- Machine: {machine()}", data,
             method, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['cached']} | {r['build_s']:.1f} | {r['held_mib']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['worker_peak_mib']:.0f} | {r['step_s']:.3f} | ×{r['step_s'] / base['step_s']:.2f} | "
                     f"×{r['held_mib'] / max(base['held_mib'], 1.0):.2f} |")
    at_scale = (f"At {image_kib:.0f} KiB per decoded image, keeping a million training images would take "
                f"{image_kib * 1e6 / 2**20:.0f} GiB; the default budget (`train.decoded_cache_mb: {budget_mib}`) "
                f"holds {budget_mib * 1024 / image_kib:,.0f} and decodes the rest when drawn.")
    lines += ["", at_scale, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default=None, help="dataset root (default: data.root from the params)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", "-S", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: JSON overrides of one way
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"data.root={args.data}"] if args.data else [])
    if args.one is not None:
        print(json.dumps(measure_one(args.params, overrides + json.loads(args.one), args.steps)))
        return 0

    results = {}
    for name, way in WAYS.items():
        command = [sys.executable, "-m", "benchmarks.decoded_images", "--params", args.params, "--steps",
                   str(args.steps), "--one", json.dumps(way)] + [arg for o in overrides for arg in ("--set", o)]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            raise RuntimeError(f"{name}: the measuring process failed:\n{finished.stderr[-3000:]}")
        results[name] = json.loads(finished.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    from components.config import load_params

    params = load_params(args.params, overrides)
    write_results(args.out, render(results, args.params, params.data.root, args.steps, params.train.decoded_cache_mb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
