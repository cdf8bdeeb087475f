"""`dakd pipeline` end to end on a real local Ray with a real MLflow server: every stage,
one parent run with a child run per stage, and a re-run that skips finished stages."""

from __future__ import annotations

import json

import mlflow
import pytest
from conftest import TINY_PIPELINE

from dakd.cli import main
from dakd.config import PipelineConfig, load_config

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
    assert all(r["skipped"] for r in second["stages"]["train-saross"].values())
    assert second["stages"]["evaluate"]["miou"] == first["stages"]["evaluate"]["miou"]
    assert second["stages"]["train-jointnet"]["checkpoint"] == first["stages"]["train-jointnet"]["checkpoint"]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["stages"]["synthesize"]["generated"] == 0  # every range was complete
    assert second["stages"]["evaluate-synthesis"]["fid"] == first["stages"]["evaluate-synthesis"]["fid"]
