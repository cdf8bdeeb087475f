"""What a job prints: quiet by default, everything with `--verbose`.

Quiet (the default): one line per stage, one live progress line for long work, warnings
that matter, the result. Ray's worker output, Ray Data's progress bars and library INFO
logs stay out of the terminal (Ray still writes them to its log files under
/tmp/ray/session_*/logs). Verbose (`--verbose`, or DAKD_VERBOSE=1): Ray forwards worker
output to the driver and Ray Data shows its progress bars, as Ray does by default.

Long work that runs inside Ray workers (Ray Train loops) reports to the driver's progress
line through a small actor: `with progress_line("train-saross", total=steps) as bar:`
hands `bar` (an actor handle) to the workers, whose rank 0 calls
`report(bar, n, "loss 0.12")`; the driver redraws one tqdm line on stderr. The driver keeps
the actor for its next line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

VERBOSE_ENV = "DAKD_VERBOSE"


def verbose() -> bool:
    """True when the job was asked for detail (`--verbose` or DAKD_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Set the switch for this process and the Ray workers it starts (they inherit the environment)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def configure_logging() -> None:
    """Logging on stderr: dakd's own INFO lines always, other libraries' only when verbose."""
    logging.basicConfig(level=logging.INFO if verbose() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose():
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
        # MLflow's "View run ... at: URL" / "View experiment at" lines, two per run (the summary holds the run ids)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        logging.getLogger("dakd").setLevel(logging.INFO)
        # Ray Data's "Running Dataset ..." / execution summaries and Ray Train's status lines.
        for name in ("mlflow", "alembic", "urllib3", "botocore", "s3fs"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Ray's own driver-side notices (token auth, Data execution summaries) are in its log files.
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # dakd logs an MLflow pytorch model for serving but loads it from safetensors, never by unpickling.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)


def quiet_ray_data(ctx=None) -> None:
    """Ray Data progress bars, per-operator logging and Ray's driver-side INFO lines only when verbose."""
    import ray

    ctx = ctx or ray.data.DataContext.get_current()
    on = verbose()
    configure_logging()  # again: importing Ray (Data) sets its loggers' levels
    ctx.enable_progress_bars = on
    ctx.enable_operator_progress_bars = on
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = on


def _counter_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressCounter:
        """Holds the latest (done, note) a worker reported."""

        def __init__(self):
            self.state = (0, "")

        def set(self, done: int, note: str) -> None:
            self.state = (done, note)

        def get(self) -> tuple[int, str]:
            return self.state

    return ProgressCounter


def report(handle, done: int, note: str = "") -> None:
    """From a worker: `done` items so far and a short note (fire and forget; None: no line)."""
    if handle is not None:
        handle.set.remote(int(done), note)


def _bar(desc: str, total: int, unit: str, start: int = 0):
    """The one live progress line's look: tqdm on stderr, redrawn at most once a second."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, leave=True)


@contextlib.contextmanager
def progress_line(desc: str, total: int, unit: str = "step", start: int = 0):
    """One live tqdm line on stderr (done/total, rate, time left) fed by Ray workers through
    `report`; yields the handle to give them. With --verbose the workers' own lines show
    instead and this yields None."""
    if verbose() or total <= 0:
        yield None
        return
    import ray

    global _current
    key = _driver_key()
    handle = _take_counter(key)
    _current = handle
    bar = _bar(desc, total, unit, start)
    stop = threading.Event()

    def poll() -> None:
        stopped = False
        while not stopped:
            stopped = stop.wait(1.0)  # one last read after the work ended
            try:
                done, note = ray.get(handle.get.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the line is cosmetic; never fail the job for it
                continue
            if note:
                bar.set_postfix_str(note, refresh=False)
            if min(done, total) > bar.n:
                bar.update(min(done, total) - bar.n)

    thread = threading.Thread(target=poll, name=f"progress-{desc}", daemon=True)
    thread.start()
    try:
        yield handle
    finally:
        _current = None
        stop.set()
        thread.join(timeout=15)
        bar.close()
        _idle_counters.setdefault(key, []).append(handle)


@contextlib.contextmanager
def driver_line(desc: str, total: int, unit: str = "image"):
    """Progress of work counted in the driver itself: one live tqdm line on stderr (a printed
    line per update with --verbose). Yields `update(done)`, `done` items so far."""
    if verbose():
        yield lambda done: print(f"[{desc}] {done}/{total} {unit}s", flush=True)
        return
    bar = _bar(desc, total, unit)
    try:
        yield lambda done: bar.update(max(0, min(done, total) - bar.n))
    finally:
        bar.close()


_current = None  # the handle of the progress line open in this driver (None: none)
# Counters of finished lines, kept for the next line of this driver on the same cluster: a new
# actor is a new worker process (about a CPU-second), and a pipeline opens a line per stage.
_idle_counters: dict[tuple[str, str], list] = {}


def _driver_key() -> tuple[str, str]:
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ctx.get_job_id()  # a new node id for every Ray this process starts


def _take_counter(key: tuple[str, str]):
    """An idle counter of this driver (`key`: _driver_key()) reset to (0, ""), or a new one
    (when none is idle, or the idle one died with its node)."""
    import ray

    idle = _idle_counters.get(key, [])
    while idle:
        handle = idle.pop()
        try:
            ray.get(handle.set.remote(0, ""), timeout=10)  # before any worker gets the handle
            return handle
        except Exception:  # noqa: BLE001 - a dead counter: take another
            continue
    return _counter_class().remote()


def current():
    """The open progress line's handle, for a job to put into its workers' config (or None)."""
    return _current
