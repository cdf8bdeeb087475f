"""Shared test fixtures: a real local Ray cluster, a real S3-protocol server (moto) on
127.0.0.1. Both are session-scoped: Ray start-up costs seconds."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Keep every Ray start on 127.0.0.1 (DESIGN.md "Ray and addresses") and one torch thread.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("RAY_ADDRESS", None)
os.environ["OMP_NUM_THREADS"] = "1"
# Ray Train: no spot-preemption watcher actor (one more process per run), and a run's end
# noticed sooner than the 2 s default poll.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

S3_BUCKET = "dakd-test"
# MLflow servers the tests start: tracking and artifacts only, as infra/local/up runs it (no job
# runner processes: MLflow 3 otherwise starts 7, each importing mlflow).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; the standard AWS variables point at it (set before Ray
    starts, so Ray workers inherit them). Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=S3_BUCKET)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_uri(s3_server):
    """A fresh s3:// prefix in the test bucket."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray (one node on 127.0.0.1), shared by the session. RAY_TEST_CPUS logical
    CPUs (default 8). Fewer start fewer Python workers, but 4 deadlocked: a failed Train run
    can leave its placement group (2 CPUs) reserved, and the next run's Ray Data feed then
    gets no CPU at all."""
    import ray

    ray.init(address="local", num_cpus=int(os.environ.get("RAY_TEST_CPUS", "8")), object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from dakd.runtime import configure_ray_data

    configure_ray_data()  # as every job does through init_ray (tests also build datasets directly)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, local artifacts) on 127.0.0.1.
    Yields its URI."""
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts"),
         "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env={**os.environ, **MLFLOW_SERVER_ENV},
    )
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


# `dakd pipeline` overrides for the smallest run that still has every stage and two students
# (shared by test_pipeline and test_report through the `tiny_pipeline` fixture). One Train
# worker each: DDP inside a pipeline is tested on the two-node cluster (test_multinode).
TINY_PIPELINE = [
    "source.procedural.splits={train: 10, test: 4}", "source.val_fraction=0.25", "source.procedural.height=32",
    "source.procedural.width=32", "rows_per_file=4",
    "jointnet.model.block_out_channels=[8, 16]", "jointnet.model.layers_per_block=1",
    "jointnet.model.attention_levels=[1]", "jointnet.model.norm_num_groups=4", "jointnet.model.attention_head_dim=4",
    "jointnet.stages.stage1={iterations: 2, lr: 0.001}", "jointnet.stages.stage2={iterations: 2, lr: 0.001}",
    "jointnet.stages.stage3={iterations: 2, lr: 0.001}", "jointnet.crop_size=32", "jointnet.batch_size_per_worker=2",
    "jointnet.num_workers=1", "jointnet.checkpoint_every=2", "jointnet.log_every=2", "jointnet.sample_every=6",
    "jointnet.sample_count=2", "jointnet.sample_steps=2", "jointnet.num_train_timesteps=50",
    "synthesize.count=8", "synthesize.steps=2", "synthesize.rows_per_file=4", "synthesize.batch_size=4",
    "synthesize.actors_max=1", "evaluate_synthesis.features=pixels", "evaluate_synthesis.actors=1",
    "saross.model.encoder=mobilenetv3_small_050", "saross.model.decoder_channels=[8, 8, 8]", "saross.model.caft_heads=2",
    "saross.crop_size=32", "saross.epochs=1", "saross.global_batch_size=4", "saross.num_workers=1",
    "saross.mosaic=false", "saross.overlay_count=1", "evaluate.overlay_count=1",
]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, mlflow_server):
    """`dakd pipeline ... --json` with TINY_PIPELINE, tracked on the MLflow server, run once per
    session in its own process (its own local Ray) exactly as a user runs it. Returns
    {"output", "args", "stdout", "stderr", "summary"} (summary: the --json line)."""
    import json
    import subprocess
    import sys

    out = str(tmp_path_factory.mktemp("tiny") / "run")
    args = ["pipeline", "--output", out, "--set", f"tracking.uri={mlflow_server}", "--json"]
    for o in TINY_PIPELINE:
        args += ["--set", o]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "platform")}
    for k in ("RAY_ADDRESS", "DAKD_VERBOSE", "MLFLOW_TRACKING_URI", "RAY_DATA_DISABLE_PROGRESS_BARS"):
        env.pop(k, None)
    # bytes, decoded as they are: text=True would turn each tqdm redraw (\r) into a line of its own
    proc = subprocess.run([sys.executable, "-m", "dakd.cli", *args], capture_output=True, env=env,
                          timeout=1200, cwd=str(tmp_path_factory.mktemp("cwd")))
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"output": out, "args": args, "stdout": proc.stdout, "stderr": proc.stderr, "summary": summary}


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`):
# each file is one unit of work for one worker (its module fixtures start once; the tests of the
# session's tiny pipeline run are all in test_pipeline.py), and the files start longest first, so
# the two workers finish together. (xdist_group marks are not honoured with pytest 9: the groups
# are the files.) Order measured on the 2-core machine (s, in one serial run): multinode 290, tune 172,
# accuracy 103, synthesize 80, pipeline 74, safety 76, train_jointnet 62, train_saross 58; the rest < 35.
LONGEST_FIRST = ["test_multinode.py", "test_tune.py", "test_accuracy_sos.py", "test_synthesize.py",
                 "test_pipeline.py", "test_safety.py", "test_train_jointnet.py", "test_train_saross.py",
                 "test_evaluate_predict.py", "test_benchmarks.py", "test_fid.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: test order kept within a file
