"""Segmentation metrics from a confusion matrix, and the paper's table layout.

Confusion matrix convention: cm[t, p] = number of pixels whose true class is t and
predicted class is p (rows: target, columns: prediction). Accumulate it over a whole
test set (sum of per-image matrices), then compute the metrics once: the paper's
numbers are data-set-level, not means of per-image scores.

Per class c (TP = cm[c, c], FP = column sum - TP, FN = row sum - TP):
    IoU_c       = TP / (TP + FP + FN)
    precision_c = TP / (TP + FP)
    recall_c    = TP / (TP + FN)
    F1_c        = 2 TP / (2 TP + FP + FN)     (= harmonic mean of precision_c, recall_c)
Means (mIoU, F1, precision, recall) are *macro* averages: the unweighted mean over
classes of the per-class values (mean F1 is the mean of the per-class F1, not the F1
of the mean precision and recall). Pixel accuracy = trace(cm) / sum(cm).

Classes absent from both the target and the prediction (TP + FP + FN = 0) have every
per-class value NaN and are left out of every mean. A class that does occur but whose
precision or recall denominator is 0 (never predicted / not in the target) scores 0
for that value (scikit-learn's zero_division=0). Values are fractions in [0, 1];
`format_table` prints percentages.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["confusion_matrix", "segmentation_metrics", "format_table", "format_per_class_table"]


def confusion_matrix(pred, target, num_classes: int):
    """(num_classes, num_classes) int64 confusion matrix cm[target, pred] via bincount.

    pred and target: integer class indices of the same shape (torch tensors, any
    device, or numpy arrays). Returns a torch tensor on the input's device for torch
    input, a numpy array for numpy input. Values outside [0, num_classes) raise
    ValueError.
    """
    if isinstance(pred, np.ndarray) or isinstance(target, np.ndarray):
        # torch.tensor copies: the arrays may be read-only views of Arrow buffers (np.frombuffer)
        cm = confusion_matrix(torch.tensor(np.asarray(pred)), torch.tensor(np.asarray(target)), num_classes)
        return cm.numpy()
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = pred.reshape(-1).long()
    t = target.reshape(-1).long()
    if p.numel():
        lo, hi = int(torch.minimum(p.min(), t.min())), int(torch.maximum(p.max(), t.max()))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"confusion_matrix: class indices must be in [0, {num_classes}), got [{lo}, {hi}]")
    idx = t * num_classes + p
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def segmentation_metrics(cm, class_names: Sequence[str]) -> dict:
    """Per-class and macro-mean IoU, F1, precision, recall, and pixel accuracy.

    cm: (C, C) confusion matrix, cm[target, pred] (torch or numpy). class_names: C names.
    Returns a dict of floats (fractions):
      "iou", "f1", "precision", "recall": {class name: value} (NaN for absent classes)
      "miou", "f1_mean", "precision_mean", "recall_mean": macro means over present classes
      "accuracy": pixel accuracy; "present": {class name: bool}; "pixels": total count.
    """
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    c = cm.shape[0]
    if cm.shape != (c, c) or len(class_names) != c:
        raise ValueError(f"segmentation_metrics: cm {cm.shape} does not match {len(class_names)} class names")
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    per_class = {
        "iou": _safe_div(tp, tp + fp + fn),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, tp + fn),
    }
    out: dict = {}
    for key, values in per_class.items():
        values = np.where(present, values, np.nan)
        out[key] = {name: float(v) for name, v in zip(class_names, values)}
        out["miou" if key == "iou" else f"{key}_mean"] = float(values[present].mean()) if present.any() else math.nan
    total = cm.sum()
    out["accuracy"] = float(tp.sum() / total) if total > 0 else math.nan
    out["present"] = {name: bool(p) for name, p in zip(class_names, present)}
    out["pixels"] = int(total)
    return out


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.2f}"


def _as_rows(metrics: Mapping) -> Mapping[str, Mapping]:
    # a single metrics dict (has "miou") or {row name: metrics dict}
    return {"model": metrics} if "miou" in metrics else metrics


def format_table(metrics: Mapping) -> str:
    """Markdown table in the layout of the paper's results: mIoU / F1 / Accuracy / Recall / Precision (%).

    metrics: one `segmentation_metrics` dict, or {row name: metrics dict}.
    """
    lines = ["| model | mIoU | F1 | Accuracy | Recall | Precision |", "|---|---|---|---|---|---|"]
    for name, m in _as_rows(metrics).items():
        cells = [m["miou"], m["f1_mean"], m["accuracy"], m["recall_mean"], m["precision_mean"]]
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in cells) + " |")
    return "\n".join(lines)


def format_per_class_table(metrics: Mapping) -> str:
    """Markdown table of per-class IoU then mIoU (%), as the paper's OSD per-class table."""
    rows = _as_rows(metrics)
    names = list(next(iter(rows.values()))["iou"].keys())
    lines = ["| model | " + " | ".join(names) + " | mIoU |", "|---" * (len(names) + 2) + "|"]
    for name, m in rows.items():
        cells = [m["iou"][n] for n in names] + [m["miou"]]
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in cells) + " |")
    return "\n".join(lines)
