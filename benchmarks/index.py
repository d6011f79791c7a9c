"""Catalogue indexes at 1M and 10M vectors against exact search in the same run, streamed from disk.

    python -m benchmarks.index [--sizes 1000000 10000000] [--queries 1000]
                               [--candidates "IVF{nlist},Flat" "IVF{nlist},SQ8" ...] [--milvus-at 1000000]

For each size the catalogue is written to disk as float16 in chunks (a 10M catalogue never sits
in memory as float32) and indexed through ``components.index.indexing.index_embeddings``, the path the
flows take: ``index.factory: auto`` (the plan for that size), each named candidate, and at
``--milvus-at`` the same vectors published to Milvus Lite. Every index is saved, then loaded and
searched in a fresh process, so its memory is its own:

- build seconds (training, adding, tuning to ``index.target_recall``);
- resident bytes per vector: the process's RSS after loading and every search, less a bare
  process's, over the vector count (index, map and the re-ranked pages it touched);
- p50/p99 of single queries through ``CatalogueIndex.search`` (ten distinct SKUs, the service's
  path) and batch throughput;
- recall@1 and recall@10 of SKUs against exact search of the same vectors.

At the first size, ``index add`` of ``--add`` catalogue photos of Grocery Store (new products,
embedded with the pretrained encoder) runs against the ``auto`` index, end to end.

Data: near-tie families of 50 SKUs (cosine 0.8-0.95 between SKUs of a family, two catalogue
images per SKU at cosine 0.96 to it), queries farther away (cosine about 0.78 to their SKU), and
the Grocery Store catalogue images with their ``val`` photos as queries, embedded with the
pretrained EfficientNet-Lite0, mixed in.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.reporting import (
    benchmark_parser,
    command_line,
    machine,
    measure_in_child,
    results_page,
    table,
    write_results,
)

RESULTS = Path(__file__).parent / "results" / "index.md"
EXACT = "exact (Flat)"
FAMILY = 50
IMAGES_PER_SKU = 2
TOP_K = 10
BATCH = 64
CHUNK = 500_000
TARGETS = {
    10_000_000: {"resident_gb": 1.5, "recall_at_10": 0.95, "p99_ms": 10.0, "build_min": 60.0},
    1_000_000: {"recall_at_10": 0.97, "p99_ms": 3.0, "speedup": 50.0},
}


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def write_catalogue(folder: Path, size: int, dim: int, n_queries: int, real: dict, seed: int = 0) -> dict:
    """Write ``vectors.npy`` (float16), ``sku_codes.npy`` and ``queries.npy``; returns counts.

    The real Grocery Store rows come first, then synthetic SKUs fill the catalogue to ``size``.
    """
    rng = np.random.default_rng(seed)
    real_rows = len(real["catalogue"])
    synthetic_skus = -(-(size - real_rows) // IMAGES_PER_SKU)  # at least size vectors in all
    total = real_rows + synthetic_skus * IMAGES_PER_SKU
    vectors = np.lib.format.open_memmap(folder / "vectors.npy", "w+", np.float16, (total, dim))
    codes = np.lib.format.open_memmap(folder / "sku_codes.npy", "w+", np.int32, (total,))
    vectors[:real_rows] = real["catalogue"]
    codes[:real_rows] = real["catalogue_skus"]
    first_code = int(real["catalogue_skus"].max()) + 1
    query_skus = np.sort(rng.choice(synthetic_skus, n_queries, replace=False))
    queries, truth = [], []
    for start in range(0, synthetic_skus, CHUNK):  # a chunk is whole families: CHUNK % FAMILY == 0
        count = min(CHUNK, synthetic_skus - start)
        families = _unit(rng.standard_normal((math.ceil(count / FAMILY), dim)))
        family = np.arange(count) // FAMILY
        spread = rng.uniform(0.23, 0.5, len(families))[family][:, None]  # cosine 0.8-0.95 within a family
        skus = _unit(families[family] + spread * _unit(rng.standard_normal((count, dim))))
        images = _unit(np.repeat(skus, IMAGES_PER_SKU, axis=0) + 0.2 * _unit(rng.standard_normal((count * 2, dim))))
        row = real_rows + start * IMAGES_PER_SKU
        vectors[row : row + len(images)] = images
        codes[row : row + len(images)] = first_code + start + np.repeat(np.arange(count), IMAGES_PER_SKU)
        asked = query_skus[(query_skus >= start) & (query_skus < start + count)] - start
        queries.append(_unit(skus[asked] + 0.8 * _unit(rng.standard_normal((len(asked), dim)))))
        truth.append(first_code + start + asked)
    np.save(folder / "queries.npy", np.concatenate(queries))
    np.save(folder / "real_queries.npy", real["queries"].astype(np.float32))
    vectors.flush(), codes.flush()
    return {
        "vectors": total,
        "skus": first_code + synthetic_skus,
        "real_rows": real_rows,
        "queries": n_queries,
        "real_queries": len(real["queries"]),
    }


def grocery_embeddings(data_root: str, dim_check: int) -> dict:
    """Grocery Store catalogue images and ``val`` photos embedded with the pretrained encoder."""
    from components.config import ModelParams
    from components.data import load_manifest, select
    from components.model import build_encoder, embed_images

    manifest = load_manifest(data_root)
    catalogue = select(manifest, role="catalogue")
    photos = select(manifest, split="val", role="query").groupby("sku_id").head(2)
    encoder, preprocess = build_encoder(ModelParams(embed_dim=dim_check))
    names = sorted(set(catalogue["sku_id"]))
    code = {name: i for i, name in enumerate(names)}
    return {
        "catalogue": embed_images(encoder, preprocess, list(catalogue["image_path"]), 4),
        "catalogue_skus": np.array([code[sku] for sku in catalogue["sku_id"]], np.int32),
        "queries": embed_images(encoder, preprocess, list(photos["image_path"]), 4),
        "names": names,
    }


def catalogue_map(folder: Path, n_skus: int, real_names: list[str]):
    """The SKU map of the written catalogue, built column-wise (10M rows, no Python strings per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from components.index.catalogue_map import CatalogueMap

    numbers = pc.cast(pa.array(np.arange(len(real_names), n_skus)), pa.string())
    names = pa.concat_arrays([pa.array(real_names, pa.string()), pc.binary_join_element_wise("sku-", numbers, "")])
    codes = np.load(folder / "sku_codes.npy")
    paths = pc.binary_join_element_wise("catalogue/", pc.cast(pa.array(np.arange(len(codes))), pa.string()), ".jpg", "")
    return CatalogueMap(codes, names, paths.cast(pa.large_string()))


def exact_answers(folder: Path, queries: np.ndarray, items) -> list[list[str]]:
    """Exact top-10 SKUs per query by a streamed scan of the float16 vectors."""
    from faiss import METRIC_INNER_PRODUCT
    from faiss.contrib.exhaustive_search import knn_ground_truth

    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    blocks = (np.asarray(vectors[s : s + CHUNK], np.float32) for s in range(0, len(vectors), CHUNK))
    _, rows = knn_ground_truth(queries, blocks, 4 * TOP_K, metric_type=METRIC_INNER_PRODUCT)
    return [_skus(items, found) for found in rows]


def _skus(items, rows) -> list[str]:
    seen: list[int] = []
    for row in rows:
        code = int(items.sku_codes[row]) if row >= 0 else -1
        if code >= 0 and code not in seen:
            seen.append(code)
            if len(seen) == TOP_K:
                break
    return [items.sku_names[code].as_py() for code in seen]


def _rss() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon", "RssFile")}


def _bytes_read() -> int:
    """Bytes this process has read with read/pread calls (re-ranking's rows, outside RSS)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/io").read_text().splitlines() if ":" in line)
    return int(fields["rchar"])


def measure(folder: str, catalogue_dir: str, backend: str, limit: int = 0) -> dict:
    """In a fresh process: load an index, search every query alone and in batches, report memory and recall."""
    queries = np.load(Path(catalogue_dir) / "queries.npy")[: limit or None]
    answers_of = json.loads((Path(catalogue_dir) / "exact.json").read_text())
    exact = answers_of["synthetic"][: limit or None]
    bare = _rss()
    started = time.perf_counter()
    if backend == "milvus":
        from components.index.milvus import open_milvus_index

        uri, collection = folder.split("#")
        catalogue = open_milvus_index(uri, collection)
    else:
        from components.index import load_index

        catalogue = load_index(folder)
    load_s = time.perf_counter() - started
    answers, times = [], []
    read_before = _bytes_read()
    for query in queries:
        started = time.perf_counter()
        answers.append([sku for sku, _ in catalogue.search(query[None], TOP_K)[0]])
        times.append(time.perf_counter() - started)
    read_per_query = (_bytes_read() - read_before) / max(1, len(queries))
    started = time.perf_counter()
    for start in range(0, len(queries), BATCH):
        catalogue.search(queries[start : start + BATCH], TOP_K)
    batch_qps = len(queries) / (time.perf_counter() - started)
    after = _rss()
    real = [
        [sku for sku, _ in hits] for hits in catalogue.search(np.load(Path(catalogue_dir) / "real_queries.npy"), TOP_K)
    ]
    recall = {**_recall(answers, exact), **_recall(real, answers_of["real"][: limit or None], "real_")}
    return {
        "load_s": load_s,
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
        "batch_qps": batch_qps,
        "rss_bytes": after["VmRSS"] - bare["VmRSS"],
        "rss_anon_bytes": after["RssAnon"] - bare["RssAnon"],
        "rss_file_bytes": after["RssFile"] - bare["RssFile"],
        "read_bytes_per_query": read_per_query,
        **recall,
    }


def _recall(answers: list[list[str]], exact: list[list[str]], prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}recall_at_{k}": float(
            np.mean([len(set(a[:k]) & set(e[:k])) / len(e[:k]) for a, e in zip(answers, exact)])
        )
        for k in (1, TOP_K)
    }


def build_one(name: str, factory: str, vectors, items, params, out: Path) -> dict:
    """Build, tune and save one FAISS candidate; its facts."""
    from components.index import save_index
    from components.index.indexing import index_embeddings

    started = time.perf_counter()
    catalogue = index_embeddings(vectors, items, params.model_copy(update={"factory": factory}), {"candidate": name})
    save_index(catalogue, out)
    build_s = time.perf_counter() - started
    meta = catalogue.meta
    keep = ("factory", "nprobe", "ef_search", "rerank_factor", "recall_at_10")
    print(name, {key: meta.get(key) for key in keep}, f"{build_s:.0f} s", flush=True)
    return {"build_s": build_s, **{f"meta_{key}": meta.get(key) for key in keep}}


def build_milvus(folder: str, scratch: str, nlist: int) -> dict:
    """In a fresh process (Milvus Lite holds its file while its process lives): publish the catalogue
    of ``folder`` to a Milvus Lite file with an IVF_FLAT index; its location and facts."""
    from components.index.catalogue_map import CatalogueMap
    from components.index.milvus import publish_to_milvus

    uri = str(Path(scratch) / "milvus" / "catalogue.db")
    vectors = np.load(Path(folder) / "vectors.npy", mmap_mode="r")
    started = time.perf_counter()
    catalogue = publish_to_milvus(
        uri,
        "catalogue",
        np.asarray(vectors, np.float32),
        CatalogueMap.read(Path(folder)),
        {"model_version": "benchmark"},
        index_type="IVF_FLAT",
        index_params={"nlist": nlist},
        search_params={"nprobe": 16},
    )
    catalogue.close()
    return {
        "location": f"{uri}#catalogue",
        "build_s": time.perf_counter() - started,
        "meta_factory": f"Milvus Lite IVF_FLAT {nlist}",
        "meta_nprobe": 16,
    }


def index_add(folder: Path, data_root: str, count: int, scratch: Path, params) -> dict:
    """``skumatch index add``'s steps for ``count`` Grocery Store photos (as new products) on a saved
    index, timed apart: loading the index, embedding the photos with the production embedder
    (``embedding.*``), and adding, re-measuring and saving."""
    from components.data import load_manifest, select
    from components.embedder import embedder_for
    from components.index import load_index
    from components.index.indexing import add_vectors
    from components.model import build_encoder, save_encoder

    encoder, preprocess = build_encoder(params.model)
    encoder_dir = save_encoder(encoder, preprocess, params.model, scratch / "encoder")
    # The graph is made once per model, when its first index is built: not part of an add.
    settings = params.embedding.model_copy(update={"graph_dir": str(scratch / "graphs")})
    rows = select(load_manifest(data_root), split="train").head(count).copy()
    rows["sku_id"] = "new-" + rows["sku_id"].astype(str)
    embedder, _ = embedder_for(encoder, preprocess, settings, encoder_dir, list(rows["image_path"]))
    kept = load_index(folder)
    kept_vectors, kept_rows = np.asarray(kept.vectors[:1000]), list(kept.items.rows())[:1000]
    started = time.perf_counter()
    current = load_index(folder, writable=True)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    vectors = embedder.embed_paths(list(rows["image_path"]))
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    _, after = add_vectors(current, vectors, rows, scratch / "added", params.index)
    index_s = time.perf_counter() - started
    reloaded = load_index(scratch / "added")
    untouched = np.array_equal(np.asarray(reloaded.vectors[:1000]), kept_vectors) and (
        list(reloaded.items.rows())[:1000] == kept_rows
    )
    return {
        "index_s": load_s + index_s,
        "embed_s": embed_s,
        "rows": len(rows),
        "untouched": bool(untouched),
        "recall_at_10": after.meta["recall_at_10"],
        "runtime": embedder.runtime,
    }


def run_size(size: int, args, real: dict, params, scratch: Path) -> dict:
    """Every way at one catalogue size."""
    from components.index.policy import ivf_lists, plan_index

    folder = scratch / f"catalogue-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    counts = write_catalogue(folder, size, params.model.embed_dim, args.queries, real)
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    items = catalogue_map(folder, counts["skus"], real["names"])
    items.write(folder / "items.arrow")  # for the Milvus publishing process
    if not args.add_only:
        exact = {
            kind: exact_answers(folder, np.load(folder / f"{stem}.npy"), items)
            for kind, stem in (("synthetic", "queries"), ("real", "real_queries"))
        }
        (folder / "exact.json").write_text(json.dumps(exact))
    plan = plan_index(len(vectors), vectors.shape[1], params.index)
    nlist = ivf_lists(len(vectors))
    named = [c.replace("{nlist}", str(nlist)) for c in (args.candidates if size in args.candidates_at else [])]
    ways = [("auto", "auto")] if args.add_only else [(EXACT, "Flat"), ("auto", "auto"), *((f, f) for f in named)]
    results = {
        "counts": counts,
        "plan": plan.factory,
        "plan_reason": plan.reason,
        "ways": {},
    }
    for name, factory in ways:
        out = scratch / f"index-{size}-{len(results['ways'])}"
        built = build_one(name, factory, vectors, items, params.index, out)
        # The files just saved are dirty page cache: written back during the measurement, they
        # stall page reads (the tail). Flushed first, outside the build time.
        os.sync()
        limit = args.exact_queries if name == EXACT else 0
        child = [sys.executable, "-m", "benchmarks.index", "--measure", str(out), str(folder), "faiss", str(limit)]
        results["ways"][name] = built if args.add_only else {**built, **measure_in_child(name, child)}
        if name == "auto" and size in args.add_at and args.add:
            results["add"] = index_add(out, args.data_root, args.add, scratch, params)
            print("add", results["add"], flush=True)
        if name != "auto":
            shutil.rmtree(out)
    if size in args.milvus_at and not args.add_only:
        built = measure_in_child(
            "Milvus Lite build",
            [sys.executable, "-m", "benchmarks.index", "--publish-milvus", str(folder), str(scratch), str(nlist)],
        )
        location = built.pop("location")
        child = [
            sys.executable,
            "-m",
            "benchmarks.index",
            "--measure",
            location,
            str(folder),
            "milvus",
            str(args.milvus_queries),
        ]
        results["ways"]["Milvus Lite"] = {**built, **measure_in_child("Milvus Lite", child)}
    return results


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def targets_table(results: dict) -> list[str]:
    """The headline: each target of the issue against what this run measured."""
    rows = []
    for size, wanted in TARGETS.items():
        found = results["sizes"].get(str(size))
        if found is None:
            continue
        auto, exact = found["ways"]["auto"], found["ways"][EXACT]
        label = f"{size:,} vectors"
        if "resident_gb" in wanted:
            rows.append(
                (
                    f"{label}: resident with the map ≤ {wanted['resident_gb']} GB",
                    _gib(auto["rss_bytes"]),
                    auto["rss_bytes"] <= wanted["resident_gb"] * 1e9,
                )
            )
        rows.append(
            (
                f"{label}: recall@10 of SKUs against exact ≥ {wanted['recall_at_10']}",
                f"{auto['recall_at_10']:.3f}",
                auto["recall_at_10"] >= wanted["recall_at_10"],
            )
        )
        rows.append(
            (
                f"{label}: p99 single query ≤ {wanted['p99_ms']:g} ms",
                f"{auto['p99_ms']:.2f} ms",
                auto["p99_ms"] <= wanted["p99_ms"],
            )
        )
        if "build_min" in wanted:
            rows.append(
                (
                    f"{label}: built in ≤ {wanted['build_min']:g} min",
                    f"{auto['build_s'] / 60:.1f} min",
                    auto["build_s"] <= wanted["build_min"] * 60,
                )
            )
        if "speedup" in wanted:
            speedup = exact["p50_ms"] / auto["p50_ms"]
            rows.append(
                (
                    f"{label}: ≥ {wanted['speedup']:g}× faster per query than exact (p50)",
                    f"×{speedup:.0f}",
                    speedup >= wanted["speedup"],
                )
            )
    added = results.get("add")
    if added:
        first = int(next(iter(results["sizes"].values()))["counts"]["vectors"])
        untouched = "yes" if added["untouched"] else "no"
        rows.append(
            (
                f"index add of {added['rows']:,} products to {first:,} vectors < 1 min, others untouched: "
                "the index (load, add, re-measure recall, save)",
                f"{added['index_s']:.1f} s, others untouched: {untouched}",
                added["index_s"] < 60 and added["untouched"],
            )
        )
        rows.append(
            (
                f"the same with embedding the {added['rows']:,} photos (pretrained EfficientNet-Lite0, flip TTA, "
                f"embedder on {added.get('runtime', 'torch')})",
                f"{added['index_s'] + added['embed_s']:.1f} s ({added['embed_s']:.1f} s embedding)",
                added["index_s"] + added["embed_s"] < 60,
            )
        )
    return table(("target", "measured", "met"), ((t, m, "yes" if ok else "no") for t, m, ok in rows))


def size_table(size: str, found: dict) -> list[str]:
    """Every way at one size."""
    lines = [
        f"## {int(size):,} vectors ({found['counts']['skus']:,} SKUs)",
        "",
        f"Run: `{found.get('command', '')}`, on {found.get('machine', 'an unrecorded machine')}. "
        f"`auto` chose `{found['plan']}`: {found['plan_reason']}.",
        "",
    ]
    rows = []
    for name, way in found["ways"].items():
        factory = str(way.get("meta_factory", ""))
        shown = ("ef_search",) if "HNSW" in factory and "IVF" not in factory else ("nprobe", "rerank_factor")
        settings = ", ".join(f"{key} {way['meta_' + key]}" for key in shown if way.get("meta_" + key))
        rows.append(
            (
                name,
                way.get("meta_factory", ""),
                settings if factory != "Flat" else "-",
                f"{way['build_s']:.0f}",
                f"{way['rss_bytes'] / found['counts']['vectors']:.0f}",
                f"{_gib(way['rss_anon_bytes'])} + {_gib(way['rss_file_bytes'])}",
                f"{way.get('read_bytes_per_query', 0) / 1024:.0f}",
                f"{way['p50_ms']:.2f}",
                f"{way['p99_ms']:.2f}",
                f"{way['batch_qps']:,.0f}",
                f"{way['recall_at_1']:.3f}",
                f"{way['recall_at_10']:.3f}",
                f"{way['real_recall_at_1']:.3f} / {way['real_recall_at_10']:.3f}",
            )
        )
    lines += table(
        (
            "way",
            "index",
            "search settings",
            "build s",
            "resident B/vector",
            "anonymous + file pages",
            "read KiB/query",
            "p50 ms",
            "p99 ms",
            "batch queries/s",
            "recall@1",
            "recall@10",
            "Grocery photos recall@1 / @10",
        ),
        rows,
    )
    return lines + [""]


def report(results: dict, args, command: str) -> str:
    """The results page."""
    details = []
    add = results.get("add") if results.get("add", {}).get("command") else None
    for size, found in results["sizes"].items():
        details += size_table(size, found)
    return results_page(
        "Index benchmark: the auto index at 1M and 10M vectors against exact search",
        targets_table(results),
        command,
        [
            f"Data: near-tie families of {FAMILY} SKUs (cosine 0.8-0.95 between a family's SKUs), "
            f"{IMAGES_PER_SKU} catalogue images per SKU, queries at cosine about 0.78 to their SKU; "
            "the 81 Grocery Store catalogue images and "
            "val photos (pretrained EfficientNet-Lite0, untrained projection) mixed in",
            f"{args.queries} queries per size; the exact way times its first {args.exact_queries}, Milvus Lite "
            f"its first {args.milvus_queries} (and as many Grocery photos)",
            *([f"index add: `{add['command']}`, on {add.get('machine', 'an unrecorded machine')}"] if add else []),
        ],
        "every recall is against exact search of the same vectors in this run, on the ten distinct SKUs "
        "`CatalogueIndex.search` answers (the service's path). Resident bytes are the fresh process's RSS after "
        "loading and every search, less a bare process's, over the vectors: anonymous memory plus the mapped "
        "file pages the searches touched (page cache, shared by every worker on the host). Re-ranking reads its "
        "exact rows with `pread`, through the page cache but not the mapping (a fault on a mapping maps 64 KiB "
        "around it): `read KiB/query` is what one query read so. Build includes tuning to "
        "`index.target_recall` on held-out catalogue vectors. The Grocery Store photos are a column of their own: "
        "under the untrained projection their best cosine to any catalogue image is about 0.49, below the service's "
        "rejection threshold, so their ten nearest SKUs are near-ties among thousands of vectors. Each size's "
        "figures come from one run, named with its machine in its section, and the add's from the run named above; "
        "the command and machine at the top are the latest run's.",
        details,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write ``benchmarks/results/index.md``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--publish-milvus":
        print(json.dumps(build_milvus(argv[1], argv[2], int(argv[3]))))
        return
    if argv and argv[0] == "--measure":
        print(json.dumps(measure(argv[1], argv[2], argv[3], int(argv[4]))))
        return
    from components.config import load_params

    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=50)
    parser.add_argument("--candidates", nargs="*", default=["IVF{nlist},Flat", "IVF{nlist},SQ8", "IVF{nlist},PQ64"])
    parser.add_argument("--candidates-at", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--milvus-at", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--milvus-queries", type=int, default=100)
    parser.add_argument("--add", type=int, default=1000)
    parser.add_argument("--add-at", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--data-root", default="../shared/datasets/grocery-store")
    parser.add_argument("--scratch", default=None)
    # Only `index add` at each --add-at size: the auto index built, the add measured; other figures are kept.
    parser.add_argument("--add-only", action="store_true")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.overrides)
    params.index.use_gpu = "auto"
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="index-bench-"))
    real = grocery_embeddings(args.data_root, params.model.embed_dim)
    # Sizes not run this time keep their figures from the run that measured them.
    record = Path(args.out).with_suffix(".json")
    results = json.loads(record.read_text()) if record.exists() else {"sizes": {}}
    command = command_line(
        "benchmarks.index",
        args,
        (
            "sizes",
            "queries",
            "exact_queries",
            "candidates",
            "candidates_at",
            "milvus_at",
            "milvus_queries",
            "add",
            "add_at",
            "add_only",
        ),
        parser,
    )
    try:
        for size in args.sizes:
            found = run_size(size, args, real, params, scratch)
            found["command"], found["machine"] = command, machine()
            if "add" in found:
                results["add"] = {**found.pop("add"), "command": command, "machine": found["machine"]}
            if not args.add_only:
                results["sizes"][str(size)] = found
            results["sizes"] = dict(sorted(results["sizes"].items(), key=lambda item: int(item[0])))
            record.write_text(json.dumps(results, indent=1))
        text = report(results, args, command)
        write_results(args.out, text)
        print(text)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
