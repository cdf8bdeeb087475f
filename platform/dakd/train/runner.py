"""The shared shape of a per-worker training loop on Ray Train, and the trainer around it.

As in Ray's release-benchmark runner, a job's per-worker function is two lines: rebuild
the job's typed `LoopConfig` from Ray's dict, build the job's runner from it, `run()`. `TrainLoopRunner.run` restores
the last checkpoint (or starts fresh), then calls the job's `train()`, which is made of the
shared pieces here: `batches()` (the worker's shard), `adamw()` (the optimizer),
`optimizer_step()` (backward, clip, the one non-finite rule, step), `save_and_report()` (rank 0 writes the checkpoint, every
rank reports) and `progress()`/`say()` (rank 0 only). Subclasses fill in `setup()`,
`load_state()`, `checkpoint_meta()` and `train()`.

One rule for a non-finite loss or gradient, in every job: the step is not taken, no
checkpoint is written (the last good one stays), rank 0 records step, where and loss in
`<run>/nonfinite.json`, every worker ends its loop (all see the same all-reduced gradient
norm, so they stop together; a restarted worker stops at once), and the driver raises
TrainingError naming the step and the loss (`fit()`).

Driver side: `make_trainer()` builds the TorchTrainer of either job and `fit()` runs it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Iterator

import torch

from dakd import storage
from dakd.data.classes import class_table_from_dict
from dakd.errors import TrainingError
from dakd.progress import report as report_progress
from dakd.seeds import worker_seed
from dakd import checkpoints as ckpt_io

NONFINITE = "nonfinite.json"  # written by rank 0 when a loss or gradient is not finite


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (Ray Train's `train_loop_config`, sent as a plain
    dict by `to_dict` and rebuilt by `from_dict`, so Ray can show it)."""

    config: dict  # the job's config, dumped (validated again on the worker)
    classes: dict  # ClassTable.to_dict()
    run_uri: str  # the run's directory (checkpoints, nonfinite.json)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # rank 0 logs into it when set
    progress: Any = None  # dakd.progress handle of the driver's progress line
    fail_at_step: int | None = None  # fault drills: fail once right after this step's checkpoint
    hold_at_step: str | None = None  # fault drills: "k:/local/marker": after step k, wait while the marker exists

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**data)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Every job's optimizer: AdamW with torch's fused kernel (one pass over all parameters
    instead of one per tensor; the same update). On a 2-core CPU the teacher's optimizer step
    takes under a third of the per-tensor loop's time (benchmarks/optimizer.py)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


class NonFiniteLoss(Exception):
    """Raised inside a worker by `optimizer_step`; `run()` turns it into the marker and a stop."""

    def __init__(self, step: int, where: str, loss: float):
        super().__init__(f"non-finite loss or gradient at step {step} ({where}, loss {loss:.4g})")
        self.step, self.where, self.loss = step, where, loss


