"""The live progress line's counter actor and the Train backend of a one-worker run: what each
Train run starts besides its workers."""

from __future__ import annotations

import subprocess
import sys

from dakd.progress import progress_line, report


def test_a_drivers_lines_reuse_an_idle_counter_from_zero(ray_local, monkeypatch):
    monkeypatch.setenv("DAKD_VERBOSE", "0")
    ray = ray_local
    with progress_line("first", total=10) as first:
        report(first, 7, "loss 0.5")
        assert ray.get(first.get.remote()) == (7, "loss 0.5")  # one caller: its calls run in order
    with progress_line("second", total=10) as second:
        assert second._actor_id == first._actor_id  # the same actor, no new worker process
        assert ray.get(second.get.remote()) == (0, "")  # reset before any worker reports
        with progress_line("inner", total=5) as inner:  # a line while another is open: its own counter
            assert inner._actor_id != second._actor_id
    for handle in (second, inner):  # idle counters that died (e.g. with their node) are not handed out
        ray.kill(handle)
    for handle in (second, inner):  # ray.kill is asynchronous: wait until each is dead
        _wait_dead(ray, handle)
    with progress_line("after", total=3) as after:
        assert after._actor_id not in (second._actor_id, inner._actor_id)
        report(after, 2)
        assert ray.get(after.get.remote()) == (2, "")


def _wait_dead(ray, handle, timeout_s: float = 30.0) -> None:
    """Return once calls on `handle` fail with the actor's death (ray.kill only asks GCS to kill it)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.get.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"actor {handle._actor_id} still answers {timeout_s} s after ray.kill")


def test_one_worker_runs_get_a_backend_that_does_not_import_torch():
    from ray.train.torch import TorchConfig

    from dakd.train.backend import OneWorkerConfig, backend_config

    assert isinstance(backend_config(1, use_gpu=False), OneWorkerConfig)
    assert backend_config(2, use_gpu=False).backend == "gloo" and backend_config(2, use_gpu=True).backend == "nccl"
    assert isinstance(backend_config(2, use_gpu=False), TorchConfig)
    # Ray Train's controller unpickles the config, importing its module: no torch in that import
    probe = "import sys, dakd.train.backend; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
