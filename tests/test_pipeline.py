"""`dakd pipeline` end to end on a real local Ray with a real MLflow server: every stage,
one parent run with a child run per stage, and a re-run that skips finished stages."""

from __future__ import annotations

import pytest

import json

import mlflow

from dakd.cli import main
from dakd.config import PipelineConfig, load_config

TINY = [
    "source.procedural.splits={train: 10, test: 4}", "source.val_fraction=0.25", "source.procedural.height=32", "source.procedural.width=32",
    "rows_per_file=4",
    "jointnet.model.block_out_channels=[8, 16]", "jointnet.model.layers_per_block=1",
    "jointnet.model.attention_levels=[1]", "jointnet.model.norm_num_groups=4", "jointnet.model.attention_head_dim=4",
    "jointnet.stages.stage1={iterations: 2, lr: 0.001}", "jointnet.stages.stage2={iterations: 2, lr: 0.001}",
    "jointnet.stages.stage3={iterations: 2, lr: 0.001}", "jointnet.crop_size=32", "jointnet.batch_size_per_worker=2",
    "jointnet.num_workers=2", "jointnet.checkpoint_every=2", "jointnet.log_every=2", "jointnet.sample_every=6",
    "jointnet.sample_count=2", "jointnet.sample_steps=2", "jointnet.num_train_timesteps=50",
    "synthesize.count=8", "synthesize.steps=2", "synthesize.rows_per_file=4", "synthesize.actors_max=1",
    "evaluate_synthesis.features=pixels",
    "saross.model.encoder=resnet18", "saross.model.decoder_channels=[8, 8, 8]", "saross.model.caft_heads=2",
    "saross.crop_size=32", "saross.epochs=1", "saross.global_batch_size=4", "saross.num_workers=2",
    "saross.mosaic=false", "saross.overlay_count=1", "evaluate.overlay_count=1",
]

pytestmark = pytest.mark.slow  # end to end: trains on Ray Train


def test_pipeline_runs_tracks_and_skips(tmp_path, capsys, mlflow_server, ray_local):
    out = str(tmp_path / "pipe")
    args = ["pipeline", "--output", out, "--set", f"tracking.uri={mlflow_server}", "--json"]
    for o in TINY:
        args += ["--set", o]
    load_config(PipelineConfig, None, TINY)  # the overrides are valid on their own
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["stages"]["ingest"]["counts"] == {"train": 8, "val": 2, "test": 4}  # val carved from train
    assert 0 < first["stages"]["balance"]["b"] < 1
    assert first["stages"]["train-jointnet"]["steps"] == 6

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["jointnet.num_workers"] == "2"
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
