"""`dakd sample`: N samples from a SAR-JointNet checkpoint to a PNG grid (image | coloured
argmax mask per row), for people who want to look."""

from __future__ import annotations

import time

import torch

from dakd import storage
from dakd.config import SampleConfig
from dakd.data.classes import class_table_from_dict
from dakd.data.transforms import denormalize_image
from dakd.diffusion.samplers import sample
from dakd.seeds import sample_seed
from dakd.checkpoints import load_teacher
from dakd.eval.figures import png_bytes, sample_grid


def run_sample(cfg: SampleConfig) -> dict:
    model, state = load_teacher(cfg.checkpoint, ema=cfg.ema)
    classes = class_table_from_dict(state["classes"])
    size = cfg.size or int(state["arch"]["sample_size"])
    seeds = [sample_seed(cfg.seed, i) for i in range(cfg.count)]
    t0 = time.perf_counter()
    out = sample(model, sampler=cfg.sampler, steps=cfg.steps, b=float(state["b"]), seeds=seeds, height=size,
                 width=size, device=torch.device("cpu"), num_classes=classes.num_classes,
                 num_train_timesteps=int(state["num_train_timesteps"]), label_loss=state["label_loss"])
    grid = sample_grid(denormalize_image(out.images[:, 0]).numpy(), out.masks.numpy(), classes.colorize)
    storage.write_bytes(cfg.output, png_bytes(grid))
    return {"job": "sample", "output": cfg.output, "count": cfg.count, "checkpoint": state["location"],
            "sampler": cfg.sampler, "steps": cfg.steps, "nfe": out.nfe, "seconds": time.perf_counter() - t0}
