"""End to end on a real multi-node Ray cluster on 127.0.0.1, driven like a real cluster.

The local stack comes from `infra/local/up` (moto S3 server + MLflow server with its
artifacts on that S3; no Ray head). The cluster is Ray's own multi-node harness
(`ray.cluster_utils.Cluster`): a head with its dashboard / job API and worker nodes, all on
127.0.0.1, token authentication on (RAY_AUTH_MODE=token, token in ~/.ray/auth_token).
Jobs go in through the real `ray job submit` CLI with `--working-dir .` and the
`cluster/runtime_env/dev.json` runtime env. The nodes get the S3 credentials from their
environment (as pods get them from a Secret), and the secret is a marker that no output may
contain.

Node layout: head 3 CPUs, worker 2 CPUs; the teacher's Train workers ask for 2 CPUs each, so
one fits on each node (training must use both) and one head CPU stays free for the Ray Data tasks.

Faults (issue "From laptop to cluster"): (a) a worker node lost during training, (b) a
synthesis job stopped mid-way and resubmitted, (c) the MLflow server down at the start and
down mid-run, (d) the S3 endpoint down at the start, (e) the same run submitted twice at once
((a), (e) and the second half of (c) share one training job).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import MLFLOW_SERVER_ENV, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "dakd-e2e"
MARKER = "dakd-marker-" + uuid.uuid4().hex  # the S3 secret; must appear in no output
PREFIX = f"s3://{BUCKET}/e2e-{uuid.uuid4().hex[:8]}"
MB = 1024 * 1024

pytestmark = pytest.mark.slow

# the tiny preset's teacher, one Train worker per node
TINY_JOINTNET = ["--preset", "tiny", "--set", "cpus_per_worker=2"]


# The cluster runs in a helper process (it owns the Node objects for add/remove) that takes
# commands on stdin and answers one JSON line. Every node gets its own runtime_env folder:
# nodes of one machine otherwise share <session>/runtime_resources, and when one node's agent
# drops its last reference to the job's --working-dir package it deletes the folder that is
# still the driver's cwd on the head (the job then dies, e.g. "Intel oneMKL FATAL ERROR:
# Cannot load .../libtorch_cpu.so" or FileNotFoundError from os.getcwd()).
CLUSTER_HELPER = r"""
import json, sys
from ray.cluster_utils import Cluster
from ray._private.authentication.authentication_token_setup import _enable_token_auth
_enable_token_auth()  # RAY_AUTH_MODE=token is in the environment; make this process's config see it
port, agent_port = int(sys.argv[1]), int(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 3, "object_store_memory": 150 * 2**20, "include_dashboard": True,
    "dashboard_host": "127.0.0.1", "dashboard_port": port, "dashboard_agent_listen_port": agent_port,
    "runtime_env_dir_name": "runtime_resources_head"})
