"""`dakd tune`: a Ray Tune sweep whose trials are Ray Train runs, with ASHA and MLflow.

Each trial is a Tune function trainable (`run_trial`, Ray's current Tune-over-Train
pattern: no Trainer is passed to the Tuner) that builds its job configs from the base
sections of the TuneConfig plus its sampled dotted overrides and runs the jobs:
  level student: train-saross on the fixed synthetic set;
  level teacher: train-jointnet (short) -> synthesize (small) -> evaluate-synthesis (FID,
  when `scores_synthesis`) -> train-saross on it.
The student run gets Tune's TuneReportCallback, so each epoch's worker report
(`val/miou`, `loss`, `epoch`, and a teacher trial's `synthesis/fid`) reaches Tune and ASHA
(time attribute: `epoch`) can stop the trial. A trial's driver needs `driver_cpus`; its Train workers reserve their own
placement group, so concurrency comes from the cluster's CPUs/GPUs (`max_concurrent_trials`
unless set) and a trial that needs more than the cluster has is refused up front.

Layout under <output>/<name>: tune/ (Tune's experiment state: re-running the same name
restores it, finished trials are not run again), trials/<trial_id>/ (each trial's Train
runs and synthetic set), sweep.json, best_student.yaml (+ best_teacher.yaml),
summary.csv, summary.md, metric_vs_params.png.
MLflow: one parent run per sweep (run key `tune:<sweep uri>`); every job run of a trial
is its child (the student run carries the trial's metric history); the parent gets the
summary table, the best config and the plot.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time

import yaml
from ray.tune.schedulers import ASHAScheduler

from dakd import storage
from dakd.config import (EvaluateSynthesisConfig, SynthesizeConfig, TrainJointNetConfig, TrainSarossConfig, TuneConfig,
                         dump_config)
from dakd.errors import ConfigError, TuneError
from dakd.tune.space import SECTIONS, Dimension, build, param_space, parse_space, split_overrides

log = logging.getLogger(__name__)

STATE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
BEST_STUDENT = "best_student.yaml"
BEST_TEACHER = "best_teacher.yaml"
PLOT = "metric_vs_params.png"




# ---------------------------------------------------------------- planning
def scores_synthesis(cfg: TuneConfig) -> bool:
    """A teacher trial scores its synthetic set (FID, IS) when the extractor can run: InceptionV3
    with configured weights (they are never downloaded), or another extractor chosen explicitly."""
    e = cfg.evaluate_synthesis
    return cfg.level == "teacher" and (e.features != "inception" or e.inception_weights is not None)


def trial_sections(cfg: TuneConfig) -> tuple[str, ...]:
    """The job sections a trial runs, in order."""
    if cfg.level == "student":
        return ("student",)
    return ("teacher", "synthesize") + (("evaluate_synthesis",) if scores_synthesis(cfg) else ()) + ("student",)


def trial_resources(cfg: TuneConfig) -> dict[str, float]:
    """What one trial holds at its peak ({"CPU", "GPU"}): its driver plus the largest job it runs
    (the jobs of a trial run one after the other). Swept worker counts count at their largest."""
    def workers(section: str, job) -> tuple[float, float]:
        if section == "synthesize":
            return job.actors_max * job.cpus_per_actor, job.actors_max * job.gpus_per_actor
        if section == "evaluate_synthesis":  # one CPU per feature actor (dakd.synth.evaluate)
            return float(job.actors), job.actors * job.gpus_per_actor
        return job.num_workers * job.cpus_per_worker, job.num_workers * (1.0 if job.use_gpu else 0.0)

    cpu = gpu = 0.0
    for section in trial_sections(cfg):
        job = getattr(cfg, section)
        c, g = workers(section, job)
        cpu, gpu = max(cpu, c), max(gpu, g)
    return {"CPU": cpu + cfg.driver_cpus, "GPU": gpu}


def plan_concurrency(cfg: TuneConfig, need: dict[str, float], cluster: dict[str, float]) -> int:
    """Concurrent trials the cluster holds; ConfigError when one trial alone does not fit."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if need["CPU"] + cfg.data_cpus > cpus or need["GPU"] > gpus:
        raise ConfigError(
            f"one trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs (workers x cpus_per_worker / use_gpu of its "
            f"largest job + driver_cpus {cfg.driver_cpus:g}), plus data_cpus {cfg.data_cpus:g} for its data feed; the "
            f"cluster has {cpus:g} CPUs and {gpus:g} GPUs. Lower num_workers / cpus_per_worker / use_gpu, or use a larger cluster")
    fit = math.floor((cpus - cfg.data_cpus) / need["CPU"] + 1e-9)
    if need["GPU"] > 0:
        fit = min(fit, math.floor(gpus / need["GPU"] + 1e-9))
    fit = max(1, fit)
    return cfg.max_concurrent_trials or fit


