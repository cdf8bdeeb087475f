"""`dakd pipeline` end to end on a real local Ray with a real MLflow server: every stage,
one parent run with a child run per stage, and a re-run that skips finished stages. Then what
a user sees of that run: its quiet default output (under 60 lines, ending with the result
table, the --json line last on stdout), the run report report.html (sections, embedded
images, file:// and s3://) and its rendering in a headless browser (Debian's chromium, when
installed). Every test here uses the session's one tiny pipeline run (conftest)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import mlflow
import numpy as np
import pytest
from conftest import TINY_PIPELINE
from test_report import SECTIONS

from dakd import storage
from dakd.cli import main
from dakd.config import PipelineConfig, load_config
from dakd.data.classes import OSD_CLASSES
from dakd.eval.figures import display_colors, error_colors
from dakd.report import REPORT

pytestmark = pytest.mark.slow  # end to end: trains on Ray Train


def test_pipeline_runs_tracks_and_skips(tiny_pipeline, capsys, mlflow_server, ray_local):
    load_config(PipelineConfig, None, TINY_PIPELINE)  # the overrides are valid on their own
    args, first = tiny_pipeline["args"], tiny_pipeline["summary"]  # run in its own process, as a user runs it
    assert first["stages"]["ingest"]["counts"] == {"train": 8, "val": 2, "test": 4}  # val carved from train
    assert 0 < first["stages"]["balance"]["b"] < 1
    assert first["stages"]["train-jointnet"]["steps"] == 6

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["jointnet.num_workers"] == "1"  # default 2
    exp = parent.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["dakd.job"] for r in children) == [
        "balance", "evaluate", "evaluate", "evaluate-synthesis", "ingest", "synthesize", "train-jointnet",
        "train-saross", "train-saross"]
    assert first["stages"]["synthesize"]["count"] == 8
    assert first["stages"]["evaluate-synthesis"]["fid"] >= 0
    assert set(first["stages"]["evaluate"]["miou"]) == {"real-only", "soft"}
    assert "real-only" in first["stages"]["evaluate"]["table"] and "DAKD" in first["stages"]["evaluate"]["table"]
    # compute-matched students, selected on val and reported on test, as the table says
    training = first["stages"]["evaluate"]["training"]
    assert training["real-only"]["steps"] == training["soft"]["steps"] > 0
    assert training["real-only"]["samples_seen"] == training["soft"]["samples_seen"]
    assert {t["selected_on"] for t in training.values()} == {"val"}
    assert "selected on split 'val'" in first["stages"]["evaluate"]["table"]
    assert "reported once on split 'test' (4 images" in first["stages"]["evaluate"]["table"]
    balance = next(r for r in children if r.data.tags["dakd.job"] == "balance")
    assert balance.data.metrics["b"] == first["stages"]["balance"]["b"]

    # Re-submitted: finished stages are skipped, the same teacher checkpoint is reported.
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["stages"]["ingest"]["skipped"] and second["stages"]["train-jointnet"]["skipped"]
    assert second["stages"]["balance"]["skipped"] and second["stages"]["balance"]["b"] == first["stages"]["balance"]["b"]
    assert all(r["skipped"] for r in second["stages"]["train-saross"].values())
    assert second["stages"]["evaluate"]["skipped"] and second["stages"]["evaluate"]["table"] == first["stages"]["evaluate"]["table"]
    assert second["stages"]["evaluate"]["miou"] == first["stages"]["evaluate"]["miou"]
    assert second["stages"]["train-jointnet"]["checkpoint"] == first["stages"]["train-jointnet"]["checkpoint"]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["stages"]["synthesize"]["generated"] == 0  # every range was complete
    assert second["stages"]["evaluate-synthesis"]["fid"] == first["stages"]["evaluate-synthesis"]["fid"]


@pytest.fixture(scope="module")
def tiny_run(tiny_pipeline):
    """The session's tiny `dakd pipeline --json` run (its own process, its own local Ray, as a
    user runs it; see conftest): (output root, stdout, stderr)."""
    return tiny_pipeline["output"], tiny_pipeline["stdout"], tiny_pipeline["stderr"]


def _lines(text: str) -> list[str]:
    """Lines as a terminal shows them (a tqdm line redrawn with \\r is one line)."""
    return [ln for ln in text.split("\n") if ln.strip()]


def test_quiet_output_under_60_lines_ends_with_table_then_json(tiny_run):
    out, stdout, stderr = tiny_run
    lines = _lines(stdout) + _lines(stderr)
    assert len(lines) < 60, "\n".join(_lines(stderr) + ["--- stdout:"] + _lines(stdout))
    summary = json.loads(_lines(stdout)[-1])  # the last stdout line is the summary, nothing after it
    assert summary["ok"] and summary["report"].endswith(REPORT)
    before = _lines(stdout)[:-1]
    assert before[-1].startswith("| DAKD |")  # the per-class result table ends the human output
    assert any(ln.startswith("| model | mIoU") for ln in before)
    noise = ("PYTHON worker processes", "(raylet)", "RayTrainWorker", "Running Dataset", "not writable", "Shuffle")
    assert not [ln for ln in lines if any(n in ln for n in noise)]
    assert "train-saross soft: 100%" in stderr.replace("\r", "\n")  # one live progress line per training run
    assert summary["stage_seconds"].keys() == summary["stages"].keys()


def test_report_written_with_sections_on_file_and_s3(tiny_run, s3_uri, capsys):
    out, _, _ = tiny_run
    page = open(os.path.join(out, REPORT)).read()
    for section in SECTIONS:
        assert f'id="{section}"' in page
    assert "b = 0." in page and "FID" in page and "| DAKD" not in page  # tables rendered, not markdown
    assert "<th>mIoU</th>" in page and "ground truth" in page and "Confusion matrix" in page
    missed, false = error_colors(display_colors(OSD_CLASSES.colors, 5))  # procedural scenes carry OSD's classes
    assert f'rgb{missed}"></span>missed<span style="background:rgb{false}"></span>false' in page  # the legend
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 5  # 3 curves, contact sheet, confusion matrix, overlay
    from PIL import Image

    assert all(Image.open(io.BytesIO(base64.b64decode(i))).size[0] > 0 for i in images)
    # the same run on an object store: `dakd report s3://...` reads and writes through s3
    for path in storage.list_files(out):
        rel = os.path.relpath(path, out)
        if not rel.startswith(("real/data", "synthetic/data", "teacher/", "student/")):
            storage.write_bytes(storage.join_uri(s3_uri, rel), storage.read_bytes(path))
    assert main(["report", s3_uri, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["report"] == f"{s3_uri}/{REPORT}"
    s3_page = storage.read_text(summary["report"])
    for section in SECTIONS:
        assert f'id="{section}"' in s3_page
    assert len(re.findall(r'src="data:image/png', s3_page)) >= 5


def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the report is checked as HTML only")
    out, _, _ = tiny_run
    shot = tmp_path / "report.png"
    # no network: the background services chromium starts would only fail to reach their hosts
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                           f"--screenshot={shot}", "--window-size=1200,3000", f"file://{out}/{REPORT}"],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (3000, 1200)
    rows_with_ink = (img.min(axis=2) < 200).any(axis=1)
    assert rows_with_ink.mean() > 0.3  # text, tables and pictures down the page, not a blank or error page
    colourful = (img.max(axis=2) - img.min(axis=2)) > 60
    assert colourful.sum() > 2000  # the embedded images were decoded and drawn (curves, overlays, sheet)