nodes = {cluster.head_node.node_id: cluster.head_node}
print(json.dumps({"head": cluster.head_node.node_id, "session": cluster.head_node.get_session_dir_path()}), flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    if cmd == "add":
        node = cluster.add_node(num_cpus=int(arg), object_store_memory=120 * 2**20,
                                runtime_env_dir_name=f"runtime_resources_{len(nodes)}")
        cluster.wait_for_nodes()
        nodes[node.node_id] = node
        print(json.dumps({"node": node.node_id}), flush=True)
    elif cmd == "remove":
        cluster.remove_node(nodes.pop(arg), allow_graceful=False)
        print(json.dumps({"removed": arg}), flush=True)
    elif cmd == "shutdown":
        break
cluster.shutdown()
"""


class ClusterProcess:
    """`ray.cluster_utils.Cluster` in a helper process: head (3 CPUs, dashboard) + add/remove nodes."""

    def __init__(self, dashboard_port: int):
        self.proc = subprocess.Popen([sys.executable, "-c", CLUSTER_HELPER, str(dashboard_port), str(free_port())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._answer()
        self.head, self.session_dir = hello["head"], hello["session"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"cluster helper exited ({self.proc.poll()})"
        return json.loads(line)

    def _send(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def add_node(self, cpus: int) -> str:
        return self._send(f"add {cpus}")["node"]

    def remove_node(self, node_id: str) -> None:
        """Kill every process of a worker node (no graceful shutdown)."""
        self._send(f"remove {node_id}")

    def shutdown(self) -> None:
        try:
            self.proc.stdin.write("shutdown 0\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """infra/local/up (services only) + a 2-node Ray cluster with the dashboard; yields a dict."""

    state = tmp_path_factory.mktemp("local")
    # The stack's credentials file: its secret is the marker (moto accepts any credentials).
    (state / "credentials").write_text(f"AWS_ACCESS_KEY_ID=dakd-e2e\nAWS_SECRET_ACCESS_KEY={MARKER}\n")
    for attempt in range(3):  # a free port can be taken by another process before the server binds it
        up_env = {**os.environ, "DAKD_LOCAL_DIR": str(state), "DAKD_S3_PORT": str(free_port()),
                  "DAKD_MLFLOW_PORT": str(free_port()), "DAKD_BUCKET": BUCKET, "DAKD_LOCAL_RAY": "0",
                  "PYTHON": sys.executable}
        up = subprocess.run([str(REPO / "infra/local/up")], env=up_env, capture_output=True, text=True, timeout=240)
        if up.returncode == 0:
            break
        subprocess.run([str(REPO / "infra/local/down")], env=up_env, capture_output=True, timeout=120)
        logs = "".join(f.read_text() for f in state.glob("*.log"))
        if "address already in use" not in logs or attempt == 2:
            raise AssertionError(up.stderr[-3000:] + logs[-3000:])
    exported = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                    if line.startswith("export "))
    assert exported["AWS_SECRET_ACCESS_KEY"] == MARKER and exported["RAY_AUTH_MODE"] == "token"

    saved = dict(os.environ)
    os.environ.update(exported)
    os.environ["PATH"] = f"{BIN}:{os.environ['PATH']}"  # the job's `python` is the venv's
    os.environ.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True)
    # The job/state API clients in this process send the token once Ray's cached config says
    # token mode (set after import, so refresh it exactly as ray.init() does for a new cluster).
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
    dashboard_port = free_port()
    cluster = ClusterProcess(dashboard_port)
    info = {"cluster": cluster, "head": cluster.head, "worker": cluster.add_node(2),
            "url": f"http://127.0.0.1:{dashboard_port}", "state": state,
            "mlflow": exported["MLFLOW_TRACKING_URI"], "jobs": [], "outputs": []}
    try:
        yield info
    finally:
        cluster.shutdown()
        subprocess.run([str(REPO / "infra/local/down")], env=up_env, capture_output=True, timeout=120)
        os.environ.clear()
        os.environ.update(saved)


def submit(stack: dict, entrypoint: list[str], *, wait: bool = True, runtime_env: dict | None = None,
           timeout: float = 300) -> tuple[int, str, str]:
    """`ray job submit --working-dir .` (retried while the job agent is not up yet).
    Returns (exit code, submission id, captured output)."""
    env_json = json.loads((REPO / "cluster/runtime_env/dev.json").read_text())
    for k, v in (runtime_env or {}).items():
        env_json[k] = {**env_json.get(k, {}), **v} if isinstance(v, dict) else v
    deadline = time.time() + 90
    while True:
        sub_id = f"dakd-{uuid.uuid4().hex[:10]}"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", stack["url"], "--submission-id", sub_id,
               "--working-dir", ".", "--runtime-env-json", json.dumps(env_json),
               *([] if wait else ["--no-wait"]), "--", *entrypoint]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        if "No available agent" in out and time.time() < deadline:
            time.sleep(2)
            continue
        stack["jobs"].append(sub_id)
        print(f"[{sub_id}] exit {r.returncode}: {' '.join(entrypoint)[:160]}", flush=True)
        return r.returncode, sub_id, out


def last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"ok"' in line:
            return json.loads(line)
    raise AssertionError(f"no JSON summary in the job output:\n{text[-3000:]}")


def job_client(stack: dict):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(stack["url"])


def job_actors(stack: dict, sub_id: str, class_name: str) -> list:
    """Every actor (alive or dead) of one class of one submitted job."""
    from ray.util.state import list_actors

    job_id = job_client(stack).get_job_info(sub_id).job_id
    if job_id is None:  # the driver never connected to Ray
        return []
    return list_actors(address=stack["url"], filters=[("class_name", "=", class_name), ("job_id", "=", job_id)],
                       detail=True, limit=1000, raise_on_missing_output=False)


def train_worker_nodes(stack: dict, sub_id: str) -> set[str]:
    """Node ids of every RayTrainWorker actor (alive or dead) of one submitted job."""
    return {a.node_id for a in job_actors(stack, sub_id, "RayTrainWorker")}


def s3_keys(prefix: str) -> list[str]:
    import boto3

    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


@pytest.fixture(scope="module")
def pipeline_run(stack):
    """`dakd pipeline --preset tiny` (every stage) submitted with `ray job submit`."""
    out = f"{PREFIX}/tiny"
    stack["outputs"].append(out)
    t0 = time.time()
    rc, sub_id, text = submit(stack, [
        "python", "jobs/pipeline.py", "--preset", "tiny", "--output", out, "--set", "jointnet.run_name=teacher",
        "--set", "jointnet.cpus_per_worker=2", "--json"], timeout=600)  # 90-180 s; 300 s was hit under heavy load
    print(f"pipeline job: {time.time() - t0:.0f} s", flush=True)
    assert rc == 0, text[-5000:]
    return sub_id, last_json(text), text


def test_pipeline_end_to_end_on_two_nodes(stack, pipeline_run):
    import mlflow

    from dakd import storage
    from dakd.config import PIPELINE_STAGES
    from dakd.data.shards import open_shard_set
    from dakd.checkpoints import read_state

    sub_id, summary, text = pipeline_run
    assert summary["ok"] and summary["output"] == f"{PREFIX}/tiny" and list(summary["stages"]) == list(PIPELINE_STAGES)
    # infra/local/up runs MLflow for tracking and artifacts only: no job-runner process in its group
    pgid = (stack["state"] / "mlflow.pid").read_text().strip()
    group = subprocess.run(["pgrep", "-a", "-g", pgid], capture_output=True, text=True).stdout.splitlines()
    assert any("mlflow server" in a for a in group) and not any("huey" in a for a in group), group
    # Shards where the summary says: every listed file exists; counts as configured.
    real = summary["stages"]["ingest"]["output"]
    assert real.startswith(PREFIX)
    shard_set = open_shard_set(real)
    assert {s: e["count"] for s, e in shard_set.manifest["splits"].items()} == {"train": 16, "val": 4, "test": 4}
    for split in ("train", "val", "test"):
        files = shard_set.files(split)
        assert files and all(storage.exists(f) for f in files)
        assert sum(1 for _ in shard_set.iter_records(split)) == shard_set.manifest["splits"][split]["count"]
    assert shard_set.manifest["balance"]["b"] == pytest.approx(summary["stages"]["balance"]["b"])
    # The teacher checkpoint: on S3, all 10 configured steps, all three stages.
    teacher = summary["stages"]["train-jointnet"]
    assert teacher["checkpoint"].startswith(PREFIX) and teacher["steps"] == 4 + 4 + 2
    state = read_state(teacher["checkpoint"])
    assert state["step"] == 10 and state["stages_completed"] == [1, 2, 3]
    # Training used Train workers on both nodes.
    nodes = train_worker_nodes(stack, sub_id)
    assert nodes == {stack["head"], stack["worker"]}, nodes
    assert job_actors(stack, sub_id, "PreemptionWatcher") == []  # none per Train run (dakd.runtime.RAY_TRAIN_ENV)
    # a Train worker's line reaches the job's log once (no print patch: dakd.runtime.RAY_TRAIN_ENV)
    epoch_lines = [ln for ln in text.replace("\r", "\n").splitlines() if "[train-saross] epoch 1/1 train/loss" in ln]
    assert len(epoch_lines) == 1, epoch_lines
    # Synthesis: ids 0..7 exactly once in the synthetic set on S3, its contact sheet beside it, FID of it.
    synth = summary["stages"]["synthesize"]
    assert synth["output"] == f"{PREFIX}/tiny/synthetic" and synth["count"] == 8
    ids = sorted(int(r["id"]) for r in open_shard_set(synth["output"]).iter_records("train"))
    assert ids == list(range(8)) and storage.exists(synth["contact_sheet"])
    fid = summary["stages"]["evaluate-synthesis"]["fid"]
    assert fid >= 0 and summary["stages"]["evaluate-synthesis"]["counts"] == {"synthetic": 8, "real": 16}
    # The DAKD student: best checkpoint on S3, trained on real + synthetic; its evaluation files.
    student = summary["stages"]["train-saross"]["soft"]
    assert student["checkpoint"].startswith(f"{PREFIX}/tiny/student/soft/") and student["epochs"] == 1
    assert read_state(student["checkpoint"])["synthetic"] == synth["output"]
    evaluated = summary["stages"]["evaluate"]
    assert set(evaluated["miou"]) == {"soft"} and 0 <= evaluated["miou"]["soft"] <= 1
    ev_out = evaluated["outputs"]["soft"]
    report = json.loads(storage.read_text(f"{ev_out}/metrics.json"))
    assert report["metrics"]["miou"] == pytest.approx(evaluated["miou"]["soft"])
    assert storage.exists(f"{ev_out}/{report['files']['confusion_matrix']}") and storage.exists(f"{PREFIX}/tiny/eval/comparison.md")
    assert report["files"]["overlays"] and all(storage.exists(f"{ev_out}/{o}") for o in report["files"]["overlays"])
    # MLflow: the parent run with a child run per stage, all finished; the teacher's metrics
    # and its final sample grid stored through the server on the S3 bucket.
    client = mlflow.MlflowClient(tracking_uri=stack["mlflow"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {r.data.tags["dakd.job"] for r in children} == set(PIPELINE_STAGES), [r.data.tags for r in children]
    assert all(r.info.status == "FINISHED" for r in children)
    train_run = client.get_run(teacher["mlflow_run_id"])
    assert train_run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    steps = [m.step for m in client.get_metric_history(train_run.info.run_id, "train/loss")]
    assert max(steps) == 10
    grids = [a.path for a in client.list_artifacts(train_run.info.run_id, "samples")]
    assert grids, "the final sample grid is logged"
    stored = s3_keys(f"s3://{BUCKET}/mlflow")
    assert any(k.endswith(grids[-1]) for k in stored), (grids, stored[:20])


def test_s3_endpoint_down_at_start_is_a_clear_error(stack):
    """(d) The object store does not answer: the job exits 2 with a message naming the URI."""
    dead = f"http://127.0.0.1:{free_port()}"
    out = f"{PREFIX}/s3-down"
    rc, sub_id, text = submit(stack, ["python", "jobs/pipeline.py", "--output", out, "--set", "tracking.enabled=false",
                                      "--set", "stages=[ingest]", "--json"],
                              runtime_env={"env_vars": {"AWS_ENDPOINT_URL": dead}})
    assert rc != 0
    summary = last_json(text)
    assert summary["ok"] is False and out in summary["error"] and "127.0.0.1" in summary["error"]
    assert f"dakd pipeline: error: {out}" in text and "Traceback" not in text
    assert "exit code 2" in job_client(stack).get_job_info(sub_id).message
    assert s3_keys(out + "/") == []


def test_mlflow_down_at_start_is_a_clear_error_before_compute(stack, pipeline_run):
    """(c, first half) The tracking server is down when the job starts: a clear error, and no
    training (no Train worker, nothing written)."""
    real = pipeline_run[1]["stages"]["ingest"]["output"]
    dead = f"http://127.0.0.1:{free_port()}"
    out = f"{PREFIX}/mlflow-down"
    rc, sub_id, text = submit(stack, ["python", "jobs/train_jointnet.py", "--set", f"shards={real}", "--output", out,
                                      *TINY_JOINTNET, "--set", f"tracking.uri={dead}", "--json"])
    assert rc != 0
    summary = last_json(text)
    assert summary["ok"] is False and f"MLflow tracking at {dead} is not reachable" in summary["error"]
    assert "Traceback" not in text
    assert job_client(stack).get_job_info(sub_id).job_id is None  # the driver never even connected to Ray
    assert train_worker_nodes(stack, sub_id) == set()
    assert s3_keys(out + "/") == []


def wait_for_job(stack: dict, sub_id: str, timeout: float = 300) -> str:
    """Wait until a submitted job ends; returns its final status."""
    from ray.job_submission import JobStatus

    client, deadline = job_client(stack), time.time() + timeout
    while (status := client.get_job_status(sub_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, f"job {sub_id} did not end within {timeout} s"
        time.sleep(0.5)
    return status


def s3_etags(prefix: str) -> dict[str, str]:
    import boto3

    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def test_synthesis_job_stopped_and_resubmitted_writes_every_id_once(stack, pipeline_run, tmp_path):
    """(b) A synthesis job is stopped (`ray job stop`: its driver and actors killed) with two of
    its six ranges on S3 (drill DAKD_SYNTH_HOLD_AFTER_RANGES holds its actor there, so the stop
    does not depend on how fast the machine is); the same command resubmitted writes only the
    missing ranges, leaves the finished objects untouched, and the set holds every id exactly once."""
    from ray.job_submission import JobStatus

    from dakd.data.shards import open_shard_set

    teacher = pipeline_run[1]["stages"]["train-jointnet"]["checkpoint"]
    out = f"{PREFIX}/fault-b"
    stack["outputs"].append(out)
    count, held = 12, 2
    command = ["python", "jobs/synthesize.py", "--preset", "tiny", "--set", f"teacher={teacher}", "--output", out,
               "--set", f"count={count}", "--set", "rows_per_file=2", "--set", "sampler=ddim", "--set", "steps=10",
               "--set", "actors_max=1", "--set", "tracking.enabled=false", "--json"]
    hold = tmp_path / "hold"  # while it exists, the first job's actor waits after its second range
    hold.write_text("")
    rc, first, text = submit(stack, command, wait=False,
                             runtime_env={"env_vars": {"DAKD_SYNTH_HOLD_AFTER_RANGES": f"{held}:{hold}"}})
    assert rc == 0, text[-3000:]
    client, deadline = job_client(stack), time.time() + 240
    while len([k for k in s3_keys(f"{out}/data/") if k.endswith(".parquet")]) < held:
        assert client.get_job_status(first) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(first)[-3000:]
        assert time.time() < deadline, f"no {held} ranges written within 240 s"
        time.sleep(0.2)
    client.stop_job(first)
    assert wait_for_job(stack, first) == JobStatus.STOPPED
    hold.unlink()
    before = {k: e for k, e in s3_etags(f"{out}/data/").items() if k.endswith(".parquet")}
    assert len(before) == held and s3_keys(f"{out}/manifest.json") == []  # incomplete: no manifest

    rc, _, text = submit(stack, command)
    assert rc == 0, text[-5000:]
    summary = last_json(text)
    assert len(summary["ranges_kept"]) == held and summary["generated"] == count - 2 * held
    after = s3_etags(f"{out}/data/")
    assert all(after[k] == e for k, e in before.items())  # finished objects untouched
    ids = [int(r["id"]) for r in open_shard_set(out).iter_records("train")]
    assert sorted(ids) == list(range(count))  # every id exactly once


def start_mlflow_server(tmp_path) -> tuple[subprocess.Popen, str]:
    """An MLflow server of the test's own (sqlite, local artifacts) that the test can kill; waits
    until it answers. Returns (process, URI)."""
    import mlflow

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              env={**os.environ, **MLFLOW_SERVER_ENV},
                              start_new_session=True)  # its own process group: the server and its workers
    deadline = time.time() + 120
    while True:
        try:
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            return server, uri
        except Exception:  # noqa: BLE001 - not up yet
            if server.poll() is not None or time.time() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                raise AssertionError((tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)


def test_same_run_twice_refused_then_mlflow_down_and_a_node_lost_mid_run_the_first_completes(stack, pipeline_run,
                                                                                              tmp_path):
    """Three faults on one training job (one job's start-up instead of three):
    (e) two jobs for the same run: while the first holds it, the second refuses before it writes
    anything (no checkpoint, no MLflow run), naming the first;
    (c, second half) then the tracking server dies while the first runs;
    (a) then the node of one of its Train workers is lost: Ray Train restarts the group from the
    checkpoint of step 6 on the remaining nodes, and training goes on to its last step with an
    intact checkpoint; the job reports how many MLflow calls were not logged.
    The first job waits after step 6 (its checkpoint written) until both faults are in place
    (drill DAKD_HOLD_AT_STEP), so no fault depends on how fast the machine is."""
    import mlflow
    from ray.job_submission import JobStatus
    from ray.util.state import list_actors

    from dakd.runtime import LOCK_NAMESPACE
    from dakd import checkpoints as ckpt_io

    hold = tmp_path / "hold"  # while it exists, the first job's workers wait after step `held`
    hold.write_text("")
    server, uri = start_mlflow_server(tmp_path)
    try:
        real = pipeline_run[1]["stages"]["ingest"]["output"]
        out = f"{PREFIX}/twice"
        stack["outputs"].append(out)
        steps, held = 12, 6
        command = ["python", "jobs/train_jointnet.py", "--set", f"shards={real}", "--output", out, *TINY_JOINTNET,
                   "--set", "run_name=same", "--set", "run_stages=[1]",
                   "--set", f"stages={{stage1: {{iterations: {steps}, lr: 0.003}}}}", "--set", f"checkpoint_every={held}",
                   "--set", "log_every=3", "--set", "max_failures=2", "--set", f"tracking.uri={uri}",
                   "--set", "tracking.experiment=mid-run", "--json"]
        rc, first, text = submit(stack, command, wait=False, runtime_env={"env_vars": {"DAKD_HOLD_AT_STEP": f"{held}:{hold}"}})
        assert rc == 0, text[-3000:]
        client, deadline = job_client(stack), time.time() + 180
        while not [a for a in list_actors(address=stack["url"], filters=[("ray_namespace", "=", LOCK_NAMESPACE),
                                                                          ("state", "=", "ALIVE")], raise_on_missing_output=False)
                   if a.job_id == client.get_job_info(first).job_id]:
            assert client.get_job_status(first) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(first)[-3000:]
            assert time.time() < deadline, "the first job never took the run"
            time.sleep(0.3)
        rc, second, text = submit(stack, command)
        assert client.get_job_status(first) == JobStatus.RUNNING, "the first job ended before the second was refused"
        assert rc != 0
        refusal = last_json(text)
        assert refusal["ok"] is False and f"{out}/same is being written by another train-jointnet job (submission {first}" in refusal["error"]
        assert "Traceback" not in text

        tracked = mlflow.MlflowClient(tracking_uri=uri)
        while True:  # the first metrics are on the server: the run is under way
            exp = tracked.get_experiment_by_name("mid-run")
            runs = tracked.search_runs([exp.experiment_id]) if exp else []
            if runs and tracked.get_metric_history(runs[0].info.run_id, "train/loss"):
                break
            assert time.time() < deadline + 240, "no metrics logged"
            time.sleep(0.2)
        assert len(runs) == 1  # the refused job created no MLflow run
        while not [k for k in s3_keys(f"{out}/same/") if k.endswith("state.json")]:  # step 6's checkpoint: holding
            assert client.get_job_status(first) == JobStatus.RUNNING, client.get_job_logs(first)[-3000:]
            assert time.time() < deadline + 240, "no checkpoint within the time"
            time.sleep(0.3)
        logged_before = len(tracked.get_metric_history(runs[0].info.run_id, "train/loss"))
        assert client.get_job_status(first) == JobStatus.RUNNING, "the first job ended before the server was killed"
        os.killpg(server.pid, signal.SIGKILL)  # every process of the server, at once
        server.wait()
        lost = stack["worker"]
        assert lost in train_worker_nodes(stack, first)
        stack["worker"] = stack["cluster"].add_node(2)  # the remaining resources: head + this node
        stack["cluster"].remove_node(lost)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        hold.unlink()
    print("MLflow server killed and a worker node removed; waiting for the first job", flush=True)
    assert wait_for_job(stack, first) == JobStatus.SUCCEEDED, client.get_job_logs(first)[-5000:]
    logs = client.get_job_logs(first)
    summary = last_json(logs)
    state = ckpt_io.read_state(summary["checkpoint"])
    assert state["step"] == steps and summary["steps"] == steps
    assert state["attempt_start_step"] == held and f"resumed from step {held}/{steps}" in logs, logs[-5000:]
    assert stack["worker"] in train_worker_nodes(stack, first)  # restarted on the remaining nodes
    weights = ckpt_io.load_weights(summary["checkpoint"])  # the checkpoint loads whole
    assert weights and all(t.isfinite().all() for t in weights.values())
    assert logged_before <= 2 and summary["tracking_failures"] >= 1  # steps 3 and 6; the later metrics and the run's end
    assert f"{summary['tracking_failures']} MLflow call(s) failed and were not logged" in logs


def test_no_output_contains_the_secret(stack, pipeline_run):
    """The S3 secret (a marker) is in every node's environment: it must not appear in shards,
    manifests, checkpoints, MLflow params/tags/metrics/artifacts, job summaries or logs."""
    import boto3
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq

    secret = MARKER.encode()
    s3 = boto3.client("s3")
    keys = s3_keys(f"s3://{BUCKET}/")
    assert any(k.endswith(".parquet") for k in keys) and any(k.endswith("state.json") for k in keys)
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert secret not in body, key
        if key.endswith(".parquet"):  # compressed pages: look at the decoded values and metadata
            table = pq.ParquetFile(pa.BufferReader(body)).read()  # not read_table: see shards.read_table
            assert MARKER not in str(table.schema.metadata) and MARKER not in str(table.drop_columns(
                [c for c in ("image", "mask", "logits") if c in table.column_names]).to_pylist()), key
    client = mlflow.MlflowClient(tracking_uri=stack["mlflow"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs
    for run in runs:
        text = json.dumps([run.data.params, run.data.tags, run.data.metrics, run.info.artifact_uri])
        assert MARKER not in text, run.info.run_id
    assert secret not in (stack["state"] / "mlflow.db").read_bytes()
    jobs = job_client(stack)
    for sub_id in stack["jobs"]:
        assert MARKER not in jobs.get_job_logs(sub_id), sub_id
        assert MARKER not in json.dumps(jobs.get_job_info(sub_id).metadata or {}), sub_id
    assert MARKER not in pipeline_run[2]  # what `ray job submit` printed
    session_logs = Path(stack["cluster"].session_dir) / "logs"
    for f in session_logs.rglob("*"):
        if f.is_file() and f.stat().st_size < 50 * MB:
            assert secret not in f.read_bytes(), f
