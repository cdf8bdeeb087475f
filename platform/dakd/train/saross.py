"""`dakd train-saross`: SAROSS-Net trained on real + synthetic data (DAKD) on Ray Train.

Loss modes (`loss.mode`, train.losses): `real-only` (real crops only), `hard` (synthetic
mosaics with the teacher's argmax as labels) and `soft` (DAKD: KD against the teacher's
logits on synthetic samples, masks on real ones). Data: train.saross_feed.
Each epoch ends with a full-resolution validation on the real `val_split` (confusion
matrix summed over the workers' images -> per-class IoU, mIoU, eval.metrics) and a
checkpoint (safetensors weights + optimizer + state.json, kind "sar-oss-net"). Ray Train
keeps the `keep_checkpoints` best by val mIoU (and always the latest, for resume: re-run
the same `run_name` to continue). The run directory gets `best.json` (the best checkpoint,
what `evaluate`/`predict` use when given the run directory) and `latest.json`.
Rank 0 logs to MLflow: config, each loss term per epoch, val per-class IoU and mIoU,
overlays; the driver logs the best checkpoint as an MLflow model (registered under
`register_name` when set).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import numpy as np
import torch

from dakd import storage
from dakd.config import TEST_SPLIT, TrainSarossConfig, dump_config
from dakd.data.classes import class_table_from_dict
from dakd.data.shards import open_shard_set
from dakd.errors import ConfigError, DataError, TrainingError
from dakd.progress import current as current_progress, progress_line, report as report_progress
from dakd.models.saross import arch_dict, build_student
from dakd import checkpoints as ckpt_io
from dakd.checkpoints import BEST, LATEST, STUDENT_KIND as KIND, load_student

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- per-worker loop
def train_loop_per_worker(loop_cfg: dict) -> None:
    """Ray Train worker: build, restore, train epochs, validate, checkpoint, log (rank 0)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dakd.eval.figures import overlay_panel
    from dakd.inference import segment
    from dakd.eval.metrics import confusion_matrix, segmentation_metrics
    from dakd.train.losses import segmentation_loss
    from dakd.tracking import RunLogger

    cfg = TrainSarossConfig.model_validate(loop_cfg["config"])
    classes = class_table_from_dict(loop_cfg["classes"])
    c = classes.num_classes
    torch.set_num_threads(cfg.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed * 1000 + rank)

    model = build_student(cfg.model, c).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    epoch, step, best = 0, 0, {"miou": -1.0, "epoch": None}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = ckpt_io.read_state(d)
            if state["arch"] != loop_cfg["arch"]:
                raise ConfigError(f"run {loop_cfg['run_uri']}: its checkpoint has architecture {state['arch']}, "
                                  f"the config {loop_cfg['arch']}; use another run_name")
            model.load_state_dict(ckpt_io.load_weights(d))
            opt_state = ckpt_io.load_optimizer_state(d)
            if opt_state is not None:
                opt.load_state_dict(opt_state)
            epoch, best, step = int(state["epoch"]), state["best"], int(state["step"])
        if rank == 0:
            print(f"[train-saross] resumed after epoch {epoch}/{cfg.epochs}", flush=True)
    attempt_start = epoch
    net = DistributedDataParallel(model) if world > 1 else model
    logger = RunLogger(loop_cfg["tracking_uri"], loop_cfg["mlflow_run_id"]) if rank == 0 and loop_cfg.get("mlflow_run_id") else None

    val = [r for i, r in enumerate(open_shard_set(cfg.shards).iter_records(cfg.val_split)) if i % world == rank]
    shard = ray.train.get_dataset_shard("train")
    bs = cfg.per_worker_batch
    mode, lc = cfg.loss.mode, cfg.loss
    dtypes = {"image": torch.float32, "mask": torch.uint8}
    if mode != "real-only":
        dtypes.update(logits=torch.float32, synthetic=torch.bool)
    while epoch < cfg.epochs:
        model.train()
        sums, count, n_seen, n_syn, t0 = {}, 0, 0, 0, time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=bs, drop_last=True, device=device, dtypes=dtypes):
            x, mask = batch["image"], batch["mask"].long()
            syn = batch.get("synthetic")
            if syn is None:
                syn = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = net(x)
            out = segmentation_loss(logits.float(), mask, batch.get("logits"), syn, mode=mode, lambda_ce=lc.lambda_ce,
                                    lambda_dice=lc.lambda_dice, lambda_kd=lc.lambda_kd, T=lc.temperature,
                                    dice_eps=lc.dice_eps, soft_synthetic=lc.soft_synthetic)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not (torch.isfinite(out["loss"]) and torch.isfinite(grad_norm)):
                raise TrainingError(f"non-finite loss or gradient in epoch {epoch + 1} (step {step + 1}); stopped. "
                                    f"The last good checkpoint is kept under {loop_cfg['run_uri']}")
            opt.step()
            step += 1
            count += 1
            n_seen += x.shape[0]
            n_syn += int(syn.sum())
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if rank == 0:
                report_progress(loop_cfg.get("progress"), step, f"epoch {epoch + 1}/{cfg.epochs} loss {float(out['loss']):.4g}")
            if rank == 0 and step % cfg.log_every == 0:
                print(f"[train-saross] epoch {epoch + 1}/{cfg.epochs} step {step} "
                      + " ".join(f"{k} {v / count:.4g}" for k, v in sums.items()), flush=True)
        if count == 0:
            raise TrainingError(f"{cfg.shards}: an epoch gives no full batch of {bs} per worker "
                                f"({cfg.num_workers} workers); lower the batch size or the worker count")
        epoch += 1
        train_time = time.perf_counter() - t0
        # Full-resolution validation: each worker its images, confusion matrices summed.
        model.eval()
        cm = torch.zeros((c, c), dtype=torch.int64)
        overlays = []
        for rec in val:
            pred = segment(model, rec["image"], device)
            cm += confusion_matrix(torch.from_numpy(pred), torch.tensor(rec["mask"]), c)
            if rank == 0 and len(overlays) < cfg.overlay_count:
                overlays.append(overlay_panel(rec["image"], pred, classes, rec["mask"]))
        if world > 1:
            dist.all_reduce(cm)
        vm = segmentation_metrics(cm, classes.names)
        miou = vm["miou"] if vm["miou"] == vm["miou"] else 0.0
        if miou > best["miou"]:
            best = {"miou": miou, "epoch": epoch}
        metrics = {f"train/{k}": v / count for k, v in sums.items()}
        metrics.update({"train/synthetic_share": n_syn / max(n_seen, 1), "train/samples_per_s": n_seen * world / max(train_time, 1e-9),
                        "val/miou": miou, "val/accuracy": vm["accuracy"], "val/f1": vm["f1_mean"]})
        metrics.update({f"val/iou_{name}": v for name, v in vm["iou"].items() if v == v})
        if rank == 0:
            print(f"[train-saross] epoch {epoch}/{cfg.epochs} " + " ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if not k.startswith("val/iou_"))
                + f" (best mIoU {best['miou']:.4g} at epoch {best['epoch']})", flush=True)
            if logger:
                logger.log_metrics(metrics, epoch)
                for i, panel in enumerate(overlays):
                    logger.log_image(panel, f"overlays/epoch_{epoch:04d}_{i}.png")
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                meta = {"kind": KIND, "epoch": epoch, "step": step, "arch": loop_cfg["arch"],
                        "classes": classes.to_dict(), "val": {"miou": miou, "iou": vm["iou"], "split": cfg.val_split},
                        "best": best, "attempt_start_epoch": attempt_start, "loss_mode": mode,
                        "shards": cfg.shards, "synthetic": cfg.synthetic if mode != "real-only" else None,
                        "config": loop_cfg["config"]}
                ckpt_io.save_checkpoint(d, model.state_dict(), meta, None, opt.state_dict())
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"val/miou": miou, "epoch": epoch, "loss": metrics.get("train/loss", 0.0),
                              "tracking_failures": logger.failures if logger else 0}, checkpoint=checkpoint)


