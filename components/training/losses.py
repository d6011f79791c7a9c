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

    With ``sampled_classes`` below the SKU count, a step's softmax scores only the batch's own
    SKUs and random others up to that many (insightface's Partial FC), so its cost does not grow
    with the catalogue. The head's weight then leaves the shared optimiser: only the rows a step
    scored get a gradient (on their own copy) and an Adam update (:meth:`sparse_step`), with their moments
    kept as buffers of the weight's size (a bound of 3x the weight, saved with the head).
    """

    def __init__(
        self,
        embed_dim: int,
        n_classes: int,
        loss: str,
        margin: float,
        scale: float,
        subcenters: int = 1,
        sampled_classes: int = 0,
    ):
        super().__init__()
        self.loss, self.margin, self.scale = loss, margin, scale
        self.subcenters = subcenters if loss == "subcenter-arcface" else 1
        self.weight = nn.Parameter(torch.randn(n_classes * self.subcenters, embed_dim) * 0.01)
        self.n_classes = n_classes
        self.sampled_classes = sampled_classes if 0 < sampled_classes < n_classes else 0
        if self.partial:
            self.register_buffer("exp_avg", torch.zeros_like(self.weight))
            self.register_buffer("exp_avg_sq", torch.zeros_like(self.weight))
            self.register_buffer("row_steps", torch.zeros(len(self.weight), dtype=torch.int64))
        # (weight rows, their scratch copy) the last forward scored, for sparse_step.
        self._scored: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    @property
    def partial(self) -> bool:
        """Whether steps sample classes (Partial FC) and update the weight themselves."""
        return bool(self.sampled_classes)

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
        if not self.partial:
            return self._margin_loss(self.cosines(embeddings.float()), labels)
        positives = labels.unique()  # sorted: a label's position among them is its target
        classes = torch.cat([positives, self._negatives(positives)])
        rows = (classes[:, None] * self.subcenters + torch.arange(self.subcenters, device=classes.device)).reshape(-1)
        # The scored rows as a dense leaf of their own: the backward fills its gradient alone, with
        # no sparse tensor to build and coalesce, and sparse_step writes the rows back.
        scored = self.weight.detach().index_select(0, rows).requires_grad_(torch.is_grad_enabled())
        self._scored = (rows, scored)
        cos = F.normalize(embeddings.float(), dim=-1) @ F.normalize(scored, dim=-1).T
        cos = cos.view(len(embeddings), len(classes), self.subcenters).amax(dim=-1)
        return self._margin_loss(cos, torch.searchsorted(positives, labels))

    def _negatives(self, positives: torch.Tensor) -> torch.Tensor:
        """Up to ``sampled_classes - len(positives)`` distinct random other classes, drawn in O(sample)."""
        wanted = self.sampled_classes - len(positives)
        if wanted <= 0:
            return positives[:0]
        drawn = torch.randint(0, self.n_classes, (2 * wanted + 16,), device=positives.device).unique()
        drawn = drawn[~torch.isin(drawn, positives)]
        return drawn[torch.randperm(len(drawn), device=drawn.device)[:wanted]]

    def _margin_loss(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, targets[:, None])
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
        logits = cos.scatter(1, targets[:, None], adjusted) * self.scale
        return F.cross_entropy(logits, targets)

    @torch.no_grad()
    def sparse_step(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        """AdamW on the rows the last forward scored, with the gradient its backward gave them."""
        rows, scored = self._scored
        self._scored = (None, None)
        if scored is not None and scored.grad is not None:
            # The rows as the forward read them: nothing has written the weight since.
            self.update_rows(rows, scored.grad, lr, betas, eps, weight_decay, scored.detach())

    @torch.no_grad()
    def update_rows(
        self,
        rows: torch.Tensor,
        grad: torch.Tensor,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        current: torch.Tensor | None = None,
    ) -> None:
        """AdamW on the distinct weight ``rows`` with their gradient ``grad`` (lazy Adam: other rows
        and their moments stay as they are; each row's bias correction counts its own steps).

        ``current``: those rows of the weight, when the caller holds them already (a scratch copy:
        it is overwritten).
        """
        steps = self.row_steps[rows] + 1
        self.row_steps[rows] = steps
        # index_select / index_copy_: on a CPU several times faster than indexing with [rows].
        first = self.exp_avg.index_select(0, rows).mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        second = self.exp_avg_sq.index_select(0, rows).mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        self.exp_avg.index_copy_(0, rows, first)
        self.exp_avg_sq.index_copy_(0, rows, second)
        step_size = (lr / (1 - betas[0] ** steps.double())).float()[:, None]
        root_correction = (1 - betas[1] ** steps.double()).sqrt().float()[:, None]
        # In place: each temporary is a (rows x dim) array, and a step has few rows but many ops.
        denominator = second.sqrt_().div_(root_correction).add_(eps)
        current = self.weight.index_select(0, rows) if current is None else current
        updated = current.mul_(1 - lr * weight_decay)
        self.weight.index_copy_(0, rows, updated.sub_(first.mul_(step_size).div_(denominator)))


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
    loss = train.loss
    return MarginHead(embed_dim, n_skus, loss.kind, loss.margin, loss.scale, loss.subcenters, loss.sampled_classes)


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
    if head.partial and parallel.enabled:
        # Ranks would sample different classes from their shares of the batch.
        raise ValueError("train.loss.sampled_classes (Partial FC) does not run under data parallelism")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parallel.average_gradients([parameter for group in optimizer.param_groups for parameter in group["params"]])
    optimizer.step()
    if head.partial:
        group = optimizer.param_groups[0]  # the head's learning rate: the projection's
        head.sparse_step(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    return parallel.mean(float(loss.detach()))
