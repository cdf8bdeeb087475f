"""SAR-JointNet on a real local Ray cluster: three stages with 2 DDP workers (gloo),
resume after an interruption inside stage 2, checkpoints on file:// and s3://, the CLI (train, then
`dakd sample` from S3), bad input.
Tests whose point is not DDP run one Train worker: each worker is a process that imports
torch and diffusers (about 5 s of CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from dakd import storage
from dakd.cli import main
from dakd.config import (BalanceConfig, IngestConfig, ProceduralSource, SourceConfig, TrainJointNetConfig,
                         load_config)
from dakd.data.balance import run_balance
from dakd.data.ingest import run_ingest
from dakd.errors import ConfigError, TrainingError
from dakd import checkpoints as ckpt_io
from dakd.checkpoints import load_teacher
from dakd.runtime import ray_has_dashboard
from dakd.train.jointnet import build_model, run_train_jointnet
from dakd.train.runner import adamw, without_placement_group_cleaner

TINY = [
    "model.block_out_channels=[8, 16]", "model.layers_per_block=1", "model.attention_levels=[1]",
    "model.norm_num_groups=4", "model.attention_head_dim=4",
    "stages.stage1={iterations: 6, lr: 0.003}", "stages.stage2={iterations: 8, lr: 0.003}",
    "stages.stage3={iterations: 6, lr: 0.001}",
    "num_train_timesteps=100", "crop_size=32", "batch_size_per_worker=4", "num_workers=2",
    "checkpoint_every=4", "log_every=2", "sample_every=10", "sample_count=2", "sample_steps=3",
    "ema_decay=0.9", "max_failures=0",
]


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory, ray_local):
    out = str(tmp_path_factory.mktemp("real") / "real")
    source = SourceConfig(kind="procedural", procedural=ProceduralSource(splits={"train": 16}, height=32, width=32, seed=5))
    run_ingest(IngestConfig(source=source, output=out, rows_per_file=8))
    run_balance(BalanceConfig(shards=out))
    return out


def tiny_config(shards: str, output: str, *extra: str) -> TrainJointNetConfig:
    return load_config(TrainJointNetConfig, None, [f"shards={shards}", f"output={output}", *TINY, *extra])


@pytest.mark.slow
def test_three_stages_resume_inside_stage_two(real_shards, tmp_path, monkeypatch, mlflow_server):
    cfg = tiny_config(real_shards, str(tmp_path / "runs"), f"tracking.uri={mlflow_server}")
    monkeypatch.setenv("DAKD_FAIL_AT_STEP", "12")  # stage 2 spans steps 6..14
    with pytest.raises(Exception):
        run_train_jointnet(cfg)
    monkeypatch.delenv("DAKD_FAIL_AT_STEP")
    summary = run_train_jointnet(cfg)  # same run name: resumes

    assert summary["steps"] == 20 and summary["stages_completed"] == [1, 2, 3]
    state = ckpt_io.read_state(summary["checkpoint"])
    assert state["attempt_start_step"] == 12  # continued from the saved step, not from 0
    assert state["label_initialised"] and state["b"] == pytest.approx(summary["b"])

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["num_workers"] == "2" and run.data.params["stages.stage2.iterations"] == "8"
    history = client.get_metric_history(run.info.run_id, "train/loss_y")
    steps = [m.step for m in history]
    assert min(steps) <= 8 and max(steps) == 20  # logged before and after the interruption, one run
    first, last = history[0].value, history[-1].value
    assert last < first  # Label-Net learns the procedural classes
    loss_x = client.get_metric_history(run.info.run_id, "train/loss_x")
    assert loss_x[-1].value < loss_x[0].value
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts, "a sample grid is logged"

    model, teacher_state = load_teacher(str(tmp_path / "runs" / "jointnet"))
    assert teacher_state["location"] == summary["checkpoint"] and model.num_classes == 5


def test_checkpoint_round_trip_file_and_s3(tmp_path, s3_uri):
    weights = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    local = tmp_path / "ck"
    ckpt_io.save_checkpoint(str(local), weights, {"step": 7, "kind": "x"}, ema_state=weights, optimizer_state=opt)
    # Upload the directory as files to S3 and read both back through storage URIs.
    for f in local.iterdir():
        storage.write_bytes(storage.join_uri(s3_uri, "ck", f.name), f.read_bytes())
    for where in (str(local), storage.join_uri(s3_uri, "ck")):
        got = ckpt_io.load_weights(where)
        assert set(got) == set(weights) and all(torch.equal(got[k], weights[k]) for k in weights)
        assert ckpt_io.read_state(where)["step"] == 7
        o = ckpt_io.load_optimizer_state(where)
        assert torch.equal(o["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])


@pytest.mark.slow
def test_cli_trains_to_s3_in_bf16_then_samples_a_grid(real_shards, s3_uri, tmp_path, capsys):
    """End to end through the CLI: `dakd train-jointnet` (stage 1, bf16 autocast on the CPU)
    writes its checkpoints to S3, then `dakd sample` draws a grid from the run on S3."""
    import ray

    out = s3_uri + "/runs"
    before = set(ray._private.state.actors())  # the session Ray's actors of earlier tests
    assert main(["train-jointnet", "--output", out, *sum([["--set", s] for s in TINY], []), "--set", f"shards={real_shards}",
                 "--set", "run_stages=[1]", "--set", "stages.stage1={iterations: 4, lr: 0.003}",
                 "--set", "tracking.enabled=false", "--set", "precision=bf16", "--set", "num_workers=1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["checkpoint"].startswith(s3_uri) and summary["steps"] == 4
    assert 0 < summary["final"]["loss"] < 10  # a finite float32 loss from the bf16 forward
    state = ckpt_io.read_state(summary["checkpoint"])
    assert state["stages_completed"] == [1] and state["config"]["precision"] == "bf16"
    weights = ckpt_io.load_teacher(summary["checkpoint"])[0].state_dict().values()
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights if w.is_floating_point())
    assert json.loads(storage.read_text(storage.join_uri(s3_uri, "runs", "jointnet", "latest.json")))["step"] == 4
    # the test Ray, like dakd's local one, has no dashboard: no PlacementGroupCleaner polling
    # a state API that is not there (or another Ray's on this host)
    assert not ray_has_dashboard()
    classes = [a.get("ActorClassName", "") for k, a in ray._private.state.actors().items() if k not in before]
    assert any("RayTrainWorker" in c for c in classes), classes  # the listing sees Train's actors
    assert not any("PlacementGroupCleaner" in c for c in classes), classes
    assert not any("PreemptionWatcher" in c for c in classes), classes  # dakd.runtime.configure_ray_train

    png = str(tmp_path / "grid.png")
    assert main(["sample", "--set", f"checkpoint={out}/jointnet", "--output", png, "--set", "count=3",
                 "--set", "steps=4", "--json"]) == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sampled["nfe"] == 4 and sampled["checkpoint"] == summary["checkpoint"]
    from PIL import Image

    img = Image.open(png)
    assert img.size == (64, 96)  # 3 rows of [image | mask], 32 px each


def test_one_worker_reads_the_same_epochs_without_a_split(real_shards):
    """One Train worker gets the whole dataset (no streaming_split, so no SplitCoordinator
    process): its epochs are the ones the split of two workers would hand out together, and
    each epoch draws new crops."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from dakd.data.shards import open_shard_set
    from dakd.train.feed import real_dataset
    from dakd.train.runner import data_config

    assert data_config(1)._datasets_to_split == [] and data_config(2)._datasets_to_split == "all"

    def epochs(workers: int) -> list[list[bytes]]:
        ds = real_dataset(open_shard_set(real_shards), "train", 16, seed=3)
        shards = data_config(workers).configure({"train": ds}, world_size=workers, worker_handles=None,
                                                worker_node_ids=None)
        its = [pickle.loads(pickle.dumps(s["train"])) for s in shards]  # as they reach the workers

        def rows(it) -> list[bytes]:
            return [bytes(x) for b in it.iter_batches(batch_size=4) for x in b["image"]]

        with ThreadPoolExecutor(len(its)) as pool:  # the split's workers read at the same time
            return [sorted(sum(pool.map(rows, its), [])) for _ in range(2)]

    one, two = epochs(1), epochs(2)
    assert len(one[0]) == 16 and one == two and one[0] != one[1]


