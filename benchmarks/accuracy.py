"""Accuracy on genuine SOS data, per sensor: floors, a real-only student and DAKD students.

For each sensor the `sos-cpu` preset runs through `dakd pipeline` (stage by stage, so each
stage's wall time is measured): ingest with a val split carved from train -> b -> a small
SAR-JointNet teacher on the same train split -> synthetic set -> three compute-matched
students (real-only, DAKD hard, DAKD soft; equal optimiser steps and batch), each selected
on val -> evaluated once on the test folder at full resolution. Beside them the floors:
all-background, and the best global threshold on box-smoothed intensity (box and
threshold chosen on val). The test folder selects nothing.

    .venv/bin/python benchmarks/accuracy.py [--root ../shared/data/sos-dev] [--sensors palsar sentinel]
        [--output runs/accuracy] [--set saross.epochs=12 ...]
        [--variants soft-kd-hard soft-share50 ema synthetic-only]
        [--seeds 1 2] [--smoke]

`--variants` adds students that differ in one recipe choice (DAKD soft's two readings and
synthetic share; `ema`: every student again on an EMA of its weights; `synthetic-only`: a
student trained on the synthetic set alone, "train on synthetic, test on real"), on the same
teacher, synthetic set and optimiser steps, whatever `student_modes` holds (`ema` repeats the
students it holds); each row shows its mIoU on val beside its test figures, and the report names
the soft recipe val prefers. Only val chooses.

`--seeds 1 2` trains every student (the `--variants` ones too) again with each seed (`saross.seed`:
weight init, crops and sample order) on the same teacher, synthetic set and steps, and adds a
table of each student's test and val mIoU over the seeds (the preset's seed included): mean ±
sample std, and each DAKD student minus real-only paired by seed; the soft recipe is then chosen
on its mean val over seeds. One run's ranking of students is only as good as the spread between
seeds. A finished student of the same config under the same output is reused, not trained again.

Prints one table per sensor (mIoU / F1 / precision / recall on test, %, the paper's figures
beside) with the wall time per stage and the machine load; writes <output>/accuracy.json.
`--smoke` shrinks everything (seconds per stage) to check that the recipe runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_ROOT = os.path.join(os.path.dirname(REPO), "shared", "data", "sos-dev")

# PAPER.md, SAROSS-Net + DAKD (mIoU, F1, precision, recall), on the original SOS test split
PAPER = {"palsar": (86.30, 92.23, 92.18, 92.28), "sentinel": (87.25, 93.05, 92.88, 93.24)}

# "each student of student_modes": a variant that repeats the pipeline's students (`ema`, the seed runs)
EACH = "each"


def share_changes(saross, share: float) -> dict:
    """The TrainSarossConfig changes for a synthetic share of `share` at the optimiser steps of `saross`:
    an epoch is R / (1 - share) samples, so the epochs scale by (1 - share) / (1 - saross.synthetic_share)."""
    return {"synthetic_share": share, "epochs": max(1, round(saross.epochs * (1 - share) / (1 - saross.synthetic_share)))}


# Recipe choices, made on val: name -> (the student mode it trains, whatever `student_modes` holds, or EACH;
# row label; TrainSarossConfig changes given the preset's saross config). Each keeps the optimiser steps of
# the preset's students.
VARIANTS = {
    "soft-kd-hard": (("soft",), "DAKD (soft: KD + CE/Dice on the teacher's argmax)",
                     lambda s: {"loss": {"soft_synthetic": "kd+hard"}}),
    # another synthetic share: R / (1 - share) samples per epoch, the epochs scaled for the same steps
    "soft-share25": (("soft",), "DAKD (soft, 25% synthetic)", lambda s: share_changes(s, 0.25)),
    "soft-share50": (("soft",), "DAKD (soft, 50% synthetic)", lambda s: share_changes(s, 0.5)),
    # train on synthetic, test on real: R synthetic mosaics per epoch (the teacher's argmax as labels) and no
    # real crop, 1 / (1 - share) times the epochs for the same steps; what the synthetic set teaches on its own
    "synthetic-only": (("hard",), "synthetic only (teacher's argmax; no real sample)",
                       lambda s: {"synthetic_share": 1.0, "epochs": round(s.epochs / (1 - s.synthetic_share))}),
    # every student again, validated, selected and evaluated on an EMA of its weights
    "ema": (EACH, "{student} + EMA of the weights (0.99)", lambda s: {"ema_decay": 0.99}),
}


def repeats_preset(saross, changes: dict) -> bool:
    """Whether a variant's `changes` leave the config `saross` as it is (the variant would repeat its students)."""
    return all(repeats_preset(getattr(saross, key), value) if isinstance(value, dict) else getattr(saross, key) == value
               for key, value in changes.items())


