"""`dakd synthesize`: (image, logits) pairs of a SAR-JointNet teacher across Ray Data actors
into a synthetic shard set, exactly once and resumable.

Layout. Sample ids 0..N-1 are cut into ranges of R = rows_per_file ids: range k holds ids
[k*R, min((k+1)*R, N)) and is the one object ``data/<generation>/train/part-<k>.parquet``
(SYNTH_SCHEMA); the generation is a hash of the set's identity (synth.plan).
The Ray Dataset has one row per range still to write; a pool of actors
(``ActorPoolStrategy(min_size, max_size)``, ``num_gpus`` per actor, a fixed number of torch
threads) loads the teacher once per actor and writes each range it is handed in one atomic
object write (a local temp file + rename, an S3 PUT). Two calls never get the same range,
so two actors never write the same object; a retried call (actor died, Ray restarted it)
rewrites its range with identical content.

Exactly once. Sample i's seed is ``sample_seed(seed, i)``. By default the teacher runs on
fixed batches of ``batch_size`` ids (batch m = ids [m*B, (m+1)*B), whatever the count or
range; see `batches`), and ``batch_size`` is part of the identity, so a stored sample
(uint8 image, uint8 mask, float16 logits) comes out bit-identical whatever N, actor or
retry produced it on the same hardware (device, precision, torch version and threads are
recorded in each footer). With ``exact`` the teacher runs one sample at a time: then a
sample does not depend on the batch size either (slower; for cross-batch-size checks). Each object's
Parquet footer records its range, the provenance identity and its class pixel counts. A
re-run lists the output, keeps every range whose object has the expected row count and the
same identity, and writes only the others; the manifest (kind "synthetic") is written last.
Growing N rewrites the last, partial range of the smaller run in full (its old ids come out
identical, the new ids are appended) and writes the new ranges; nothing else is touched.
While it grows, the manifest lists only the complete ranges (keep_readable_while_growing).
Shrinking N is refused (the output would hold ids >= N). An output made by another teacher
or config (different identity) is refused unless ``overwrite``; an overwrite is a swap: the
new set is written under its own generation beside the old one, which stays readable until
the new manifest is written; then the files the old manifest lists (and dakd's own range
objects of other generations) are removed. A killed overwrite is continued by re-running it.

Modules: synth.plan (ranges, what the output already holds), synth.actor (the Ray Data
actor that samples and writes a range), this module (the driver: teacher checks, the
actor pool, the manifest, MLflow). Fault drills for tests and rehearsals: dakd.drills.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from dakd import __version__, drills, storage
from dakd.config import SynthesizeConfig, dump_config
from dakd.data import shards
from dakd.data.classes import ClassTable, class_table_from_dict
from dakd.data.transforms import NORMALIZATION
from dakd.errors import ConfigError, DakdError, DataError, StorageError, SynthesisError
from dakd.synth.plan import OutputPlan, check_output, plan_ranges

log = logging.getLogger(__name__)

CONTACT_SHEET = "contact_sheet.png"


def teacher_info(cfg: SynthesizeConfig) -> dict:
    """Resolve and check the teacher without loading it: location, state, hash, identity."""
    from dakd import checkpoints as ckpt_io
    from dakd.checkpoints import load_teacher, resolve_checkpoint

    try:
        location = resolve_checkpoint(cfg.teacher)
        state = ckpt_io.read_state(location)
    except ConfigError as exc:
        raise ConfigError(f"teacher: {exc}") from None
    except StorageError as exc:
        raise ConfigError(f"teacher: {cfg.teacher} cannot be read ({exc})") from None
    if state.get("kind") != ckpt_io.TEACHER_KIND:
        raise ConfigError(f"teacher: {location} is not a SAR-JointNet checkpoint (kind {state.get('kind')!r})")
    use_ema = cfg.ema and storage.exists(storage.join_uri(location, ckpt_io.EMA_FILE))
    teacher_hash = ckpt_io.weights_hash(location, ema=use_ema)  # checked against state.json's sha256
    try:  # built once on the driver: a damaged teacher fails here, before any actor starts
        load_teacher(location, ema=use_ema)
    except DakdError:
        raise
    except Exception as exc:  # noqa: BLE001 - a teacher that cannot be built is the user's input
        raise ConfigError(f"teacher: {location} cannot be loaded ({type(exc).__name__}: {str(exc)[:300]})") from None
    classes = class_table_from_dict(state["classes"])
    arch = state["arch"]
    size = cfg.size or int(arch["sample_size"])
    factor = 2 ** (len(arch["block_out_channels"]) - 1)
    if size % factor:
        raise ConfigError(f"size {size}: must be a multiple of {factor} for this teacher "
                          f"(2^(levels-1) of its block_out_channels {arch['block_out_channels']})")
    identity = {
        "teacher_hash": teacher_hash, "weights": "ema" if use_ema else "model", "b": float(state["b"]),
        "sampler": cfg.sampler, "steps": int(cfg.steps), "seed": int(cfg.seed), "size": int(size),
        "num_classes": classes.num_classes, "rows_per_file": int(cfg.rows_per_file), "exact": bool(cfg.exact),
        "batch_size": 1 if cfg.exact else int(cfg.batch_size),
        "num_train_timesteps": int(state["num_train_timesteps"]), "label_loss": state["label_loss"],
    }
    if cfg.precision != "auto":  # absent: auto (the sets written before the setting existed stay valid)
        identity["precision"] = cfg.precision
    return {"location": location, "state": state, "classes": classes, "identity": identity}


def check_real_classes(real: str, classes: ClassTable) -> None:
    """The teacher's class count must match the real shard set it is meant to augment."""
    real_classes = shards.open_shard_set(real).classes
    if real_classes.num_classes != classes.num_classes:
        raise DataError(real, f"has {real_classes.num_classes} classes {list(real_classes.names)}, but the teacher "
                              f"generates {classes.num_classes} {list(classes.names)}; use a teacher trained on this data")


