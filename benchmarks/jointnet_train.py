"""SAR-JointNet training throughput: Ray Train with one worker against the same step loop
in a bare process (goal: ratio >= 0.95), and 2 workers against 1, measured side by side in
one run. Steady state: the first logging window is dropped.

Default (`--data sos`): real-size data, the way the `sos-cpu` recipe trains its teacher:
genuine SOS pairs of one sensor (`../shared/data/sos-dev`, 256 px), the preset's U-Net,
64 px crops, batch 16, its torch threads. `--data procedural`: 64 tiny procedural scenes
and a tiny U-Net at 32 px, batch 8, where the feed's fixed cost per sample weighs most
against a step of a few milliseconds.

The bare loop is what a user would write by hand: the shard set decoded into memory once, a
random crop + flips per sample inline, then train-jointnet's stage-1 step (same model,
loss, AdamW, clipping, EMA).

    python benchmarks/jointnet_train.py [--data sos|procedural] [--root ../shared/data/sos-dev]
        [--sensor palsar] [--steps 120] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "sos-dev")

from dakd.config import BalanceConfig, IngestConfig, TrainJointNetConfig, load_config  # noqa: E402
from dakd.data.balance import run_balance  # noqa: E402
from dakd.data.ingest import run_ingest  # noqa: E402
from dakd.data.mosaic import random_crop_flip  # noqa: E402
from dakd.data.shards import open_shard_set  # noqa: E402
from dakd.data.transforms import normalize_image  # noqa: E402
from dakd.diffusion.schedule import make_train_scheduler, sample_timesteps, sar_loss  # noqa: E402
from dakd.inference import autocast, describe_cpu  # noqa: E402
from dakd.train.ema import EMA  # noqa: E402
from dakd.train.runner import adamw  # noqa: E402
from dakd.train.jointnet import build_model, run_train_jointnet  # noqa: E402

TINY_MODEL = ["model.block_out_channels=[16, 32]", "model.layers_per_block=1", "model.attention_levels=[1]",
              "model.norm_num_groups=8", "model.attention_head_dim=8", "crop_size=32", "batch_size_per_worker=8",
              "torch_threads=1"]


def bare_steps_per_s(cfg: TrainJointNetConfig, steps: int) -> float:
    """train-jointnet's stage-1 step (same model, loss, AdamW, clipping, EMA, batch, precision;
    a random crop + flips per sample) in this process; the first quarter of the steps is warm-up."""
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(0)
    shard_set = open_shard_set(cfg.shards)
    records = list(shard_set.iter_records("train"))
    model = build_model(cfg, shard_set.classes.num_classes)
    params = model.sar_parameters()
    opt = adamw(params, cfg.stages.stage1.lr, cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay) if cfg.ema else None
    sched = make_train_scheduler(cfg.num_train_timesteps)
    rng = np.random.default_rng(0)
    t0 = None
    for i in range(steps):
        if i == steps // 4:
            t0 = time.perf_counter()
        crops = []
        for j in rng.integers(0, len(records), cfg.per_worker_batch):
            image, _ = random_crop_flip(records[j]["image"], records[j]["mask"], cfg.crop_size, rng, str(j))
            crops.append(normalize_image(image)[None])
        x0 = torch.from_numpy(np.stack(crops))
        with autocast("cpu", cfg.precision):  # the job's precision (the sos-cpu preset trains in bf16)
            out = sar_loss(model, sched, x0, sample_timesteps(sched, len(crops), "cpu"), torch.randn_like(x0))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
    return (steps - steps // 4) / (time.perf_counter() - t0)


def ray_steps_per_s(cfg: TrainJointNetConfig) -> float:
    """Steady-state optimizer steps/s of `dakd train-jointnet` (stage 1), from its MLflow history."""
    import mlflow

    summary = run_train_jointnet(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    hist = sorted(client.get_metric_history(summary["mlflow_run_id"], "train/samples_per_s"), key=lambda m: m.step)
    global_batch = cfg.per_worker_batch * cfg.num_workers
    return float(np.mean([m.value for m in hist[1:]])) / global_batch


def ingest(args, real: str) -> str:
    """The benchmark's shard set under `real` (balanced); returns a description of it."""
    if args.data == "sos":
        sets = ["source.kind=sos", f"source.root={args.root}", f"source.sensors=[{args.sensor}]",
                "source.val_fraction=0.15"]
    else:
        sets = ["source.procedural.splits={train: 64}", "source.procedural.height=32", "source.procedural.width=32"]
    run_ingest(load_config(IngestConfig, None, [*sets, f"output={real}", "ray.local_num_cpus=4"]))
    run_balance(load_config(BalanceConfig, None, [f"shards={real}", "ray.local_num_cpus=4"]))
    count = open_shard_set(real).manifest["splits"]["train"]["count"]
    return f"SOS {args.sensor}, {count} train images" if args.data == "sos" else f"procedural, {count} train images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["sos", "procedural"], default="sos")
    ap.add_argument("--root", default=DEFAULT_ROOT, help="an SOS root (train/<sensor>/, test/<sensor>/)")
    ap.add_argument("--sensor", default="palsar", choices=["palsar", "sentinel"])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--threads", type=int, help="torch threads of the bare loop and the 1-worker run (default: the preset's)")
    args = ap.parse_args()
    if args.data == "sos" and not os.path.isdir(args.root):
        sys.exit(f"jointnet_train: SOS root not found: {args.root} (or use --data procedural)")
    with tempfile.TemporaryDirectory() as tmp:
        real = os.path.join(tmp, "real")
        what = ingest(args, real)
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False

        model = [] if args.data == "sos" else TINY_MODEL  # sos: the sos-cpu preset's teacher
        preset = ("sos-cpu", "train-jointnet")
        threads = args.threads or load_config(TrainJointNetConfig, None, model, preset=preset).torch_threads

        def config(workers: int, name: str) -> TrainJointNetConfig:
            return load_config(TrainJointNetConfig, None, [
                f"shards={real}", f"output={tmp}/runs", f"run_name={name}", "run_stages=[1]", *model,
                f"torch_threads={max(1, threads // workers)}",  # the same cores, shared by the workers
                f"stages.stage1={{iterations: {args.steps}, lr: 0.001}}", f"num_workers={workers}",
                f"log_every={max(1, args.steps // 6)}", f"checkpoint_every={args.steps}", "sample_every=100000",
                f"tracking.uri=sqlite:///{tmp}/mlflow.db", "ray.local_num_cpus=4"], preset=preset)

        one_cfg, two_cfg = config(1, "one"), config(2, "two")
        bare = bare_steps_per_s(one_cfg, args.steps)  # the same config; the bare loop writes no run
        load_bare = os.getloadavg()[0]
        one = ray_steps_per_s(one_cfg)
        load_one = os.getloadavg()[0]
        two = ray_steps_per_s(two_cfg)
        load_two = os.getloadavg()[0]
    print(f"SAR-JointNet stage 1 on {what}: crop {one_cfg.crop_size}, batch {one_cfg.per_worker_batch}/worker, "
          f"U-Net {one_cfg.model.block_out_channels}, precision {one_cfg.precision}, "
          f"{one_cfg.torch_threads} torch thread(s); machine: {describe_cpu()}")
    print(f"bare process loop      : {bare:7.2f} steps/s   (load {load_bare:.1f})")
    print(f"Ray Train, 1 worker    : {one:7.2f} steps/s   ratio to bare {one / bare:5.2f} (goal >= 0.95)  (load {load_one:.1f})")
    print(f"Ray Train, 2 workers   : {two:7.2f} steps/s   samples/s ratio 2 vs 1 workers {2 * two / one:5.2f}"
          f"  (load {load_two:.1f}; {two_cfg.torch_threads} torch thread(s) each)")


if __name__ == "__main__":
    main()
