"""Full-resolution segmentation of a validation split: one image per forward (`segment`, as
validation and `evaluate` ran before) against `segment_many`'s batches, side by side in one run.

train-saross validates every epoch on the whole val split (`val_batch_size`), and `evaluate`
segments every test image (`batch_size`): on the `sos-cpu` recipe that is 8 passes over 80-84
images per student. The model is the `sos-cpu` preset's student (float32 in eval mode, as
validation runs it; weights from `--checkpoint` or random: the speed does not depend on them),
the images the first `--images` of a genuine SOS sensor's test folder (256 x 256).

Prints, per batch size, the median seconds per pass (the variants alternate, so a change in
load hits all), the ratio to one image per forward, how many pixels' classes differ from it
(float rounding only: eval-mode layers act per image) and the machine load.

    python benchmarks/validation.py [--root ../shared/data/sos-dev] [--sensor palsar] [--images 84]
        [--batches 1 4 8 16] [--repeats 3] [--threads 2] [--checkpoint URI]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))
DEFAULT_ROOT = os.path.join(HERE, "..", "..", "shared", "data", "sos-dev")


def load_images(root: str, sensor: str, count: int) -> list[np.ndarray]:
    """The first `count` images (sorted by name) of `root`/test/`sensor`/sat as (H, W) uint8."""
    from PIL import Image

    folder = os.path.join(root, "test", sensor, "sat")
    paths = sorted(glob.glob(os.path.join(folder, "*")))[:count]
    if not paths:
        raise SystemExit(f"{folder}: no images (expected the SOS layout test/<sensor>/sat)")
    return [np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in paths]


def build_model(checkpoint: str | None) -> torch.nn.Module:
    from dakd.checkpoints import load_student
    from dakd.config import PipelineConfig, load_config
    from dakd.models.saross import build_student

    if checkpoint:
        return load_student(checkpoint)[0]
    cfg = load_config(PipelineConfig, preset=("sos-cpu", "pipeline"), overrides=["source.root=unused"])
    torch.manual_seed(0)
    return build_student(cfg.saross.model, 2).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT)
    parser.add_argument("--sensor", default="palsar", choices=["palsar", "sentinel"])
    parser.add_argument("--images", type=int, default=84, help="images per pass (sos-cpu's PALSAR val: 84)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16], help="segment_many batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the preset's)")
    parser.add_argument("--checkpoint", default=None, help="a SAROSS-Net checkpoint (default: random weights)")
    args = parser.parse_args(argv)
    from dakd.inference import describe_cpu, segment, segment_many

    torch.set_num_threads(args.threads)
    images = load_images(args.root, args.sensor, args.images)
    model = build_model(args.checkpoint)
    variants = {"one image per forward (segment)": lambda: [segment(model, im) for im in images]}
    variants.update({f"segment_many, batch {b}": (lambda b=b: segment_many(model, images, batch_size=b))
                     for b in args.batches})
    reference = np.stack(variants["one image per forward (segment)"]())
    differing = {name: int((np.stack(run()) != reference).sum()) for name, run in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    print(f"machine: {describe_cpu()}; torch {torch.__version__}, {args.threads} threads; "
          f"{len(images)} images of {images[0].shape[0]}x{images[0].shape[1]} ({args.sensor})")
    print("| variant | s per pass | ratio to one per forward | pixels differing | load |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["one image per forward (segment)"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {t / base:.2f} | {differing[name]} of {reference.size} | "
              f"{os.getloadavg()[0]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
