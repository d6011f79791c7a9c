"""What each backbone costs on this machine, and what the default recipe would take with it, against EfficientNet-Lite0.

    python -m benchmarks.backbones --data ../shared/datasets/grocery-store \
        [--variants lite0 lite2 clip-b32 clip-b32-last4]

The accuracy targets may need a stronger pretrained backbone than the packaged Lite0, such as
CLIP ViT-B/32 from the hub (``model.backbone: hf-clip``). Whether the recipe could then still run
in 30 minutes on this machine is a question of speed alone, and speed does not depend on the
weights' values: the CLIP variants are the real ``openai/clip-vit-base-patch32`` vision tower
architecture (``transformers``' ``CLIPVisionConfig`` defaults, or ``--clip-config``) with random
weights, so this runs where no hub can be reached.

Each variant is the params' recipe with the variant's overrides. All variants are built first;
then ``--repeats`` rounds alternate them, each keeping its fastest figures, so a slower spell of the
machine (or a cold disk cache) does not land on one variant only. On the real data each round
times the recipe's own code paths:

- backbone features of training photos (``embed_images(features_only=True)``: the feature cache);
- gallery images, each with its mirror, and query photos at every query zoom with their mirrors
  (``embed_images``: the in-training gate evaluations and the saved model's evaluation);
- ``--steps`` fine-tuning steps of the real ``CropTraining`` (decoding, augmentation, forward,
  backward, AdamW, the catalogue-anchor refresh), after the stage's images are decoded.

From those unit times and the recipe's counts (params and data) it projects the minutes of
each phase: caching, the backbone epochs, their gate evaluations and the evaluation that
follows training. The head epochs on cached features take seconds and are left out, so the
projection is slightly low; the Lite0 row can be checked against the accuracy benchmark's
measured "train min" on the same machine. The baseline is the params' own recipe (the ``lite0``
variant), always measured. Figures go to ``benchmarks/results/backbones.md`` with the machine
noted; its ``## Notes`` section is kept.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.reporting import benchmark_parser, command_line, results_page, table, torch_threads, write_results
from components.config import Params, load_params
from components.data import load_manifest
from components.evaluate import protocol_sets
from components.model import embed_images, resolve_device

RESULTS = Path(__file__).parent / "results" / "backbones.md"
BASELINE = "lite0"
CLIP_B32 = "{clip}"  # replaced by the CLIP config folder
# Name -> (what it is, overrides applied after the params' and --set's).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    BASELINE: ("EfficientNet-Lite0, the params' recipe (baseline)", []),
    "lite2": ("EfficientNet-Lite2 at 224 px", ["model.backbone=efficientnet-lite2", "model.image_size=224"]),
    "clip-b32": (
        "CLIP ViT-B/32, every layer trained",
        [
            "model.backbone=hf-clip",
            f"model.hf_model_id={CLIP_B32}",
            "model.pretrained=false",
            "model.image_size=null",
            "train.augment.image_size=null",
            "train.schedule.unfreeze_blocks=-1",
        ],
    ),
    # Stages of a CLIP tower: embeddings, the 12 transformer layers, the final norm with the
    # projection; 5 stages = the last 4 layers and the head.
    "clip-b32-last4": (
        "CLIP ViT-B/32, the last 4 layers trained",
        [
            "model.backbone=hf-clip",
            f"model.hf_model_id={CLIP_B32}",
            "model.pretrained=false",
            "model.image_size=null",
            "train.augment.image_size=null",
            "train.schedule.unfreeze_blocks=5",
        ],
    ),
}


@dataclass
class UnitTimes:
    """Measured seconds per unit of work for one variant."""

    feature_s: float  # one image's backbone features (one view)
    gallery_s: float  # one gallery image embedded (with its mirror when flip TTA is on)
    query_s: float  # one query photo embedded (every zoom, each with its mirror)
    step_s: float  # one fine-tuning step of the unfrozen stage
    steps_per_epoch: int
    eval_px: int
    train_px: int


@dataclass
class RecipeCounts:
    """How much of each unit the params' recipe does on this data."""

    # Cached forward passes: training views, catalogue views, the queries' own. A later run with
    # the same backbone, images and views reuses the cache and skips them.
    features: int
    backbone_steps: int
    gate_evaluations: int
    gate_gallery: int
    queries: int
    full_gallery: int  # every protocol's gallery, each image once


