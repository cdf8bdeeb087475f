"""Checkpoints: weights in safetensors (no pickle), optimizer state loadable with
`torch.load(weights_only=True)`, and a small JSON of provenance.

A checkpoint is a directory (local, or a URI read through dakd.storage):
    model.safetensors      model weights
    ema.safetensors        EMA weights (optional)
    optimizer.pt           optimizer state (tensors, numbers, lists, dicts only)
    state.json             step, stage, architecture, config, code version, ...
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from dakd import __version__, storage
from dakd.errors import ConfigError

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(directory: str, model_state: dict, meta: dict, ema_state: dict | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Write a checkpoint into a local directory (Ray Train uploads it to the run's storage)."""
    os.makedirs(directory, exist_ok=True)
    save_file(_contiguous(model_state), os.path.join(directory, MODEL_FILE))
    if ema_state is not None:
        save_file(_contiguous(ema_state), os.path.join(directory, EMA_FILE))
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(directory, OPTIMIZER_FILE))
    meta = {"code_version": __version__, **meta}
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(meta, f, indent=2, default=str)


def read_state(location: str) -> dict:
    """The state.json of a checkpoint directory or URI (ConfigError naming it when absent)."""
    uri = storage.join_uri(location, STATE_FILE)
    if not storage.exists(uri):
        raise ConfigError(f"{location}: not a dakd checkpoint (no {STATE_FILE})")
    return json.loads(storage.read_text(uri))


def load_weights(location: str, ema: bool = False) -> dict:
    """Model (or EMA) weights of a checkpoint directory or URI."""
    name = EMA_FILE if ema else MODEL_FILE
    uri = storage.join_uri(location, name)
    if not storage.exists(uri):
        raise ConfigError(f"{location}: checkpoint has no {name}")
    return load_safetensors_bytes(storage.read_bytes(uri))


def load_optimizer_state(location: str) -> dict | None:
    uri = storage.join_uri(location, OPTIMIZER_FILE)
    if not storage.exists(uri):
        return None
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


def weights_hash(location: str, ema: bool = False) -> str:
    """sha256 of the weights file (content identity of a teacher, for provenance)."""
    return hashlib.sha256(storage.read_bytes(storage.join_uri(location, EMA_FILE if ema else MODEL_FILE))).hexdigest()
