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
