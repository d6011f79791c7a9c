"""Shelf-like augmentation of clean images: what the fine-tuning stages and the feature cache draw.

Every draw comes from the ``random.Random`` passed in, so a run's augmentations, and with them
its figures, depend only on its seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import torch
from torch.nn import functional as F

from components.config import AugmentParams, TrainParams
from components.model import Preprocess

# Fine-tuning crops are cut from images stored this much larger than the crop, so a crop of
# the whole image still loses nothing to upsampling.
STORE_MARGIN = 1.15
# Part of every cached-features fingerprint: bump it when ShelfAugment changes, so features
# cached with the old augmentation are not reused.
AUGMENT_VERSION = 2


# The augmentation crop's area range when a caller gives none: train.augment.crop_area's default, one source.
DEFAULT_CROP_AREA = tuple(AugmentParams.model_fields["crop_area"].default)


class ShelfAugment:
    """Turn clean images into shelf-like photos: crops, flips, tilt, lighting, colour casts, blur.

    Works on uint8 CHW tensors (what :meth:`Preprocess.resize_crop` returns), so the fine-tuning
    stage decodes every JPEG once and augments in torch; a PIL image is accepted too (decoded at
    ``STORE_MARGIN`` times ``out_size``). Returns the normalised ``out_size`` square input.
    """

    def __init__(
        self,
        preprocess: Preprocess,
        rng: random.Random,
        out_size: int | None = None,
        crop_area: tuple[float, float] | list[float] = DEFAULT_CROP_AREA,
        colour_cast: float = 0.0,
        erase: float = 0.0,
    ) -> None:
        self.preprocess, self.rng, self.crop_area, self.colour_cast = preprocess, rng, tuple(crop_area), colour_cast
        self.erase = erase
        self.out_size = out_size or preprocess.image_size
        self.store = replace(preprocess, image_size=round(self.out_size * STORE_MARGIN))

    def __call__(self, image) -> torch.Tensor:
        pixels = image if torch.is_tensor(image) else self.store.resize_crop(image)
        rng = self.rng
        height, width = pixels.shape[-2:]
        # Random-resized crop of `crop_area` of the image (train.augment.crop_area), aspect 3:4 to 4:3: a
        # product partly in frame.
        area = height * width * rng.uniform(*self.crop_area)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_w, crop_h = min(width, round(math.sqrt(area * aspect))), min(height, round(math.sqrt(area / aspect)))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        crop = pixels[None, :, top : top + crop_h, left : left + crop_w].float() / 255.0
        crop = F.interpolate(
            crop, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False, antialias=True
        )
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        if rng.random() < 0.3:
            crop = rotate(crop, math.radians(rng.uniform(-15, 15)))
        crop = crop * rng.uniform(0.7, 1.3)  # brightness
        if self.colour_cast:
            # A white-balance shift (store light, phone camera): each channel's gain moves on its
            # own by up to train.augment.colour_cast. Drawn only when on, so a run without it keeps its
            # random stream and its figures.
            gains = [rng.uniform(1 - self.colour_cast, 1 + self.colour_cast) for _ in range(3)]
            crop = crop * torch.tensor(gains, dtype=crop.dtype)[None, :, None, None]
        mean = crop.mean()
        crop = (crop - mean) * rng.uniform(0.7, 1.3) + mean  # contrast
        grey = crop.mean(1, keepdim=True)
        crop = (crop - grey) * rng.uniform(0.7, 1.3) + grey  # saturation; hue is kept: it tells flavours apart
        if rng.random() < 0.2:
            crop = gaussian_blur(crop, rng.uniform(0.5, 1.5))
        # Drawn only when on, like the cast, so a run without it keeps its random stream.
        if self.erase and rng.random() < self.erase:
            crop = erase_rectangle(crop, rng)
        return self.preprocess.normalize(crop.clamp(0, 1)[0])


def erase_rectangle(batch: torch.Tensor, rng: random.Random) -> torch.Tensor:
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
            batch[..., top : top + erase_h, left : left + erase_w] = colour
            return batch
    return batch


def rotate(batch: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate an NCHW batch by ``angle`` radians about its centre, reflecting at the borders."""
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=batch.dtype)[None]
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gaussian_blur(batch: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an NCHW batch, reflecting at the borders."""
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=batch.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(batch.shape[1], 1, 1)
    channels = batch.shape[1]
    blurred = F.conv2d(F.pad(batch, (radius, radius, 0, 0), mode="reflect"), kernel[:, :, None, :], groups=channels)
    return F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"), kernel[:, :, :, None], groups=channels)


class Mirrored:
    """Preprocessing of the horizontally mirrored image."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image) -> torch.Tensor:
        return self.preprocess(image).flip(-1)


def shelf_augment(
    preprocess: Preprocess, train: TrainParams, rng: random.Random | None = None, out_size: int | None = None
) -> ShelfAugment:
    """The shelf augmentation ``train``'s augment settings describe, seeded by ``train.seed`` unless given ``rng``."""
    return ShelfAugment(
        preprocess,
        rng or random.Random(train.seed),
        out_size,
        train.augment.crop_area,
        train.augment.colour_cast,
        train.augment.erase,
    )