# ---------------------------------------------------------------- contact sheet
def contact_sheet(output: str, files: list[dict], classes: ClassTable, count: int, columns: int = 8) -> np.ndarray | None:
    """The first `count` samples as tiles [image | coloured mask], `columns` tiles per row ->
    (rows*H, columns*2W, 3) uint8 (None when count is 0)."""
    from dakd.eval.figures import sample_grid

    images, masks = [], []
    for f in files:
        if len(images) >= count:
            break
        table = shards.read_table(storage.join_uri(output, f["path"]), columns=shards.PAIR_COLUMNS)
        for row in table.to_pylist():
            rec = shards.row_to_record(row)
            images.append(rec["image"])
            masks.append(rec["mask"])
    images, masks = images[:count], masks[:count]
    if not images:
        return None
    h, w = images[0].shape
    cols = min(columns, len(images))
    pad = (-len(images)) % cols
    images += [np.zeros((h, w), np.uint8)] * pad
    masks += [np.zeros((h, w), np.uint8)] * pad
    per_col = len(images) // cols
    # sample i sits at row i // cols, column i % cols
    col_grids = [sample_grid(np.stack(images[c::cols]), np.stack(masks[c::cols]), classes.colorize) for c in range(cols)]
    assert all(g.shape[0] == per_col * h for g in col_grids)
    return np.concatenate(col_grids, axis=1)


