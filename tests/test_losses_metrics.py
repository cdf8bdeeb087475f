"""SAROSS-Net's losses (CE, soft Dice, KD; which sample gets which) and the metrics."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dakd.eval.metrics import confusion_matrix, format_per_class_table, format_table, segmentation_metrics
from dakd.train.losses import dice_loss, kd_loss, segmentation_loss

# --------------------------------------------------------------------------- KD


def test_kd_loss_equals_its_formula_on_a_hand_built_case():
    T = 2.0
    # two pixels, three classes: logits (B=1, C=3, H=1, W=2)
    student = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    teacher = [[3.0, 1.0, 0.0], [0.0, 0.0, 4.0]]
    s = torch.tensor(student).T.reshape(1, 3, 1, 2)
    t = torch.tensor(teacher).T.reshape(1, 3, 1, 2)

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    per_pixel = [-sum(q * math.log(p) for q, p in zip(softmax(tv), softmax(sv))) for sv, tv in zip(student, teacher)]
    want = T * T * sum(per_pixel) / len(per_pixel)
    assert kd_loss(s, t, T).item() == pytest.approx(want, rel=1e-6)


def test_kd_loss_is_minimal_where_student_equals_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 4, 3)
    student = teacher.clone().requires_grad_()
    loss = kd_loss(student, teacher, 3.0)
    loss.backward()
    assert student.grad.abs().max() < 1e-6
    for scale in (1e-2, 1e-1, 1.0):
        perturbed = teacher + scale * torch.randn_like(teacher)
        assert kd_loss(perturbed, teacher, 3.0) > loss
    # teacher gets no gradient
    t = teacher.clone().requires_grad_()
    kd_loss(torch.randn_like(teacher, requires_grad=True), t, 3.0).backward()
    assert t.grad is None


# --------------------------------------------------------------------------- Dice


def _confident_logits(labels, num_classes, scale=100.0):
    """(B, H, W) labels -> logits whose softmax is one-hot to float precision."""
    return scale * F.one_hot(labels, num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_dice_on_hand_built_masks(eps):
    target = torch.tensor([[[0, 1], [1, 1]]])
    pred = torch.tensor([[[0, 0], [1, 1]]])
    # class 0: overlap 1, |pred| 2, |target| 1; class 1: overlap 2, |pred| 2, |target| 3
    d0 = (2 * 1 + eps) / (2 + 1 + eps)
    d1 = (2 * 2 + eps) / (2 + 3 + eps)
    want = 1 - (d0 + d1) / 2
    assert dice_loss(_confident_logits(pred, 2), target, eps=eps).item() == pytest.approx(want, abs=1e-6)
    # perfect prediction: loss 0; soft (probability) targets give the same as indices
    assert dice_loss(_confident_logits(target, 2), target, eps=eps).item() == pytest.approx(0.0, abs=1e-6)
    onehot = F.one_hot(target, 2).movedim(-1, 1).float()
    assert dice_loss(_confident_logits(pred, 2), onehot, eps=eps).item() == pytest.approx(want, abs=1e-6)


def test_dice_class_absent_everywhere_counts_as_perfect_with_eps():
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    # 3 classes, only class 0 present and predicted: classes 1, 2 have 0/0 -> (0+eps)/(0+eps) = 1
    assert dice_loss(_confident_logits(target, 3), target, eps=1.0).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- which sample gets which loss


def _batch(seed=0, c=3):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, c, 4, 5, generator=g)
    teacher = torch.randn(3, c, 4, 5, generator=g) * 3
    mask = torch.randint(0, c, (3, 4, 5), generator=g)
    is_syn = torch.tensor([False, True, False])
    return student, teacher, mask, is_syn


LAMBDAS = dict(lambda_ce=1.0, lambda_dice=0.5, lambda_kd=0.1, T=2.0, dice_eps=1.0)


def test_soft_mode_kd_on_synthetic_masks_on_real():
    student, teacher, mask, is_syn = _batch()
    out = segmentation_loss(student, mask, teacher, is_syn, mode="soft", **LAMBDAS)
    real = ~is_syn
    assert out["kd"].item() == pytest.approx(kd_loss(student[is_syn], teacher[is_syn], 2.0).item(), rel=1e-6)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(student[real], mask[real]).item(), rel=1e-6)
    assert out["dice"].item() == pytest.approx(dice_loss(student[real], mask[real], eps=1.0).item(), rel=1e-6)
    want = out["ce"] + 0.5 * out["dice"] + 0.1 * out["kd"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    # the teacher's rows for real samples and the mask rows of synthetic samples are never read
    teacher2, mask2 = teacher.clone(), mask.clone()
    teacher2[real] = torch.randn_like(teacher2[real])
    mask2[is_syn] = (mask2[is_syn] + 1) % 3
    out2 = segmentation_loss(student, mask2, teacher2, is_syn, mode="soft", **LAMBDAS)
    assert out2["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_hard_mode_uses_teacher_argmax_for_synthetic():
    student, teacher, mask, is_syn = _batch()
    out = segmentation_loss(student, mask, teacher, is_syn, mode="hard", **LAMBDAS)
    labels = mask.clone()
    labels[is_syn] = teacher[is_syn].argmax(dim=1)
    assert out["kd"].item() == 0.0
    assert out["ce"].item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)
    assert out["dice"].item() == pytest.approx(dice_loss(student, labels, eps=1.0).item(), rel=1e-6)


def test_soft_mode_kd_plus_hard_adds_ce_dice_on_the_teacher_argmax():
    """The second reading of soft mode: KD on synthetic samples plus CE/Dice on every
    sample, synthetic ones against the teacher's argmax."""
    student, teacher, mask, is_syn = _batch()
    out = segmentation_loss(student, mask, teacher, is_syn, mode="soft", soft_synthetic="kd+hard", **LAMBDAS)
    labels = mask.clone()
    labels[is_syn] = teacher[is_syn].argmax(dim=1)
    T = LAMBDAS["T"]
    assert out["kd"].item() == pytest.approx(kd_loss(student[is_syn], teacher[is_syn], T).item(), rel=1e-6)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)
    assert out["dice"].item() == pytest.approx(dice_loss(student, labels, eps=1.0).item(), rel=1e-6)
    expected = LAMBDAS["lambda_ce"] * out["ce"] + LAMBDAS["lambda_dice"] * out["dice"] + LAMBDAS["lambda_kd"] * out["kd"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # the default reading keeps CE/Dice on the real samples only
    kd_only = segmentation_loss(student, mask, teacher, is_syn, mode="soft", **LAMBDAS)
    real = ~is_syn
    assert kd_only["ce"].item() == pytest.approx(F.cross_entropy(student[real], mask[real]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="soft_synthetic"):
        segmentation_loss(student, mask, teacher, is_syn, mode="soft", soft_synthetic="hard", **LAMBDAS)


def test_real_only_mode_and_argument_checks():
    student, teacher, mask, _ = _batch()
    none_syn = torch.zeros(3, dtype=torch.bool)
    out = segmentation_loss(student, mask, None, none_syn, mode="real-only", **LAMBDAS)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(student, mask).item(), rel=1e-6)
    assert out["kd"].item() == 0.0
    with pytest.raises(ValueError, match="synthetic"):
        segmentation_loss(student, mask, teacher, torch.tensor([False, True, False]), mode="real-only", **LAMBDAS)
    with pytest.raises(ValueError, match="teacher_logits"):
        segmentation_loss(student, mask, None, torch.tensor([False, True, False]), mode="soft", **LAMBDAS)
    with pytest.raises(ValueError, match="mode"):
        segmentation_loss(student, mask, teacher, none_syn, mode="medium", **LAMBDAS)
    # an all-synthetic batch needs no masks; CE and Dice are 0 in soft mode
    all_syn = torch.ones(3, dtype=torch.bool)
    out = segmentation_loss(student, None, teacher, all_syn, mode="soft", **LAMBDAS)
    assert out["ce"].item() == 0.0 and out["dice"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.1 * kd_loss(student, teacher, 2.0).item(), rel=1e-6)


def test_soft_mode_gradient_flows_from_both_sample_kinds():
    student, teacher, mask, is_syn = _batch()
    student.requires_grad_()
    segmentation_loss(student, mask, teacher, is_syn, mode="soft", **LAMBDAS)["loss"].backward()
    per_sample = student.grad.abs().sum(dim=(1, 2, 3))
    assert (per_sample > 0).all()


# --------------------------------------------------------------------------- metrics


def test_confusion_matrix_against_hand_count():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(3, 7, 5))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 4, size=target.shape))
    want = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        want[t, p] += 1
    assert (confusion_matrix(pred, target, 4) == want).all()
    cm_t = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 4)
    assert isinstance(cm_t, torch.Tensor) and (cm_t.numpy() == want).all()
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 4)


