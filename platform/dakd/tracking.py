"""MLflow helpers: create or resume a job's run (`start_or_resume_run`), log params, metrics,
images and dicts without failing the job (`RunLogger`), and check the tracking server before
any compute. Only rank 0 of a training job logs. (train.saross also re-enters its run with
mlflow to log the student as an MLflow model.)

The tracking URI comes from config (`tracking.uri`), else MLFLOW_TRACKING_URI, else a
local sqlite store under the job's output (the embedded default).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from dakd.errors import TrackingError
from dakd.redact import redact, redact_obj

log = logging.getLogger(__name__)




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
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
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


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


class RunLogger:
    """Logs metrics and images to one MLflow run; a failed call is counted, not raised, so
    a tracking outage mid-run never stops training (the count is reported at the end)."""

    def __init__(self, uri: str, run_id: str):
        import mlflow

        bounded_retries()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.failures = 0

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None (counted as not logged) when it fails."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracking failure is counted, training goes on
            self.failures += 1
            log.warning("MLflow call %s failed (%s); %d not logged so far", fn.__name__, type(exc).__name__, self.failures)
            return None

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time as _time

        from mlflow.entities import Metric

        ts = int(_time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        self.call(self.client.log_batch, self.run_id, metrics=items)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        self.call(self.client.log_image, self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.call(self.client.log_dict, self.run_id, redact_obj(data), artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.call(self.client.set_terminated, self.run_id, status=status)


def end_run(uri: str | None, run_id: str | None, job: str, worker_failures: int = 0) -> int:
    """Close a training job's run at the end without failing the job when the server went
    away mid-run; prints how many calls were not logged. Returns the driver's failed calls."""
    failures = 0
    if run_id:
        closer = RunLogger(uri, run_id)
        closer.end("FINISHED")
        failures = closer.failures
    if worker_failures + failures:
        print(redact(f"[{job}] warning: {worker_failures + failures} MLflow call(s) failed and were not logged "
                     f"(tracking server {uri} unreachable part of the run); the run's checkpoints and results are "
                     "complete"), flush=True)
    return failures
