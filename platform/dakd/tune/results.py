"""What a `dakd tune` sweep leaves behind: one row per trial, tables (Markdown, CSV), the
metric-vs-parameters plot, the best trial's configs, and its trials' MLflow runs closed."""

from __future__ import annotations

import csv
import io

import yaml

from dakd import storage
from dakd.config import TrainJointNetConfig, TrainSarossConfig, TuneConfig, dump_config
from dakd.tune.space import Dimension, build, split_overrides
from dakd.tune.trial import TRIALS_DIR

BEST_STUDENT = "best_student.yaml"
BEST_TEACHER = "best_teacher.yaml"
PLOT = "metric_vs_params.png"


def _history(result, metric: str) -> list[float]:
    df = result.metrics_dataframe
    if df is None or metric not in df:
        value = (result.metrics or {}).get(metric)
        return [] if value is None else [float(value)]
    return [float(v) for v in df[metric].tolist() if v == v]


def summarise(results, dims: list[Dimension], cfg: TuneConfig) -> list[dict]:
    """One row per trial: id, status, epochs, swept values, last and best metric."""
    pick = max if cfg.mode == "max" else min
    rows = []
    for r in results:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or (r.path or "").rstrip("/").rsplit("/", 1)[-1]
        hist = _history(r, cfg.metric)
        epochs = int(metrics.get("epoch", 0) or 0)
        planned = int(r.config.get("student.epochs", cfg.student.epochs))
        if r.error is not None:
            status = "error"
        elif epochs < planned:
            status = "stopped early"
        else:
            status = "completed"
        row = {"trial_id": trial_id, "status": status, "epochs": epochs}
        row.update({d.key: r.config.get(d.key) for d in dims})
        row.update({f"last {cfg.metric}": hist[-1] if hist else None, f"best {cfg.metric}": pick(hist) if hist else None})
        row.update({k: metrics[k] for k in ("synthesis/fid", "synthesis/inception_score") if metrics.get(k) is not None})
        if r.error is not None:
            row["error"] = str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() else type(r.error).__name__
        rows.append(row)
    return sorted(rows, key=lambda x: x["trial_id"])


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_markdown(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def table_csv(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c) for c in cols})
    return buf.getvalue()


def plot_metric(rows: list[dict], dims: list[Dimension], metric: str) -> bytes:
    """PNG: the best metric of each trial against each swept parameter (one panel per parameter)."""
    from dakd.eval.figures import figure_png, pyplot

    plt = pyplot()
    ok = [r for r in rows if r[f"best {metric}"] is not None]
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.4), squeeze=False, layout="constrained")
    for ax, d in zip(axes[0], dims):
        values = [r[d.key] for r in ok]
        ys = [r[f"best {metric}"] for r in ok]
        colours = ["tab:blue" if r["status"] == "completed" else "tab:orange" for r in ok]
        if d.categorical or not all(isinstance(v, (int, float)) for v in values):
            labels = [str(v) for v in dict.fromkeys(str(v) for v in (d.values if d.categorical else values))]
            ax.scatter([labels.index(str(v)) for v in values], ys, c=colours)
            ax.set_xticks(range(len(labels)), [tick_label(v) for v in labels], rotation=20)
        else:
            ax.scatter(values, ys, c=colours)
            if d.log:
                ax.set_xscale("log")
        ax.set_xlabel(d.key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per trial (blue: completed, orange: stopped early)", fontsize=9)
    return figure_png(fig)


def tick_label(value: str, width: int = 24) -> str:
    """A category's tick label: long values (paths, URIs) keep their last `width` characters."""
    return value if len(value) <= width else "…" + value[-(width - 1):]


def best_configs(cfg: TuneConfig, dims: list[Dimension], best: dict, sweep_uri: str) -> dict[str, str]:
    """YAML of the best trial's configs: the user's base sections + the trial's values (the
    student's `synthetic` is the trial's own set at level teacher). name -> YAML text."""
    over = split_overrides(best, dims)
    student_over = dict(over.get("student", {}))
    if cfg.level == "teacher":
        student_over["synthetic"] = storage.join_uri(sweep_uri, TRIALS_DIR, best["trial_id"], "synthetic")
    student = build(TrainSarossConfig, dump_config(cfg.student), student_over)
    out = {BEST_STUDENT: yaml.safe_dump(dump_config(student), sort_keys=False)}
    if cfg.level == "teacher":
        teacher = build(TrainJointNetConfig, dump_config(cfg.teacher), over.get("teacher", {}))
        out[BEST_TEACHER] = yaml.safe_dump(dump_config(teacher), sort_keys=False)
    return out


def finish_child_runs(uri: str, experiment: str, rows: list[dict], sweep_uri: str) -> None:
    """Close the trials' student runs that the sweep stopped (KILLED) or that errored (FAILED),
    and tag every one with its trial's status. A stopped trial's run is KILLED however the stop
    reached it: killed with its actor (the run is left RUNNING) or interrupted inside the job
    (the job's own handler ended it FAILED)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    for row in rows:
        key = storage.join_uri(sweep_uri, TRIALS_DIR, row["trial_id"], "student")
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`dakd.run_key` = '{key}'", max_results=1)
        if not found:
            continue
        run = found[0]
        client.set_tag(run.info.run_id, "dakd.tune.status", row["status"])
        if row["status"] == "stopped early" and run.info.status in ("RUNNING", "FAILED"):
            client.set_terminated(run.info.run_id, status="KILLED")
        elif row["status"] == "error" and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED")
