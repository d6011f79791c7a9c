"""The training images decoded once into uint8 tensors, within a memory budget."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from components.data import load_rgb
from components.model import Preprocess


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
        return torch.utils.data.DataLoader(
            self,
            batch_sampler=[[int(row) for row in rows] for rows in row_batches],
            num_workers=workers,
            collate_fn=torch.stack,
        )
