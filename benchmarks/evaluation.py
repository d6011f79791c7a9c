"""Evaluation memory against the gallery size: neighbour searches beside a queries x gallery matrix.

    python -m benchmarks.evaluation --gallery 10000 100000 1000000 --dense-up-to 100000

Each row is its own process: seeded unit vectors (``--dim``), ten gallery images per SKU,
``--queries`` queries near one of their SKU's images, and ``components.evaluate.retrieval_metrics``.
``neighbours`` is the default (FAISS ``knn``, ``evaluate.neighbours`` deep); ``dense`` is the way
evaluation worked before, a queries x gallery similarity matrix sorted in full
(``brute_force_knn`` over the whole gallery). Memory is the process's peak RSS beyond what it held
once the vectors were made. Figures go to ``benchmarks/results/evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.reporting import benchmark_parser, command_line, measure_in_child, results_page, table, write_results

RESULTS = Path(__file__).parent / "results" / "evaluation.md"
IMAGES_PER_SKU = 10


def measure_one(way: str, gallery_size: int, queries_count: int, dim: int) -> dict:
    """One evaluation in this process; its peak memory beyond the vectors and its time."""
    import resource

    import numpy as np

    from components.evaluate import brute_force_knn, faiss_knn, retrieval_metrics

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((gallery_size, dim), dtype=np.float32)
    for start in range(0, gallery_size, 100_000):  # in chunks: a whole-gallery temporary would count as the peak
        block = gallery[start : start + 100_000]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    gallery_skus = np.arange(gallery_size) // IMAGES_PER_SKU
    picked = rng.integers(0, gallery_size, queries_count)
    queries = gallery[picked] + 0.05 * rng.standard_normal((queries_count, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    held = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    started = time.perf_counter()
    if way == "dense":
        metrics = retrieval_metrics(
            queries, gallery_skus[picked], gallery, gallery_skus, (1, 3, 5), brute_force_knn, gallery_size
        )
    else:
        metrics = retrieval_metrics(queries, gallery_skus[picked], gallery, gallery_skus, (1, 3, 5), faiss_knn)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"beyond_vectors": peak - held, "vectors": gallery.nbytes, "seconds": seconds, **metrics}


def render(results: dict, args, command: str) -> str:
    """The results file: a row per (way, gallery size), the dense way's memory as the ratio's baseline."""
    rows = []
    for (way, size), r in results.items():
        dense = results.get(("dense", size))
        rows.append(
            (
                f"{way}, {size:,} gallery vectors",
                f"{r['vectors'] / 2**30:.2f}",
                f"{r['beyond_vectors'] / 2**30:.2f}",
                f"×{r['beyond_vectors'] / dense['beyond_vectors']:.2f}" if dense else "-",
                f"{r['seconds']:.1f}",
                f"{r['top1']:.3f} / {r['map']:.3f}",
            )
        )
    headline = table(
        (
            "way, gallery",
            "vectors GiB",
            "memory beyond the vectors GiB",
            "vs dense at that size",
            "seconds",
            "top-1 / mAP",
        ),
        rows,
    )
    setup = [
        f"{args.queries:,} queries, {args.dim}-d seeded unit vectors, {IMAGES_PER_SKU} gallery images per SKU; "
        "each row in its own process",
        f"dense runs up to {args.dense_up_to:,} gallery vectors: at 1M its matrix alone would be "
        f"{args.queries * 1_000_000 * 4 / 2**30:.1f} GiB, and its sort twice that",
    ]
    how_to_read = (
        "the issue's target is under 2 GiB beyond the vectors for 1,000 queries against 1M gallery vectors. The "
        "neighbour searches hold (queries, neighbours) blocks and the few SKUs' images they score, so their memory "
        "stays flat as the gallery grows; the dense matrix grows with it. mAP differs between the ways where a SKU's "
        "images rank past the neighbours read (mAP@1000 against the full mAP); top-1 does not."
    )
    return results_page(
        "Evaluation benchmark: memory from neighbour searches against a queries x gallery matrix",
        headline,
        command,
        setup,
        how_to_read,
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--gallery", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dense-up-to", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: JSON [way, gallery size]
    args = parser.parse_args(argv)
    if args.one is not None:
        way, size = json.loads(args.one)
        print(json.dumps(measure_one(way, size, args.queries, args.dim)))
        return 0
    results = {}
    for size in args.gallery:
        for way in ("dense", "neighbours") if size <= args.dense_up_to else ("neighbours",):
            child = [sys.executable, "-m", "benchmarks.evaluation", "--queries", str(args.queries)]
            child += ["--dim", str(args.dim), "--one", json.dumps([way, size])]
            results[(way, size)] = measure_in_child(f"{way} @ {size}", child)
    command = command_line("benchmarks.evaluation", args, ("gallery", "dense_up_to", "queries", "dim"), parser)
    write_results(args.out, render(results, args, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
