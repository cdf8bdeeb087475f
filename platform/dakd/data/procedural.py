"""Procedural SAR-like scenes with the five OSD classes (a built-in data set for demos
and tests; numpy only).

A scene is built as backscatter intensity (linear, sea = 1 at 0 dB), multiplied by
L-look speckle Gamma(L, 1/L) (mean 1), then shown in dB:
pixel = clip((10 log10 I - DB_MIN) / (DB_MAX - DB_MIN) * 255, 0, 255) as uint8.
- sea (0): a wind-dependent level with slow variation;
- look-alikes (2): large diffuse blobs, moderately dark (-3..-5 dB at their core);
- oil (1): elongated, rotated, wavy slicks with ragged edges, very dark (-7..-11 dB);
- land (4): in about half the scenes, bright textured ground from a thresholded
  smoothed-noise ramp entering from one edge or corner (drawn over oil/look-alikes);
- ships (3): a few small bright rotated rectangles (3..9 px long) on sea.
The mask is the class of each pixel as drawn, so it is aligned with the image.
"""

from __future__ import annotations

import numpy as np

from dakd.data.classes import OSD_CLASSES
from dakd.data.readers import PairRef, make_record
from dakd.errors import ConfigError, DataError
from dakd.seeds import sample_seed

SEA, OIL, LOOKALIKE, SHIP, LAND = range(5)
DB_MIN, DB_MAX = -30.0, 20.0  # dB range mapped onto 0..255
MIN_SIZE = 16  # smallest height/width a scene is drawn at


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """(H, W) float32 value noise: Gaussian values on a grid of `cell` pixels, smoothly
    interpolated, scaled to unit standard deviation."""
    cell = max(float(cell), 1.0)
    grid = rng.standard_normal((int(height / cell) + 2, int(width / cell) + 2)).astype(np.float32)
    y = np.arange(height, dtype=np.float32) / cell
    x = np.arange(width, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep
    rows0, rows1 = grid[y0], grid[y0 + 1]
    top = rows0[:, x0] * (1 - fx) + rows0[:, x0 + 1] * fx
    bottom = rows1[:, x0] * (1 - fx) + rows1[:, x0 + 1] * fx
    out = top * (1 - fy) + bottom * fy
    return out / (out.std() + np.float32(1e-6))


def _rotate(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) a direction `angle` through (cy, cx)."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    return dx * c + dy * s, dy * c - dx * s


def generate_scene(seed: int, height: int, width: int, looks: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene -> ((H, W) uint8 image, (H, W) uint8 mask of OSD class indices)."""
    rng = np.random.default_rng(seed)
    h, w, size = height, width, min(height, width)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    coarse = smooth_noise(rng, h, w, size / 3)
    mid = smooth_noise(rng, h, w, size / 8)
    fine = smooth_noise(rng, h, w, size / 20)
    mask = np.zeros((h, w), np.uint8)

    # sea: wind-dependent level (+-3 dB) with slow variation
    sigma = np.float32(10 ** (rng.uniform(-3, 3) / 10)) * np.clip(1 + 0.2 * coarse, 0.3, None)

    for _ in range(rng.integers(0, 3)):  # look-alikes: large, diffuse, moderately dark
        ra = size * rng.uniform(0.12, 0.3)
        rb = ra * rng.uniform(0.5, 1.0)
        u, v = _rotate(yy, xx, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, np.pi))
        f = 1 - (u / ra) ** 2 - (v / rb) ** 2 + 0.4 * mid
        damp = rng.uniform(0.3, 0.5)
        sigma = sigma * (1 - (1 - damp) * np.clip(f / 0.3, 0, 1))
        mask[f > 0] = LOOKALIKE

    for _ in range(rng.integers(0, 4)):  # oil: elongated wavy slicks, sharp and very dark
        a = size * rng.uniform(0.15, 0.4)
        b = max(a * rng.uniform(0.06, 0.2), 1.5)
        u, v = _rotate(yy, xx, rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w, rng.uniform(0, np.pi))
        amplitude, wavelength = b * rng.uniform(0.3, 1.5), a * rng.uniform(0.7, 2.0)
        v = v - amplitude * np.sin(2 * np.pi * u / wavelength + rng.uniform(0, 2 * np.pi))
        region = (u / a) ** 2 + (v / b) ** 2 + 0.3 * fine < 1
        sigma = np.where(region, sigma * np.float32(rng.uniform(0.08, 0.2)), sigma)
        mask[region] = OIL

    if rng.random() < 0.5:  # land: thresholded noisy ramp from one edge or corner
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (xx / w - 0.5) * np.float32(np.cos(angle)) + (yy / h - 0.5) * np.float32(np.sin(angle))
        region = ramp + 0.12 * mid + 0.04 * fine > rng.uniform(0.2, 0.4)
        texture = 10 ** (0.3 * smooth_noise(rng, h, w, size / 40))  # +-3 dB
        sigma = np.where(region, np.float32(10 ** (rng.uniform(3, 7) / 10)) * texture, sigma)
        mask[region] = LAND

    for _ in range(rng.integers(0, 5)):  # ships: small bright rectangles on sea
        sea = np.flatnonzero(mask == SEA)
        if sea.size == 0:
            break
        cy, cx = divmod(int(sea[rng.integers(sea.size)]), w)
        half_len, half_wid = rng.uniform(1.5, 4.5), rng.uniform(0.5, 1.25)
        y0, y1, x0, x1 = max(cy - 5, 0), min(cy + 6, h), max(cx - 5, 0), min(cx + 6, w)
        u, v = _rotate(yy[y0:y1], xx[:, x0:x1], cy, cx, rng.uniform(0, np.pi))
        region = (np.abs(u) <= half_len) & (np.abs(v) <= half_wid) & (mask[y0:y1, x0:x1] != LAND)
        sigma[y0:y1, x0:x1][region] = 10 ** (rng.uniform(12, 20) / 10)
        mask[y0:y1, x0:x1][region] = SHIP

    intensity = sigma * rng.gamma(looks, 1.0 / looks, size=(h, w)).astype(np.float32)
    db = 10 * np.log10(np.maximum(intensity, np.float32(1e-10)))
    image = np.clip(np.rint((db - DB_MIN) * (255 / (DB_MAX - DB_MIN))), 0, 255).astype(np.uint8)
    return image, mask


class ProceduralReader:
    """Seeded scenes: scene `index` of `split` is a pure function of (seed, split, index)."""

    name = "procedural"
    classes = OSD_CLASSES

    def __init__(self, splits: dict[str, int], height: int, width: int, seed: int, looks: int):
        if not splits or any(int(n) < 0 for n in splits.values()):
            raise ConfigError(f"procedural reader: splits must map split -> count >= 0, got {splits}")
        if height < MIN_SIZE or width < MIN_SIZE:
            raise ConfigError(f"procedural reader: height and width must be >= {MIN_SIZE}, got {height}x{width}")
        if looks < 1:
            raise ConfigError(f"procedural reader: looks must be >= 1, got {looks}")
        self.splits = {str(k): int(n) for k, n in splits.items()}
        self.height, self.width, self.seed, self.looks = int(height), int(width), int(seed), int(looks)

    def list_pairs(self) -> tuple[list[PairRef], list[dict]]:
        digits = max(6, len(str(max(self.splits.values()))))
        refs = [
            PairRef(f"{split}/{i:0{digits}d}", split, self.name, None, None, (("index", i),))
            for split, n in self.splits.items()
            for i in range(n)
        ]
        if not refs:
            raise DataError("procedural", f"no scenes requested (splits {self.splits})")
        return sorted(refs, key=lambda r: r.id), []

    def read(self, ref: PairRef) -> dict:
        index = int(dict(ref.extra)["index"])
        seed = sample_seed(self.seed, f"{ref.split}/{index}")
        image, mask = generate_scene(seed, self.height, self.width, self.looks)
        return make_record(ref, image, mask, sensor=None, off_palette_pixels=0)