def recipe_counts(
    params: Params, rows: int, catalogue: int, galleries: dict, queries: int, steps_per_epoch: int
) -> RecipeCounts:
    """The recipe's work on this data, as :func:`components.training.train_encoder` does it."""
    cfg = params.train
    if cfg.schedule.frozen_stage != "cached":
        raise ValueError(
            f"train.schedule.frozen_stage={cfg.schedule.frozen_stage!r}: "
            "the projection covers the cached head stage only"
        )
    backbone_epochs = range(cfg.schedule.frozen_epochs, cfg.schedule.epochs)
    gate = params.evaluate.gate_protocol
    return RecipeCounts(
        features=rows * cfg.augment.cached_views + catalogue * (cfg.augment.catalogue_views - 1) + queries,
        backbone_steps=len(backbone_epochs) * steps_per_epoch,
        gate_evaluations=sum(
            (epoch + 1) % cfg.schedule.eval_every_epochs == 0 or epoch + 1 == cfg.schedule.epochs
            for epoch in backbone_epochs
        ),
        gate_gallery=len(galleries[gate]) if gate in galleries else sum(map(len, galleries.values())),
        queries=queries,
        full_gallery=len(set().union(*(g["image_path"] for g in galleries.values()))),
    )


def projected_minutes(units: UnitTimes, counts: RecipeCounts) -> dict[str, float]:
    """Minutes of each phase of the recipe, and the totals, from unit times and counts."""
    evaluation = counts.gate_gallery * units.gallery_s + counts.queries * units.query_s
    phases = {
        "caching": counts.features * units.feature_s,
        "backbone epochs": counts.backbone_steps * units.step_s,
        "gate evaluations": counts.gate_evaluations * evaluation,
    }
    minutes = {name: seconds / 60 for name, seconds in phases.items()}
    minutes["train"] = sum(minutes.values())
    minutes["evaluation"] = (counts.full_gallery * units.gallery_s + counts.queries * units.query_s) / 60
    minutes["train + evaluation"] = minutes["train"] + minutes["evaluation"]
    return minutes


def _seconds_each(work, count: int) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) / count


class VariantRun:
    """One variant built on the real data, ready to be timed again and again.

    Building is not timed: the encoder, head and optimiser come from ``training_setup`` (what
    ``train_encoder`` starts from) and the unfrozen stage's images are decoded once.
    """

    def __init__(self, params: Params, manifest, images: int) -> None:
        from components.training import training_setup
        from components.training.stages import CropTraining, set_trainable

        cfg = params.train
        self.params, self.device = params, resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.setup = setup = training_setup(params, manifest, self.device)
        self.sets = protocol_sets(manifest, params.data.query_split, params.data.train_split)
        self.photos = list(setup.rows["image_path"][:images])
        self.query_photos = list(self.sets.queries["image_path"][:images])
        self.stage = CropTraining(
            setup.preprocess, setup.paths, setup.catalogue_rows, cfg, params.evaluate.batch_size, self.device
        )
        self.steps_per_epoch = self.stage.steps_per_epoch
        set_trainable(setup.encoder, cfg.schedule.unfreeze_blocks, backbone_trainable=True)
        self.warm_up()

    def embed(self, unit: str, paths: list[str]) -> None:
        """Embed ``paths`` as the unit's workload does: backbone features, gallery images or queries."""
        how = {"feature_s": {"features_only": True}, "gallery_s": {}, "query_s": {"as_queries": True}}[unit]
        batch = self.params.evaluate.batch_size
        embed_images(self.setup.encoder, self.setup.preprocess, paths, batch, self.device, **how)

    def run_steps(self, count: int) -> None:
        """``count`` fine-tuning steps: a slice of an epoch, starting with an anchor refresh as every
        ``anchor_refresh_steps`` steps do."""
        setup, cfg = self.setup, self.params.train
        self.stage.steps_per_epoch = count
        self.stage.run_epoch(
            cfg.schedule.frozen_epochs,
            setup.encoder,
            setup.head,
            setup.optimizer,
            setup.labels,
            torch.from_numpy(setup.labels[setup.catalogue_rows]).to(self.device),
            np.random.default_rng(cfg.seed),
            progress=False,
        )

    def warm_up(self) -> None:
        # Kernels are picked on the first call of each shape, and the first read of a JPEG comes from disk.
        for unit in ("feature_s", "gallery_s"):
            self.embed(unit, self.photos)
        self.embed("query_s", self.query_photos)
        self.run_steps(1)

    def time_units(self, steps: int) -> dict[str, float]:
        """Seconds per image of each embedding workload and per fine-tuning step, measured now."""
        units = {
            unit: _seconds_each(lambda unit=unit, paths=paths: self.embed(unit, paths), len(paths))
            for unit, paths in (("feature_s", self.photos), ("gallery_s", self.photos), ("query_s", self.query_photos))
        }
        timed = min(steps, self.steps_per_epoch)
        units["step_s"] = _seconds_each(lambda: self.run_steps(timed), timed)
        return units

    def sizes(self) -> dict:
        """The data's sizes and the encoder's parameter counts."""
        encoder = self.setup.encoder
        return {
            "rows": len(self.setup.rows),
            "catalogue": len(self.setup.catalogue_rows),
            "galleries": self.sets.galleries,
            "queries": len(self.sets.queries),
            "trainable": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in encoder.parameters()),
        }


