"""Joint sampling of (SAR image, class logits) with SAR-JointNet (PAPER.md Algorithm 2).

From x_T, y'_T ~ N(0, I), each step runs the joint model once -> (x̂, logits), maps the
logits back to the label-signal range (Eq. 21: y_pred = (softmax(logits)·2 − 1)·b) and
takes one deterministic solver step per modality with x̂ and y_pred as the x0-prediction.
Solvers: diffusers' DDIMScheduler (eta = 0, the paper's), DPMSolverMultistepScheduler
(dpmsolver++, 2nd order: fewer steps for the same quality) and UniPCMultistepScheduler
(UniPC, 2nd order, x0-prediction), all on the training schedule's squared-cosine betas.
The two modalities share one solver: its step is elementwise with per-step scalar
coefficients, so stepping the channel-concatenated state (B, 1+C, H, W) once equals
stepping x and y' apart, at half the per-step Python cost.

Device: the forward runs under `dakd.inference.autocast` (by default bf16 on CUDA, float32
on the CPU; `precision`); the solver state stays float32.

Determinism: sample i's initial noise comes from its own ``torch.Generator`` seeded with
``seeds[i]`` (drawn on the CPU, so identical on any device) and both solvers add no
further noise, so a sample depends only on its seed, not on the batch it falls in
(up to the network's floating-point batch invariance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from dakd.config import LABEL_LOSSES, SAMPLERS
from dakd.diffusion.schedule import BETA_SCHEDULE, PREDICTION_TYPE
from dakd.inference import autocast


@dataclass
class SampleBatch:
    """images (B, 1, H, W) float32 in [-1, 1]; logits (B, C, H, W) float32 (the last
    step's Label-Net output: the soft label); masks (B, H, W) uint8 = argmax(logits);
    nfe: network evaluations used (one joint forward each)."""

    images: torch.Tensor
    logits: torch.Tensor
    masks: torch.Tensor
    nfe: int


def make_sampler_scheduler(sampler: str, num_train_timesteps: int):
    """A fresh solver on the training betas (squared cosine, x0-prediction).

    One instance per sampling run: the multistep solvers keep a history of model
    outputs. x̂ is clamped by the caller, so the schedulers do no clipping themselves.
    """
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=BETA_SCHEDULE,
                  prediction_type=PREDICTION_TYPE)
    if sampler == "ddim":
        # "trailing": the first step is at t = T (Algorithm 2's "for t = T to 1") for any
        # step count; set_alpha_to_one: the last step returns the x0-prediction itself
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                             timestep_spacing="trailing")
    if sampler == "dpmsolver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           lower_order_final=True, final_sigmas_type="zero",
                                           thresholding=False)
    if sampler == "unipc":
        return UniPCMultistepScheduler(**common, predict_x0=True, solver_type="bh2", solver_order=2,
                                       lower_order_final=True, final_sigmas_type="zero", thresholding=False)
    raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")


def logits_to_label_signal(logits: torch.Tensor, b: float) -> torch.Tensor:
    """Eq. 21: (B, C, H, W) logits -> label signal (softmax(logits, dim=1)·2 − 1)·b in [−b, b]."""
    return (torch.softmax(logits.float(), dim=1) * 2.0 - 1.0) * b


def initial_noise(seeds: list[int], num_classes: int, height: int, width: int):
    """(x_T (B, 1, H, W), y'_T (B, C, H, W)) float32 on the CPU; row i from its own
    generator seeded with seeds[i] (x drawn first, then y)."""
    xs, ys = [], []
    for seed in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        xs.append(torch.randn((1, height, width), generator=g))
        ys.append(torch.randn((num_classes, height, width), generator=g))
    return torch.stack(xs), torch.stack(ys)


def predictions_to_x0(x_hat: torch.Tensor, out: torch.Tensor, b: float, label_loss: str):
    """Network outputs -> the x0-predictions that go into the solver step:
    x̂ clamped to [-1, 1]; label: Eq. 21 for "ce" logits, the regressed signal clamped
    to [−b, b] for "mse" (the ablation, where Label-Net predicts y0' directly)."""
    x0 = x_hat.float().clamp(-1.0, 1.0)
    if label_loss == "ce":
        return x0, logits_to_label_signal(out, b)
    if label_loss == "mse":
        return x0, out.float().clamp(-abs(b), abs(b))
    raise ValueError(f"label_loss: expected one of {LABEL_LOSSES}, got {label_loss!r}")


@torch.no_grad()
def sample(model, *, sampler: str, steps: int, b: float, seeds: list[int], height: int, width: int,
           device: torch.device | str, num_classes: int, num_train_timesteps: int,
           label_loss: str = "ce", precision: str = "auto") -> SampleBatch:
    """Generate len(seeds) (image, logits) pairs with ``model(x_t, y_t, t) -> (x̂, logits)``.

    sampler: "ddim" | "dpmsolver++" | "unipc"; steps: solver steps (= nfe); b: balancing factor;
    num_train_timesteps: T of the training schedule; label_loss: how Label-Net was trained
    ("ce": outputs logits, mapped by Eq. 21; "mse": outputs the label signal itself, then
    `logits` holds that signal); precision: the forward's arithmetic (config.PRECISIONS; "auto":
    bf16 autocast on CUDA, float32 on the CPU).
    The model is used as given (call .eval() / `dakd.inference.prepare_model` beforehand).
    Returns a SampleBatch on `device`.
    """
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    sched = make_sampler_scheduler(sampler, num_train_timesteps)
    # the schedule stays on the CPU (scalar coefficients, no device syncs); samples on `device`
    sched.set_timesteps(steps)
    x_T, y_T = initial_noise(seeds, num_classes, height, width)
    z = torch.cat([x_T, y_T], dim=1).to(device) * sched.init_noise_sigma  # (B, 1+C, H, W)
    batch = len(seeds)
    t_all = sched.timesteps.to(device=device, dtype=torch.long)
    nfe = 0
    out = None
    for i, t in enumerate(sched.timesteps):
        with autocast(device, precision):
            x_hat, out = model(z[:, :1], z[:, 1:], t_all[i].expand(batch))
        nfe += 1
        x0, y0 = predictions_to_x0(x_hat, out, b, label_loss)
        z = sched.step(torch.cat([x0, y0], dim=1), t, z).prev_sample
    logits = out.float()
    return SampleBatch(images=z[:, :1].float().clamp(-1.0, 1.0), logits=logits,
                       masks=logits.argmax(dim=1).to(torch.uint8), nfe=nfe)
