"""Ingest throughput: Ray Data (`dakd ingest`) against a plain single-process decode loop
over the same files, printed as a ratio measured side by side in one run.

    python benchmarks/ingest.py [--images 400] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from dakd.config import IngestConfig, RayConfig, SourceConfig  # noqa: E402
from dakd.data import shards  # noqa: E402
from dakd.data.ingest import run_ingest  # noqa: E402
from dakd.data.procedural import ProceduralReader  # noqa: E402
from dakd.data.sources import make_reader  # noqa: E402


def write_folder(root: str, n: int, size: int) -> None:
    """A folder source of n JPEG images + index PNG masks made from procedural scenes."""
    gen = ProceduralReader(splits={"train": n}, height=size, width=size, seed=0, looks=4)
    refs, _ = gen.list_pairs()
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "masks"))
    for i, ref in enumerate(refs):
        rec = gen.read(ref)
        Image.fromarray(rec["image"]).save(os.path.join(root, "images", f"{i:05d}.jpg"), quality=95)
        Image.fromarray(rec["mask"]).save(os.path.join(root, "masks", f"{i:05d}.png"))


def plain_loop(source: SourceConfig, out: str, rows_per_file: int) -> int:
    """Decode, validate and encode every pair in this process (the baseline)."""
    reader = make_reader(source)
    refs, _ = reader.list_pairs()
    for start in range(0, len(refs), rows_per_file):
        records = [reader.read(r) for r in refs[start : start + rows_per_file]]
        shards.write_table(os.path.join(out, f"part-{start:06d}.parquet"), shards.records_to_table(records))
    return len(refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rows-per-file", type=int, default=25)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        write_folder(src, args.images, args.size)
        source = SourceConfig(kind="folder", root=src)

        t0 = time.perf_counter()
        n = plain_loop(source, os.path.join(tmp, "plain"), args.rows_per_file)
        plain_s = time.perf_counter() - t0

        cfg = IngestConfig(source=source, output=os.path.join(tmp, "ray"), rows_per_file=args.rows_per_file,
                           ray=RayConfig(local_num_cpus=os.cpu_count() or 2))
        import ray

        from dakd.runtime import init_ray

        init_ray(cfg.ray)  # start-up is not part of the measurement
        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.perf_counter()
        run_ingest(cfg)
        ray_s = time.perf_counter() - t0
        ray.shutdown()

    print(f"images: {n} of {args.size}x{args.size}, cores: {os.cpu_count()}")
    print(f"plain single-process loop : {n / plain_s:8.1f} images/s")
    print(f"dakd ingest (Ray Data)    : {n / ray_s:8.1f} images/s")
    print(f"ratio Ray Data / plain    : {plain_s / ray_s:8.2f}x")


if __name__ == "__main__":
    main()
