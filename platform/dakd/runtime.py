"""Connecting to Ray (the cluster named by config or RAY_ADDRESS, else a local one on
127.0.0.1) and holding a run so that two jobs never write the same one at once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time

from dakd.config import RayConfig
from dakd.errors import RunBusyError

log = logging.getLogger(__name__)


_started_here = False  # this process started (or connected) Ray through init_ray


def init_ray(cfg: RayConfig):
    """Connect to (or start) Ray once per process; returns the ray module. Worker output and
    Ray Data progress bars reach this terminal only when verbose (dakd.progress)."""
    global _started_here
    import ray

    from dakd.progress import configure_logging, quiet_ray_data, verbose

    configure_ray_data()
    configure_ray_train()
    if ray.is_initialized():
        return ray
    _started_here = True
    configure_logging()  # importing Ray set its loggers' levels
    ray_level = logging.INFO if verbose() else logging.ERROR  # the driver's "ray" logger (ray.init sets it)
    _raylet_notices_to_stderr()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        # On a cluster the job's log (`ray job logs`) is where its workers' lines belong
        # (progress, "resumed from step", errors): always forwarded there.
        ray.init(address=address, log_to_driver=True, logging_level=ray_level)
    else:
        # dakd/__init__.py keeps it on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
        log.info("starting a local Ray (%d logical CPUs)", cfg.local_num_cpus)
        ray.init(
            address="local",  # a new local Ray even when another one runs on this machine
            num_cpus=cfg.local_num_cpus,
            object_store_memory=cfg.local_object_store_mb * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=verbose(),
            logging_level=ray_level,
        )
    quiet_ray_data()
    return ray


DASHBOARD_ENV = "DAKD_RAY_DASHBOARD"  # "1"/"0": the driver's answer, for its Tune trials (set_ray_dashboard)


def ray_has_dashboard() -> bool:
    """Whether the connected Ray serves a dashboard (and so Ray's state API); True when it
    cannot tell (Ray's defaults are kept). Exact in a driver; inside a Ray worker (a Tune
    trial) Ray reports its default address 127.0.0.1:8265 even without a dashboard, so a
    sweep hands its trials the driver's answer (`set_ray_dashboard`)."""
    import ray._private.worker as ray_worker

    if os.environ.get(DASHBOARD_ENV) in ("0", "1"):
        return os.environ[DASHBOARD_ENV] == "1"
    try:
        return bool(ray_worker.get_dashboard_url())
    except Exception:  # a Ray that keeps this elsewhere
        return True


def set_ray_dashboard(has: bool) -> None:
    """In a Tune trial: what `ray_has_dashboard` answers in this process (the sweep driver's answer)."""
    os.environ[DASHBOARD_ENV] = "1" if has else "0"


def configure_ray_data() -> None:
    """Ray Data settings of dakd's jobs, for datasets made in this process (each dataset keeps
    a copy of the DataContext it was made under, and its tasks run with that copy).

    Parquet is read through Ray Data's V1 datasource: V2 (Ray 2.6x's default) starts a pool of
    32 FooterReader actors, each a new Python process, for every execution of a read, so a
    training feed paid seconds of process start-up per epoch to read a few footers that the
    shard set's manifest already lists."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False


# Ray Train settings of dakd's jobs (environment variables; a value the user set is kept)
RAY_TRAIN_ENV = {
    # Ray Train 2.6x starts one more actor per run, a new Python process, that polls Ray for
    # draining nodes so that a training function can read `ray.train.get_preemption_info()`.
    # dakd's loops do not read it: a drained node ends like a lost one, and the run resumes
    # from its last checkpoint (FailureConfig).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train patches `print` in its workers to send each line to its logger and, as Ray
    # wraps the worker's stdout, to stdout as well: every line of a worker reached the job's
    # log twice. Off: a worker's lines go to stdout once (its log file, and the driver's
    # terminal or the job's log when forwarded).
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def configure_ray_train() -> None:
    """RAY_TRAIN_ENV in this process's environment, where Ray Train reads it in the process that
    calls `fit()` and passes it on to each run's controller and workers."""
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def lone_map_data():
    """Ray Data settings for a dataset that is one map over its input, executed inside the
    block (`ingest`, `balance`): no per-operator resource reservation. The reservation keeps
    CPUs for downstream operators, which such a dataset has none of; on a small cluster it
    ran the map one task at a time for its first blocks (2 CPUs, four 0.5 s tasks: 1.78 s
    with it, 1.05 s without: the allocator admitted one task at a time until the first two
    had finished; a reservation ratio of 0 did the same). Not for actor pools: synthesis
    without it gave 2 actors / 1 actor 1.39-1.52 against 1.71 with it (the first actor took
    queued ranges before the second was up). The setting is restored after the block. It is
    Ray's kill-switch for the allocator (Ray 2.6x); a Ray without it keeps its default."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = getattr(ctx, "op_resource_reservation_enabled", None)
    if before is None:
        yield
        return
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = before


def _raylet_notices_to_stderr() -> None:
    """Ray's driver prints the raylet's notices ("N PYTHON worker processes have been
    started...") on stdout from a background thread, where one can land after a job's --json
    line. Send them to stderr, and drop that worker-count notice unless verbose (it is in the
    raylet's log file). Patches Ray's module-level printer (ray._private.worker, Ray 2.5x-2.6x);
    without it, Ray's behaviour is unchanged."""
    import ray._private.worker as ray_worker

    from dakd.progress import verbose

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "dakd", False):
        return

    def print_to_stdstream(data, ignore_prefix, **kwargs):
        if data.get("pid") == "raylet":
            if not verbose() and any("worker processes have been started" in str(line) for line in data.get("lines", [])):
                return None
            data = {**data, "is_err": True}
        return original(data, ignore_prefix, **kwargs)

    print_to_stdstream.dakd = True
    ray_worker.print_to_stdstream = print_to_stdstream


def shutdown_ray() -> None:
    """Disconnect from (or stop) the Ray that init_ray started in this process, so that none of
    its output can follow what the caller prints next (the --json line). A Ray started by
    someone else (a test session) is left running."""
    global _started_here
    if _started_here:
        import ray

        ray.shutdown()
        _started_here = False


# ---------------------------------------------------------------- one writer per run
LOCK_NAMESPACE = "dakd-run-locks"


def _submission_id() -> str | None:
    """The `ray job submit` submission id of this driver (None outside a submitted job)."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


@contextlib.contextmanager
def run_lock(cfg: RayConfig, key: str, job: str):
    """Hold `key` (a run's storage URI) for this driver while the block runs.

    The lock is a named, zero-CPU Ray actor owned by this driver, so it is cluster-wide and
    dies with the driver (a killed job never leaves a stale lock). A second job asking for a
    held key gets RunBusyError naming the holder, before it writes anything. A Ray that this
    process starts itself (the laptop default: no address) is not shared with other drivers:
    no lock there."""
    if not (cfg.address or os.environ.get("RAY_ADDRESS")):
        yield
        return
    ray = init_ray(cfg)

    @ray.remote(num_cpus=0)
    class RunLock:
        def __init__(self, info: dict):
            self.info = info

        def holder(self) -> dict:
            return self.info

    name = "run:" + hashlib.sha1(key.encode()).hexdigest()
    info = {"key": key, "job": job, "submission_id": _submission_id(), "ray_job_id": ray.get_runtime_context().get_job_id(),
            "host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    deadline = time.time() + 30
    while True:
        try:
            handle = RunLock.options(name=name, namespace=LOCK_NAMESPACE, max_restarts=0).remote(info)
            ray.get(handle.holder.remote())
            break
        except ValueError:  # the name is taken: by a live job, or by one that is just ending
            try:
                other = ray.get(ray.get_actor(name, namespace=LOCK_NAMESPACE).holder.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the holder died between the two calls; try again
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
                continue
            who = f"submission {other['submission_id']}" if other.get("submission_id") else f"Ray job {other['ray_job_id']}"
            raise RunBusyError(
                f"{key} is being written by another {other['job']} job ({who}, {other['host']} pid {other['pid']}, "
                f"since {other['since']}); wait for it to finish or stop it (ray job stop <submission id>), "
                f"or choose another output / run_name") from None
    try:
        yield
    finally:
        ray.kill(handle, no_restart=True)


def smallest_worker_memory(use_gpu: bool, nodes: list[dict] | None = None) -> tuple[int, str] | None:
    """(bytes, node address): Ray's `memory` resource of the alive node with the least of it among
    those that can run a training worker (a GPU when `use_gpu`, else a CPU); `nodes`: ray.nodes().
    None while no such node is up (an autoscaling cluster starts them on demand). On a cluster the
    driver's node (often a small head) says nothing about the workers'."""
    import ray

    key = "GPU" if use_gpu else "CPU"
    fits = [(int(n["Resources"].get("memory", 0)), n["NodeManagerAddress"])
            for n in (ray.nodes() if nodes is None else nodes)
            if n.get("Alive") and n["Resources"].get(key, 0) > 0 and n["Resources"].get("memory", 0) > 0]
    return min(fits) if fits else None