SEED_LABEL = "{student}, seed {seed}"


def variant_spec(name: str) -> tuple:
    """VARIANTS[name]; "seed<N>": every student again with `saross.seed=N`; "<variant>+seed<N>": that
    variant's students again with `saross.seed=N`."""
    variant, _, seed = name.partition("+")
    if variant.startswith("seed"):
        variant, seed = "", variant
    if not seed:
        return VARIANTS[variant]
    n = int(seed.removeprefix("seed"))
    trains, label, changes = VARIANTS[variant] if variant else (EACH, "{student}", lambda s: {})
    return trains, SEED_LABEL.replace("{student}", label).replace("{seed}", str(n)), \
        lambda s: {**changes(s), "seed": n}


def variant_runs(name: str, modes: list[str]) -> list[tuple[str, str, str]]:
    """(student mode, run name, row label) of a variant for the pipeline's student modes: its own
    student(s), or one run per mode of `modes` for an EACH variant."""
    from dakd.pipeline import STUDENT_NAMES

    trains, label, _ = variant_spec(name)
    run = name.replace("+", "-")
    if trains == EACH:
        return [(m, f"{m}-{run}", label.format(student=STUDENT_NAMES[m])) for m in modes]
    return [(m, run, label.format(student=STUDENT_NAMES[m])) for m in trains]


def extra_runs(variants: list[str], seeds: list[int]) -> list[str]:
    """The variant names run_variants trains: each variant, then per seed every student and each variant."""
    runs = list(variants)
    for seed in seeds:
        runs += [f"seed{seed}", *(f"{v}+seed{seed}" for v in variants)]
    return runs


VARIANT_STAGES = ("variant ", "evaluate variants")  # wall-time keys of --variants: outside the recipe's time

SMOKE = ["jointnet.model={block_out_channels: [8, 16], layers_per_block: 1, attention_levels: [1], norm_num_groups: 4, "
         "attention_head_dim: 4}", "jointnet.crop_size=32",  # the tiny preset's teacher: a smoke checks that it runs
         "jointnet.stages.stage1={iterations: 4, lr: 0.001}", "jointnet.stages.stage2={iterations: 4, lr: 0.001}",
         "jointnet.stages.stage3={iterations: 2, lr: 0.001}", "jointnet.checkpoint_every=5", "jointnet.log_every=5",
         "jointnet.batch_size_per_worker=4", "synthesize.count=16", "synthesize.steps=2", "synthesize.rows_per_file=8",
         "saross.epochs=1", "saross.crop_size=32", "saross.global_batch_size=32",
         "saross.model.encoder=mobilenetv3_small_050",  # half resnet18's time per 256 px image (val, test)
         "saross.model.decoder_channels=[8, 8, 8]", "saross.model.caft_heads=2",
         "saross.synthetic_share=0.05", "saross.overlay_count=0", "evaluate.overlay_count=0"]


