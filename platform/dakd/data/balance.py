"""The balancing factor b (PAPER.md Eq. 1-4, 20): b = sqrt(P(x0) / P(y0)).

P(·) is the mean power of the unnormalised 2-D DFT, averaged over all frequencies
(u, v), channels and images of the train split: P(x) = E[F_x(u,v) · conj(F_x(u,v))].
x0 is the image after data.transforms.normalize_image (8-bit -> [-1, 1]); y0 =
2·onehot − 1 (C channels). By Parseval, the mean DFT power of an H×W array equals
H·W·mean(x²). b is computed in parallel with Ray Data and recorded in the manifest.
"""

from __future__ import annotations

import logging

import numpy as np

from dakd.config import BalanceConfig
from dakd.data import shards
from dakd.data.shards import PAIR_COLUMNS, decode_plane
from dakd.data.transforms import label_signal, normalize_image
from dakd.runtime import init_ray, lone_map_data
from dakd import storage
from dakd.errors import DataError

log = logging.getLogger(__name__)


def dft_power(x: np.ndarray) -> float:
    """Mean of |F(u,v)|² of the unnormalised 2-D DFT over the last two axes and all leading ones."""
    f = np.fft.fft2(np.asarray(x, dtype=np.float64), axes=(-2, -1))
    return float(np.mean(f.real**2 + f.imag**2))


def sample_powers(image: np.ndarray, mask: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(P(x0), P(y0)) of one sample: image H×W uint8, mask H×W class index."""
    return dft_power(normalize_image(image)), dft_power(label_signal(mask, num_classes))


def balance_factor(power_x: float, power_y: float) -> float:
    """b = sqrt(P(x0) / P(y0)) (Eq. 20)."""
    return float(np.sqrt(power_x / power_y))


def _batch_powers(batch: dict, num_classes: int) -> dict:
    px, py = [], []
    for h, w, img, msk in zip(batch["height"], batch["width"], batch["image"], batch["mask"]):
        image, mask = decode_plane(img, h, w), decode_plane(msk, h, w)
        a, b = sample_powers(image, mask, num_classes)
        px.append(a)
        py.append(b)
    return {"power_x": np.asarray(px), "power_y": np.asarray(py)}


def run_balance(cfg: BalanceConfig) -> dict:
    """Compute b over `cfg.split` of the shard set and record it in its manifest."""
    shard_set = shards.open_shard_set(cfg.shards)
    num_classes = shard_set.classes.num_classes
    files = shard_set.files(cfg.split)
    ray = init_ray(cfg.ray)
    loc = storage.resolve(cfg.shards)
    paths = [storage.resolve(f).path for f in files]
    with lone_map_data():
        ds = ray.data.read_parquet(paths, filesystem=loc.fs, columns=PAIR_COLUMNS)
        rows = ds.map_batches(_batch_powers, fn_kwargs={"num_classes": num_classes}, batch_format="numpy").take_all()
    n = len(rows)
    if n == 0:
        raise DataError(cfg.shards, f"split {cfg.split!r} holds no samples")
    power_x = float(np.mean([r["power_x"] for r in rows]))
    power_y = float(np.mean([r["power_y"] for r in rows]))
    b = balance_factor(power_x, power_y)
    manifest = dict(shard_set.manifest)
    manifest["balance"] = {
        "b": b,
        "power_x": power_x,
        "power_y": power_y,
        "split": cfg.split,
        "images": n,
        "definition": "b = sqrt(P(x0)/P(y0)); P = mean |DFT|^2 over frequencies, channels and images",
    }
    manifest.pop("updated_at", None)
    manifest.pop("format_version", None)
    shards.write_manifest(cfg.shards, manifest)
    log.info("b = %.4f over %d %s images", b, n, cfg.split)
    return {"job": "balance", "shards": cfg.shards, "split": cfg.split, "images": n, "b": b,
            "power_x": power_x, "power_y": power_y}
