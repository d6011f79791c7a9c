"""The fine-tuning recipe: set up, resume, run both stages epoch by epoch, validate, save.

The objective is a margin softmax over SKUs (:mod:`~components.training.losses`) plus the
catalogue-anchor loss; the first ``train.schedule.frozen_epochs`` train the head on cached backbone
features, the rest train on augmented crops (:mod:`~components.training.stages`). Every epoch
writes a checkpoint (:mod:`~components.training.checkpoints`). The experiment tracker is passed
in, so training needs only torch and numpy.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from components.config import Params, ScheduleParams, TrainParams
from components.data import select
from components.evaluate import (
    ProtocolSets,
    embed_protocol_sets,
    evaluate_embeddings,
    flatten_metrics,
    protocol_sets,
)
from components.model import Encoder, Preprocess, build_encoder, resolve_device, save_encoder
from components.training.checkpoints import load_latest_checkpoint, run_fingerprint, save_checkpoint
from components.training.distributed import DataParallel, from_environment, leave
from components.training.feature_cache import CachedFeatures, cache_features, embed_cached
from components.training.losses import ALONE, MarginHead, margin_head
from components.training.sampling import pk_batches
from components.training.stages import CropTraining, frozen_epoch, init_head_from_cached, set_trainable, sku_means

LOGGER = logging.getLogger(__name__)


class Tracker(Protocol):
    """What training needs from an experiment tracker (MLflow's adapter lives in registry)."""

    def log_params(self, params: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullTracker:
    """A tracker that records nothing, for library use without MLflow."""

    def log_params(self, params: dict[str, str]) -> None:
        """Record nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record nothing."""


@dataclass
class TrainResult:
    """What a training run produced."""

    model_dir: Path
    # The last epoch's validation metrics: the gate protocol's after backbone fine-tuning, every
    # protocol's after a cached-features-only run. `components.evaluate.evaluate_encoder` gives all.
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    device: str = "cpu"
    resumed_from_epoch: int | None = None
    sku_ids: list[str] = field(default_factory=list)
    # Under torchrun: this process's rank and how many trained; only rank 0 saved the model.
    rank: int = 0
    world_size: int = 1


@dataclass
class TrainingSetup:
    """What a fine-tuning run starts from: its images and labels, a fresh encoder, head and optimiser."""

    rows: pd.DataFrame  # the training split's photos, then the catalogue images
    sku_ids: list[str]  # label i is sku_ids[i]
    labels: np.ndarray  # one label per row
    catalogue_rows: np.ndarray  # positions of the catalogue images in ``rows``
    encoder: Encoder
    preprocess: Preprocess
    head: MarginHead
    optimizer: torch.optim.Optimizer

    @property
    def paths(self) -> list[str]:
        """The image path of every row."""
        return list(self.rows["image_path"])


def training_setup(params: Params, manifest: pd.DataFrame, device: torch.device) -> TrainingSetup:
    """The rows, labels, encoder, margin head and optimiser that :func:`train_encoder` starts from.

    Draws the encoder's and head's initial weights from torch's global generator, so seed it first.
    Public so benchmarks time the exact objects training uses.
    """
    cfg = params.train
    rows = pd.concat(
        [select(manifest, split=params.data.train_split, role="query"), select(manifest, role="catalogue")]
    ).reset_index(drop=True)
    sku_ids = sorted(rows["sku_id"].unique())
    if len(sku_ids) < 2:
        raise ValueError(f"training needs at least 2 SKUs, got {len(sku_ids)}")
    labels = rows["sku_id"].map({s: i for i, s in enumerate(sku_ids)}).to_numpy()
    encoder, preprocess = build_encoder(params.model)
    if params.model.backbone == "hf-clip" and cfg.augment.image_size not in (None, preprocess.image_size):
        # Refused here, before the feature cache is computed, not when the unfrozen stage starts.
        raise ValueError(
            f"train.augment.image_size={cfg.augment.image_size}: a CLIP vision tower takes only its own input size "
            f"({preprocess.image_size} px); set train.augment.image_size to null"
        )
    # The encoder comes channels-last (build_encoder): measured 61 against 94 ms/image for a
    # Lite0 training step on the CPU; CropTraining sends its crops in that layout too.
    encoder.to(device)
    head = margin_head(encoder.embed_dim, len(sku_ids), cfg).to(device)
    return TrainingSetup(
        rows,
        sku_ids,
        labels,
        np.flatnonzero(rows["role"].to_numpy() == "catalogue"),
        encoder,
        preprocess,
        head,
        training_optimizer(encoder, head, cfg.schedule),
    )


def training_optimizer(encoder: Encoder, head: MarginHead, schedule: ScheduleParams) -> torch.optim.AdamW:
    """AdamW over the projection and head at ``schedule.lr`` and the backbone at ``schedule.backbone_lr``."""
    # A Partial FC head updates its own weight (MarginHead.sparse_step): AdamW would move every row.
    head_parameters = [] if head.partial else list(head.parameters())
    return torch.optim.AdamW(
        [
            {"params": list(encoder.projection.parameters()) + head_parameters, "lr": schedule.lr},
            {"params": list(encoder.backbone.parameters()), "lr": schedule.backbone_lr},
        ],
        weight_decay=schedule.weight_decay,
    )


@dataclass
class _Run:
    """A training run in progress: its setup, where it stands, and the stages built so far."""

    params: Params
    setup: TrainingSetup
    device: torch.device
    eval_sets: ProtocolSets
    checkpoint_folder: Path
    parallel: DataParallel = ALONE
    start_epoch: int = 0
    resumed: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    averaged: AveragedModel | None = None
    cached: CachedFeatures | None = None
    crops: CropTraining | None = None

    @property
    def train(self) -> TrainParams:
        return self.params.train

    def weight_average(self) -> AveragedModel:
        """A fresh moving average of the encoder's weights."""
        # use_buffers: BatchNorm statistics are averaged too, for runs that let them move.
        return AveragedModel(
            self.setup.encoder, multi_avg_fn=get_ema_multi_avg_fn(self.train.schedule.ema_decay), use_buffers=True
        )

    def crop_training(self) -> CropTraining:
        """The crop stage, built at the first epoch that needs it (also after a resume): decoding is paid once."""
        self.crops = self.crops or CropTraining(
            self.setup.preprocess,
            self.setup.paths,
            self.setup.catalogue_rows,
            self.train,
            self.params.evaluate.batch_size,
            self.device,
        )
        return self.crops

    @property
    def trained(self) -> Encoder:
        """What is evaluated and saved: the weight average once there is one."""
        return self.averaged.module if self.averaged is not None else self.setup.encoder


def _resume(run: _Run) -> None:
    """Continue from the run's newest checkpoint, when resuming is on and there is one."""
    setup = run.setup
    loaded = run.train.io.resume and load_latest_checkpoint(
        run.checkpoint_folder, setup.encoder, setup.head, setup.optimizer
    )
    if not loaded:
        return
    run.resumed, run.history, averaged_state = loaded
    run.start_epoch = run.resumed + 1
    if averaged_state is not None:
        run.averaged = run.weight_average()
        run.averaged.load_state_dict(averaged_state)


def _start_frozen_stage(run: _Run, data_version: str | None, progress: bool) -> None:
    """Cache the frozen stage's features (or read them back) and start the head at each SKU's mean."""
    cfg, setup = run.train, run.setup
    if run.start_epoch >= cfg.schedule.frozen_epochs:
        return
    if cfg.schedule.frozen_stage == "cached":
        # Backbone features of every image, plus augmented views of the training images,
        # computed once (or read from disk) so the head trains in seconds per epoch.
        sets = run.eval_sets
        eval_paths = sorted(set(sets.queries["image_path"]).union(*(g["image_path"] for g in sets.galleries.values())))
        if not run.parallel.is_main:
            run.parallel.barrier()  # rank 0 computes the cache; the others read it back
        run.cached = cache_features(
            setup.encoder,
            setup.preprocess,
            setup.paths,
            setup.catalogue_rows,
            eval_paths,
            run.params.model,
            cfg,
            run.params.evaluate.batch_size,
            run.device,
            data_version,
            progress,
        )
        if run.parallel.is_main:
            run.parallel.barrier()
        if run.resumed is None:
            init_head_from_cached(setup.encoder, setup.head, run.cached, setup.labels, run.device)
    elif run.resumed is None:
        embeddings = run.crop_training().embed_rows(setup.encoder, np.arange(len(setup.labels)))
        setup.head.init_from_prototypes(sku_means(embeddings, setup.labels, len(setup.sku_ids)))


def _train_one_epoch(
    run: _Run, epoch: int, rng: np.random.Generator, catalogue_labels: torch.Tensor, progress: bool
) -> list[float]:
    """One epoch of whichever stage ``epoch`` falls in; returns the per-step losses."""
    cfg, setup = run.train, run.setup
    frozen = epoch < cfg.schedule.frozen_epochs
    set_trainable(
        setup.encoder, cfg.schedule.unfreeze_blocks, backbone_trainable=not frozen and cfg.schedule.backbone_lr > 0
    )
    if not frozen and cfg.schedule.ema_decay > 0 and run.averaged is None:
        run.averaged = run.weight_average()  # starts from the weights the frozen stage ended with
    if frozen and run.cached is not None:
        batches = pk_batches(
            setup.labels, max(2, cfg.sampler.batch_size // cfg.sampler.images_per_sku), cfg.sampler.images_per_sku, rng
        )
        return frozen_epoch(
            setup.encoder,
            setup.head,
            setup.optimizer,
            run.cached,
            setup.labels,
            catalogue_labels,
            cfg,
            batches,
            rng,
            run.device,
            run.parallel,
        )
    return run.crop_training().run_epoch(
        epoch,
        setup.encoder,
        setup.head,
        setup.optimizer,
        setup.labels,
        catalogue_labels,
        rng,
        progress,
        backbone_frozen=frozen,
        averaged=run.averaged,
        parallel=run.parallel,
    )


def _validate(run: _Run, on_cached_features: bool) -> dict[str, dict[str, float]]:
    """Validation metrics of the model as it stands after an epoch."""
    evaluate = run.params.evaluate
    trained = run.trained
    trained.eval()
    if on_cached_features:
        with torch.no_grad():
            vectors = embed_cached(run.setup.encoder, run.cached.evaluation, run.device)
        sets = run.eval_sets
        # Cached features hold one centred view per image: queries get no flip or zoom
        # views here, so these frozen-epoch figures run slightly below the saved model's.
        embeddings_by_path = dict(zip(run.cached.evaluation_paths, vectors.float().cpu().numpy()))
        query_embeddings = None
    else:
        # Embedding every gallery image costs minutes on a CPU (the nn gallery is the training
        # set), so epochs without cached features measure the gate's protocol only, the last one
        # too: the saved model's full evaluation is the next step of every pipeline.
        sets, gate = run.eval_sets, evaluate.gate_protocol
        if gate in sets.galleries:
            sets = ProtocolSets(sets.queries, {gate: sets.galleries[gate]}, sets.leaks)
        embeddings_by_path, query_embeddings = embed_protocol_sets(
            trained, run.setup.preprocess, sets, evaluate.batch_size, run.device
        )
    return evaluate_embeddings(embeddings_by_path, sets, evaluate, query_embeddings=query_embeddings)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_encoder(
    params: Params,
    manifest: pd.DataFrame,
    tracker: Tracker | None = None,
    data_version: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune an encoder on a manifest's training split and catalogue images.

    Args:
        params: the resolved params tree (``model``, ``train``, ``data``, ``evaluate`` used).
        manifest: the dataset manifest (see ``components.data``).
        tracker: receives params and per-epoch metrics (loss, validation top-k, delta similarity).
        data_version: the DVC hash of the data, recorded with the model.
        progress: show progress bars.

    Returns:
        A :class:`TrainResult`; the encoder is saved to ``params.train.io.output_dir``.

    Started by ``torchrun``, each process trains its share of every batch
    (:mod:`components.training.distributed`), and only rank 0 validates, tracks, checkpoints and
    saves; the process group is left on return.
    """
    parallel, device = from_environment(resolve_device(params.train.device))
    try:
        return _train(params, manifest, tracker, data_version, progress, parallel, device)
    finally:
        leave()


def _train(
    params: Params,
    manifest: pd.DataFrame,
    tracker: Tracker | None,
    data_version: str | None,
    progress: bool,
    parallel: DataParallel,
    device: torch.device,
) -> TrainResult:
    cfg, started = params.train, time.perf_counter()
    tracker = (tracker or NullTracker()) if parallel.is_main else NullTracker()
    progress = progress and parallel.is_main
    _seed(cfg.seed)
    setup = training_setup(params, manifest, device)
    parallel.broadcast_from_main([setup.encoder, setup.head])
    run = _Run(
        params,
        setup,
        device,
        protocol_sets(manifest, params.data.query_split, params.data.train_split, params.evaluate.leak_max_distance),
        Path(cfg.io.checkpoint_dir) / run_fingerprint(params, data_version),
        parallel,
    )
    _resume(run)
    tracker.log_params(
        {
            "train.device_resolved": device.type,
            "train.skus": str(len(setup.sku_ids)),
            "train.images": str(len(setup.rows)),
            "data.version": data_version or "unknown",
        }
    )
    _start_frozen_stage(run, data_version, progress)

    rng = np.random.default_rng(cfg.seed + run.start_epoch)
    catalogue_labels = torch.from_numpy(setup.labels[setup.catalogue_rows]).to(device)
    metrics: dict[str, dict[str, float]] = run.history[-1].get("_metrics", {}) if run.history else {}
    for epoch in range(run.start_epoch, cfg.schedule.epochs):
        on_cached_features = epoch < cfg.schedule.frozen_epochs and run.cached is not None
        losses = _train_one_epoch(run, epoch, rng, catalogue_labels, progress)
        record: dict[str, Any] = {
            "epoch": epoch,
            "train.loss": float(np.mean(losses)),
            "train.frozen_backbone": float(epoch < cfg.schedule.frozen_epochs),
        }
        due = (epoch + 1) % cfg.schedule.eval_every_epochs == 0 or epoch + 1 == cfg.schedule.epochs
        if due and parallel.is_main:
            metrics = _validate(run, on_cached_features)
            record.update({f"val.{k}": v for k, v in flatten_metrics(metrics).items()})
            record["_metrics"] = metrics
        _record_epoch(run, epoch, record, tracker)
    if not parallel.is_main:
        parallel.barrier()  # until rank 0 has saved the model
        return _describe(run, metrics, Path(cfg.io.output_dir), time.perf_counter() - started)
    result = _save_model(run, metrics, data_version, time.perf_counter() - started)
    parallel.barrier()
    return result


def _record_epoch(run: _Run, epoch: int, record: dict[str, Any], tracker: Tracker) -> None:
    """Keep an epoch's record: in the history, in a checkpoint, with the tracker and in the log."""
    setup, epochs = run.setup, run.train.schedule.epochs
    run.history.append(record)
    if not run.parallel.is_main:
        return
    # Checkpoint first: a tracker that fails (a network hiccup) must not cost the epoch.
    save_checkpoint(run.checkpoint_folder, epoch, setup.encoder, setup.head, setup.optimizer, run.history, run.averaged)
    tracker.log_metrics({k: v for k, v in record.items() if not k.startswith("_") and k != "epoch"}, step=epoch)
    scores = " ".join(f"{k}={v:.3f}" for k, v in record.items() if k.endswith(("top1", "top3")))
    LOGGER.info("epoch %d/%d loss %.4f %s", epoch + 1, epochs, record["train.loss"], scores)


def _save_model(
    run: _Run, metrics: dict[str, dict[str, float]], data_version: str | None, wall_time_s: float
) -> TrainResult:
    """Save the trained encoder with what it was trained on, and describe the run."""
    trained, cfg = run.trained, run.train
    trained.eval()
    model_dir = save_encoder(
        trained,
        run.setup.preprocess,
        run.params.model,
        cfg.io.output_dir,
        extra={
            "train": cfg.model_dump(),
            "data_version": data_version,
            "sku_ids": run.setup.sku_ids,
            "metrics": metrics,
            "run_fingerprint": run_fingerprint(run.params, data_version),
        },
    )
    return _describe(run, metrics, model_dir, wall_time_s)


def _describe(run: _Run, metrics: dict[str, dict[str, float]], model_dir: Path, wall_time_s: float) -> TrainResult:
    return TrainResult(
        model_dir=model_dir,
        metrics=metrics,
        history=[{k: v for k, v in h.items() if not k.startswith("_")} for h in run.history],
        wall_time_s=wall_time_s,
        device=run.device.type,
        resumed_from_epoch=run.resumed,
        sku_ids=run.setup.sku_ids,
        rank=run.parallel.rank,
        world_size=run.parallel.world_size,
    )