def test_metrics_against_a_hand_computed_confusion_matrix():
    # rows: target, columns: prediction; class "c" appears nowhere
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    m = segmentation_metrics(cm, ["a", "b", "c"])
    F_ = Fraction
    iou = {"a": F_(5, 5 + 1 + 2), "b": F_(3, 3 + 2 + 1)}
    prec = {"a": F_(5, 7), "b": F_(3, 4)}
    rec = {"a": F_(5, 6), "b": F_(3, 5)}
    f1 = {k: 2 * prec[k] * rec[k] / (prec[k] + rec[k]) for k in prec}
    for key, want in (("iou", iou), ("precision", prec), ("recall", rec), ("f1", f1)):
        for cls in ("a", "b"):
            assert m[key][cls] == pytest.approx(float(want[cls]))
        assert math.isnan(m[key]["c"])
    assert m["miou"] == pytest.approx(float((iou["a"] + iou["b"]) / 2))
    assert m["f1_mean"] == pytest.approx(float((f1["a"] + f1["b"]) / 2))
    assert m["precision_mean"] == pytest.approx(float((prec["a"] + prec["b"]) / 2))
    assert m["recall_mean"] == pytest.approx(float((rec["a"] + rec["b"]) / 2))
    assert m["accuracy"] == pytest.approx(8 / 11)
    assert m["present"] == {"a": True, "b": True, "c": False}