# ---------------------------------------------------------------- driver
def _checkpoint_uri(loc, checkpoint) -> str:
    return ("s3://" + checkpoint.path) if loc.scheme == "s3" else checkpoint.path


def _requirements() -> list[str]:
    """Pinned runtime requirements of a logged model (skips MLflow's slow inference of them;
    the `dakd` package itself must be importable where the model is loaded)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "timm", "numpy")]


MODEL_CHECKPOINT_ARTIFACT = "dakd_checkpoint"  # run artifact: the best checkpoint's weights (safetensors) + state.json


def log_mlflow_model(uri: str, run_id: str, checkpoint: str, register_name: str | None) -> dict:
    """Log a SAROSS-Net checkpoint to an MLflow run as a pytorch model with a tensor signature
    (input (-1, 1, -1, -1) float32 normalised image, output (-1, C, -1, -1) float32 logits);
    the class table and architecture go into the model's metadata. The checkpoint's
    safetensors weights and state.json are logged beside it (run artifact
    `dakd_checkpoint/`, named in the metadata): dakd loads registered models from those, never
    by unpickling the pytorch flavour's model file. Returns {"model_uri", "registered"}."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model, state = load_student(checkpoint)
    c = state["arch"]["num_classes"]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, state["arch"]["in_chans"], -1, -1), "image")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, -1, -1), "logits")]))
    client = mlflow.MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory() as d:
        for name in (ckpt_io.MODEL_FILE, ckpt_io.STATE_FILE):
            with open(os.path.join(d, name), "wb") as f:
                f.write(storage.read_bytes(storage.join_uri(state["location"], name)))
        client.log_artifacts(run_id, d, MODEL_CHECKPOINT_ARTIFACT)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name="model", signature=signature, serialization_format="pickle",
                                        pip_requirements=_requirements(), registered_model_name=register_name,
                                        metadata={"dakd_kind": KIND, "dakd_classes": state["classes"],
                                                  "dakd_arch": state["arch"], "dakd_checkpoint": state["location"],
                                                  "dakd_checkpoint_artifacts": f"runs:/{run_id}/{MODEL_CHECKPOINT_ARTIFACT}"})
    version = getattr(info, "registered_model_version", None)
    return {"model_uri": info.model_uri, "registered": f"models:/{register_name}/{version}" if register_name and version else None}


