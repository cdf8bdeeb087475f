"""Exponential moving average of model weights, kept by parameter name (so it saves as
safetensors next to the model; BatchNorm statistics included). Warm-up as in diffusers' EMAModel:
decay_t = min(decay, (1 + t) / (10 + t))."""

from __future__ import annotations

import torch


def _float_copy(state: dict) -> dict:
    """Floating-point tensors as float32 copies; others (BatchNorm's int64 num_batches_tracked) keep their dtype."""
    return {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone() for k, v in state.items()}


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.steps = 0
        self.shadow = _float_copy(model.state_dict())

    def reset(self, model: torch.nn.Module) -> None:
        """Restart the average at the model's current weights (e.g. when a stage re-initialises a branch)."""
        self.shadow = _float_copy(model.state_dict())
        self.steps = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow <- shadow + (1 - decay_t) * (weights - shadow) for floating-point tensors (one
        fused `_foreach_lerp_`, as diffusers' EMAModel with foreach=True), a copy for the rest."""
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        shadows, weights = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                shadows.append(self.shadow[k])
                weights.append(v.float())  # the tensor itself when already float32
            else:
                self.shadow[k].copy_(v)
        if shadows:
            torch._foreach_lerp_(shadows, weights, 1.0 - decay)
        self.steps += 1

    def state_dict(self) -> dict:
        return self.shadow

    def restore(self, directory: str, state: dict, model: torch.nn.Module) -> None:
        """On resume: the average saved in checkpoint `directory` (ema.safetensors, state.json's
        ema_steps); a checkpoint without one restarts the average at `model`'s restored weights."""
        from dakd import checkpoints as ckpt_io, storage

        if storage.exists(storage.join_uri(directory, ckpt_io.EMA_FILE)):
            self.load_state_dict(ckpt_io.load_weights(directory, ema=True), state.get("ema_steps", 0))
        else:
            self.reset(model)

    def load_state_dict(self, state: dict, steps: int) -> None:
        self.shadow = _float_copy(state)
        self.steps = int(steps)
