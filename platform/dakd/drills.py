"""Fault drills: tests and operations rehearsals make a job fail the way a cluster does,
on purpose, to show what survives. Off unless an environment variable asks for one. A
synthesis drill swaps in a subclass of the actor at construction; the training drills are
LoopConfig fields that the shared training loop checks after each step (train.runner).

Synthesis (read in the driver, acted on in the actors):
``DAKD_SYNTH_FAIL_AFTER_RANGES=k``: each actor raises after writing k ranges and refuses every
later call, writing nothing more (the job fails, finished objects stay); ``DAKD_SYNTH_DIE_AT_RANGE=k:/local/marker``: the actor that
samples range k dies (``os._exit``) once, after half of it is sampled and before it is
written (the marker file records that it did); Ray restarts the actor and retries the call;
``DAKD_SYNTH_HOLD_AFTER_RANGES=k:/local/marker``: each actor, once it has written k ranges, waits
while the marker file exists (a test stops or changes the job while it is known to be mid-way).

SAR-JointNet training (read in the driver, acted on in the Train workers):
``DAKD_FAIL_AT_STEP=k``: the workers fail once right after the checkpoint of step k (Ray Train
restarts them from that checkpoint); ``DAKD_HOLD_AT_STEP=k:/local/marker``: after step k the
workers wait while the marker file exists (a test acts on the cluster while the run is mid-way,
then removes the marker).
"""

from __future__ import annotations

import os
import re
import time

from dakd.errors import ConfigError
from dakd.synth.actor import SynthActor

FAIL_AFTER_RANGES = "DAKD_SYNTH_FAIL_AFTER_RANGES"
DIE_AT_RANGE = "DAKD_SYNTH_DIE_AT_RANGE"
HOLD_AFTER_RANGES = "DAKD_SYNTH_HOLD_AFTER_RANGES"
FAIL_AT_STEP = "DAKD_FAIL_AT_STEP"
HOLD_AT_STEP = "DAKD_HOLD_AT_STEP"


MARKER_SPEC = (r"\d+:.+", "k:/path/to/marker")  # (pattern, what the error says was expected)


def read_drill(name: str, spec: tuple[str, str]) -> str | None:
    """The value of drill variable `name`, None when unset; ConfigError naming it when it
    does not match `spec` (pattern, expected)."""
    value = os.environ.get(name)
    if value and not re.fullmatch(spec[0], value):
        raise ConfigError(f"{name}={value!r}: expected {spec[1]}")
    return value or None


def train_drills() -> dict:
    """The training drills the environment asks for, as LoopConfig fields ({"fail_at_step",
    "hold_at_step"}, None where not asked); ConfigError on a malformed value."""
    fail = read_drill(FAIL_AT_STEP, (r"\d+", "a step number"))
    return {"fail_at_step": int(fail) if fail else None, "hold_at_step": read_drill(HOLD_AT_STEP, MARKER_SPEC)}


def synth_drills() -> dict | None:
    """The synthesis drills the environment asks for ({"fail_after_ranges", "die_at_range",
    "hold_after_ranges"}), None when it asks for none; ConfigError on a malformed value."""
    fail = read_drill(FAIL_AFTER_RANGES, (r"\d+", "a number of ranges"))
    die, hold = read_drill(DIE_AT_RANGE, MARKER_SPEC), read_drill(HOLD_AFTER_RANGES, MARKER_SPEC)
    if not fail and not die and not hold:
        return None
    return {"fail_after_ranges": int(fail) if fail else None, "die_at_range": die, "hold_after_ranges": hold}


def synth_actor(job: dict) -> tuple[type, dict]:
    """(actor class, constructor kwargs) for a synthesis job: SynthActor, or DrilledSynthActor
    when job["drills"] (synth_drills, read on the driver) asks for a drill."""
    if job.get("drills"):
        return DrilledSynthActor, {"job": job, "drills": job["drills"]}
    return SynthActor, {"job": job}


def die_once(spec: str, k: int) -> None:
    """Drill: when `spec` ("k:/marker") names range k and its marker is absent, write the
    marker and end the process at once (no cleanup, like a lost node)."""
    at, marker = spec.split(":", 1)
    if int(at) == k and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"actor pid {os.getpid()} died in range {k}\n")
        os._exit(1)


class DrilledSynthActor(SynthActor):
    """SynthActor with the drills of `drills` (see the module docstring)."""

    def __init__(self, job: dict, drills: dict):
        super().__init__(job)
        self.drills = drills
        self.written = 0

    def sample(self, k: int, ids: list[int], after_batch=None) -> dict:
        limit = self.drills.get("fail_after_ranges")
        if limit is not None and self.written >= int(limit):  # a failed actor takes no more work (as if killed)
            raise RuntimeError(f"drill: {FAIL_AFTER_RANGES}={limit} (this actor has already failed)")
        spec = self.drills.get("die_at_range")
        if not spec:
            return super().sample(k, ids, after_batch)
        half = max(len(ids) // 2, 1)

        def die_at_half(done: int) -> None:  # once half the range is sampled, before anything is written
            if done >= half:
                die_once(spec, k)

        return super().sample(k, ids, die_at_half)

    def write_range(self, k: int, start: int, stop: int) -> dict:
        stats = super().write_range(k, start, stop)
        self.written += 1
        hold = self.drills.get("hold_after_ranges")
        if hold:
            at, marker = hold.split(":", 1)
            while self.written == int(at) and os.path.exists(marker):  # as train.runner's hold_at_step
                time.sleep(0.2)
        limit = self.drills.get("fail_after_ranges")
        if limit is not None and self.written >= int(limit):
            raise RuntimeError(f"drill: {FAIL_AFTER_RANGES}={limit} (failed after writing {stats['path']})")
        return stats
