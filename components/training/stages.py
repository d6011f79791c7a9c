"""The two training stages: head-only epochs on cached features, and epochs on augmented crops.

1. ``frozen_epochs``: the backbone is frozen, its features are computed once (original and
   mirrored view) and cached (:mod:`components.training.feature_cache`), and only the
   projection and the margin head train: seconds per epoch even on a CPU.
2. the remaining epochs: the last ``unfreeze_blocks`` backbone stages train too, at
   ``backbone_lr``, on augmented images drawn P x K (P SKUs, K images each).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel

from components.config import TrainParams
from components.model import Encoder, Preprocess, autocast_for
from components.training.augment import shelf_augment
from components.training.decoded_images import DecodedImages
from components.training.distributed import DataParallel
from components.training.feature_cache import CachedFeatures, embed_cached
from components.training.losses import ALONE, MarginHead, optimisation_step
from components.training.sampling import CatalogueAnchors, pk_batches, with_catalogue_images


def set_trainable(encoder: Encoder, unfreeze_blocks: int, backbone_trainable: bool) -> None:
    """Freeze the backbone, then unfreeze its last ``unfreeze_blocks`` stages (-1: all) if ``backbone_trainable``."""
    for parameter in encoder.backbone.parameters():
        parameter.requires_grad = False
    if backbone_trainable:
        stages = encoder.backbone.stages()
        for stage in stages if unfreeze_blocks < 0 else stages[len(stages) - unfreeze_blocks :]:
            for parameter in stage.parameters():
                parameter.requires_grad = True


def frozen_epoch(
    encoder: Encoder,
    head: MarginHead,
    optimizer: torch.optim.Optimizer,
    cached: CachedFeatures,
    labels: np.ndarray,
    catalogue_labels: torch.Tensor,
    train: TrainParams,
    batches: list[np.ndarray],
    rng: np.random.Generator,
    device: torch.device,
    parallel: DataParallel = ALONE,
) -> list[float]:
    """One head-only epoch on cached backbone features (a random cached view per image).

    The catalogue anchors are a random cached view of each of the step's :class:`CatalogueAnchors`.
    Under data parallelism every rank draws the whole batch's views and anchors, and embeds its share.
    """
    encoder.train()
    encoder.backbone.eval()
    anchor_set = CatalogueAnchors(catalogue_labels.cpu().numpy(), train.sampler.anchor_sample)
    losses = []
    for batch in batches:
        mine = parallel.share(len(batch))
        with autocast_for(device):
            views = rng.integers(0, len(cached.train_views), len(batch))
            embeddings = encoder.embed_features(
                torch.from_numpy(cached.train_views[views[mine], batch[mine]]).to(device)
            )
            anchors = anchor_labels = None
            if train.loss.catalogue_anchor_weight > 0 and len(catalogue_labels):
                positions = anchor_set.positions(labels[batch], rng)
                views = rng.integers(0, len(cached.catalogue_views), len(positions))
                anchors = encoder.embed_features(torch.from_numpy(cached.catalogue_views[views, positions]).to(device))
                anchor_labels = anchor_set.labels_at(catalogue_labels, positions)
        losses.append(
            optimisation_step(
                head,
                optimizer,
                embeddings,
                torch.from_numpy(labels[batch[mine]]).to(device),
                anchors,
                anchor_labels,
                train,
                parallel,
                parallel.loss_weight(len(batch)),
            )
        )
    return losses


@torch.no_grad()
def init_head_from_cached(
    encoder: Encoder, head: MarginHead, cached: CachedFeatures, labels: np.ndarray, device: torch.device
) -> None:
    """Start the head's class weights at each SKU's mean embedding of its cached as-is views."""
    head.init_from_prototypes(sku_means(embed_cached(encoder, cached.train_views[0], device), labels, head.n_classes))


def sku_means(embeddings: torch.Tensor, labels: np.ndarray, n_skus: int) -> torch.Tensor:
    """Mean embedding of each SKU's images: the margin head's starting class weights.

    One scatter-add over the rows (O(rows), not O(rows x SKUs)); a SKU without images gets NaN.
    """
    index = torch.from_numpy(np.array(labels, dtype=np.int64)).to(embeddings.device)
    sums = torch.zeros(n_skus, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, index, embeddings)
    counts = torch.bincount(index, minlength=n_skus).to(embeddings.dtype)
    return sums / counts[:, None]


class CropTraining:
    """Epochs on live augmented crops of the training images.

    The unfrozen stage always runs here; the frozen epochs do too with ``frozen_stage: crops``
    (the backbone then only runs forward, and only the projection and head learn).

    - Images are decoded into uint8 tensors (:class:`DecodedImages`: once, and kept, up to
      ``train.io.decoded_cache_mb``; beyond it, again when drawn, by ``train.io.loader_workers``
      processes) and augmented in torch.
    - Crops are ``train.augment.image_size`` (below the evaluation size: training at a lower resolution
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

    def __init__(
        self,
        preprocess: Preprocess,
        paths: list[str],
        catalogue_rows: np.ndarray,
        train: TrainParams,
        embed_batch_size: int,
        device: torch.device,
    ) -> None:
        self.train_params, self.embed_batch_size, self.device, self.preprocess = (
            train,
            embed_batch_size,
            device,
            preprocess,
        )
        self.out_size = train.augment.image_size or preprocess.image_size
        self.augment = shelf_augment(preprocess, train, out_size=self.out_size) if train.augment.enabled else None
        store = self.augment.store if self.augment else replace(preprocess, image_size=self.out_size)
        self.images = DecodedImages(paths, store, train.io.decoded_cache_mb * 2**20)
        self.catalogue_rows = catalogue_rows
        self.steps_per_epoch = max(1, len(paths) // train.sampler.unfrozen_batch_size)
        self.total_steps = self.steps_per_epoch * max(1, train.schedule.epochs - train.schedule.frozen_epochs)

    def backbone_lr(self, step: int) -> float:
        """Linear warm-up, then a cosine decay to zero at the last step."""
        cfg = self.train_params
        warmup = min(1.0, (step + 1) / max(1, cfg.schedule.warmup_steps))
        return (
            cfg.schedule.backbone_lr
            * warmup
            * 0.5
            * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
        )

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
        for start in range(0, len(rows), self.embed_batch_size):
            centre = self.preprocess.normalize(self.images.batch(rows[start : start + self.embed_batch_size]))
            if centre.shape[-1] != self.out_size:
                centre = F.interpolate(centre, size=(self.out_size, self.out_size), mode="bilinear", antialias=True)
            with autocast_for(self.device):
                outputs.append(encoder(centre.to(self.device, memory_format=torch.channels_last)).float())
        encoder.train(was_training)
        return torch.cat(outputs)

    def run_epoch(
        self,
        epoch: int,
        encoder: Encoder,
        head: MarginHead,
        optimizer: torch.optim.Optimizer,
        labels: np.ndarray,
        catalogue_labels: torch.Tensor,
        rng: np.random.Generator,
        progress: bool,
        backbone_frozen: bool = False,
        averaged: AveragedModel | None = None,
        parallel: DataParallel = ALONE,
    ) -> list[float]:
        """One epoch of P x K batches of augmented crops; returns the per-step losses.

        ``averaged``, when given, takes the encoder's weights into its moving average after every step.
        Under data parallelism every rank draws the whole batches and anchors, and decodes, augments
        and embeds its share of each batch.
        """
        from tqdm.auto import tqdm

        cfg = self.train_params
        use_anchors = cfg.loss.catalogue_anchor_weight > 0 and len(self.catalogue_rows) > 0
        batches = self._epoch_batches(labels, rng)
        losses, anchors, anchor_labels = [], None, None
        anchor_set = CatalogueAnchors(catalogue_labels.cpu().numpy(), cfg.sampler.anchor_sample)
        shares = [batch[parallel.share(len(batch))] for batch in batches]
        decoded = self.images.batches(shares, cfg.io.loader_workers)
        for index, (batch, images) in enumerate(
            tqdm(
                zip(batches, decoded),
                total=len(batches),
                desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}",
                disable=None if progress else True,
                leave=False,
            )
        ):
            # The projection moves every step, so the anchors go stale even with a frozen backbone.
            if use_anchors and index % cfg.loss.anchor_refresh_steps == 0:
                upcoming = np.concatenate(batches[index : index + cfg.loss.anchor_refresh_steps])
                positions = anchor_set.positions(labels[upcoming], rng)
                anchors = self.embed_rows(encoder, self.catalogue_rows[positions])
                anchor_labels = anchor_set.labels_at(catalogue_labels, positions)
            encoder.train()
            if cfg.schedule.freeze_batchnorm or backbone_frozen:
                encoder.backbone.eval()
            if not backbone_frozen:
                optimizer.param_groups[1]["lr"] = self.backbone_lr(
                    (epoch - cfg.schedule.frozen_epochs) * self.steps_per_epoch + index
                )
            with autocast_for(self.device):
                embeddings = encoder(self.pixels(images))
            targets = torch.from_numpy(labels[shares[index]]).to(self.device)
            losses.append(
                optimisation_step(
                    head,
                    optimizer,
                    embeddings,
                    targets,
                    anchors,
                    anchor_labels,
                    cfg,
                    parallel,
                    parallel.loss_weight(len(batch)),
                )
            )
            if averaged is not None:
                averaged.update_parameters(encoder)
        return losses

    def _epoch_batches(self, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """The epoch's P x K batches of rows, with their SKUs' catalogue images when asked, one per step."""
        sampler = self.train_params.sampler
        batches = pk_batches(
            labels, max(2, sampler.unfrozen_batch_size // sampler.images_per_sku), sampler.images_per_sku, rng
        )
        if sampler.catalogue_in_batches:
            batches = with_catalogue_images(batches, labels, self.catalogue_rows)
        return batches[: self.steps_per_epoch]
