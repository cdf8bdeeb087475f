"""`dakd evaluate-synthesis`: FID and Inception Score of a synthetic shard set against a
real one (the paper's generation metrics).

Each shard file of either set is one Ray Data row; a pool of actors (the extractor loaded
once per actor) reads the file, extracts features (and class probabilities) of its
images and returns one row per image. The driver streams them into running statistics
(dakd.synth.fid), so sets of any size are scored. ``max_samples`` takes the first images of
each set in file order. IS is computed on the synthetic set only, with 10 splits (by a
hash of the sample id, so independent of arrival order); it needs class probabilities,
so it is None for extractors without them (``pixels``).
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from dakd.config import EvaluateSynthesisConfig, dump_config
from dakd.data import shards
from dakd.errors import DataError
from dakd.progress import driver_line
from dakd.synth.fid import ISAccumulator, RunningStats, frechet_distance, load_inception, make_extractor


def plan_files(shard_set: shards.ShardSet, split: str, max_samples: int | None, which: str) -> list[dict]:
    """One work item per shard file: {"set", "uri", "take"} (take: rows used from its start)."""
    uris = shard_set.files(split)  # DataError naming the set when the split is absent
    entries = shard_set.manifest["splits"][split]["files"]
    items, left = [], max_samples if max_samples is not None else float("inf")
    for uri, entry in zip(uris, entries):
        if left <= 0:
            break
        take = int(min(entry["rows"], left))
        items.append({"set": which, "uri": uri, "take": take})
        left -= take
    return items


class FeatureActor:
    """Ray Data actor: input rows {"set", "uri", "take"}; output one row per image
    {"set", "id", "features" (D,), "probs" (K,) (zeros of width 1 when the extractor has none)}."""

    def __init__(self, spec: str, pixels_size: int, inception_weights: str | None, batch_size: int,
                 torch_threads: int, use_gpu: bool):
        device = "cpu"
        if spec != "pixels":  # pixel features are NumPy: such an actor never imports torch
            from dakd.inference import setup_actor

            device = setup_actor(None, 1.0 if use_gpu else 0.0, torch_threads)[0].type
        self.extract = make_extractor(spec, pixels_size=pixels_size, inception_weights=inception_weights,
                                      device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        sets, ids, feats, probs = [], [], [], []
        for which, uri, take in zip(batch["set"], batch["uri"], batch["take"]):
            table = shards.read_table(str(uri), columns=shards.IMAGE_COLUMNS).slice(0, int(take))
            rows = table.to_pylist()
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                # group same-size images (a set may mix sizes); the features do not depend on the group
                by_shape: dict[tuple, list] = {}
                for r in chunk:
                    by_shape.setdefault((int(r["height"]), int(r["width"])), []).append(r)
                for (h, w), group in by_shape.items():
                    images = np.stack([shards.decode_plane(r["image"], h, w) for r in group])
                    f, p = self.extract(images)
                    feats.extend(np.asarray(f, np.float64))
                    probs.extend(np.asarray(p, np.float64) if p is not None else np.zeros((len(group), 1)))
                    ids.extend(str(r["id"]) for r in group)
                    sets.extend([str(which)] * len(group))
        return {"set": np.asarray(sets, dtype=object), "id": np.asarray(ids, dtype=object),
                "features": np.stack(feats), "probs": np.stack(probs)}


def run_evaluate_synthesis(cfg: EvaluateSynthesisConfig) -> dict:
    """Score the synthetic set against the real one; returns {fid, inception_score, ...}."""
    from dakd import tracking
    from dakd.runtime import init_ray

    t0 = time.perf_counter()
    synthetic, real = shards.open_shard_set(cfg.synthetic), shards.open_shard_set(cfg.real)
    if synthetic.classes.num_classes != real.classes.num_classes:
        raise DataError(cfg.synthetic, f"has {synthetic.classes.num_classes} classes, the real set {cfg.real} has "
                                       f"{real.classes.num_classes}: they are not of the same data")
    items = (plan_files(synthetic, cfg.synthetic_split, cfg.max_samples, "synthetic")
             + plan_files(real, cfg.real_split, cfg.max_samples, "real"))
    if cfg.features == "inception":
        load_inception(cfg.inception_weights)  # a clear error in the driver, before any Ray work
    uri = tracking.tracking_uri(cfg.tracking, cfg.synthetic)  # before any compute

    ray = init_ray(cfg.ray)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        FeatureActor, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs={"spec": cfg.features, "pixels_size": cfg.pixels_size,
                               "inception_weights": cfg.inception_weights, "batch_size": cfg.batch_size,
                               "torch_threads": cfg.torch_threads, "use_gpu": cfg.gpus_per_actor > 0},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None)
    stats, is_acc, has_probs = featurise(cfg, ds, sum(i["take"] for i in items))
    for which, s in stats.items():
        if s.n < 2:
            raise DataError(cfg.synthetic if which == "synthetic" else cfg.real,
                            f"{s.n} image(s) in the {which} set; FID needs at least 2")
    fid = frechet_distance(stats["synthetic"].mean, stats["synthetic"].cov, stats["real"].mean, stats["real"].cov)
    is_mean, is_std = is_acc.score() if has_probs else (None, None)
    result = {"job": "evaluate-synthesis", "synthetic": cfg.synthetic, "real": cfg.real, "features": cfg.features,
              "feature_dim": int(stats["real"].mean.shape[0]),
              "fid": fid, "inception_score": is_mean, "inception_score_std": is_std,
              "inception_score_note": None if has_probs else
              f"not defined for features={cfg.features!r} (no class probabilities; use features=inception)",
              "counts": {"synthetic": stats["synthetic"].n, "real": stats["real"].n},
              "seconds": time.perf_counter() - t0}
    with tracking.job_run(cfg.tracking, uri=uri, job="evaluate-synthesis",
                          run_key=f"evaluate-synthesis:{cfg.synthetic}:{cfg.real}:{cfg.features}",
                          run_name="evaluate-synthesis", params=dump_config(cfg)) as run:
        log_run(run.logger, cfg, result)
    if run:
        result["mlflow_run_id"] = run.run_id
    print(f"[evaluate-synthesis] FID {fid:.4f} ({cfg.features}, {stats['synthetic'].n} synthetic vs "
          f"{stats['real'].n} real)" + (f", IS {is_mean:.4f} ± {is_std:.4f}" if is_mean is not None else ", IS n/a"),
          flush=True)
    return result


def featurise(cfg: EvaluateSynthesisConfig, ds, total: int) -> tuple[dict, ISAccumulator, bool | None]:
    """Feature statistics of both sets from the actors' batches -> ({"synthetic", "real":
    RunningStats}, Inception Score accumulator, whether the extractor gives class probabilities)."""
    stats = {"synthetic": RunningStats(), "real": RunningStats()}
    is_acc, has_probs = ISAccumulator(cfg.is_splits), None
    with driver_line(f"evaluate-synthesis ({cfg.features})", total) as update:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            _accumulate(cfg, batch, stats, is_acc)
            has_probs = batch["probs"].shape[1] > 1  # width 1: the extractor gives no class probabilities
            update(stats["synthetic"].n + stats["real"].n)
    return stats, is_acc, has_probs


def _accumulate(cfg: EvaluateSynthesisConfig, batch: dict, stats: dict, is_acc: ISAccumulator) -> None:
    """Add one batch of features (and class probabilities) to the running statistics."""
    for which in ("synthetic", "real"):
        sel = batch["set"] == which
        if not sel.any():
            continue
        stats[which].update(batch["features"][sel])
        if which == "synthetic":
            probs = batch["probs"][sel]
            if probs.shape[1] > 1:
                split = np.asarray([zlib.crc32(str(i).encode()) % cfg.is_splits for i in batch["id"][sel]])
                is_acc.update(probs, split)


def log_run(logger, cfg: EvaluateSynthesisConfig, result: dict) -> None:
    """The job's MLflow logging: synthesis/ metrics (FID, IS) and the result (`logger`: the job
    run's tracking.RunLogger, which does nothing when tracking is off)."""
    metrics = {f"synthesis/fid_{cfg.features.replace(':', '_')}": result["fid"]}
    if result["inception_score"] is not None:
        metrics.update({"synthesis/inception_score": result["inception_score"],
                        "synthesis/inception_score_std": result["inception_score_std"]})
    logger.log_metrics(metrics, step=result["counts"]["synthetic"])
    logger.log_dict(result, "evaluate_synthesis.json")