def check_inputs(cfg: TuneConfig) -> None:
    """The data a trial reads exists (before any trial starts)."""
    from dakd.data.shards import open_shard_set

    real = open_shard_set(cfg.student.shards)
    real.files(cfg.student.val_split)
    if cfg.level == "student" and cfg.student.loss.mode != "real-only":
        if not cfg.student.synthetic:
            raise ConfigError("student.synthetic: a student sweep needs the fixed synthetic set it trains on "
                              "(or student.loss.mode=real-only)")
        open_shard_set(cfg.student.synthetic)
    if cfg.level == "teacher":
        open_shard_set(cfg.teacher.shards)


def sweep_state(cfg: TuneConfig, dims: list[Dimension]) -> dict:
    """What a sweep's trials depend on: a re-run under the same name must match it."""
    return {"level": cfg.level, "space": {d.key: d.to_dict() for d in dims}, "num_samples": cfg.num_samples,
            "metric": cfg.metric, "mode": cfg.mode, "scheduler": cfg.scheduler, "grace_period": cfg.grace_period,
            "reduction_factor": cfg.reduction_factor, "seed": cfg.seed,
            "sections": {s: dump_config(getattr(cfg, s)) for s in trial_sections(cfg)}}


def _check_state(uri: str, state: dict, name: str) -> bool:
    """True when the sweep exists (same state); ConfigError when it exists with another state."""
    if not storage.exists(uri):
        return False
    old = json.loads(storage.read_text(uri))
    if old != json.loads(json.dumps(state)):
        diff = [k for k in state if json.dumps(old.get(k), sort_keys=True) != json.dumps(state[k], sort_keys=True, default=str)]
        raise ConfigError(f"sweep '{name}' at {uri.rsplit('/', 1)[0]} was started with a different {', '.join(diff)}; "
                          f"re-run it with the same config to resume it, or give the new sweep another name")
    return True


