"""`dakd evaluate`: a SAROSS-Net on a shard set's split at full resolution.

Every image is segmented whole (SAROSS-Net pads to a multiple of 32 and crops back, so
OSD's 650x1250 needs no tiling) by Ray Data actors; each returns the image's confusion
matrix; the driver sums them over the split and computes the metrics once (eval.metrics:
data-set-level, not means of per-image scores). Averaging, exactly: per-class IoU, F1,
precision and recall from the summed confusion matrix; mIoU, F1, precision and recall
in the table are *macro* means over the classes present in the target or prediction;
accuracy is pixel accuracy, trace / total.

Outputs under `output`: metrics.json (confusion matrix, per-class and mean values),
table.md (the paper's layouts), confusion_matrix.png, overlays/<id>.png ([image |
prediction | ground truth] for the first `overlay_count` images); the same logged to MLflow.

Shared helpers: `segment` (one full-resolution image -> class map), `overlay_panel`,
`load_model` (a checkpoint / run directory, or an MLflow `models:/` URI).
"""

from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import torch

from dakd import storage
from dakd.config import EvaluateConfig, TrackingConfig, dump_config
from dakd.data.classes import ClassTable, class_table_from_dict
from dakd.data.shards import open_shard_set
from dakd.data.transforms import normalize_image
from dakd.errors import ConfigError, DataError
from dakd.eval.metrics import confusion_matrix, format_per_class_table, format_table, segmentation_metrics
from dakd.inference import autocast, inference_device, prepare_model

log = logging.getLogger(__name__)


