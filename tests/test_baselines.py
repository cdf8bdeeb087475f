"""The accuracy floors (dakd.eval.baselines): the threshold chosen on one split, its mIoU
equal to the metrics module's on the same images, and the all-background floor."""

from __future__ import annotations

import numpy as np
import pytest

from dakd.eval.baselines import fit_threshold, floor_metrics, smooth, threshold_predict

NAMES = ["background", "oil"]


def dark_slick_records(n: int, seed: int) -> list[dict]:
    """(H, W) uint8 scenes: bright speckled sea (grey ~150) with a dark slick (grey ~60)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        mask = np.zeros((32, 32), np.uint8)
        y, x = rng.integers(0, 16, size=2)
        mask[y:y + 12, x:x + 14] = 1
        level = np.where(mask == 1, 60.0, 150.0) * rng.gamma(4.0, 1 / 4.0, size=mask.shape)
        records.append({"image": np.clip(level, 0, 255).astype(np.uint8), "mask": mask})
    return records


def test_threshold_fit_matches_the_metrics_module_and_separates_dark_slicks():
    val = dark_slick_records(6, seed=0)
    fit = fit_threshold(val)
    assert fit["box"] > 1 and 60 < fit["threshold"] < 150  # smoothing beats speckle; between the two levels
    # the fit's own mIoU equals eval.metrics' on the same images with the same rule
    again = floor_metrics(val, lambda img: threshold_predict(img, fit["box"], fit["threshold"]), NAMES)
    assert again["miou"] == pytest.approx(fit["miou"], abs=1e-12)
    test = dark_slick_records(6, seed=1)
    assert floor_metrics(test, lambda img: threshold_predict(img, fit["box"], fit["threshold"]), NAMES)["miou"] > 0.8


def test_all_background_floor_and_smoothing():
    recs = dark_slick_records(3, seed=2)
    m = floor_metrics(recs, lambda img: np.zeros_like(img), NAMES)
    oil = sum(int(r["mask"].sum()) for r in recs)
    total = sum(r["mask"].size for r in recs)
    assert m["iou"]["oil"] == 0.0 and m["iou"]["background"] == pytest.approx((total - oil) / total)
    assert m["miou"] == pytest.approx((total - oil) / total / 2) and m["images"] == 3
    flat = np.full((8, 8), 77, np.uint8)
    assert np.array_equal(smooth(flat, 5), flat) and smooth(recs[0]["image"], 1) is recs[0]["image"]
