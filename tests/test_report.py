"""What a user sees: the quiet default output of `dakd pipeline --preset tiny` (under 60
lines, ending with the result table, the --json line last on stdout), the run report
report.html (sections, embedded images, file:// and s3://) and its rendering in a headless
browser (Debian's chromium, when installed)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from dakd import storage
from dakd.cli import main
from dakd.data.classes import OSD_CLASSES, SOS_CLASSES
from dakd.errors import DataError
from dakd.eval.figures import FALSE, MIN_PANEL, MISSED, TITLE_HEIGHT, display_colors, error_mask, overlay_panel
from dakd.report import REPORT, build_report, write_report

SECTIONS = ("stages", "data", "training-curves", "synthetic-data", "evaluation")


def test_overlay_panels_are_titled_and_oil_stands_out_on_speckle():
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, size=(32, 48), dtype=np.uint8)  # grey speckle
    target = np.zeros((32, 48), np.uint8)
    target[8:20, 10:30] = 1
    pred = np.roll(target, 3, axis=1)
    panel = overlay_panel(image, pred, SOS_CLASSES, target)
    s = 3  # 48 px enlarged to at least 128 px
    assert panel.shape == (TITLE_HEIGHT + 32 * s, 4 * 48 * s, 3)
    assert (panel[:TITLE_HEIGHT] < 128).any() and (panel[:TITLE_HEIGHT] == 255).mean() > 0.5  # dark title on white
    narrow = overlay_panel(np.zeros((8, 64), np.uint8), np.zeros((8, 64), np.uint8), SOS_CLASSES, np.ones((8, 64), np.uint8))
    assert narrow.shape[1] == 4 * MIN_PANEL  # 64 px enlarged twice: the narrowest panels there are
    for k in range(4):  # each title ends inside its panel: none is clipped
        assert (narrow[:TITLE_HEIGHT, (k + 1) * MIN_PANEL - 3:(k + 1) * MIN_PANEL] == 255).all(), k
    title = panel[:TITLE_HEIGHT, 3 * 48 * s:].reshape(-1, 3).astype(int)  # the errors title: "missed" in red, "false" in cyan
    assert (abs(title - MISSED).sum(axis=1) < 60).any() and (abs(title - FALSE).sum(axis=1) < 60).any()
    oil = display_colors(SOS_CLASSES.colors, 2)[1]
    assert oil.max() - oil.min() >= 200  # SOS oil (white) is drawn in a vivid colour
    truth = panel[TITLE_HEIGHT:, 48 * s:2 * 48 * s].astype(int)
    pix = truth[12 * s, 15 * s]
    assert pix.max() - pix.min() > 100  # saturated where oil is, on any grey level
    # errors panel: oil shifted right by 3 px -> missed oil on the left edge, false oil on the right
    errors = panel[TITLE_HEIGHT:, 3 * 48 * s:].astype(int)
    missed, false = errors[12 * s, 11 * s], errors[12 * s, 31 * s]
    assert missed[0] > 180 and missed[2] < 100 and false[2] > 180 and false[0] < 100
    assert (errors[12 * s, 20 * s] == panel[TITLE_HEIGHT + 12 * s, 20 * s]).all()  # right: the image as it is
    assert error_mask(pred, target).tolist() == np.where((target == 1) & (pred == 0), 1, np.where((pred == 1) & (target == 0), 2, 0)).tolist()
    # OSD's own (saturated) colours are kept
    assert (display_colors(OSD_CLASSES.colors, 5) == np.asarray(OSD_CLASSES.colors)).all()


def test_report_of_an_incomplete_run_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="no such run root"):
        write_report(str(tmp_path / "nope"))
    page = build_report(str(tmp_path))
    for section in SECTIONS:
        assert f'id="{section}"' in page
    assert "pipeline.json is missing" in page and "no evaluations under eval/" in page


@pytest.fixture(scope="module")
def tiny_run(tiny_pipeline):
    """The session's tiny `dakd pipeline --json` run (its own process, its own local Ray, as a
    user runs it; see conftest): (output root, stdout, stderr)."""
    return tiny_pipeline["output"], tiny_pipeline["stdout"], tiny_pipeline["stderr"]


def _lines(text: str) -> list[str]:
    """Lines as a terminal shows them (a tqdm line redrawn with \\r is one line)."""
    return [ln for ln in text.split("\n") if ln.strip()]


@pytest.mark.slow
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


@pytest.mark.slow
def test_report_written_with_sections_on_file_and_s3(tiny_run, s3_uri, capsys):
    out, _, _ = tiny_run
    page = open(os.path.join(out, REPORT)).read()
    for section in SECTIONS:
        assert f'id="{section}"' in page
    assert "b = 0." in page and "FID" in page and "| DAKD" not in page  # tables rendered, not markdown
    assert "<th>mIoU</th>" in page and "ground truth" in page and "Confusion matrix" in page
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


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the report is checked as HTML only")
    out, _, _ = tiny_run
    shot = tmp_path / "report.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
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
