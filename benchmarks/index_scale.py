"""FAISS index types at catalogue scale, against an exact ``Flat`` index (the baseline) in the same run.

    python -m benchmarks.index_scale [--sizes 10000 100000 1000000] [--queries 1000]
                                     [--factories Flat "IVF{nlist},Flat" "IVF{nlist},Flat@64" ...]

The product must match against catalogues of up to 10 million SKUs; the default index
(``index.factory: Flat``) is exact and costs a full scan per query. For each catalogue size this
builds every factory through ``components.index.build_index``, searches through
``CatalogueIndex.search`` (distinct SKUs, the service's path), saves with ``save_index`` and loads
with ``load_index`` in a fresh process (the service's start-up), and reports:

- build seconds and the serialised index size;
- search milliseconds per query, one query at a time and in batches of 64;
- recall against Flat: the share of queries whose top SKU is Flat's top SKU, and the overlap of
  the top-5 SKU sets (1.0 = the same answers as the exact search);
- load seconds and the loading process's peak memory.

``{nlist}`` in a factory is replaced by FAISS's rule of thumb, about 4·√N lists (a power of
two); ``@N`` after a factory sets how much a search visits, ``index.nprobe`` (IVF lists) or
``index.ef_search`` (HNSW candidates); without it the params' values apply.

The catalogue is synthetic, one embedding per SKU at the params' ``model.embed_dim``, shaped like
the product's: unit vectors in categories of 100 SKUs (two SKUs of a category have cosine
about 0.8: flavours and sizes of one product), and queries that are noisy views of a random SKU
(cosine about 0.55 to it, near the service's calibrated rejection threshold of 0.539), so the
exact search itself gets about 2% wrong. Recall of approximate indexes depends on how the data clusters, so
these figures show how the index types compare and scale, not what a real catalogue's recall
will be. Figures go to ``benchmarks/results/index_scale.md`` with the machine noted; its
``## Notes`` section is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.reporting import benchmark_parser, command_line, results_page, table, write_results
from components.config import IndexParams, load_params
from components.index import INDEX_FILE, CatalogueIndex, build_index, save_index

RESULTS = Path(__file__).parent / "results" / "index_scale.md"
BASELINE = "Flat"
DEFAULT_FACTORIES = [
    BASELINE,
    "IVF{nlist},Flat",
    "IVF{nlist},Flat@64",
    "IVF{nlist},SQ8",
    "IVF{nlist},PQ32",
    "HNSW32@16",
    "HNSW32",
    "HNSW32@512",
]
SKUS_PER_CATEGORY = 100
BATCH = 64
TOP_K = 5


def synthetic_catalogue(size: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(catalogue, query vectors, each query's true row)``: unit vectors clustered in categories."""
    rng = np.random.default_rng(seed)

    def unit(rows: np.ndarray) -> np.ndarray:
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    centres = unit(rng.standard_normal((max(1, size // SKUS_PER_CATEGORY), dim)))
    # Twice the centre plus a unit offset: two SKUs of one category have cosine about 0.8.
    catalogue = unit(2 * centres[rng.integers(0, len(centres), size)] + unit(rng.standard_normal((size, dim))))
    truth = rng.integers(0, size, queries)
    # A query is its SKU plus an offset of 1.5: cosine about 0.55 to its own SKU.
    return catalogue, unit(catalogue[truth] + 1.5 * unit(rng.standard_normal((queries, dim)))), truth


def resolve_factory(factory: str, size: int, index_params: IndexParams) -> tuple[str, int, int]:
    """``IVF{nlist}...@N`` -> the FAISS factory string for ``size`` rows, its nprobe and its efSearch."""
    name, _, visited = factory.partition("@")
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(size))))
    nprobe, ef_search = index_params.nprobe, index_params.ef_search
    if visited and "HNSW" in name:
        ef_search = int(visited)
    elif visited:
        nprobe = int(visited)
    return name.replace("{nlist}", str(nlist)), nprobe, ef_search


def _search_ms(catalogue: CatalogueIndex, queries: np.ndarray, batch: int, limit: int | None = None) -> float:
    rows = queries[:limit] if limit else queries
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        catalogue.search(rows[start : start + batch], TOP_K)
    return 1000 * (time.perf_counter() - started) / len(rows)


def _load_in_fresh_process(folder: Path) -> dict:
    """Load the saved index as the service does, in a child process: its seconds and peak memory."""
    # The peak is VmHWM, the process's own high-water mark: getrusage's ru_maxrss survives exec,
    # so a child would report the benchmark's own (GiB-sized) memory at the fork.
    code = (
        "import json, sys, time\n"
        "from components.index import load_index\n"
        "started = time.perf_counter()\n"
        "load_index(sys.argv[1])\n"
        "load_s = time.perf_counter() - started\n"
        "status = open('/proc/self/status').read().split('VmHWM:')[1].split()\n"
        "print(json.dumps({'load_s': load_s, 'peak_mib': int(status[0]) / 1024}))\n"
    )
    finished = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"loading {folder} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def measure_size(
    size: int, factories: list[str], dim: int, n_queries: int, index_params: IndexParams, scratch: Path
) -> dict[str, dict]:
    """Every factory at one catalogue size; recall is against the Flat index's answers."""
    catalogue, queries, truth = synthetic_catalogue(size, dim, n_queries)
    sku_ids = [f"sku-{row}" for row in range(size)]
    paths = [f"catalogue/sku-{row}.jpg" for row in range(size)]
    results, exact = {}, None
    for factory in factories:
        resolved, nprobe, ef_search = resolve_factory(factory, size, index_params)
        started = time.perf_counter()
        built = build_index(catalogue, sku_ids, paths, resolved, use_gpu="never", nprobe=nprobe, ef_search=ef_search)
        build_s = time.perf_counter() - started
        answers = built.search(queries, TOP_K)
        exact = exact if exact is not None else answers  # the baseline comes first
        top1 = [a[0][0] for a in answers]
        folder = scratch / f"{size}-{len(results)}"
        save_index(built, folder)
        results[factory] = {
            "factory": resolved,
            "visited": nprobe if "IVF" in resolved else ef_search if "HNSW" in resolved else None,
            "build_s": build_s,
            "index_mib": (folder / INDEX_FILE).stat().st_size / 2**20,  # what FAISS wrote, not a second copy
            "ms_single": _search_ms(built, queries, 1, limit=200),
            "ms_batch": _search_ms(built, queries, BATCH),
            "recall1": float(np.mean([t == e[0][0] for t, e in zip(top1, exact)])),
            "recall5": float(
                np.mean([len({s for s, _ in a} & {s for s, _ in e}) / TOP_K for a, e in zip(answers, exact)])
            ),
            "accuracy1": float(np.mean([t == f"sku-{row}" for t, row in zip(top1, truth)])),
            **_load_in_fresh_process(folder),
        }
        shutil.rmtree(folder)  # a million rows of Flat is a GiB on disk
        print(
            size,
            factory,
            {k: round(v, 3) if isinstance(v, float) else v for k, v in results[factory].items()},
            flush=True,
        )
        del built
    return results


