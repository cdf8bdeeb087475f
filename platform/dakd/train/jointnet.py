"""`dakd train-jointnet`: SAR-JointNet in three stages (PAPER.md) on Ray Train.

Stages run in one global step count: stage 1 trains SAR-Net alone on L_x; stage 2 starts
Label-Net from SAR-Net's (EMA) weights and trains Label-Net + every interaction conv on
L_joint, the rest of SAR-Net frozen; stage 3 trains everything on L_joint at a lower lr.
Checkpoints (safetensors weights + EMA + optimizer + state.json) go to the run's storage
(`output`/`run_name`, file:// or s3://); re-running the same run name resumes from the
last checkpoint, also in the middle of a stage. Rank 0 alone logs to MLflow.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from dakd import storage
from dakd.config import TrainJointNetConfig, dump_config
from dakd.data.classes import class_table_from_dict
from dakd.data.shards import open_shard_set
from dakd.data.transforms import denormalize_image
from dakd.diffusion.samplers import sample
from dakd.diffusion.schedule import joint_loss, make_train_scheduler, sample_timesteps, sar_loss
from dakd.errors import ConfigError, DakdError, TrainingError
from dakd.models.jointnet import JointNet, check_arch
from dakd.progress import current as current_progress, progress_line, report as report_progress
from dakd.seeds import sample_seed
from dakd import checkpoints as ckpt_io
from dakd.checkpoints import LATEST, resolve_checkpoint
from dakd.train.ema import EMA

log = logging.getLogger(__name__)

NONFINITE = "nonfinite.json"  # written by rank 0 when a loss or gradient is not finite




@dataclass(frozen=True)
class StagePlan:
    stage: int
    start: int  # global step at which the stage starts
    end: int  # global step at which it ends (exclusive)
    lr: float


def plan_stages(cfg: TrainJointNetConfig) -> list[StagePlan]:
    plans, start = [], 0
    for s in cfg.run_stages:
        st = getattr(cfg.stages, f"stage{s}")
        plans.append(StagePlan(s, start, start + st.iterations, st.lr))
        start += st.iterations
    return plans


def build_model(cfg: TrainJointNetConfig, num_classes: int) -> JointNet:
    m = cfg.model
    return JointNet(in_channels_image=1, num_classes=num_classes, block_out_channels=tuple(m.block_out_channels),
                    layers_per_block=m.layers_per_block, attention_levels=tuple(m.attention_levels),
                    norm_num_groups=m.norm_num_groups, attention_head_dim=m.attention_head_dim,
                    sample_size=cfg.crop_size)


def set_trainable(model: JointNet, stage: int) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what `stage` trains; returns those parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = {
        1: model.sar_parameters,
        2: lambda: model.label_parameters() + model.interaction_parameters(),
        3: lambda: list(model.parameters()),
    }[stage]()
    for p in params:
        p.requires_grad_(True)
    return params


def resolve_b(cfg: TrainJointNetConfig, manifest: dict, where: str) -> float:
    if cfg.b is not None:
        return float(cfg.b)
    bal = manifest.get("balance")
    if not bal:
        raise ConfigError(f"b: not configured and {where} has no balancing factor in its manifest "
                          f"(run `dakd balance --set shards={where}` or set b)")
    return float(bal["b"])


# ---------------------------------------------------------------- per-worker loop
def train_loop_per_worker(loop_cfg: dict) -> None:
    """Ray Train worker: build, restore, train the planned stages, checkpoint, log (rank 0)."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from dakd.eval.figures import sample_grid
    from dakd.tracking import RunLogger

    cfg = TrainJointNetConfig.model_validate(loop_cfg["config"])
    b, classes = float(loop_cfg["b"]), class_table_from_dict(loop_cfg["classes"])
    torch.set_num_threads(cfg.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed * 1000 + rank)

    model = build_model(cfg, classes.num_classes).to(device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema else None
    plans = plan_stages(cfg)
    total = plans[-1].end
    step, opt_state, opt_stage, label_initialised = 0, None, None, cfg.run_stages[0] > 2
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = ckpt_io.read_state(d)
            check_arch(model.arch_dict(), state["arch"])
            model.load_state_dict(ckpt_io.load_weights(d))
            if ema is not None and os.path.exists(os.path.join(d, ckpt_io.EMA_FILE)):
                ema.load_state_dict(ckpt_io.load_weights(d, ema=True), state.get("ema_steps", 0))
            opt_state, opt_stage = ckpt_io.load_optimizer_state(d), state["stage"]
            step, label_initialised = int(state["step"]), bool(state.get("label_initialised"))
        if rank == 0:
            print(f"[train-jointnet] resumed from step {step}/{total} (stage {opt_stage})", flush=True)
    elif loop_cfg.get("init_checkpoint"):
        model.load_state_dict(ckpt_io.load_weights(loop_cfg["init_checkpoint"]))
        label_initialised = bool(loop_cfg.get("init_label_initialised"))
        if ema is not None:
            ema.reset(model)

    attempt_start = step  # where this worker attempt started (0, or the restored step)
    logger = None
    if rank == 0 and loop_cfg.get("mlflow_run_id"):
        logger = RunLogger(loop_cfg["tracking_uri"], loop_cfg["mlflow_run_id"])
    scheduler = make_train_scheduler(cfg.num_train_timesteps)
    shard = ray.train.get_dataset_shard("train")
    bs = cfg.per_worker_batch
    fault_at = loop_cfg.get("fail_at_step")

    def save_and_report(stage: int, metrics: dict, opt) -> None:
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                meta = {"kind": "sar-jointnet", "step": step, "stage": stage, "total_steps": total,
                        "stages_completed": [p.stage for p in plans if p.end <= step] + loop_cfg.get("init_stages_completed", []),
                        "label_initialised": label_initialised, "arch": model.arch_dict(), "b": b,
                        "classes": classes.to_dict(), "num_train_timesteps": cfg.num_train_timesteps,
                        "label_loss": cfg.label_loss, "ema_steps": ema.steps if ema else 0,
                        "attempt_start_step": attempt_start,
                        "shards": cfg.shards, "config": loop_cfg["config"]}
                ckpt_io.save_checkpoint(d, model.state_dict(), meta, ema.state_dict() if ema else None, opt.state_dict())
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({**metrics, "step": step, "stage": stage}, checkpoint=checkpoint)

    def log_samples(stage: int) -> None:
        net = copy.deepcopy(model)
        if ema is not None:
            net.load_state_dict(ema.state_dict())
        net.eval()
        seeds = [sample_seed(cfg.seed, f"grid/{i}") for i in range(cfg.sample_count)]
        out = sample(net, sampler="ddim", steps=cfg.sample_steps, b=b, seeds=seeds, height=cfg.crop_size,
                     width=cfg.crop_size, device=device, num_classes=classes.num_classes,
                     num_train_timesteps=cfg.num_train_timesteps, label_loss=cfg.label_loss)
        grid = sample_grid(denormalize_image(out.images[:, 0]).cpu().numpy(), out.masks.cpu().numpy(), classes.colorize)
        logger.log_image(grid, f"samples/step_{step:07d}.png")

    for plan in plans:
        if step >= plan.end:
            continue
        if plan.stage >= 2 and not label_initialised:
            # Stage 2 starts Label-Net from SAR-Net's weights (the EMA ones when kept).
            if ema is not None:
                model.load_state_dict(ema.state_dict())
            model.init_label_net_from_sar()
            label_initialised = True
            if ema is not None:
                ema.reset(model)
        params = set_trainable(model, plan.stage)
        net = DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=cfg.weight_decay)
        if opt_state is not None and opt_stage == plan.stage and step > plan.start:
            opt.load_state_dict(opt_state)
        opt_state = None
        sums, count, n_seen, t0 = {}, 0, 0, time.perf_counter()
        while step < plan.end:
            batches = 0
            for batch in shard.iter_torch_batches(batch_size=bs, drop_last=True, device=device,
                                                  dtypes={"image": torch.float32, "mask": torch.uint8}):
                batches += 1
                x0, mask = batch["image"], batch["mask"].long()
                t = sample_timesteps(scheduler, x0.shape[0], device)
                noise_x = torch.randn_like(x0)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    if plan.stage == 1:
                        out = sar_loss(net, scheduler, x0, t, noise_x)
                    else:
                        noise_y = torch.randn((x0.shape[0], classes.num_classes, *x0.shape[-2:]), device=device)
                        out = joint_loss(net, scheduler, x0, mask, b, t, noise_x, noise_y, cfg.label_loss)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if not (torch.isfinite(out["loss"]) and torch.isfinite(grad_norm)):
                    # Every rank sees the same all-reduced grad norm, so all stop here together;
                    # no checkpoint is written, the last good one stays as it is.
                    if rank == 0:
                        storage.write_text(storage.join_uri(loop_cfg["run_uri"], NONFINITE),
                                           json.dumps({"step": step + 1, "stage": plan.stage}))
                        if logger:
                            logger.end("FAILED")
                    return
                opt.step()
                if ema is not None:
                    ema.update(model)
                step += 1
                n_seen += x0.shape[0] * world
                count += 1
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if rank == 0:
                    report_progress(loop_cfg.get("progress"), step, f"stage {plan.stage} loss {float(out['loss']):.4g}")
                if step % cfg.log_every == 0 or step == plan.end:
                    dt = time.perf_counter() - t0
                    metrics = {f"train/{k}": v / count for k, v in sums.items()}
                    metrics.update({"train/lr": plan.lr, "train/samples_per_s": n_seen / max(dt, 1e-9),
                                    "train/stage": plan.stage})
                    if rank == 0:
                        print(f"[train-jointnet] stage {plan.stage} step {step}/{total} "
                              + " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items()), flush=True)
                        if logger:
                            logger.log_metrics(metrics, step)
                    sums, count, n_seen, t0 = {}, 0, 0, time.perf_counter()
                if rank == 0 and logger and plan.stage >= 2 and (step % cfg.sample_every == 0 or step == total):
                    log_samples(plan.stage)
                if step % cfg.checkpoint_every == 0 or step == plan.end:
                    losses = {k: float(v.detach()) for k, v in out.items()}
                    save_and_report(plan.stage, {**losses, "tracking_failures": logger.failures if logger else 0}, opt)
                    if fault_at is not None and step == fault_at:
                        raise RuntimeError(f"fault injected after step {step} (fail_at_step)")
                if step >= plan.end:
                    break
            if batches == 0:
                raise DakdError(f"{cfg.shards}: the train split gives no full batch of {bs} per worker "
                                f"({cfg.num_workers} workers); lower batch_size_per_worker or num_workers")


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

    loop_cfg = {"config": dump_config(cfg), "b": b, "classes": classes.to_dict(), "run_uri": run_uri}
    first = cfg.run_stages[0]
    if cfg.init_checkpoint:
        init = resolve_checkpoint(cfg.init_checkpoint)
        state = ckpt_io.read_state(init)
        check_arch(model.arch_dict(), state["arch"])
        needed = list(range(1, first))
        if not set(needed) <= set(state.get("stages_completed", [])):
            raise ConfigError(f"init_checkpoint {init}: stages {needed} must be complete before stage {first}; "
                              f"it has completed {state.get('stages_completed', [])}")
        loop_cfg.update(init_checkpoint=init, init_stages_completed=state.get("stages_completed", []),
                        init_label_initialised=bool(state.get("label_initialised")))
    elif first > 1 and not storage.exists(storage.join_uri(run_uri, LATEST)):
        raise ConfigError(f"run_stages starts at stage {first} but no previous stage's checkpoint is given: "
                          f"set init_checkpoint to a run or checkpoint whose stages 1..{first - 1} are complete")

    uri = None
    if cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.output)
        tracking.check_tracking(uri)  # before any compute
    init_ray(cfg.ray)
    with run_lock(cfg.ray, run_uri, "train-jointnet"), progress_line("train-jointnet", plan_stages(cfg)[-1].end):
        return _fit(cfg, shard_set, b, run_uri, loop_cfg, uri)


