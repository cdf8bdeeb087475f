"""`dakd predict`: batch inference over a folder or bucket of images with Ray Data.

Input: every image file under `input` (a path, file:// or s3:// prefix; suffixes as the
folder reader: .png .jpg .jpeg .tif .tiff .bmp; searched recursively), read as 8-bit grey
(data.readers.decode_grey), segmented at full resolution by Ray Data actors.
Output under `output`:
    masks/<generation>/<relative path without suffix>.png
                                               coloured class map (the class table's colours);
                                               when two inputs share that name (scene.jpg and
                                               scene.png), each keeps its suffix: scene.jpg.png
    areas.parquet, areas.csv                   one row per image: id (relative path), mask (its
                                               path under output), height, width,
                                               pixels_<class>, and with pixel_size_m
                                               area_km2_<class> = pixels * pixel_size_m^2 / 1e6
    skipped.json                               with on_error=skip: the inputs that could not be
                                               read, each with its reason
`--overwrite` is a swap: the new masks go under a fresh generation folder beside the old
ones, areas.parquet (one atomic write, the list of masks) then makes them the result, and
only then are the masks the old areas.parquet lists removed. A failed run removes its own
generation; a failed or killed one leaves the old result whole.
The model: a checkpoint directory, a train-saross run directory (its best checkpoint), or
an MLflow model URI `models:/<name>/<version>` (tracking.uri / MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np

from dakd import storage
from dakd.config import PredictConfig
from dakd.data.classes import class_pixel_counts, class_table_from_dict
from dakd.data.folder import IMAGE_SUFFIXES
from dakd.data.shards import discard_generation, new_generation, read_table, remove_listed
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


def _safe_relative(image_id: str) -> str:
    """An id (a path relative to the input, possibly an object key) as a relative path that
    stays under the output: empty, '.' and '..' segments become '_'."""
    return "/".join(p if p not in ("", ".", "..") else "_" for p in str(image_id).split("/"))


def mask_name(image_id: str, keep_suffix: bool = False) -> str:
    """masks/<id without its suffix>.png (with keep_suffix, the suffix stays: masks/<id>.png)."""
    rel = _safe_relative(image_id)
    stem = rel if keep_suffix or "." not in rel.rsplit("/", 1)[-1] else rel.rsplit(".", 1)[0]
    return f"masks/{stem}.png"


def mask_names(ids: list[str]) -> dict[str, str]:
    """{id: mask name}, unique: ids that would share a mask name keep their suffixes."""
    counts: dict[str, int] = {}
    for i in ids:
        counts[mask_name(i).lower()] = counts.get(mask_name(i).lower(), 0) + 1
    names = {i: mask_name(i, keep_suffix=counts[mask_name(i).lower()] > 1) for i in ids}
    if len({n.lower() for n in names.values()}) != len(names):  # e.g. "a.png" beside a folder file "a.png.png"
        names = {i: f"masks/{k:06d}-{_safe_relative(i).replace('/', '_')}.png" for k, i in enumerate(sorted(ids))}
    return names


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

        from dakd.inference import setup_actor

        self.device, self.model = setup_actor(lambda: ray.get(model_ref[0]), gpus, threads, compile=compile)
        self.classes = class_table_from_dict(classes)
        self.output = output

    def __call__(self, batch: dict) -> dict:
        c = self.classes.num_classes
        heights, widths, counts, errors = [], [], [], []
        for uri, mask in zip(batch["uri"], batch["mask"]):
            try:  # a bad input is reported back, never a traceback: the driver fails or skips it
                h, w, n = predict_one(self.model, self.classes, str(uri), storage.join_uri(self.output, str(mask)),
                                      self.device)
                err = ""
            except DataError as exc:
                h, w, n, err = 0, 0, np.zeros(c, np.int64), exc.reason
            heights.append(h)
            widths.append(w)
            counts.append(n)
            errors.append(err)
        return {"id": batch["id"], "uri": batch["uri"], "mask": batch["mask"], "height": np.array(heights),
                "width": np.array(widths), "counts": np.stack(counts), "error": np.array(errors, dtype=object)}


def predict_one(model, classes, uri: str, mask_uri: str, device="cpu") -> tuple[int, int, np.ndarray]:
    """Read one image, segment it (tiled when large), write its coloured mask to `mask_uri`;
    returns (height, width, pixel counts per class). DataError naming the file when it
    cannot be read as an image."""
    from dakd.data.readers import decode_grey
    from dakd.eval.figures import png_bytes
    from dakd.inference import segment

    image = decode_grey(storage.read_bytes(uri), uri)
    pred = segment(model, image, device)
    del image
    c = classes.num_classes
    counts = class_pixel_counts(pred, c)
    storage.write_bytes(mask_uri, png_bytes(classes.colorize(pred)))
    return pred.shape[0], pred.shape[1], counts


def run_predict(cfg: PredictConfig) -> dict:
    """Segment every image under `input`; write masks and per-image class areas; returns the summary."""
    from dakd.checkpoints import load_model
    from dakd.runtime import init_ray

    images = list_images(cfg.input)
    parquet_uri = storage.join_uri(cfg.output, f"{AREAS}.parquet")
    old_masks = listed_masks(parquet_uri)
    if old_masks is not None and not cfg.overwrite:
        raise DataError(cfg.output, "already holds predictions (areas.parquet); pass --overwrite to replace them")
    storage.ensure_dir(cfg.output, create_bucket=cfg.create_bucket)
    storage.check_writable(cfg.output)
    model, classes, prov = load_model(cfg.model, cfg.tracking)
    init_ray(cfg.ray)
    print(f"[predict] {len(images)} image(s) under {cfg.input} with {prov['model']}", flush=True)
    gen = new_generation()
    try:
        rows, skipped = _predict_all(cfg, images, model, classes, gen)
    except BaseException:  # a failed run removes its own masks; the old result stays as it was
        discard_generation(storage.join_uri(cfg.output, "masks", gen))
        raise
    write_areas(cfg.output, rows, skipped)
    remove_listed(cfg.output, old_masks or [], keep={r["mask"] for r in rows})
    totals = {n: int(sum(r[f"pixels_{n}"] for r in rows)) for n in classes.names}
    print(f"[predict] wrote {len(rows)} masks and {parquet_uri}; class pixels: "
          + ", ".join(f"{n} {v}" for n, v in totals.items()), flush=True)
    return {"job": "predict", "model": prov["model"], "images": len(rows), "output": cfg.output,
            "areas": parquet_uri, "class_pixels": totals, "skipped": skipped}


def listed_masks(parquet_uri: str) -> list[str] | None:
    """The mask paths an existing areas.parquet lists (None when there is none). A damaged
    one lists nothing: an overwrite then removes none of the old files."""
    if not storage.exists(parquet_uri):
        return None
    try:
        return [str(m) for m in read_table(parquet_uri, columns=["mask"]).column("mask").to_pylist()]
    except (OSError, DataError) as exc:
        log.warning("predict: %s cannot be read (%s); the masks it lists are left in place", parquet_uri, exc)
        return []


def _predict_all(cfg: PredictConfig, images: list[tuple[str, str]], model, classes, gen: str) -> tuple[list, list]:
    """Run the actor pool over `images`, masks under masks/<gen>/; returns (rows, skipped)."""
    import ray as _ray
    from ray.data import ActorPoolStrategy

    model_ref = [_ray.put(model)]
    names = {i: f"masks/{gen}/{n[len('masks/'):]}" for i, n in mask_names([i for _, i in images]).items()}
    ds = _ray.data.from_items([{"uri": u, "id": i, "mask": names[i]} for u, i in images],
                              override_num_blocks=max(1, min(len(images), 64)))
    out = ds.map_batches(PredictActor, fn_constructor_args=(model_ref, classes.to_dict(), cfg.output, cfg.gpus_per_actor,
                                                            cfg.torch_threads, cfg.compile),
                         compute=ActorPoolStrategy(size=cfg.actors), batch_size=cfg.batch_size, num_gpus=cfg.gpus_per_actor,
                         num_cpus=cfg.cpus_per_actor, batch_format="numpy")
    rows, skipped = [], []
    for row in out.iter_rows():
        if row["error"]:
            if cfg.on_error == "fail":
                raise DataError(str(row["uri"]), f"{row['error']} (use --on-error skip to skip unreadable inputs)")
            skipped.append({"id": str(row["id"]), "path": str(row["uri"]), "reason": str(row["error"])})
            print(f"[predict] skipped {row['uri']}: {row['error']}", flush=True)
            continue
        rows.append({"id": str(row["id"]), "mask": str(row["mask"]), "height": int(row["height"]),
                     "width": int(row["width"]), **area_columns(classes.names, np.asarray(row["counts"]), cfg.pixel_size_m)})
        if len(rows) % 20 == 0:
            print(f"[predict] {len(rows)}/{len(images)} images", flush=True)
    if not rows:
        raise DataError(cfg.input, f"none of the {len(images)} image(s) could be read (first: {skipped[0]['path']}: "
                                   f"{skipped[0]['reason']})")
    rows.sort(key=lambda r: r["id"])
    skipped.sort(key=lambda r: r["id"])
    return rows, skipped


def write_areas(output: str, rows: list[dict], skipped: list[dict]) -> None:
    """areas.parquet and areas.csv (one row per image), skipped.json (emptied when none was skipped)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join_uri(output, f"{AREAS}.parquet"), buf.getvalue())
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    storage.write_bytes(storage.join_uri(output, f"{AREAS}.csv"), buf.getvalue())
    skipped_uri = storage.join_uri(output, "skipped.json")
    if skipped:
        storage.write_text(skipped_uri, json.dumps(skipped, indent=2))
    elif storage.exists(skipped_uri):  # a stale list from an earlier run would mislead
        storage.write_text(skipped_uri, "[]")
