"""`dakd ingest`: a data source -> a Parquet shard set, decoded and validated in parallel
with Ray Data.

Work is cut into chunks of `rows_per_file` pairs per split; each chunk is one Ray Data
row, decoded, validated and written to its deterministic shard name, and returns its
statistics; the chunks are grouped into two blocks per cluster CPU, one task each. The
driver writes the manifest last, only when every chunk succeeded (or, with on_error=skip,
listing what was skipped).

Every run writes under a fresh generation prefix (data/<generation>/<split>/...), so an
overwrite is a swap (see data.shards): the old set stays readable until the new manifest
is written, then only the files the old manifest lists are removed; a failed run removes
its own generation and leaves the old set as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

import numpy as np

from dakd import __version__, storage
from dakd.config import IngestConfig, SourceConfig, dump_config
from dakd.data import shards
from dakd.data.classes import class_pixel_counts
from dakd.data.shards import VAL_FROM, VAL_SPLIT
from dakd.data.readers import PairRef
from dakd.data.sources import make_reader
from dakd.data.transforms import NORMALIZATION
from dakd.errors import ConfigError, DataError
from dakd.runtime import init_ray, lone_map_data
from dakd.seeds import unit_hash

log = logging.getLogger(__name__)


def _ref_to_dict(ref: PairRef) -> dict:
    d = dataclasses.asdict(ref)
    d["extra"] = [list(kv) for kv in ref.extra]
    return d


def _ref_from_dict(d: dict) -> PairRef:
    return PairRef(**{**d, "extra": tuple(tuple(kv) for kv in d["extra"])})


def assign_splits(refs: list[PairRef], val_fraction: float | None) -> tuple[dict[str, str], dict | None]:
    """The split each ref is written to ({ref id: split}) and how the val split was made.

    With `val_fraction`, a train sample goes to "val" when seeds.unit_hash(id) < val_fraction:
    a pure function of the id, so the split is the same on every run and machine and a
    sample never moves when others are added. ConfigError when either side would be empty."""
    splits = {r.id: r.split for r in refs}
    if val_fraction is None:
        return splits, None
    train = [r.id for r in refs if r.split == VAL_FROM]
    val = [i for i in train if unit_hash(i) < val_fraction]
    if not val or len(val) == len(train):
        raise ConfigError(f"source.val_fraction={val_fraction}: of {len(train)} {VAL_FROM} samples, {len(val)} would go "
                          f"to {VAL_SPLIT!r}; both splits need at least one sample (change val_fraction, in (0, 0.5])")
    splits.update({i: VAL_SPLIT for i in val})
    how = {"from": VAL_FROM, "fraction": val_fraction, "count": len(val),
           "rule": "a sample goes to val when dakd.seeds.unit_hash(id) < fraction (blake2b of the id)"}
    return splits, how


def plan_chunks(refs: list[PairRef], rows_per_file: int, splits: dict[str, str] | None = None) -> list[dict]:
    """Group refs by split (`splits`: ref id -> split written, default the ref's own; sorted
    by id) into chunks of at most rows_per_file."""
    split_of = (lambda r: splits[r.id]) if splits else (lambda r: r.split)
    by_split: dict[str, list[PairRef]] = {}
    for ref in sorted(refs, key=lambda r: (split_of(r), r.id)):
        by_split.setdefault(split_of(ref), []).append(ref)
    chunks = []
    for split, items in sorted(by_split.items()):
        for index, start in enumerate(range(0, len(items), rows_per_file)):
            part = items[start : start + rows_per_file]
            chunks.append({"split": split, "index": index, "refs": json.dumps([_ref_to_dict(r) for r in part])})
    return chunks


def ingest_chunk(chunk: dict, source: dict, output: str, num_classes: int, generation: str | None = None) -> dict:
    """Decode, validate and write one chunk; returns its statistics as {"stats": json}."""
    reader = make_reader(SourceConfig.model_validate(source))
    records, errors, off_palette = [], [], []
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    sizes: Counter = Counter()
    for ref in map(_ref_from_dict, json.loads(chunk["refs"])):
        try:
            rec = reader.read(ref)  # validates sizes, decoding and class values
        except DataError as exc:
            errors.append({"id": ref.id, "path": exc.path, "reason": exc.reason})
            continue
        rec["split"] = chunk["split"]  # the split it is written to (val is carved from train)
        records.append(rec)
        class_pixels += class_pixel_counts(rec["mask"], num_classes)
        sizes[f"{rec['height']}x{rec['width']}"] += 1
        if rec.get("off_palette_pixels"):
            off_palette.append({"id": rec["id"], "pixels": int(rec["off_palette_pixels"])})
    file_info = None
    if records:
        name = shards.shard_name(chunk["split"], chunk["index"], generation)
        size = shards.write_table(storage.join_uri(output, name), shards.records_to_table(records))
        file_info = {"path": name, "rows": len(records), "bytes": size}
    stats = {
        "split": chunk["split"],
        "file": file_info,
        "class_pixels": class_pixels.tolist(),
        "sizes": dict(sizes),
        "off_palette": off_palette,
        "errors": errors,
    }
    return {"stats": json.dumps(stats)}


def _refuse_existing(output: str, overwrite: bool) -> dict | None:
    """Refuse to write into an existing shard set unless overwrite. Returns the manifest of
    the set being replaced (None if none): it is removed only after the swap (`_swap_in`)."""
    old = shards.read_manifest(output)
    has_data = bool(storage.list_files(storage.join_uri(output, "data")))
    if (old is not None or has_data) and not overwrite:
        what = "a shard set" if old is not None else "shard files (an incomplete shard set)"
        raise DataError(output, f"already holds {what}; pass --overwrite to replace it")
    return old


def _swap_in(output: str, manifest: dict, old: dict | None) -> None:
    """Write the new manifest (the swap), then remove the files only the old one listed."""
    shards.write_manifest(output, manifest)
    if old is not None:
        try:  # the new set is complete now: a failure here only leaves old files behind
            removed = shards.remove_listed(output, shards.listed_files(old), keep=set(shards.listed_files(manifest)))
            log.info("overwrite: removed %d files of the replaced shard set at %s", removed, output)
        except Exception as exc:  # noqa: BLE001
            log.warning("overwrite: the new set is complete, but files of the old one remain at %s: %s", output, exc)


def _discard_generation(output: str, generation: str) -> None:
    """After a failed run: remove this run's own generation prefix (never anything else,
    and not once the manifest names it: an interruption after the swap keeps the new set)."""
    try:
        current = shards.read_manifest(output) or {}
    except Exception as exc:  # noqa: BLE001 - the run's own error matters more
        log.warning("could not read %s to remove the failed run's files: %s", output, exc)
        return
    if not any(p.startswith(f"data/{generation}/") for p in shards.listed_files(current)):
        shards.discard_generation(storage.join_uri(output, "data", generation))


def _first_error(errors: list[dict]) -> DataError:
    e = errors[0]
    more = f" (and {len(errors) - 1} more problem(s); use --on-error=skip to skip bad pairs)" if len(errors) > 1 else " (use --on-error=skip to skip bad pairs)"
    return DataError(e["path"], e["reason"] + more)


def run_ingest(cfg: IngestConfig) -> dict:
    """Run the ingest job; returns the job summary (outputs, counts)."""
    output = cfg.output
    reader = make_reader(cfg.source)
    classes = reader.classes
    refs, problems = reader.list_pairs()  # raises DataError for a missing/empty source
    if problems and cfg.on_error == "fail":
        raise _first_error(problems)
    split_of, val_info = assign_splits(refs, cfg.source.val_fraction)  # before anything is written
    storage.ensure_dir(output, create_bucket=cfg.create_bucket)
    storage.check_writable(output)
    old = _refuse_existing(output, cfg.overwrite)
    generation = shards.new_generation()
    try:
        return _ingest(cfg, refs, problems, classes, generation, old, split_of, val_info)
    except BaseException:  # failed or interrupted: the old set (if any) is untouched
        _discard_generation(output, generation)
        raise


def _num_blocks(ray, chunks: int) -> int:
    """Two blocks of chunks per cluster CPU (at most one per chunk), one task each: a task per
    chunk spends more on task start-up than on decoding (benchmarks/ingest.py)."""
    return max(1, min(chunks, 2 * int(ray.cluster_resources().get("CPU", 1))))


def _ingest(cfg: IngestConfig, refs: list, problems: list, classes, generation: str, old: dict | None,
            split_of: dict[str, str], val_info: dict | None) -> dict:
    output = cfg.output
    chunks = plan_chunks(refs, cfg.rows_per_file, split_of)
    log.info("ingest: %d pairs in %d chunks -> %s", len(refs), len(chunks), output)
    ray = init_ray(cfg.ray)
    source = dump_config(cfg.source)
    with lone_map_data():
        ds = ray.data.from_items(chunks, override_num_blocks=_num_blocks(ray, len(chunks)))
        results = ds.map(
            ingest_chunk,
            fn_kwargs={"source": source, "output": output, "num_classes": classes.num_classes, "generation": generation},
            num_cpus=1,
        ).take_all()
    stats = [json.loads(r["stats"]) for r in results]

    errors = [e for s in stats for e in s["errors"]]
    if errors and cfg.on_error == "fail":
        raise _first_error(errors)

    splits: dict[str, dict] = {}
    sizes: Counter = Counter()
    off_palette: list[dict] = []
    for s in sorted(stats, key=lambda s: (s["split"], s["file"]["path"] if s["file"] else "")):
        entry = splits.setdefault(s["split"], {"count": 0, "files": [], "class_pixels": [0] * classes.num_classes})
        if s["file"]:
            entry["files"].append(s["file"])
            entry["count"] += s["file"]["rows"]
        entry["class_pixels"] = [a + b for a, b in zip(entry["class_pixels"], s["class_pixels"])]
        sizes.update(s["sizes"])
        off_palette.extend(s["off_palette"])
    for entry in splits.values():
        total = sum(entry["class_pixels"]) or 1
        entry["class_share"] = [p / total for p in entry["class_pixels"]]
    skipped = list(problems) + errors
    manifest = {
        "kind": "real",
        "created_by": f"dakd {__version__} ingest",
        "source": source,
        "classes": classes.to_dict(),
        "normalization": NORMALIZATION,
        "splits": splits,
        "image_sizes": dict(sorted(sizes.items())),
        "off_palette": {"total_pixels": sum(o["pixels"] for o in off_palette), "samples": off_palette},
        "skipped": skipped,
        "val_split": val_info,
    }
    if not splits:
        raise DataError(output, "no valid pairs were written (all were skipped); no shard set created")
    _swap_in(output, manifest, old)
    return {
        "job": "ingest",
        "output": output,
        "counts": {k: v["count"] for k, v in splits.items()},
        "files": sum(len(v["files"]) for v in splits.values()),
        "skipped": len(skipped),
        "off_palette_pixels": manifest["off_palette"]["total_pixels"],
        "classes": list(classes.names),
    }
