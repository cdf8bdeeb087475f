"""`dakd tune` on a real local Ray cluster and a real MLflow server: Ray Tune trials that
each run Ray Train jobs (student sweep on S3: 2 synthetic sets x 1 λ_kd, two parameters in two
trials, interrupted and resumed without re-running the finished trial; teacher sweep: 2 b values
with FID), ASHA stopping a trial that must be stopped, and bad input refused before any trial."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import uuid

import pytest
import yaml

from dakd.config import PipelineConfig, TrainSarossConfig, TuneConfig, dump_config, load_config
from dakd.data import shards
from dakd.errors import ConfigError, TrackingError
from dakd.tune.space import parse_space
from dakd.tune.sweep import run_tune
from test_train_saross import write_real_and_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the teacher sweep's SAR-JointNet: the smallest that trains all three stages in seconds
TINY_TEACHER = [
    "model.block_out_channels=[8, 16]", "model.layers_per_block=1", "model.attention_levels=[1]",
    "model.norm_num_groups=4", "model.attention_head_dim=4",
    "stages.stage1={iterations: 3, lr: 0.003}", "stages.stage2={iterations: 3, lr: 0.003}",
    "stages.stage3={iterations: 2, lr: 0.001}", "num_train_timesteps=100", "crop_size=32",
    "batch_size_per_worker=4", "num_workers=1", "checkpoint_every=100", "log_every=4", "ema_decay=0.9",
    "max_failures=0", "tracking.enabled=false",
]
STUDENT = ["model.encoder=mobilenetv3_small_050", "model.decoder_channels=[8, 8, 8]", "model.caft_heads=2", "crop_size=32",
           "global_batch_size=4", "num_workers=1", "lr=0.002", "log_every=100", "overlay_count=0", "max_failures=0",
           "epochs=1", "cache_dataset=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    return write_real_and_synthetic(tmp_path_factory.mktemp("tune"))


def tune_config(data, output: str, space: str, *extra: str) -> TuneConfig:
    return load_config(TuneConfig, None, [f"student.shards={data['real']}", f"student.synthetic={data['syn']}",
                                          *[f"student.{s}" for s in STUDENT], f"output={output}", f"space={space}",
                                          "max_concurrent_trials=2", *extra])


def mlflow_runs(uri: str, experiment: str) -> tuple:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("dakd.job") == "tune"]
    return client, parents, runs


@pytest.mark.slow
def test_student_sweep_on_s3_interrupted_resumed_tracked_and_best_config(data, tmp_path, mlflow_server, s3_uri):
    """A student sweep that lives on the S3-protocol server (Tune's experiment state, trials,
    summary): two parameters in two trials run at once (2 synthetic sets x 1 λ_kd). One trial's
    synthetic set is missing on the first run, so that trial fails and the sweep ends
    unfinished; once the set exists, re-running the sweep runs only that trial. The finished
    sweep: one MLflow parent run with a child run per trial, Tune's view equal to MLflow's, the
    best config as `dakd train-saross --config` input, the parent's artifacts; the same name
    with another space is refused."""
    import ray

    from dakd import storage

    exp = f"resume-{uuid.uuid4().hex[:6]}"
    later = str(tmp_path / "syn-later")
    space = f"{{student.synthetic: {{grid: ['{data['syn']}', '{later}']}}, student.loss.lambda_kd: {{grid: [0.5]}}}}"
    cfg = tune_config(data, s3_uri, space, "name=resume", f"tracking.uri={mlflow_server}", f"tracking.experiment={exp}",
                      "student.output=runs/mine", "student.run_name=best-student")
    before = set(ray._private.state.actors())
    first = run_tune(cfg)
    assert first["completed"] == 1 and first["error"] == 1 and not first["resumed"]
    done = next(r for r in first["table"] if r["status"] == "completed")
    failed = next(r for r in first["table"] if r["status"] == "error")
    assert done["student.synthetic"] == data["syn"] and failed["student.synthetic"] == later
    client, parents, runs = mlflow_runs(mlflow_server, exp)
    child = {r.data.tags["dakd.tune.trial_id"]: r for r in runs if "dakd.tune.trial_id" in r.data.tags}
    assert child[failed["trial_id"]].info.status == "FAILED"
    sweep = f"{s3_uri}/resume"
    assert first["sweep"] == sweep and storage.exists(f"{sweep}/sweep.json") and storage.exists(f"{sweep}/summary.csv")
    assert [f for f in storage.list_files(f"{sweep}/tune") if f.endswith(".json")]  # Tune's experiment state on S3
    trial_dir = f"{sweep}/trials/{done['trial_id']}/student"
    checkpoints = sorted(f for f in storage.list_files(trial_dir) if "/checkpoint_" in f)
    assert checkpoints

    import shutil

    shutil.copytree(data["syn"], later)
    summary = run_tune(cfg)
    assert summary["resumed"] and summary["trials"] == 2 and summary["completed"] == 2 and summary["error"] == 0
    assert {r["trial_id"] for r in summary["table"]} == {done["trial_id"], failed["trial_id"]}
    assert sorted(f for f in storage.list_files(trial_dir) if "/checkpoint_" in f) == checkpoints  # not run again
    # the trials' Train runs, like the driver's, go without Ray Train's PlacementGroupCleaner on a
    # Ray without a dashboard (a trial is told by the sweep: inside it Ray reports a default address)
    classes = [a.get("ActorClassName", "") for k, a in ray._private.state.actors().items() if k not in before]
    assert any("RayTrainWorker" in c for c in classes), classes
    assert not any("PlacementGroupCleaner" in c for c in classes), classes

    _, parents, runs2 = mlflow_runs(mlflow_server, exp)
    assert len(runs2) == len(runs) == 3  # parent + 2 trials, none duplicated by the resume
    assert len(parents) == 1 and parents[0].info.run_id == summary["mlflow_run_id"] == first["mlflow_run_id"]
    parent = parents[0]
    children = [r for r in runs2 if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    # each child: the trial's values as params, one val/miou per epoch, tagged with its trial
    pairs, miou = set(), {}
    for run in children:
        p = run.data.params
        pairs.add((p["synthetic"], float(p["loss.lambda_kd"])))
        hist = client.get_metric_history(run.info.run_id, "val/miou")
        assert [m.step for m in hist] == [1]  # the re-run trial too: one history, not two
        miou[run.data.tags["dakd.tune.trial_id"]] = hist[0].value
        assert run.info.status == "FINISHED" and run.data.tags["dakd.tune.status"] == "completed"
    assert pairs == set(itertools.product([data["syn"], later], [0.5]))
    table = {r["trial_id"]: r for r in summary["table"]}
    assert set(table) == set(miou)
    for trial_id, value in miou.items():  # Tune's view (from the workers' reports) = MLflow's
        assert table[trial_id]["best val/miou"] == pytest.approx(value)
    best_id = max(miou, key=miou.get)
    assert miou[summary["best"]["trial_id"]] == miou[best_id]

    # the best config (read from S3): the user's base + the best trial's values
    best = TrainSarossConfig.model_validate(yaml.safe_load(storage.read_text(summary["best_config"])))
    row = table[summary["best"]["trial_id"]]
    assert best.synthetic == row["student.synthetic"] and best.loss.lambda_kd == row["student.loss.lambda_kd"]
    assert best.output == os.path.abspath("runs/mine") and best.run_name == "best-student" and best.tracking.parent_run_id is None
    assert best.model.encoder == "mobilenetv3_small_050" and best.crop_size == 32
    # the parent run: summary table, best config and the plot
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "best_student.yaml", "metric_vs_params.png"} <= arts
    rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{sweep}/summary.csv"))))
    assert sorted(r["trial_id"] for r in rows) == sorted(miou)
    assert storage.read_bytes(f"{sweep}/metric_vs_params.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get_run(parent.info.run_id).data.metrics["best.val/miou"] == pytest.approx(miou[best_id])

    # the same name with another space is refused, not mixed into the sweep
    other = tune_config(data, s3_uri, "{student.loss.temperature: {grid: [5.0]}}", "name=resume",
                        f"tracking.uri={mlflow_server}", f"tracking.experiment={exp}")
    with pytest.raises(ConfigError, match="sweep 'resume' .* different space"):
        run_tune(other)


@pytest.mark.slow
def test_asha_stops_a_trial_that_cannot_compete(data, tmp_path, mlflow_server):
    """Objective: the epoch's training loss (min). λ_ce = 100 multiplies the CE term (about 1.6
    at the start) by 100, so after one epoch its loss is far above the λ_ce = 1 trial's; the
    trials run one after the other (λ_ce = 1 first), so at the first rung ASHA must stop it.
    Its Train workers go on while the stop travels from Tune to the trial (a tiny epoch takes
    about a second), so MLflow may hold an epoch or two more than Tune saw, but not all four."""
    epochs = 4
    exp = f"asha-{uuid.uuid4().hex[:6]}"
    cfg = tune_config(data, str(tmp_path / "sweeps"), "{student.loss.lambda_ce: {grid: [1.0, 100.0]}}", "name=asha",
                      "metric=loss", "mode=min", "grace_period=1", f"student.epochs={epochs}", "max_concurrent_trials=1",
                      f"tracking.uri={mlflow_server}", f"tracking.experiment={exp}")
    summary = run_tune(cfg)
    rows = {r["student.loss.lambda_ce"]: r for r in summary["table"]}
    assert rows[1.0]["status"] == "completed" and rows[1.0]["epochs"] == epochs
    assert rows[100.0]["status"] == "stopped early" and rows[100.0]["epochs"] == 1  # stopped at the first rung
    assert summary["stopped_early"] == 1 and summary["best"]["student.loss.lambda_ce"] == 1.0
    client, _, runs = mlflow_runs(mlflow_server, exp)
    by_lambda = {float(r.data.params["loss.lambda_ce"]): r for r in runs if "loss.lambda_ce" in r.data.params}
    first = {k: client.get_metric_history(r.info.run_id, "train/loss") for k, r in by_lambda.items()}
    assert first[100.0][0].value > first[1.0][0].value  # the premise: worse at the first rung
    stopped = [m.step for m in first[100.0]]
    assert stopped == list(range(1, len(stopped) + 1)) and len(stopped) < epochs  # the stop cut its training short
    assert [m.step for m in first[1.0]] == list(range(1, epochs + 1))
    run = client.get_run(by_lambda[100.0].info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["dakd.tune.status"] == "stopped early"


@pytest.mark.slow
def test_teacher_sweep_over_b(data, tmp_path, mlflow_server):
    exp = f"teacher-{uuid.uuid4().hex[:6]}"
    cfg = tune_config(data, str(tmp_path / "sweeps"), "{teacher.b: {grid: [0.3, 1.0]}}", "name=b", "level=teacher",
                      f"teacher.shards={data['real']}", *[f"teacher.{s}" for s in TINY_TEACHER if not s.startswith("tracking")],
                      "synthesize.count=8", "synthesize.steps=2", "synthesize.rows_per_file=8", "synthesize.actors_max=1",
                      "synthesize.contact_sheet_count=0", "student.synthetic=null",
                      "evaluate_synthesis.features=pixels", "evaluate_synthesis.actors=1",
                      f"tracking.uri={mlflow_server}", f"tracking.experiment={exp}")
    summary = run_tune(cfg)
    assert summary["trials"] == 2 and summary["completed"] == 2
    root = tmp_path / "sweeps" / "b" / "trials"
    for row in summary["table"]:
        trial = root / row["trial_id"]
        manifest = shards.read_manifest(str(trial / "synthetic"))
        state = json.loads(next((trial / "teacher").glob("checkpoint_*/state.json")).read_text())
        assert state["b"] == row["teacher.b"]  # the trial's teacher was trained with its b ...
        assert manifest["splits"]["train"]["count"] == 8  # ... synthesised its set ...
        assert {r["b"] for r in shards.open_shard_set(str(trial / "synthetic")).iter_records("train")} == {row["teacher.b"]}
        assert (trial / "student" / "best.json").exists()  # ... and trained the student on it
    client, parents, runs = mlflow_runs(mlflow_server, exp)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    roles = sorted(r.data.tags.get("dakd.tune.role") for r in children)
    assert roles.count("student") == 2 and roles.count("teacher") == 2 and roles.count("evaluate-synthesis") == 2
    # each trial's FID: its evaluate-synthesis run's value, reported to Tune and on its student run
    fid_runs = {r.data.tags["dakd.tune.trial_id"]: r for r in children if r.data.tags.get("dakd.tune.role") == "evaluate-synthesis"}
    students = {r.data.tags["dakd.tune.trial_id"]: r for r in children if r.data.tags.get("dakd.tune.role") == "student"}
    for row in summary["table"]:
        fid = fid_runs[row["trial_id"]].data.metrics["synthesis/fid_pixels"]
        assert fid >= 0 and row["synthesis/fid"] == pytest.approx(fid)
        assert students[row["trial_id"]].data.metrics["synthesis/fid"] == pytest.approx(fid)
    best = load_config(TrainSarossConfig, summary["best_config"])
    assert best.synthetic == str(root / summary["best"]["trial_id"] / "synthetic")
    assert (tmp_path / "sweeps" / "b" / "best_teacher.yaml").exists()


def test_bad_input_is_refused(data, tmp_path, ray_local):
    out = tmp_path / "bad"
    cases = [
        ("{student.loss.temprature: {grid: [1.0]}}", "space.student.loss.temprature: 'temprature' is not a field of TrainSarossConfig"),
        ("{lr: {grid: [0.1]}}", "space.lr: a path must start with the section it sets, one of student."),
        ("{teacher.b: {grid: [0.5]}}", "space.teacher.b: a path must start with .*\(level 'student'\)"),
        ("{student.loss.temperature: {uniform: [0.0, 2.0]}}", "space.student.loss.temperature: uniform .* refused by TrainSarossConfig: loss.temperature: Input should be greater than 0"),
        ("{student.epochs: {uniform: [1, 3]}}", "space.student.epochs: uniform .* refused .* epochs: Input should be a valid integer"),
        ("{student.lr: {grid: [0.001, -1]}}", "space.student.lr: value -1 refused by TrainSarossConfig: lr: Input should be greater than 0"),
        ("{student.lr: {loguniform: [0, 0.1]}}", "loguniform needs 0 < low"),
        ("{student.seed: {randint: [5, 5]}}", "randint needs low < high"),
        ("{student.loss.mode: {choice: [soft, fuzzy]}}", "value 'fuzzy' refused"),
        ("{student.output: {grid: [a, b]}}", "student.output is set by the sweep"),
        ("{student.lr: {range: [1, 2]}}", "expected one of"),
    ]
    for space, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_tune(tune_config(data, str(out), space, "tracking.enabled=false"))
    ok = "{student.lr: {grid: [0.001]}}"
    cpus = ray_local.cluster_resources()["CPU"]
    with pytest.raises(ConfigError, match=f"one trial needs 16.05 CPUs .* the cluster has {cpus:g} CPUs"):
        run_tune(tune_config(data, str(out), ok, "tracking.enabled=false", "student.num_workers=4",
                             "student.cpus_per_worker=4", "max_concurrent_trials=null"))
    with pytest.raises(TrackingError, match="not reachable"):
        run_tune(tune_config(data, str(out), ok, "tracking.uri=http://127.0.0.1:9"))
    assert not out.exists()  # nothing written before the checks passed


def test_fid_only_when_an_extractor_can_run():
    """Teacher trials score their synthetic set with InceptionV3 only when its weights are
    configured (they are never downloaded), or with an extractor chosen explicitly."""
    from dakd.tune.sweep import scores_synthesis, trial_resources, trial_sections

    teacher = ["level=teacher", "space={teacher.b: {grid: [0.5]}}"]
    assert not scores_synthesis(load_config(TuneConfig, None, teacher))
    assert trial_sections(load_config(TuneConfig, None, teacher)) == ("teacher", "synthesize", "student")
    weighted = load_config(TuneConfig, None, teacher + ["evaluate_synthesis.inception_weights=/w/inception.pth",
                                                        "evaluate_synthesis.actors=9"])
    assert scores_synthesis(weighted) and "evaluate_synthesis" in trial_sections(weighted)
    assert trial_resources(weighted)["CPU"] == 9 + weighted.driver_cpus  # its feature actors are the largest job
    assert scores_synthesis(load_config(TuneConfig, None, teacher + ["evaluate_synthesis.features=pixels"]))
    assert not scores_synthesis(load_config(TuneConfig, None, ["evaluate_synthesis.features=pixels"]))  # student level


def test_example_config_parses():
    cfg = load_config(TuneConfig, os.path.join(REPO, "jobs", "configs", "tune_student_tiny.yaml"))
    dims = parse_space(cfg.space, cfg.level, {"student": cfg.student, "teacher": cfg.teacher, "synthesize": cfg.synthesize})
    assert {d.key for d in dims} >= {"student.loss.temperature", "student.loss.lambda_kd"}


def test_preset_example_sweeps_the_presets_student():
    """`dakd tune --preset sos-cpu --config jobs/configs/tune_kd_sos_cpu.yaml`: each trial's base
    student is the preset's (its saross section) in soft mode on the pipeline's real and
    synthetic sets, nothing else changed; the space sweeps T and λ_kd."""
    path = os.path.join(REPO, "jobs", "configs", "tune_kd_sos_cpu.yaml")
    cfg = load_config(TuneConfig, path, preset=("sos-cpu", "tune"))
    pipe = load_config(PipelineConfig, None, ["source.root=/data/sos"], preset=("sos-cpu", "pipeline"))
    assert cfg.student.shards.endswith("runs/sos-cpu/real") and cfg.student.synthetic.endswith("runs/sos-cpu/synthetic")
    expected = dump_config(pipe.saross)
    expected.update(shards=cfg.student.shards, synthetic=cfg.student.synthetic)
    expected["loss"]["mode"] = "soft"
    assert dump_config(cfg.student) == expected and cfg.teacher == pipe.jointnet
    dims = parse_space(cfg.space, cfg.level, {"student": cfg.student, "teacher": cfg.teacher, "synthesize": cfg.synthesize})
    assert [d.key for d in dims] == ["student.loss.temperature", "student.loss.lambda_kd"]


def test_sweep_plot_of_long_paths_needs_no_layout_warning():
    """A grid over synthetic-set paths (long categorical values) plots without matplotlib's
    'Tight layout not applied' warning; long tick labels keep their ends."""
    import warnings

    from PIL import Image

    from dakd.tune.results import plot_metric, tick_label
    from dakd.tune.space import Dimension

    paths = ["/tmp/pytest-of-root/pytest-17/test_student_sweep_on_s3_inter0/syn",
             "/tmp/pytest-of-root/pytest-17/test_student_sweep_on_s3_inter0/syn-later"]
    # two 4-inch panels, as in the student sweep on S3 (its first run: one trial failed)
    dims = [Dimension("student.synthetic", "grid", paths), Dimension("student.loss.lambda_kd", "grid", [0.5])]
    rows = [{"student.synthetic": p, "student.loss.lambda_kd": 0.5, "best val/miou": m, "status": "completed"}
            for p, m in [(paths[0], 0.4), (paths[1], None)]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = plot_metric(rows, dims, "val/miou")
    assert Image.open(io.BytesIO(png)).size[0] > 200
    assert tick_label(paths[1]) == "…" + paths[1][-23:] and tick_label("soft") == "soft"
