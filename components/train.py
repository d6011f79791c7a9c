"""Metric-learning fine-tuning of an encoder, with per-epoch checkpoints and resume.

The objective is a margin softmax over SKUs (ArcFace, sub-center ArcFace or CosFace). A SKU's
catalogue images and its natural photos carry the same label, so they are pulled together:
the catalogue image becomes a positive of every shelf photo of its SKU.

The schedule has two stages:

1. ``frozen_epochs``: the backbone is frozen, its features are computed once (original and
   mirrored view) and cached, and only the projection and the margin head train: seconds per
   epoch even on a CPU.
2. the remaining epochs: the last ``unfreeze_blocks`` backbone stages train too, at
   ``backbone_lr``, on augmented images drawn P x K (P SKUs, K images each).

Every epoch writes a checkpoint (safetensors + JSON, never pickles) under a folder keyed by a
fingerprint of the params and data version, so a crashed run resumes where it stopped and a
run with other params never picks up a foreign checkpoint. The experiment tracker is passed
in, so this module needs only torch and numpy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from components.config import Params, TrainParams
from components.data import load_rgb, select
from components.evaluate import (
    ProtocolSets,
    embed_protocol_sets,
    evaluate_embeddings,
    flatten_metrics,
    protocol_sets,
)
from components.model import (
    Encoder,
    Preprocess,
    autocast_for,
    build_encoder,
    embed_images,
    resolve_device,
    save_encoder,
)

LOGGER = logging.getLogger(__name__)


class Tracker(Protocol):
    """What training needs from an experiment tracker (MLflow's adapter lives in registry)."""

    def log_params(self, params: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullTracker:
    """A tracker that records nothing, for library use without MLflow."""

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


class MarginHead(nn.Module):
    """Cosine classifier with an additive angular (ArcFace) or cosine (CosFace) margin.

    With ``subcenters > 1`` each SKU has several prototypes and the closest one counts
    (sub-center ArcFace), which tolerates SKUs whose photos look unlike each other.
    """

    def __init__(self, embed_dim: int, n_classes: int, loss: str, margin: float, scale: float, subcenters: int = 1):
        super().__init__()
        self.loss, self.margin, self.scale = loss, margin, scale
        self.subcenters = subcenters if loss == "subcenter-arcface" else 1
        self.weight = nn.Parameter(torch.randn(n_classes * self.subcenters, embed_dim) * 0.01)
        self.n_classes = n_classes

    def init_from_prototypes(self, prototypes: torch.Tensor) -> None:
        """Start every (sub)center at its SKU's mean embedding: catalogue and photos as anchors."""
        with torch.no_grad():
            repeated = prototypes.repeat_interleave(self.subcenters, dim=0)
            noise = torch.randn_like(repeated) * 0.01 if self.subcenters > 1 else 0.0
            self.weight.copy_(F.normalize(repeated + noise, dim=-1))

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T
        return cos.view(len(embeddings), self.n_classes, self.subcenters).amax(dim=-1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosines(embeddings.float()).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, labels[:, None])
        if self.loss == "cosface":
            adjusted = target - self.margin
        else:
            theta = torch.acos(target)
            # Past pi - m the angular margin would wrap around; fall back to CosFace there.
            adjusted = torch.where(theta + self.margin < math.pi, torch.cos(theta + self.margin),
                                   target - self.margin * math.sin(self.margin))
        logits = cos.scatter(1, labels[:, None], adjusted) * self.scale
        return F.cross_entropy(logits, labels)


# Fine-tuning crops are cut from images stored this much larger than the crop, so a crop of
# the whole image still loses nothing to upsampling.
STORE_MARGIN = 1.15
# Part of every cached-features fingerprint: bump it when ShelfAugment changes, so features
# cached with the old augmentation are not reused.
AUGMENT_VERSION = 2


# The augmentation crop's area range when a caller gives none: train.crop_area's default, one source.
DEFAULT_CROP_AREA = tuple(TrainParams.model_fields["crop_area"].default)


class ShelfAugment:
    """Turn clean images into shelf-like photos: crops, flips, tilt, lighting, colour casts, blur.

    Works on uint8 CHW tensors (what :meth:`Preprocess.resize_crop` returns), so the fine-tuning
    stage decodes every JPEG once and augments in torch; a PIL image is accepted too (decoded at
    ``STORE_MARGIN`` times ``out_size``). Returns the normalised ``out_size`` square input.
    """

    def __init__(self, preprocess: Preprocess, rng: random.Random, out_size: int | None = None,
                 crop_area: tuple[float, float] | list[float] = DEFAULT_CROP_AREA, colour_cast: float = 0.0,
                 erase: float = 0.0) -> None:
        self.preprocess, self.rng, self.crop_area, self.colour_cast = preprocess, rng, tuple(crop_area), colour_cast
        self.erase = erase
        self.out_size = out_size or preprocess.image_size
        self.store = replace(preprocess, image_size=round(self.out_size * STORE_MARGIN))

    def __call__(self, image) -> torch.Tensor:
        pixels = image if torch.is_tensor(image) else self.store.resize_crop(image)
        rng = self.rng
        height, width = pixels.shape[-2:]
        # Random-resized crop of `crop_area` of the image (train.crop_area), aspect 3:4 to 4:3: a
        # product partly in frame.
        area = height * width * rng.uniform(*self.crop_area)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_w, crop_h = min(width, round(math.sqrt(area * aspect))), min(height, round(math.sqrt(area / aspect)))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        crop = pixels[None, :, top:top + crop_h, left:left + crop_w].float() / 255.0
        crop = F.interpolate(crop, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False,
                             antialias=True)
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        if rng.random() < 0.3:
            crop = _rotate(crop, math.radians(rng.uniform(-15, 15)))
        crop = crop * rng.uniform(0.7, 1.3)  # brightness
        if self.colour_cast:
            # A white-balance shift (store light, phone camera): each channel's gain moves on its
            # own by up to train.colour_cast. Drawn only when on, so a run without it keeps its
            # random stream and its figures.
            gains = [rng.uniform(1 - self.colour_cast, 1 + self.colour_cast) for _ in range(3)]
            crop = crop * torch.tensor(gains, dtype=crop.dtype)[None, :, None, None]
        mean = crop.mean()
        crop = (crop - mean) * rng.uniform(0.7, 1.3) + mean  # contrast
        grey = crop.mean(1, keepdim=True)
        crop = (crop - grey) * rng.uniform(0.7, 1.3) + grey  # saturation; hue is kept: it tells flavours apart
        if rng.random() < 0.2:
            crop = _gaussian_blur(crop, rng.uniform(0.5, 1.5))
        # Drawn only when on, like the cast, so a run without it keeps its random stream.
        if self.erase and rng.random() < self.erase:
            crop = _erase_rectangle(crop, rng)
        return self.preprocess.normalize(crop.clamp(0, 1)[0])


def _erase_rectangle(batch: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Hide a rectangle of 2-33% of the image, aspect 1:3.3 to 3.3:1, under one random colour.

    Random Erasing (Zhong et al., AAAI 2020) with its published area and aspect ranges: on a
    shelf, a hand, a price tag or the next pack hides part of the product, and the model must
    match on what is left. A solid colour, not noise, because those occluders are solid.
    """
    height, width = batch.shape[-2:]
    for _ in range(10):  # a draw that does not fit is drawn again, as torchvision's RandomErasing does
        area = height * width * rng.uniform(0.02, 0.33)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        erase_h, erase_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < erase_h < height and 0 < erase_w < width:
            top, left = rng.randint(0, height - erase_h), rng.randint(0, width - erase_w)
            colour = torch.tensor([rng.random() for _ in range(3)], dtype=batch.dtype)[None, :, None, None]
            batch = batch.clone()
            batch[..., top:top + erase_h, left:left + erase_w] = colour
            return batch
    return batch


def _rotate(batch: torch.Tensor, angle: float) -> torch.Tensor:
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=batch.dtype)[None]
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gaussian_blur(batch: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=batch.dtype)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(batch.shape[1], 1, 1)
    channels = batch.shape[1]
    blurred = F.conv2d(F.pad(batch, (radius, radius, 0, 0), mode="reflect"), kernel[:, :, None, :], groups=channels)
    return F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"), kernel[:, :, :, None], groups=channels)


def pk_batches(labels: np.ndarray, skus_per_batch: int, images_per_sku: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of P x K batches: P SKUs, K images each (with replacement for small SKUs)."""
    by_label = {label: np.flatnonzero(labels == label) for label in np.unique(labels)}
    n_batches = max(1, len(labels) // (skus_per_batch * images_per_sku))
    batches = []
    for _ in range(n_batches):
        chosen = rng.choice(list(by_label), size=min(skus_per_batch, len(by_label)), replace=False)
        batch = [rng.choice(by_label[c], size=images_per_sku, replace=len(by_label[c]) < images_per_sku) for c in chosen]
        batches.append(np.concatenate(batch))
    return batches


def with_catalogue_images(batches: list[np.ndarray], labels: np.ndarray, catalogue_rows: np.ndarray) -> list[np.ndarray]:
    """Each batch plus the catalogue image of every SKU in it (SKUs without one are left as is).

    Trained with gradient on augmented crops, the studio shot and the shelf photos of a SKU
    meet in the backbone itself, not only through the frozen anchors.
    """
    catalogue_row_of = dict(zip(labels[catalogue_rows].tolist(), catalogue_rows.tolist()))
    return [np.concatenate([batch, np.array([catalogue_row_of[label] for label in np.unique(labels[batch])
                                             if label in catalogue_row_of], dtype=batch.dtype)])
            for batch in batches]


def catalogue_anchor_loss(embeddings: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                          anchor_labels: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """Margin softmax of photos against embedded catalogue images (the anchors) of many SKUs.

    The ``catalogue`` protocol ranks SKUs by similarity to their catalogue images, so this loss
    trains exactly that ranking: a photo must be closer to its own SKU's catalogue image (the
    best one, when a SKU has several) than to any other anchor SKU's, by ``margin``. Photos of
    SKUs without an anchor are left out. Its size is photos x anchor SKUs, whatever the number
    of classes, so the anchors can be a sample of a large catalogue (:class:`CatalogueAnchors`).
    """
    similarity = embeddings.float() @ anchors.float().T
    anchor_skus, column_of_anchor = torch.unique(anchor_labels, sorted=True, return_inverse=True)
    per_sku = torch.full((len(embeddings), len(anchor_skus)), -1.0, device=embeddings.device, dtype=similarity.dtype)
    per_sku = per_sku.scatter_reduce(1, column_of_anchor.expand(len(embeddings), -1), similarity, reduce="amax",
                                     include_self=False)
    # Column of each photo's own SKU among the anchor SKUs, where it has one.
    column = torch.searchsorted(anchor_skus, labels).clamp(max=len(anchor_skus) - 1)
    keep = anchor_skus[column] == labels
    if not keep.any():
        return embeddings.sum() * 0.0
    per_sku, column = per_sku[keep], column[keep]
    target = per_sku.gather(1, column[:, None]) - margin
    return F.cross_entropy(per_sku.scatter(1, column[:, None], target) * scale, column)


class CatalogueAnchors:
    """Which catalogue images a step's anchor loss ranks its photos against.

    All of them while the catalogue has at most ``sample`` images. Beyond that, those of the
    step's own SKUs (the positives) plus a uniform draw of others (the negatives) up to
    ``sample``: a sampled softmax, so that a step costs ``sample`` anchor embeddings, not the
    catalogue's size (at 10,000 SKUs all anchors were 70% of a head-stage batch).
    """

    def __init__(self, labels: np.ndarray, sample: int | None) -> None:
        self.labels, self.sample = labels, sample
        self._every_position = np.arange(len(labels))  # what every step of a whole catalogue uses
        # Sorted once, so finding a step's own SKUs costs a binary search, not a catalogue scan.
        self._order = np.argsort(labels, kind="stable")
        self._sorted_labels = labels[self._order]

    @property
    def whole(self) -> bool:
        """Whether every step uses the whole catalogue."""
        return self.sample is None or len(self.labels) <= self.sample

    def positions(self, skus: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sorted catalogue positions of the anchors for a step whose photos show ``skus``.

        Draws from ``rng`` only when sampling, so a catalogue used whole trains exactly as it did.
        """
        if self.whole:
            return self._every_position
        skus = np.unique(skus)
        starts = np.searchsorted(self._sorted_labels, skus, side="left")
        ends = np.searchsorted(self._sorted_labels, skus, side="right")
        own = self._order[np.concatenate([np.arange(start, end) for start, end in zip(starts, ends)])]
        others = max(0, self.sample - len(own))
        # Distinct draws, as many more as there are positives, so that `others` are left once
        # the positives among them are dropped: exactly `sample` anchors.
        drawn = rng.choice(len(self.labels), size=others + len(own), replace=False) if others else own[:0]
        return np.union1d(own, drawn[~np.isin(drawn, own)][:others])

    @staticmethod
    def labels_at(catalogue_labels: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """The SKU labels of the anchors at ``positions``, on the device ``catalogue_labels`` live on."""
        return catalogue_labels[torch.from_numpy(positions).to(catalogue_labels.device)]


# Rows of cached features embedded at a time (320 MiB of 1280-d float32): bounds memory on
# large sets, and data sets smaller than one chunk embed in one call, as they always did.
FEATURE_CHUNK_ROWS = 65536


@dataclass
class CachedFeatures:
    """Backbone features of the frozen stage, memory-mapped from ``.npy`` files.

    ``train_views``: ``(views, n_train, dim)``; view 0 is the image as is, view 1 mirrored, the
    rest shelf-augmented. ``catalogue_views``: ``(views, n_catalogue, dim)``, extra augmented
    views of the (few) catalogue images, view 0 as is. ``evaluation``: one row per evaluation
    image, in ``evaluation_paths`` order. Memory maps, because at a million training images two
    1280-d float32 views are 10 GiB: batches read the rows they draw, the OS caches what fits.
    """

    train_views: np.ndarray
    catalogue_views: np.ndarray
    evaluation: np.ndarray
    evaluation_paths: list[str]

    @classmethod
    def open(cls, folder: Path, evaluation_paths: list[str]) -> CachedFeatures:
        """Memory-map the arrays that :func:`cache_features` wrote to ``folder``."""
        def mapped(name: str) -> np.ndarray:
            return np.load(folder / f"{name}.npy", mmap_mode="r")

        return cls(mapped("train_views"), mapped("catalogue_views"), mapped("evaluation"), evaluation_paths)


def embed_cached(encoder: Encoder, features: np.ndarray, device: torch.device,
                 chunk_rows: int = FEATURE_CHUNK_ROWS) -> torch.Tensor:
    """Embeddings of cached backbone features (rows of a possibly larger-than-RAM memory map), chunk by chunk."""
    # np.array copies a chunk out of the read-only map, which torch.from_numpy cannot share.
    return torch.cat([encoder.embed_features(torch.from_numpy(np.array(features[start:start + chunk_rows])).to(device))
                      for start in range(0, max(len(features), 1), chunk_rows)])


def _features_fingerprint(params: Params, data_version: str | None, paths: list[str]) -> str:
    shaping = {"model": params.model.model_dump(), "views": params.train.cached_views,
               "catalogue_views": params.train.catalogue_views, "augment": params.train.augment,
               "crop_area": params.train.crop_area, "colour_cast": params.train.colour_cast,
               "erase": params.train.erase,
               "seed": params.train.seed, "augment_version": AUGMENT_VERSION, "data_version": data_version,
               "paths": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def cache_features(encoder: Encoder, preprocess: Preprocess, train_paths: list[str], catalogue_rows: np.ndarray,
                   evaluation_paths: list[str], params: Params, device: torch.device, data_version: str | None,
                   progress: bool = False) -> CachedFeatures:
    """Compute (or read back) the frozen stage's features.

    They depend only on the backbone, the images and the view settings, so they are stored
    under ``train.checkpoint_dir`` and reused by any run that differs only in how the head
    trains (loss, margin, learning rate, epochs): the expensive part is paid once. Each array is
    written batch by batch into a memory-mapped ``.npy`` file (numpy's format, no pickles) in a
    ``.partial`` folder of this process's own that is renamed only when complete, so a crash
    never leaves a cache that looks whole, and memory holds one batch, not the set. Runs sharing
    the directory never touch each other's partial folders; those of processes that have exited
    are removed (:func:`_sweep_abandoned_partials`).
    """
    from numpy.lib.format import open_memmap

    cfg = params.train
    all_paths = train_paths + evaluation_paths
    folder = Path(cfg.checkpoint_dir) / f"features-{_features_fingerprint(params, data_version, all_paths)}"
    if folder.is_dir():
        LOGGER.info("reusing cached backbone features %s", folder)
        return CachedFeatures.open(folder, evaluation_paths)
    partial = _partial_folder(folder)
    _sweep_abandoned_partials(folder.parent)
    shutil.rmtree(partial, ignore_errors=True)  # this process's own, left by a call that failed
    partial.mkdir(parents=True)
    dim = encoder.feature_dim

    def array(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return open_memmap(partial / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)

    def features(paths: list[str], transform, out: np.ndarray) -> None:
        embed_images(encoder, transform, paths, params.evaluate.batch_size, device, features_only=True,
                     progress=progress, out=out)

    rng = random.Random(cfg.seed)
    shelf = ShelfAugment(preprocess, rng, crop_area=cfg.crop_area, colour_cast=cfg.colour_cast, erase=cfg.erase)
    view_transforms = [preprocess, _Mirrored(preprocess)] + [shelf] * max(0, cfg.cached_views - 2)
    train_views = array("train_views", (cfg.cached_views, len(train_paths), dim))
    for view, transform in enumerate(view_transforms[:cfg.cached_views]):
        features(train_paths, transform, train_views[view])
    catalogue_paths = [train_paths[i] for i in catalogue_rows]
    catalogue_views = array("catalogue_views", (cfg.catalogue_views if catalogue_paths else 1, len(catalogue_paths), dim))
    if catalogue_paths:
        catalogue_views[0] = train_views[0, catalogue_rows]
        for view in range(1, cfg.catalogue_views):
            features(catalogue_paths, shelf, catalogue_views[view])
    # Most evaluation images (the nn gallery, the catalogue) are training images whose view 0,
    # the same preprocessing, is already computed: copy those rows and embed only the rest (the
    # queries). On Grocery Store that skips 2,721 of 3,017 forward passes.
    evaluation = array("evaluation", (len(evaluation_paths), dim))
    train_position = {path: position for position, path in enumerate(train_paths)}
    known = [row for row, path in enumerate(evaluation_paths) if path in train_position]
    unknown = [row for row, path in enumerate(evaluation_paths) if path not in train_position]
    for start in range(0, len(known), FEATURE_CHUNK_ROWS):  # chunks bound memory, as in embed_cached
        rows = known[start:start + FEATURE_CHUNK_ROWS]
        evaluation[rows] = train_views[0, [train_position[evaluation_paths[row]] for row in rows]]
    for start in range(0, len(unknown), FEATURE_CHUNK_ROWS):
        rows = unknown[start:start + FEATURE_CHUNK_ROWS]
        evaluation[rows] = embed_images(encoder, preprocess, [evaluation_paths[row] for row in rows],
                                        params.evaluate.batch_size, device, features_only=True, progress=progress)
    for written in (train_views, catalogue_views, evaluation):
        written.flush()
    del train_views, catalogue_views, evaluation  # close the maps before the folder moves
    _publish(partial, folder)
    return CachedFeatures.open(folder, evaluation_paths)


# "<folder>.partial-<host>-<pid>": which process writes it, so a sweep can tell abandoned from busy.
PARTIAL_MARK = ".partial-"


def _partial_folder(folder: Path) -> Path:
    """Where this process writes ``folder`` before it is complete."""
    return folder.with_name(f"{folder.name}{PARTIAL_MARK}{socket.gethostname()}-{os.getpid()}")


def _sweep_abandoned_partials(directory: Path) -> None:
    """Remove partial feature caches in ``directory`` whose writer, a process of this host, has exited.

    The directory may be shared (several runs, or several hosts on a network disk): a partial
    folder of a live process, or of another host, whose processes cannot be checked from here,
    is left alone.
    """
    host = socket.gethostname()
    for candidate in directory.glob(f"features-*{PARTIAL_MARK}*"):
        writer_host, _, pid = candidate.name.split(PARTIAL_MARK, 1)[1].rpartition("-")
        if writer_host == host and pid.isdigit() and not _process_alive(int(pid)):
            LOGGER.info("removing %s, left by a run that stopped while caching", candidate)
            shutil.rmtree(candidate, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, run by another user
    return True


def _publish(partial: Path, folder: Path) -> None:
    """Rename a completed ``partial`` folder to ``folder``, unless another run published it first.

    Caches with the same name hold the same features, so the first one published is kept.
    """
    try:
        partial.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
        LOGGER.info("another run cached %s first; using it", folder)
        shutil.rmtree(partial, ignore_errors=True)


class _Mirrored:
    """Preprocessing of the horizontally mirrored image."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image) -> torch.Tensor:
        return self.preprocess(image).flip(-1)


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


def run_fingerprint(params: Params, data_version: str | None) -> str:
    """A short hash of everything that shapes a training run (checkpoint folder name)."""
    # Not hashed: how long to train (epochs), where files go, how often to evaluate, the device:
    # a run asked for more epochs continues the shorter run's checkpoints.
    # Nor how images are decoded: decoding is deterministic, so the cache and workers change only speed.
    not_shaping = {"resume", "device", "epochs", "output_dir", "checkpoint_dir", "eval_every_epochs",
                   "decoded_cache_mb", "loader_workers"}
    shaping = {"model": params.model.model_dump(), "train": params.train.model_dump(exclude=not_shaping),
               "data": params.data.model_dump(), "data_version": data_version}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def _save_checkpoint(folder: Path, epoch: int, encoder: Encoder, head: MarginHead, optimizer: torch.optim.Optimizer,
                     history: list[dict[str, float]], averaged: AveragedModel | None) -> None:
    from safetensors.torch import save_file

    target = folder / f"epoch-{epoch:04d}"
    partial = folder / f".epoch-{epoch:04d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    modules = {"encoder": encoder, "head": head, **({"averaged": averaged} if averaged is not None else {})}
    for name, module in modules.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                  str(partial / f"{name}.safetensors"))
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in opt_state["state"].items():
        for key, value in values.items():
            name = f"{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    save_file(tensors, str(partial / "optimizer.safetensors"))
    (partial / "state.json").write_text(json.dumps(
        {"epoch": epoch, "history": history, "param_groups": opt_state["param_groups"], "scalars": scalars}))
    # Rename last, so a crash mid-write never leaves a checkpoint that looks complete.
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    for old in sorted(folder.glob("epoch-*"))[:-2]:
        shutil.rmtree(old)


def _load_latest_checkpoint(folder: Path, encoder: Encoder, head: MarginHead, optimizer: torch.optim.Optimizer
                            ) -> tuple[int, list[dict[str, float]], dict[str, torch.Tensor] | None] | None:
    """Restore the newest checkpoint in place; returns its epoch, history and weight-average state."""
    from safetensors.torch import load_file

    checkpoints = sorted(folder.glob("epoch-*"))
    if not checkpoints:
        return None
    latest = checkpoints[-1]
    state = json.loads((latest / "state.json").read_text())
    encoder.load_state_dict(load_file(str(latest / "encoder.safetensors")))
    head.load_state_dict(load_file(str(latest / "head.safetensors")))
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for name, value in list(load_file(str(latest / "optimizer.safetensors")).items()) + list(state["scalars"].items()):
        param_id, key = name.split(".", 1)
        opt_state["state"].setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict(opt_state)
    averaged_file = latest / "averaged.safetensors"
    averaged_state = load_file(str(averaged_file)) if averaged_file.exists() else None
    LOGGER.info("resumed from checkpoint %s", latest)
    return int(state["epoch"]), state["history"], averaged_state


def _set_trainable(encoder: Encoder, unfreeze_blocks: int, backbone_trainable: bool) -> None:
    for parameter in encoder.backbone.parameters():
        parameter.requires_grad = False
    if backbone_trainable:
        stages = encoder.backbone.stages()
        for stage in stages if unfreeze_blocks < 0 else stages[len(stages) - unfreeze_blocks:]:
            for parameter in stage.parameters():
                parameter.requires_grad = True


def _frozen_epoch(encoder: Encoder, head: MarginHead, optimizer: torch.optim.Optimizer, cached: CachedFeatures,
                  labels: np.ndarray, catalogue_labels: torch.Tensor, params: Params, batches: list[np.ndarray],
                  rng: np.random.Generator, device: torch.device) -> list[float]:
    """One head-only epoch on cached backbone features (a random cached view per image).

    The catalogue anchors are a random cached view of each of the step's :class:`CatalogueAnchors`.
    """
    cfg = params.train
    encoder.train()
    encoder.backbone.eval()
    anchor_set = CatalogueAnchors(catalogue_labels.cpu().numpy(), cfg.anchor_sample)
    losses = []
    for batch in batches:
        with autocast_for(device):
            views = rng.integers(0, len(cached.train_views), len(batch))
            embeddings = encoder.embed_features(torch.from_numpy(cached.train_views[views, batch]).to(device))
            anchors = anchor_labels = None
            if cfg.catalogue_anchor_weight > 0 and len(catalogue_labels):
                positions = anchor_set.positions(labels[batch], rng)
                views = rng.integers(0, len(cached.catalogue_views), len(positions))
                anchors = encoder.embed_features(torch.from_numpy(cached.catalogue_views[views, positions]).to(device))
                anchor_labels = anchor_set.labels_at(catalogue_labels, positions)
        losses.append(_optimisation_step(head, optimizer, embeddings, torch.from_numpy(labels[batch]).to(device),
                                         anchors, anchor_labels, params))
    return losses


@torch.no_grad()
def init_head_from_cached(encoder: Encoder, head: MarginHead, cached: CachedFeatures, labels: np.ndarray,
                          device: torch.device) -> None:
    """Start the head's class weights at each SKU's mean embedding of its cached as-is views."""
    head.init_from_prototypes(_sku_means(embed_cached(encoder, cached.train_views[0], device), labels, head.n_classes))


def _sku_means(embeddings: torch.Tensor, labels: np.ndarray, n_skus: int) -> torch.Tensor:
    """Mean embedding of each SKU's images: the margin head's starting class weights."""
    return torch.stack([embeddings[torch.from_numpy(labels == i).to(embeddings.device)].mean(0) for i in range(n_skus)])


def _optimisation_step(head: MarginHead, optimizer: torch.optim.Optimizer, embeddings: torch.Tensor,
                       targets: torch.Tensor, anchors: torch.Tensor | None, anchor_labels: torch.Tensor | None,
                       params: Params) -> float:
    """The margin loss, plus the catalogue-anchor loss when anchors (and their SKU labels) are given; one optimiser step."""
    cfg = params.train
    loss = head(embeddings, targets)
    if anchors is not None:
        loss = loss + cfg.catalogue_anchor_weight * catalogue_anchor_loss(
            embeddings, targets, anchors, anchor_labels, cfg.margin, cfg.scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class DecodedImages(torch.utils.data.Dataset):
    """The training images as uint8 CHW tensors, decoded at ``store``'s size for the crop stage.

    The first images, up to ``cache_bytes`` of them (3 x size x size bytes each: 143 KiB at the
    221 px store of 192 px crops), are decoded once and kept; the rest are decoded again each
    time they are drawn. All 3k Grocery Store images fit in 0.4 GiB, but a million would need
    136 GiB, so the budget bounds memory for any training set. Decoding is deterministic: what
    a batch holds depends neither on the budget nor on which process decodes it.
    """

    def __init__(self, paths: list[str], store: Preprocess, cache_bytes: int) -> None:
        self.paths, self.store = list(paths), store
        size = store.image_size
        self.cached_count = min(len(self.paths), cache_bytes // (3 * size * size))
        # Filled in place: stacking a list of decoded images would hold two copies at the peak.
        self.cache = torch.empty((self.cached_count, 3, size, size), dtype=torch.uint8)
        for row in range(self.cached_count):
            self.cache[row] = self.decode(row)

    def decode(self, row: int) -> torch.Tensor:
        """Read and decode one image (not from the cache)."""
        return self.store.resize_crop(load_rgb(self.paths[row]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.cache[row] if row < self.cached_count else self.decode(row)

    def batch(self, rows: np.ndarray) -> torch.Tensor:
        """The images of ``rows`` as one uint8 NCHW tensor."""
        return torch.stack([self[int(row)] for row in rows])

    def batches(self, row_batches: list[np.ndarray], workers: int) -> Iterable[torch.Tensor]:
        """Iterate over the uint8 batches of ``row_batches``, in order.

        With images beyond the cache, ``workers`` processes decode the next batches while the
        model trains on this one; with everything cached there is nothing for them to do.
        """
        if workers == 0 or self.cached_count == len(self):
            return (self.batch(rows) for rows in row_batches)
        return torch.utils.data.DataLoader(self, batch_sampler=[[int(row) for row in rows] for rows in row_batches],
                                           num_workers=workers, collate_fn=torch.stack)


class _CropTraining:
    """Epochs on live augmented crops of the training images.

    The unfrozen stage always runs here; the frozen epochs do too with ``frozen_stage: crops``
    (the backbone then only runs forward, and only the projection and head learn).

    - Images are decoded into uint8 tensors (:class:`DecodedImages`: once, and kept, up to
      ``train.decoded_cache_mb``; beyond it, again when drawn, by ``train.loader_workers``
      processes) and augmented in torch.
    - Crops are ``train.image_size`` (below the evaluation size: training at a lower resolution
      than testing suits random-resized crops, as FixRes showed, and costs half the compute).
    - The backbone's learning rate warms up for ``warmup_steps`` and then follows a cosine to
      zero at the last unfrozen epoch; it is computed from the step number, so a resumed run
      continues the same schedule.
    - The catalogue-anchor loss compares photos with the current embeddings of the catalogue
      images, re-embedded (without gradients) every ``anchor_refresh_steps`` steps; on a
      catalogue larger than ``anchor_sample``, of a sample that holds the SKUs of the steps
      until the next refresh (:class:`CatalogueAnchors`).
    - With ``freeze_batchnorm`` the backbone runs in eval mode: BatchNorm keeps its ImageNet
      statistics (small P x K batches of few SKUs make poor batch statistics; measured, batch
      statistics sent the loss from 5 to 15 at the switch) and stochastic depth is off
      (measured: switching it back on with BatchNorm still frozen lost 2.7 / 1.3 points of top-1).
    """

    def __init__(self, preprocess: Preprocess, paths: list[str], catalogue_rows: np.ndarray,
                 params: Params, device: torch.device) -> None:
        cfg = params.train
        self.params, self.device, self.preprocess = params, device, preprocess
        self.out_size = cfg.image_size or preprocess.image_size
        self.augment = (ShelfAugment(preprocess, random.Random(cfg.seed), self.out_size, cfg.crop_area, cfg.colour_cast,
                                     cfg.erase)
                        if cfg.augment else None)
        store = self.augment.store if self.augment else replace(preprocess, image_size=self.out_size)
        self.images = DecodedImages(paths, store, cfg.decoded_cache_mb * 2**20)
        self.catalogue_rows = catalogue_rows
        self.steps_per_epoch = max(1, len(paths) // cfg.unfrozen_batch_size)
        self.total_steps = self.steps_per_epoch * max(1, cfg.epochs - cfg.frozen_epochs)

    def backbone_lr(self, step: int) -> float:
        """Linear warm-up, then a cosine decay to zero at the last step."""
        cfg = self.params.train
        warmup = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        return cfg.backbone_lr * warmup * 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch of decoded images -> the (augmented) normalised input on the device."""
        if self.augment:
            batch = torch.stack([self.augment(image) for image in images])
        else:
            batch = self.preprocess.normalize(images)
        return batch.to(self.device, memory_format=torch.channels_last)

    @torch.no_grad()
    def embed_rows(self, encoder: Encoder, rows: np.ndarray) -> torch.Tensor:
        """Current embeddings of some training images (centre crop, no augmentation)."""
        was_training = encoder.training
        encoder.eval()
        outputs = []
        # Chunk by chunk: the float input of every training image at once would be 4x the decoded images.
        for start in range(0, len(rows), self.params.evaluate.batch_size):
            centre = self.preprocess.normalize(self.images.batch(rows[start:start + self.params.evaluate.batch_size]))
            if centre.shape[-1] != self.out_size:
                centre = F.interpolate(centre, size=(self.out_size, self.out_size), mode="bilinear", antialias=True)
            with autocast_for(self.device):
                outputs.append(encoder(centre.to(self.device, memory_format=torch.channels_last)).float())
        encoder.train(was_training)
        return torch.cat(outputs)

    def run_epoch(self, epoch: int, encoder: Encoder, head: MarginHead, optimizer: torch.optim.Optimizer,
                  labels: np.ndarray, catalogue_labels: torch.Tensor, rng: np.random.Generator,
                  progress: bool, backbone_frozen: bool = False, averaged: AveragedModel | None = None) -> list[float]:
        """One epoch of P x K batches of augmented crops; returns the per-step losses.

        ``averaged``, when given, takes the encoder's weights into its moving average after every step.
        """
        from tqdm.auto import tqdm

        cfg = self.params.train
        use_anchors = cfg.catalogue_anchor_weight > 0 and len(self.catalogue_rows) > 0
        batches = pk_batches(labels, max(2, cfg.unfrozen_batch_size // cfg.images_per_sku), cfg.images_per_sku, rng)
        losses, anchors, anchor_labels = [], None, None
        anchor_set = CatalogueAnchors(catalogue_labels.cpu().numpy(), cfg.anchor_sample)
        if cfg.catalogue_in_batches:
            batches = with_catalogue_images(batches, labels, self.catalogue_rows)
        batches = batches[:self.steps_per_epoch]
        decoded = self.images.batches(batches, cfg.loader_workers)
        for index, (batch, images) in enumerate(tqdm(zip(batches, decoded), total=len(batches),
                                                     desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                                     disable=None if progress else True, leave=False)):
            # The projection moves every step, so the anchors go stale even with a frozen backbone.
            if use_anchors and index % cfg.anchor_refresh_steps == 0:
                upcoming = np.concatenate(batches[index:index + cfg.anchor_refresh_steps])
                positions = anchor_set.positions(labels[upcoming], rng)
                anchors = self.embed_rows(encoder, self.catalogue_rows[positions])
                anchor_labels = anchor_set.labels_at(catalogue_labels, positions)
            encoder.train()
            if cfg.freeze_batchnorm or backbone_frozen:
                encoder.backbone.eval()
            if not backbone_frozen:
                optimizer.param_groups[1]["lr"] = self.backbone_lr((epoch - cfg.frozen_epochs) * self.steps_per_epoch + index)
            with autocast_for(self.device):
                embeddings = encoder(self.pixels(images))
            losses.append(_optimisation_step(head, optimizer, embeddings, torch.from_numpy(labels[batch]).to(self.device),
                                             anchors, anchor_labels, self.params))
            if averaged is not None:
                averaged.update_parameters(encoder)
        return losses


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


def training_setup(params: Params, manifest: pd.DataFrame, device: torch.device) -> TrainingSetup:
    """The rows, labels, encoder, margin head and optimiser that :func:`train_encoder` starts from.

    Draws the encoder's and head's initial weights from torch's global generator, so seed it first.
    Public so benchmarks time the exact objects training uses.
    """
    cfg = params.train
    rows = pd.concat([select(manifest, split=params.data.train_split, role="query"),
                      select(manifest, role="catalogue")]).reset_index(drop=True)
    sku_ids = sorted(rows["sku_id"].unique())
    if len(sku_ids) < 2:
        raise ValueError(f"training needs at least 2 SKUs, got {len(sku_ids)}")
    labels = rows["sku_id"].map({s: i for i, s in enumerate(sku_ids)}).to_numpy()
    encoder, preprocess = build_encoder(params.model)
    if params.model.backbone == "hf-clip" and cfg.image_size not in (None, preprocess.image_size):
        # Refused here, before the feature cache is computed, not when the unfrozen stage starts.
        raise ValueError(f"train.image_size={cfg.image_size}: a CLIP vision tower takes only its own input size "
                         f"({preprocess.image_size} px); set train.image_size to null")
    # The encoder comes channels-last (build_encoder): measured 61 against 94 ms/image for a
    # Lite0 training step on the CPU; _CropTraining sends its crops in that layout too.
    encoder.to(device)
    head = MarginHead(encoder.embed_dim, len(sku_ids), cfg.loss, cfg.margin, cfg.scale, cfg.subcenters).to(device)
    optimizer = torch.optim.AdamW([
        {"params": list(encoder.projection.parameters()) + list(head.parameters()), "lr": cfg.lr},
        {"params": list(encoder.backbone.parameters()), "lr": cfg.backbone_lr},
    ], weight_decay=cfg.weight_decay)
    return TrainingSetup(rows, sku_ids, labels, np.flatnonzero(rows["role"].to_numpy() == "catalogue"),
                         encoder, preprocess, head, optimizer)


def train_encoder(params: Params, manifest: pd.DataFrame, tracker: Tracker | None = None,
                  data_version: str | None = None, progress: bool = True) -> TrainResult:
    """Fine-tune an encoder on a manifest's training split and catalogue images.

    Args:
        params: the resolved params tree (``model``, ``train``, ``data``, ``evaluate`` used).
        manifest: the dataset manifest (see ``components.data``).
        tracker: receives params and per-epoch metrics (loss, validation top-k, delta similarity).
        data_version: the DVC hash of the data, recorded with the model.
        progress: show progress bars.

    Returns:
        A :class:`TrainResult`; the encoder is saved to ``params.train.output_dir``.
    """
    cfg = params.train
    tracker = tracker or NullTracker()
    started = time.perf_counter()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)

    setup = training_setup(params, manifest, device)
    training_rows, sku_ids, labels = setup.rows, setup.sku_ids, setup.labels
    catalogue_rows, encoder, preprocess = setup.catalogue_rows, setup.encoder, setup.preprocess
    head, optimizer = setup.head, setup.optimizer
    eval_sets = protocol_sets(manifest, params.data.query_split, params.data.train_split,
                              params.evaluate.leak_max_distance)

    def weight_average() -> AveragedModel:
        # use_buffers: BatchNorm statistics are averaged too, for runs that let them move.
        return AveragedModel(encoder, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)

    checkpoint_folder = Path(cfg.checkpoint_dir) / run_fingerprint(params, data_version)
    start_epoch, history, resumed = 0, [], None
    averaged: AveragedModel | None = None
    if cfg.resume and (loaded := _load_latest_checkpoint(checkpoint_folder, encoder, head, optimizer)):
        resumed, history, averaged_state = loaded
        start_epoch = resumed + 1
        if averaged_state is not None:
            averaged = weight_average()
            averaged.load_state_dict(averaged_state)
    tracker.log_params({"train.device_resolved": device.type, "train.skus": str(len(sku_ids)),
                        "train.images": str(len(training_rows)), "data.version": data_version or "unknown"})

    cached: CachedFeatures | None = None
    crops: _CropTraining | None = None

    def crop_training() -> _CropTraining:
        # Built at the first epoch that needs it (also after a resume): decoding is paid once.
        nonlocal crops
        crops = crops or _CropTraining(preprocess, list(training_rows["image_path"]), catalogue_rows, params, device)
        return crops

    if start_epoch < cfg.frozen_epochs and cfg.frozen_stage == "cached":
        # Backbone features of every image, plus augmented views of the training images,
        # computed once (or read from disk) so the head trains in seconds per epoch.
        eval_paths = sorted(set(eval_sets.queries["image_path"]).union(*(g["image_path"] for g in eval_sets.galleries.values())))
        cached = cache_features(encoder, preprocess, list(training_rows["image_path"]), catalogue_rows, eval_paths,
                                params, device, data_version, progress)
        if resumed is None:
            init_head_from_cached(encoder, head, cached, labels, device)
    elif start_epoch < cfg.frozen_epochs and resumed is None:
        head.init_from_prototypes(_sku_means(crop_training().embed_rows(encoder, np.arange(len(labels))),
                                             labels, len(sku_ids)))

    rng = np.random.default_rng(cfg.seed + start_epoch)
    skus_per_batch = max(2, cfg.batch_size // cfg.images_per_sku)
    catalogue_labels = torch.from_numpy(labels[catalogue_rows]).to(device)
    metrics: dict[str, dict[str, float]] = history[-1].get("_metrics", {}) if history else {}
    for epoch in range(start_epoch, cfg.epochs):
        frozen = epoch < cfg.frozen_epochs
        on_cached_features = frozen and cached is not None
        _set_trainable(encoder, cfg.unfreeze_blocks, backbone_trainable=not frozen and cfg.backbone_lr > 0)
        if not frozen and cfg.ema_decay > 0 and averaged is None:
            averaged = weight_average()  # starts from the weights the frozen stage ended with
        if on_cached_features:
            losses = _frozen_epoch(encoder, head, optimizer, cached, labels, catalogue_labels, params,
                                   pk_batches(labels, skus_per_batch, cfg.images_per_sku, rng), rng, device)
        else:
            losses = crop_training().run_epoch(epoch, encoder, head, optimizer, labels, catalogue_labels, rng,
                                               progress, backbone_frozen=frozen, averaged=averaged)
        # What is evaluated and saved: the weight average once there is one.
        trained = averaged.module if averaged is not None else encoder

        record: dict[str, Any] = {"epoch": epoch, "train.loss": float(np.mean(losses)), "train.frozen_backbone": float(frozen)}
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every_epochs == 0 or last:
            trained.eval()
            if on_cached_features:
                with torch.no_grad():
                    vectors = embed_cached(encoder, cached.evaluation, device)
                epoch_sets = eval_sets
                # Cached features hold one centred view per image: queries get no flip or zoom
                # views here, so these frozen-epoch figures run slightly below the saved model's.
                embeddings_by_path = dict(zip(cached.evaluation_paths, vectors.float().cpu().numpy()))
                query_embeddings = None
            else:
                # Embedding every gallery image costs minutes on a CPU (the nn gallery is the
                # training set), so epochs without cached features measure the gate's protocol
                # only, the last one too: the saved model's full evaluation is the next step of
                # every pipeline (the flow's `evaluate` task, the DVC `evaluate` stage), and
                # doing it here as well cost 2 of the recipe's 30 minutes.
                gate = params.evaluate.gate_protocol
                epoch_sets = eval_sets if gate not in eval_sets.galleries else ProtocolSets(
                    eval_sets.queries, {gate: eval_sets.galleries[gate]}, eval_sets.leaks)
                embeddings_by_path, query_embeddings = embed_protocol_sets(trained, preprocess, epoch_sets,
                                                                           params.evaluate.batch_size, device)
            epoch_metrics = evaluate_embeddings(embeddings_by_path, epoch_sets, params.evaluate.ks,
                                                query_embeddings=query_embeddings)
            record.update({f"val.{k}": v for k, v in flatten_metrics(epoch_metrics).items()})
            metrics = record["_metrics"] = epoch_metrics
        history.append(record)
        # Checkpoint first: a tracker that fails (a network hiccup) must not cost the epoch.
        _save_checkpoint(checkpoint_folder, epoch, encoder, head, optimizer, history, averaged)
        tracker.log_metrics({k: v for k, v in record.items() if not k.startswith("_") and k != "epoch"}, step=epoch)
        LOGGER.info("epoch %d/%d loss %.4f %s", epoch + 1, cfg.epochs, record["train.loss"],
                    " ".join(f"{k}={v:.3f}" for k, v in record.items() if k.endswith(("top1", "top3"))))

    trained = averaged.module if averaged is not None else encoder
    trained.eval()
    model_dir = save_encoder(trained, preprocess, params.model, cfg.output_dir, extra={
        "train": cfg.model_dump(), "data_version": data_version, "sku_ids": sku_ids,
        "metrics": metrics, "run_fingerprint": run_fingerprint(params, data_version)})
    return TrainResult(model_dir=model_dir, metrics=metrics,
                       history=[{k: v for k, v in h.items() if not k.startswith("_")} for h in history],
                       wall_time_s=time.perf_counter() - started, device=device.type, resumed_from_epoch=resumed,
                       sku_ids=sku_ids)
