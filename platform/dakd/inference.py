"""Inference shared by synthesis, evaluation, prediction and validation: actor set-up
(threads, device, model), `segment` (an image of any size -> class map, tiled when large) and
`segment_many` (many images, those of one size in batches: validation and evaluation).

On a CUDA device the network runs in bf16 autocast (weights stay float32; outputs are cast
back to float32 by the callers) with channels_last weights (faster convolutions on tensor
cores); `compile=True` wraps it in ``torch.compile``. On the CPU it runs in float32 as
given, so CPU results (and the tests) do not depend on these settings, unless a job's
`precision: bf16` asks for bf16 autocast there too (`autocast`, `uses_bf16`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np
import torch

from dakd.data.transforms import normalize_image


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


def setup_actor(load_model, gpus: float, threads: int, *, compile: bool = False
                ) -> tuple[torch.device, torch.nn.Module | None]:
    """An inference actor's set-up, in this order: `threads` torch threads, its device
    (inference_device), then the model from `load_model()` (a callable, so that it is built
    under the thread setting; None: no model) on the device in eval mode (prepare_model).
    Returns (device, model)."""
    torch.set_num_threads(int(threads))
    device = inference_device(gpus)
    if load_model is None:
        return device, None
    return device, prepare_model(load_model(), device, compile=compile)


def uses_bf16(device: torch.device | str, precision: str = "auto") -> bool:
    """Whether the network runs in bf16 autocast for a `precision` setting (config.PRECISIONS):
    'auto' on CUDA only, 'bf16' on any device, 'fp32' never."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast(device: torch.device | str, precision: str = "auto"):
    """Context: bf16 autocast where `uses_bf16(device, precision)`, nothing otherwise."""
    device = torch.device(device)
    if uses_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_bf16_paths() -> list[str]:
    """The native bf16 matrix paths of this CPU that torch sees: a subset of ["AMX", "AVX512-BF16"]."""
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    return [label for label, check in checks if getattr(torch.cpu, check, lambda: False)()]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AMX tiles or AVX512-BF16), where
    bf16 autocast beats float32; elsewhere oneDNN emulates bf16 and it is slower."""
    return bool(native_bf16_paths())


def describe_cpu() -> str:
    """This machine's CPU for benchmark reports, e.g. 'AMD EPYC, 2 cores, native bf16: AVX512-BF16':
    figures measured on different CPUs (with or without AMX) are not comparable."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:  # not Linux
        pass
    return f"{name or 'unknown CPU'}, {os.cpu_count()} cores, native bf16: {', '.join(native_bf16_paths()) or 'none'}"


def precision_name(device: torch.device | str, precision: str = "auto") -> str:
    """'bf16-autocast' where `uses_bf16(device, precision)`, else 'fp32' (recorded in provenance)."""
    return "bf16-autocast" if uses_bf16(device, precision) else "fp32"


def describe_device(device: torch.device | str) -> str:
    """A hardware name for provenance: the CUDA device name, or 'cpu'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


@torch.no_grad()
def batch_logits(model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, H, W) uint8 grey images of one size -> (N, C, H, W) float32 logits on CPU, in one forward."""
    device = torch.device(device)
    x = normalize_image(torch.from_numpy(np.array(images, dtype=np.uint8)))[:, None].to(device)
    with autocast(device):
        logits = model(x)
    return logits.float().cpu()


def segment_logits(model: torch.nn.Module, image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) uint8 grey image -> (C, H, W) float32 logits on CPU, at full resolution."""
    return batch_logits(model, np.asarray(image, dtype=np.uint8)[None], device)[0]


# Scenes larger than TILE pixels on a side (OSD 650x1250 stays whole) are segmented in
# overlapping TILE x TILE tiles:
# memory is then set by the tile, not the scene (a 6000x6000 scene in well under 2 GB).
TILE = 2048
TILE_OVERLAP = 128


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """[(origin, keep_start, keep_stop)] along one axis of length `size`: tiles of `tile`
    pixels whose kept interiors (each tile's margins of `overlap` pixels dropped, except at
    the scene's edges) cover 0..size exactly once."""
    if size <= tile:
        return [(0, 0, size)]
    stride = tile - 2 * overlap
    spans, covered = [], 0
    for start in range(0, size, stride):
        origin = min(start, size - tile)
        stop = size if origin + tile >= size else origin + tile - overlap
        spans.append((origin, covered, stop))
        covered = stop
        if stop >= size:
            break
    return spans


def segment(model: torch.nn.Module, image: np.ndarray, device: torch.device | str = "cpu",
            tile: int = TILE, overlap: int = TILE_OVERLAP) -> np.ndarray:
    """(H, W) uint8 grey image -> (H, W) uint8 class map (argmax of the logits). Whole when
    both sides are <= tile; otherwise tile by tile (see tile_spans), so peak memory does
    not grow with the scene beyond the (H, W) image and class map themselves."""
    h, w = image.shape
    if h <= tile and w <= tile:
        return segment_logits(model, image, device).argmax(dim=0).to(torch.uint8).numpy()
    out = np.empty((h, w), dtype=np.uint8)
    for y0, ya, yb in tile_spans(h, tile, overlap):
        for x0, xa, xb in tile_spans(w, tile, overlap):
            part = image[y0 : y0 + min(tile, h), x0 : x0 + min(tile, w)]
            pred = segment_logits(model, part, device).argmax(dim=0).to(torch.uint8).numpy()
            out[ya:yb, xa:xb] = pred[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return out


def segment_many(model: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device | str = "cpu",
                 batch_size: int = 8) -> list[np.ndarray]:
    """(H, W) uint8 grey images -> their (H, W) uint8 class maps, in order. Consecutive images
    of one size, at most TILE on a side, go through the network up to `batch_size` at a time and
    at most TILE x TILE pixels per batch, so a batch needs no more memory than one tile (batches
    of 8 at 256 px: 0.75 of the time of one image per forward on a 2-core Xeon,
    benchmarks/validation.py); larger images go tile by tile (`segment`). The same maps as
    `segment` image by image (eval-mode layers act per image), up to floating-point rounding."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    out: list[np.ndarray] = []
    run: list[np.ndarray] = []

    def flush() -> None:
        if run:
            out.extend(batch_logits(model, np.stack(run), device).argmax(dim=1).to(torch.uint8).numpy())
            run.clear()

    for image in images:
        if max(image.shape) > TILE:
            flush()
            out.append(segment(model, image, device))
            continue
        full = len(run) == batch_size or (len(run) + 1) * image.size > TILE * TILE
        if run and (image.shape != run[0].shape or full):
            flush()
        run.append(image)
    flush()
    return out
