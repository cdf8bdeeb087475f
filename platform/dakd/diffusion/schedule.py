"""Training-side diffusion math for SAR-JointNet (PAPER.md Eq. 1-7, Algorithm 1).

improved-diffusion style: the network is an argument, the schedule lives in a diffusers
scheduler; no nn.Module here. Both networks predict the clean signal (x0-prediction).

Forward process (independent noise per modality, same t):
    x_t  = alpha_t · x0       + sigma_t · eps
    y'_t = alpha_t · b · y0   + sigma_t · eps'      (y0 = 2·onehot(mask) − 1)
with alpha_t = sqrt(alphā_t), sigma_t = sqrt(1 − alphā_t) of the squared-cosine DDPM
schedule, t ~ Uniform{0, …, T−1} (diffusers' 0-based index of the paper's 1…T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dakd.config import LABEL_LOSSES
from dakd.data.transforms import label_signal

BETA_SCHEDULE = "squaredcos_cap_v2"
PREDICTION_TYPE = "sample"


def make_train_scheduler(num_train_timesteps: int) -> DDPMScheduler:
    """The training noise schedule: squared-cosine betas, x0 (``sample``) prediction."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=BETA_SCHEDULE,
        prediction_type=PREDICTION_TYPE,
        clip_sample=False,
    )


def sample_timesteps(scheduler: DDPMScheduler, batch_size: int, device: torch.device | str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ Uniform{0, …, T−1}: (B,) long on `device` (drawn on the generator's device)."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
    return t.to(device)


def q_sample(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_t · x0 + sigma_t · noise, for x0/noise (B, …) and t (B,) long."""
    return scheduler.add_noise(x0, noise, t)


def forward_process(scheduler: DDPMScheduler, x0: torch.Tensor, mask: torch.Tensor, b: float, t: torch.Tensor,
                    noise_x: torch.Tensor, noise_y: torch.Tensor):
    """Noise both modalities at the same t.

    x0 (B, 1, H, W) in [-1, 1]; mask (B, H, W) class index; noise_y (B, C, H, W) fixes C.
    Returns (x_t (B, 1, H, W), y_t (B, C, H, W), y0' = b·(2·onehot − 1) (B, C, H, W)).
    """
    y0 = label_signal(mask, noise_y.shape[1], b).to(device=x0.device, dtype=x0.dtype)
    return q_sample(scheduler, x0, noise_x, t), q_sample(scheduler, y0, noise_y, t), y0


def sar_loss(model, scheduler: DDPMScheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict:
    """Stage 1, Eq. 5: L_x = MSE(x̂_θ(x_t, t), x0) with SAR-Net alone (``model(x_t, None, t)``).

    x0, noise (B, 1, H, W); t (B,). Returns {"loss", "loss_x"} (scalars; loss == loss_x).
    """
    x_t = q_sample(scheduler, x0, noise, t)
    x_hat, _ = model(x_t, None, t)
    loss_x = F.mse_loss(x_hat.float(), x0.float())
    return {"loss": loss_x, "loss_x": loss_x}


def label_loss_fn(logits: torch.Tensor, mask: torch.Tensor, y0: torch.Tensor, label_loss: str) -> torch.Tensor:
    """Eq. 6. "ce": cross-entropy of logits (B, C, H, W) against mask (B, H, W), mean over
    pixels; "mse" (the paper's ablation): MSE of the output against y0' (B, C, H, W)."""
    if label_loss == "ce":
        return F.cross_entropy(logits.float(), mask.long())
    if label_loss == "mse":
        return F.mse_loss(logits.float(), y0.float())
    raise ValueError(f"label_loss: expected one of {LABEL_LOSSES}, got {label_loss!r}")


def joint_loss(model, scheduler: DDPMScheduler, x0: torch.Tensor, mask: torch.Tensor, b: float, t: torch.Tensor,
               noise_x: torch.Tensor, noise_y: torch.Tensor, label_loss: str) -> dict:
    """Stages 2-3, Eq. 7: L_joint = L_x + L_y with the coupled model ``model(x_t, y_t, t)``.

    x0 (B, 1, H, W); mask (B, H, W) class index; noise_x (B, 1, H, W); noise_y (B, C, H, W);
    t (B,) long. Returns {"loss", "loss_x", "loss_y"} (scalar tensors).
    """
    x_t, y_t, y0 = forward_process(scheduler, x0, mask, b, t, noise_x, noise_y)
    x_hat, logits = model(x_t, y_t, t)
    loss_x = F.mse_loss(x_hat.float(), x0.float())
    loss_y = label_loss_fn(logits, mask, y0, label_loss)
    return {"loss": loss_x + loss_y, "loss_x": loss_x, "loss_y": loss_y}
