"""benchmarks/gpu.py --smoke: the GPU check runs end to end on the CPU at tiny sizes, on the
session's real local Ray, and writes its JSON (so it is ready whenever a GPU is lent)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the whole GPU check at tiny sizes (about 40 s): CI runs it, test-fast does not
def test_gpu_benchmark_smoke(ray_local, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "benchmarks", "gpu.py"))
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    out = tmp_path / "gpu.json"
    res = gpu.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    sec = res["sections"]
    assert res["mode"] == "smoke" and res["device"] == "cpu"
    assert not [k for k, v in sec.items() if "error" in v or "skipped" in v], sec
    assert sec["train_jointnet"]["steps_per_s"] > 0 and sec["train_jointnet"]["batch"] == 4
    rows = sec["synthesis"]["rows"]
    assert [(r["batch"], r["compile"]) for r in rows] == [(1, False), (4, False)] * 2
    assert all(r["samples_per_s"] > 0 and "load" in r for r in rows)
    assert all("skipped" in r for r in sec["synthesis_compile"]["rows"])  # compile: CUDA only
    sa = sec["saross"]
    assert sa["scan"].startswith("reference scan") and sa["encoder"] == "mambavision_t"
    assert sa["caft_cost"]["params_m"] > 0 and sa["caft_cost"]["gflops"] > 0 and sa["paper_caft"]["params_m"] == 0.89
    for part in ("train", "data"):
        assert sec["ray"][part]["ratio"] > 0 and "load" in sec["ray"][part]
    printed = capsys.readouterr().out
    assert "Ray Train 1 worker / bare loop" in printed and "CAFT cost" in printed and "(load " in printed


def load_accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_bench", os.path.join(ROOT, "benchmarks", "accuracy.py"))
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    return accuracy


def test_accuracy_seed_summary_pairs_each_student_with_real_only_by_seed():
    """--seeds: per student mean and sample std over the seeds; DAKD minus real-only seed by seed."""
    import statistics

    accuracy = load_accuracy()
    kd_hard = accuracy.VARIANTS["soft-kd-hard"][1]
    test = {"real-only": [0.70, 0.78, 0.74], "DAKD": [0.73, 0.75, 0.77], kd_hard: [0.71, 0.79, 0.72]}
    rows = {}
    for name, values in test.items():
        for seed, v in zip([3, 5, 8], values):
            label = name if seed == 3 else accuracy.SEED_LABEL.format(student=name, seed=seed)
            rows[label] = {"miou": v, "val_miou": v - 0.01}
    summary = accuracy.seed_summary(rows, ["real-only", "soft"], ["soft-kd-hard"], [3, 5, 8])
    assert summary["students"][kd_hard]["test"] == test[kd_hard]  # a --variants student over the seeds too
    assert [round(d, 6) for d in summary["minus_real_only"][kd_hard]["test"]] == [0.01, 0.01, -0.02]
    dakd = summary["students"]["DAKD"]
    assert dakd["test"] == test["DAKD"] and dakd["val"] == [v - 0.01 for v in test["DAKD"]]
    assert abs(dakd["test_std"] - statistics.stdev(test["DAKD"])) < 1e-12
    diffs = summary["minus_real_only"]["DAKD"]["test"]
    assert [round(d, 6) for d in diffs] == [0.03, -0.03, 0.03] and list(summary["minus_real_only"]) == ["DAKD", kd_hard]
    assert abs(summary["minus_real_only"]["DAKD"]["mean"] - 0.01) < 1e-12
    lines = "\n".join(accuracy.format_seeds(summary))
    assert "| DAKD | 73.00 / 75.00 / 77.00 | 75.00 ± 2.00 | 74.00 ± 2.00 |" in lines
    assert "DAKD minus real-only on test, paired by seed: +3.00, -3.00, +3.00 (mean +1.00 ± 3.46)" in lines


def test_accuracy_seeds_repeat_each_variant_with_its_own_change():
    """--variants soft-kd-hard --seeds 1 2: every student and the variant again per seed, each run
    keeping the variant's change and taking the seed. A variant's own student is trained whatever
    student_modes holds (--variants synthetic-only with student_modes=[soft] once trained nothing)."""
    from dakd.config import TrainSarossConfig
    from dakd.pipeline import STUDENT_NAMES

    accuracy = load_accuracy()
    runs = accuracy.extra_runs(["soft-kd-hard", "ema"], [1, 2])
    assert runs == ["soft-kd-hard", "ema", "seed1", "soft-kd-hard+seed1", "ema+seed1",
                    "seed2", "soft-kd-hard+seed2", "ema+seed2"]
    base = TrainSarossConfig()
    trains, _, changes = accuracy.variant_spec("soft-kd-hard+seed2")
    assert trains == ("soft",) and changes(base) == {"loss": {"soft_synthetic": "kd+hard"}, "seed": 2}
    modes = ["real-only", "hard", "soft"]
    assert accuracy.variant_runs("soft-kd-hard+seed2", modes) == [
        ("soft", "soft-kd-hard-seed2", accuracy.VARIANTS["soft-kd-hard"][1] + ", seed 2")]
    ema = accuracy.variant_runs("ema+seed1", modes)
    assert [run for _, run, _ in ema] == ["real-only-ema-seed1", "hard-ema-seed1", "soft-ema-seed1"]
    assert ema[0][2] == f"{STUDENT_NAMES['real-only']} + EMA of the weights (0.99), seed 1"
    assert accuracy.variant_spec("ema+seed1")[2](base) == {"ema_decay": 0.99, "seed": 1}
    assert accuracy.variant_runs("seed1", ["soft"]) == [("soft", "soft-seed1", f"{STUDENT_NAMES['soft']}, seed 1")]
    # a one-student variant trains its student whatever student_modes holds; `ema` repeats the ones it holds
    assert accuracy.variant_runs("synthetic-only", ["soft"]) == [
        ("hard", "synthetic-only", accuracy.VARIANTS["synthetic-only"][1])]
    assert accuracy.variant_runs("soft-share50+seed1", ["real-only"]) == [
        ("soft", "soft-share50-seed1", accuracy.VARIANTS["soft-share50"][1] + ", seed 1")]
    assert [run for _, run, _ in accuracy.variant_runs("ema", ["soft"])] == ["soft-ema"]


def test_accuracy_refuses_seeds_that_repeat_the_students_seed(tmp_path, capsys):
    """--seeds 0 would train the preset's students again under another name: refused, nothing written."""
    accuracy = load_accuracy()
    (tmp_path / "root").mkdir()
    for seeds in (["0"], ["2", "2"], ["-1"]):
        with pytest.raises(SystemExit, match="expected distinct seeds >= 0 other than the students' own saross.seed=0"):
            accuracy.main(["--root", str(tmp_path / "root"), "--sensors", "palsar", "--output", str(tmp_path / "out"),
                           "--seeds", *seeds])
    assert not (tmp_path / "out").exists()


