"""SAROSS-Net's training losses (PAPER.md Eq. 8-10): cross-entropy, soft Dice, KD.

    L_total = lambda_ce * L_ce + lambda_dice * L_dice + lambda_kd * L_kd

Which sample gets which label (`segmentation_loss`, `mode`):
- "real-only": every sample must be real (is_synthetic all False); CE and Dice against
  the masks; L_kd = 0. (The 0x ablation: no synthetic data.)
- "hard":      real samples use their masks; synthetic samples use argmax of the
  teacher's logits as hard labels; CE and Dice over all samples; L_kd = 0.
- "soft":      real samples use their masks; synthetic samples are learned from the
  teacher's logits by L_kd (the paper's DAKD: soft labels on synthetic samples, hard
  labels on real ones). Two readings of Eq. 10 for the synthetic samples
  (`soft_synthetic`): "kd" (default) — L_kd only, CE + Dice over the real samples only;
  "kd+hard" — L_kd plus CE + Dice against the teacher's argmax, so CE + Dice cover every
  sample (real: masks, synthetic: argmax) as in "hard".
A term with no sample to act on is 0 (e.g. L_kd on a batch with no synthetic sample,
L_ce and L_dice in soft mode on a batch of synthetic samples only).

Normalisation: L_ce is the mean over the pixels of the samples it covers; L_kd is T^2
times the mean over the pixels of the synthetic samples (the 1/N of Eq. 9); L_dice
is computed over the covered samples together (sums over batch and pixels per class),
then averaged over classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dakd.config import LOSS_MODES, SOFT_SYNTHETIC

__all__ = ["dice_loss", "kd_loss", "segmentation_loss", "LOSS_MODES", "SOFT_SYNTHETIC"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Soft Dice loss (Sudre et al. 2017 soft Dice, unweighted), averaged over classes.

    logits: (B, C, H, W) raw scores; p = softmax over C.
    target: (B, H, W) class indices, or (B, C, H, W) class probabilities.
    eps: smoothing added to numerator and denominator (eps > 0 makes a class that is
      absent from both prediction and target score Dice 1, i.e. loss 0 for that class).
    For each class c, with sums over batch and pixels:
        dice_c = (2 * sum(p_c * g_c) + eps) / (sum(p_c) + sum(g_c) + eps)
    Returns 1 - mean_c dice_c (a scalar).
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    if target.dim() == logits.dim():
        onehot = target.float()
    else:
        onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).float()
    dims = (0,) + tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * inter + eps) / (denom + eps)
    return 1.0 - dice.mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Knowledge-distillation loss of PAPER.md Eq. 8-9 (Hinton et al. 2015).

    q_t = softmax(teacher / T), log p_s = log_softmax(student / T), over the class axis 1.
    L_kd = T^2 * mean over pixels (and samples) of  -sum_c q_t(c) * log p_s(c).
    Shapes (B, C, H, W) each. The teacher gets no gradient. Minimal in the student's
    logits exactly where p_s = q_t (CE = entropy(q_t) + KL(q_t || p_s)).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    q_t = (teacher_logits.detach().float() / T).softmax(dim=1)
    log_p_s = (student_logits.float() / T).log_softmax(dim=1)
    ce = -(q_t * log_p_s).sum(dim=1)  # (B, H, W)
    return (T * T) * ce.mean()


def _check_batch(student_logits, target_mask, teacher_logits, is_synthetic, mode: str,
                 soft_synthetic: str) -> torch.Tensor:
    """ValueError when segmentation_loss's arguments do not fit together; is_synthetic as a bool tensor."""
    if mode not in LOSS_MODES:
        raise ValueError(f"segmentation_loss: mode {mode!r} is not one of {LOSS_MODES}")
    if soft_synthetic not in SOFT_SYNTHETIC:
        raise ValueError(f"segmentation_loss: soft_synthetic {soft_synthetic!r} is not one of {SOFT_SYNTHETIC}")
    is_synthetic = torch.as_tensor(is_synthetic, dtype=torch.bool, device=student_logits.device)
    if is_synthetic.shape != (student_logits.shape[0],):
        raise ValueError(f"is_synthetic must have shape ({student_logits.shape[0]},), got {tuple(is_synthetic.shape)}")
    n_syn = int(is_synthetic.sum())
    if mode == "real-only" and n_syn:
        raise ValueError(f"segmentation_loss: mode 'real-only' got {n_syn} synthetic sample(s)")
    if n_syn < is_synthetic.shape[0] and target_mask is None:
        raise ValueError("segmentation_loss: the batch has real samples but target_mask is None")
    if n_syn and teacher_logits is None:
        raise ValueError("segmentation_loss: the batch has synthetic samples but teacher_logits is None")
    return is_synthetic


def segmentation_loss(
    student_logits: torch.Tensor,
    target_mask: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    is_synthetic: torch.Tensor,
    *,
    mode: str,
    lambda_ce: float,
    lambda_dice: float,
    lambda_kd: float,
    T: float,
    dice_eps: float,
    soft_synthetic: str = "kd",
) -> dict[str, torch.Tensor]:
    """L_total of Eq. 10 on a batch mixing real and synthetic samples.

    student_logits: (B, C, H, W). target_mask: (B, H, W) class indices (rows of
    synthetic samples are ignored); None only when no real sample is in the batch.
    teacher_logits: (B, C, H, W) (rows of real samples ignored); None only when no
    synthetic sample is in the batch. is_synthetic: (B,) bool.
    Returns {"loss", "ce", "dice", "kd"}: scalar tensors; ce/dice/kd are the unweighted
    terms, loss the weighted sum. See the module docstring for the modes.
    """
    is_synthetic = _check_batch(student_logits, target_mask, teacher_logits, is_synthetic, mode, soft_synthetic)
    real = ~is_synthetic
    n_real, n_syn = int(real.sum()), int(is_synthetic.sum())
    zero = student_logits.new_zeros((), dtype=torch.float32)
    ce = dice = kd = zero
    if mode == "hard" or (mode == "soft" and soft_synthetic == "kd+hard"):
        # hard labels for every sample: masks for real ones, teacher argmax for synthetic ones
        labels = torch.empty(student_logits.shape[:1] + student_logits.shape[2:], dtype=torch.long,
                             device=student_logits.device)
        if n_real:
            labels[real] = target_mask[real].long()
        if n_syn:
            labels[is_synthetic] = teacher_logits[is_synthetic].argmax(dim=1)
        ce = F.cross_entropy(student_logits.float(), labels)
        dice = dice_loss(student_logits, labels, eps=dice_eps)
        if mode == "soft" and n_syn:
            kd = kd_loss(student_logits[is_synthetic], teacher_logits[is_synthetic], T)
    else:
        if n_real:
            s, m = student_logits[real], target_mask[real].long()
            ce = F.cross_entropy(s.float(), m)
            dice = dice_loss(s, m, eps=dice_eps)
        if mode == "soft" and n_syn:
            kd = kd_loss(student_logits[is_synthetic], teacher_logits[is_synthetic], T)
    loss = lambda_ce * ce + lambda_dice * dice + lambda_kd * kd
    return {"loss": loss, "ce": ce, "dice": dice, "kd": kd}
