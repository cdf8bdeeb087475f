"""`dakd tune`: a Ray Tune sweep whose trials are Ray Train runs, with ASHA and MLflow.

Each trial is a Tune function trainable (`tune.trial.run_trial`, Ray's current Tune-over-Train
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
summary table, the best config and the plot (`tune.results`).
"""

from __future__ import annotations

import io
import json
import logging
import math

from ray.tune.schedulers import ASHAScheduler

from dakd import storage
from dakd.config import ActorPool, TuneConfig, dump_config
from dakd.errors import ConfigError, TuneError
from dakd.tune.results import (BEST_STUDENT, BEST_TEACHER, PLOT, best_configs, finish_child_runs, plot_metric,
                               summarise, table_csv, table_markdown)
from dakd.tune.space import SECTIONS, Dimension, param_space, parse_space
from dakd.tune.trial import TrialPlan, run_trial

log = logging.getLogger(__name__)

STATE = "sweep.json"
TUNE_DIR = "tune"


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
    def workers(job) -> tuple[float, float]:
        if isinstance(job, ActorPool):
            return job.peak_resources()
        return job.num_workers * job.cpus_per_worker, job.num_workers * (1.0 if job.use_gpu else 0.0)

    cpu = gpu = 0.0
    for section in trial_sections(cfg):
        job = getattr(cfg, section)
        c, g = workers(job)
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


# ---------------------------------------------------------------- the job
def run_tune(cfg: TuneConfig) -> dict:
    """Check the space, resources and MLflow, run (or resume) the sweep, report; returns the summary."""
    from dakd.runtime import run_lock

    with run_lock(cfg.ray, storage.resolve(storage.join_uri(cfg.output, cfg.name)).uri, "tune"):
        return _sweep(cfg)


def _sweep(cfg: TuneConfig) -> dict:
    from dakd import tracking
    from dakd.runtime import init_ray, ray_has_dashboard

    bases = {s: getattr(cfg, s) for s in SECTIONS}
    dims = parse_space(cfg.space, cfg.level, bases)
    check_inputs(cfg)
    sweep_uri = storage.resolve(storage.join_uri(cfg.output, cfg.name)).uri
    uri = tracking.tracking_uri(cfg.tracking, cfg.output)  # fail fast, before any trial
    ray = init_ray(cfg.ray)
    need = trial_resources(cfg)
    concurrency = plan_concurrency(cfg, need, ray.cluster_resources())

    storage.ensure_dir(sweep_uri, create_bucket=cfg.create_bucket)
    storage.check_writable(sweep_uri)
    state = sweep_state(cfg, dims)
    state_uri = storage.join_uri(sweep_uri, STATE)
    existed = _check_state(state_uri, state, cfg.name)
    if not existed:
        storage.write_text(state_uri, json.dumps(state, indent=1, default=str))
    params = {"level": cfg.level, "metric": cfg.metric, "mode": cfg.mode, "scheduler": cfg.scheduler,
              "grace_period": cfg.grace_period, "reduction_factor": cfg.reduction_factor,
              "num_samples": cfg.num_samples, "space": {d.key: str(d.to_dict()) for d in dims}, **state["sections"]}
    with tracking.job_run(cfg.tracking, uri=uri, job="tune", run_key=f"tune:{sweep_uri}", run_name=cfg.name,
                          params=params, tags={"dakd.tune.level": cfg.level}) as run:
        plan = TrialPlan(name=cfg.name, level=cfg.level, sweep_uri=sweep_uri, tracking_uri=uri,
                         experiment=cfg.tracking.experiment, parent_run_id=run.run_id, dims=tuple(dims),
                         sections={s: dump_config(getattr(cfg, s)) for s in trial_sections(cfg)},
                         ray_dashboard=ray_has_dashboard())
        tuner, restore = _tuner(cfg, plan, existed, concurrency, need)
        rows = summarise(tuner.fit(), dims, cfg)
        return _report(cfg, dims, rows, sweep_uri, run, {"resumed": bool(restore), "concurrency": concurrency})


def _tuner(cfg: TuneConfig, plan: TrialPlan, existed: bool, concurrency: int, need: dict):
    """(the Tuner of the sweep, whether it restores an earlier run of it)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    dims = list(plan.dims)
    max_t = max([cfg.student.epochs] + [int(d.largest()) for d in dims if d.key == "student.epochs"])
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": cfg.driver_cpus})
    loc = storage.resolve(plan.sweep_uri)
    tune_path = loc.join(TUNE_DIR).path  # a path within loc.fs (no scheme), as Tune expects with a filesystem
    restore = existed and tune.Tuner.can_restore(tune_path, storage_filesystem=loc.fs)
    print(f"[tune] sweep '{cfg.name}' ({cfg.level}) -> {plan.sweep_uri}: {len(dims)} dimensions "
          f"({', '.join(d.key for d in dims)}), {cfg.scheduler} on {cfg.metric} ({cfg.mode}), max {max_t} epochs, "
          f"{concurrency} concurrent trials of {need['CPU']:g} CPU / {need['GPU']:g} GPU"
          + (" - resuming" if restore else ""), flush=True)
    if restore:
        return tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=cfg.resume_errored,
                                  storage_filesystem=loc.fs), True
    if cfg.scheduler == "asha":
        scheduler = LastEpochFinishes(cfg.student.epochs, time_attr="epoch", max_t=max_t,
                                      grace_period=min(cfg.grace_period, max_t),
                                      reduction_factor=cfg.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=param_space(dims),
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency),
                                    num_samples=cfg.num_samples),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=loc.path, storage_filesystem=loc.fs,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=1),
    ), False


def _report(cfg: TuneConfig, dims: list[Dimension], rows: list[dict], sweep_uri: str, run, extra: dict) -> dict:
    """The sweep's tables, plot and best configs (files, and on the sweep's MLflow `run`); its summary."""
    from dakd import tracking

    good = [r for r in rows if r[f"best {cfg.metric}"] is not None and r["status"] != "error"]
    if not good:
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
    if run:
        import mlflow
        from PIL import Image

        client = mlflow.MlflowClient(tracking_uri=run.uri)
        finish_child_runs(run.uri, cfg.tracking.experiment, rows, sweep_uri)
        for name, data in files.items():
            if name == PLOT:
                client.log_image(run.run_id, Image.open(io.BytesIO(data)), artifact_file=name)
            else:
                client.log_text(run.run_id, data.decode(), name)
        tracking.log_summary(run.uri, run.run_id, {"best": {cfg.metric: best[f"best {cfg.metric}"]},
                                                   "trials": {k.replace(" ", "_"): v for k, v in counts.items()}})
        client.set_tag(run.run_id, "dakd.tune.best_trial", best["trial_id"])
    return {"job": "tune", "sweep": sweep_uri, "level": cfg.level, "trials": len(rows), **{k.replace(" ", "_"): v for k, v in counts.items()},
            "resumed": extra["resumed"], "best": {"trial_id": best["trial_id"], cfg.metric: best[f"best {cfg.metric}"],
                                                  **{d.key: best[d.key] for d in dims}},
            "best_config": storage.join_uri(sweep_uri, BEST_STUDENT),
            "best_teacher_config": storage.join_uri(sweep_uri, BEST_TEACHER) if cfg.level == "teacher" else None,
            "table": rows, "mlflow_run_id": run.run_id, "concurrency": extra["concurrency"]}