def run_sensor(root: str, sensor: str, output: str, preset: str, overrides: list[str], tracking: bool,
               variants: list[str] = (), seeds: list[int] = ()) -> dict:
    """The recipe for one sensor, plus `variants` (VARIANTS names) and every student again per seed of
    `seeds`; returns {"rows": {name: metrics+training}, "wall_s": {stage: s}, "soft_choice": the soft row
    val prefers, "seeds": seed_summary or None, ...}."""
    from dakd import storage
    from dakd.config import PipelineConfig, load_config
    from dakd.data.shards import open_shard_set
    from dakd.eval.baselines import fit_threshold, floor_metrics, threshold_predict
    from dakd.pipeline import STUDENT_NAMES, real_shards_uri, run_pipeline

    sets = [f"source.root={root}", f"source.sensors=[{sensor}]", f"output={os.path.join(output, sensor)}",
            f"tracking.enabled={str(tracking).lower()}", *overrides]
    base = load_config(PipelineConfig, None, sets, preset=(preset, "pipeline"))
    if len(set(seeds)) != len(seeds) or base.saross.seed in seeds or min(seeds, default=0) < 0:
        raise SystemExit(f"accuracy: --seeds {' '.join(map(str, seeds))}: expected distinct seeds >= 0 other than "
                         f"the students' own saross.seed={base.saross.seed}")
    repeats = [v for v in variants if repeats_preset(base.saross, VARIANTS[v][2](base.saross))]
    if repeats:
        raise SystemExit(f"accuracy: --variants {' '.join(repeats)}: the preset's students already train that way "
                         f"(saross: {VARIANTS[repeats[0]][2](base.saross)}); expected a variant that changes the recipe")
    wall: dict[str, float] = {}
    loads: dict[str, float] = {}  # 5-min load average at the end of each stage: the wall times' context

    def stage(name: str, **update) -> dict:
        t0 = time.perf_counter()
        summary = run_pipeline(base.model_copy(update=update))
        note(base, wall, loads, name, t0)
        return summary

    stage("ingest + b", stages=["ingest", "balance"])
    stage("teacher", stages=["train-jointnet"])
    synthesis = stage("synthesis + FID", stages=["synthesize", "evaluate-synthesis"])
    for mode in base.student_modes:
        stage(f"student {mode}", stages=["train-saross"], student_modes=[mode])
    final = stage("evaluate (test)", stages=["train-saross", "evaluate"])  # the students are finished: skipped

    real = open_shard_set(real_shards_uri(base))
    names = list(real.classes.names)
    t0 = time.perf_counter()
    fit = fit_threshold(real.iter_records("val"))  # chosen on val ...
    rows = {
        "all-background": floor_metrics(real.iter_records("test"), lambda img: img * 0, names),
        f"threshold (box {fit['box']}, < {fit['threshold']})": floor_metrics(
            real.iter_records("test"), lambda img: threshold_predict(img, fit["box"], fit["threshold"]), names),
    }  # ... reported on test
    wall["floors"] = round(time.perf_counter() - t0, 1)
    ev = final["stages"]["evaluate"]
    for mode in base.student_modes:
        metrics = json.loads(storage.read_text(storage.join_uri(ev["outputs"][mode], "metrics.json")))["metrics"]
        rows[STUDENT_NAMES[mode]] = {**metrics, **ev["training"][mode]}
    rows.update(run_variants(base, extra_runs(variants, seeds), wall, loads))
    soft = ([STUDENT_NAMES["soft"]] if "soft" in base.student_modes else []) + [
        label for v in variants for mode, _, label in variant_runs(v, base.student_modes) if mode == "soft"]
    summary = seed_summary(rows, base.student_modes, variants, [base.saross.seed, *seeds]) if seeds else None
    val = {k: summary["students"][k]["val_mean"] if summary else rows[k]["val_miou"] for k in soft}
    manifest = real.manifest
    return {"sensor": sensor, "rows": rows, "wall_s": wall, "load_5min": loads, "threshold_fit": fit,
            "soft_choice": max(soft, key=val.get) if soft else None, "seeds": summary,
            "counts": {s: e["count"] for s, e in manifest["splits"].items()},
            "b": (manifest.get("balance") or {}).get("b"),
            "fid": {base.evaluate_synthesis.features: synthesis["stages"]["evaluate-synthesis"]["fid"]}}