def test_accuracy_refuses_a_variant_that_repeats_the_preset(tmp_path):
    """soft-share25 on sos-cpu (a quarter synthetic already) would train the soft student again under
    another name: refused, nothing written; soft-share50 on it changes share and epochs."""
    from dakd.config import PipelineConfig, load_config

    accuracy = load_accuracy()
    (tmp_path / "root").mkdir()
    with pytest.raises(SystemExit, match=r"--variants soft-share25: the preset's students already train that way"):
        accuracy.main(["--root", str(tmp_path / "root"), "--sensors", "palsar", "--output", str(tmp_path / "out"),
                       "--variants", "soft-share25", "ema"])
    assert not (tmp_path / "out").exists()
    saross = load_config(PipelineConfig, None, ["source.root=/data/sos"], preset=("sos-cpu", "pipeline")).saross
    assert accuracy.VARIANTS["soft-share50"][2](saross) == {"synthetic_share": 0.5, "epochs": 8}
    assert not accuracy.repeats_preset(saross, accuracy.VARIANTS["soft-kd-hard"][2](saross))
    assert accuracy.repeats_preset(saross, {"loss": {"soft_synthetic": saross.loss.soft_synthetic}})


def test_accuracy_variants_keep_the_presets_steps():
    """Every --variants student, built as the benchmark trains it on the sos-cpu preset, is a valid
    config and takes the preset students' optimiser steps, up to one step per epoch of rounding
    (epoch samples: R real + S synthetic, S = R share / (1 - share); synthetic only: R)."""
    from dakd.config import PipelineConfig, load_config
    from dakd.pipeline import student_config

    accuracy = load_accuracy()
    base = load_config(PipelineConfig, None, ["source.root=/data/sos"], preset=("sos-cpu", "pipeline"))

    def steps(cfg, r: int) -> int:
        share = cfg.synthetic_share
        epoch = r if share == 1 else r + round(r * share / (1 - share))
        return epoch // cfg.global_batch_size * cfg.epochs

    for name in accuracy.VARIANTS:
        if accuracy.repeats_preset(base.saross, accuracy.VARIANTS[name][2](base.saross)):
            continue  # refused by the benchmark (above)
        for mode, run, _ in accuracy.variant_runs(name, base.student_modes):
            cfg = student_config(base, "runs/real", mode, base.tracking, run, **accuracy.variant_spec(name)[2](base.saross))
            assert cfg.loss.mode == mode and cfg.run_name == run
            for r in (428, 432):  # the sos-dev train counts after val is carved out
                assert abs(steps(cfg, r) - steps(base.saross, r)) <= cfg.epochs, (name, mode, r)
    only = student_config(base, "runs/real", "hard", base.tracking, **accuracy.variant_spec("synthetic-only")[2](base.saross))
    # R samples per epoch against the preset's R / (1 - share): 1 / (1 - share) times the epochs
    assert only.synthetic_share == 1.0 and only.epochs == round(base.saross.epochs / (1 - base.saross.synthetic_share))
