"""Memory and speed of the head stage's cached features and catalogue anchors, against how they were held before.

    python -m benchmarks.cached_features --skus 10000 --images-per-sku 20 --batches 60

The head stage (``train.schedule.frozen_stage: cached``) trains on backbone features that
:func:`components.training.feature_cache.cache_features` stores as ``.npy`` files. This benchmark writes a
features folder in that layout, at a scale no real dataset here reaches: random float32
features of the backbone's width for ``--skus`` x ``--images-per-sku`` training photos plus one
catalogue image per SKU, ``train.augment.cached_views`` views each. Then, in one fresh process per way,
it opens the folder and runs what training runs on it: the prototype initialisation of the
head (every training row embedded) and ``--batches`` real head-stage batches
(:func:`components.training.stages.frozen_epoch`: P x K draw, projection, margin head with catalogue
anchors, AdamW), built by :func:`components.training.training_setup`.

Three ways, in the same run:

- baseline: the arrays read whole into memory, and every catalogue image an anchor in every
  batch, as before 8ddbc58;
- memory-mapped, every catalogue image an anchor (``train.sampler.anchor_sample=null``);
- memory-mapped with sampled anchors (the params as given: ``train.sampler.anchor_sample``, 1024 by
  default, so at 10,000 SKUs a batch ranks against 1024 catalogue images, not 10,000).

Figures go to ``benchmarks/results/cached_features.md`` with the machine noted; its
hand-written ``## Notes`` section is kept across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.reporting import benchmark_parser, command_line, measure_in_child, results_page, table, write_results

RESULTS = Path(__file__).parent / "results" / "cached_features.md"
BASELINE = "read whole into memory, all anchors (before)"
MAPPED_ALL_ANCHORS = "memory-mapped, all anchors"
MAPPED = "memory-mapped, sampled anchors (default)"
# Each way: whether its arrays are read whole into memory, and its params overrides (after the user's).
WAYS = {
    BASELINE: (True, ["train.sampler.anchor_sample=null"]),
    MAPPED_ALL_ANCHORS: (False, ["train.sampler.anchor_sample=null"]),
    MAPPED: (False, []),
}


def synthetic_manifest(skus: int, images_per_sku: int, train_split: str = "train"):
    """A manifest of ``skus`` SKUs: ``images_per_sku`` training photos and one catalogue image each.

    The files do not exist: the head stage reads cached features, never the images.
    """
    import pandas as pd

    photos = [
        (f"photos/{sku}/{i}.jpg", f"sku{sku}", train_split, "query")
        for sku in range(skus)
        for i in range(images_per_sku)
    ]
    catalogue = [(f"catalogue/{sku}.jpg", f"sku{sku}", "catalogue", "catalogue") for sku in range(skus)]
    return pd.DataFrame(photos + catalogue, columns=["image_path", "sku_id", "split", "role"])


def _process_memory() -> dict[str, float]:
    """Resident memory of this process in MiB: anonymous (heap, arrays) and file-backed (mapped pages), and the peak."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile", "VmHWM")}


def write_features(folder: Path, params, rows: int, catalogue_images: int, feature_dim: int) -> float:
    """Write random features in :func:`cache_features`'s layout; their size in MiB."""
    from numpy.lib.format import open_memmap

    from components.training.feature_cache import FEATURE_CHUNK_ROWS

    rng = np.random.default_rng(0)
    shapes = {
        "train_views": (params.train.augment.cached_views, rows, feature_dim),
        "catalogue_views": (params.train.augment.catalogue_views, catalogue_images, feature_dim),
        "evaluation": (1, feature_dim),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, shape in shapes.items():
        array = open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)
        for start in range(0, shape[-2], FEATURE_CHUNK_ROWS):  # in slices: this process never holds it all
            block = array[..., start : start + FEATURE_CHUNK_ROWS, :]
            block[...] = rng.standard_normal(block.shape, dtype=np.float32)
        array.flush()
        del array
    return sum((folder / f"{name}.npy").stat().st_size for name in shapes) / 2**20


