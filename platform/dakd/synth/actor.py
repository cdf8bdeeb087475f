"""The synthesis actor (Ray Data, one per GPU share): loads the teacher once, samples each
range of ids it is handed in fixed batches, and writes the range as one Parquet object.
"""

from __future__ import annotations

import json
import time

import numpy as np

from dakd import __version__, storage
from dakd.data import shards
from dakd.data.classes import class_pixel_counts
from dakd.data.transforms import denormalize_image
from dakd.seeds import sample_seed
from dakd.synth.plan import FOOTER_KEY


def batches(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """The network batches that cover ids [start, stop): [(m*B, (m+1)*B)] for every m with
    an id in the range. Batch m is always the same B ids (ids outside the range are
    generated and dropped), so sample i depends only on (seed, i, B) and the hardware, not
    on the count, rows_per_file or the range it falls in."""
    return [(m * batch_size, (m + 1) * batch_size) for m in range(start // batch_size, (stop - 1) // batch_size + 1)]


def generate(model, identity: dict, ids: list[int], device, after_batch=None) -> dict:
    """Samples of the contiguous `ids` -> {"image" (n, H, W) uint8, "mask" (n, H, W) uint8,
    "logits" (n, C, H, W) float32, "seed" [n], "nfe" per sample}, in the fixed batches of
    `batches(ids[0], ids[-1] + 1, identity["batch_size"])` (exact: batches of one).
    after_batch(samples done): called after each batch (dakd.drills hooks a drill in there)."""
    from dakd.diffusion.samplers import sample

    start, stop = ids[0], ids[-1] + 1
    if list(ids) != list(range(start, stop)):
        raise ValueError("generate: ids must be contiguous")
    step = 1 if identity["exact"] else int(identity["batch_size"])
    images, masks, logits, nfe, done = [], [], [], 0, 0
    for lo, hi in batches(start, stop, step):
        out = sample(model, sampler=identity["sampler"], steps=identity["steps"], b=identity["b"],
                     seeds=[sample_seed(identity["seed"], i) for i in range(lo, hi)], height=identity["size"],
                     width=identity["size"], device=device, num_classes=identity["num_classes"],
                     num_train_timesteps=identity["num_train_timesteps"], label_loss=identity["label_loss"],
                     precision=identity.get("precision", "auto"))
        keep = slice(max(start, lo) - lo, min(stop, hi) - lo)
        images.append(denormalize_image(out.images[keep, 0]).cpu().numpy())
        masks.append(out.masks[keep].cpu().numpy())
        logits.append(out.logits[keep].cpu().numpy())
        nfe = out.nfe
        done += keep.stop - keep.start
        if after_batch is not None:
            after_batch(done)
    return {"image": np.concatenate(images), "mask": np.concatenate(masks), "logits": np.concatenate(logits),
            "seed": [sample_seed(identity["seed"], i) for i in ids], "nfe": nfe}


def range_table(ids: list[int], gen: dict, identity: dict, teacher_location: str, footer: dict):
    """Generated samples of one range -> a SYNTH_SCHEMA table with the footer metadata."""
    size = identity["size"]
    records = [{
        "id": str(i), "split": shards.SYNTHETIC_SPLIT, "source": "synthetic", "sensor": None, "height": size, "width": size,
        "image": gen["image"][n], "mask": gen["mask"][n], "off_palette_pixels": 0, "index": i,
        "seed": gen["seed"][n], "logits": gen["logits"][n].astype(np.float16), "num_classes": identity["num_classes"],
        "teacher_checkpoint": teacher_location, "teacher_hash": identity["teacher_hash"], "b": identity["b"],
        "sampler": identity["sampler"], "steps": identity["steps"], "code_version": __version__,
    } for n, i in enumerate(ids)]
    table = shards.records_to_table(records, shards.SYNTH_SCHEMA)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), FOOTER_KEY: json.dumps(footer).encode()})


class SynthActor:
    """Ray Data actor: loads the teacher once, then writes each range it is handed.

    Input batch: {"k", "start", "stop"} arrays (one row per range); output: {"k", "stats"
    (JSON: path, rows, bytes, class_pixels, seconds, nfe)}."""

    def __init__(self, job: dict):
        import torch

        from dakd.checkpoints import load_teacher
        from dakd.inference import describe_device, precision_name, setup_actor

        self.job = job

        def teacher():
            return load_teacher(job["teacher_location"], ema=job["identity"]["weights"] == "ema")[0]

        self.device, self.model = setup_actor(teacher, job["gpus_per_actor"], job["torch_threads"],
                                              compile=job.get("compile", False))
        # provenance: a re-run of a range writes the same samples on the same hardware
        precision = precision_name(self.device, job["identity"].get("precision", "auto"))
        self.hardware = {"device": describe_device(self.device), "precision": precision,
                         "torch": torch.__version__, "torch_threads": int(job["torch_threads"])}

    def sample(self, k: int, ids: list[int], after_batch=None) -> dict:
        """The generated samples of range k (see generate)."""
        return generate(self.model, self.job["identity"], ids, self.device, after_batch)

    def write_range(self, k: int, start: int, stop: int) -> dict:
        """Sample ids [start, stop) and write them as range k's object; returns its stats."""
        job, identity = self.job, self.job["identity"]
        t0, started_at = time.perf_counter(), time.time()
        ids = list(range(start, stop))
        gen = self.sample(k, ids)
        nc = identity["num_classes"]
        class_pixels = class_pixel_counts(gen["mask"], nc).tolist()
        seconds = time.perf_counter() - t0
        footer = {"range": k, "start": start, "stop": stop, "identity": identity, "class_pixels": class_pixels,
                  "seconds": seconds, "nfe_per_sample": gen["nfe"], "code_version": __version__,
                  "hardware": self.hardware}
        name = shards.shard_name(shards.SYNTHETIC_SPLIT, k, job["generation"])
        size = shards.write_table(storage.join_uri(job["output"], name),
                                  range_table(ids, gen, identity, job["teacher_location"], footer))
        return {"path": name, "rows": len(ids), "bytes": size, "started_at": started_at,
                "finished_at": time.time(), **footer}

    def __call__(self, batch: dict) -> dict:
        out_k, out_stats = [], []
        for k, start, stop in zip(batch["k"], batch["start"], batch["stop"]):
            out_stats.append(json.dumps(self.write_range(int(k), int(start), int(stop))))
            out_k.append(int(k))
        return {"k": np.asarray(out_k, dtype=np.int64), "stats": np.asarray(out_stats, dtype=object)}
