"""The run report's parts: overlay panels that stand out on speckle, and the report of an
incomplete run. The report of a whole pipeline run (sections, images, file:// and s3://, a
headless browser) is checked in test_pipeline.py, on the session's tiny pipeline run."""

from __future__ import annotations


import numpy as np
import pytest

from dakd.data.classes import OSD_CLASSES, SOS_CLASSES
from dakd.errors import DataError
from dakd.eval.figures import (FALSE, MIN_PANEL, MISSED, TITLE_HEIGHT, display_colors, error_colors, error_mask,
                                overlay_panel, title_ink)
from dakd.report import build_report, write_report

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


def test_error_colours_stand_apart_from_the_classes_drawn():
    """OSD draws look-alike red and oil cyan, the binary errors' colours: its errors panel and
    title take another pair, far from every class colour; SOS keeps red and cyan."""
    assert error_colors(display_colors(SOS_CLASSES.colors, 2)) == (MISSED, FALSE)
    osd = display_colors(OSD_CLASSES.colors, 5)
    missed, false = error_colors(osd)
    assert {missed, false}.isdisjoint({MISSED, FALSE})
    for c in (missed, false):
        assert np.linalg.norm(osd[1:].astype(float) - c, axis=1).min() >= 120
    assert np.linalg.norm(np.subtract(missed, false)) >= 120
    target = np.zeros((32, 64), np.uint8)
    target[8:20, 10:30] = 2  # look-alike, predicted 3 px to the right
    panel = overlay_panel(np.full((32, 64), 128, np.uint8), np.roll(target, 3, axis=1), OSD_CLASSES, target)
    s = MIN_PANEL // 64
    errors = panel[TITLE_HEIGHT:, 3 * MIN_PANEL:].astype(int)
    for (y, x), colour in [((12, 11), missed), ((12, 31), false)]:  # 80 % of the error colour over grey 128
        assert np.abs(errors[y * s, x * s] - (0.2 * 128 + 0.8 * np.asarray(colour))).max() <= 1
    title = panel[:TITLE_HEIGHT, 3 * MIN_PANEL:].reshape(-1, 3).astype(int)
    assert (abs(title - title_ink(missed)).sum(axis=1) < 60).any() and (abs(title - title_ink(false)).sum(axis=1) < 60).any()
    assert title_ink(MISSED) == MISSED and title_ink(FALSE) == FALSE  # already dark enough on white
    assert 0.299 * title_ink(false)[0] + 0.587 * title_ink(false)[1] <= 150  # yellow text darkened to read on white


def test_report_of_an_incomplete_run_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="no such run root"):
        write_report(str(tmp_path / "nope"))
    page = build_report(str(tmp_path))
    for section in SECTIONS:
        assert f'id="{section}"' in page
    assert "pipeline.json is missing" in page and "no evaluations under eval/" in page
