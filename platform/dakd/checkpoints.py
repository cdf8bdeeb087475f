"""Checkpoints: weights in safetensors (no pickle), optimizer state loadable with
`torch.load(weights_only=True)`, and a small JSON of provenance. Saving, verifying,
resolving (checkpoint directory, run directory with latest.json / best.json) and loading
teacher (SAR-JointNet) and student (SAROSS-Net) checkpoints: what training, `sample`,
`synth/`, `eval/` and `predict` share, so none of the latter imports `train/`.

A checkpoint is a directory (local, or a URI read through dakd.storage):
    model.safetensors      model weights
    ema.safetensors        EMA weights (optional)
    optimizer.pt           optimizer state (tensors, numbers, lists, dicts only)
    state.json             step, stage, architecture, config, code version, and
                           weights_sha256 {file name: sha256 hex} of the safetensors files
Loading checks: state.json must parse and pass `CheckpointState` (architecture sizes
within bounds, so a damaged file cannot ask for terabytes); each weights file must be
valid safetensors and, when state.json records its sha256 (checkpoints written since it
was added; older ones load without the check), match it. Every failure is a DataError
naming the file (exit 2).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from dakd import __version__, storage
from dakd.config import TrackingConfig
from dakd.data.classes import ClassTable, class_table_from_dict
from dakd.errors import ConfigError, DataError

if TYPE_CHECKING:  # imported where a model is built: diffusers alone costs seconds in every Ray worker
    from dakd.models.jointnet import JointNet
    from dakd.models.saross import SAROSSNet

MAX_CHANNELS = 8192  # widest layer any checkpoint may declare
MAX_CLASSES = 1024


class ArchBounds(BaseModel):
    """The architecture sizes a checkpoint declares, bounded (other keys pass through)."""

    model_config = ConfigDict(extra="allow")
    decoder_channels: list[int] | None = Field(None, min_length=1, max_length=8)
    block_out_channels: list[int] | None = Field(None, min_length=1, max_length=8)
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)
    in_chans: int | None = Field(None, ge=1, le=16)
    layers_per_block: int | None = Field(None, ge=1, le=16)
    sample_size: int | None = Field(None, ge=8, le=8192)
    attention_head_dim: int | None = Field(None, ge=1, le=MAX_CHANNELS)
    norm_num_groups: int | None = Field(None, ge=1, le=MAX_CHANNELS)

    def model_post_init(self, _context) -> None:
        for name in ("decoder_channels", "block_out_channels"):
            for c in getattr(self, name) or []:
                if not 1 <= c <= MAX_CHANNELS:
                    raise ValueError(f"{name}: {c} out of bounds 1..{MAX_CHANNELS}")


class CheckpointState(BaseModel):
    """state.json, validated before anything is built from it (other keys pass through)."""

    model_config = ConfigDict(extra="allow")
    kind: str | None = None
    arch: ArchBounds | None = None
    weights_sha256: dict[str, str] | None = None
    step: int | None = Field(None, ge=0)


MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
LATEST = "latest.json"  # run directory: pointer to its last checkpoint
BEST = "best.json"  # train-saross run directory: pointer to its best checkpoint (by val mIoU)
TEACHER_KIND = "sar-jointnet"
STUDENT_KIND = "sar-oss-net"


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(directory: str, model_state: dict, meta: dict, ema_state: dict | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Write a checkpoint into a local directory (Ray Train uploads it to the run's storage)."""
    os.makedirs(directory, exist_ok=True)
    save_file(_contiguous(model_state), os.path.join(directory, MODEL_FILE))
    written = [MODEL_FILE]
    if ema_state is not None:
        save_file(_contiguous(ema_state), os.path.join(directory, EMA_FILE))
        written.append(EMA_FILE)
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(directory, OPTIMIZER_FILE))
    hashes = {}
    for name in written:
        with open(os.path.join(directory, name), "rb") as f:
            hashes[name] = hashlib.sha256(f.read()).hexdigest()
    meta = {"code_version": __version__, **meta, "weights_sha256": hashes}
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(meta, f, indent=2, default=str)


