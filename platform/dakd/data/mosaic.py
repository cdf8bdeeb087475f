"""Training-time geometry for SAROSS-Net: the 2x2 mosaic of synthetic tiles (YOLOv4-style,
PAPER.md: four 256x256 synthetic pairs -> one 512x512 input) and the random crop + flip
of real samples.

Both work on numpy arrays and torch tensors alike (the last two axes are H, W).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dakd.errors import DataError

__all__ = ["mosaic", "random_crop_flip"]


def _cat(parts, axis):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    import torch

    return torch.cat(parts, dim=axis)


def mosaic(tiles_images, tiles_logits):
    """Put four tiles into a 2x2 mosaic; images and logits (or masks) move together.

    tiles_images: (4, 1, h, w); tiles_logits: (4, C, h, w) (numpy or torch).
    Tile k goes to quadrant k: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
    Returns image (1, 2h, 2w) and logits (C, 2h, 2w).
    """
    out = []
    for name, tiles in (("tiles_images", tiles_images), ("tiles_logits", tiles_logits)):
        if tiles.shape[0] != 4 or len(tiles.shape) != 4:
            raise ValueError(f"mosaic: {name} must be (4, channels, h, w), got {tuple(tiles.shape)}")
        top = _cat([tiles[0], tiles[1]], axis=-1)
        bottom = _cat([tiles[2], tiles[3]], axis=-1)
        out.append(_cat([top, bottom], axis=-2))
    if tuple(tiles_images.shape[-2:]) != tuple(tiles_logits.shape[-2:]):
        raise ValueError(f"mosaic: image tiles {tuple(tiles_images.shape)} and logit tiles "
                         f"{tuple(tiles_logits.shape)} differ in size")
    return out[0], out[1]


def _flip(x, axis):
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(np.flip(x, axis=axis))
    return x.flip(axis)


def random_crop_flip(image, mask, size: int | Sequence[int], rng: np.random.Generator, sample_id: str):
    """Random crop of `size` (int or (h, w)) then random horizontal and vertical flips.

    image: (..., H, W) and mask: (..., H, W) (class indices or logits), cropped and flipped
    identically. rng: numpy Generator (seed it per sample for reproducible crops).
    Each flip happens with probability 1/2 (SAR scenes have no canonical orientation).
    Raises DataError naming `sample_id` when the image is smaller than the crop or the
    image and mask sizes differ.
    """
    ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = image.shape[-2:]
    if tuple(mask.shape[-2:]) != (h, w):
        raise DataError(sample_id, f"image is {h}x{w} but its mask is {mask.shape[-2]}x{mask.shape[-1]}")
    if h < ch or w < cw:
        raise DataError(sample_id, f"image is {h}x{w} (HxW), smaller than the {ch}x{cw} crop")
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    image = image[..., top:top + ch, left:left + cw]
    mask = mask[..., top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        image, mask = _flip(image, -1), _flip(mask, -1)
    if rng.random() < 0.5:
        image, mask = _flip(image, -2), _flip(mask, -2)
    if isinstance(image, np.ndarray):
        image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
    return image, mask