def test_metrics_class_present_but_never_predicted_scores_zero():
    cm = np.array([[4, 0], [2, 0]])  # class 1 in the target, never predicted
    m = segmentation_metrics(cm, ["sea", "oil"])
    assert m["precision"]["oil"] == 0.0 and m["recall"]["oil"] == 0.0 and m["iou"]["oil"] == 0.0
    assert m["miou"] == pytest.approx((4 / 6 + 0) / 2)


def test_format_table_prints_percentages_in_paper_order():
    cm = np.array([[50, 2], [3, 10]])
    m = segmentation_metrics(cm, ["background", "oil"])
    table = format_table({"SAROSS-Net": m})
    header, _, row = table.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == ["model", "mIoU", "F1", "Accuracy", "Recall", "Precision"]
    cells = [c.strip() for c in row.strip("|").split("|")]
    want = [m["miou"], m["f1_mean"], m["accuracy"], m["recall_mean"], m["precision_mean"]]
    assert cells[0] == "SAROSS-Net" and cells[1:] == [f"{100 * v:.2f}" for v in want]
    per_class = format_per_class_table(m).splitlines()
    assert "background" in per_class[0] and "oil" in per_class[0] and "mIoU" in per_class[0]
    assert f"{100 * m['iou']['oil']:.2f}" in per_class[2]
