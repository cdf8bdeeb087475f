"""Synthesis benchmark: three ratios measured side by side in one run.

1. Steady-state samples/s of `dakd synthesize` (Ray Data, 1 actor, 1 torch thread) against
   a bare in-process loop calling the same sampler on the same ids (goal >= 0.95).
2. 2 actors against 1, one torch thread each (goal >= 1.7x on a 2-core machine).
3. DPM-Solver++ and UniPC at 25 steps against DDIM at 200: network evaluations; wall time
   of the sampling itself (in-process, the same fixed batches) and of the job (steady state
   and end to end, which includes Ray Data and actor start-up); the FID of each against the
   real set (pixels extractor) with a trained tiny teacher.

All runs use the default batched mode (batch_size 8); the machine load (os.getloadavg) is
printed beside the ratios.

Steady state = samples over the span from the first range's start of sampling to the last
range's end (no actor start-up, no teacher loading). The bare loop runs in this process.

    python benchmarks/synthesis.py [--samples 48] [--steps 10] [--train-steps 60] [--teacher URI]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from dakd.config import (BalanceConfig, EvaluateSynthesisConfig, IngestConfig, ProceduralSource,  # noqa: E402
                         SourceConfig, SynthesizeConfig, TrainJointNetConfig, load_config)
from dakd.data.balance import run_balance  # noqa: E402
from dakd.data.ingest import run_ingest  # noqa: E402
from dakd.inference import describe_cpu  # noqa: E402
from dakd.synth.evaluate import run_evaluate_synthesis  # noqa: E402
from dakd.synth.actor import generate  # noqa: E402
from dakd.synth.plan import plan_ranges  # noqa: E402
from dakd.synth.synthesize import run_synthesize, teacher_info  # noqa: E402
from dakd.checkpoints import load_teacher  # noqa: E402
from dakd.train.jointnet import run_train_jointnet  # noqa: E402

TINY = ["model.block_out_channels=[8, 16]", "model.layers_per_block=1", "model.attention_levels=[1]",
        "model.norm_num_groups=4", "model.attention_head_dim=4", "num_train_timesteps=1000", "crop_size=32",
        "batch_size_per_worker=8", "num_workers=1", "log_every=20", "ema_decay=0.95", "tracking.enabled=false"]


def train_teacher(root: str, train_steps: int) -> tuple[str, str]:
    real = os.path.join(root, "real")
    source = SourceConfig(procedural=ProceduralSource(splits={"train": 64}, height=32, width=32, seed=1))
    run_ingest(IngestConfig(source=source, output=real, rows_per_file=32))
    run_balance(BalanceConfig(shards=real))
    s1, s3 = train_steps // 3, train_steps // 6
    s2 = train_steps - s1 - s3
    cfg = load_config(TrainJointNetConfig, None, [
        f"shards={real}", f"output={root}/runs", *TINY, f"stages.stage1={{iterations: {s1}, lr: 0.003}}",
        f"stages.stage2={{iterations: {s2}, lr: 0.003}}", f"stages.stage3={{iterations: {s3}, lr: 0.001}}",
        f"checkpoint_every={train_steps}"])
    run_train_jointnet(cfg)
    return f"{root}/runs/jointnet", real


def synth(teacher: str, out: str, *extra: str) -> dict:
    cfg = load_config(SynthesizeConfig, None, [f"teacher={teacher}", f"output={out}", "tracking.enabled=false",
                                               "torch_threads=1", "cpus_per_actor=1", *extra])
    return run_synthesize(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=48, help="samples per throughput run")
    ap.add_argument("--rows-per-file", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps of the throughput runs")
    ap.add_argument("--quality-samples", type=int, default=24, help="samples per solver in the DDIM/DPM comparison")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--teacher", help="an existing SAR-JointNet run or checkpoint (skips training)")
    ap.add_argument("--real", help="the real shard set of --teacher")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import ray

    ray.init(address="local", num_cpus=8, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = tempfile.mkdtemp(prefix="dakd-bench-synth-")
    t_all = time.perf_counter()
    if args.teacher:
        teacher, real = args.teacher, args.real
    else:
        t = time.perf_counter()
        teacher, real = train_teacher(root, args.train_steps)
        print(f"trained a tiny teacher ({args.train_steps} steps) in {time.perf_counter() - t:.1f} s")
    common = [f"count={args.samples}", f"rows_per_file={args.rows_per_file}", f"steps={args.steps}"]

    # 1. bare in-process loop: the same generate() the actors call, the same ids and ranges
    info = teacher_info(load_config(SynthesizeConfig, None, [f"teacher={teacher}", *common]))
    model, _ = load_teacher(info["location"], ema=info["identity"]["weights"] == "ema")
    t = time.perf_counter()
    for _, start, stop in plan_ranges(args.samples, args.rows_per_file):
        generate(model, info["identity"], list(range(start, stop)), torch.device("cpu"))
    bare = args.samples / (time.perf_counter() - t)
    load_bare = os.getloadavg()[0]
    one = synth(teacher, f"{root}/one", *common, "actors_min=1", "actors_max=1")
    load_one = os.getloadavg()[0]
    two = synth(teacher, f"{root}/two", *common, "actors_min=2", "actors_max=2")
    load_two = os.getloadavg()[0]

    # 3. DPM-Solver++ / UniPC 25 vs DDIM 200, quality against the real set
    quality = {}
    for name, sampler, steps in (("ddim200", "ddim", 200), ("dpm25", "dpmsolver++", 25), ("unipc25", "unipc", 25)):
        qcommon = [f"count={args.quality_samples}", "rows_per_file=8", f"sampler={sampler}", f"steps={steps}"]
        qinfo = teacher_info(load_config(SynthesizeConfig, None, [f"teacher={teacher}", *qcommon]))
        t = time.perf_counter()
        for _, start, stop in plan_ranges(args.quality_samples, 8):
            generate(model, qinfo["identity"], list(range(start, stop)), torch.device("cpu"))
        sampling = time.perf_counter() - t
        s = synth(teacher, f"{root}/{name}", *qcommon, "actors_min=2", "actors_max=2")
        ev = run_evaluate_synthesis(load_config(EvaluateSynthesisConfig, None, [
            f"synthetic={root}/{name}", f"real={real}", "features=pixels", "pixels_size=4", "tracking.enabled=false"]))
        quality[name] = {"nfe": s["nfe_per_sample"], "sampling": sampling, "wall": s["seconds"],
                         "steady": s["steady_samples_per_s"], "fid": ev["fid"], "load": os.getloadavg()[0]}
    ref = run_evaluate_synthesis(load_config(EvaluateSynthesisConfig, None, [
        f"synthetic={real}", f"real={real}", "features=pixels", "pixels_size=4", "tracking.enabled=false"]))

    load = os.getloadavg()
    print()
    print(f"synthesis benchmark: {args.samples} samples of 32x32, DDIM {args.steps} steps, {args.rows_per_file} per "
          f"file, batches of 8, 1 torch thread per actor; load average {load[0]:.1f}; machine: {describe_cpu()}")
    print(f"  bare in-process loop          {bare:8.2f} samples/s   (load {load_bare:.1f})")
    print(f"  Ray Data, 1 actor (steady)    {one['steady_samples_per_s']:8.2f} samples/s   "
          f"(end to end {one['samples_per_s']:.2f}/s incl. start-up; load {load_one:.1f})")
    print(f"  Ray Data, 2 actors (steady)   {two['steady_samples_per_s']:8.2f} samples/s   "
          f"(end to end {two['samples_per_s']:.2f}/s; load {load_two:.1f})")
    print(f"  ratio Ray Data 1 actor / bare loop   {one['steady_samples_per_s'] / bare:6.2f}   (goal >= 0.95)  "
          f"load {load_bare:.1f} / {load_one:.1f}")
    print(f"  ratio 2 actors / 1 actor             {two['steady_samples_per_s'] / one['steady_samples_per_s']:6.2f}   "
          f"(goal >= 1.7)   load {load_one:.1f} / {load_two:.1f}")
    d = quality["ddim200"]
    print(f"  DDIM 200:        NFE {d['nfe']:4d}  sampling {d['sampling']:6.1f} s  job {d['wall']:6.1f} s  "
          f"steady {d['steady']:6.2f} samples/s  FID(pixels 4x4) {d['fid']:.4f}  (load {d['load']:.1f})")
    for name, label in (("dpm25", "DPM-Solver++ 25"), ("unipc25", "UniPC 25")):
        p = quality[name]
        print(f"  {label + ':':16s} NFE {p['nfe']:4d}  sampling {p['sampling']:6.1f} s  job {p['wall']:6.1f} s  "
              f"steady {p['steady']:6.2f} samples/s  FID(pixels 4x4) {p['fid']:.4f}  (load {p['load']:.1f})")
        print(f"  ratio {label} / DDIM 200: NFE {p['nfe'] / d['nfe']:.3f}, sampling wall {p['sampling'] / d['sampling']:.3f} "
              f"(goal <= 0.15), job wall {p['wall'] / d['wall']:.3f} (incl. start-up), steady speed-up "
              f"{p['steady'] / d['steady']:.2f}x, FID {p['fid'] / max(d['fid'], 1e-12):.3f}")
    print(f"  ({args.quality_samples} samples per solver vs {ref['counts']['real']} real; "
          f"FID(real, real) = {ref['fid']:.2e}; load average now {os.getloadavg()[0]:.1f})")
    print(f"total {time.perf_counter() - t_all:.1f} s")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