class TrainLoopRunner:
    """One Ray Train worker of a job. `step` counts optimiser steps of the whole run."""

    job: ClassVar[str]  # e.g. "train-jointnet": prefixes the worker's lines
    config_model: ClassVar[type]  # the job's pydantic config model

    def __init__(self, loop: LoopConfig):
        import ray.train
        import ray.train.torch

        self.loop = loop
        self.cfg = self.config_model.model_validate(loop.config)
        self.classes = class_table_from_dict(loop.classes)
        torch.set_num_threads(self.cfg.torch_threads)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(worker_seed(self.cfg.seed, self.rank))
        self.step = 0
        self.logger = None
        self.setup()
        from dakd.inference import cpu_has_native_bf16

        if self.cfg.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            self.say("warning: precision bf16 on a CPU without AMX or AVX512-BF16 runs slower than fp32")

    # ------------------------------------------------------------ what a job fills in
    def setup(self) -> None:
        """Build the model (and what lives as long as it: optimizer, EMA)."""
        raise NotImplementedError

    def load_state(self, directory: str, state: dict) -> None:
        """Restore from a checkpoint directory of this run (`state`: its state.json)."""
        raise NotImplementedError

    def start_fresh(self) -> None:
        """No checkpoint of this run yet: e.g. start from another run's weights."""

    def checkpoint_meta(self) -> dict:
        """The job's part of state.json for a checkpoint written now."""
        raise NotImplementedError

    def train(self) -> None:
        """The job's loop, from the restored position to the end."""
        raise NotImplementedError

    # ------------------------------------------------------------ the shape
    def run(self) -> None:
        """Restore or start fresh, then train; a non-finite loss ends the loop (see the module doc)."""
        import ray.train

        if storage.exists(storage.join_uri(self.loop.run_uri, NONFINITE)):
            return  # a worker restarted after the stop: the driver reports it
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                self.load_state(d, ckpt_io.read_state(d))
        else:
            self.start_fresh()
        if self.rank == 0 and self.loop.mlflow_run_id:
            from dakd.tracking import RunLogger

            self.logger = RunLogger(self.loop.tracking_uri, self.loop.mlflow_run_id)
        try:
            self.train()
        except NonFiniteLoss as stop:
            if self.rank == 0:
                storage.write_text(storage.join_uri(self.loop.run_uri, NONFINITE),
                                   json.dumps({"step": stop.step, "where": stop.where, "loss": stop.loss}))

    # ------------------------------------------------------------ shared pieces
    def batches(self, dtypes: dict) -> Iterator[dict]:
        """This worker's full batches of one pass over its training shard, on its device."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        return shard.iter_torch_batches(batch_size=self.cfg.per_worker_batch, drop_last=True, device=self.device,
                                        dtypes=dtypes)

    def autocast(self):
        """The training step's autocast context for the `precision` setting (dakd.inference.autocast)."""
        from dakd.inference import autocast

        return autocast(self.device, self.cfg.precision)

    def optimizer_step(self, loss: torch.Tensor, params, optimizer: torch.optim.Optimizer, where: str) -> None:
        """Backward, clip to `grad_clip`, and step, unless the loss or the gradient norm is not
        finite: then NonFiniteLoss (the step is not taken). `self.step` counts the step taken."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise NonFiniteLoss(self.step + 1, where, float(loss.detach()))
        optimizer.step()
        self.step += 1

    def save_and_report(self, metrics: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema_state: dict | None = None) -> None:
        """Rank 0 writes a checkpoint (weights, EMA, optimizer, state.json from `checkpoint_meta`);
        every rank reports `metrics` with it (Ray Train's report is a barrier)."""
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                ckpt_io.save_checkpoint(d, model.state_dict(), self.checkpoint_meta(), ema_state, optimizer.state_dict())
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    def tracking_failures(self) -> int:
        return self.logger.failures if self.logger else 0

    def progress(self, note: str) -> None:
        if self.rank == 0:
            report_progress(self.loop.progress, self.step, note)

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.job}] {text}", flush=True)

    def maybe_fail(self) -> None:
        """Fault drills and tests (DAKD_FAIL_AT_STEP): fail once right after that step's checkpoint."""
        if self.loop.fail_at_step is not None and self.step == self.loop.fail_at_step:
            raise RuntimeError(f"fault injected after step {self.step} (fail_at_step)")

    def maybe_hold(self) -> None:
        """Fault drills and tests (DAKD_HOLD_AT_STEP=k:/local/marker): after step k (its log line,
        metrics and checkpoint), wait while the marker file exists, so that a test or a rehearsal
        can act on the cluster while the run is known to be mid-way."""
        if self.loop.hold_at_step is None:
            return
        at, marker = self.loop.hold_at_step.split(":", 1)
        if self.step == int(at):
            while os.path.exists(marker):
                time.sleep(0.2)


