"""`report.html`: one static page per pipeline run, written beside its outputs.

Sections: wall time per stage, the data summary (counts, class shares, b), training curves
of the teacher and the students (from the MLflow runs named in `pipeline.json`), the
synthetic contact sheet, FID/IS, and the evaluation of every student (tables, confusion
matrix, overlays with titled panels). Everything is read through dakd.storage, so the run
root may be a path, file:// or s3://; images are embedded as data URIs, so the page opens
from disk or an object-store URL with no server. A section whose inputs are missing says so.

`dakd pipeline` writes it at the end of a run; `dakd report RUN_ROOT` (re)writes it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time

from dakd import storage
from dakd.errors import DataError
from dakd.eval.figures import display_colors, error_colors, figure_png, pyplot

log = logging.getLogger(__name__)

REPORT = "report.html"
SUMMARY = "pipeline.json"  # the pipeline's summary + stage wall times (written by dakd.pipeline)
STUDENT_NAMES = {"real-only": "real-only", "hard": "DAKD (hard labels)", "soft": "DAKD"}

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
img{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}
.note{color:#777;font-style:italic} .grid{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0} figcaption{font-size:.9em;color:#444}
.legend span{display:inline-block;width:1em;height:1em;vertical-align:middle;margin:0 .3em 0 1em;border:1px solid #888}
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _img(data: bytes, alt: str, width: int | None = None, min_width: int = 0) -> str:
    """An embedded PNG; `min_width`: small pictures are shown enlarged (pixelated) to this width."""
    if width is None and min_width:
        from PIL import Image

        natural = Image.open(io.BytesIO(data)).size[0]
        width = natural * max(1, min_width // natural) if natural < min_width else None
    w = f' width="{width}"' if width else ""
    return f'<img alt="{_esc(alt)}"{w} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_json(uri: str) -> dict | None:
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


# ---------------------------------------------------------------- sections
def _stages_section(summary: dict | None) -> str:
    times = (summary or {}).get("stage_seconds") or {}
    if not times:
        return _note("no stage times (pipeline.json is missing: run `dakd pipeline`)")
    rows = [[stage, "skipped (already done)" if (summary["stages"].get(stage) or {}).get("skipped") else "ran",
             f"{sec:.1f}"] for stage, sec in times.items()]
    rows.append(["total", "", f"{sum(times.values()):.1f}"])
    return _table(["stage", "", "wall time (s)"], rows)


def _data_section(root: str) -> str:
    from dakd.data.shards import read_manifest

    m = read_manifest(storage.join_uri(root, "real"))
    if m is None:
        return _note("no ingested shard set under real/")
    names = m["classes"]["names"]
    rows = [[split, e["count"], *(f"{100 * s:.1f}%" for s in e["class_share"])] for split, e in sorted(m["splits"].items())]
    out = "<p>Pixel share of each class per split.</p>" + _table(["split", "images", *names], rows)
    bal = m.get("balance")
    if bal:
        out += (f"<p>Balancing factor <b>b = {bal['b']:.4f}</b> (P(x0) = {bal['power_x']:.1f}, P(y0) = "
                f"{bal['power_y']:.1f}, over {bal['images']} {_esc(bal['split'])} images).</p>")
    out += f"<p>Image sizes: {_esc(m.get('image_sizes'))}; skipped pairs: {len(m.get('skipped', []))}.</p>"
    return out


def _curves_png(series: dict[str, list[tuple[int, float]]], title: str, xlabel: str) -> bytes:
    """Line plot of {label: [(step, value)]} -> PNG bytes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def _history(client, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for key in keys:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        if points:
            out[key] = points
    return out


def _curves_section(summary: dict | None) -> str:
    if not summary or not summary.get("tracking_uri"):
        return _note("no training curves: MLflow tracking was off for this run")
    import mlflow

    stages = summary.get("stages", {})
    runs = []
    teacher = stages.get("train-jointnet") or {}
    if teacher.get("mlflow_run_id"):
        runs.append(("teacher (SAR-JointNet)", teacher["mlflow_run_id"], ["train/loss", "train/loss_x", "train/loss_y"], "step"))
    for mode, s in (stages.get("train-saross") or {}).items():
        if s.get("mlflow_run_id"):
            runs.append((f"student {STUDENT_NAMES.get(mode, mode)}", s["mlflow_run_id"],
                         ["train/loss", "train/ce", "train/kd", "val/miou"], "epoch"))
    if not runs:
        return _note("no training runs in this pipeline run (skipped stages keep their earlier curves in MLflow)")
    figs = []
    for title, run_id, keys, xlabel in runs:
        try:
            series = _history(mlflow.MlflowClient(tracking_uri=summary["tracking_uri"]), run_id, keys)
        except Exception as exc:  # noqa: BLE001 - the report shows what it can read
            figs.append(_note(f"{title}: MLflow run {run_id} unreadable ({type(exc).__name__})"))
            continue
        if series:
            figs.append(f"<figure>{_img(_curves_png(series, title, xlabel), title)}<figcaption>{_esc(title)}, MLflow run "
                        f"{_esc(run_id)}</figcaption></figure>")
    return '<div class="grid">' + "".join(figs) + "</div>" if figs else _note("no metrics logged")


def _synthetic_section(root: str, summary: dict | None) -> str:
    out = ""
    sheet = storage.join_uri(root, "synthetic", "contact_sheet.png")
    if storage.exists(sheet):
        out += (f"<figure>{_img(storage.read_bytes(sheet), 'synthetic contact sheet', min_width=800)}<figcaption>Synthetic samples: "
                f"image over teacher label (argmax of the logits)</figcaption></figure>")
    else:
        out += _note("no synthetic contact sheet under synthetic/")
    ev = ((summary or {}).get("stages") or {}).get("evaluate-synthesis")
    if ev:
        is_ = "n/a" if ev.get("inception_score") is None else f"{ev['inception_score']:.3f} ± {ev.get('inception_score_std') or 0:.3f}"
        counts = ev.get("counts", {})
        out += _table(["features", "FID", "Inception Score", "synthetic", "real"],
                      [[ev.get("features"), f"{ev['fid']:.4g}", is_, counts.get("synthetic", ""), counts.get("real", "")]])
        if ev.get("inception_score_note"):
            out += _note(ev["inception_score_note"])
    else:
        out += _note("no FID/IS (evaluate-synthesis did not run)")
    return out


def _eval_section(root: str) -> str:
    base = storage.join_uri(root, "eval")
    if not storage.exists(base):
        return _note("no evaluations under eval/")
    reports = {}
    for uri in sorted(storage.list_files(base)):
        if uri.endswith("/metrics.json"):
            mode = uri.rstrip("/").split("/")[-2]
            reports[mode] = json.loads(storage.read_text(uri))
    if not reports:
        return _note("no evaluations under eval/")
    names = next(iter(reports.values()))["classes"]
    rows, per_class = [], []
    for mode, r in reports.items():
        m = r["metrics"]
        rows.append([r.get("name", mode), _pct(m["miou"]), _pct(m["f1_mean"]), _pct(m["accuracy"]),
                     _pct(m["recall_mean"]), _pct(m["precision_mean"]), m.get("images", "")])
        per_class.append([r.get("name", mode), *(_pct(m["iou"].get(n)) for n in names), _pct(m["miou"])])
    out = ("<p>Test split at full resolution (%; macro means over classes from the summed confusion matrix).</p>"
           + _table(["model", "mIoU", "F1", "Accuracy", "Recall", "Precision", "images"], rows)
           + "<p>IoU per class (%).</p>" + _table(["model", *names, "mIoU"], per_class))
    for mode, r in reports.items():
        d = storage.join_uri(base, mode)
        out += f"<h3>{_esc(r.get('name', mode))}</h3><div class=\"grid\">"
        listed = r.get("files") or {}  # metrics.json names its figures (evaluate writes them per generation)
        cm = storage.join_uri(d, listed.get("confusion_matrix", "confusion_matrix.png"))
        if storage.exists(cm):
            out += f"<figure>{_img(storage.read_bytes(cm), 'confusion matrix', 420)}<figcaption>Confusion matrix (rows: target, " \
                   f"columns: prediction)</figcaption></figure>"
        if "overlays" in listed:
            files = [storage.join_uri(d, rel) for rel in listed["overlays"]]
        else:  # an evaluation written before metrics.json listed its files
            overlays = storage.join_uri(d, "overlays")
            files = sorted(u for u in storage.list_files(overlays) if u.endswith(".png")) if storage.exists(overlays) else []
        for uri in files:
            sid = uri.rsplit("/", 1)[-1][:-4]
            out += (f"<figure>{_img(storage.read_bytes(uri), 'overlay ' + sid, min_width=480)}<figcaption>{_esc(sid)}: "
                    f"image | ground truth | prediction | errors (missed, false: colours in the legend)</figcaption></figure>")
        if not files:
            out += _note("no overlays (evaluate.overlay_count = 0)")
        out += "</div>"
    out += _legend(root, names)
    return out


def _swatch(rgb) -> str:
    return f'<span style="background:rgb{tuple(int(v) for v in rgb)}"></span>'


def _legend(root: str, names: list[str]) -> str:
    from dakd.data.shards import read_manifest

    m = read_manifest(storage.join_uri(root, "real")) or {}
    colors = display_colors(m.get("classes", {}).get("colors"), len(names))
    items = "".join(_swatch(c) + _esc(n) for n, c in zip(names[1:], colors[1:]))
    missed, false = error_colors(colors)
    return (f'<p class="legend">Overlay colours:{items} (class {_esc(names[0])} left uncoloured); errors '
            f'panel:{_swatch(missed)}missed{_swatch(false)}false</p>')


# ---------------------------------------------------------------- page
def build_report(root: str) -> str:
    """The HTML text of the report of the pipeline run under `root`."""
    root = storage.resolve(root).uri
    summary = _read_json(storage.join_uri(root, SUMMARY))
    sections = [("Stages", _stages_section(summary)), ("Data", _data_section(root)),
                ("Training curves", _curves_section(summary)), ("Synthetic data", _synthetic_section(root, summary)),
                ("Evaluation", _eval_section(root))]
    body = "".join(f'<section id="{_esc(t.lower().replace(" ", "-"))}"><h2>{_esc(t)}</h2>{s}</section>' for t, s in sections)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>dakd run {_esc(root)}</title>'
            f"<style>{CSS}</style></head><body><h1>dakd pipeline run</h1><p>{_esc(root)} &middot; report written {when}</p>"
            f"{body}</body></html>\n")


def write_report(root: str) -> dict:
    """Write `report.html` under the run root `root`; returns {"job", "report", "sections"}."""
    if not storage.exists(root):
        raise DataError(root, "no such run root (expected the output of `dakd pipeline`)")
    page = build_report(root)
    uri = storage.join_uri(storage.resolve(root).uri, REPORT)
    storage.write_text(uri, page)
    log.info("run report: %s", uri)
    return {"job": "report", "report": uri, "bytes": len(page.encode())}