# ---------------------------------------------------------------- driver
def run_ranges(cfg: SynthesizeConfig, todo: list[tuple], job: dict, total: int, done_rows: int) -> tuple[list[dict], dict]:
    """Write the `todo` ranges with a Ray Data actor pool, showing one live progress line (a
    line per range with --verbose); returns (stats per range, timing {seconds,
    steady_samples_per_s})."""
    from dakd.progress import progress_line, report as report_progress
    from dakd.runtime import init_ray

    ray = init_ray(cfg.ray)
    items = [{"k": k, "start": s, "stop": e} for k, s, e in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    actor, kwargs = drills.synth_actor(job)  # SynthActor, unless a drill is set
    ds = ds.map_batches(
        actor, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.actors_min, max_size=cfg.actors_max),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: an actor
        # that dies (node lost, OOM, segfault) is restarted and its call retried; the retry
        # rewrites the same range object with the same bytes
    )
    stats, t0 = [], time.perf_counter()
    done = done_rows
    try:
        with progress_line("synthesize", total=total, unit="sample", start=done_rows) as bar:  # None: --verbose
            for row in ds.iter_rows():
                s = json.loads(row["stats"])
                stats.append(s)
                done += s["rows"]
                note = f"{len(stats)}/{len(todo)} ranges this run"
                if bar is not None:
                    report_progress(bar, done, note)
                else:
                    rate = (done - done_rows) / max(time.perf_counter() - t0, 1e-9)
                    print(f"[synthesize] {done}/{total} samples ({note}, {rate:.2f} samples/s, last {s['path']})",
                          flush=True)
    except Exception as exc:  # noqa: BLE001 - Ray wraps actor errors in several types
        raise SynthesisError(f"synthesis into {cfg.output} failed after {len(stats)} of {len(todo)} ranges this run "
                             f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}); finished ranges are "
                             "kept: re-run the same command to continue") from exc
    seconds = time.perf_counter() - t0
    # steady state: rows over the span from the first range's start of sampling to the last
    # range's end (actor clocks), i.e. without actor start-up and teacher loading
    span = max(s["finished_at"] for s in stats) - min(s["started_at"] for s in stats) if stats else 0
    steady = sum(s["rows"] for s in stats) / span if span > 0 else None
    return stats, {"seconds": seconds, "samples_per_s": (done - done_rows) / max(seconds, 1e-9),
                   "steady_samples_per_s": steady}


def run_synthesize(cfg: SynthesizeConfig) -> dict:
    """Run the synthesis job; returns the summary (output, counts, written/skipped ranges, rates)."""
    from dakd.runtime import run_lock

    with run_lock(cfg.ray, storage.resolve(cfg.output).uri, "synthesize"):
        return _synthesize(cfg)


def prepare_output(cfg: SynthesizeConfig, identity: dict, classes: ClassTable) -> tuple[list, OutputPlan]:
    """Check the real set's classes and the output; plan the ranges -> (ranges, the output plan)."""
    if cfg.real:
        check_real_classes(cfg.real, classes)
    output = cfg.output
    storage.ensure_dir(output, create_bucket=cfg.create_bucket)
    storage.check_writable(output)
    ranges = plan_ranges(cfg.count, cfg.rows_per_file)
    plan = check_output(output, identity, ranges, cfg.overwrite)
    print(f"[synthesize] {cfg.count} samples in {len(ranges)} ranges of {cfg.rows_per_file} -> {output}: "
          f"{len(plan.kept)} ranges already complete, {len(plan.todo)} to write; "
          + ("exact (one sample per forward)" if cfg.exact else f"batches of {cfg.batch_size}"), flush=True)
    if not cfg.exact and cfg.rows_per_file % cfg.batch_size:
        log.warning("rows_per_file %d is not a multiple of batch_size %d: the batches that straddle two ranges are "
                    "generated by both (wasted work)", cfg.rows_per_file, cfg.batch_size)
    return ranges, plan


