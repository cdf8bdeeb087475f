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

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from dakd import storage
from dakd.config import TEST_SPLIT, TrainSarossConfig, dump_config
from dakd.data.shards import open_shard_set
from dakd.errors import ConfigError, DataError, TrainingError
from dakd.progress import current as current_progress, progress_line
from dakd import checkpoints as ckpt_io
from dakd.checkpoints import BEST, LATEST, STUDENT_KIND as KIND, load_student
from dakd.models.saross import arch_dict, build_student
from dakd.train.ema import EMA
from dakd.train.losses import segmentation_loss
from dakd.train.runner import LoopConfig, TrainLoopRunner, adamw, fit, make_trainer

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- per-worker loop
@dataclass(frozen=True, kw_only=True)
class SarossLoop(LoopConfig):
    """train-saross's worker settings: the architecture its checkpoints must have."""

    arch: dict
    total_steps: int = 0  # the run's expected optimiser steps (epochs x steps per epoch): the lr schedule's length


def scheduled_lr(schedule: str, lr: float, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based): `lr` for "constant"; for "cosine",
    lr * (1 + cos(pi * step / total_steps)) / 2, from `lr` at step 0 down to 0 at `total_steps`
    (and 0 after it). A function of the step alone, so a resumed run continues the same curve."""
    if schedule == "constant" or total_steps <= 0:
        return lr
    return float(lr * 0.5 * (1.0 + np.cos(np.pi * min(step / total_steps, 1.0))))


class SarossRunner(TrainLoopRunner):
    """One worker of train-saross: epochs of training, each ending with a full-resolution
    validation (confusion matrices summed over the workers) and a checkpoint."""

    job = "train-saross"
    config_model = TrainSarossConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.model = build_student(cfg.model, self.classes.num_classes).to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.ema_model = None  # the network validation loads the EMA weights into (built on first use)
        self.opt = adamw(self.model.parameters(), cfg.lr, cfg.weight_decay)
        self.epoch, self.best, self.attempt_start = 0, {"miou": -1.0, "epoch": None}, 0
        self.dtypes = {"image": torch.float32, "mask": torch.uint8}
        if cfg.loss.mode != "real-only":
            self.dtypes.update(logits=torch.float32, synthetic=torch.bool)

    def load_state(self, directory: str, state: dict) -> None:
        if state["arch"] != self.loop.arch:
            raise ConfigError(f"run {self.loop.run_uri}: its checkpoint has architecture {state['arch']}, "
                              f"the config {self.loop.arch}; use another run_name")
        self.model.load_state_dict(ckpt_io.load_weights(directory))
        opt_state = ckpt_io.load_optimizer_state(directory)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        if self.ema is not None:
            self.ema.restore(directory, state, self.model)
        self.epoch, self.best, self.step = int(state["epoch"]), state["best"], int(state["step"])
        self.attempt_start = self.epoch
        self.say(f"resumed after epoch {self.epoch}/{self.cfg.epochs}")

    def checkpoint_meta(self) -> dict:
        cfg, mode = self.cfg, self.cfg.loss.mode
        return {"kind": KIND, "epoch": self.epoch, "step": self.step, "arch": self.loop.arch,
                "classes": self.classes.to_dict(), "val": {"miou": self.val["miou"], "iou": self.val["iou"],
                                                           "split": cfg.val_split},
                "best": self.best, "attempt_start_epoch": self.attempt_start, "loss_mode": mode,
                "ema_steps": self.ema.steps if self.ema else 0,
                "shards": cfg.shards, "synthetic": cfg.synthetic if mode != "real-only" else None,
                "config": self.loop.config}

    def train(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.net = DistributedDataParallel(self.model) if self.world > 1 else self.model  # after any restore
        val = [r for i, r in enumerate(open_shard_set(self.cfg.shards).iter_records(self.cfg.val_split))
               if i % self.world == self.rank]
        while self.epoch < self.cfg.epochs:
            t0 = time.perf_counter()
            sums, counts = self.train_epoch()
            self.epoch += 1
            metrics = {f"train/{k}": v / counts["steps"] for k, v in sums.items()}
            metrics.update({"train/synthetic_share": counts["synthetic"] / max(counts["samples"], 1),
                            "train/lr": self.opt.param_groups[0]["lr"],
                            "train/samples_per_s": counts["samples"] * self.world / max(time.perf_counter() - t0, 1e-9)})
            overlays = self.validate(val, metrics)
            self.log_epoch(metrics, overlays)
            self.save_and_report({"val/miou": self.val["miou"], "epoch": self.epoch,
                                  "loss": metrics.get("train/loss", 0.0), "tracking_failures": self.tracking_failures()},
                                 self.model, self.opt, self.ema.state_dict() if self.ema else None)

    def train_epoch(self) -> tuple[dict, dict]:
        """One pass over the worker's shard: (summed loss terms, {"steps", "samples", "synthetic"})."""
        cfg = self.cfg
        self.model.train()
        sums, counts = {}, {"steps": 0, "samples": 0, "synthetic": 0}
        batches = self.batches(self.dtypes)
        if cfg.prefetch_epoch:  # read first, then train: the feed's tasks and the steps do not share the cores
            batches = list(batches)
        for batch in batches:
            out, syn = self.train_step(batch)
            counts["steps"] += 1
            counts["samples"] += syn.shape[0]
            counts["synthetic"] += int(syn.sum())
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            self.progress(f"epoch {self.epoch + 1}/{cfg.epochs} loss {float(out['loss'].detach()):.4g}")
            if self.step % cfg.log_every == 0:
                self.say(f"epoch {self.epoch + 1}/{cfg.epochs} step {self.step} "
                         + " ".join(f"{k} {v / counts['steps']:.4g}" for k, v in sums.items()))
        if counts["steps"] == 0:
            raise TrainingError(f"{cfg.shards}: an epoch gives no full batch of {cfg.per_worker_batch} per worker "
                                f"({cfg.num_workers} workers); lower the batch size or the worker count")
        return sums, counts

    def train_step(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """One optimiser step; returns (the loss terms, the batch's is-synthetic flags)."""
        lc = self.cfg.loss
        x, mask = batch["image"], batch["mask"].long()
        syn = batch.get("synthetic")
        if syn is None:
            syn = torch.zeros(x.shape[0], dtype=torch.bool, device=self.device)
        with self.autocast():
            logits = self.net(x)
        out = segmentation_loss(logits.float(), mask, batch.get("logits"), syn, mode=lc.mode, lambda_ce=lc.lambda_ce,
                                lambda_dice=lc.lambda_dice, lambda_kd=lc.lambda_kd, T=lc.temperature,
                                dice_eps=lc.dice_eps, soft_synthetic=lc.soft_synthetic)
        for group in self.opt.param_groups:
            group["lr"] = scheduled_lr(self.cfg.lr_schedule, self.cfg.lr, self.step, self.loop.total_steps)
        self.optimizer_step(out["loss"], self.model.parameters(), self.opt, f"epoch {self.epoch + 1}")
        if self.ema is not None:
            self.ema.update(self.model)
        return out, syn

    def validate(self, val: list[dict], metrics: dict) -> list:
        """Full-resolution validation of this worker's images, confusion matrices summed over the
        workers; adds the val/ metrics, updates the best epoch; returns rank 0's overlay panels."""
        import torch.distributed as dist

        from dakd.eval.figures import overlay_panel
        from dakd.inference import segment_many
        from dakd.eval.metrics import confusion_matrix, segmentation_metrics

        c = self.classes.num_classes
        model = self.validation_model()
        cm = torch.zeros((c, c), dtype=torch.int64)
        overlays = []
        preds = segment_many(model, [rec["image"] for rec in val], self.device, self.cfg.val_batch_size)
        for rec, pred in zip(val, preds):
            cm += confusion_matrix(torch.from_numpy(pred), torch.tensor(rec["mask"]), c)
            if self.rank == 0 and len(overlays) < self.cfg.overlay_count:
                overlays.append(overlay_panel(rec["image"], pred, self.classes, rec["mask"]))
        if self.world > 1:
            dist.all_reduce(cm)
        vm = segmentation_metrics(cm, self.classes.names)
        miou = vm["miou"] if vm["miou"] == vm["miou"] else 0.0
        if miou > self.best["miou"]:
            self.best = {"miou": miou, "epoch": self.epoch}
        self.val = {"miou": miou, "iou": vm["iou"]}
        metrics.update({"val/miou": miou, "val/accuracy": vm["accuracy"], "val/f1": vm["f1_mean"]})
        metrics.update({f"val/iou_{name}": v for name, v in vm["iou"].items() if v == v})
        return overlays

    def validation_model(self) -> torch.nn.Module:
        """What validation scores (in eval mode): the EMA weights when kept (loaded into a second
        network, so training continues on the raw ones), else the model itself."""
        if self.ema is None:
            return self.model.eval()
        if self.ema_model is None:
            self.ema_model = build_student(self.cfg.model, self.classes.num_classes, pretrained=False).to(self.device)
        self.ema_model.load_state_dict(self.ema.state_dict())
        return self.ema_model.eval()

    def log_epoch(self, metrics: dict, overlays: list) -> None:
        self.say(f"epoch {self.epoch}/{self.cfg.epochs} " + " ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if not k.startswith("val/iou_"))
            + f" (best mIoU {self.best['miou']:.4g} at epoch {self.best['epoch']})")
        if self.logger:
            self.logger.log_metrics(metrics, self.epoch)
            for i, panel in enumerate(overlays):
                self.logger.log_image(panel, f"overlays/epoch_{self.epoch:04d}_{i}.png")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker of train-saross."""
    SarossRunner(SarossLoop.from_dict(config)).run()


# ---------------------------------------------------------------- driver
def _requirements() -> list[str]:
    """Pinned runtime requirements of a logged model (skips MLflow's slow inference of them;
    the `dakd` package itself must be importable where the model is loaded)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "timm", "numpy")]