def _ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.1: IVF at 1M SKUs is about ×0.003 of Flat."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def render(results: dict[int, dict[str, dict]], args: argparse.Namespace, dim: int, command: str) -> str:
    """The results file: each factory's search time and recall against Flat at every size, then a table per size."""
    sizes = list(results)
    header, headline = ["factory"], []
    for size in sizes:
        header += [f"batch search vs Flat, {size:,} SKUs", f"recall@1, {size:,} SKUs"]
    for factory in results[sizes[0]]:
        cells = [f"{factory} (baseline)" if factory == BASELINE else factory]
        for size in sizes:
            r, base = results[size][factory], results[size][BASELINE]
            cells += [f"×{_ratio(r['ms_batch'] / base['ms_batch'])}", f"{r['recall1']:.3f}"]
        headline.append(cells)
    setup = [
        f"Synthetic catalogue: one {dim}-d unit embedding per SKU, categories of {SKUS_PER_CATEGORY} SKUs "
        f"(cosine about 0.8 within one), {args.queries} queries (cosine about 0.55 to their SKU); top {TOP_K} "
        "distinct SKUs per query through `CatalogueIndex.search`.",
        "Recall: the share of queries whose top SKU is Flat's, and the overlap of the top-5 SKU sets with "
        "Flat's. Load: `load_index` (checksum verified) in a fresh process. Search ms are per query.",
    ]
    how_to_read = (
        "Flat is the exact search, and every ratio and recall is against it in the same run: a batch "
        "search ratio of ×0.01 is a hundred times faster than a full scan, a recall of 1.000 the same "
        "answers as the exact search. `{nlist}` is about 4·√N lists, so it grows with the catalogue; `@N` "
        "is how much a search visits (IVF lists or HNSW candidates). The catalogue is synthetic: the "
        "figures show how the index types compare and scale, not the recall of a real catalogue. The "
        "tables below give every figure at each size."
    )
    details = []
    for size, by_factory in results.items():
        base = by_factory[BASELINE]
        rows = [
            (
                f"{r['factory']} (baseline)" if name == BASELINE else r["factory"],
                r["visited"] or "-",
                f"{r['build_s']:.1f}",
                f"{r['index_mib']:.1f}",
                f"{r['ms_single']:.2f}",
                f"{r['ms_batch']:.3f}",
                f"×{_ratio(r['ms_batch'] / base['ms_batch'])}",
                f"{r['recall1']:.3f}",
                f"{r['recall5']:.3f}",
                f"{r['accuracy1']:.3f}",
                f"{r['load_s']:.2f}",
                f"{r['peak_mib']:.0f}",
            )
            for name, r in by_factory.items()
        ]
        details += [
            f"## {size:,} SKUs",
            "",
            *table(
                (
                    "factory",
                    "nprobe / efSearch",
                    "build s",
                    "index MiB",
                    "ms/query, 1 at a time",
                    f"ms/query, batches of {BATCH}",
                    "batch search vs Flat",
                    "recall@1 vs Flat",
                    "top-5 overlap",
                    "top-1 accuracy",
                    "load s",
                    "load peak MiB",
                ),
                rows,
            ),
            "",
        ]
    return results_page(
        "Index benchmark at catalogue scale (FAISS factories against exact Flat)",
        table(header, headline),
        command,
        setup,
        how_to_read,
        details,
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--factories", nargs="+", default=DEFAULT_FACTORIES)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args(argv)
    if min(args.queries, *args.sizes) < 1:
        parser.error("--queries and --sizes must be at least 1")
    if any(size < TOP_K for size in args.sizes):
        parser.error(f"every size must hold at least {TOP_K} SKUs")
    args.factories = list(dict.fromkeys([BASELINE, *args.factories]))  # the baseline first, always
    params = load_params(args.params, args.overrides)
    dim = params.model.embed_dim or 256
    results = {}
    with tempfile.TemporaryDirectory(prefix="skumatch-index-scale-") as scratch:
        for size in args.sizes:
            results[size] = measure_size(size, args.factories, dim, args.queries, params.index, Path(scratch))
    command = command_line("benchmarks.index_scale", args, ("sizes", "queries", "factories"), parser)
    write_results(args.out, render(results, args, dim, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
