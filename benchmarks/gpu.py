"""GPU check: the platform's GPU paths measured in one short run (< 8 min on one GPU).

Writes one JSON (--json, default gpu_benchmark.json) and prints a table:

1. train_jointnet: paper-scale SAR-JointNet (the `sos` preset's U-Nets, 256²) joint-loss
   training steps/s in bf16 autocast at batch 16 (AdamW, grad clipping: the trainer's step).
2. synthesis: samples/s of the joint sampler (DDIM, 4 steps; 2 with --smoke) with the same
   network at batch 1 / 32 / 64, fp32 vs bf16; and with torch.compile (bf16; last, as
   section 5 "synthesis_compile", since compiles are slow; skipped on the CPU).
3. saross: SAROSS-Net with MambaVision-B at 512² inference latency (batch 1, bf16,
   channels_last via dakd.inference) with CAFT skips and without skip modules: the CAFT cost
   (+params, +GFLOPs, +ms) beside the paper's (+0.89M params, +11.45 GFLOPs, 45.28 ms whole
   model on an RTX 2080); the selective scan used (mamba-ssm's CUDA kernel when it imports,
   else dakd's reference scan) is named.
4. ray: Ray Train (TorchTrainer, 1 worker, the GPU) against the same training step in a bare
   loop; Ray Data (`dakd synthesize`, 1 GPU actor, steady state) against a bare loop of the
   same `generate` calls.

Every section records the load average (os.getloadavg) beside its figures; a section that
fails records its error and the others still run; a section that would start after
--budget-s is skipped (recorded as such).

    python benchmarks/gpu.py                   # on a GPU machine
    python benchmarks/gpu.py --smoke           # CPU, tiny sizes (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from dakd.data.classes import SOS_CLASSES  # noqa: E402
from dakd.diffusion.samplers import sample  # noqa: E402
from dakd.diffusion.schedule import joint_loss, make_train_scheduler, sample_timesteps  # noqa: E402
from dakd.inference import autocast, describe_cpu, describe_device, prepare_model  # noqa: E402
from dakd.models.jointnet import JointNet  # noqa: E402
from dakd.train.runner import adamw  # noqa: E402

PAPER_CAFT = {"params_m": 0.89, "gflops": 11.45, "latency_ms_rtx2080": 45.28}
COMPILE_RESERVE_S = 90  # a compile of the paper-scale U-Nets takes about a minute or more
SOS_UNET = {"block_out_channels": (128, 128, 256, 256, 512, 512), "layers_per_block": 2,
            "attention_levels": (3, 4, 5), "norm_num_groups": 32, "attention_head_dim": 64}
TINY_UNET = {"block_out_channels": (8, 16), "layers_per_block": 1, "attention_levels": (1,),
             "norm_num_groups": 4, "attention_head_dim": 4}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"unet": TINY_UNET, "size": 32, "train_batch": 4, "train_steps": 3, "synth_batches": (1, 4),
                "synth_steps": 2, "encoder": "mambavision_t", "saross_size": 64, "repeats": 1,
                "ray_steps": 3, "ray_samples": 8, "ray_batch": 4}
    return {"unet": SOS_UNET, "size": 256, "train_batch": 16, "train_steps": 20, "synth_batches": (1, 32, 64),
            "synth_steps": 4, "encoder": "mambavision_b", "saross_size": 512, "repeats": 20,
            "ray_steps": 20, "ray_samples": 128, "ray_batch": 32}


def jointnet(cfg: dict, num_classes: int) -> JointNet:
    torch.manual_seed(0)
    return JointNet(in_channels_image=1, num_classes=num_classes, sample_size=cfg["size"], **cfg["unet"])


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# ---------------------------------------------------------------- 1. JointNet training
def train_step_fn(model: JointNet, device: torch.device, batch: int, size: int, num_classes: int):
    """The trainer's joint step (Eq. 7 loss, bf16 autocast on CUDA, fused AdamW, clip 1.0) on fixed random data."""
    opt = adamw(model.parameters(), 1e-4, 0.01)
    sched = make_train_scheduler(1000)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 1, size, size, generator=g) * 2 - 1).to(device)
    mask = torch.randint(0, num_classes, (batch, size, size), generator=g).to(device)

    def step() -> float:
        t = sample_timesteps(sched, batch, device)
        with autocast(device):
            out = joint_loss(model, sched, x0, mask, 1.0, t, torch.randn_like(x0),
                             torch.randn((batch, num_classes, size, size), device=device), "ce")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(out["loss"].detach())

    return step


