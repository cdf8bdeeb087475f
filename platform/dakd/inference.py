"""Inference device set-up shared by synthesis, evaluation and prediction.

On a CUDA device the network runs in bf16 autocast (weights stay float32; outputs are cast
back to float32 by the callers) with channels_last weights (faster convolutions on tensor
cores); `compile=True` wraps it in ``torch.compile``. On the CPU it runs in float32 as
given, so CPU results (and the tests) do not depend on these settings.
"""

from __future__ import annotations

import contextlib

import torch


def inference_device(gpus: float) -> torch.device:
    """The device of an actor given its GPU share: CUDA when it has one and CUDA is there."""
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def prepare_model(model: torch.nn.Module, device: torch.device | str, *, compile: bool = False) -> torch.nn.Module:
    """model -> eval mode on `device`; channels_last on CUDA; torch.compile'd when `compile`."""
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


def autocast(device: torch.device | str, bf16: bool = True):
    """Context: bf16 autocast on CUDA (unless bf16=False: float32), nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_name(device: torch.device | str) -> str:
    """'bf16-autocast' on CUDA, 'fp32' elsewhere (recorded in provenance)."""
    return "bf16-autocast" if torch.device(device).type == "cuda" else "fp32"


def describe_device(device: torch.device | str) -> str:
    """A hardware name for provenance: the CUDA device name, or 'cpu'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
