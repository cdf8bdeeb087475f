"""One trial of a `dakd tune` sweep: the Tune function trainable and what it is given.

`run_trial` builds the trial's job configs from the sweep's base sections plus its sampled
dotted overrides and runs them (level student: train-saross; level teacher: train-jointnet
-> synthesize -> evaluate-synthesis when scored -> train-saross on the trial's own set).
The student run gets Tune's TuneReportCallback, so each epoch's report reaches Tune/ASHA.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from dakd import storage
from dakd.config import (EvaluateSynthesisConfig, SynthesizeConfig, TrackingConfig, TrainJointNetConfig,
                         TrainSarossConfig, dump_config)
from dakd.tune.space import Dimension, build, split_overrides

TRIALS_DIR = "trials"  # <sweep>/trials/<trial_id>/: each trial's Train runs and synthetic set


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep shares (passed to the trainable with `tune.with_parameters`)."""

    name: str
    level: str
    sweep_uri: str
    tracking_uri: str | None
    experiment: str
    parent_run_id: str | None
    dims: tuple[Dimension, ...]
    sections: dict[str, dict] = field(default_factory=dict)  # section -> dumped job config (locations absolute)
    ray_dashboard: bool = True  # whether the sweep's Ray serves a dashboard (runtime.ray_has_dashboard in the driver)

    def tracking(self) -> TrackingConfig:
        """The trial's jobs' tracking: the sweep's server, nested under the sweep's run."""
        return TrackingConfig(uri=self.tracking_uri, experiment=self.experiment, enabled=self.tracking_uri is not None,
                              parent_run_id=self.parent_run_id)


def report_callback(extra: dict):
    """Tune's TuneReportCallback that adds `extra` (e.g. the trial's synthesis FID) to every report."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportWith(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [{**metrics[0], **extra}, *metrics[1:]], checkpoint)

    return ReportWith()


class _Tagger:
    """Tags a trial's job runs with the sweep, the trial and its sampled values."""

    def __init__(self, plan: TrialPlan, trial_id: str, config: dict):
        self.uri = plan.tracking_uri
        self.tags = {"dakd.tune.sweep": plan.name, "dakd.tune.trial_id": trial_id,
                     **{f"dakd.tune.param.{k}": str(v)[:500] for k, v in config.items()}}

    def __call__(self, run_id: str | None, role: str) -> None:
        if run_id and self.uri:
            import mlflow

            client = mlflow.MlflowClient(tracking_uri=self.uri)
            for k, v in {**self.tags, "dakd.tune.role": role}.items():
                client.set_tag(run_id, k, v)


def _teacher_jobs(plan: TrialPlan, over: dict, root: str, tag: _Tagger) -> tuple[dict, dict]:
    """Level teacher: train the teacher, synthesise its set, score it when configured.
    Returns ({"synthetic": set URI}, extra metrics for the student's reports)."""
    from dakd.synth.synthesize import run_synthesize
    from dakd.train.jointnet import run_train_jointnet

    track = plan.tracking().model_dump()
    teacher = build(TrainJointNetConfig, plan.sections["teacher"],
                    {**over.get("teacher", {}), "output": root, "run_name": "teacher", "tracking": track})
    tag(run_train_jointnet(teacher).get("mlflow_run_id"), "teacher")
    synth = build(SynthesizeConfig, plan.sections["synthesize"],
                  {**over.get("synthesize", {}), "teacher": storage.join_uri(root, "teacher"),
                   "output": storage.join_uri(root, "synthetic"), "tracking": track})
    tag(run_synthesize(synth).get("mlflow_run_id"), "synthesize")
    extra = {}
    if "evaluate_synthesis" in plan.sections:
        from dakd.synth.evaluate import run_evaluate_synthesis

        scored = build(EvaluateSynthesisConfig, plan.sections["evaluate_synthesis"],
                       {"synthetic": synth.output, "real": teacher.shards, "tracking": track})
        summary = run_evaluate_synthesis(scored)
        tag(summary.get("mlflow_run_id"), "evaluate-synthesis")
        extra["synthesis/fid"] = float(summary["fid"])
        if summary.get("inception_score") is not None:
            extra["synthesis/inception_score"] = float(summary["inception_score"])
    return {"synthetic": synth.output}, extra


def _open_student_run(plan: TrialPlan, student: TrainSarossConfig, root: str, trial_id: str, tag: _Tagger,
                      extra: dict) -> None:
    """The trial's child run, tagged before training so the MLflow UI shows the trial while it
    runs; train-saross resumes the run of the same key (its run directory) and logs into it."""
    import mlflow
    from mlflow.entities import Metric

    from dakd import tracking

    run_id = tracking.start_or_resume_run(
        plan.tracking_uri, plan.experiment, run_key=storage.join_uri(root, "student"), run_name=f"{plan.name}/{trial_id}",
        params=dump_config(student), tags={"dakd.job": "train-saross", "dakd.loss_mode": student.loss.mode},
        parent_run_id=plan.parent_run_id)
    tag(run_id, "student")
    if extra:
        now = int(time.time() * 1000)
        mlflow.MlflowClient(tracking_uri=plan.tracking_uri).log_batch(
            run_id, metrics=[Metric(k, v, now, 0) for k, v in extra.items()])


def run_trial(config: dict, plan: TrialPlan) -> None:
    """Tune function trainable: one trial's jobs. config: {dotted key: sampled value}."""
    from ray import tune

    from dakd.runtime import set_ray_dashboard
    from dakd.train.saross import run_train_saross

    set_ray_dashboard(plan.ray_dashboard)  # a trial cannot tell: Ray reports a default address in workers
    trial_id = tune.get_context().get_trial_id()
    over = split_overrides(config, list(plan.dims))
    root = storage.join_uri(plan.sweep_uri, TRIALS_DIR, trial_id)
    tag = _Tagger(plan, trial_id, config)
    print(f"[tune] trial {trial_id}: {json.dumps(config, default=str)}", flush=True)
    synthetic, extra = _teacher_jobs(plan, over, root, tag) if plan.level == "teacher" else ({}, {})
    student = build(TrainSarossConfig, plan.sections["student"],
                    {**over.get("student", {}), **synthetic, "output": root, "run_name": "student",
                     "tracking": plan.tracking().model_dump()})
    if plan.tracking_uri:
        _open_student_run(plan, student, root, trial_id, tag, extra)
    run_train_saross(student, callbacks=[report_callback(extra)])
