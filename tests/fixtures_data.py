"""Tiny seeded data layouts for the reader tests (OSD, SOS, own folders), written with PIL.

Each writer takes the arrays to store, so a test knows the expected record independently
of the reader under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# The OSD label colours as published (PAPER.md, "Data sets"): row i is class i.
OSD_PALETTE = np.array([(0, 0, 0), (0, 255, 255), (255, 0, 0), (153, 76, 0), (0, 153, 0)], dtype=np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array; the format follows the file suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **kwargs)
    return path


def grey_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 smooth random grey levels (JPEG-friendly)."""
    coarse = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1))
    return np.kron(coarse, np.ones((4, 4)))[:height, :width].astype(np.uint8)


def block_mask(rng: np.random.Generator, height: int, width: int, num_classes: int, block: int = 8) -> np.ndarray:
    """(H, W) uint8 class indices in blocks of `block` pixels."""
    coarse = rng.integers(0, num_classes, size=(height // block + 1, width // block + 1))
    return np.kron(coarse, np.ones((block, block)))[:height, :width].astype(np.uint8)


def off_palette_rgb(rng: np.random.Generator, mask: np.ndarray, palette: np.ndarray, n_off: int):
    """RGB label of `mask` with `n_off` pixels moved off the palette, each near a random
    class c (<= 29 per channel, far less than half the distance between any two
    palette colours) -> ((H, W, 3) uint8 label, (H, W) uint8 expected class index)."""
    rgb = palette[mask].copy()
    expected = mask.copy()
    flat = rng.choice(mask.size, size=n_off, replace=False)
    ys, xs = np.unravel_index(flat, mask.shape)
    for y, x in zip(ys, xs):
        c = int(rng.integers(len(palette)))
        step = rng.integers(1, 30, size=3) * np.where(palette[c] > 127, -1, 1)  # stays in 0..255, never 0
        rgb[y, x] = palette[c].astype(int) + step
        expected[y, x] = c
    return rgb, expected


def write_osd_pair(root: Path, split: str, name: str, image: np.ndarray, *, rgb_label=None, index_label=None) -> dict:
    """OSD layout: <split>/images/<name>.jpg (grey JPEG), labels/<name>.png (RGB),
    labels_1D/<name>.png (class index). Returns the written paths."""
    paths = {"image": save(root / split / "images" / f"{name}.jpg", image, quality=95)}
    if rgb_label is not None:
        paths["rgb"] = save(root / split / "labels" / f"{name}.png", rgb_label)
    if index_label is not None:
        paths["index"] = save(root / split / "labels_1D" / f"{name}.png", index_label)
    return paths


def write_sos_pair(
    root: Path, split: str, sensor: str, id: str, image: np.ndarray, mask_grey: np.ndarray, flat: bool
) -> dict:
    """SOS layout, as the genuine files: RGB JPEG with R=G=B, RGB PNG mask with R=G=B.
    flat: <split>/<sensor>/<id>_sat.jpg + <id>_mask.png; else .../sat/ and .../gt/."""
    folder = root / split / sensor
    image_path = (folder if flat else folder / "sat") / f"{id}_sat.jpg"
    mask_path = (folder if flat else folder / "gt") / f"{id}_mask.png"
    save(image_path, np.repeat(image[..., None], 3, axis=2), quality=95)
    save(mask_path, np.repeat(mask_grey[..., None], 3, axis=2))
    return {"image": image_path, "mask": mask_path}


def write_folder_pair(root: Path, name: str, image: np.ndarray, mask, image_suffix: str = ".png") -> dict:
    """Own-folder layout: images/<name><suffix> + masks/<name>.png; `mask` is an array
    or a ready PIL image (e.g. mode P)."""
    image_path = save(root / "images" / f"{name}{image_suffix}", image)
    mask_path = root / "masks" / f"{name}.png"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    (mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8))).save(mask_path)
    return {"image": image_path, "mask": mask_path}


def decoded(path: Path) -> np.ndarray:
    """What PIL decodes from a file, as an array (the independent expectation)."""
    with Image.open(path) as img:
        return np.asarray(img)
