"""The frozen stage's backbone features, computed once and memory-mapped from disk.

They depend only on the backbone, the images and the view settings, so any run that differs only
in how the head trains reuses them. Folders are written under a process-private name and renamed
when complete, so a crash never leaves a cache that looks whole, and runs sharing the directory
(several processes, or hosts on a network disk) never touch each other's work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.config import AugmentParams, ModelParams, TrainParams
from components.model import Encoder, Preprocess, embed_images
from components.training.augment import AUGMENT_VERSION, Mirrored, ShelfAugment

LOGGER = logging.getLogger(__name__)

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


def embed_cached(
    encoder: Encoder, features: np.ndarray, device: torch.device, chunk_rows: int = FEATURE_CHUNK_ROWS
) -> torch.Tensor:
    """Embeddings of cached backbone features (rows of a possibly larger-than-RAM memory map), chunk by chunk."""
    # np.array copies a chunk out of the read-only map, which torch.from_numpy cannot share.
    return torch.cat(
        [
            encoder.embed_features(torch.from_numpy(np.array(features[start : start + chunk_rows])).to(device))
            for start in range(0, max(len(features), 1), chunk_rows)
        ]
    )


def features_fingerprint(model: ModelParams, train: TrainParams, data_version: str | None, paths: list[str]) -> str:
    """A short hash of everything the cached features depend on (their folder's name)."""
    shaping = {
        "model": model.model_dump(),
        "views": train.augment.cached_views,
        "catalogue_views": train.augment.catalogue_views,
        "augment": train.augment.enabled,
        "crop_area": train.augment.crop_area,
        "colour_cast": train.augment.colour_cast,
        "erase": train.augment.erase,
        "seed": train.seed,
        "augment_version": AUGMENT_VERSION,
        "data_version": data_version,
        "paths": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def cache_features(
    encoder: Encoder,
    preprocess: Preprocess,
    train_paths: list[str],
    catalogue_rows: np.ndarray,
    evaluation_paths: list[str],
    model: ModelParams,
    train: TrainParams,
    batch_size: int,
    device: torch.device,
    data_version: str | None,
    progress: bool = False,
) -> CachedFeatures:
    """Compute (or read back) the frozen stage's features.

    They are stored under ``train.io.checkpoint_dir`` in a folder named by
    :func:`features_fingerprint`, and reused by any run that differs only in how the head trains
    (loss, margin, learning rate, epochs): the expensive part is paid once. Each array is
    written batch by batch into a memory-mapped ``.npy`` file (numpy's format, no pickles) in a
    ``.partial`` folder of this process's own that is renamed only when complete, so a crash
    never leaves a cache that looks whole, and memory holds one batch, not the set. Runs sharing
    the directory never touch each other's partial folders; those of processes that have exited
    are removed (:func:`_sweep_abandoned_partials`).
    """
    from numpy.lib.format import open_memmap

    all_paths = train_paths + evaluation_paths
    folder = Path(train.io.checkpoint_dir) / f"features-{features_fingerprint(model, train, data_version, all_paths)}"
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
        embed_images(encoder, transform, paths, batch_size, device, features_only=True, progress=progress, out=out)

    train_views, catalogue_views = _write_views(
        preprocess, train_paths, catalogue_rows, train.augment, random.Random(train.seed), dim, array, features
    )
    evaluation = array("evaluation", (len(evaluation_paths), dim))
    _fill_evaluation(
        evaluation,
        evaluation_paths,
        train_paths,
        train_views[0],
        lambda paths: embed_images(
            encoder, preprocess, paths, batch_size, device, features_only=True, progress=progress
        ),
    )
    for written in (train_views, catalogue_views, evaluation):
        written.flush()
    del train_views, catalogue_views, evaluation  # close the maps before the folder moves
    publish(partial, folder)
    return CachedFeatures.open(folder, evaluation_paths)


def _write_views(
    preprocess: Preprocess,
    train_paths: list[str],
    catalogue_rows: np.ndarray,
    augment: AugmentParams,
    rng: random.Random,
    dim: int,
    array,
    features,
) -> tuple[np.ndarray, np.ndarray]:
    """Write the training images' cached views (as is, mirrored, augmented) and the catalogue images' extra ones."""
    shelf = ShelfAugment(
        preprocess, rng, crop_area=augment.crop_area, colour_cast=augment.colour_cast, erase=augment.erase
    )
    view_transforms = [preprocess, Mirrored(preprocess)] + [shelf] * max(0, augment.cached_views - 2)
    train_views = array("train_views", (augment.cached_views, len(train_paths), dim))
    for view, transform in enumerate(view_transforms[: augment.cached_views]):
        features(train_paths, transform, train_views[view])
    catalogue_paths = [train_paths[i] for i in catalogue_rows]
    catalogue_views = array(
        "catalogue_views", (augment.catalogue_views if catalogue_paths else 1, len(catalogue_paths), dim)
    )
    if catalogue_paths:
        catalogue_views[0] = train_views[0, catalogue_rows]
        for view in range(1, augment.catalogue_views):
            features(catalogue_paths, shelf, catalogue_views[view])
    return train_views, catalogue_views


def _fill_evaluation(
    evaluation: np.ndarray, evaluation_paths: list[str], train_paths: list[str], plain_train_view: np.ndarray, embed
) -> None:
    """Write the evaluation images' features into ``evaluation``, in ``evaluation_paths`` order.

    Most evaluation images (the nn gallery, the catalogue) are training images whose plain view,
    the same preprocessing, is already computed: copy those rows and ``embed`` only the rest (the
    queries). On Grocery Store that skips 2,721 of 3,017 forward passes.
    """
    train_position = {path: position for position, path in enumerate(train_paths)}
    known = [row for row, path in enumerate(evaluation_paths) if path in train_position]
    unknown = [row for row, path in enumerate(evaluation_paths) if path not in train_position]
    for start in range(0, len(known), FEATURE_CHUNK_ROWS):  # chunks bound memory, as in embed_cached
        rows = known[start : start + FEATURE_CHUNK_ROWS]
        evaluation[rows] = plain_train_view[[train_position[evaluation_paths[row]] for row in rows]]
    for start in range(0, len(unknown), FEATURE_CHUNK_ROWS):
        rows = unknown[start : start + FEATURE_CHUNK_ROWS]
        evaluation[rows] = embed([evaluation_paths[row] for row in rows])


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
    """Whether a process of this host with this id exists."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, run by another user
    return True


def publish(partial: Path, folder: Path) -> None:
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
