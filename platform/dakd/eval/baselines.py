"""Floors for binary oil-spill data (background = 0, oil = 1): what a learned model must beat.

- all-background: every pixel predicted background.
- threshold: oil where the box-smoothed grey level is below a global threshold (oil slicks
  are dark on SAR). The box size and the threshold are chosen on a selection split (val)
  by mIoU, then applied unchanged to the reporting split (test).
Metrics come from eval.metrics (the same confusion matrix and mIoU as `dakd evaluate`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from scipy.ndimage import uniform_filter

from dakd.eval.metrics import confusion_matrix, segmentation_metrics

BOX_SIZES = (1, 3, 5, 9, 15)


def smooth(image: np.ndarray, box: int) -> np.ndarray:
    """(H, W) uint8 -> (H, W) uint8 box-filtered grey levels (box x box mean, edges reflected)."""
    if box <= 1:
        return image
    return np.clip(np.rint(uniform_filter(image.astype(np.float32), size=box, mode="reflect")), 0, 255).astype(np.uint8)


def threshold_predict(image: np.ndarray, box: int, threshold: int) -> np.ndarray:
    """(H, W) uint8 -> (H, W) uint8 class index: 1 (oil) where smooth(image) < threshold."""
    return (smooth(image, box) < threshold).astype(np.uint8)


def _miou_per_threshold(oil_hist: np.ndarray, bg_hist: np.ndarray) -> np.ndarray:
    """mIoU (background, oil) for every threshold t = 0..256 from 256-bin histograms of the
    smoothed grey level of oil and background pixels (prediction: oil where level < t)."""
    tp = np.concatenate([[0], np.cumsum(oil_hist)])  # oil pixels below t
    fp = np.concatenate([[0], np.cumsum(bg_hist)])  # background pixels below t
    fn = oil_hist.sum() - tp
    tn = bg_hist.sum() - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou_oil = tp / (tp + fp + fn)
        iou_bg = tn / (tn + fn + fp)
    return np.nanmean(np.stack([iou_bg, iou_oil]), axis=0)


def fit_threshold(records: Iterable[dict], boxes: tuple[int, ...] = BOX_SIZES) -> dict:
    """Choose (box, threshold) maximising mIoU on `records` (dicts with (H, W) uint8 "image"
    and "mask" in {0, 1}); returns {"box", "threshold", "miou"} (miou on these records)."""
    records = list(records)
    best = {"box": 1, "threshold": 0, "miou": -1.0}
    for box in boxes:
        oil = np.zeros(256, np.int64)
        bg = np.zeros(256, np.int64)
        for r in records:
            level = smooth(r["image"], box)
            is_oil = r["mask"] == 1
            oil += np.bincount(level[is_oil], minlength=256)
            bg += np.bincount(level[~is_oil], minlength=256)
        miou = _miou_per_threshold(oil, bg)
        t = int(np.nanargmax(miou))
        if miou[t] > best["miou"]:
            best = {"box": box, "threshold": t, "miou": float(miou[t])}
    return best


def floor_metrics(records: Iterable[dict], predict, class_names) -> dict:
    """segmentation_metrics of `predict(image) -> (H, W) class index` over `records`."""
    c = len(class_names)
    cm = np.zeros((c, c), dtype=np.int64)
    n = 0
    for r in records:
        cm += confusion_matrix(predict(r["image"]), r["mask"], c)
        n += 1
    metrics = segmentation_metrics(cm, class_names)
    metrics["images"] = n
    return metrics