def check_val_split(real, cfg: TrainSarossConfig) -> int:
    """The selection split must exist and give every worker at least one image; returns its
    size. DataError naming the shard set and the setting otherwise."""
    if cfg.val_split not in real.manifest["splits"]:
        raise DataError(real.root, f"val_split={cfg.val_split!r}: no such split (has: {', '.join(real.splits)}); "
                        "carve one at ingest with source.val_fraction (e.g. 0.1), or name another split")
    count = int(real.manifest["splits"][cfg.val_split]["count"])
    if count < cfg.num_workers:
        raise DataError(real.root, f"val_split={cfg.val_split!r} holds {count} image(s), fewer than the "
                        f"{cfg.num_workers} workers that validate on it; raise source.val_fraction or lower num_workers")
    return count


def selection_info(cfg: TrainSarossConfig) -> dict:
    """How the best checkpoint is chosen (goes into best.json, the summary and MLflow)."""
    return {"selected_on": cfg.val_split, "selected_on_test": cfg.val_split == TEST_SPLIT}


def run_train_saross(cfg: TrainSarossConfig, callbacks: list | None = None) -> dict:
    """Validate inputs, train on Ray Train, record the best checkpoint; returns the job summary.
    `callbacks`: Ray Train callbacks for the run (e.g. Tune's TuneReportCallback when run in a sweep trial)."""
    from dakd import tracking
    from dakd.runtime import init_ray, run_lock
    from dakd.train.saross_feed import training_dataset

    real = open_shard_set(cfg.shards)
    classes = real.classes
    check_val_split(real, cfg)
    build_student(cfg.model, classes.num_classes)  # encoder name, weights, heads: checked before any compute
    run_uri = storage.join_uri(cfg.output, cfg.run_name)
    arch = arch_dict(cfg.model, classes.num_classes)

    init_ray(cfg.ray)
    dataset, data_info = training_dataset(real, cfg.train_split, cfg.crop_size, synthetic=cfg.synthetic,
                                          mode=cfg.loss.mode, share=cfg.synthetic_share, use_mosaic=cfg.mosaic,
                                          cache=cfg.cache_dataset)
    per_epoch = (data_info["real"] + data_info["synthetic"]) // (cfg.per_worker_batch * cfg.num_workers)
    if cfg.val_split == TEST_SPLIT:
        log.warning("train-saross: the best checkpoint is selected on the test split (select_on_test=true); "
                    "figures reported on that split are optimistic and flagged as such")
    print(f"[train-saross] {cfg.loss.mode}: {data_info['real']} real + {data_info['synthetic']} synthetic samples "
          f"per epoch, about {per_epoch} steps per epoch, {cfg.epochs} epochs, {cfg.num_workers} workers", flush=True)

    uri = None
    if cfg.tracking.enabled:
        uri = tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.output)
        tracking.check_tracking(uri)  # before any compute
    with run_lock(cfg.ray, run_uri, "train-saross"), progress_line(f"train-saross {cfg.loss.mode}", per_epoch * cfg.epochs):
        return _fit(cfg, callbacks, classes, arch, run_uri, dataset, data_info, per_epoch, uri)