def teacher_meta(model: JointNet, classes: ClassTable, *, step: int, b: float, num_train_timesteps: int,
                 label_loss: str, **extra) -> dict:
    """The state.json fields every SAR-JointNet checkpoint carries: what `load_teacher`,
    `sample` and synthesis read (kind, arch, classes, b, the noise schedule's length, the
    label loss), plus `extra` (train-jointnet's stage, EMA steps, config, ...)."""
    return {"kind": TEACHER_KIND, "step": step, "arch": model.arch_dict(), "b": b, "classes": classes.to_dict(),
            "num_train_timesteps": num_train_timesteps, "label_loss": label_loss, **extra}


def read_state(location: str) -> dict:
    """The state.json of a checkpoint directory or URI: ConfigError naming it when absent,
    DataError naming it when it is not JSON or fails `CheckpointState`."""
    uri = storage.join_uri(location, STATE_FILE)
    if not storage.exists(uri):
        raise ConfigError(f"{location}: not a dakd checkpoint (no {STATE_FILE})")
    state = storage.read_json_object(uri, damaged="; the checkpoint is damaged")
    try:
        CheckpointState.model_validate(state)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise DataError(uri, f"invalid checkpoint state ({problems})") from None
    return state


def _weights_bytes(location: str, name: str) -> bytes:
    """The bytes of weights file `name`, checked against state.json's sha256 when recorded."""
    uri = storage.join_uri(location, name)
    if not storage.exists(uri):
        raise ConfigError(f"{location}: checkpoint has no {name}")
    data = storage.read_bytes(uri)
    expected = (read_state(location).get("weights_sha256") or {}).get(name)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise DataError(uri, f"sha256 {hashlib.sha256(data).hexdigest()[:16]}... differs from the "
                             f"{expected[:16]}... recorded in {STATE_FILE}: the weights are damaged or were replaced")
    return data