class LastEpochFinishes(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch (ASHA may put a rung there): the trial
    then ends by itself, after its job's last steps (best checkpoint, MLflow model)."""

    def __init__(self, epochs: int, **kwargs):
        super().__init__(**kwargs)
        self._epochs = epochs

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # records the rung value
        if result.get("epoch", 0) >= int(trial.config.get("student.epochs", self._epochs)):
            return self.CONTINUE
        return decision


# ---------------------------------------------------------------- one trial
def report_callback(extra: dict):
    """Tune's TuneReportCallback that adds `extra` (e.g. the trial's synthesis FID) to every report."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportWith(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [{**metrics[0], **extra}, *metrics[1:]], checkpoint)

    return ReportWith()


def run_trial(config: dict, job: dict) -> None:
    """Tune function trainable: one trial's jobs. config: {dotted key: sampled value}."""
    import mlflow
    from ray import tune

    from dakd import tracking
    from dakd.train.saross import run_train_saross

    trial_id = tune.get_context().get_trial_id()
    dims = [Dimension(d["key"], d["kind"], d["values"]) for d in job["dims"]]
    over = split_overrides(config, dims)
    root = storage.join_uri(job["sweep_uri"], TRIALS_DIR, trial_id)
    track = {"uri": job["tracking_uri"], "experiment": job["experiment"], "enabled": job["tracking_uri"] is not None,
             "parent_run_id": job["parent_run_id"]}
    tags = {"dakd.tune.sweep": job["name"], "dakd.tune.trial_id": trial_id,
            **{f"dakd.tune.param.{k}": str(v)[:500] for k, v in config.items()}}
    print(f"[tune] trial {trial_id}: {json.dumps(config, default=str)}", flush=True)

    def tag(run_id: str | None, role: str) -> None:
        if run_id and job["tracking_uri"]:
            client = mlflow.MlflowClient(tracking_uri=job["tracking_uri"])
            for k, v in {**tags, "dakd.tune.role": role}.items():
                client.set_tag(run_id, k, v)

    synthetic, extra = {}, {}
    if job["level"] == "teacher":
        from dakd.synth.synthesize import run_synthesize
        from dakd.train.jointnet import run_train_jointnet

        teacher = build(TrainJointNetConfig, job["sections"]["teacher"],
                        {**over.get("teacher", {}), "output": root, "run_name": "teacher", "tracking": track})
        summary = run_train_jointnet(teacher)
        tag(summary.get("mlflow_run_id"), "teacher")
        synth = build(SynthesizeConfig, job["sections"]["synthesize"],
                      {**over.get("synthesize", {}), "teacher": storage.join_uri(root, "teacher"),
                       "output": storage.join_uri(root, "synthetic"), "tracking": track})
        summary = run_synthesize(synth)
        tag(summary.get("mlflow_run_id"), "synthesize")
        synthetic = {"synthetic": synth.output}
        if "evaluate_synthesis" in job["sections"]:
            from dakd.synth.evaluate import run_evaluate_synthesis

            scored = build(EvaluateSynthesisConfig, job["sections"]["evaluate_synthesis"],
                           {"synthetic": synth.output, "real": teacher.shards, "tracking": track})
            summary = run_evaluate_synthesis(scored)
            tag(summary.get("mlflow_run_id"), "evaluate-synthesis")
            extra["synthesis/fid"] = float(summary["fid"])
            if summary.get("inception_score") is not None:
                extra["synthesis/inception_score"] = float(summary["inception_score"])
    student = build(TrainSarossConfig, job["sections"]["student"],
                    {**over.get("student", {}), **synthetic, "output": root, "run_name": "student", "tracking": track})
    if job["tracking_uri"]:
        # The trial's child run, tagged before training so the MLflow UI shows the trial while it runs;
        # train-saross resumes the run of the same key (its run directory) and logs into it.
        run_id = tracking.start_or_resume_run(
            job["tracking_uri"], job["experiment"], run_key=storage.join_uri(root, "student"), run_name=f"{job['name']}/{trial_id}",
            params=dump_config(student), tags={"dakd.job": "train-saross", "dakd.loss_mode": student.loss.mode},
            parent_run_id=job["parent_run_id"])
        tag(run_id, "student")
        if extra:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            mlflow.MlflowClient(tracking_uri=job["tracking_uri"]).log_batch(
                run_id, metrics=[Metric(k, v, now, 0) for k, v in extra.items()])
    run_train_saross(student, callbacks=[report_callback(extra)])


# ---------------------------------------------------------------- after the sweep
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r[f"best {metric}"] is not None]
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        values = [r[d.key] for r in ok]
        ys = [r[f"best {metric}"] for r in ok]
        colours = ["tab:blue" if r["status"] == "completed" else "tab:orange" for r in ok]
        if d.categorical or not all(isinstance(v, (int, float)) for v in values):
            labels = [str(v) for v in dict.fromkeys(str(v) for v in (d.values if d.categorical else values))]
            ax.scatter([labels.index(str(v)) for v in values], ys, c=colours)
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        else:
            ax.scatter(values, ys, c=colours)
            if d.log:
                ax.set_xscale("log")
        ax.set_xlabel(d.key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per trial (blue: completed, orange: stopped early)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


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
    and tag every one with its trial's status."""
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
        if run.info.status == "RUNNING" and row["status"] != "completed":
            client.set_terminated(run.info.run_id, status="KILLED" if row["status"] == "stopped early" else "FAILED")


# ---------------------------------------------------------------- the job
def run_tune(cfg: TuneConfig) -> dict:
    """Check the space, resources and MLflow, run (or resume) the sweep, report; returns the summary."""
    from dakd.runtime import run_lock

    with run_lock(cfg.ray, storage.resolve(storage.join_uri(cfg.output, cfg.name)).uri, "tune"):
        return _sweep(cfg)


def _sweep(cfg: TuneConfig) -> dict:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from dakd import tracking
    from dakd.runtime import init_ray

    bases = {s: getattr(cfg, s) for s in SECTIONS}
    dims = parse_space(cfg.space, cfg.level, bases)
    check_inputs(cfg)
    sweep_uri = storage.resolve(storage.join_uri(cfg.output, cfg.name)).uri
    uri = None
    if cfg.tracking.enabled:  # fail fast, before any trial
        uri = tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.output)
        tracking.check_tracking(uri)
    ray = init_ray(cfg.ray)
    need = trial_resources(cfg)
    concurrency = plan_concurrency(cfg, need, ray.cluster_resources())
    max_t = max([cfg.student.epochs] + [int(d.largest()) for d in dims if d.key == "student.epochs"])

    storage.ensure_dir(sweep_uri, create_bucket=cfg.create_bucket)
    storage.check_writable(sweep_uri)
    state = sweep_state(cfg, dims)
    state_uri = storage.join_uri(sweep_uri, STATE)
    existed = _check_state(state_uri, state, cfg.name)
    if not existed:
        storage.write_text(state_uri, json.dumps(state, indent=1, default=str))
    parent = None
    if uri:
        parent = tracking.start_or_resume_run(uri, cfg.tracking.experiment, run_key=f"tune:{sweep_uri}", run_name=cfg.name,
                                              params={"level": cfg.level, "metric": cfg.metric, "mode": cfg.mode,
                                                      "scheduler": cfg.scheduler, "grace_period": cfg.grace_period,
                                                      "reduction_factor": cfg.reduction_factor, "num_samples": cfg.num_samples,
                                                      "space": {d.key: str(d.to_dict()) for d in dims},
                                                      **{s: v for s, v in state["sections"].items()}},
                                              tags={"dakd.job": "tune", "dakd.tune.level": cfg.level},
                                              parent_run_id=cfg.tracking.parent_run_id)
    job = {"name": cfg.name, "level": cfg.level, "sweep_uri": sweep_uri, "tracking_uri": uri,
           "experiment": cfg.tracking.experiment, "parent_run_id": parent,
           "dims": [{"key": d.key, "kind": d.kind, "values": d.values} for d in dims],
           "sections": {s: dump_config(getattr(cfg, s)) for s in trial_sections(cfg)}}  # locations are absolute (config.Location)
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": cfg.driver_cpus})
    loc = storage.resolve(sweep_uri)
    tune_path = loc.join(TUNE_DIR).path  # a path within loc.fs (no scheme), as Tune expects with a filesystem
    restore = existed and tune.Tuner.can_restore(tune_path, storage_filesystem=loc.fs)
    print(f"[tune] sweep '{cfg.name}' ({cfg.level}) -> {sweep_uri}: {len(dims)} dimensions "
          f"({', '.join(d.key for d in dims)}), {cfg.scheduler} on {cfg.metric} ({cfg.mode}), max {max_t} epochs, "
          f"{concurrency} concurrent trials of {need['CPU']:g} CPU / {need['GPU']:g} GPU"
          + (" - resuming" if restore else ""), flush=True)
    if restore:
        tuner = tune.Tuner.restore(tune_path, trainable,
                                   resume_unfinished=True, resume_errored=cfg.resume_errored,
                                   storage_filesystem=loc.fs)
    else:
        if cfg.scheduler == "asha":
            scheduler = LastEpochFinishes(cfg.student.epochs, time_attr="epoch", max_t=max_t,
                                          grace_period=min(cfg.grace_period, max_t),
                                          reduction_factor=cfg.reduction_factor, stop_last_trials=False)
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(dims),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency),
                                        num_samples=cfg.num_samples),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=loc.path, storage_filesystem=loc.fs,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=1),
        )
    try:
        results = tuner.fit()
    except Exception:
        if parent:
            tracking.finish_run(uri, parent, "FAILED")
        raise

    rows = summarise(results, dims, cfg)
    good = [r for r in rows if r[f"best {cfg.metric}"] is not None and r["status"] != "error"]
    if not good:
        if parent:
            tracking.finish_run(uri, parent, "FAILED")
        errors = "; ".join(f"{r['trial_id']}: {r.get('error', 'no result')}" for r in rows[:3])
        raise TuneError(f"sweep '{cfg.name}': no trial reported {cfg.metric} ({errors})")
    pick = max if cfg.mode == "max" else min
    best = pick(good, key=lambda r: r[f"best {cfg.metric}"])
    table_md = table_markdown(rows)
    print(f"[tune] sweep '{cfg.name}': {len(rows)} trials\n{table_md}", flush=True)
    print(f"[tune] best trial {best['trial_id']}: {cfg.metric} {best[f'best {cfg.metric}']:.4g} with "
          + ", ".join(f"{d.key}={best[d.key]}" for d in dims), flush=True)

    files = {"summary.md": table_md.encode(), "summary.csv": table_csv(rows).encode(), PLOT: plot_metric(rows, dims, cfg.metric)}
    files.update({k: v.encode() for k, v in best_configs(cfg, dims, best, sweep_uri).items()})
    for name, data in files.items():
        storage.write_bytes(storage.join_uri(sweep_uri, name), data)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped early", "error")}
    if parent:
        import mlflow
        from PIL import Image

        client = mlflow.MlflowClient(tracking_uri=uri)
        finish_child_runs(uri, cfg.tracking.experiment, rows, sweep_uri)
        for name, data in files.items():
            if name == PLOT:
                client.log_image(parent, Image.open(io.BytesIO(data)), artifact_file=name)
            else:
                client.log_text(parent, data.decode(), name)
        tracking.log_summary(uri, parent, {"best": {cfg.metric: best[f"best {cfg.metric}"]},
                                           "trials": {k.replace(" ", "_"): v for k, v in counts.items()}})
        client.set_tag(parent, "dakd.tune.best_trial", best["trial_id"])
        tracking.finish_run(uri, parent)
    return {"job": "tune", "sweep": sweep_uri, "level": cfg.level, "trials": len(rows), **{k.replace(" ", "_"): v for k, v in counts.items()},
            "resumed": bool(restore), "best": {"trial_id": best["trial_id"], cfg.metric: best[f"best {cfg.metric}"],
                                               **{d.key: best[d.key] for d in dims}},
            "best_config": storage.join_uri(sweep_uri, BEST_STUDENT),
            "best_teacher_config": storage.join_uri(sweep_uri, BEST_TEACHER) if cfg.level == "teacher" else None,
            "table": rows, "mlflow_run_id": parent, "concurrency": concurrency}