def measure_one(
    way: str, folder: Path, params_path: str, overrides: list[str], skus: int, images_per_sku: int, batches: int
) -> dict:
    """Open the features one way and run the head stage's start and ``batches`` batches; memory and times."""
    import torch

    from components.config import load_params
    from components.model import resolve_device
    from components.training import training_setup
    from components.training.feature_cache import CachedFeatures
    from components.training.sampling import pk_batches
    from components.training.stages import frozen_epoch, init_head_from_cached

    read_into_memory, way_overrides = WAYS[way]
    params = load_params(params_path, overrides + way_overrides)
    cfg = params.train
    device = resolve_device(cfg.device)  # a CUDA machine measures batches on its GPU, as training would run them
    torch.manual_seed(cfg.seed)
    setup = training_setup(params, synthetic_manifest(skus, images_per_sku, params.data.train_split), device)
    before = _process_memory()
    started = time.perf_counter()
    cached = CachedFeatures.open(folder, evaluation_paths=["unused"])
    if read_into_memory:
        cached = CachedFeatures(
            np.array(cached.train_views),
            np.array(cached.catalogue_views),
            np.array(cached.evaluation),
            cached.evaluation_paths,
        )
    open_s = time.perf_counter() - started

    started = time.perf_counter()
    init_head_from_cached(setup.encoder, setup.head, cached, setup.labels, device)
    init_s = time.perf_counter() - started

    rng = np.random.default_rng(cfg.seed)
    drawn = pk_batches(
        setup.labels, max(2, cfg.sampler.batch_size // cfg.sampler.images_per_sku), cfg.sampler.images_per_sku, rng
    )[:batches]
    catalogue_labels = torch.from_numpy(setup.labels[setup.catalogue_rows]).to(device)
    started = time.perf_counter()
    losses = frozen_epoch(
        setup.encoder, setup.head, setup.optimizer, cached, setup.labels, catalogue_labels, cfg, drawn, rng, device
    )
    batch_s = (time.perf_counter() - started) / len(drawn)
    after = _process_memory()
    return {
        "device": device.type,
        "anchor_sample": cfg.sampler.anchor_sample,
        "open_s": open_s,
        "init_s": init_s,
        "batch_s": batch_s,
        "batches": len(drawn),
        "mean_loss": float(np.mean(losses)),
        "anon_mib": after["RssAnon"] - before["RssAnon"],
        "file_mib": after["RssFile"] - before["RssFile"],
        "peak_mib": after["VmHWM"],
    }


def render(results: dict[str, dict], args: argparse.Namespace, features_mib: float, rows: int, command: str) -> str:
    """The results file: one row per way, with ratios to the baseline."""
    base = results[BASELINE]
    data = (
        f"Features: {rows:,} training rows ({args.skus:,} SKUs x {args.images_per_sku} photos + 1 catalogue "
        f"image), random float32 in `cache_features`' layout, {features_mib:,.0f} MiB on disk (just written, "
        "so in the OS page cache)"
    )
    method = (
        f"Each row: its own process ({base['device']}) opens the folder, initialises the head from every row's "
        f"embedding, then runs {base['batches']} head-stage batches "
        f"(`frozen_epoch`, with `train.sampler.anchor_sample` "
        f"{results[MAPPED]['anchor_sample']} in the default way). Memory is the growth from opening "
        "the folder to the end: anonymous (the process's own) and file-backed (mapped pages, which the OS "
        "can drop and re-read)."
    )
    how_to_read = (
        "the first row is how the features were held before (read whole into memory, every catalogue "
        "image an anchor in every batch), and every ratio divides by it. Anonymous memory is the cost "
        "that grows with the catalogue; file-backed pages are ones the OS can give back. The two ways "
        "with all anchors train identically, so their mean loss is equal; sampled anchors are a "
        "different loss."
    )
    headline = table(
        (
            "way",
            "open s",
            "head init s",
            "s/batch",
            "anonymous MiB",
            "file-backed MiB",
            "peak RSS MiB",
            "mean loss",
            "s/batch vs baseline",
            "anonymous vs baseline",
        ),
        (
            (
                name,
                f"{r['open_s']:.2f}",
                f"{r['init_s']:.2f}",
                f"{r['batch_s']:.4f}",
                f"{r['anon_mib']:.0f}",
                f"{r['file_mib']:.0f}",
                f"{r['peak_mib']:.0f}",
                f"{r['mean_loss']:.4f}",
                f"×{r['batch_s'] / base['batch_s']:.2f}",
                f"×{r['anon_mib'] / max(base['anon_mib'], 1.0):.2f}",
            )
            for name, r in results.items()
        ),
    )
    return results_page("Cached-features benchmark (head stage)", headline, command, [data, method], how_to_read)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--skus", type=int, default=10000)
    parser.add_argument("--images-per-sku", type=int, default=20)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--work", default=None, help="folder for the features (default: a temporary one)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: the way and the folder
    args = parser.parse_args(argv)
    if args.skus < 2 or args.images_per_sku < 1 or args.batches < 1:
        parser.error("--skus must be at least 2, --images-per-sku and --batches at least 1")
    if args.one is not None:
        way, folder = json.loads(args.one)
        print(
            json.dumps(
                measure_one(
                    way, Path(folder), args.params, args.overrides, args.skus, args.images_per_sku, args.batches
                )
            )
        )
        return 0

    from components.config import load_params
    from components.model import build_encoder

    params = load_params(args.params, args.overrides)
    feature_dim = build_encoder(params.model)[0].feature_dim
    rows = args.skus * (args.images_per_sku + 1)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        folder = Path(work) / "features"
        features_mib = write_features(folder, params, rows, args.skus, feature_dim)
        results = {}
        for way in WAYS:
            child = [
                sys.executable,
                "-m",
                "benchmarks.cached_features",
                "--params",
                args.params,
                "--skus",
                str(args.skus),
                "--images-per-sku",
                str(args.images_per_sku),
                "--batches",
                str(args.batches),
                "--one",
                json.dumps([way, str(folder)]),
            ] + [a for o in args.overrides for a in ("--set", o)]
            results[way] = measure_in_child(way, child)
    command = command_line("benchmarks.cached_features", args, ("skus", "images_per_sku", "batches"), parser)
    write_results(args.out, render(results, args, features_mib, rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