def test_placement_group_cleaner_kept_only_where_a_dashboard_serves_it():
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    callbacks = [object(), PlacementGroupCleanerCallback(), object()]
    assert without_placement_group_cleaner(callbacks, dashboard=True) == callbacks
    assert without_placement_group_cleaner(callbacks, dashboard=False) == [callbacks[0], callbacks[2]]


def test_jobs_optimizer_is_fused_adamw_with_the_per_tensor_update():
    """adamw(): the fused kernel, and the same weights as torch's per-tensor AdamW after the
    same steps (with weight decay, and a parameter the step leaves without a gradient)."""
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(3), torch.randn(4, 4)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    weights = {}
    for kind in ("fused", "loop"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = (adamw(params, 1e-2, 0.05) if kind == "fused"
               else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, foreach=False))
        assert bool(opt.defaults["fused"]) is (kind == "fused")
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            params[2].grad = None  # frozen this step: neither kind may move it
            opt.step()
        weights[kind] = [p.detach() for p in params]
    for fused, loop in zip(weights["fused"], weights["loop"]):
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
    assert torch.equal(weights["fused"][2], start[2]) and not torch.equal(weights["fused"][0], start[0])


def test_ray_train_settings_reach_each_run_unless_the_user_set_them(monkeypatch):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from dakd.runtime import RAY_TRAIN_ENV, configure_ray_train

    watcher, patch = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_ENABLE_PRINT_PATCH"
    assert RAY_TRAIN_ENV == {watcher: "0", patch: "0"}
    monkeypatch.delenv(watcher, raising=False)
    monkeypatch.setenv(patch, "1")  # the user's choice
    configure_ray_train()
    propagated = get_env_vars_to_propagate()  # what each run's controller and workers get
    assert propagated[watcher] == "0" and propagated[patch] == "1"


