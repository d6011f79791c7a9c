"""Training step time and memory against the SKU count: the Partial FC margin head beside the full softmax.

    python -m benchmarks.partial_fc --skus 1000 100000 --steps 200

Each row is its own process: a synthetic cached-feature batch of P x K rows (the frozen stage's
input), the projection, the recipe's margin head (``margin_head``) and AdamW built as
``training_setup`` builds them, and ``--steps`` real ``optimisation_step`` calls after a warm-up.
``full softmax`` is the head with ``train.loss.sampled_classes: 0``; ``Partial FC`` the default. The
ratios divide by the same head's figure at the smallest SKU count, in the same run. Figures go to
``benchmarks/results/partial_fc.md`` with the machine noted.
"""

from __future__ import annotations

import argparse
import json
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
FEATURE_DIM = 1280  # EfficientNet-Lite0's pooled features
HEADS = {"full softmax": ["train.loss.sampled_classes=0"], "Partial FC": []}


def measure_one(params_path: str, overrides: list[str], skus: int, steps: int, warmup: int) -> dict:
    """Build the head for ``skus`` SKUs and time ``steps`` optimisation steps in this process."""
    import resource

    import numpy as np
    import torch

    from components.config import load_params
    from components.training.losses import margin_head, optimisation_step

    params = load_params(params_path, overrides)
    train = params.train
    torch.manual_seed(train.seed)
    projection = torch.nn.Linear(FEATURE_DIM, params.model.embed_dim)
    head = margin_head(params.model.embed_dim, skus, train)
    optimizer = torch.optim.AdamW(
        [{"params": list(projection.parameters()) + ([] if head.partial else list(head.parameters())), "lr": 1e-3}],
        weight_decay=train.schedule.weight_decay,
    )
    rng = np.random.default_rng(train.seed)
    per_sku = train.sampler.images_per_sku
    batch_skus = max(1, train.sampler.batch_size // per_sku)
    times = []
    for step in range(warmup + steps):
        labels = torch.from_numpy(np.repeat(rng.choice(skus, size=batch_skus, replace=False), per_sku))
        features = torch.randn(len(labels), FEATURE_DIM)
        started = time.perf_counter()
        optimisation_step(head, optimizer, projection(features), labels, None, None, train)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    state_bytes = sum(t.numel() * t.element_size() for t in head.state_dict().values()) + sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )
    return {
        "partial": head.partial,
        "batch": batch_skus * per_sku,
        "step_ms": float(np.median(times) * 1e3),
        "p90_ms": float(np.percentile(times, 90) * 1e3),
        "state_mib": state_bytes / 2**20,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def render(results: dict, skus: list[int], sampled: int, command: str, steps: int) -> str:
    """The results file: a row per (head, SKU count), each ratio against that head at the fewest SKUs."""
    rows = []
    for head in HEADS:
        base = results[f"{head} @ {skus[0]}"]
        for count in skus:
            r = results[f"{head} @ {count}"]
            rows.append(
                (
                    f"{head}, {count:,} SKUs",
                    "yes" if r["partial"] else "no (all SKUs)",
                    f"{r['step_ms']:.2f}",
                    f"{r['p90_ms']:.2f}",
                    f"×{r['step_ms'] / base['step_ms']:.2f}",
                    f"{r['state_mib']:.1f}",
                    f"{r['peak_mib']:.0f}",
                )
            )
    first = results[f"Partial FC @ {skus[0]}"]
    headline = table(
        (
            "head, SKUs",
            "sampled",
            "ms/step (median)",
            "ms/step (p90)",
            f"step vs {skus[0]:,} SKUs",
            "head + optimiser state MiB",
            "peak RSS MiB",
        ),
        rows,
    )
    setup = [
        f"Each row: its own process; {steps} `optimisation_step` calls after a warm-up, batches of {first['batch']} "
        f"synthetic {FEATURE_DIM}-d features (P x K), projected and scored by the recipe's margin head",
        f"Partial FC scores each batch's SKUs and random others up to `train.loss.sampled_classes` ({sampled}); "
        "the full softmax scores every SKU and leaves the head to AdamW",
    ]
    how_to_read = (
        "a step's cost is the projection, the head's logits and the optimiser. The full softmax's logits and "
        "AdamW's update grow with the SKU count; Partial FC's do not, and its head keeps Adam moments as buffers of "
        "the weight's size (3x the weight: the state column), updating only the rows a step scored."
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
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: JSON [head overrides, skus]
    args = parser.parse_args(argv)
    if args.one is not None:
        way, skus = json.loads(args.one)
        print(json.dumps(measure_one(args.params, args.overrides + way, skus, args.steps, args.warmup)))
        return 0
    results = {}
    for head, way in HEADS.items():
        for skus in args.skus:
            child = [sys.executable, "-m", "benchmarks.partial_fc", "--params", args.params]
            child += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--one", json.dumps([way, skus])]
            child += [arg for override in args.overrides for arg in ("--set", override)]
            results[f"{head} @ {skus}"] = measure_in_child(f"{head} @ {skus}", child)
    from components.config import load_params

    sampled = load_params(args.params, args.overrides).train.loss.sampled_classes
    command = command_line("benchmarks.partial_fc", args, ("skus", "steps", "warmup"), parser)
    write_results(args.out, render(results, args.skus, sampled, command, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
