"""MLflow helpers: `job_run()`, the run of every job (start or resume by run key, params and
tags, FAILED on an exception, FINISHED at the end); `tracking_uri()`, which resolves and checks
the server before any compute; `RunLogger` for metrics, images and dicts (a failed call is
counted, never raised). Only the driver and rank 0 of a training job log.

Other places that touch runs, on purpose: a sweep (`tune.trial`) creates each trial's
student run ahead of the job so it can tag it, and the job then resumes it by its run key;
`train.saross.log_mlflow_model` logs the best checkpoint as a model into the job's open run.

The tracking URI comes from config (`tracking.uri`), else MLFLOW_TRACKING_URI, else a
local sqlite store under the job's output (the embedded default).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from dakd.errors import TrackingError
from dakd.redact import redact, redact_obj

log = logging.getLogger(__name__)

PAUSE_AFTER_FAILURE_S = 60.0  # RunLogger: after a failed call, skip calls this long (s)


def resolve_tracking_uri(configured: str | None, default_dir: str) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "://" in default_dir and not default_dir.startswith("file://"):
        raise TrackingError(
            f"no MLflow tracking URI configured and {default_dir} is not local: set tracking.uri or MLFLOW_TRACKING_URI")
    path = os.path.abspath(default_dir.removeprefix("file://"))
    os.makedirs(path, exist_ok=True)
    return f"sqlite:///{os.path.join(path, 'mlflow.db')}"


def local_artifacts(uri: str) -> str | None:
    """Where a local sqlite store keeps its artifacts: `mlartifacts/` beside the database (so a
    job's runs live wholly under its output), not MLflow's default `./mlruns` under the current
    directory. None (the server's default) for every other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return "file://" + os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")), "mlartifacts")


def bounded_retries() -> None:
    """Give up on an unreachable server after seconds, not minutes (MLflow's default retries
    back off for minutes); set in every process that talks to MLflow."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def check_tracking(uri: str) -> None:
    """Fail fast (before any compute) when the tracking server does not answer."""
    import mlflow

    bounded_retries()
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types here
        raise TrackingError(redact(f"MLflow tracking at {uri} is not reachable ({type(exc).__name__}: {str(exc)[:200]})")) from None


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config -> {'a.b.c': value} for MLflow params (values stringified and redacted, 500 chars max)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = redact(v)[:500]
    return out


def start_or_resume_run(uri: str, experiment: str, run_key: str, run_name: str, params: dict,
                        tags: dict | None = None, parent_run_id: str | None = None) -> str:
    """The MLflow run of `run_key` (e.g. a training run's storage URI): resumed if one exists,
    else created with the flattened config as params. Returns its run id."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=local_artifacts(uri))
    found = client.search_runs([exp_id], filter_string=f"tags.`dakd.run_key` = '{redact(run_key)}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {k: redact(v) for k, v in {"dakd.run_key": run_key, "mlflow.runName": run_name, **(tags or {})}.items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    flat = flatten(params)
    items = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_summary(uri: str, run_id: str, summary: dict) -> None:
    """A job summary on its run: numbers as metrics, the whole summary as summary.json."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    for k, v in flatten(summary).items():
        try:
            client.log_metric(run_id, k, float(v))
        except ValueError:
            continue
    client.log_dict(run_id, redact_obj(summary), "summary.json")


class RunLogger:
    """Logs metrics and images to one MLflow run; a failed call is counted, not raised, so
    a tracking outage mid-run never stops training (the count is reported at the end). After
    a failure the calls of the next `pause_s` seconds are skipped (counted as not logged), so
    an unreachable server costs training one call's retries per pause, not every call's."""

    def __init__(self, uri: str | None, run_id: str | None, pause_s: float = PAUSE_AFTER_FAILURE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.run_id, self.failures = None, run_id, 0
        self.pause_s, self.clock, self.paused_until = pause_s, clock, float("-inf")
        if run_id is not None:  # run_id None: a logger that logs nothing (tracking off)
            import mlflow

            bounded_retries()
            self.client = mlflow.MlflowClient(tracking_uri=uri)

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None (counted as not logged) when it fails or falls in the
        pause after a failure; nothing when tracking is off."""
        if self.run_id is None:
            return None
        if self.clock() < self.paused_until:
            self.failures += 1
            return None
        return self._attempt(fn, *args, **kwargs)

    def _attempt(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracking failure is counted, training goes on
            self.failures += 1
            self.paused_until = self.clock() + self.pause_s
            log.warning("MLflow call %s failed (%s); %d not logged so far; calls of the next %.0f s skipped",
                        fn.__name__, type(exc).__name__, self.failures, self.pause_s)
            return None

    def _client_call(self, method: str, *args, **kwargs):
        """self.client.<method>(run_id, *args, **kwargs) through `call`; nothing when tracking is off."""
        if self.run_id is not None:
            return self.call(getattr(self.client, method), self.run_id, *args, **kwargs)
        return None

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        self._client_call("log_batch", metrics=items)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self._client_call("log_image", image, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client_call("log_text", text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._client_call("log_dict", redact_obj(data), artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run; tried even in a pause, so a server that is back gets the run's end."""
        if self.run_id is not None:
            self._attempt(self.client.set_terminated, self.run_id, status=status)


def tracking_uri(settings, default_dir: str) -> str | None:
    """The job's tracking URI (`settings`: a TrackingConfig), checked before any compute;
    None when tracking is off."""
    if not settings.enabled:
        return None
    uri = resolve_tracking_uri(settings.uri, default_dir)
    check_tracking(uri)
    return uri


class JobRun:
    """One job's open MLflow run (from `job_run`); falsy, with `run_id` None, when tracking
    is off. `logger` logs into it (failures counted; it does nothing when tracking is off); `finish()` closes it early, e.g. so a
    training summary can count the closing call."""

    def __init__(self, job: str, uri: str | None = None, run_id: str | None = None):
        self.job, self.uri, self.run_id = job, uri, run_id
        self.logger = RunLogger(uri, run_id)
        self.closed = run_id is None

    def __bool__(self) -> bool:
        return self.run_id is not None

    def finish(self, worker_failures: int = 0) -> int:
        """End the run FINISHED without failing the job when the server went away mid-run;
        print how many calls (this driver's plus `worker_failures`) were not logged.
        Returns the driver's failed calls."""
        if not self.closed:
            self.logger.end("FINISHED")
        self.closed = True
        failures = self.logger.failures
        if worker_failures + failures:
            print(redact(f"[{self.job}] warning: {worker_failures + failures} MLflow call(s) failed and were not logged "
                         f"(tracking server {self.uri} unreachable part of the run); the run's checkpoints and results "
                         "are complete"), flush=True)
        return failures

    def fail(self) -> None:
        if not self.closed:
            self.logger.end("FAILED")
        self.closed = True


@contextmanager
def job_run(settings, *, job: str, run_key: str, run_name: str, params: dict, tags: dict | None = None,
            uri: str | None = None, default_dir: str | None = None,
            parent_run_id: str | None = None) -> Iterator[JobRun]:
    """The MLflow run of one job, as a context: resumed when a run of `run_key` exists, else
    created with the flattened `params` and the tags (`dakd.job` = `job`), nested under
    `parent_run_id` or `settings.parent_run_id`. `settings` is the job's TrackingConfig; `uri`
    one that `tracking_uri()` already resolved and checked (else it is done here, against
    `default_dir`). An exception ends the run FAILED and propagates; otherwise the run ends
    FINISHED (`JobRun.finish`) unless the body finished it. Tracking off: a falsy JobRun."""
    if not settings.enabled:
        yield JobRun(job)
        return
    uri = uri or tracking_uri(settings, default_dir)
    run_id = start_or_resume_run(uri, settings.experiment, run_key=run_key, run_name=run_name, params=params,
                                 tags={"dakd.job": job, **(tags or {})},
                                 parent_run_id=parent_run_id or settings.parent_run_id)
    run = JobRun(job, uri, run_id)
    try:
        yield run
    except BaseException:
        run.fail()
        raise
    run.finish()
