"""Training step time and memory against the SKU count: the Partial FC margin head beside the full softmax.

    python -m benchmarks.partial_fc --skus 1000 100000 --steps 200 --blocks 10

For each SKU count: the recipe's encoder, margin head (``margin_head``) and AdamW (``training_optimizer``)
for that many SKUs, one catalogue image each, and two timings:

- the recipe's head-stage step: :func:`components.training.stages.frozen_epoch` on synthetic cached
  features (P x K batches), with its catalogue anchors (``train.sampler.anchor_sample`` of them,
  drawn and embedded each step);
- the margin head alone: ``optimisation_step`` on the batch's embedded features, without anchors.

Timings compare like with like: one process per head builds every SKU count, then runs ``--steps``
steps of each in ``--blocks`` blocks, taking the counts in turn (the order rotating each block).
Each ratio is taken within a block, so a drifting machine moves both sides, and the figures are
medians over the blocks. Memory (head and optimiser state, peak RSS) comes from a process of its
own per (head, SKU count), run side by side. It also times drawing an epoch's P x K batches (``pk_batches``) per batch.
``full softmax`` is the head with ``train.loss.sampled_classes: 0``; ``Partial FC`` the default.
Figures go to ``benchmarks/results/partial_fc.md`` with the machine noted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class HeadStage:
    """The recipe's head stage for one SKU count: its model, optimiser and synthetic cached features."""

    encoder: Any
    head: Any
    optimizer: Any
    cached: Any
    labels: Any
    batches: list
    catalogue_labels: Any
    rng: Any
    train: Any

    def recipe_ms(self, batches: list) -> float:
        """Mean ms per step of ``frozen_epoch`` (projection, head, anchors, optimiser) over ``batches``."""
        import torch

        from components.training.stages import frozen_epoch

        started = time.perf_counter()
        frozen_epoch(
            self.encoder, self.head, self.optimizer, self.cached, self.labels, self.catalogue_labels, self.train,
            batches, self.rng, torch.device("cpu"),
        )  # fmt: skip
        return (time.perf_counter() - started) / len(batches) * 1e3

    def head_alone_ms(self, batches: list) -> list[float]:
        """Each step's ms of the margin head alone (``optimisation_step`` on embedded features, no anchors)."""
        import torch

        from components.training.losses import optimisation_step

        times = []
        for batch in batches:
            started = time.perf_counter()
            embeddings = self.encoder.embed_features(torch.from_numpy(self.cached.train_views[0, batch]))
            labels = torch.from_numpy(self.labels[batch])
            optimisation_step(self.head, self.optimizer, embeddings, labels, None, None, self.train)
            times.append((time.perf_counter() - started) * 1e3)
        return times

    def draw_ms(self) -> float:
        """ms per batch of drawing an epoch's P x K batches over one photo set per SKU (``pk_batches``)."""
        import numpy as np

        from components.training.sampling import pk_batches

        per_sku = self.train.sampler.images_per_sku
        started = time.perf_counter()
        drawn = pk_batches(np.repeat(np.arange(self.head.n_classes), per_sku), self.batch_skus, per_sku, self.rng)
        return (time.perf_counter() - started) / len(drawn) * 1e3

    @property
    def batch_skus(self) -> int:
        """P: the SKUs in a P x K batch."""
        return max(1, self.train.sampler.batch_size // self.train.sampler.images_per_sku)

    def state_mib(self) -> float:
        """The head's parameters and buffers plus the optimiser state held for them, in MiB."""
        import torch

        head_params = list(self.head.parameters())
        held = sum(t.numel() * t.element_size() for t in self.head.state_dict().values())
        held += sum(
            t.numel() * t.element_size()
            for parameter, state in self.optimizer.state.items()
            if any(parameter is p for p in head_params)
            for t in state.values()
            if torch.is_tensor(t)
        )
        return held / 2**20


def head_stage(params: Any, skus: int, steps: int) -> HeadStage:
    """Build the recipe's head stage for ``skus`` SKUs with ``steps`` P x K batches of synthetic cached features."""
    import numpy as np
    import torch

    from components.model import build_encoder
    from components.training.feature_cache import CachedFeatures
    from components.training.losses import margin_head
    from components.training.recipe import training_optimizer

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
        [np.repeat(rng.choice(skus, size=batch_skus, replace=False), per_sku) for _ in range(steps)]
    )
    dim = encoder.feature_dim
    cached = CachedFeatures(
        rng.standard_normal((train.augment.cached_views, len(labels), dim), dtype=np.float32),
        rng.standard_normal((1, skus, dim), dtype=np.float32),  # one view of each catalogue image
        np.zeros((0, dim), dtype=np.float32),
        [],
    )
    batches = list(np.arange(len(labels)).reshape(steps, -1))
    return HeadStage(encoder, head, optimizer, cached, labels, batches, torch.arange(skus), rng, train)


