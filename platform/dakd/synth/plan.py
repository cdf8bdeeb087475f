"""Synthesis planning: which sample-id ranges a synthetic set holds, which objects under
the output already hold them, and which ranges a run still has to write (see
dakd.synth.synthesize for the layout and the exactly-once rules).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from dakd import storage
from dakd.data import shards
from dakd.errors import ConfigError, DataError, StorageError

log = logging.getLogger(__name__)

FOOTER_KEY = b"dakd.synth"  # Parquet footer metadata of a range object: its range, identity, class pixels
_PART = re.compile(r"part-(\d+)\.parquet$")


MAX_RANGES = 2_000_000  # objects one synthetic set may hold (the manifest lists each)


class RangePlan(Sequence):
    """The ranges (k, start, stop) of `count` ids in ranges of `rows_per_file`, computed on
    demand (range k = ids [k*R, min((k+1)*R, count))): nothing is built up front."""

    def __init__(self, count: int, rows_per_file: int):
        self.count, self.rows = int(count), int(rows_per_file)

    def __len__(self) -> int:
        return -(-self.count // self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k = k % len(self)
        return (k, k * self.rows, min((k + 1) * self.rows, self.count))


def plan_ranges(count: int, rows_per_file: int) -> RangePlan:
    """The ranges of `count` ids (lazy); ConfigError at once when count is out of bounds or
    would need more than MAX_RANGES objects."""
    if count < 1:
        raise ConfigError(f"count: expected >= 1, got {count}")
    plan = RangePlan(count, rows_per_file)
    if len(plan) > MAX_RANGES:
        raise ConfigError(f"count {count} with rows_per_file {rows_per_file} needs {len(plan)} objects, more than "
                          f"{MAX_RANGES}; raise rows_per_file or lower count")
    return plan


def read_footer(uri: str) -> tuple[int, dict | None]:
    """(rows, dakd.synth footer metadata or None) of a shard object, reading only its footer."""
    import pyarrow.parquet as pq

    loc = storage.resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.read_metadata(f)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read its Parquet footer ({type(exc).__name__}: {exc})") from exc
    raw = (meta.metadata or {}).get(FOOTER_KEY)
    return meta.num_rows, (json.loads(raw) if raw else None)


def scan_existing(output: str) -> dict[int, dict]:
    """{range k: {"uri", "rows", "meta"}} of the part objects already under output/data/train."""
    found = {}
    for uri in storage.list_files(storage.join_uri(output, "data", shards.SYNTHETIC_SPLIT)):
        m = _PART.search(uri)
        if m and uri.endswith(shards.shard_name(shards.SYNTHETIC_SPLIT, int(m.group(1)))):
            found[int(m.group(1))] = uri
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = dict(zip(found, pool.map(read_footer, found.values())))
    return {k: {"uri": found[k], "rows": footers[k][0], "meta": footers[k][1]} for k in sorted(found)}


def _refuse_other(output: str, what: str) -> None:
    raise DataError(output, f"{what}; pass --overwrite to replace it, or choose another output")


def check_output(output: str, identity: dict, ranges: list[tuple], overwrite: bool) -> tuple[list[tuple], dict]:
    """Refuse or clear a foreign output; returns (ranges to write, existing ranges kept)."""
    manifest = shards.read_manifest(output)
    other_files = [u for u in storage.list_files(storage.join_uri(output, "data"))
                   if not u.startswith(storage.join_uri(output, "data", shards.SYNTHETIC_SPLIT) + "/")]
    existing = scan_existing(output)
    foreign = None
    if manifest is not None and (manifest.get("kind") != "synthetic" or manifest.get("identity") != identity):
        foreign = ("holds a shard set of another kind" if manifest.get("kind") != "synthetic" else
                   "holds a synthetic set of another teacher or config (identity "
                   + ", ".join(f"{k}={manifest.get('identity', {}).get(k)!r}" for k in identity
                               if manifest.get("identity", {}).get(k) != identity[k]) + ")")
    elif other_files:
        foreign = f"holds shards of other splits ({other_files[0]})"
    else:
        bad = [k for k, e in existing.items() if (e["meta"] or {}).get("identity") != identity]
        if bad:
            foreign = (f"holds objects of another teacher or config ({existing[bad[0]]['uri']}); "
                       "a synthetic set never mixes them")
    if foreign:
        if not overwrite:
            _refuse_other(output, foreign)
        log.info("overwrite: removing the shard set at %s", output)
        shards.remove_manifest(output)  # first: a failure below never leaves a stale "complete" set
        # only what dakd wrote: the files the old manifest lists and this job's own part objects
        # (those with a dakd footer); anything else under data/ (a user's file) stays
        ours = [shards.shard_name(shards.SYNTHETIC_SPLIT, k) for k, e in existing.items() if e["meta"] is not None]
        shards.remove_listed(output, (shards.listed_files(manifest) if manifest else []) + ours)
        existing = {}
    planned = {k: stop - start for k, start, stop in ranges}
    too_many = [k for k, e in existing.items() if k not in planned or e["rows"] > planned[k]]
    if too_many:
        k = too_many[0]
        held = existing[k]["meta"]["stop"] if existing[k]["meta"] else "?"
        raise DataError(output, f"already holds sample ids up to {int(held) - 1} ({existing[k]['uri']}), more than "
                                f"count {sum(planned.values())}; shrinking a synthetic set is refused (use --overwrite "
                                "or another output)")
    done = {k: e for k, e in existing.items() if e["rows"] == planned[k]}
    todo = [r for r in ranges if r[0] not in done]
    return todo, done
