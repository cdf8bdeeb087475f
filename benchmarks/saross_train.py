"""SAROSS-Net training throughput on genuine SOS data: `dakd train-saross` on Ray Train with
one worker against the same optimiser step in a bare process loop (goal: ratio >= 0.90),
measured side by side in one run. The student is the `sos-cpu` preset's (its encoder,
decoder, crop, batch, precision and torch threads; --encoder/--crop/--batch/--threads
override them). The bare loop is what a user would write by hand: the shard set decoded into
memory once, a random crop + flips per sample inline, the same model, autocast, loss
(real-only: CE + Dice), AdamW and gradient clipping.

With `--synthetic URI` (a set from `dakd synthesize`, e.g. an accuracy run's
`<sensor>/synthetic`) both sides train the DAKD soft student instead: the preset's synthetic
share of each batch (a quarter in `sos-cpu`) 2x2 mosaics of the set's tiles, KD on those, CE +
Dice on the real rest. The bare loop decodes the tiles into memory once and makes each
mosaic inline; on Ray Train the feed (train.saross_feed) makes them in Ray Data tasks beside
the training process, so the ratio is what that feed costs the steps.

    .venv/bin/python benchmarks/saross_train.py [--root ../shared/data/sos-dev] [--sensor palsar]
        [--synthetic URI] [--encoder NAME] [--crop N] [--batch N] [--threads N] [--epochs 3] [--steps 60]

Ray Train runs twice: the feed streaming beside the steps (`prefetch_epoch: false`) and each
epoch's batches read before its steps (`prefetch_epoch: true`, as `sos-cpu` sets it). Ray Train's
figure is the steady-state training samples/s it logs per epoch (the first epoch, which
includes the feed's first read and decode, is dropped; validation is outside the timed part
in both; with prefetch_epoch the epoch's read is inside it). Prints the rates, their ratios
to the bare loop and the machine load.
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

from dakd.config import IngestConfig, TrainSarossConfig, load_config  # noqa: E402
from dakd.data.ingest import run_ingest  # noqa: E402
from dakd.data.mosaic import mosaic, random_crop_flip  # noqa: E402
from dakd.data.shards import SYNTHETIC_SPLIT, open_shard_set  # noqa: E402
from dakd.data.transforms import normalize_image  # noqa: E402
from dakd.inference import autocast, describe_cpu  # noqa: E402
from dakd.models.saross import build_student  # noqa: E402
from dakd.train.losses import segmentation_loss  # noqa: E402
from dakd.train.runner import adamw  # noqa: E402
from dakd.train.saross import run_train_saross  # noqa: E402


def real_crops(records: list[dict], n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n random real crops + flips: images (n, 1, size, size) float32 in [-1, 1], masks (n, size, size)."""
    images, masks = [], []
    for j in rng.integers(0, len(records), n):
        rec = records[j]
        image, mask = random_crop_flip(rec["image"], rec["mask"], size, rng, str(rec["id"]))
        images.append(normalize_image(image)[None])
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def synthetic_mosaics(tiles: list[dict], n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n 2x2 mosaics of 4 distinct random tiles, cropped + flipped: images (n, 1, size, size)
    float32 in [-1, 1], teacher logits (n, C, size, size) float32."""
    images, logits = [], []
    for _ in range(n):
        four = [tiles[j] for j in rng.choice(len(tiles), 4, replace=False)]
        image, logit = mosaic(np.stack([t["image"][None] for t in four]), np.stack([t["logits"] for t in four]))
        image, logit = random_crop_flip(image, logit, size, rng, "mosaic")
        images.append(normalize_image(image))
        logits.append(logit.astype(np.float32))
    return np.stack(images), np.stack(logits)


def bare_samples_per_s(cfg: TrainSarossConfig, steps: int) -> float:
    """train-saross's step (same model, precision, loss, optimiser, clipping, batch; with a
    synthetic set, the soft mode's batch of real crops and mosaics) in this process; the first
    quarter of the steps is warm-up."""
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(0)
    shard_set = open_shard_set(cfg.shards)
    records = list(shard_set.iter_records(cfg.train_split))
    tiles = list(open_shard_set(cfg.synthetic).iter_records(SYNTHETIC_SPLIT)) if cfg.loss.mode != "real-only" else []
    model = build_student(cfg.model, shard_set.classes.num_classes)
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay)
    rng = np.random.default_rng(0)
    lc, b, s = cfg.loss, cfg.per_worker_batch, cfg.crop_size
    n_syn = int(round(b * cfg.synthetic_share)) if tiles else 0
    model.train()
    t0 = None
    for i in range(steps):
        if i == steps // 4:
            t0 = time.perf_counter()
        images, masks = real_crops(records, b - n_syn, s, rng)
        syn = torch.zeros(b, dtype=torch.bool)
        teacher = None
        if n_syn:
            syn_images, teacher_logits = synthetic_mosaics(tiles, n_syn, s, rng)
            images = np.concatenate([images, syn_images])
            masks = np.concatenate([masks, teacher_logits.argmax(1).astype(np.uint8)])
            teacher = torch.from_numpy(np.concatenate([np.zeros((b - n_syn, *teacher_logits.shape[1:]), np.float32),
                                                       teacher_logits]))
            syn[b - n_syn:] = True
        x, y = torch.from_numpy(images), torch.from_numpy(masks).long()
        with autocast("cpu", cfg.precision):
            logits = model(x)
        out = segmentation_loss(logits.float(), y, teacher, syn, mode=lc.mode, lambda_ce=lc.lambda_ce,
                                lambda_dice=lc.lambda_dice, lambda_kd=lc.lambda_kd, T=lc.temperature,
                                dice_eps=lc.dice_eps, soft_synthetic=lc.soft_synthetic)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return (steps - steps // 4) * b / (time.perf_counter() - t0)


def ray_samples_per_s(cfg: TrainSarossConfig) -> float:
    """Steady-state training samples/s of `dakd train-saross` (epochs after the first), from its MLflow history."""
    import mlflow

    summary = run_train_saross(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    hist = sorted(client.get_metric_history(summary["mlflow_run_id"], "train/samples_per_s"), key=lambda m: m.step)
    return float(np.mean([m.value for m in hist[1:]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=DEFAULT_ROOT, help="an SOS root (train/<sensor>/, test/<sensor>/)")
    ap.add_argument("--sensor", default="palsar", choices=["palsar", "sentinel"])
    ap.add_argument("--synthetic", help="a synthetic shard set (dakd synthesize): train the DAKD soft student")
    ap.add_argument("--encoder", help="default: the sos-cpu student's")
    ap.add_argument("--crop", type=int, help="default: the sos-cpu student's")
    ap.add_argument("--batch", type=int, help="default: the sos-cpu student's")
    ap.add_argument("--threads", type=int, help="torch threads of both sides (default: the sos-cpu student's)")
    ap.add_argument("--epochs", type=int, default=3, help="Ray Train epochs (the first is dropped)")
    ap.add_argument("--steps", type=int, default=60, help="bare-loop steps (the first quarter is dropped)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        real = os.path.join(tmp, "real")
        run_ingest(load_config(IngestConfig, None, [
            "source.kind=sos", f"source.root={args.root}", f"source.sensors=[{args.sensor}]",
            "source.val_fraction=0.15", f"output={real}", "ray.local_num_cpus=4"]))
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        chosen = {"model.encoder": args.encoder, "crop_size": args.crop, "global_batch_size": args.batch,
                  "torch_threads": args.threads}
        cfg = load_config(TrainSarossConfig, None, [
            f"shards={real}", f"output={tmp}/runs", "run_name=one",
            *([f"synthetic={args.synthetic}", "loss.mode=soft"] if args.synthetic else ["loss.mode=real-only",
                                                                                       "synthetic_share=0"]),
            *(f"{k}={v}" for k, v in chosen.items() if v is not None),
            "num_workers=1", f"epochs={args.epochs}", "overlay_count=0", "keep_checkpoints=1",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", "ray.local_num_cpus=4"], preset=("sos-cpu", "train-saross"))
        train_count = open_shard_set(real).manifest["splits"]["train"]["count"]
        bare = bare_samples_per_s(cfg, args.steps)
        one = {prefetch: ray_samples_per_s(cfg.model_copy(update={"prefetch_epoch": prefetch, "run_name": f"p{prefetch}"}))
               for prefetch in (False, True)}
    mode = f"DAKD soft (synthetic share {cfg.synthetic_share})" if args.synthetic else "real-only"
    print(f"SAROSS-Net {mode} step, SOS {args.sensor} ({train_count} train images), {cfg.model.encoder} "
          f"(decoder {cfg.model.decoder_channels}, {cfg.model.skip_module}), crop {cfg.crop_size}, batch "
          f"{cfg.global_batch_size}, precision {cfg.precision}, {cfg.torch_threads} torch thread(s), "
          f"load (1 min): {os.getloadavg()[0]:.1f}; machine: {describe_cpu()}")
    print(f"bare process loop                  : {bare:7.2f} samples/s")
    for prefetch, rate in one.items():
        how = "prefetch_epoch" if prefetch else "streaming     "
        print(f"Ray Train, 1 worker, {how}: {rate:7.2f} samples/s   ratio to bare {rate / bare:5.2f} (goal >= 0.90)")


if __name__ == "__main__":
    main()
