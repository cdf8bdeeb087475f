"""Seeds and stable hashes: one place that derives per-sample and per-worker seeds and split draws.

A sample's seed is a pure function of (run seed, sample id), so re-running any
subset of a job regenerates identical samples whatever batch they fall in. The
validation split is drawn the same way: a pure function of the sample id.
"""

from __future__ import annotations

import hashlib


def sample_seed(run_seed: int, sample_id: int | str) -> int:
    """A 63-bit seed from (run seed, sample id), stable across processes and machines."""
    digest = hashlib.blake2b(f"{int(run_seed)}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def unit_hash(key: str) -> float:
    """A number in [0, 1) from a string, stable across processes, runs and machines
    (blake2b, 53 bits): the draw behind the deterministic validation split."""
    digest = hashlib.blake2b(f"dakd-unit:{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def feed_rng(run_seed: int, epoch: int, key: str):
    """The numpy Generator for one draw of a training feed (a sample's crop and flips, a
    window's order) in epoch `epoch` of a run seeded `run_seed`: the same run, epoch and key
    draw the same on any machine, whatever task or worker does the work."""
    import numpy as np

    return np.random.default_rng(sample_seed(run_seed, f"feed/{int(epoch)}/{key}"))


def worker_seed(run_seed: int, rank: int) -> int:
    """The torch seed of Ray Train worker `rank` in a run seeded `run_seed` (distinct per rank,
    the same on every attempt, so a restarted worker draws as the first one did)."""
    return int(run_seed) * 1000 + int(rank)
