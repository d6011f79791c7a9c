"""Which images a training step sees: P x K batches, and the catalogue anchors it ranks against."""

from __future__ import annotations

import numpy as np
import torch


def pk_batches(
    labels: np.ndarray, skus_per_batch: int, images_per_sku: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of P x K batches: P SKUs, K images each (with replacement for small SKUs)."""
    by_label = rows_by_label(labels)
    # Drawn from one array: a list of every SKU per batch made an epoch O(batches x SKUs).
    skus = np.array(list(by_label))
    n_batches = max(1, len(labels) // (skus_per_batch * images_per_sku))
    batches = []
    for _ in range(n_batches):
        chosen = rng.choice(skus, size=min(skus_per_batch, len(skus)), replace=False)
        batch = [
            rng.choice(by_label[c], size=images_per_sku, replace=len(by_label[c]) < images_per_sku) for c in chosen
        ]
        batches.append(np.concatenate(batch))
    return batches


def rows_by_label(labels: np.ndarray) -> dict:
    """Each label's rows, in row order, from one stable sort: O(rows log rows), not O(rows x labels)."""
    order = np.argsort(labels, kind="stable")
    distinct, starts = np.unique(labels[order], return_index=True)
    return dict(zip(distinct.tolist(), np.split(order, starts[1:])))


def with_catalogue_images(
    batches: list[np.ndarray], labels: np.ndarray, catalogue_rows: np.ndarray
) -> list[np.ndarray]:
    """Each batch plus the catalogue image of every SKU in it (SKUs without one are left as is).

    Trained with gradient on augmented crops, the studio shot and the shelf photos of a SKU
    meet in the backbone itself, not only through the frozen anchors.
    """
    catalogue_row_of = dict(zip(labels[catalogue_rows].tolist(), catalogue_rows.tolist()))
    return [
        np.concatenate(
            [
                batch,
                np.array(
                    [catalogue_row_of[label] for label in np.unique(labels[batch]) if label in catalogue_row_of],
                    dtype=batch.dtype,
                ),
            ]
        )
        for batch in batches
    ]


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
        counts = np.searchsorted(self._sorted_labels, skus, side="right") - starts
        # Each SKU's range of sorted positions, expanded in one go (not a Python loop over SKUs).
        own = self._order[np.arange(counts.sum()) + np.repeat(starts - (np.cumsum(counts) - counts), counts)]
        others = max(0, self.sample - len(own))
        # Distinct draws, as many more as there are positives, so that `others` are left once
        # the positives among them are dropped: exactly `sample` anchors.
        drawn = rng.choice(len(self.labels), size=others + len(own), replace=False) if others else own[:0]
        own = np.sort(own)
        at = np.searchsorted(own, drawn).clip(max=max(len(own) - 1, 0))
        is_own = own[at] == drawn if len(own) else np.zeros(len(drawn), dtype=bool)
        # Own and drawn positions are distinct and disjoint: sorting them is their union.
        return np.sort(np.concatenate([own, drawn[~is_own][:others]]))

    @staticmethod
    def labels_at(catalogue_labels: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """The SKU labels of the anchors at ``positions``, on the device ``catalogue_labels`` live on."""
        return catalogue_labels[torch.from_numpy(positions).to(catalogue_labels.device)]
