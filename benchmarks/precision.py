"""Training-step arithmetic on this machine: float32 against bf16 autocast (`precision: bf16`),
for the three steps of the `sos-cpu` recipe, measured side by side in one run (the two
precisions alternate, so a change in load hits both).

- teacher stage 1: SAR-Net alone, L_x (64 px crops, the preset's batch and U-Net);
- teacher stage 3: both U-Nets coupled, L_joint;
- student: SAROSS-Net (the preset's resnet18 + UNet++/CAFT), 128 px crops, the preset's batch, CE.

Each row: median seconds per optimiser step (forward, backward, AdamW) of each precision and
their ratio bf16 / fp32, with the load average beside. The CPU's native bf16 support
(AMX tiles or AVX512-BF16) is printed: without it bf16 is emulated and slower.

    python benchmarks/precision.py [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))


def recipe_steps() -> dict:
    """{name: a function (precision) -> None doing one optimiser step} for the sos-cpu recipe
    (the preset's batches: the teacher's per worker, the student's global)."""
    from dakd.config import PipelineConfig, load_config
    from dakd.diffusion.schedule import joint_loss, make_train_scheduler, sample_timesteps, sar_loss
    from dakd.inference import autocast
    from dakd.models.saross import build_student
    from dakd.train.jointnet_runner import build_model, set_trainable
    from dakd.train.runner import adamw

    cfg = load_config(PipelineConfig, preset=("sos-cpu", "pipeline"), overrides=["source.root=unused"])
    jcfg, scfg = cfg.jointnet, cfg.saross
    batch = jcfg.batch_size_per_worker
    torch.manual_seed(0)
    teacher, scheduler = build_model(jcfg, 2), make_train_scheduler(jcfg.num_train_timesteps)
    x64, mask64 = torch.rand(batch, 1, jcfg.crop_size, jcfg.crop_size) * 2 - 1, torch.randint(0, 2, (batch, 64, 64))

    def teacher_step(stage: int):
        params = set_trainable(teacher, stage)
        opt = adamw(params, 1e-4, 0.01)

        def step(precision: str) -> None:
            t, noise = sample_timesteps(scheduler, batch, "cpu"), torch.randn_like(x64)
            with autocast("cpu", precision):
                if stage == 1:
                    out = sar_loss(teacher, scheduler, x64, t, noise)
                else:
                    out = joint_loss(teacher, scheduler, x64, mask64, 0.44, t, noise, torch.randn(batch, 2, 64, 64),
                                     jcfg.label_loss)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        return step

    student = build_student(scfg.model, 2).train()
    sopt = adamw(student.parameters(), 1e-4, 0.01)
    sbatch = scfg.global_batch_size
    x128, mask128 = torch.randn(sbatch, 1, scfg.crop_size, scfg.crop_size), torch.randint(0, 2, (sbatch, 128, 128))

    def student_step(precision: str) -> None:
        with autocast("cpu", precision):
            logits = student(x128)
        loss = torch.nn.functional.cross_entropy(logits.float(), mask128)
        sopt.zero_grad(set_to_none=True)
        loss.backward()
        sopt.step()

    return {"teacher stage 1": teacher_step(1), "teacher stage 3": teacher_step(3), "student": student_step}


def measure(step, steps: int) -> dict:
    """Median s/step of fp32 and bf16, alternating one step of each after two warm-up steps each."""
    times = {"fp32": [], "bf16": []}
    for precision in times:
        for _ in range(2):
            step(precision)
    for _ in range(steps):
        for precision, ts in times.items():
            t0 = time.perf_counter()
            step(precision)
            ts.append(time.perf_counter() - t0)
    return {p: statistics.median(ts) for p, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per precision and row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the preset's)")
    args = parser.parse_args(argv)
    from dakd.inference import describe_cpu

    torch.set_num_threads(args.threads)
    print(f"machine: {describe_cpu()}; torch {torch.__version__}, {args.threads} threads")
    print("| step (sos-cpu recipe) | fp32 s/step | bf16 s/step | bf16 / fp32 | load |")
    print("|---|---|---|---|---|")
    for name, step in recipe_steps().items():
        r = measure(step, args.steps)
        print(f"| {name} | {r['fp32']:.3f} | {r['bf16']:.3f} | {r['bf16'] / r['fp32']:.2f} | "
              f"{os.getloadavg()[0]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
