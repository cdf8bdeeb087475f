"""The SOS path on genuine data (../shared/data/sos-dev, read in place): benchmarks/accuracy.py
at smoke size on one sensor. Ingest carves val from train, b lands near the value measured
on the full data set, every student (a soft recipe variant too) is selected on val with
equal steps, the soft recipe is chosen on val, the floors are fitted on val, and everything
is reported on the test folder. The soft student and its variant only: the real-only and
hard-label students are the same code path with another mode (test_train_saross trains both;
test_pipeline compares a real-only and a DAKD student at equal steps)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOS_DEV = REPO.parent / "shared" / "data" / "sos-dev"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not SOS_DEV.is_dir(), reason="../shared/data/sos-dev not present beside the checkout")
def test_accuracy_benchmark_smoke_on_genuine_palsar(tmp_path, ray_local, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert accuracy.main(["--root", str(SOS_DEV), "--sensors", "palsar", "--output", str(tmp_path), "--smoke",
                          "--variants", "soft-kd-hard", "--set", "student_modes=[soft]"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "accuracy.json").read_text())["results"][0]
    counts = result["counts"]
    assert counts["test"] == 128 and counts["train"] + counts["val"] == 512 and 0.05 < counts["val"] / 512 < 0.3
    assert abs(result["b"] - 0.4370) < 0.02  # sos-dev README: b over the full PALSAR train split
    rows = result["rows"]
    students = {k: v for k, v in rows.items() if "steps" in v}
    variant = accuracy.VARIANTS["soft-kd-hard"][1]
    assert set(students) == {"DAKD", variant}
    assert len({v["steps"] for v in students.values()}) == 1 and all(v["selected_on"] == "val" for v in students.values())
    # the soft recipe is chosen by the val score each run selected its checkpoint with
    vals = {k: json.loads((tmp_path / "palsar" / "student" / run / "best.json").read_text())["val_miou"]
            for k, run in [("DAKD", "soft"), (variant, "soft-kd-hard")]}
    assert all(students[k]["val_miou"] == v for k, v in vals.items())
    assert result["soft_choice"] == max(vals, key=vals.get) and f"preferred on val: {result['soft_choice']}" in out
    floor = next(k for k in rows if k.startswith("threshold"))
    assert rows[floor]["miou"] > rows["all-background"]["miou"] > 0.3  # the floors on test
    assert "| paper: SAROSS-Net + DAKD" in out and "No figure was tuned on the test folder" in out
    assert os.path.exists(tmp_path / "palsar" / "eval" / "comparison.md")