def test_bad_input_is_refused_before_training(real_shards, tmp_path, monkeypatch):
    out = str(tmp_path / "bad")
    # a malformed fault drill
    for name, value, expected in [("DAKD_HOLD_AT_STEP", "20", "k:/path/to/marker"),
                                  ("DAKD_FAIL_AT_STEP", "x", "a step number")]:
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ConfigError, match=f"{name}={value!r}: expected {expected}"):
                run_train_jointnet(tiny_config(real_shards, out, "tracking.enabled=false"))
    # stage 2 without stage 1's checkpoint
    with pytest.raises(ConfigError, match="init_checkpoint"):
        run_train_jointnet(tiny_config(real_shards, out, "run_stages=[2, 3]", "tracking.enabled=false"))
    # b missing from the manifest and not configured
    nob = str(tmp_path / "nob")
    run_ingest(IngestConfig(source=SourceConfig(procedural=ProceduralSource(splits={"train": 4}, height=32, width=32)), output=nob))
    with pytest.raises(ConfigError, match="balance"):
        run_train_jointnet(tiny_config(nob, out, "tracking.enabled=false"))
    # a checkpoint of another architecture: a stage-1 checkpoint as train-jointnet writes it (the
    # checks read its state.json and weights before any training, so it need not be trained)
    first = str(tmp_path / "stage1" / "checkpoint_000")
    cfg = tiny_config(real_shards, out)
    model = build_model(cfg, 5)
    ckpt_io.save_checkpoint(first, model.state_dict(), {"kind": ckpt_io.TEACHER_KIND, "step": 6, "stage": 1,
                                                        "stages_completed": [1], "arch": model.arch_dict(), "b": 0.5})
    with pytest.raises(ConfigError, match="block_out_channels"):
        run_train_jointnet(tiny_config(real_shards, out, "run_stages=[2]", f"init_checkpoint={first}",
                                       "model.block_out_channels=[8, 24]", "run_name=other", "tracking.enabled=false"))
    # a checkpoint that has not completed the stages before the one asked for
    with pytest.raises(ConfigError, match="stages \\[1, 2\\]"):
        run_train_jointnet(tiny_config(real_shards, out, "run_stages=[3]", f"init_checkpoint={first}",
                                       "run_name=other", "tracking.enabled=false"))
    assert not (tmp_path / "bad").exists()  # refused before anything was written


@pytest.mark.slow
def test_nonfinite_loss_stops_and_names_the_step(real_shards, tmp_path):
    cfg = tiny_config(real_shards, str(tmp_path / "nan"), "run_stages=[1]", "stages.stage1={iterations: 40, lr: 1.0e+30}",
                      "grad_clip=1.0e+30", "checkpoint_every=1", "tracking.enabled=false", "num_workers=1")
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step \d+") as err:
        run_train_jointnet(cfg)
    bad_step = int(str(err.value).split("at step ")[1].split()[0])
    run_dir = tmp_path / "nan" / "jointnet"
    assert not (run_dir / "latest.json").exists()  # no "final" pointer
    # Every checkpoint kept is from before the bad step and holds finite weights.
    kept = list(run_dir.glob("checkpoint_*/state.json"))
    assert kept or bad_step == 1
    for state_file in kept:
        assert json.loads(state_file.read_text())["step"] < bad_step
        weights = ckpt_io.load_weights(str(state_file.parent))
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
