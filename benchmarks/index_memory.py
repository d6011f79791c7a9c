"""What loading an index costs each serving process: full reads and Python lists against memory maps.

    python -m benchmarks.index_memory [--vectors 1000000] [--dim 256] [--factories Flat 'IVF{nlist},SQ8']

Each factory's index of seeded unit vectors is saved with ``save_index``, then loaded by
``load_index`` in fresh processes, once as it used to be held (the baseline: the FAISS file read
in full, the SKU map as Python lists of strings) and once as it is now (the FAISS file with
``IO_FLAG_MMAP_IFC``, the columnar map memory-mapped), and searched once. Each process reports
its private memory (``RssAnon``: what every further worker pays again) and its file-backed
resident memory (``RssFile``: page cache shared by every process that maps the files), after the
load and after a search. Figures go to ``benchmarks/results/index_memory.md``, the headline first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import reporting

RESULTS = Path(__file__).parent / "results" / "index_memory.md"
MEASURED_OPTIONS = ("vectors", "dim", "factories", "repeats")
MODES = ("full read, lists", "memory-mapped")


def _memory_mib() -> dict[str, float]:
    """This process's private and file-backed resident memory, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def measure_load(folder: str, mode: str) -> dict:
    """In this (fresh) process: load the index the way ``mode`` says, search once; its memory and load time."""
    import faiss
    import numpy as np

    from components.index import catalogue_index as index_lib

    if mode == MODES[0]:
        index_lib._read_faiss = lambda path: faiss.read_index(str(path))  # the read before memory mapping
    before = _memory_mib()
    started = time.perf_counter()
    catalogue = index_lib.load_index(folder)
    # The map as it was held before it was columnar: every row's SKU and path a Python string.
    held = (catalogue.items.sku_ids(), [path for _, path in catalogue.items.rows()]) if mode == MODES[0] else ()
    load_s = time.perf_counter() - started
    loaded = _memory_mib()
    query = np.ones((1, catalogue.dim), dtype=np.float32) / math.sqrt(catalogue.dim)
    catalogue.search(query, 5)
    searched = _memory_mib()
    del held
    return {
        "load_s": load_s,
        "anon_load": loaded["RssAnon"] - before["RssAnon"],
        "anon_search": searched["RssAnon"] - before["RssAnon"],
        "file_search": searched["RssFile"] - before["RssFile"],
    }


def build(folder: Path, vectors: int, dim: int, factory: str) -> float:
    """Save an index of ``vectors`` seeded unit vectors; the file's size in MiB."""
    import numpy as np

    from components.index import INDEX_FILE, build_index, save_index

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((vectors, dim), dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    nlist = max(1, int(4 * math.sqrt(vectors)))
    catalogue = build_index(
        embeddings,
        [f"sku-{row // 2}" for row in range(vectors)],
        [f"catalogue/{row}.jpg" for row in range(vectors)],
        factory.format(nlist=nlist),
        "never",
        {"model_name": "benchmark", "model_version": "1"},
    )
    save_index(catalogue, folder)
    return (folder / INDEX_FILE).stat().st_size / 2**20


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, dict]:
    """Per factory: the file size and each mode's figures (the median load time of ``repeats`` processes)."""
    results = {}
    for factory in args.factories:
        folder = scratch / factory.replace("{", "").replace("}", "").replace(",", "-")
        size = build(folder, args.vectors, args.dim, factory)
        modes = {}
        for mode in MODES:
            runs = [
                reporting.measure_in_child(
                    f"{factory}, {mode}",
                    [sys.executable, "-m", "benchmarks.index_memory", "--child", str(folder), mode],
                )
                for _ in range(args.repeats)
            ]
            modes[mode] = {**runs[-1], "load_s": sorted(run["load_s"] for run in runs)[len(runs) // 2]}
        results[factory] = {"file_mib": size, "modes": modes}
    return results


def render(results: dict[str, dict], args: argparse.Namespace, command: str) -> str:
    """The results file: private memory and load time against the full read, then every figure."""
    rows = []
    for factory, figures in results.items():
        full, mapped = (figures["modes"][mode] for mode in MODES)
        rows.append(
            (
                factory,
                f"{full['anon_search']:.0f} → {mapped['anon_search']:.0f}",
                f"×{mapped['anon_search'] / full['anon_search']:.2f}" if full["anon_search"] >= 1 else "–",
                f"×{mapped['load_s'] / full['load_s']:.2f}",
            )
        )
    headline = reporting.table(
        (
            f"factory, {args.vectors:,} vectors of {args.dim}-d",
            "private MiB per process, full read and lists → memory-mapped",
            "private memory vs the baseline",
            "load time vs the baseline",
        ),
        rows,
    )
    detail_rows = [
        (
            factory,
            mode,
            f"{figures['file_mib']:.0f}",
            f"{run['load_s']:.2f}",
            f"{run['anon_load']:.0f}",
            f"{run['anon_search']:.0f}",
            f"{run['file_search']:.0f}",
        )
        for factory, figures in results.items()
        for mode, run in figures["modes"].items()
    ]
    details = [
        "## Every figure",
        "",
        *reporting.table(
            (
                "factory",
                "load",
                "index file MiB",
                "load s (median)",
                "private MiB after load",
                "private MiB after a search",
                "file-backed MiB after a search",
            ),
            detail_rows,
        ),
    ]
    return reporting.results_page(
        "Index memory: what loading an index costs each serving process",
        headline,
        command,
        [
            f"Index: `save_index` of {args.vectors:,} seeded unit vectors ({args.dim}-d), two images per SKU; "
            "`{nlist}` is 4·√N lists",
            f"Load: `load_index` (checksum verified) in a fresh process, {args.repeats} per way, then one search",
        ],
        "private memory (`RssAnon`) is paid again by every worker and every replica on a host; "
        "file-backed memory (`RssFile`) is the page cache of the mapped files, shared by every "
        "process that maps them. The baseline copies the index into each process's private memory "
        "and holds the SKU map as Python strings, as loading did before; the memory-mapped load "
        "leaves both in the files' pages and decodes a SKU only when a search returns it. Load time "
        "includes the streamed checksum of both files. Figures are the increase over the process "
        "before the load.",
        details,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--child``, one measuring process) and write the results file."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(measure_load(argv[1], argv[2])))
        return 0
    parser = reporting.benchmark_parser(__doc__.split("\n\n")[0], RESULTS)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--factories", nargs="+", default=["Flat", "IVF{nlist},SQ8"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per way (the median load time)")
    args = parser.parse_args(argv)
    if args.vectors < 2 or args.dim < 1 or args.repeats < 1:
        parser.error("--vectors must be at least 2, --dim and --repeats at least 1")
    with tempfile.TemporaryDirectory(prefix="skumatch-index-memory-") as scratch:
        results = measure(args, Path(scratch))
    command = reporting.command_line("benchmarks.index_memory", args, MEASURED_OPTIONS, parser)
    print(reporting.write_results(args.out, render(results, args, command)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