# ---------------------------------------------------------------- driver side
def make_trainer(cfg, loop_fn: Callable[[dict], None], loop: LoopConfig, dataset, *, callbacks: list | None = None,
                 score: str | None = None):
    """The TorchTrainer of a training job (`cfg`: its config: DataParallel fields, output,
    run_name, max_failures, keep_checkpoints). `score`: keep the best checkpoints by this
    reported metric (highest), else the latest."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from dakd.train.backend import backend_config

    loc = storage.resolve(cfg.output)
    storage.ensure_dir(cfg.output, create_bucket=cfg.create_bucket)
    keep = CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=score,
                            checkpoint_score_order="max")
    return _trainer_class()(
        loop_fn,
        train_loop_config=loop.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=backend_config(cfg.num_workers, cfg.use_gpu),
        datasets={"train": dataset},
        dataset_config=data_config(cfg.num_workers),
        run_config=RunConfig(name=cfg.run_name, storage_path=loc.path, storage_filesystem=loc.fs, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=cfg.max_failures), checkpoint_config=keep),
    )


def data_config(num_workers: int):
    """Ray Train's DataConfig for `num_workers` workers. One worker reads the whole dataset in
    its own process: `streaming_split` would add a SplitCoordinator actor (one more process
    per run, and an RPC per block) to hand all of it to that one worker. The epoch's draws
    are the same either way (one Ray Data execution per epoch; data.feed)."""
    from ray.train import DataConfig

    return DataConfig(datasets_to_split="all" if num_workers > 1 else [])


def _trainer_class():
    """TorchTrainer, less Ray Train's PlacementGroupCleaner on a Ray without a dashboard.

    The cleaner is a detached actor per run that asks Ray's state API (served by the
    dashboard) every second whether the run's controller is alive, to remove its placement
    group if it died. The local Ray that dakd starts has no dashboard, so there the cleaner
    cannot work: it polls and logs a warning forever, and with another Ray on the host
    (`ray start`) it asks that cluster about this one's controller. On a cluster (which has
    a dashboard) it is kept."""
    from ray.train.torch import TorchTrainer

    from dakd.runtime import ray_has_dashboard

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return without_placement_group_cleaner(super()._create_default_callbacks(), ray_has_dashboard())

    return Trainer


def without_placement_group_cleaner(callbacks: list, dashboard: bool) -> list:
    """Ray Train's default callbacks, less its PlacementGroupCleanerCallback unless `dashboard`."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    return callbacks if dashboard else [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]


def _nonfinite_error(run_uri: str) -> TrainingError | None:
    marker = storage.join_uri(run_uri, NONFINITE)
    if not storage.exists(marker):
        return None
    bad = json.loads(storage.read_text(marker))
    return TrainingError(f"non-finite loss or gradient at step {bad['step']} ({bad['where']}, loss {bad['loss']:.4g}); "
                         f"stopped. The last good checkpoint is kept under {run_uri}")


def fit(trainer, run_uri: str):
    """trainer.fit(); TrainingError when the workers stopped on a non-finite loss or raised a
    TrainingError (found through Ray's wrappers), other errors as they are. Returns the result."""
    marker = storage.resolve(storage.join_uri(run_uri, NONFINITE))
    if storage.exists(marker.uri):
        marker.fs.delete_file(marker.path)
    try:
        result = trainer.fit()
    except Exception as exc:
        stopped = _nonfinite_error(run_uri)
        if stopped is not None:
            raise stopped from exc
        cause = exc
        while cause is not None and not isinstance(cause, TrainingError):
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if isinstance(cause, TrainingError):
            raise TrainingError(str(cause)) from exc
        raise
    stopped = _nonfinite_error(run_uri)
    if stopped is not None:
        raise stopped
    if result.checkpoint is None:
        raise TrainingError(f"training under {run_uri} finished without a checkpoint")
    return result


def checkpoint_uri(output: str, checkpoint) -> str:
    """A Ray Train checkpoint's location as a URI dakd.storage reads."""
    return ("s3://" + checkpoint.path) if storage.resolve(output).scheme == "s3" else checkpoint.path