def _fit(cfg: TrainJointNetConfig, shard_set, b: float, run_uri: str, loop_cfg: dict, uri: str | None) -> dict:
    """The training run proper (the caller holds the run): MLflow run, TorchTrainer, latest.json."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dakd import tracking
    from dakd.train.feed import real_dataset

    run_id = None
    if uri:
        run_id = tracking.start_or_resume_run(uri, cfg.tracking.experiment, run_key=run_uri,
                                              run_name=cfg.run_name, params=dump_config(cfg),
                                              tags={"dakd.job": "train-jointnet", "dakd.b": f"{b:.6g}"},
                                              parent_run_id=cfg.tracking.parent_run_id)
    # Fault drills and tests: DAKD_FAIL_AT_STEP=k makes the workers fail once right after the
    # checkpoint of step k (Ray Train then restarts them from that checkpoint).
    fail_at = os.environ.get("DAKD_FAIL_AT_STEP")
    loop_cfg.update(mlflow_run_id=run_id, tracking_uri=uri, fail_at_step=int(fail_at) if fail_at else None,
                    progress=current_progress())

    loc = storage.resolve(cfg.output)
    storage.ensure_dir(cfg.output, create_bucket=cfg.create_bucket)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": real_dataset(shard_set, "train", cfg.crop_size, cache=cfg.cache_dataset)},
        run_config=RunConfig(name=cfg.run_name, storage_path=loc.path, storage_filesystem=loc.fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    nonfinite = storage.join_uri(run_uri, NONFINITE)
    if storage.exists(nonfinite):
        storage.resolve(nonfinite).fs.delete_file(storage.resolve(nonfinite).path)
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    if storage.exists(nonfinite):
        bad = json.loads(storage.read_text(nonfinite))
        raise TrainingError(f"non-finite loss or gradient at step {bad['step']} (stage {bad['stage']}); stopped. "
                            f"The last good checkpoint is kept under {run_uri}")
    if result.checkpoint is None:
        raise TrainingError(f"training under {run_uri} finished without a checkpoint")
    ckpt_uri = ("s3://" + result.checkpoint.path) if loc.scheme == "s3" else result.checkpoint.path
    state = ckpt_io.read_state(ckpt_uri)
    storage.write_text(storage.join_uri(run_uri, LATEST), json.dumps({"checkpoint": ckpt_uri, "step": state["step"]}))
    worker_failures = int(metrics.get("tracking_failures", 0))
    not_logged = worker_failures + tracking.end_run(uri, run_id, "train-jointnet", worker_failures)
    return {"job": "train-jointnet", "checkpoint": ckpt_uri, "run": run_uri, "steps": state["step"],
            "stages_completed": state["stages_completed"], "b": b, "mlflow_run_id": run_id,
            "tracking_failures": not_logged,
            "final": {k: metrics[k] for k in ("loss", "loss_x", "loss_y") if k in metrics}}
