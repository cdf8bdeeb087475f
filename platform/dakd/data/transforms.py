"""Image normalisation, the one definition every stage uses (train, synth, eval, predict).

SAR images are stored as 8-bit grey levels (uint8, 0..255). Networks see
x = pixel / 127.5 - 1, a float32 in [-1, 1]; the exact inverse is
pixel = clip(round((x + 1) * 127.5), 0, 255). Scaling 8-bit images to [-1, 1] is
what reproduces the paper's balancing factors b.
"""

from __future__ import annotations

import numpy as np

NORMALIZATION = "x = uint8 / 127.5 - 1 (float32 in [-1, 1]); inverse uint8 = clip(round((x + 1) * 127.5), 0, 255)"


def normalize_image(image):
    """uint8 grey levels (any shape, numpy or torch) -> float32 in [-1, 1]."""
    if hasattr(image, "float") and not isinstance(image, np.ndarray):  # torch tensor
        return image.float() / 127.5 - 1.0
    return np.asarray(image, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def denormalize_image(x):
    """Inverse of normalize_image: float in [-1, 1] (any shape) -> uint8 grey levels."""
    if hasattr(x, "float") and not isinstance(x, np.ndarray):  # torch tensor
        import torch

        return torch.clamp(torch.round((x.float() + 1.0) * 127.5), 0, 255).to(torch.uint8)
    return np.clip(np.round((np.asarray(x, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def label_signal(mask, num_classes: int, b: float = 1.0):
    """(…, H, W) class index -> (…, C, H, W) float32 label signal b * (2 * onehot - 1).

    This is y0' of PAPER.md (y0 = 2*onehot - 1, in {-1, 1}); works on numpy arrays and
    torch tensors.
    """
    if isinstance(mask, np.ndarray):
        onehot = np.eye(num_classes, dtype=np.float32)[mask.astype(np.int64)]  # (…, H, W, C)
        return b * (2.0 * np.moveaxis(onehot, -1, -3) - 1.0)
    import torch

    onehot = torch.nn.functional.one_hot(mask.long(), num_classes).float()  # (…, H, W, C)
    return b * (2.0 * onehot.movedim(-1, -3) - 1.0)
