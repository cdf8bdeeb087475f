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
    test = {"real-only": [0.70, 0.78, 0.74], "DAKD": [0.73, 0.75, 0.77]}
    rows = {}
    for name, values in test.items():
        for seed, v in zip([3, 5, 8], values):
            label = name if seed == 3 else accuracy.SEED_LABEL.format(student=name, seed=seed)
            rows[label] = {"miou": v, "val_miou": v - 0.01}
    summary = accuracy.seed_summary(rows, ["real-only", "soft"], [3, 5, 8])
    dakd = summary["students"]["DAKD"]
    assert dakd["test"] == test["DAKD"] and dakd["val"] == [v - 0.01 for v in test["DAKD"]]
    assert abs(dakd["test_std"] - statistics.stdev(test["DAKD"])) < 1e-12
    diffs = summary["minus_real_only"]["DAKD"]["test"]
    assert [round(d, 6) for d in diffs] == [0.03, -0.03, 0.03] and list(summary["minus_real_only"]) == ["DAKD"]
    assert abs(summary["minus_real_only"]["DAKD"]["mean"] - 0.01) < 1e-12
    lines = "\n".join(accuracy.format_seeds(summary))
    assert "| DAKD | 73.00 / 75.00 / 77.00 | 75.00 ± 2.00 | 74.00 ± 2.00 |" in lines
    assert "DAKD minus real-only on test, paired by seed: +3.00, -3.00, +3.00 (mean +1.00 ± 3.46)" in lines


def test_accuracy_refuses_seeds_that_repeat_the_students_seed(tmp_path, capsys):
    """--seeds 0 would train the preset's students again under another name: refused, nothing written."""
    accuracy = load_accuracy()
    (tmp_path / "root").mkdir()
    for seeds in (["0"], ["2", "2"], ["-1"]):
        with pytest.raises(SystemExit, match="expected distinct seeds >= 0 other than the students' own saross.seed=0"):
            accuracy.main(["--root", str(tmp_path / "root"), "--sensors", "palsar", "--output", str(tmp_path / "out"),
                           "--seeds", *seeds])
    assert not (tmp_path / "out").exists()


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
        for mode, run, _ in accuracy.variant_runs(name, base.student_modes):
            cfg = student_config(base, "runs/real", mode, base.tracking, run, **accuracy.variant_spec(name)[2](base.saross))
            assert cfg.loss.mode == mode and cfg.run_name == run
            for r in (428, 432):  # the sos-dev train counts after val is carved out
                assert abs(steps(cfg, r) - steps(base.saross, r)) <= cfg.epochs, (name, mode, r)
    only = student_config(base, "runs/real", "hard", base.tracking, **accuracy.variant_spec("synthetic-only")[2](base.saross))
    assert only.synthetic_share == 1.0 and only.epochs == 2 * base.saross.epochs