def measure_memory(params_path: str, overrides: list[str], skus: int, warmup: int) -> dict:
    """This process's memory for one head at ``skus`` SKUs, after ``warmup`` recipe and head-alone steps."""
    import resource

    from components.config import load_params

    stage = head_stage(load_params(params_path, overrides), skus, warmup)
    stage.recipe_ms(stage.batches)
    stage.head_alone_ms(stage.batches)
    return {
        "partial": stage.head.partial,
        "batch": stage.batch_skus * stage.train.sampler.images_per_sku,
        "anchors": stage.train.sampler.anchor_sample,
        "state_mib": stage.state_mib(),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure_interleaved(
    params_path: str, overrides: list[str], skus: list[int], steps: int, warmup: int, blocks: int
) -> dict[int, dict]:
    """Time one head at every SKU count in this process, in ``blocks`` blocks that take the counts in turn.

    Returns, per SKU count, each block's recipe-step mean (``recipe_blocks``), each block's head-alone
    step times (``head_blocks``) and the P x K draw per batch (``draw_ms``).
    """
    from components.config import load_params

    params = load_params(params_path, overrides)
    per_block = steps // blocks  # main refuses fewer steps than blocks; a remainder is not run
    stages = {count: head_stage(params, count, warmup + per_block * blocks) for count in skus}
    for stage in stages.values():
        stage.recipe_ms(stage.batches[:warmup])
        stage.head_alone_ms(stage.batches[:warmup])
    timed: dict[int, dict] = {count: {"recipe_blocks": [], "head_blocks": []} for count in skus}
    for block in range(blocks):
        chosen = slice(warmup + block * per_block, warmup + (block + 1) * per_block)
        for count in skus[block % len(skus) :] + skus[: block % len(skus)]:  # no count always runs first
            stage = stages[count]
            timed[count]["recipe_blocks"].append(stage.recipe_ms(stage.batches[chosen]))
            timed[count]["head_blocks"].append(stage.head_alone_ms(stage.batches[chosen]))
    for count, stage in stages.items():
        timed[count]["draw_ms"] = stage.draw_ms()
    return timed


def summarise(timed: dict[int, dict], skus: list[int]) -> dict[int, dict]:
    """Per SKU count: median step times over the blocks, and the median over blocks of each within-block ratio."""
    import numpy as np

    base = timed[skus[0]]
    summary = {}
    for count in skus:
        mine = timed[count]
        recipe_ratios = [a / b for a, b in zip(mine["recipe_blocks"], base["recipe_blocks"])]
        head_ratios = [
            statistics.median(a) / statistics.median(b) for a, b in zip(mine["head_blocks"], base["head_blocks"])
        ]
        every_step = [t for block in mine["head_blocks"] for t in block]
        summary[count] = {
            "recipe_ms": statistics.median(mine["recipe_blocks"]),
            "recipe_ms_ratio": statistics.median(recipe_ratios),
            "recipe_ratio_range": (min(recipe_ratios), max(recipe_ratios)),
            "step_ms": statistics.median(every_step),
            "p90_ms": float(np.percentile(every_step, 90)),
            "step_ms_ratio": statistics.median(head_ratios),
            "draw_ms": mine["draw_ms"],
            "blocks": len(mine["recipe_blocks"]),
        }
    return summary


def render(
    results: dict[str, dict[int, dict]], memory: dict[str, dict[int, dict]], skus: list[int], sampled: int,
    command: str, steps: int,
) -> str:  # fmt: skip
    """The results file: a row per (head, SKU count), each ratio against that head at the fewest SKUs."""
    rows = []
    for head, by_count in results.items():
        for count in skus:
            r, m = by_count[count], memory[head][count]
            low, high = r["recipe_ratio_range"]
            rows.append(
                (
                    f"{head}, {count:,} SKUs",
                    "yes" if m["partial"] else "no (all SKUs)",
                    f"{r['recipe_ms']:.2f}",
                    f"×{r['recipe_ms_ratio']:.2f}",
                    f"×{low:.2f}–{high:.2f}",
                    f"{r['step_ms']:.2f}",
                    f"{r['p90_ms']:.2f}",
                    f"×{r['step_ms_ratio']:.2f}",
                    f"{r['draw_ms']:.3f}",
                    f"{m['state_mib']:.1f}",
                    f"{m['peak_mib']:.0f}",
                )
            )
    first, blocks = memory["Partial FC"][skus[0]], results["Partial FC"][skus[0]]["blocks"]
    headline = table(
        (
            "head, SKUs",
            "sampled",
            "recipe step ms",
            f"vs {skus[0]:,} SKUs",
            "block range",
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
        f"Timings: one process per head holds every SKU count and runs {steps} steps of each in {blocks} blocks, "
        "taking the counts in turn (the order rotating each block); each ratio is taken within a block, and the "
        "table gives the median over blocks (block range: the lowest and highest block's ratio)",
        f"A step: batches of {first['batch']} synthetic cached features (P x K). The recipe step is `frozen_epoch`'s "
        f"mean: projection, margin head and {first['anchors']} catalogue anchors drawn from one cached view of one "
        "catalogue image per SKU. The head alone is `optimisation_step` without anchors",
        "Memory: a process of its own per row, after the warm-up steps; peak RSS includes the synthetic features "
        "(one catalogue view, 5 KiB per SKU, and the training rows)",
        f"Partial FC scores each batch's SKUs and random others up to `train.loss.sampled_classes` ({sampled}); "
        "the full softmax scores every SKU and leaves the head to AdamW",
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
    parser.add_argument("--steps", type=int, default=200, help="timed steps per SKU count, over all blocks")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=10, help="blocks the timed steps are split into")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON [what, head overrides, skus]
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.blocks < 1 or args.steps < args.blocks:
        parser.error("--warmup and --blocks must be at least 1, and --blocks at most --steps")
    if args.child is not None:
        what, way, skus = json.loads(args.child)
        overrides = args.overrides + way
        if what == "memory":
            print(json.dumps(measure_memory(args.params, overrides, skus, args.warmup)))
        else:
            timed = measure_interleaved(args.params, overrides, skus, args.steps, args.warmup, args.blocks)
            print(json.dumps({str(count): figures for count, figures in timed.items()}))
        return 0

    def measure(what: str, head: str, skus: int | list[int]) -> dict:
        child = [sys.executable, "-m", "benchmarks.partial_fc", "--params", args.params]
        child += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--blocks", str(args.blocks)]
        child += ["--child", json.dumps([what, HEADS[head], skus])]
        child += [arg for override in args.overrides for arg in ("--set", override)]
        return measure_in_child(f"{head} {what} @ {skus}", child)

    # Memory processes do not time anything, so they run side by side; timing processes run alone.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        running = {head: {count: pool.submit(measure, "memory", head, count) for count in args.skus} for head in HEADS}
        memory = {head: {count: job.result() for count, job in jobs.items()} for head, jobs in running.items()}
    results = {}
    for head in HEADS:
        timed = measure("timing", head, args.skus)
        results[head] = summarise({int(count): figures for count, figures in timed.items()}, args.skus)
    from components.config import load_params

    sampled = load_params(args.params, args.overrides).train.loss.sampled_classes
    command = command_line("benchmarks.partial_fc", args, ("skus", "steps", "warmup", "blocks"), parser)
    timed_steps = args.steps // args.blocks * args.blocks
    write_results(args.out, render(results, memory, args.skus, sampled, command, timed_steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