def load_weights(location: str, ema: bool = False) -> dict:
    """Model (or EMA) weights of a checkpoint directory or URI (DataError naming a damaged file)."""
    name = EMA_FILE if ema else MODEL_FILE
    data = _weights_bytes(location, name)
    try:
        return load_safetensors_bytes(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError / others for bad headers
        raise DataError(storage.join_uri(location, name),
                        f"not a valid safetensors file, truncated or damaged ({type(exc).__name__}: {exc})") from None


def load_state_into(model: torch.nn.Module, location: str, ema: bool = False) -> None:
    """Load a checkpoint's weights into `model`; DataError naming the file when they do not fit."""
    weights = load_weights(location, ema=ema)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise DataError(storage.join_uri(location, EMA_FILE if ema else MODEL_FILE),
                        f"weights do not fit the architecture in {STATE_FILE} ({str(exc)[:300]})") from None


def load_optimizer_state(location: str) -> dict | None:
    uri = storage.join_uri(location, OPTIMIZER_FILE)
    if not storage.exists(uri):
        return None
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise DataError(uri, f"optimizer state cannot be read, truncated or damaged ({type(exc).__name__})") from None


def weights_hash(location: str, ema: bool = False) -> str:
    """sha256 of the weights file (content identity of a teacher, for provenance); checked
    against the hash recorded in state.json when there is one."""
    return hashlib.sha256(_weights_bytes(location, EMA_FILE if ema else MODEL_FILE)).hexdigest()


# ---------------------------------------------------------------- resolve and load models
def resolve_checkpoint(uri: str) -> str:
    """A checkpoint location: a checkpoint directory, or a run directory holding latest.json."""
    if storage.exists(storage.join_uri(uri, STATE_FILE)):
        return uri
    pointer = storage.join_uri(uri, LATEST)
    if storage.exists(pointer):
        return json.loads(storage.read_text(pointer))["checkpoint"]
    raise ConfigError(f"{uri}: no checkpoint here (expected {STATE_FILE} or {LATEST})")


def resolve_student_checkpoint(uri: str) -> str:
    """A checkpoint directory, or a run directory: its best.json, else its latest.json."""
    pointer = storage.join_uri(uri, BEST)
    if not storage.exists(storage.join_uri(uri, STATE_FILE)) and storage.exists(pointer):
        return json.loads(storage.read_text(pointer))["checkpoint"]
    return resolve_checkpoint(uri)


def load_teacher(uri: str, ema: bool = True) -> tuple[JointNet, dict]:
    """(model in eval mode on CPU, state.json) of a SAR-JointNet checkpoint; EMA weights when present."""
    location = resolve_checkpoint(uri)
    state = read_state(location)
    if state.get("kind") != TEACHER_KIND:
        raise ConfigError(f"{location}: not a SAR-JointNet checkpoint (kind {state.get('kind')!r})")
    from dakd.models.jointnet import JointNet

    model = JointNet.from_arch(state["arch"])
    use_ema = ema and storage.exists(storage.join_uri(location, EMA_FILE))
    load_state_into(model, location, ema=use_ema)
    state["location"] = location
    state["weights"] = "ema" if use_ema else "model"
    return model.eval(), state


def load_student(uri: str) -> tuple[SAROSSNet, dict]:
    """(SAROSS-Net in eval mode on CPU, state.json + "location", "weights") of a checkpoint or
    run dir: its EMA weights when it has them (train-saross `ema_decay`: those were validated
    and selected), else its model weights."""
    location = resolve_student_checkpoint(uri)
    state = read_state(location)
    if state.get("kind") != STUDENT_KIND:
        raise ConfigError(f"{location}: not a SAROSS-Net checkpoint (kind {state.get('kind')!r}, expected {STUDENT_KIND!r})")
    arch = state["arch"]
    from dakd.models.saross import build_student

    model = build_student(arch, arch["num_classes"], arch["in_chans"], pretrained=False)
    use_ema = storage.exists(storage.join_uri(location, EMA_FILE))
    load_state_into(model, location, ema=use_ema)
    state["location"] = location
    state["weights"] = "ema" if use_ema else "model"
    return model.eval(), state


def load_model(uri: str, tracking: TrackingConfig | None = None) -> tuple[torch.nn.Module, ClassTable, dict]:
    """A SAROSS-Net (eval mode, CPU) + class table + provenance from a checkpoint directory,
    a train-saross run directory (its best checkpoint), or an MLflow `models:/<name>/<version>` URI.
    An MLflow model is loaded from the safetensors checkpoint logged beside it, never unpickled."""
    if str(uri).startswith("models:/") or str(uri).startswith("runs:/"):
        import mlflow

        if tracking is not None:
            from dakd import tracking as trk

            mlflow.set_tracking_uri(tracking.uri or trk.resolve_tracking_uri(None, "."))
        try:
            meta = mlflow.models.get_model_info(uri).metadata or {}
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
            raise ConfigError(f"model {uri}: cannot be loaded from MLflow ({type(exc).__name__}: {str(exc)[:300]})") from exc
        if "dakd_checkpoint_artifacts" not in meta:
            raise ConfigError(f"model {uri}: not a dakd SAROSS-Net model (no dakd_checkpoint_artifacts in its metadata)")
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=meta["dakd_checkpoint_artifacts"])
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"model {uri}: its checkpoint {meta['dakd_checkpoint_artifacts']} cannot be downloaded "
                              f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        model, state = load_student(local)
        return model, class_table_from_dict(state["classes"]), {"model": uri, "arch": state["arch"],
                                                                "selected_on": state.get("val", {}).get("split"),
                                                                "weights_sha256": state.get("weights_sha256")}

    model, state = load_student(uri)
    return model, class_table_from_dict(state["classes"]), {"model": state["location"], "arch": state["arch"],
                                                            "epoch": state.get("epoch"),
                                                            "selected_on": state.get("val", {}).get("split"),
                                                            "weights_sha256": state.get("weights_sha256")}
