"""`dakd pipeline`: every stage in order under one output root, then a short report.

Stages so far: ingest (source -> real shard set) and balance (b). Later stages
(train-jointnet, synthesize, train-saross, evaluate) append here.
"""

from __future__ import annotations

import logging

from dakd import storage
from dakd.config import BalanceConfig, IngestConfig, PipelineConfig
from dakd.data import shards
from dakd.data.balance import run_balance
from dakd.data.ingest import run_ingest

log = logging.getLogger(__name__)


def real_shards_uri(cfg: PipelineConfig) -> str:
    return storage.join_uri(cfg.output, "real")


def report(shard_set: shards.ShardSet) -> str:
    """A short human-readable report of a shard set (counts, class shares, b)."""
    m = shard_set.manifest
    names = shard_set.classes.names
    lines = [f"shard set {shard_set.root}"]
    for split, entry in sorted(m["splits"].items()):
        shares = ", ".join(f"{n} {100 * s:.1f}%" for n, s in zip(names, entry["class_share"]))
        lines.append(f"  {split:<6} {entry['count']:>6} images in {len(entry['files'])} file(s); pixels: {shares}")
    lines.append(f"  image sizes: {m['image_sizes']}; skipped: {len(m['skipped'])}; off-palette pixels: {m['off_palette']['total_pixels']}")
    if m.get("balance"):
        bal = m["balance"]
        lines.append(f"  balancing factor b = {bal['b']:.4f} (P(x0) = {bal['power_x']:.1f}, P(y0) = {bal['power_y']:.1f}, {bal['images']} {bal['split']} images)")
    return "\n".join(lines)


def run_pipeline(cfg: PipelineConfig) -> dict:
    real = real_shards_uri(cfg)
    stages: dict[str, dict] = {}
    existing = shards.read_manifest(real)
    if existing is not None and not cfg.overwrite and existing.get("source") == cfg.source.model_dump(mode="json"):
        log.info("ingest: %s already holds this source's shard set; skipped", real)
        stages["ingest"] = {"skipped": True, "output": real}
    else:
        stages["ingest"] = run_ingest(
            IngestConfig(source=cfg.source, output=real, rows_per_file=cfg.rows_per_file,
                         on_error=cfg.on_error, overwrite=cfg.overwrite, ray=cfg.ray)
        )
    stages["balance"] = run_balance(BalanceConfig(shards=real, split="train", ray=cfg.ray))
    print(report(shards.open_shard_set(real)), flush=True)
    return {"job": "pipeline", "output": cfg.output, "stages": stages, "b": stages["balance"]["b"]}
