"""The optimizer step on this machine: AdamW's per-tensor loop (torch's default on a CPU)
against its fused kernel (`train.runner.adamw`, what every job uses), measured side by side
in one run (the two alternate, so a change in load hits both), for the parameter sets of
the `sos-cpu` recipe:

- teacher: both U-Nets of SAR-JointNet (stage 3 trains all of them);
- student: SAROSS-Net (the preset's resnet18 + UNet++/CAFT).

Each row: median milliseconds per `optimizer.step()` (random gradients, set once) of each
kind, their ratio fused / loop, and the two updates' largest difference after the same
steps from the same start (the same update, to float32 rounding).

    python benchmarks/optimizer.py [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))


def recipe_models() -> dict:
    """{name: model} with the sos-cpu preset's teacher and student."""
    from dakd.config import PipelineConfig, load_config
    from dakd.models.saross import build_student
    from dakd.train.jointnet_runner import build_model

    cfg = load_config(PipelineConfig, preset=("sos-cpu", "pipeline"), overrides=["source.root=unused"])
    torch.manual_seed(0)
    return {"teacher": build_model(cfg.jointnet, 2), "student": build_student(cfg.saross.model, 2)}


def measure(model: torch.nn.Module, steps: int) -> dict:
    """Median ms per step of the per-tensor loop and the fused kernel, and the largest weight
    difference between the two copies after the same steps."""
    from dakd.train.runner import adamw

    models = {"loop": model, "fused": copy.deepcopy(model)}
    torch.manual_seed(1)
    grads = [torch.randn_like(p) for p in model.parameters()]
    opts = {"loop": torch.optim.AdamW(models["loop"].parameters(), lr=1e-3, weight_decay=0.01),
            "fused": adamw(models["fused"].parameters(), 1e-3, 0.01)}
    for m in models.values():
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
    times = {k: [] for k in opts}
    for i in range(steps + 2):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= 2:
                times[k].append(time.perf_counter() - t0)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(models["loop"].parameters(), models["fused"].parameters()))
    return {**{k: 1000 * statistics.median(ts) for k, ts in times.items()}, "diff": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per kind and row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the preset's)")
    args = parser.parse_args(argv)
    from dakd.inference import describe_cpu

    torch.set_num_threads(args.threads)
    print(f"machine: {describe_cpu()}; torch {torch.__version__}, {args.threads} threads")
    print("| parameters (sos-cpu recipe) | count | loop ms/step | fused ms/step | fused / loop | max weight diff | load |")
    print("|---|---|---|---|---|---|---|")
    for name, model in recipe_models().items():
        r = measure(model, args.steps)
        count = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {count / 1e6:.1f} M | {r['loop']:.1f} | {r['fused']:.1f} | {r['fused'] / r['loop']:.2f} | "
              f"{r['diff']:.1e} | {os.getloadavg()[0]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
