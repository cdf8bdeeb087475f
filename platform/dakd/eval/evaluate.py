"""`dakd evaluate`: a SAROSS-Net on a shard set's split at full resolution.

Every image is segmented whole (SAROSS-Net pads to a multiple of 32 and crops back, so
OSD's 650x1250 needs no tiling) by Ray Data actors; each returns the image's confusion
matrix; the driver sums them over the split and computes the metrics once (eval.metrics:
data-set-level, not means of per-image scores). Averaging, exactly: per-class IoU, F1,
precision and recall from the summed confusion matrix; mIoU, F1, precision and recall
in the table are *macro* means over the classes present in the target or prediction;
accuracy is pixel accuracy, trace / total.

Outputs under `output`: metrics.json (confusion matrix, per-class and mean values, and
`files`: the figures below), table.md (the paper's layouts), and under a fresh
`<generation>/` folder confusion_matrix.png and overlays/<id>.png ([image | ground truth |
prediction | errors] for the first `overlay_count` images); the same logged to MLflow.
`run_evaluations` evaluates several checkpoints on one split in one actor pool (each actor
holds every model, each image is read once: a pipeline's students), each written and
logged as its own evaluation. metrics.json records the evaluation's `identity` (settings,
the checkpoint's weights, the split's files): a re-run pipeline skips an evaluation whose
identity is unchanged (`finished_evaluation`). A re-run is a
swap: its figures go beside the old ones, metrics.json (one atomic write) then names them,
and only then are the files the old metrics.json lists removed, so a failed or killed
re-run leaves the old evaluation whole.

Segmentation (`dakd.inference.segment_many`: an actor batch's images of one size in one
forward), overlays and the confusion-matrix figure (`dakd.eval.figures`) and model loading
(`dakd.checkpoints.load_model`) live in their own modules.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re

import numpy as np
import torch

from dakd import storage
from dakd.checkpoints import load_model, read_state
from dakd.config import EvaluateConfig, dump_config
from dakd.data.classes import ClassTable, class_table_from_dict
from dakd.data.shards import (PAIR_COLUMNS, decode_plane, discard_generation, new_generation, open_shard_set,
                              read_manifest, remove_listed)
from dakd.errors import ConfigError, DakdError, DataError
from dakd.eval.figures import confusion_png, overlay_panel, png_bytes
from dakd.eval.metrics import confusion_matrix, format_per_class_table, format_table, segmentation_metrics
from dakd.inference import segment_many, setup_actor
from dakd.progress import driver_line

log = logging.getLogger(__name__)


class EvaluateActor:
    """Ray Data actor: shard rows -> per-image confusion matrix of each model (+ overlay PNGs
    for chosen ids). Several models share the actor: each image is read and decoded once."""

    def __init__(self, model_refs, num_classes: int, classes: dict, overlay_ids: list[str], gpus: float, threads: int,
                 compile: bool = False):
        import ray

        self.models = []
        for ref in model_refs:
            self.device, model = setup_actor(lambda ref=ref: ray.get(ref), gpus, threads, compile=compile)
            self.models.append(model)
        self.c = num_classes
        self.classes = class_table_from_dict(classes)
        self.overlay_ids = set(overlay_ids)

    def __call__(self, batch: dict) -> dict:
        """Columns: id, and per model k: cm<k> (C*C int64 bytes), overlay<k> (PNG bytes or b"")."""
        out = {"id": batch["id"]}
        rows = list(zip(batch["id"], batch["height"], batch["width"], batch["image"], batch["mask"]))
        decoded = [(str(sid), decode_plane(img, h, w), decode_plane(msk, h, w)) for sid, h, w, img, msk in rows]
        for k, model in enumerate(self.models):
            cms, overlays = [], []
            preds = segment_many(model, [image for _, image, _ in decoded], self.device, batch_size=len(decoded))
            for (sid, image, mask), pred in zip(decoded, preds):
                cms.append(confusion_matrix(pred, mask, self.c).astype(np.int64).tobytes())
                overlays.append(png_bytes(overlay_panel(image, pred, self.classes, mask)) if sid in self.overlay_ids else b"")
            out[f"cm{k}"], out[f"overlay{k}"] = np.array(cms, dtype=object), np.array(overlays, dtype=object)
        return out


def _safe_name(sid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(sid))


def evaluate_models(models: list[torch.nn.Module], classes: ClassTable, shards: str, split: str, *,
                    overlay_count: int = 0, batch_size: int = 1, actors: int = 1, gpus_per_actor: float = 0.0,
                    cpus_per_actor: float = 1.0, torch_threads: int = 1, compile: bool = False
                    ) -> list[tuple[np.ndarray, dict, dict[str, bytes]]]:
    """Segment every image of `split` with each model, in one pool of Ray Data actors (set up
    by `dakd.inference`; each actor holds every model, each image is read once); returns per
    model (summed confusion matrix (C, C) int64, metrics of eval.metrics, {id: overlay PNG bytes})."""
    import ray
    from ray.data import ActorPoolStrategy

    shard_set = open_shard_set(shards)
    if shard_set.classes.num_classes != classes.num_classes:
        raise DataError(shards, f"has {shard_set.classes.num_classes} classes, the model {classes.num_classes}")
    files = shard_set.files(split)
    ids = []
    for uri in files[:1] if overlay_count else []:
        from dakd.data.shards import read_table

        ids = read_table(uri, columns=["id"]).column("id").to_pylist()[:overlay_count]
    loc = storage.resolve(shard_set.root)
    ds = ray.data.read_parquet([storage.resolve(f).path for f in files], filesystem=loc.fs,
                               columns=PAIR_COLUMNS)
    model_refs = [ray.put(m) for m in models]  # in a list: Ray passes the references, not the objects
    out = ds.map_batches(EvaluateActor, fn_constructor_args=(model_refs, classes.num_classes, classes.to_dict(), ids,
                                                              gpus_per_actor, torch_threads, compile),
                         compute=ActorPoolStrategy(size=actors), batch_size=batch_size, num_gpus=gpus_per_actor,
                         num_cpus=cpus_per_actor, batch_format="numpy")
    c = classes.num_classes
    cms = [np.zeros((c, c), dtype=np.int64) for _ in models]
    overlays: list[dict[str, bytes]] = [{} for _ in models]
    n = 0
    with driver_line(f"evaluate {split}", shard_set.manifest["splits"][split]["count"]) as update:
        for row in out.iter_rows():
            for k in range(len(models)):
                cms[k] += np.frombuffer(row[f"cm{k}"], dtype=np.int64).reshape(c, c)
                if row[f"overlay{k}"]:
                    overlays[k][str(row["id"])] = row[f"overlay{k}"]
            n += 1
            update(n)
    if n == 0:
        raise DataError(shards, f"split {split!r} holds no images")
    return [(cm, {**segmentation_metrics(cm, classes.names), "images": n}, ov) for cm, ov in zip(cms, overlays)]


METRICS_NOTE = ("(mIoU, F1, Recall, Precision: macro means over classes of per-class values from the summed "
                "confusion matrix; Accuracy: pixel accuracy)")


# What the evaluations sharing one actor pool (run_evaluations) must agree on.
POOL_SETTINGS = ("shards", "split", "overlay_count", "batch_size", "actors", "gpus_per_actor", "cpus_per_actor",
                 "torch_threads", "compile", "ray")


def run_evaluate(cfg: EvaluateConfig, print_table: bool = True) -> dict:
    """Evaluate a checkpoint on a split at full resolution; print the paper-layout tables
    (unless `print_table` is false: the pipeline prints one table for all students), write
    metrics.json, table.md, confusion_matrix.png, overlays/ to `output`; log to MLflow."""
    return run_evaluations([cfg], print_table)[0]


def run_evaluations(cfgs: list[EvaluateConfig], print_table: bool = True) -> list[dict]:
    """Several checkpoints on one split (a pipeline's students), segmented in one actor pool,
    each written and logged as `run_evaluate` does its one; returns their summaries in order.
    The configs must agree on POOL_SETTINGS and the models on their classes (ConfigError)."""
    from dakd.runtime import init_ray

    first = cfgs[0]
    for cfg in cfgs[1:]:
        differ = [k for k in POOL_SETTINGS if getattr(cfg, k) != getattr(first, k)]
        if differ:
            raise ConfigError(f"evaluate {cfg.checkpoint}: evaluations in one pool must share {', '.join(differ)} "
                              f"with {first.checkpoint}")
    prepared = [_prepare(cfg) for cfg in cfgs]  # every model and output checked before any compute
    classes = prepared[0]["classes"]
    for p in prepared[1:]:
        if list(p["classes"].names) != list(classes.names):
            raise ConfigError(f"evaluate {p['prov']['model']}: classes {list(p['classes'].names)}, but "
                              f"{prepared[0]['prov']['model']} has {list(classes.names)}; one pool needs one class table")
    init_ray(first.ray)
    for p in prepared:
        print(f"[evaluate] {p['prov']['model']} on {first.shards} split {first.split!r} at full resolution", flush=True)
    results = evaluate_models([p["model"] for p in prepared], classes, first.shards, first.split,
                              overlay_count=first.overlay_count, batch_size=first.batch_size, actors=first.actors,
                              gpus_per_actor=first.gpus_per_actor, cpus_per_actor=first.cpus_per_actor,
                              torch_threads=first.torch_threads, compile=first.compile)
    return [_finish(cfg, p, *result, print_table=print_table) for cfg, p, result in zip(cfgs, prepared, results)]


def _prepare(cfg: EvaluateConfig) -> dict:
    """The model, its classes and provenance, the table name, the tracking URI; the output checked writable."""
    from dakd import tracking

    model, classes, prov = load_model(cfg.checkpoint, cfg.tracking)
    where = str(prov["model"]).rstrip("/")
    name = cfg.name or (where if where.startswith(("models:/", "runs:/")) else where.split("/")[-2])
    storage.ensure_dir(cfg.output, create_bucket=cfg.create_bucket)
    storage.check_writable(cfg.output)
    uri = tracking.tracking_uri(cfg.tracking, cfg.output)  # before any compute
    return {"model": model, "classes": classes, "prov": prov, "name": name, "tracking_uri": uri}


def _finish(cfg: EvaluateConfig, prepared: dict, cm: np.ndarray, metrics: dict, overlays: dict[str, bytes], *,
            print_table: bool) -> dict:
    """One evaluation's table, files and MLflow run; returns the job summary."""
    from dakd import tracking

    prov, name, classes = prepared["prov"], prepared["name"], prepared["classes"]
    selected_on = prov.get("selected_on")
    if selected_on == cfg.split:
        log.warning("evaluate: %s was selected on split %r, the split it is evaluated on", prov["model"], cfg.split)
    table = evaluation_table(name, metrics, selected_on, cfg.split)
    if print_table:
        print(table, flush=True)
        print(METRICS_NOTE, flush=True)
    report = {"model": prov["model"], "name": name, "shards": cfg.shards, "split": cfg.split, "selected_on": selected_on,
              "classes": list(classes.names),
              "confusion_matrix": cm.tolist(), "confusion_matrix_layout": "cm[target][prediction] pixel counts",
              "averaging": "macro over present classes; accuracy = pixel accuracy", "metrics": metrics,
              "identity": evaluation_identity(cfg, prov.get("weights_sha256"))}
    cm_png = confusion_png(cm, classes.names)
    write_outputs(cfg.output, report, table, cm_png, overlays)
    with tracking.job_run(cfg.tracking, uri=prepared["tracking_uri"], job="evaluate", run_key=f"evaluate:{cfg.output}",
                          run_name=f"evaluate-{name}", params=dump_config(cfg),
                          tags={"dakd.model": str(prov["model"])}) as run:
        log_run(run.logger, report, table, cm_png, overlays)
    return evaluation_summary(cfg.output, report, table, run.run_id)


def evaluation_table(name: str, metrics: dict, selected_on: str | None, split: str) -> str:
    """One evaluation's table (the paper's layout) under the line saying what selected and what reports."""
    protocol = f"Checkpoint selected on split {selected_on!r}, reported on split {split!r} ({metrics['images']} images)."
    if selected_on == split:
        protocol += " WARNING: the same split selected the checkpoint: these figures are optimistic."
    return comparison_table({name: metrics}, protocol=protocol)


def evaluation_summary(output: str, report: dict, table: str, mlflow_run_id: str | None) -> dict:
    """The job summary of the evaluation whose metrics.json is `report`."""
    m = report["metrics"]
    return {"job": "evaluate", "model": report["model"], "name": report["name"], "output": output,
            "split": report["split"], "selected_on": report["selected_on"], "images": m["images"], "miou": m["miou"],
            "f1": m["f1_mean"], "precision": m["precision_mean"], "recall": m["recall_mean"], "accuracy": m["accuracy"],
            "iou": m["iou"], "confusion_matrix": report["confusion_matrix"], "mlflow_run_id": mlflow_run_id,
            "table": table, "metrics": m}


def evaluation_identity(cfg: EvaluateConfig, weights_sha256: dict | None) -> dict:
    """What an evaluation's figures and files depend on: its settings (not where it runs or is
    tracked), the evaluated weights (sha256 per file, from the checkpoint's state.json) and the
    split's shard files (sha256 of their manifest entries: path, bytes, rows)."""
    files = ((read_manifest(cfg.shards) or {}).get("splits", {}).get(cfg.split) or {}).get("files", [])
    return {"settings": {k: v for k, v in dump_config(cfg).items() if k not in ("ray", "tracking")},
            "weights_sha256": weights_sha256,
            "split_files_sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}


def finished_evaluation(cfg: EvaluateConfig) -> dict | None:
    """The summary (with "skipped": True) of the evaluation already in `cfg.output` when its
    identity is this config's, with `cfg.checkpoint` a checkpoint directory; None otherwise
    (none there, another identity, or unreadable): then it has to run."""
    metrics_uri = storage.join_uri(cfg.output, "metrics.json")
    if not storage.exists(metrics_uri):
        return None
    try:
        report = json.loads(storage.read_text(metrics_uri))
        weights = read_state(cfg.checkpoint).get("weights_sha256")
        if not weights or report.get("identity") != evaluation_identity(cfg, weights):
            return None
        table = evaluation_table(report["name"], report["metrics"], report["selected_on"], report["split"])
        return {**evaluation_summary(cfg.output, report, table, None), "skipped": True}
    except (ValueError, KeyError, AttributeError, DakdError) as exc:  # damaged or of an older dakd: run it again
        log.info("evaluate: %s cannot be reused (%s); evaluating again", metrics_uri, exc)
        return None


def listed_outputs(report: dict) -> list[str]:
    """The figure files a metrics.json lists (relative to its folder)."""
    files = report.get("files") or {}
    return [p for p in [files.get("confusion_matrix"), *files.get("overlays", [])] if p]


def write_outputs(output: str, report: dict, table: str, cm_png: bytes, overlays: dict[str, bytes]) -> None:
    """Write the evaluation to `output` as a swap: figures under a fresh generation folder,
    then metrics.json naming them (`report["files"]` is set), then table.md; then the files
    the previous metrics.json listed are removed. A failure before metrics.json removes the
    new generation and leaves the old evaluation as it was."""
    metrics_uri = storage.join_uri(output, "metrics.json")
    old: list[str] = []
    if storage.exists(metrics_uri):
        try:
            old = listed_outputs(json.loads(storage.read_text(metrics_uri)))
        except (ValueError, AttributeError) as exc:  # an unreadable old report: remove nothing
            log.warning("evaluate: %s cannot be read (%s); its files are left in place", metrics_uri, exc)
    gen = new_generation()
    files = {"confusion_matrix": f"{gen}/confusion_matrix.png",
             "overlays": [f"{gen}/overlays/{_safe_name(sid)}.png" for sid in overlays]}
    try:
        storage.write_bytes(storage.join_uri(output, files["confusion_matrix"]), cm_png)
        for rel, data in zip(files["overlays"], overlays.values()):
            storage.write_bytes(storage.join_uri(output, rel), data)
        report["files"] = files
        storage.write_text(metrics_uri, json.dumps(report, indent=2))
    except BaseException:
        discard_generation(storage.join_uri(output, gen))
        raise
    storage.write_text(storage.join_uri(output, "table.md"), table + "\n")
    remove_listed(output, old, keep=set(listed_outputs(report)))


def log_run(logger, report: dict, table: str, cm_png: bytes, overlays: dict[str, bytes]) -> None:
    """The job's MLflow logging: eval/ metrics, metrics.json, the table, the figures (`logger`:
    the job run's tracking.RunLogger, which does nothing when tracking is off)."""
    from PIL import Image

    metrics = report["metrics"]
    flat = {"eval/miou": metrics["miou"], "eval/f1": metrics["f1_mean"], "eval/precision": metrics["precision_mean"],
            "eval/recall": metrics["recall_mean"], "eval/accuracy": metrics["accuracy"]}
    flat.update({f"eval/iou_{k}": v for k, v in metrics["iou"].items() if v == v})
    logger.log_metrics(flat, 0)
    logger.log_dict(report, "evaluation/metrics.json")
    logger.log_text(table, "evaluation/table.md")
    logger.log_image(np.asarray(Image.open(io.BytesIO(cm_png)).convert("RGB")), "evaluation/confusion_matrix.png")
    for sid, data in overlays.items():
        logger.log_image(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), f"evaluation/overlays/{_safe_name(sid)}.png")


def comparison_table(rows: dict[str, dict], training: dict[str, dict] | None = None, protocol: str | None = None) -> str:
    """The paper's two layouts for several evaluations, e.g. {"real-only": m1, "DAKD": m2}
    with m = run_evaluate(...)["metrics"] (or eval.metrics.segmentation_metrics).
    training: {row name: {"steps", "batch_size", "samples_seen", "selected_on", "val_miou"}}
    adds the compute each model was trained with and its score on the split that selected
    it; protocol: a line saying what selected and what reports."""
    parts = [protocol] if protocol else []
    parts += [format_table(rows), format_per_class_table(rows)]
    if training:
        lines = ["| model | optimiser steps | batch | samples seen | selected on | its mIoU there |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {t['steps']} | {t['batch_size']} | {t['samples_seen']} | {t['selected_on']} | "
                  + (f"{100 * t['val_miou']:.2f} |" if t.get("val_miou") is not None else "- |")
                  for name, t in training.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
