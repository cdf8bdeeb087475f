"""Synthesis planning: which sample-id ranges a synthetic set holds, which objects under
the output already hold them, and which ranges a run still has to write (see
dakd.synth.synthesize for the layout and the exactly-once rules).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dakd import storage
from dakd.data import shards
from dakd.errors import ConfigError, DataError, StorageError

log = logging.getLogger(__name__)

FOOTER_KEY = b"dakd.synth"  # Parquet footer metadata of a range object: its range, identity, class pixels
# a range object, relative to the output: data/<generation>/train/part-<k>.parquet (data/train/...
# for sets written before synthetic sets had generations)
_PART = re.compile(r"^data/(?:([^/]+)/)?" + shards.SYNTHETIC_SPLIT + r"/part-(\d+)\.parquet$")


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


def synthetic_generation(identity: dict) -> str:
    """The generation folder of the synthetic set with `identity` (data/<generation>/train/):
    a pure function of the identity, so re-running the same command finds and resumes its
    own objects, and a set of another identity is written beside the old one (a swap)."""
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    return f"syn-{digest}"


def scan_parts(output: str) -> tuple[dict[str | None, dict[int, str]], list[str]]:
    """Range objects under output/data by generation ({generation or None: {k: uri}}), and
    every other file there (URIs)."""
    base = storage.join_uri(output, "data")
    prefix = storage.join_uri(output, "")
    parts: dict[str | None, dict[int, str]] = {}
    others = []
    for uri in storage.list_files(base):
        m = _PART.match(uri[len(prefix):]) if uri.startswith(prefix) else None
        if m:
            parts.setdefault(m.group(1), {})[int(m.group(2))] = uri
        else:
            others.append(uri)
    return parts, others


def read_footers(found: dict[int, str]) -> dict[int, dict]:
    """{range k: {"uri", "rows", "meta"}} of the given range objects (their Parquet footers)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = dict(zip(found, pool.map(read_footer, found.values())))
    return {k: {"uri": found[k], "rows": footers[k][0], "meta": footers[k][1]} for k in sorted(found)}


def _refuse_other(output: str, what: str) -> None:
    raise DataError(output, f"{what}; pass --overwrite to replace it, or choose another output")


@dataclass
class OutputPlan:
    """What a synthesis run writes and what it replaces.

    todo: ranges to write; kept: {k: footer entry} of this generation's complete objects;
    replacing: the output holds another set, which stays readable until the new manifest is
    written; remove_after: relative paths removed once it is (the old manifest's files and
    dakd's own range objects of other generations)."""

    generation: str
    todo: list[tuple]
    kept: dict
    replacing: bool = False
    remove_after: list[str] = field(default_factory=list)


def check_output(output: str, identity: dict, ranges: list[tuple], overwrite: bool) -> OutputPlan:
    """Refuse a foreign output (unless overwrite) and plan the run: what is kept, what is
    written (under this identity's generation), what goes once the new manifest is in."""
    generation = synthetic_generation(identity)
    manifest = shards.read_manifest(output)
    parts, other_files = scan_parts(output)
    existing = read_footers(parts.get(generation, {}))
    elsewhere = {g: read_footers(found) for g, found in parts.items() if g != generation}
    foreign = None
    if manifest is not None and (manifest.get("kind") != "synthetic" or manifest.get("identity") != identity):
        theirs = manifest.get("identity", {})
        foreign = ("holds a shard set of another kind" if manifest.get("kind") != "synthetic" else
                   "holds a synthetic set of another teacher or config (identity "
                   + ", ".join(f"{k}={theirs.get(k)!r}" for k in identity | theirs if theirs.get(k) != identity.get(k))
                   + ")")
    elif other_files:
        foreign = f"holds shards of other splits ({other_files[0]})"
    else:
        bad = [e["uri"] for entries in elsewhere.values() for e in entries.values()]
        bad += [e["uri"] for e in existing.values() if (e["meta"] or {}).get("identity") != identity]
        if bad:
            foreign = f"holds objects of another teacher or config ({bad[0]}); a synthetic set never mixes them"
    if foreign and not overwrite:
        _refuse_other(output, foreign)
    listed = shards.listed_files(manifest) if manifest else []
    ours = [shards.shard_name(shards.SYNTHETIC_SPLIT, k, g)
            for g, entries in elsewhere.items() for k, e in entries.items() if e["meta"] is not None]
    if foreign:
        log.info("overwrite: the new set is written under %s/data/%s; the old one stays until its manifest is "
                 "replaced", output, generation)
        existing = {k: e for k, e in existing.items() if (e["meta"] or {}).get("identity") == identity}
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
    return OutputPlan(generation, todo, done, replacing=bool(foreign), remove_after=listed + ours)
