"""The training objective: a margin softmax over SKUs, plus a loss against catalogue anchors.

A SKU's catalogue images and its natural photos carry the same label, so the margin head pulls
them together; the anchor loss trains the ``catalogue`` protocol's own ranking directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from components.config import TrainParams
from components.training.distributed import DataParallel

ALONE = DataParallel()  # one training process


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
        """Cosine of each embedding to each SKU (its closest sub-center)."""
        cos = F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T
        return cos.view(len(embeddings), self.n_classes, self.subcenters).amax(dim=-1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The margin softmax's cross-entropy of ``embeddings`` against their SKU ``labels``."""
        cos = self.cosines(embeddings.float()).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, labels[:, None])
        if self.loss == "cosface":
            adjusted = target - self.margin
        else:
            theta = torch.acos(target)
            # Past pi - m the angular margin would wrap around; fall back to CosFace there.
            adjusted = torch.where(
                theta + self.margin < math.pi,
                torch.cos(theta + self.margin),
                target - self.margin * math.sin(self.margin),
            )
        logits = cos.scatter(1, labels[:, None], adjusted) * self.scale
        return F.cross_entropy(logits, labels)


def catalogue_anchor_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    margin: float,
    scale: float,
) -> torch.Tensor:
    """Margin softmax of photos against embedded catalogue images (the anchors) of many SKUs.

    The ``catalogue`` protocol ranks SKUs by similarity to their catalogue images, so this loss
    trains exactly that ranking: a photo must be closer to its own SKU's catalogue image (the
    best one, when a SKU has several) than to any other anchor SKU's, by ``margin``. Photos of
    SKUs without an anchor are left out. Its size is photos x anchor SKUs, whatever the number
    of classes, so the anchors can be a sample of a large catalogue
    (:class:`components.training.sampling.CatalogueAnchors`).
    """
    similarity = embeddings.float() @ anchors.float().T
    anchor_skus, column_of_anchor = torch.unique(anchor_labels, sorted=True, return_inverse=True)
    per_sku = torch.full((len(embeddings), len(anchor_skus)), -1.0, device=embeddings.device, dtype=similarity.dtype)
    per_sku = per_sku.scatter_reduce(
        1, column_of_anchor.expand(len(embeddings), -1), similarity, reduce="amax", include_self=False
    )
    # Column of each photo's own SKU among the anchor SKUs, where it has one.
    column = torch.searchsorted(anchor_skus, labels).clamp(max=len(anchor_skus) - 1)
    keep = anchor_skus[column] == labels
    if not keep.any():
        return embeddings.sum() * 0.0
    per_sku, column = per_sku[keep], column[keep]
    target = per_sku.gather(1, column[:, None]) - margin
    return F.cross_entropy(per_sku.scatter(1, column[:, None], target) * scale, column)


def margin_head(embed_dim: int, n_skus: int, train: TrainParams) -> MarginHead:
    """The margin head the recipe's loss settings describe."""
    return MarginHead(embed_dim, n_skus, train.loss.kind, train.loss.margin, train.loss.scale, train.loss.subcenters)


def optimisation_step(
    head: MarginHead,
    optimizer: torch.optim.Optimizer,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    anchors: torch.Tensor | None,
    anchor_labels: torch.Tensor | None,
    train: TrainParams,
    parallel: DataParallel = ALONE,
    loss_weight: float = 1.0,
) -> float:
    """One optimiser step on the margin loss, plus the catalogue-anchor loss when anchors are given; the loss.

    Under data parallelism ``embeddings`` are this rank's share of the batch and ``loss_weight``
    its :meth:`DataParallel.loss_weight`; the gradients and the returned loss are the batch's.
    """
    loss = head(embeddings, targets)
    if anchors is not None:
        loss = loss + train.loss.catalogue_anchor_weight * catalogue_anchor_loss(
            embeddings, targets, anchors, anchor_labels, train.loss.margin, train.loss.scale
        )
    if loss_weight != 1.0:
        loss = loss * loss_weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parallel.average_gradients([parameter for group in optimizer.param_groups for parameter in group["params"]])
    optimizer.step()
    return parallel.mean(float(loss.detach()))