def steps_per_s(step, steps: int, device: torch.device) -> float:
    step()  # warm-up (cuDNN autotuning, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - t0)


def bench_train(cfg: dict, device: torch.device) -> dict:
    c = SOS_CLASSES.num_classes
    model = jointnet(cfg, c).to(device).train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rate = steps_per_s(train_step_fn(model, device, cfg["train_batch"], cfg["size"], c), cfg["train_steps"], device)
    out = {"params_m": round(params_m(model), 2), "batch": cfg["train_batch"], "size": cfg["size"],
           "precision": "bf16-autocast" if device.type == "cuda" else "fp32", "steps_per_s": round(rate, 3),
           "samples_per_s": round(rate * cfg["train_batch"], 2), "load": load()}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# ---------------------------------------------------------------- 2. synthesis
def bench_synthesis(cfg: dict, device: torch.device, budget, compile: bool = False) -> dict:
    """samples/s of `sample` at each batch size: fp32 and bf16 (compile=False), or bf16 under
    torch.compile (compile=True; a configuration starts only with COMPILE_RESERVE_S left)."""
    c = SOS_CLASSES.num_classes
    base = prepare_model(jointnet(cfg, c), device)
    kw = dict(sampler="ddim", steps=cfg["synth_steps"], b=1.0, height=cfg["size"], width=cfg["size"], device=device,
              num_classes=c, num_train_timesteps=1000)
    rows = []
    compiled = None
    grid = ([(True, True, bs) for bs in cfg["synth_batches"]] if compile else
            [(False, bf16, bs) for bf16 in (False, True) for bs in cfg["synth_batches"]])
    for use_compile, bf16, bs in grid:
        row = {"batch": bs, "precision": "bf16-autocast" if bf16 and device.type == "cuda" else "fp32",
               "compile": use_compile}
        if use_compile and device.type != "cuda":
            rows.append({**row, "skipped": "compile is measured on CUDA only"})
            continue
        if budget() <= (COMPILE_RESERVE_S if use_compile else 0):
            rows.append({**row, "skipped": "time budget"})
            continue
        try:
            model = base
            if use_compile:
                compiled = compiled or torch.compile(base)
                model = compiled
            seeds = list(range(bs))
            t0 = time.perf_counter()
            sample(model, seeds=seeds, precision="bf16" if bf16 else "fp32", **{**kw, "steps": 1})  # warm-up (and compile)
            sync(device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            sample(model, seeds=seeds, precision="bf16" if bf16 else "fp32", **kw)
            sync(device)
            dt = time.perf_counter() - t0
            rows.append({**row, "samples_per_s": round(bs / dt, 3), "ms_per_forward": round(1000 * dt / kw["steps"], 2),
                         "warmup_s": round(warm, 2), "load": load()})
        except Exception as exc:  # noqa: BLE001 - one configuration failing (OOM, compile) must not end the run
            rows.append({**row, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"sampler": "ddim", "steps": kw["steps"], "size": cfg["size"], "rows": rows}


# ---------------------------------------------------------------- 3. SAROSS-Net
def bench_saross(cfg: dict, device: torch.device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from dakd.models.saross import SAROSSNet
    from dakd.models.selective_scan import cuda_kernel_available

    scan = ("mamba_ssm CUDA selective scan" if device.type == "cuda" and cuda_kernel_available()
            else "reference scan (dakd.models.selective_scan.selective_scan_ref)")
    x = torch.randn(1, 1, cfg["saross_size"], cfg["saross_size"], device=device)
    out = {"encoder": cfg["encoder"], "size": cfg["saross_size"], "batch": 1, "scan": scan,
           "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
           "memory_format": "channels_last" if device.type == "cuda" else "contiguous", "paper_caft": PAPER_CAFT}
    for variant in ("none", "caft"):
        torch.manual_seed(0)
        net = SAROSSNet(encoder_name=cfg["encoder"], num_classes=SOS_CLASSES.num_classes, in_chans=1, pretrained=None,
                        decoder_channels=(64, 128, 256), skip_module=variant, caft_heads=4)
        net = prepare_model(net, device)
        times = []
        with torch.no_grad(), autocast(device):
            with FlopCounterMode(display=False) as fc:
                net(x)
            for _ in range(cfg["repeats"]):
                sync(device)
                t0 = time.perf_counter()
                net(x)
                sync(device)
                times.append(time.perf_counter() - t0)
        out[variant] = {"params_m": round(params_m(net), 3), "gflops": round(fc.get_total_flops() / 1e9, 2),
                        "latency_ms": round(1000 * statistics.median(times), 2), "load": load()}
        del net
    n, c = out["none"], out["caft"]
    out["caft_cost"] = {"params_m": round(c["params_m"] - n["params_m"], 3),
                        "gflops": round(c["gflops"] - n["gflops"], 2),
                        "gmacs": round((c["gflops"] - n["gflops"]) / 2, 2),
                        "latency_ms": round(c["latency_ms"] - n["latency_ms"], 2)}
    return out


# ---------------------------------------------------------------- 4. Ray against bare loops
def _ray_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    c = SOS_CLASSES.num_classes
    model = jointnet(config, c).to(device).train()
    rate = steps_per_s(train_step_fn(model, device, config["train_batch"], config["size"], c), config["ray_steps"],
                       device)
    with open(config["result_file"], "w") as f:  # the driver reads it (same machine)
        json.dump({"steps_per_s": rate}, f)
    ray.train.report({"steps_per_s": rate})


def write_teacher(cfg: dict, directory: str) -> str:
    """A random-weight SAR-JointNet checkpoint of the benchmark's size (what synthesize reads)."""
    from dakd import checkpoints as ckpt_io

    model = jointnet(cfg, SOS_CLASSES.num_classes)
    ckpt_io.save_checkpoint(directory, model.state_dict(), ckpt_io.teacher_meta(
        model, SOS_CLASSES, step=0, b=1.0, num_train_timesteps=1000, label_loss="ce"))
    return directory


def bench_ray(cfg: dict, device: torch.device, root: str) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dakd.config import SynthesizeConfig, load_config
    from dakd.synth.actor import generate
    from dakd.synth.plan import plan_ranges
    from dakd.synth.synthesize import run_synthesize, teacher_info
    from dakd.checkpoints import load_teacher

    gpu = device.type == "cuda"
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    c = SOS_CLASSES.num_classes
    bare = steps_per_s(train_step_fn(jointnet(cfg, c).to(device).train(), device, cfg["train_batch"], cfg["size"], c),
                       cfg["ray_steps"], device)
    if gpu:
        torch.cuda.empty_cache()
    result_file = os.path.join(root, "ray_train_result.json")
    trainer = TorchTrainer(_ray_train_loop, train_loop_config={**cfg, "result_file": result_file},
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu),
                           run_config=RunConfig(name="gpu-bench", storage_path=os.path.join(root, "ray_train")))
    trainer.fit()
    with open(result_file) as f:
        rate = json.load(f)["steps_per_s"]
    train = {"bare_steps_per_s": round(bare, 3), "ray_train_steps_per_s": round(rate, 3),
             "ratio": round(rate / bare, 3), "goal": 0.95, "load": load()}

    teacher = write_teacher(cfg, os.path.join(root, "teacher"))
    n, rows = cfg["ray_samples"], cfg["ray_batch"] * 2
    common = [f"teacher={teacher}", f"count={n}", f"rows_per_file={rows}", f"batch_size={cfg['ray_batch']}",
              f"steps={cfg['synth_steps']}", "ema=false", "tracking.enabled=false", "contact_sheet_count=0"]
    info = teacher_info(load_config(SynthesizeConfig, None, common))
    model, _ = load_teacher(info["location"], ema=False)
    model = prepare_model(model, device)
    generate(model, info["identity"], list(range(cfg["ray_batch"])), device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _, start, stop in plan_ranges(n, rows):
        generate(model, info["identity"], list(range(start, stop)), device)
    sync(device)
    bare_synth = n / (time.perf_counter() - t0)
    del model
    if gpu:
        torch.cuda.empty_cache()
    s = run_synthesize(load_config(SynthesizeConfig, None, [
        *common, f"output={root}/synthetic", "actors_min=1", "actors_max=1", f"gpus_per_actor={1 if gpu else 0}",
        "cpus_per_actor=1"]))
    data = {"bare_samples_per_s": round(bare_synth, 3), "ray_data_steady_samples_per_s": round(s["steady_samples_per_s"], 3),
            "ratio": round(s["steady_samples_per_s"] / bare_synth, 3), "goal": 0.95,
            "end_to_end_samples_per_s": round(s["samples_per_s"], 3), "load": load()}
    if started:
        ray.shutdown()
    return {"train": train, "data": data}


# ---------------------------------------------------------------- report
def table(res: dict) -> str:
    lines = [f"GPU benchmark on {res['device']} ({res['mode']}), torch {res['torch']}, load average at start "
             f"{res['load_start']}, total {res['seconds']:.0f} s"]

    def sec(name):
        v = res["sections"].get(name, {})
        if "error" in v or "skipped" in v:
            lines.append(f"  {name}: {v.get('error') or v.get('skipped')}")
            return None
        return v

    t = sec("train_jointnet")
    if t:
        lines.append(f"  SAR-JointNet training ({t['params_m']}M params, {t['size']}², batch {t['batch']}, {t['precision']}): "
                     f"{t['steps_per_s']} steps/s = {t['samples_per_s']} samples/s  (load {t['load']})")
    s = sec("synthesis")
    sc = sec("synthesis_compile")
    if s or sc:
        lines.append(f"  synthesis, {(s or sc)['sampler']} {(s or sc)['steps']} steps at {(s or sc)['size']}²: samples/s")
        lines.append("    | batch | precision | compile | samples/s | ms/forward | warm-up s | load |")
        for r in (s or {}).get("rows", []) + (sc or {}).get("rows", []):
            what = r.get("skipped") or r.get("error")
            lines.append(f"    | {r['batch']} | {r['precision']} | {r['compile']} | "
                         + (f"{what} | | | |" if what else
                            f"{r['samples_per_s']} | {r['ms_per_forward']} | {r['warmup_s']} | {r['load']} |"))
    m = sec("saross")
    if m:
        cc, p = m["caft_cost"], m["paper_caft"]
        lines.append(f"  SAROSS-Net {m['encoder']} at {m['size']}², batch 1, {m['precision']}, {m['memory_format']}, "
                     f"{m['scan']}:")
        lines.append(f"    latency: no skip module {m['none']['latency_ms']} ms, CAFT {m['caft']['latency_ms']} ms "
                     f"(paper: {p['latency_ms_rtx2080']} ms with CAFT on an RTX 2080)  (load {m['caft']['load']})")
        lines.append(f"    CAFT cost: +{cc['params_m']}M params (paper +{p['params_m']}M), +{cc['gflops']} GFLOPs = "
                     f"+{cc['gmacs']} GMACs (paper +{p['gflops']} GFLOPs), +{cc['latency_ms']} ms")
    r = sec("ray")
    if r:
        tr, da = r["train"], r["data"]
        lines.append(f"  Ray Train 1 worker / bare loop: {tr['ray_train_steps_per_s']} / {tr['bare_steps_per_s']} steps/s "
                     f"= {tr['ratio']} (goal >= {tr['goal']})  (load {tr['load']})")
        lines.append(f"  Ray Data 1 actor (steady) / bare loop: {da['ray_data_steady_samples_per_s']} / "
                     f"{da['bare_samples_per_s']} samples/s = {da['ratio']} (goal >= {da['goal']})  (load {da['load']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (CI)")
    ap.add_argument("--json", default="gpu_benchmark.json", help="where the JSON goes")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip sections/configurations that would start later")
    ap.add_argument("--only", nargs="*", choices=["train_jointnet", "synthesis", "saross", "ray", "synthesis_compile"],
                    help="run only these sections")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    def budget() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU (smoke) runs: one thread, no oversubscription on a shared machine
    cfg = sizes(args.smoke or device.type == "cpu")
    res = {"device": describe_device(device), "mode": "smoke" if args.smoke else "full", "torch": torch.__version__,
           "python": _platform.python_version(), "cpu": describe_cpu(), "cpu_count": os.cpu_count(),
           "load_start": load(),
           "sections": {}}
    root = tempfile.mkdtemp(prefix="dakd-gpu-bench-")
    try:
        sections = [("train_jointnet", lambda: bench_train(cfg, device)),
                    ("synthesis", lambda: bench_synthesis(cfg, device, budget)),
                    ("saross", lambda: bench_saross(cfg, device)),
                    ("ray", lambda: bench_ray(cfg, device, root)),
                    ("synthesis_compile", lambda: bench_synthesis(cfg, device, budget, compile=True))]
        for name, fn in sections:
            if args.only and name not in args.only:
                continue
            if budget() <= 0:
                res["sections"][name] = {"skipped": "time budget"}
                continue
            t0 = time.perf_counter()
            try:
                res["sections"][name] = fn()
            except Exception as exc:  # noqa: BLE001 - record and go on: the other sections still tell something
                traceback.print_exc()
                res["sections"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            res["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[gpu-bench] {name} done in {res['sections'][name]['seconds']} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    res["load_end"] = load()
    with open(args.json, "w") as f:
        json.dump(res, f, indent=2)
    print(table(res))
    print(f"JSON: {args.json}")
    return res


if __name__ == "__main__":
    main()