MODEL_CHECKPOINT_ARTIFACT = "dakd_checkpoint"  # run artifact: the best checkpoint's weights (safetensors) + state.json


@contextlib.contextmanager
def _without_pickle_caution():
    """mlflow.pytorch warns on every pickled model that unpickling can run code. dakd never
    unpickles it (it loads the safetensors logged beside it, see `log_mlflow_model`), so the
    warning would only be noise in every job's output; other mlflow.pytorch warnings pass."""
    logger = logging.getLogger("mlflow.pytorch")
    drop = lambda record: "by Pickle or CloudPickle" not in record.getMessage()  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


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
        for name in [ckpt_io.MODEL_FILE, ckpt_io.STATE_FILE] + ([ckpt_io.EMA_FILE] if state["weights"] == "ema" else []):
            with open(os.path.join(d, name), "wb") as f:
                f.write(storage.read_bytes(storage.join_uri(state["location"], name)))
        client.log_artifacts(run_id, d, MODEL_CHECKPOINT_ARTIFACT)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id), _without_pickle_caution():
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
    from dakd.train.saross_feed import check_prefetch_memory, training_dataset

    real = open_shard_set(cfg.shards)
    classes = real.classes
    check_val_split(real, cfg)
    build_student(cfg.model, classes.num_classes)  # encoder name, weights, heads: checked before any compute
    run_uri = storage.join_uri(cfg.output, cfg.run_name)
    arch = arch_dict(cfg.model, classes.num_classes)

    init_ray(cfg.ray)
    dataset, data_info = training_dataset(real, cfg.train_split, cfg.crop_size, synthetic=cfg.synthetic,
                                          mode=cfg.loss.mode, share=cfg.synthetic_share, use_mosaic=cfg.mosaic,
                                          cache=cfg.cache_dataset, seed=cfg.seed)
    check_prefetch_memory(cfg, data_info, classes.num_classes)
    per_epoch = (data_info["real"] + data_info["synthetic"]) // (cfg.per_worker_batch * cfg.num_workers)
    if cfg.val_split == TEST_SPLIT:
        log.warning("train-saross: the best checkpoint is selected on the test split (select_on_test=true); "
                    "figures reported on that split are optimistic and flagged as such")
    print(f"[train-saross] {cfg.loss.mode}: {data_info['real']} real + {data_info['synthetic']} synthetic samples "
          f"per epoch, about {per_epoch} steps per epoch, {cfg.epochs} epochs, {cfg.num_workers} workers", flush=True)

    uri = tracking.tracking_uri(cfg.tracking, cfg.output)  # before any compute
    tags = {"dakd.loss_mode": cfg.loss.mode,
            **{f"dakd.{k}": str(v).lower() if isinstance(v, bool) else v for k, v in selection_info(cfg).items()}}
    with run_lock(cfg.ray, run_uri, "train-saross"), progress_line(f"train-saross {cfg.loss.mode}", per_epoch * cfg.epochs):
        with tracking.job_run(cfg.tracking, uri=uri, job="train-saross", run_key=run_uri, run_name=cfg.run_name,
                              params=dump_config(cfg), tags=tags) as run:
            loop = SarossLoop(config=dump_config(cfg), classes=classes.to_dict(), run_uri=run_uri, arch=arch,
                              total_steps=per_epoch * cfg.epochs, tracking_uri=run.uri, mlflow_run_id=run.run_id,
                              progress=current_progress())
            trainer = make_trainer(cfg, train_loop_per_worker, loop, dataset, callbacks=callbacks, score="val/miou")
            result = fit(trainer, run_uri)
            return _finish(cfg, result, run, data_info)


