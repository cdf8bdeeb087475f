"""`dakd train-jointnet`: SAR-JointNet in three stages (PAPER.md) on Ray Train.

Stages run in one global step count (train.jointnet_runner: the per-worker loop).
Checkpoints (safetensors weights + EMA + optimizer + state.json) go to the run's storage
(`output`/`run_name`, file:// or s3://); re-running the same run name resumes from the
last checkpoint, also in the middle of a stage. Rank 0 alone logs to MLflow.
"""

from __future__ import annotations

import json
import logging

from dakd import storage
from dakd.config import TrainJointNetConfig, dump_config
from dakd.data.shards import open_shard_set
from dakd.drills import train_drills
from dakd.errors import ConfigError
from dakd.models.jointnet import JointNet, check_arch
from dakd.progress import current as current_progress, progress_line
from dakd import checkpoints as ckpt_io
from dakd.checkpoints import LATEST, resolve_checkpoint
from dakd.train.jointnet_runner import (JointNetLoop, StagePlan, build_model, plan_stages, set_trainable,
                                        train_loop_per_worker)

__all__ = ["StagePlan", "build_model", "plan_stages", "set_trainable", "resolve_b", "run_train_jointnet",
           "train_loop_per_worker"]

log = logging.getLogger(__name__)


def resolve_b(cfg: TrainJointNetConfig, manifest: dict, where: str) -> float:
    if cfg.b is not None:
        return float(cfg.b)
    bal = manifest.get("balance")
    if not bal:
        raise ConfigError(f"b: not configured and {where} has no balancing factor in its manifest "
                          f"(run `dakd balance --set shards={where}` or set b)")
    return float(bal["b"])


# ---------------------------------------------------------------- driver
def run_train_jointnet(cfg: TrainJointNetConfig) -> dict:
    """Validate inputs, then train on Ray Train; returns the job summary."""
    from dakd import tracking
    from dakd.runtime import init_ray, run_lock

    shard_set = open_shard_set(cfg.shards)
    classes = shard_set.classes
    b = resolve_b(cfg, shard_set.manifest, cfg.shards)
    model = build_model(cfg, classes.num_classes)  # checks the architecture before any compute
    if model.downsample_factor > cfg.crop_size or cfg.crop_size % model.downsample_factor:
        raise ConfigError(f"crop_size {cfg.crop_size}: must be a multiple of {model.downsample_factor} "
                          f"(2^(levels-1) of model.block_out_channels)")
    run_uri = storage.join_uri(cfg.output, cfg.run_name)
    init = _init_from(cfg, model, run_uri)
    drills = train_drills()  # fault drills (tests, rehearsals): none unless the environment asks
    uri = tracking.tracking_uri(cfg.tracking, cfg.output)  # before any compute
    init_ray(cfg.ray)
    with run_lock(cfg.ray, run_uri, "train-jointnet"), progress_line("train-jointnet", plan_stages(cfg)[-1].end):
        with tracking.job_run(cfg.tracking, uri=uri, job="train-jointnet", run_key=run_uri, run_name=cfg.run_name,
                              params=dump_config(cfg), tags={"dakd.b": f"{b:.6g}"}) as run:
            loop = JointNetLoop(config=dump_config(cfg), classes=classes.to_dict(), run_uri=run_uri, b=b,
                                tracking_uri=run.uri, mlflow_run_id=run.run_id, progress=current_progress(),
                                **drills, **init)
            return _fit(cfg, shard_set, loop, run)


def _init_from(cfg: TrainJointNetConfig, model: JointNet, run_uri: str) -> dict:
    """The JointNetLoop fields of a run that starts at a later stage: from `init_checkpoint`,
    whose stages before the first one asked for must be complete (ConfigError otherwise)."""
    first = cfg.run_stages[0]
    if cfg.init_checkpoint:
        init = resolve_checkpoint(cfg.init_checkpoint)
        state = ckpt_io.read_state(init)
        check_arch(model.arch_dict(), state["arch"])
        needed = list(range(1, first))
        if not set(needed) <= set(state.get("stages_completed", [])):
            raise ConfigError(f"init_checkpoint {init}: stages {needed} must be complete before stage {first}; "
                              f"it has completed {state.get('stages_completed', [])}")
        return {"init_checkpoint": init, "init_stages_completed": state.get("stages_completed", []),
                "init_label_initialised": bool(state.get("label_initialised"))}
    if first > 1 and not storage.exists(storage.join_uri(run_uri, LATEST)):
        raise ConfigError(f"run_stages starts at stage {first} but no previous stage's checkpoint is given: "
                          f"set init_checkpoint to a run or checkpoint whose stages 1..{first - 1} are complete")
    return {}


def _fit(cfg: TrainJointNetConfig, shard_set, loop: JointNetLoop, run) -> dict:
    """The training run proper (the caller holds the run and its MLflow run): train, latest.json, summary."""
    from dakd.train.feed import real_dataset
    from dakd.train.runner import checkpoint_uri, fit, make_trainer

    trainer = make_trainer(cfg, train_loop_per_worker, loop,
                           real_dataset(shard_set, "train", cfg.crop_size, cache=cfg.cache_dataset, seed=cfg.seed))
    result = fit(trainer, loop.run_uri)
    metrics = dict(result.metrics or {})
    ckpt_uri = checkpoint_uri(cfg.output, result.checkpoint)
    state = ckpt_io.read_state(ckpt_uri)
    storage.write_text(storage.join_uri(loop.run_uri, LATEST), json.dumps({"checkpoint": ckpt_uri, "step": state["step"]}))
    worker_failures = int(metrics.get("tracking_failures", 0))
    not_logged = worker_failures + run.finish(worker_failures)
    return {"job": "train-jointnet", "checkpoint": ckpt_uri, "run": loop.run_uri, "steps": state["step"],
            "stages_completed": state["stages_completed"], "b": loop.b, "mlflow_run_id": run.run_id,
            "tracking_failures": not_logged,
            "final": {k: metrics[k] for k in ("loss", "loss_x", "loss_y") if k in metrics}}