def _synthesize(cfg: SynthesizeConfig) -> dict:
    from dakd import tracking
    from dakd.eval.figures import png_bytes

    t_start = time.perf_counter()
    drill = drills.synth_drills()  # a malformed drill is refused before anything is written
    info = teacher_info(cfg)
    classes, identity, output = info["classes"], info["identity"], cfg.output
    ranges, plan = prepare_output(cfg, identity, classes)
    todo, kept = plan.todo, plan.kept
    uri = tracking.tracking_uri(cfg.tracking, output)  # fail fast, before any compute

    job = {"output": output, "generation": plan.generation, "teacher_location": info["location"], "identity": identity,
           "torch_threads": cfg.torch_threads, "gpus_per_actor": cfg.gpus_per_actor, "compile": cfg.compile,
           "drills": drill}
    timing = {"seconds": 0.0, "samples_per_s": None, "steady_samples_per_s": None}
    new_stats: list[dict] = []
    if todo:
        if not plan.replacing:  # this set grows or resumes
            keep_readable_while_growing(cfg, info, plan, ranges)
        done_rows = sum(stop - start for k, start, stop in ranges if k in kept)
        new_stats, timing = run_ranges(cfg, todo, job, cfg.count, done_rows)

    files, class_pixels, nfe, hardware = collect_ranges(output, plan.generation, ranges, kept, new_stats,
                                                        classes.num_classes)
    sheet = contact_sheet(output, files, classes, cfg.contact_sheet_count)
    if sheet is not None:
        storage.write_bytes(storage.join_uri(output, CONTACT_SHEET), png_bytes(sheet))
    generated = sum(s["rows"] for s in new_stats)
    last_run = {"generated": generated, "ranges_written": len(new_stats), "ranges_kept": len(kept), **timing}
    manifest = build_manifest(cfg, info, files, class_pixels, nfe, hardware, sheet is not None, last_run)
    shards.write_manifest(output, manifest)  # the swap: from here the new set is the set
    shards.remove_listed(output, plan.remove_after, keep=set(shards.listed_files(manifest)))
    with tracking.job_run(cfg.tracking, uri=uri, job="synthesize", run_key=f"synthesize:{output}",
                          run_name="synthesize", params=dump_config(cfg),
                          tags={"dakd.teacher_hash": identity["teacher_hash"]}) as run:
        log_run(run.logger, cfg, manifest, sheet, generated, timing)
    print(f"[synthesize] done: {cfg.count} samples in {len(files)} shards ({generated} generated this run, "
          f"{len(kept)} ranges kept) -> {output}", flush=True)
    return {"job": "synthesize", "output": output, "count": cfg.count, "files": len(files),
            "generated": generated, "ranges_written": sorted(s["range"] for s in new_stats),
            "ranges_kept": sorted(kept), "samples_per_s": timing["samples_per_s"],
            "steady_samples_per_s": timing["steady_samples_per_s"], "nfe_per_sample": nfe,
            "teacher": info["location"], "teacher_hash": identity["teacher_hash"],
            "class_share": manifest["splits"][shards.SYNTHETIC_SPLIT]["class_share"], "classes": list(classes.names),
            "contact_sheet": storage.join_uri(output, CONTACT_SHEET) if sheet is not None else None,
            "mlflow_run_id": run.run_id, "seconds": time.perf_counter() - t_start}


def keep_readable_while_growing(cfg: SynthesizeConfig, info: dict, plan: OutputPlan, ranges) -> None:
    """Before a run adds to this set: ranges its manifest lists that the run rewrites (a grown
    set's partial last range, re-run with more ids) leave the manifest first, so until the new
    manifest is written the set reads as its complete ranges, and a killed growth leaves those
    readable. New ranges need nothing: readers see only the files a manifest lists."""
    manifest = shards.read_manifest(cfg.output)
    if manifest is None:
        return
    listed = set(shards.listed_files(manifest))

    def is_listed(k: int) -> bool:
        return shards.shard_name(shards.SYNTHETIC_SPLIT, k, plan.generation) in listed

    if not any(is_listed(k) for k, _, _ in plan.todo):
        return
    complete = [r for r in ranges if r[0] in plan.kept and is_listed(r[0])]
    if not complete:  # the set was one partial range: nothing readable to keep
        shards.remove_manifest(cfg.output)
        return
    files, class_pixels, nfe, hardware = collect_ranges(cfg.output, plan.generation, complete,
                                                        {k: plan.kept[k] for k, _, _ in complete}, [],
                                                        info["classes"].num_classes)
    count = sum(stop - start for _, start, stop in complete)
    interim = build_manifest(cfg.model_copy(update={"count": count}), info, files, class_pixels, nfe, hardware,
                             bool(manifest.get("contact_sheet")), manifest.get("last_run") or {})
    shards.write_manifest(cfg.output, interim)