def run_variants(base, names: list[str], wall: dict, loads: dict) -> dict:
    """VARIANTS[name] trained like the pipeline's students, then evaluated together in one
    actor pool; {row label: metrics + training}."""
    from dakd.pipeline import evaluate_students, real_shards_uri, train_student

    real = real_shards_uri(base)
    trained = {}
    for name in names:
        for mode, run, label in variant_runs(name, base.student_modes):
            t0 = time.perf_counter()
            changes = variant_spec(name)[2](base.saross)
            trained[run] = (train_student(base, real, mode, base.tracking, run_name=run, **changes)["checkpoint"], label)
            note(base, wall, loads, f"variant {run}", t0)
    t0 = time.perf_counter()
    evaluated = evaluate_students(base, real, trained, base.tracking)
    if names:
        note(base, wall, loads, "evaluate variants (test)", t0)
    return {trained[name][1]: {**result["metrics"], **training} for name, (result, training) in evaluated.items()}


def seed_summary(rows: dict, modes: list[str], variants: list[str], seeds: list[int]) -> dict:
    """Each student's mIoU over `seeds` (the first: the preset's students and `variants`, the rest:
    their seed runs): {"seeds", "students": {name: {"test", "val": [per seed], "test_mean", "test_std",
    "val_mean", "val_std"}}, "minus_real_only": {name: {"test": [per seed], "mean", "std"}}}; fractions,
    std over seeds (ddof 1)."""
    from dakd.pipeline import STUDENT_NAMES

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    students = {}
    names = [STUDENT_NAMES[m] for m in modes] + [label for v in variants for _, _, label in variant_runs(v, modes)]
    for name in names:
        runs = [rows[name]] + [rows[SEED_LABEL.format(student=name, seed=s)] for s in seeds[1:]]
        test, val = [r["miou"] for r in runs], [r["val_miou"] for r in runs]
        (tm, ts), (vm, vs) = stats(test), stats(val)
        students[name] = {"test": test, "val": val, "test_mean": tm, "test_std": ts, "val_mean": vm, "val_std": vs}
    paired = {}
    if "real-only" in modes:
        base = students[STUDENT_NAMES["real-only"]]["test"]
        for name, s in students.items():
            if name != STUDENT_NAMES["real-only"]:
                diffs = [a - b for a, b in zip(s["test"], base)]
                mean, std = stats(diffs)
                paired[name] = {"test": diffs, "mean": mean, "std": std}
    return {"seeds": seeds, "students": students, "minus_real_only": paired}


def format_seeds(summary: dict) -> list[str]:
    """The --seeds table (points of mIoU) and the paired differences."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = ["", f"Over seeds {seeds} (same teacher, synthetic set and steps; each run selected on val):", "",
             "| student | test mIoU per seed | test mean ± std | val mIoU mean ± std |", "|---|---|---|---|"]
    for name, s in summary["students"].items():
        lines.append(f"| {name} | " + " / ".join(f"{100 * v:.2f}" for v in s["test"])
                     + f" | {100 * s['test_mean']:.2f} ± {100 * s['test_std']:.2f} | "
                     f"{100 * s['val_mean']:.2f} ± {100 * s['val_std']:.2f} |")
    for name, d in summary["minus_real_only"].items():
        lines.append(f"{name} minus real-only on test, paired by seed: "
                     + ", ".join(f"{100 * v:+.2f}" for v in d["test"])
                     + f" (mean {100 * d['mean']:+.2f} ± {100 * d['std']:.2f})")
    return lines


def note(base, wall: dict, loads: dict, key: str, t0: float) -> None:
    """Record a stage's wall time and the 5-min load average at its end; say it."""
    wall[key], loads[key] = round(time.perf_counter() - t0, 1), round(os.getloadavg()[1], 1)
    print(f"[accuracy] {base.source.sensors[0]}: {key} done in {wall[key]:.0f} s", flush=True)


