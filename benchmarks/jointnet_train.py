"""SAR-JointNet training throughput: Ray Train with one worker against the same step loop
in a bare process (goal: Ray costs under 10%), and 2 workers against 1, measured side by
side in one run on procedural data. Steady state: the first logging window is dropped.

    python benchmarks/jointnet_train.py [--steps 60] [--size 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from dakd.config import (BalanceConfig, IngestConfig, ProceduralSource, RayConfig, SourceConfig,  # noqa: E402
                         TrainJointNetConfig, load_config)
from dakd.data.balance import run_balance  # noqa: E402
from dakd.data.ingest import run_ingest  # noqa: E402
from dakd.data.shards import open_shard_set  # noqa: E402
from dakd.data.transforms import normalize_image  # noqa: E402
from dakd.diffusion.schedule import make_train_scheduler, sample_timesteps, sar_loss  # noqa: E402
from dakd.train.jointnet import build_model, run_train_jointnet  # noqa: E402

MODEL = ["model.block_out_channels=[16, 32]", "model.layers_per_block=1", "model.attention_levels=[1]",
         "model.norm_num_groups=8", "model.attention_head_dim=8"]


def bare_steps_per_s(cfg: TrainJointNetConfig, steps: int) -> float:
    """The stage-1 step of the trainer (same model, loss, optimizer, batch) in this process."""
    torch.set_num_threads(cfg.torch_threads)
    shard_set = open_shard_set(cfg.shards)
    images = np.stack([normalize_image(r["image"])[None] for r in shard_set.iter_records("train")])
    model = build_model(cfg, shard_set.classes.num_classes)
    params = model.sar_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.stages.stage1.lr)
    sched = make_train_scheduler(cfg.num_train_timesteps)
    rng = np.random.default_rng(0)
    s = cfg.crop_size
    t0 = None
    for i in range(steps):
        if i == steps // 4:
            t0 = time.perf_counter()
        idx = rng.integers(0, len(images), cfg.per_worker_batch)
        x0 = torch.from_numpy(images[idx, :, :s, :s])
        out = sar_loss(model, sched, x0, sample_timesteps(sched, len(idx), "cpu"), torch.randn_like(x0))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return (steps - steps // 4) / (time.perf_counter() - t0)


def ray_steps_per_s(cfg: TrainJointNetConfig) -> float:
    """Steady-state optimizer steps/s of `dakd train-jointnet` (stage 1), from its MLflow history."""
    import mlflow

    summary = run_train_jointnet(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    hist = client.get_metric_history(summary["mlflow_run_id"], "train/samples_per_s")
    global_batch = cfg.per_worker_batch * cfg.num_workers
    return float(np.mean([m.value for m in hist[1:]])) / global_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        real = os.path.join(tmp, "real")
        ray_cfg = RayConfig(local_num_cpus=4)
        src = SourceConfig(procedural=ProceduralSource(splits={"train": 64}, height=args.size, width=args.size))
        run_ingest(IngestConfig(source=src, output=real, ray=ray_cfg))
        run_balance(BalanceConfig(shards=real, ray=ray_cfg))
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False

        def config(workers: int, name: str) -> TrainJointNetConfig:
            return load_config(TrainJointNetConfig, None, [
                f"shards={real}", f"output={tmp}/runs", f"run_name={name}", "run_stages=[1]", *MODEL,
                f"stages.stage1={{iterations: {args.steps}, lr: 0.001}}", f"crop_size={args.size}",
                f"batch_size_per_worker={args.batch}", f"num_workers={workers}", f"log_every={max(1, args.steps // 6)}",
                f"checkpoint_every={args.steps}", f"tracking.uri=sqlite:///{tmp}/mlflow.db", "ray.local_num_cpus=4"])

        bare = bare_steps_per_s(config(1, "bare"), args.steps)
        one = ray_steps_per_s(config(1, "one"))
        two = ray_steps_per_s(config(2, "two"))
    print(f"SAR-JointNet stage 1, {args.size}x{args.size}, batch {args.batch}/worker, cores: {os.cpu_count()}")
    print(f"bare process loop      : {bare:7.2f} steps/s")
    print(f"Ray Train, 1 worker    : {one:7.2f} steps/s   ratio to bare {one / bare:5.2f} (goal >= 0.90)")
    print(f"Ray Train, 2 workers   : {two:7.2f} steps/s   samples/s ratio 2 vs 1 workers {2 * two / one:5.2f}")


if __name__ == "__main__":
    main()