def build_manifest(cfg: SynthesizeConfig, info: dict, files: list[dict], class_pixels: np.ndarray, nfe, hardware: list,
                   has_sheet: bool, last_run: dict) -> dict:
    """The synthetic set's manifest (kind "synthetic"), written last."""
    identity, classes = info["identity"], info["classes"]
    total_px = int(class_pixels.sum()) or 1
    return {
        "kind": "synthetic",
        "created_by": f"dakd {__version__} synthesize",
        "teacher": {"checkpoint": info["location"], "hash": identity["teacher_hash"], "weights": identity["weights"],
                    "step": info["state"].get("step")},
        "identity": identity,
        "b": identity["b"], "sampler": identity["sampler"], "steps": identity["steps"], "seed": identity["seed"],
        "nfe_per_sample": nfe,
        "hardware": hardware,  # what generated the ranges (one entry per distinct set-up)
        "count": cfg.count,
        "classes": classes.to_dict(),
        "normalization": NORMALIZATION,
        "image": "uint8 H×W = denormalize_image(x0) (exact inverse of the normalisation above)",
        "logits": "float16 C×H×W, the teacher's last Label-Net output; mask = argmax of the float32 logits",
        "splits": {shards.SYNTHETIC_SPLIT: {"count": cfg.count, "files": files, "class_pixels": class_pixels.tolist(),
                           "class_share": (class_pixels / total_px).tolist()}},
        "image_sizes": {f"{identity['size']}x{identity['size']}": cfg.count},
        "contact_sheet": CONTACT_SHEET if has_sheet else None,
        "last_run": last_run,
    }


def collect_ranges(output: str, generation: str, ranges, kept: dict, new_stats: list[dict], num_classes: int):
    """Every range's stats (this run's, or a kept object's footer), checked against the plan ->
    (manifest file entries, class pixel counts, NFE per sample, distinct hardware)."""
    by_k = {k: {"path": shards.shard_name(shards.SYNTHETIC_SPLIT, k, generation), "rows": e["rows"], **e["meta"]}
            for k, e in kept.items()}
    by_k.update({s["range"]: s for s in new_stats})
    missing = [k for k, _, _ in ranges if k not in by_k]
    if missing:
        raise SynthesisError(f"ranges {missing[:5]} were not written; re-run the same command")
    hardware = [json.loads(h) for h in sorted({json.dumps(s.get("hardware"), sort_keys=True)
                                               for s in by_k.values() if s.get("hardware")})]
    files, class_pixels, nfe = [], np.zeros(num_classes, np.int64), None
    for k, start, stop in ranges:
        s = by_k[k]
        if s["rows"] != stop - start or (s["start"], s["stop"]) != (start, stop):
            raise SynthesisError(f"{s['path']}: holds ids {s['start']}..{s['stop'] - 1}, expected {start}..{stop - 1}")
        bytes_ = s.get("bytes")
        if bytes_ is None:
            loc = storage.resolve(storage.join_uri(output, s["path"]))
            bytes_ = loc.fs.get_file_info(loc.path).size
        files.append({"path": s["path"], "rows": s["rows"], "bytes": bytes_, "ids": [start, stop - 1]})
        class_pixels += np.asarray(s["class_pixels"], dtype=np.int64)
        nfe = s.get("nfe_per_sample", nfe)
    return files, class_pixels, nfe, hardware


def log_run(logger, cfg: SynthesizeConfig, manifest: dict, sheet, generated: int, timing: dict) -> None:
    """The job's MLflow logging: synthesis/ metrics, the contact sheet, the manifest (`logger`:
    the job run's tracking.RunLogger, which does nothing when tracking is off)."""
    metrics = {"synthesis/count": cfg.count, "synthesis/generated": generated}
    metrics.update({f"synthesis/{k}": v for k, v in timing.items() if v is not None})
    logger.log_metrics(metrics, step=cfg.count)
    if sheet is not None:
        logger.log_image(sheet, CONTACT_SHEET)
    logger.log_dict(manifest, "manifest.json")
