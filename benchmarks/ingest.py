"""Ingest throughput: Ray Data (`dakd ingest`) against a plain single-process decode loop
over the same files, printed as ratios measured side by side in one run.

`dakd ingest` runs twice on the same local Ray: first (Ray Data's start-up in a fresh Ray
included, as a laptop run pays it) and again (Ray Data already up, as on a long-running
cluster where each job finds it started); the difference is that start-up.

The plain loop (before Ray starts) and the second ingest run `--repeats` times each and
the medians are compared (a 3,000-image run takes 2-3 s, so one run is at the mercy of the
host's noise).

    python benchmarks/ingest.py [--images 3000] [--size 256] [--rows-per-file 25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def timed_ingest(source: SourceConfig, out: str, rows_per_file: int) -> float:
    """Seconds `run_ingest` takes into `out` on the Ray this process is connected to."""
    cfg = IngestConfig(source=source, output=out, rows_per_file=rows_per_file,
                       ray=RayConfig(local_num_cpus=os.cpu_count() or 2))
    t0 = time.perf_counter()
    run_ingest(cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rows-per-file", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the plain loop and of the second ingest (medians)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        write_folder(src, args.images, args.size)
        source = SourceConfig(kind="folder", root=src)

        plain = []
        for k in range(args.repeats):  # before Ray starts, as a user without Ray runs it
            t0 = time.perf_counter()
            n = plain_loop(source, os.path.join(tmp, f"plain-{k}"), args.rows_per_file)
            plain.append(time.perf_counter() - t0)
        load_plain = os.getloadavg()[0]

        from dakd.runtime import init_ray

        ray = init_ray(RayConfig(local_num_cpus=os.cpu_count() or 2))  # Ray's own start-up is not measured
        ray.data.DataContext.get_current().enable_progress_bars = False
        first_s = timed_ingest(source, os.path.join(tmp, "ray-first"), args.rows_per_file)
        load_first = os.getloadavg()[0]
        again = [timed_ingest(source, os.path.join(tmp, f"ray-again-{k}"), args.rows_per_file) for k in range(args.repeats)]
        load_again = os.getloadavg()[0]
        ray.shutdown()
    plain_s, again_s = statistics.median(plain), statistics.median(again)

    from dakd.inference import describe_cpu

    print(f"images: {n} of {args.size}x{args.size}, {args.rows_per_file} per file; machine: {describe_cpu()}")
    print(f"plain single-process loop        : {n / plain_s:8.1f} images/s (median of {args.repeats}; load {load_plain:.1f})")
    print(f"dakd ingest, first in this Ray   : {n / first_s:8.1f} images/s (load {load_first:.1f})")
    print(f"dakd ingest, again (Ray Data up) : {n / again_s:8.1f} images/s (median of {args.repeats}; load {load_again:.1f})")
    print(f"ratio first / plain              : {plain_s / first_s:8.2f}x")
    print(f"ratio again / plain              : {plain_s / again_s:8.2f}x")
    print(f"Ray Data's first-use start-up    : {first_s - again_s:8.1f} s (the first run's extra time)")


if __name__ == "__main__":
    main()