def _finish(cfg: TrainSarossConfig, result, run, data_info: dict) -> dict:
    """After training: best.json and latest.json, the best checkpoint on the MLflow run (and as
    its model), the summary."""
    from dakd.train.runner import checkpoint_uri

    run_uri = storage.join_uri(cfg.output, cfg.run_name)
    uri, run_id = run.uri, run.run_id
    last = checkpoint_uri(cfg.output, result.checkpoint)
    last_state = ckpt_io.read_state(last)
    candidates = [(m.get("val/miou", -1.0), checkpoint_uri(cfg.output, ck)) for ck, m in (result.best_checkpoints or [])]
    best_miou, best_uri = max(candidates, key=lambda t: t[0]) if candidates else (last_state["val"]["miou"], last)
    best_state = ckpt_io.read_state(best_uri)
    storage.write_text(storage.join_uri(run_uri, LATEST), json.dumps({"checkpoint": last, "epoch": last_state["epoch"]}))
    selection = selection_info(cfg)
    batch = cfg.per_worker_batch * cfg.num_workers
    storage.write_text(storage.join_uri(run_uri, BEST), json.dumps(
        {"checkpoint": best_uri, "epoch": best_state["epoch"], "val_miou": best_state["val"]["miou"],
         "val_split": cfg.val_split, **selection}))
    model_info = {}
    if run_id:  # the server may have gone away mid-run: failed calls are counted, not raised
        c = run.logger
        c.log_dict({"checkpoint": best_uri, "epoch": best_state["epoch"], "val_miou": best_state["val"]["miou"]},
                   "best_checkpoint.json")
        c.call(c.client.set_tag, run_id, "dakd.best_checkpoint", best_uri)
        model_info = c.call(log_mlflow_model, uri, run_id, best_uri, cfg.register_name) or {}
    worker_failures = int((result.metrics or {}).get("tracking_failures", 0))
    failures = worker_failures + run.finish(worker_failures)
    print(f"[train-saross] best checkpoint: epoch {best_state['epoch']} val mIoU {100 * best_state['val']['miou']:.2f}% "
          f"-> {best_uri}", flush=True)
    return {"job": "train-saross", "run": run_uri, "mode": cfg.loss.mode, "checkpoint": best_uri, "last_checkpoint": last,
            "epochs": last_state["epoch"], "best_epoch": best_state["epoch"], "val_miou": best_state["val"]["miou"],
            **selection, "steps": int(last_state["step"]), "batch_size": batch,
            "samples_seen": int(last_state["step"]) * batch,  # every step: a full batch on every worker
            "data": data_info, "mlflow_run_id": run_id, **model_info,
            "tracking_failures": failures}
