"""Weight files that are not dakd checkpoints (pretrained encoders, InceptionV3): the one
reader of a state dict from a path or URI. dakd's own checkpoints: dakd.checkpoints."""

from __future__ import annotations

import io

from dakd import storage
from dakd.errors import ConfigError, StorageError


def read_state_dict(uri: str, what: str = "model.pretrained: weights") -> dict:
    """A state dict of tensors from a weights file (path or URI): `.safetensors` read with
    safetensors, anything else with `torch.load(weights_only=True)`, so nothing arbitrary is
    unpickled; a {"state_dict_ema" | "state_dict" | "model": ...} wrapper and DDP's `module.`
    prefix are removed. ConfigError starting with `what` (the setting) when it is absent or unreadable."""
    import torch

    try:
        found = storage.exists(uri)
    except StorageError as exc:
        raise ConfigError(f"{what} {uri}: {exc}") from exc
    if not found:
        raise ConfigError(f"{what} not found: {uri}")
    try:
        data = storage.read_bytes(uri)
    except StorageError as exc:
        raise ConfigError(f"{what} {uri}: {exc}") from exc
    try:
        if str(uri).endswith(".safetensors"):
            from safetensors.torch import load as st_load

            obj = st_load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle holding more than tensors
        raise ConfigError(f"{what} {uri}: cannot be read as safetensors or as a "
                          f"weights-only torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{what} {uri}: expected a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