def format_report(result: dict) -> str:
    sensor = result["sensor"]
    lines = [f"## SOS {sensor}: test folder ({result['counts'].get('test')} images), "
             f"students selected on val ({result['counts'].get('val')} images carved from train), "
             f"trained on {result['counts'].get('train')} train images; b = {result['b']:.4f}",
             "", "| model | mIoU | F1 | precision | recall | steps | samples seen | val mIoU (selects) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in result["rows"].items():
        cells = [m["miou"], m["f1_mean"], m["precision_mean"], m["recall_mean"]]
        val = m.get("val_miou", result["threshold_fit"]["miou"] if name.startswith("threshold") else None)
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in cells)
                     + f" | {m.get('steps', '-')} | {m.get('samples_seen', '-')} | "
                     + (f"{100 * val:.2f} |" if val is not None else "- |"))
    p = PAPER[sensor]
    lines.append(f"| paper: SAROSS-Net + DAKD (full data, original test split) | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} "
                 f"| {p[3]:.2f} | - | - | - |")
    if result.get("soft_choice"):
        over = " (mean over seeds)" if result.get("seeds") else ""
        lines += ["", f"DAKD soft recipe preferred on val{over}: {result['soft_choice']}"]
    if result.get("seeds"):
        lines += format_seeds(result["seeds"])
    recipe = sum(v for k, v in result["wall_s"].items() if not k.startswith(VARIANT_STAGES))
    lines += ["", "synthetic set FID: " + ", ".join(f"{v:.4g} ({k} features)" for k, v in result["fid"].items()),
              f"the recipe's wall time (every stage but --variants): {recipe / 60:.1f} min (goal: <= 45 min per sensor "
              f"on 2 cores)",
              "wall time per stage (s; 5-min load average at its end): " + ", ".join(
                  f"{k} {v:.0f} ({result.get('load_5min', {}).get(k, '-')})" for k, v in result["wall_s"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=DEFAULT_ROOT, help="an SOS root in the original layout (default: sos-dev)")
    ap.add_argument("--sensors", nargs="+", default=["palsar", "sentinel"], choices=["palsar", "sentinel"])
    ap.add_argument("--output", default=os.path.join(REPO, "runs", "accuracy"))
    ap.add_argument("--preset", default="sos-cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                    help="extra students, one recipe choice each, compared on val")
    ap.add_argument("--seeds", nargs="*", type=int, default=[], metavar="SEED",
                    help="train every student (and each --variants student) again with each seed (saross.seed) "
                         "and summarise over seeds")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the recipe runs (seconds per stage)")
    ap.add_argument("--tracking", action="store_true", help="log to MLflow (a local store under --output)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"accuracy: SOS root not found: {args.root}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    overrides = (SMOKE if args.smoke else []) + args.sets
    from dakd.inference import describe_cpu

    machine = describe_cpu()  # runs on other CPUs are not comparable
    t0 = time.perf_counter()
    results = []
    for sensor in args.sensors:
        results.append(run_sensor(args.root, sensor, args.output, args.preset, overrides, args.tracking,
                                  args.variants, args.seeds))
        print(format_report(results[-1]), flush=True)
        load = os.getloadavg()
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "accuracy.json"), "w") as f:  # after each sensor: a stopped run keeps it
            json.dump({"results": results, "load": load, "overrides": overrides, "machine": machine}, f, indent=2,
                      default=float)
    footer = (f"\nwhole run {time.perf_counter() - t0:.0f} s on {machine}, load average "
              f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min). No figure was tuned on the test folder.")
    print(footer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
