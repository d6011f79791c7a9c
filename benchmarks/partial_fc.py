"""Training step time and memory against the SKU count: the Partial FC margin head beside the full softmax.

    python -m benchmarks.partial_fc --skus 1000 100000 --steps 200 --repeats 3

Each row is its own process, with the recipe's encoder, margin head (``margin_head``) and AdamW
(``training_optimizer``) for that many SKUs, one catalogue image each, and two timings:

- the recipe's head-stage step: :func:`components.training.stages.frozen_epoch` on synthetic cached
  features (P x K batches of ``--steps`` steps after ``--warmup``), with its catalogue anchors
  (``train.sampler.anchor_sample`` of them, drawn and embedded each step);
- the margin head alone: ``optimisation_step`` on the batch's embedded features, without anchors.

It also times drawing an epoch's P x K batches (``pk_batches``) per batch. ``full softmax`` is the
head with ``train.loss.sampled_classes: 0``; ``Partial FC`` the default. The Partial FC rows run
``--repeats`` rounds, each SKU count after the other, and report the median round (the ratio is
taken within each round, so a drifting machine moves both sides); the full softmax runs once.
Ratios divide by the same head's figure at the smallest SKU count. Figures go to
``benchmarks/results/partial_fc.md`` with the machine noted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.reporting import (
    benchmark_parser,
    command_line,
    measure_in_child,
    results_page,
    table,
    torch_threads,
    write_results,
)

RESULTS = Path(__file__).parent / "results" / "partial_fc.md"
HEADS = {"full softmax": ["train.loss.sampled_classes=0"], "Partial FC": []}
TIMED = ("recipe_ms", "step_ms", "p90_ms", "draw_ms")  # the figures a round's median is taken of


def measure_one(params_path: str, overrides: list[str], skus: int, steps: int, warmup: int) -> dict:
    """Build the recipe's head stage for ``skus`` SKUs and time its steps in this process."""
    import resource

    import numpy as np
    import torch

    from components.config import load_params
    from components.model import build_encoder
    from components.training.feature_cache import CachedFeatures
    from components.training.losses import margin_head, optimisation_step
    from components.training.recipe import training_optimizer
    from components.training.sampling import pk_batches
    from components.training.stages import frozen_epoch

    params = load_params(params_path, overrides)
    train = params.train
    torch.manual_seed(train.seed)
    encoder = build_encoder(params.model)[0]  # its backbone never runs: the head stage reads cached features
    head = margin_head(encoder.embed_dim, skus, train)
    optimizer = training_optimizer(encoder, head, train.schedule)
    rng = np.random.default_rng(train.seed)
    per_sku = train.sampler.images_per_sku
    batch_skus = max(1, train.sampler.batch_size // per_sku)
    # One row per photo of each step's P x K batch; features as the cache holds them (float32).
    labels = np.concatenate(
        [np.repeat(rng.choice(skus, size=batch_skus, replace=False), per_sku) for _ in range(warmup + steps)]
    )
    batches = list(np.arange(len(labels)).reshape(warmup + steps, -1))
    dim = encoder.feature_dim
    cached = CachedFeatures(
        rng.standard_normal((train.augment.cached_views, len(labels), dim), dtype=np.float32),
        rng.standard_normal((1, skus, dim), dtype=np.float32),  # one view of each catalogue image
        np.zeros((0, dim), dtype=np.float32),
        [],
    )
    catalogue_labels = torch.arange(skus)
    cpu = torch.device("cpu")

    def head_stage(chosen: list) -> float:
        started = time.perf_counter()
        frozen_epoch(encoder, head, optimizer, cached, labels, catalogue_labels, train, chosen, rng, cpu)
        return time.perf_counter() - started

    head_stage(batches[:warmup])
    recipe_s = head_stage(batches[warmup:]) / steps

    times = []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        embeddings = encoder.embed_features(torch.from_numpy(cached.train_views[0, batch]))
        optimisation_step(head, optimizer, embeddings, torch.from_numpy(labels[batch]), None, None, train)
        if step >= warmup:
            times.append(time.perf_counter() - started)

    started = time.perf_counter()
    drawn = pk_batches(np.repeat(np.arange(skus), per_sku), batch_skus, per_sku, rng)
    draw_s = (time.perf_counter() - started) / len(drawn)

    state_bytes = sum(t.numel() * t.element_size() for t in head.state_dict().values()) + sum(
        t.numel() * t.element_size()
        for parameter, state in optimizer.state.items()
        if any(parameter is p for p in head.parameters())
        for t in state.values()
        if torch.is_tensor(t)
    )
    return {
        "partial": head.partial,
        "batch": batch_skus * per_sku,
        "anchors": train.sampler.anchor_sample,
        "recipe_ms": recipe_s * 1e3,
        "step_ms": float(np.median(times) * 1e3),
        "p90_ms": float(np.percentile(times, 90) * 1e3),
        "draw_ms": draw_s * 1e3,
        "state_mib": state_bytes / 2**20,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def median_round(rounds: list[dict[int, dict]], skus: list[int]) -> dict[int, dict]:
    """Per SKU count: the median over rounds of each figure, and of each ratio to the fewest SKUs in its round."""
    merged = {}
    for count in skus:
        figures = dict(rounds[0][count])
        for key in TIMED:
            figures[key] = statistics.median(r[count][key] for r in rounds)
        for key in ("recipe_ms", "step_ms"):
            figures[f"{key}_ratio"] = statistics.median(r[count][key] / r[skus[0]][key] for r in rounds)
        figures["peak_mib"] = max(r[count]["peak_mib"] for r in rounds)
        figures["rounds"] = len(rounds)
        merged[count] = figures
    return merged


def render(results: dict[str, dict[int, dict]], skus: list[int], sampled: int, command: str, steps: int) -> str:
    """The results file: a row per (head, SKU count), each ratio against that head at the fewest SKUs."""
    rows = []
    for head, by_count in results.items():
        for count in skus:
            r = by_count[count]
            rows.append(
                (
                    f"{head}, {count:,} SKUs",
                    "yes" if r["partial"] else "no (all SKUs)",
                    f"{r['recipe_ms']:.2f}",
                    f"×{r['recipe_ms_ratio']:.2f}",
                    f"{r['step_ms']:.2f}",
                    f"{r['p90_ms']:.2f}",
                    f"×{r['step_ms_ratio']:.2f}",
                    f"{r['draw_ms']:.3f}",
                    f"{r['state_mib']:.1f}",
                    f"{r['peak_mib']:.0f}",
                )
            )
    first = results["Partial FC"][skus[0]]
    headline = table(
        (
            "head, SKUs",
            "sampled",
            "recipe step ms",
            f"vs {skus[0]:,} SKUs",
            "head alone ms (median)",
            "head alone ms (p90)",
            f"vs {skus[0]:,} SKUs",
            "P x K draw ms/batch",
            "head + optimiser state MiB",
            "peak RSS MiB",
        ),
        rows,
    )
    setup = [
        f"Each row: its own process; {steps} steps after a warm-up, batches of {first['batch']} synthetic cached "
        f"features (P x K). The recipe step is `frozen_epoch`'s mean: projection, margin head and "
        f"{first['anchors']} catalogue anchors drawn from one cached view of one catalogue image per SKU. "
        "The head alone is `optimisation_step`'s median without anchors",
        f"Partial FC rows: the median of {first['rounds']} rounds, each SKU count's process after the other's, "
        "ratios taken within a round; full softmax rows: one round",
        f"Partial FC scores each batch's SKUs and random others up to `train.loss.sampled_classes` ({sampled}); "
        "the full softmax scores every SKU and leaves the head to AdamW",
        "Peak RSS includes the synthetic features: one catalogue view (5 KiB per SKU) and the training rows",
    ]
    how_to_read = (
        "a step's cost is the projection, the head's logits, the anchors and the optimiser. The full softmax's logits "
        "and AdamW's update grow with the SKU count; Partial FC's do not, and its head keeps Adam moments as buffers "
        "of the weight's size (3x the weight: the state column), updating only the rows a step scored."
    )
    return results_page(
        "Partial FC benchmark: training step time and memory from few to many SKUs",
        headline,
        command,
        setup,
        how_to_read,
        machine_note=f", {torch_threads()}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--skus", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the Partial FC rows")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: JSON [head overrides, skus]
    args = parser.parse_args(argv)
    if args.one is not None:
        way, skus = json.loads(args.one)
        print(json.dumps(measure_one(args.params, args.overrides + way, skus, args.steps, args.warmup)))
        return 0

    def measure(head: str, skus: int) -> dict:
        child = [sys.executable, "-m", "benchmarks.partial_fc", "--params", args.params]
        child += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--one", json.dumps([HEADS[head], skus])]
        child += [arg for override in args.overrides for arg in ("--set", override)]
        return measure_in_child(f"{head} @ {skus}", child)

    results = {}
    for head in HEADS:
        rounds = args.repeats if head == "Partial FC" else 1
        results[head] = median_round([{n: measure(head, n) for n in args.skus} for _ in range(rounds)], args.skus)
    from components.config import load_params

    sampled = load_params(args.params, args.overrides).train.loss.sampled_classes
    command = command_line("benchmarks.partial_fc", args, ("skus", "steps", "warmup", "repeats"), parser)
    write_results(args.out, render(results, args.skus, sampled, command, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
