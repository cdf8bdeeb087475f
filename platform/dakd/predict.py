"""`dakd predict`: batch inference over a folder or bucket of images with Ray Data.

Input: every image file under `input` (a path, file:// or s3:// prefix; suffixes as the
folder reader: .png .jpg .jpeg .tif .tiff .bmp; searched recursively), read as 8-bit grey
(data.readers.decode_grey), segmented at full resolution by Ray Data actors.
Output under `output`:
    masks/<relative path without suffix>.png   coloured class map (the class table's colours)
    areas.parquet, areas.csv                   one row per image: id (relative path), height,
                                               width, pixels_<class>, and with pixel_size_m
                                               area_km2_<class> = pixels * pixel_size_m^2 / 1e6
The model: a checkpoint directory, a train-saross run directory (its best checkpoint), or
an MLflow model URI `models:/<name>/<version>` (tracking.uri / MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import io
import logging

import numpy as np

from dakd import storage
from dakd.config import PredictConfig
from dakd.data.classes import class_table_from_dict
from dakd.data.folder import IMAGE_SUFFIXES
from dakd.errors import DataError

log = logging.getLogger(__name__)

AREAS = "areas"


def list_images(root: str) -> list[tuple[str, str]]:
    """[(uri, id)] of the image files under `root`, id = path relative to root (sorted)."""
    if not storage.exists(root):
        raise DataError(root, "input folder or prefix not found")
    base = storage.resolve(root)
    prefix = base.path.rstrip("/") + "/"
    found = []
    for uri in storage.list_files(root):
        if uri.lower().endswith(IMAGE_SUFFIXES):
            path = storage.resolve(uri).path
            found.append((uri, path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]))
    if not found:
        raise DataError(root, f"no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return found


def mask_name(image_id: str) -> str:
    stem = image_id.rsplit(".", 1)[0] if "." in image_id.rsplit("/", 1)[-1] else image_id
    return f"masks/{stem}.png"


def area_columns(names, counts: np.ndarray, pixel_size_m: float | None) -> dict:
    """{pixels_<class>: count, area_km2_<class>: km² (when pixel_size_m)} for one image."""
    out = {f"pixels_{n}": int(v) for n, v in zip(names, counts)}
    if pixel_size_m is not None:
        out.update({f"area_km2_{n}": float(v) * pixel_size_m * pixel_size_m / 1e6 for n, v in zip(names, counts)})
    return out


class PredictActor:
    """Ray Data actor: image URIs -> coloured mask PNGs written to `output`, class pixel counts."""

    def __init__(self, model_ref, classes: dict, output: str, gpus: float, threads: int, compile: bool = False):
        import ray
        import torch

        from dakd.inference import inference_device, prepare_model

        torch.set_num_threads(threads)
        self.device = inference_device(gpus)
        self.model = prepare_model(ray.get(model_ref[0]), self.device, compile=compile)
        self.classes = class_table_from_dict(classes)
        self.output = output

    def __call__(self, batch: dict) -> dict:
        from dakd.data.readers import decode_grey
        from dakd.eval.evaluate import segment
        from dakd.tracking import png_bytes

        c = self.classes.num_classes
        heights, widths, counts = [], [], []
        for uri, image_id in zip(batch["uri"], batch["id"]):
            image = decode_grey(storage.read_bytes(str(uri)), str(uri))
            pred = segment(self.model, image, self.device)
            storage.write_bytes(storage.join_uri(self.output, mask_name(str(image_id))), png_bytes(self.classes.colorize(pred)))
            heights.append(image.shape[0])
            widths.append(image.shape[1])
            counts.append(np.bincount(pred.ravel(), minlength=c)[:c].astype(np.int64))
        return {"id": batch["id"], "uri": batch["uri"], "height": np.array(heights), "width": np.array(widths),
                "counts": np.stack(counts)}


def run_predict(cfg: PredictConfig) -> dict:
    """Segment every image under `input`; write masks and per-image class areas; returns the summary."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    import ray as _ray
    from ray.data import ActorPoolStrategy

    from dakd.eval.evaluate import load_model
    from dakd.runtime import init_ray

    images = list_images(cfg.input)
    parquet_uri = storage.join_uri(cfg.output, f"{AREAS}.parquet")
    if storage.exists(parquet_uri) and not cfg.overwrite:
        raise DataError(cfg.output, "already holds predictions (areas.parquet); pass --overwrite to replace them")
    storage.ensure_dir(cfg.output)
    storage.check_writable(cfg.output)
    model, classes, prov = load_model(cfg.model, cfg.tracking)
    init_ray(cfg.ray)
    print(f"[predict] {len(images)} image(s) under {cfg.input} with {prov['model']}", flush=True)
    model_ref = [_ray.put(model)]
    ds = _ray.data.from_items([{"uri": u, "id": i} for u, i in images], override_num_blocks=max(1, min(len(images), 64)))
    out = ds.map_batches(PredictActor, fn_constructor_args=(model_ref, classes.to_dict(), cfg.output, cfg.gpus_per_actor,
                                                            cfg.torch_threads, cfg.compile),
                         compute=ActorPoolStrategy(size=cfg.actors), batch_size=cfg.batch_size, num_gpus=cfg.gpus_per_actor,
                         num_cpus=cfg.cpus_per_actor, batch_format="numpy")
    rows = []
    for row in out.iter_rows():
        rows.append({"id": str(row["id"]), "mask": mask_name(str(row["id"])), "height": int(row["height"]),
                     "width": int(row["width"]), **area_columns(classes.names, np.asarray(row["counts"]), cfg.pixel_size_m)})
        if len(rows) % 20 == 0:
            print(f"[predict] {len(rows)}/{len(images)} images", flush=True)
    rows.sort(key=lambda r: r["id"])
    table = pa.Table.from_pylist(rows)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(parquet_uri, buf.getvalue())
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    storage.write_bytes(storage.join_uri(cfg.output, f"{AREAS}.csv"), buf.getvalue())
    totals = {n: int(sum(r[f"pixels_{n}"] for r in rows)) for n in classes.names}
    print(f"[predict] wrote {len(rows)} masks and {parquet_uri}; class pixels: "
          + ", ".join(f"{n} {v}" for n, v in totals.items()), flush=True)
    return {"job": "predict", "model": prov["model"], "images": len(rows), "output": cfg.output,
            "areas": parquet_uri, "class_pixels": totals}