def measure(variants: dict[str, Params], manifest, images: int, steps: int, repeats: int) -> dict[str, dict]:
    """Every variant's fastest unit times over ``repeats`` rounds that alternate the variants, and its sizes.

    Alternating, as the batch-size benchmark does, keeps a slower spell of the machine from
    landing on one variant only.
    """
    runs = {name: VariantRun(params, manifest, images) for name, params in variants.items()}
    fastest: dict[str, dict[str, float]] = {name: {} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            for unit, seconds in run.time_units(steps).items():
                fastest[name][unit] = min(seconds, fastest[name].get(unit, float("inf")))
    results = {}
    for name, run in runs.items():
        units = UnitTimes(
            **fastest[name],
            steps_per_epoch=run.steps_per_epoch,
            eval_px=run.setup.preprocess.image_size,
            train_px=run.stage.out_size,
        )
        sizes = run.sizes()
        counts = recipe_counts(
            run.params, sizes["rows"], sizes["catalogue"], sizes["galleries"], sizes["queries"], units.steps_per_epoch
        )
        results[name] = {"units": units, "sizes": sizes, "minutes": projected_minutes(units, counts)}
        print(name, {k: round(v, 1) for k, v in results[name]["minutes"].items()}, flush=True)
    return results


def write_clip_b32_config(folder: Path) -> Path:
    """Save the vision config of ``openai/clip-vit-base-patch32`` (``CLIPVisionConfig``'s defaults) to ``folder``."""
    from transformers import CLIPVisionConfig

    CLIPVisionConfig().save_pretrained(folder)
    return folder


def render(results: dict[str, dict], params: Params, args: argparse.Namespace, device: str, command: str) -> str:
    """The results file: the recipe's projected minutes, then the unit times they come from; ratios to the baseline."""
    base = results[BASELINE]
    sizes = base["sizes"]
    cfg = params.train
    setup = [
        f"Data: `{params.data.root}`: {sizes['rows']} training rows ({sizes['catalogue']} catalogue images), "
        f"{sizes['queries']} `{params.data.query_split}` queries",
        f"Recipe (params): {cfg.schedule.epochs} epochs of which {cfg.schedule.frozen_epochs} on cached features, "
        f"{cfg.augment.cached_views} cached views per image and {cfg.augment.catalogue_views} per catalogue image, "
        f"stage-2 batches of {cfg.sampler.unfrozen_batch_size}, "
        f"gate evaluation every {cfg.schedule.eval_every_epochs} epochs "
        f"(`{params.evaluate.gate_protocol}`), embeddings in batches of {params.evaluate.batch_size}, flip TTA "
        f"{params.model.flip_tta}, query zooms {list(params.model.query_zooms)}",
        f"CLIP variants: the `openai/clip-vit-base-patch32` vision architecture with random weights "
        f"(`{args.clip_config or 'CLIPVisionConfig() defaults'}`); speed does not depend on the weights' values.",
        f"Unit times on real images, decoding and augmentation included; each variant's fastest of {args.repeats} "
        "rounds that alternate the variants, after a warm-up.",
    ]
    how_to_read = (
        "the table above projects, in minutes, each phase of the recipe with each backbone on this machine: "
        "the params' counts (images cached, fine-tuning steps, gate evaluations) times the unit times "
        "measured below. The head epochs on cached features take seconds and are left out, so the "
        "projection is slightly low; the Lite0 row can be checked against the accuracy benchmark's "
        '"train min" on the same machine. "vs baseline" divides by the Lite0 row of the same run; '
        "minutes and milliseconds are this machine's."
    )
    minutes, units = [], []
    for name, r in results.items():
        m, u, s = r["minutes"], r["units"], r["sizes"]
        minutes.append(
            (
                VARIANTS[name][0],
                f"{m['caching']:.1f}",
                f"{m['backbone epochs']:.1f}",
                f"{m['gate evaluations']:.1f}",
                f"{m['train']:.1f}",
                f"×{m['train'] / base['minutes']['train']:.2f}",
                f"{m['evaluation']:.1f}",
                f"{m['train + evaluation']:.1f}",
            )
        )
        units.append(
            (
                VARIANTS[name][0],
                f"{s['parameters'] / 1e6:.3g}M ({s['trainable'] / 1e6:.3g}M)",
                f"{u.eval_px} / {u.train_px}",
                f"{1000 * u.feature_s:.1f}",
                f"{1000 * u.gallery_s:.1f}",
                f"{1000 * u.query_s:.1f}",
                f"{u.step_s:.2f} ({1000 * u.step_s / cfg.sampler.unfrozen_batch_size:.0f})",
                f"×{u.feature_s / base['units'].feature_s:.2f}",
                f"×{u.query_s / base['units'].query_s:.2f}",
                f"×{u.step_s / base['units'].step_s:.2f}",
            )
        )
    details = [
        "## Unit times",
        "",
        *table(
            (
                "variant",
                "params (trained)",
                "eval / train px",
                "features ms/img",
                "gallery ms/img",
                "query ms/img",
                "step s (ms/img)",
                "features vs baseline",
                "query vs baseline",
                "step vs baseline",
            ),
            units,
        ),
    ]
    headline = table(
        (
            "variant",
            "caching",
            "backbone epochs",
            "gate evaluations",
            "train",
            "vs baseline",
            "evaluation after",
            "train + evaluation",
        ),
        minutes,
    )
    return results_page(
        "Backbone benchmark (cost per image, and the recipe's projected minutes)",
        headline,
        command,
        setup,
        how_to_read,
        details,
        machine_note=f", {torch_threads()}, device {device}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, RESULTS)
    parser.add_argument("--data", default=None, help="dataset root (default: data.root from the params)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--clip-config",
        default=None,
        help="a folder or hub id with the CLIP config to time (default: ViT-B/32's, written here)",
    )
    parser.add_argument("--images", type=int, default=64, help="photos embedded per unit time")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps timed per variant and repeat")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the variants; each keeps its fastest")
    args = parser.parse_args(argv)
    if min(args.images, args.steps, args.repeats) < 1:
        parser.error("--images, --steps and --repeats must be at least 1")
    args.variants = list(dict.fromkeys([BASELINE, *args.variants]))  # the baseline first, always
    overrides = args.overrides + ([f"data.root={args.data}"] if args.data else [])
    params = load_params(args.params, overrides)
    manifest = load_manifest(params.data.root, params.data.layout, params.data.max_images_per_sku)
    with tempfile.TemporaryDirectory(prefix="skumatch-clip-config-") as scratch:
        clip_config = args.clip_config or str(write_clip_b32_config(Path(scratch)))
        variants = {
            name: load_params(args.params, overrides + [o.replace(CLIP_B32, clip_config) for o in VARIANTS[name][1]])
            for name in args.variants
        }
        results = measure(variants, manifest, args.images, args.steps, args.repeats)
    command = command_line(
        "benchmarks.backbones",
        args,
        ("variants", "images", "steps", "repeats"),
        parser,
        optional=("params", "data", "clip_config", "out"),
    )
    write_results(args.out, render(results, params, args, resolve_device(params.train.device).type, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
