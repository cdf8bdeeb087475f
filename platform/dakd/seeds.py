"""Seeds: one place that derives per-sample seeds.

A sample's seed is a pure function of (run seed, sample id), so re-running any
subset of a job regenerates identical samples whatever batch they fall in.
"""

from __future__ import annotations

import hashlib


def sample_seed(run_seed: int, sample_id: int | str) -> int:
    """A 63-bit seed from (run seed, sample id), stable across processes and machines."""
    digest = hashlib.blake2b(f"{int(run_seed)}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