def _fit(cfg: TrainSarossConfig, callbacks: list | None, classes, arch: dict, run_uri: str, dataset, data_info: dict,
         per_epoch: int, uri: str | None) -> dict:
    """The training run proper (the caller holds the run): MLflow run, TorchTrainer, best/latest pointers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dakd import tracking

    run_id = None
    if uri:
        run_id = tracking.start_or_resume_run(uri, cfg.tracking.experiment, run_key=run_uri, run_name=cfg.run_name,
                                              params=dump_config(cfg),
                                              tags={"dakd.job": "train-saross", "dakd.loss_mode": cfg.loss.mode,
                                                    **{f"dakd.{k}": str(v).lower() if isinstance(v, bool) else v
                                                       for k, v in selection_info(cfg).items()}},
                                              parent_run_id=cfg.tracking.parent_run_id)
    loop_cfg = {"config": dump_config(cfg), "classes": classes.to_dict(), "arch": arch, "run_uri": run_uri,
                "mlflow_run_id": run_id, "tracking_uri": uri, "steps_per_epoch": per_epoch, "progress": current_progress()}
    loc = storage.resolve(cfg.output)
    storage.ensure_dir(cfg.output, create_bucket=cfg.create_bucket)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": dataset},
        run_config=RunConfig(name=cfg.run_name, storage_path=loc.path, storage_filesystem=loc.fs, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                                checkpoint_score_attribute="val/miou",
                                                                checkpoint_score_order="max")),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        cause = exc
        while cause is not None and not isinstance(cause, TrainingError):
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if isinstance(cause, TrainingError):
            raise TrainingError(str(cause)) from exc
        raise
    if result.checkpoint is None:
        raise TrainingError(f"training under {run_uri} finished without a checkpoint")
    last = _checkpoint_uri(loc, result.checkpoint)
    last_state = ckpt_io.read_state(last)
    candidates = [(m.get("val/miou", -1.0), _checkpoint_uri(loc, ck)) for ck, m in (result.best_checkpoints or [])]
    best_miou, best_uri = max(candidates, key=lambda t: t[0]) if candidates else (last_state["val"]["miou"], last)
    best_state = ckpt_io.read_state(best_uri)
    storage.write_text(storage.join_uri(run_uri, LATEST), json.dumps({"checkpoint": last, "epoch": last_state["epoch"]}))
    selection = selection_info(cfg)
    batch = cfg.per_worker_batch * cfg.num_workers
    storage.write_text(storage.join_uri(run_uri, BEST), json.dumps(
        {"checkpoint": best_uri, "epoch": best_state["epoch"], "val_miou": best_state["val"]["miou"],
         "val_split": cfg.val_split, **selection}))
    model_info, failures = {}, 0
    if run_id:  # the server may have gone away mid-run: failed calls are counted, not raised
        c = tracking.RunLogger(uri, run_id)
        c.log_dict({"checkpoint": best_uri, "epoch": best_state["epoch"], "val_miou": best_state["val"]["miou"]},
                   "best_checkpoint.json")
        c.call(c.client.set_tag, run_id, "dakd.best_checkpoint", best_uri)
        model_info = c.call(log_mlflow_model, uri, run_id, best_uri, cfg.register_name) or {}
        failures = c.failures
    failures += int((result.metrics or {}).get("tracking_failures", 0))
    failures += tracking.end_run(uri, run_id, "train-saross", failures)
    print(f"[train-saross] best checkpoint: epoch {best_state['epoch']} val mIoU {100 * best_state['val']['miou']:.2f}% "
          f"-> {best_uri}", flush=True)
    return {"job": "train-saross", "run": run_uri, "mode": cfg.loss.mode, "checkpoint": best_uri, "last_checkpoint": last,
            "epochs": last_state["epoch"], "best_epoch": best_state["epoch"], "val_miou": best_state["val"]["miou"],
            **selection, "steps": int(last_state["step"]), "batch_size": batch,
            "samples_seen": int(last_state["step"]) * batch,  # every step: a full batch on every worker
            "data": data_info, "mlflow_run_id": run_id, **model_info,
            "tracking_failures": failures}