@torch.no_grad()
def segment_logits(model: torch.nn.Module, image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) uint8 grey image -> (C, H, W) float32 logits on CPU, at full resolution."""
    device = torch.device(device)
    x = normalize_image(torch.from_numpy(np.array(image, dtype=np.uint8)))[None, None].to(device)
    with autocast(device):
        logits = model(x)
    return logits[0].float().cpu()


# Scenes larger than TILE pixels on a side (OSD 650x1250 stays whole) are segmented in
# overlapping TILE x TILE tiles:
# memory is then set by the tile, not the scene (a 6000x6000 scene in well under 2 GB).
TILE = 2048
TILE_OVERLAP = 128


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """[(origin, keep_start, keep_stop)] along one axis of length `size`: tiles of `tile`
    pixels whose kept interiors (each tile's margins of `overlap` pixels dropped, except at
    the scene's edges) cover 0..size exactly once."""
    if size <= tile:
        return [(0, 0, size)]
    stride = tile - 2 * overlap
    spans, covered = [], 0
    for start in range(0, size, stride):
        origin = min(start, size - tile)
        stop = size if origin + tile >= size else origin + tile - overlap
        spans.append((origin, covered, stop))
        covered = stop
        if stop >= size:
            break
    return spans


def segment(model: torch.nn.Module, image: np.ndarray, device: torch.device | str = "cpu",
            tile: int = TILE, overlap: int = TILE_OVERLAP) -> np.ndarray:
    """(H, W) uint8 grey image -> (H, W) uint8 class map (argmax of the logits). Whole when
    both sides are <= tile; otherwise tile by tile (see tile_spans), so peak memory does
    not grow with the scene beyond the (H, W) image and class map themselves."""
    h, w = image.shape
    if h <= tile and w <= tile:
        return segment_logits(model, image, device).argmax(dim=0).to(torch.uint8).numpy()
    out = np.empty((h, w), dtype=np.uint8)
    for y0, ya, yb in tile_spans(h, tile, overlap):
        for x0, xa, xb in tile_spans(w, tile, overlap):
            part = image[y0 : y0 + min(tile, h), x0 : x0 + min(tile, w)]
            pred = segment_logits(model, part, device).argmax(dim=0).to(torch.uint8).numpy()
            out[ya:yb, xa:xb] = pred[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return out


# Vivid colours for classes whose own colour is grey/white/black (e.g. SOS oil = white), which
# would vanish on grey speckle: magenta, yellow, orange, lime, cyan.
VIVID = ((255, 0, 255), (255, 230, 0), (255, 128, 0), (0, 255, 64), (0, 230, 255))
TITLE_HEIGHT = 20  # px: the title strip above each overlay panel
MIN_PANEL = 128  # px: smaller images are enlarged (nearest neighbour) so titles and classes stay readable


def display_colors(colors, num_classes: int) -> np.ndarray:
    """(C, 3) uint8 overlay colours: the class table's, except low-saturation ones (grey,
    white, black: invisible on speckle), which take a vivid colour. Class 0 is never drawn."""
    cols = np.asarray(colors if colors is not None else [(0, 0, 0)] * num_classes, dtype=np.int32).reshape(-1, 3)
    out = cols.copy()
    k = 0
    for c in range(1, len(cols)):
        if cols[c].max() - cols[c].min() < 80:
            out[c] = VIVID[k % len(VIVID)]
            k += 1
    return out.astype(np.uint8)


def _blend(grey: np.ndarray, mask: np.ndarray, colors: np.ndarray, alpha: float = 0.65) -> np.ndarray:
    base = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    col = colors[np.minimum(mask, len(colors) - 1)].astype(np.float32)
    out = np.where((mask > 0)[..., None], (1 - alpha) * base + alpha * col, base)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (TITLE_HEIGHT + H, W, 3): a white strip with `title` above the panel."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (panel.shape[1], TITLE_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 4), title, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), panel], axis=0)


def overlay_panel(image: np.ndarray, pred: np.ndarray, classes: ClassTable, target: np.ndarray | None = None) -> np.ndarray:
    """Titled panels [image | ground truth over image | prediction over image] (the ground
    truth only when `target` is given) -> (TITLE_HEIGHT + s*H, k*s*W, 3) uint8, s = the
    enlargement of images narrower than MIN_PANEL. Class 0 (background) is left uncoloured;
    others blend 65 % of their display colour (display_colors)."""
    colors = display_colors(classes.colors, classes.num_classes)
    s = max(1, -(-MIN_PANEL // image.shape[1]))
    up = (lambda a: np.repeat(np.repeat(a, s, axis=0), s, axis=1)) if s > 1 else (lambda a: a)
    image, pred = up(image), up(pred)
    parts = [_titled(np.repeat(image[..., None], 3, axis=-1), "image")]
    if target is not None:
        parts.append(_titled(_blend(image, up(target), colors), "ground truth"))
    parts.append(_titled(_blend(image, pred, colors), "prediction"))
    return np.concatenate(parts, axis=1)


def confusion_png(cm: np.ndarray, names) -> bytes:
    """A confusion-matrix figure (rows: target, columns: prediction; colour: row share; cells: counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.int64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.2 * n + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for t in range(n):
        for p in range(n):
            ax.text(p, t, f"{cm[t, p]}\n{100 * share[t, p]:.1f}%", ha="center", va="center", fontsize=8,
                    color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=30)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("target")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def load_model(uri: str, tracking: TrackingConfig | None = None) -> tuple[torch.nn.Module, ClassTable, dict]:
    """A SAROSS-Net (eval mode, CPU) + class table + provenance from a checkpoint directory,
    a train-saross run directory (its best checkpoint), or an MLflow `models:/<name>/<version>` URI.
    An MLflow model is loaded from the safetensors checkpoint logged beside it, never unpickled."""
    from dakd.train.saross import load_student

    if str(uri).startswith("models:/") or str(uri).startswith("runs:/"):
        import mlflow

        if tracking is not None:
            from dakd import tracking as trk

            mlflow.set_tracking_uri(tracking.uri or trk.resolve_tracking_uri(None, "."))
        try:
            meta = mlflow.models.get_model_info(uri).metadata or {}
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
            raise ConfigError(f"model {uri}: cannot be loaded from MLflow ({type(exc).__name__}: {str(exc)[:300]})") from exc
        if "dakd_checkpoint_artifacts" not in meta:
            raise ConfigError(f"model {uri}: not a dakd SAROSS-Net model (no dakd_checkpoint_artifacts in its metadata)")
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=meta["dakd_checkpoint_artifacts"])
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"model {uri}: its checkpoint {meta['dakd_checkpoint_artifacts']} cannot be downloaded "
                              f"({type(exc).__name__}: {str(exc)[:300]})") from exc
        model, state = load_student(local)
        return model, class_table_from_dict(state["classes"]), {"model": uri, "arch": state["arch"],
                                                                "selected_on": state.get("val", {}).get("split")}

    model, state = load_student(uri)
    return model, class_table_from_dict(state["classes"]), {"model": state["location"], "arch": state["arch"],
                                                            "epoch": state.get("epoch"),
                                                            "selected_on": state.get("val", {}).get("split")}


class EvaluateActor:
    """Ray Data actor: shard rows -> per-image confusion matrix (+ overlay PNG for chosen ids)."""

    def __init__(self, model_ref, num_classes: int, classes: dict, overlay_ids: list[str], gpus: float, threads: int,
                 compile: bool = False):
        import ray

        torch.set_num_threads(threads)
        self.device = inference_device(gpus)
        self.model = prepare_model(ray.get(model_ref[0]), self.device, compile=compile)
        self.c = num_classes
        self.classes = class_table_from_dict(classes)
        self.overlay_ids = set(overlay_ids)

    def __call__(self, batch: dict) -> dict:
        from dakd.tracking import png_bytes

        cms, overlays = [], []
        for sid, h, w, img, msk in zip(batch["id"], batch["height"], batch["width"], batch["image"], batch["mask"]):
            image = np.frombuffer(img, dtype=np.uint8).reshape(int(h), int(w))
            mask = np.frombuffer(msk, dtype=np.uint8).reshape(int(h), int(w))
            pred = segment(self.model, image, self.device)
            cms.append(confusion_matrix(pred, mask, self.c).astype(np.int64).tobytes())
            overlays.append(png_bytes(overlay_panel(image, pred, self.classes, mask)) if str(sid) in self.overlay_ids else b"")
        return {"id": batch["id"], "cm": np.array(cms, dtype=object), "overlay": np.array(overlays, dtype=object)}


def _safe_name(sid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(sid))


def evaluate_model(model: torch.nn.Module, classes: ClassTable, shards: str, split: str, *, overlay_count: int = 0,
                   batch_size: int = 1, actors: int = 1, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                   torch_threads: int = 1, compile: bool = False) -> tuple[np.ndarray, dict, dict[str, bytes]]:
    """Segment every image of `split` with Ray Data actors (set up by `dakd.inference`); returns (summed confusion matrix
    (C, C) int64, metrics of eval.metrics, {id: overlay PNG bytes})."""
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
                               columns=["id", "height", "width", "image", "mask"])
    model_ref = [ray.put(model)]  # wrapped in a list so Ray passes the reference, not the object
    out = ds.map_batches(EvaluateActor, fn_constructor_args=(model_ref, classes.num_classes, classes.to_dict(), ids,
                                                              gpus_per_actor, torch_threads, compile),
                         compute=ActorPoolStrategy(size=actors), batch_size=batch_size, num_gpus=gpus_per_actor,
                         num_cpus=cpus_per_actor, batch_format="numpy")
    c = classes.num_classes
    cm = np.zeros((c, c), dtype=np.int64)
    overlays: dict[str, bytes] = {}
    n = 0
    for row in out.iter_rows():
        cm += np.frombuffer(row["cm"], dtype=np.int64).reshape(c, c)
        if row["overlay"]:
            overlays[str(row["id"])] = row["overlay"]
        n += 1
        if n % 20 == 0:
            print(f"[evaluate] {n} images", flush=True)
    if n == 0:
        raise DataError(shards, f"split {split!r} holds no images")
    metrics = segmentation_metrics(cm, classes.names)
    metrics["images"] = n
    return cm, metrics, overlays


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate a checkpoint on a split at full resolution; print the paper-layout tables,
    write metrics.json, table.md, confusion_matrix.png, overlays/ to `output`; log to MLflow."""
    from dakd import tracking
    from dakd.runtime import init_ray

    model, classes, prov = load_model(cfg.checkpoint, cfg.tracking)
    where = str(prov["model"]).rstrip("/")
    name = cfg.name or (where if where.startswith(("models:/", "runs:/")) else where.split("/")[-2])
    storage.ensure_dir(cfg.output, create_bucket=cfg.create_bucket)
    storage.check_writable(cfg.output)
    uri = tracking.tracking_uri(cfg.tracking, cfg.output)  # before any compute
    init_ray(cfg.ray)
    print(f"[evaluate] {prov['model']} on {cfg.shards} split {cfg.split!r} at full resolution", flush=True)
    cm, metrics, overlays = evaluate_model(model, classes, cfg.shards, cfg.split, overlay_count=cfg.overlay_count,
                                           batch_size=cfg.batch_size, actors=cfg.actors, gpus_per_actor=cfg.gpus_per_actor,
                                           cpus_per_actor=cfg.cpus_per_actor, torch_threads=cfg.torch_threads,
                                           compile=cfg.compile)
    selected_on = prov.get("selected_on")
    protocol = f"Checkpoint selected on split {selected_on!r}, reported on split {cfg.split!r} ({metrics['images']} images)."
    if selected_on == cfg.split:
        protocol += " WARNING: the same split selected the checkpoint: these figures are optimistic."
        log.warning("evaluate: %s was selected on split %r, the split it is evaluated on", prov["model"], cfg.split)
    table = comparison_table({name: metrics}, protocol=protocol)
    print(table, flush=True)
    print("(mIoU, F1, Recall, Precision: macro means over classes of per-class values from the summed "
          "confusion matrix; Accuracy: pixel accuracy)", flush=True)
    report = {"model": prov["model"], "name": name, "shards": cfg.shards, "split": cfg.split, "selected_on": selected_on,
              "classes": list(classes.names),
              "confusion_matrix": cm.tolist(), "confusion_matrix_layout": "cm[target][prediction] pixel counts",
              "averaging": "macro over present classes; accuracy = pixel accuracy", "metrics": metrics}
    storage.write_text(storage.join_uri(cfg.output, "metrics.json"), json.dumps(report, indent=2))
    storage.write_text(storage.join_uri(cfg.output, "table.md"), table + "\n")
    cm_png = confusion_png(cm, classes.names)
    storage.write_bytes(storage.join_uri(cfg.output, "confusion_matrix.png"), cm_png)
    for sid, data in overlays.items():
        storage.write_bytes(storage.join_uri(cfg.output, "overlays", f"{_safe_name(sid)}.png"), data)
    with tracking.job_run(cfg.tracking, uri=uri, job="evaluate", run_key=f"evaluate:{cfg.output}",
                          run_name=f"evaluate-{name}", params=dump_config(cfg),
                          tags={"dakd.model": str(prov["model"])}) as run:
        logger = run.logger  # does nothing when tracking is off
        flat = {"test/miou": metrics["miou"], "test/f1": metrics["f1_mean"], "test/precision": metrics["precision_mean"],
                "test/recall": metrics["recall_mean"], "test/accuracy": metrics["accuracy"]}
        flat.update({f"test/iou_{k}": v for k, v in metrics["iou"].items() if v == v})
        logger.log_metrics(flat, 0)
        logger.log_dict(report, "evaluation/metrics.json")
        logger.log_text(table, "evaluation/table.md")
        from PIL import Image

        logger.log_image(np.asarray(Image.open(io.BytesIO(cm_png)).convert("RGB")), "evaluation/confusion_matrix.png")
        for sid, data in overlays.items():
            logger.log_image(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), f"evaluation/overlays/{_safe_name(sid)}.png")
    return {"job": "evaluate", "model": prov["model"], "name": name, "output": cfg.output, "split": cfg.split,
            "selected_on": selected_on,
            "images": metrics["images"], "miou": metrics["miou"], "f1": metrics["f1_mean"], "precision": metrics["precision_mean"],
            "recall": metrics["recall_mean"], "accuracy": metrics["accuracy"], "iou": metrics["iou"],
            "confusion_matrix": cm.tolist(), "mlflow_run_id": run.run_id, "table": table, "metrics": metrics}


def comparison_table(rows: dict[str, dict], training: dict[str, dict] | None = None, protocol: str | None = None) -> str:
    """The paper's two layouts for several evaluations, e.g. {"real-only": m1, "DAKD": m2}
    with m = run_evaluate(...)["metrics"] (or eval.metrics.segmentation_metrics).
    training: {row name: {"steps", "batch_size", "samples_seen", "selected_on"}} adds the
    compute each model was trained with; protocol: a line saying what selected and what reports."""
    parts = [protocol] if protocol else []
    parts += [format_table(rows), format_per_class_table(rows)]
    if training:
        lines = ["| model | optimiser steps | batch | samples seen | selected on |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {t['steps']} | {t['batch_size']} | {t['samples_seen']} | {t['selected_on']} |"
                  for name, t in training.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
