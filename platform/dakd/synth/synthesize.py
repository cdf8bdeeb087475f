"""`dakd synthesize`: (image, logits) pairs of a SAR-JointNet teacher across Ray Data actors
into a synthetic shard set, exactly once and resumable.

Layout. Sample ids 0..N-1 are cut into ranges of R = rows_per_file ids: range k holds ids
[k*R, min((k+1)*R, N)) and is the one object ``data/train/part-<k>.parquet`` (SYNTH_SCHEMA).
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
Shrinking N is refused (the output would hold ids >= N). An output made by another teacher
or config (different identity) is refused unless ``overwrite``.

Fault drills (tests, ops rehearsals; read in the driver, acted on in the actors):
``DAKD_SYNTH_FAIL_AFTER_RANGES=k``: each actor raises after writing k ranges (the job fails,
finished objects stay); ``DAKD_SYNTH_DIE_AT_RANGE=k:/local/marker``: the actor that
samples range k dies (``os._exit``) once, after half of it is sampled and before it is
written (the marker file records that it did); Ray restarts the actor and retries the call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dakd import __version__, storage
from dakd.config import SynthesizeConfig, dump_config
from dakd.data import shards
from dakd.data.classes import ClassTable, class_table_from_dict
from dakd.data.transforms import NORMALIZATION, denormalize_image
from dakd.errors import ConfigError, DakdError, DataError, StorageError, SynthesisError
from dakd.seeds import sample_seed

log = logging.getLogger(__name__)

SPLIT = "train"
FOOTER_KEY = b"dakd.synth"
CONTACT_SHEET = "contact_sheet.png"
_PART = re.compile(r"part-(\d+)\.parquet$")




# ---------------------------------------------------------------- planning
MAX_RANGES = 2_000_000  # objects one synthetic set may hold (the manifest lists each)


class RangePlan(Sequence):
    """The ranges (k, start, stop) of `count` ids in ranges of `rows_per_file`, computed on
    demand (range k = ids [k*R, min((k+1)*R, count))): nothing is built up front."""

    def __init__(self, count: int, rows_per_file: int):
        self.count, self.rows = int(count), int(rows_per_file)

    def __len__(self) -> int:
        return -(-self.count // self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k = k % len(self)
        return (k, k * self.rows, min((k + 1) * self.rows, self.count))


def plan_ranges(count: int, rows_per_file: int) -> RangePlan:
    """The ranges of `count` ids (lazy); ConfigError at once when count is out of bounds or
    would need more than MAX_RANGES objects."""
    if count < 1:
        raise ConfigError(f"count: expected >= 1, got {count}")
    plan = RangePlan(count, rows_per_file)
    if len(plan) > MAX_RANGES:
        raise ConfigError(f"count {count} with rows_per_file {rows_per_file} needs {len(plan)} objects, more than "
                          f"{MAX_RANGES}; raise rows_per_file or lower count")
    return plan


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
    if state.get("kind") != "sar-jointnet":
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
    return {"location": location, "state": state, "classes": classes, "identity": identity}


def check_real_classes(real: str, classes: ClassTable) -> None:
    """The teacher's class count must match the real shard set it is meant to augment."""
    real_classes = shards.open_shard_set(real).classes
    if real_classes.num_classes != classes.num_classes:
        raise DataError(real, f"has {real_classes.num_classes} classes {list(real_classes.names)}, but the teacher "
                              f"generates {classes.num_classes} {list(classes.names)}; use a teacher trained on this data")


def read_footer(uri: str) -> tuple[int, dict | None]:
    """(rows, dakd.synth footer metadata or None) of a shard object, reading only its footer."""
    import pyarrow.parquet as pq

    loc = storage.resolve(uri)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.read_metadata(f)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read its Parquet footer ({type(exc).__name__}: {exc})") from exc
    raw = (meta.metadata or {}).get(FOOTER_KEY)
    return meta.num_rows, (json.loads(raw) if raw else None)


def scan_existing(output: str) -> dict[int, dict]:
    """{range k: {"uri", "rows", "meta"}} of the part objects already under output/data/train."""
    found = {}
    for uri in storage.list_files(storage.join_uri(output, "data", SPLIT)):
        m = _PART.search(uri)
        if m and uri.endswith(shards.shard_name(SPLIT, int(m.group(1)))):
            found[int(m.group(1))] = uri
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = dict(zip(found, pool.map(read_footer, found.values())))
    return {k: {"uri": found[k], "rows": footers[k][0], "meta": footers[k][1]} for k in sorted(found)}


def _refuse_other(output: str, what: str) -> None:
    raise DataError(output, f"{what}; pass --overwrite to replace it, or choose another output")


def check_output(output: str, identity: dict, ranges: list[tuple], overwrite: bool) -> tuple[list[tuple], dict]:
    """Refuse or clear a foreign output; returns (ranges to write, existing ranges kept)."""
    manifest = shards.read_manifest(output)
    other_files = [u for u in storage.list_files(storage.join_uri(output, "data"))
                   if not u.startswith(storage.join_uri(output, "data", SPLIT) + "/")]
    existing = scan_existing(output)
    foreign = None
    if manifest is not None and (manifest.get("kind") != "synthetic" or manifest.get("identity") != identity):
        foreign = ("holds a shard set of another kind" if manifest.get("kind") != "synthetic" else
                   "holds a synthetic set of another teacher or config (identity "
                   + ", ".join(f"{k}={manifest.get('identity', {}).get(k)!r}" for k in identity
                               if manifest.get("identity", {}).get(k) != identity[k]) + ")")
    elif other_files:
        foreign = f"holds shards of other splits ({other_files[0]})"
    else:
        bad = [k for k, e in existing.items() if (e["meta"] or {}).get("identity") != identity]
        if bad:
            foreign = (f"holds objects of another teacher or config ({existing[bad[0]]['uri']}); "
                       "a synthetic set never mixes them")
    if foreign:
        if not overwrite:
            _refuse_other(output, foreign)
        log.info("overwrite: removing the shard set at %s", output)
        shards.remove_manifest(output)  # first: a failure below never leaves a stale "complete" set
        # only what dakd wrote: the files the old manifest lists and this job's own part objects
        # (those with a dakd footer); anything else under data/ (a user's file) stays
        ours = [shards.shard_name(SPLIT, k) for k, e in existing.items() if e["meta"] is not None]
        shards.remove_listed(output, (shards.listed_files(manifest) if manifest else []) + ours)
        existing = {}
    planned = {k: stop - start for k, start, stop in ranges}
    too_many = [k for k, e in existing.items() if k not in planned or e["rows"] > planned[k]]
    if too_many:
        k = too_many[0]
        held = existing[k]["meta"]["stop"] if existing[k]["meta"] else "?"
        raise DataError(output, f"already holds sample ids up to {int(held) - 1} ({existing[k]['uri']}), more than "
                                f"count {sum(planned.values())}; shrinking a synthetic set is refused (use --overwrite "
                                "or another output)")
    done = {k: e for k, e in existing.items() if e["rows"] == planned[k]}
    todo = [r for r in ranges if r[0] not in done]
    return todo, done


# ---------------------------------------------------------------- generation (actor side)
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
    after_batch(samples done): called after each batch (the fault drill hooks in there)."""
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
                     num_train_timesteps=identity["num_train_timesteps"], label_loss=identity["label_loss"])
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
        "id": str(i), "split": SPLIT, "source": "synthetic", "sensor": None, "height": size, "width": size,
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
        model, _ = load_teacher(job["teacher_location"], ema=job["identity"]["weights"] == "ema")
        self.device, self.model = setup_actor(model, job["gpus_per_actor"], job["torch_threads"],
                                              compile=job.get("compile", False))
        # provenance: a re-run of a range writes the same samples on the same hardware
        self.hardware = {"device": describe_device(self.device), "precision": precision_name(self.device),
                         "torch": torch.__version__, "torch_threads": int(job["torch_threads"])}
        self.written = 0

    def _drill_die(self, k: int) -> None:
        spec = self.job.get("die_at_range")
        if spec:
            at, marker = spec.split(":", 1)
            if int(at) == k and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(f"actor pid {os.getpid()} died in range {k}\n")
                os._exit(1)

    def __call__(self, batch: dict) -> dict:
        job, identity = self.job, self.job["identity"]
        out_k, out_stats = [], []
        for k, start, stop in zip(batch["k"], batch["start"], batch["stop"]):
            k, start, stop = int(k), int(start), int(stop)
            t0, started_at = time.perf_counter(), time.time()
            ids = list(range(start, stop))

            def after_batch(done: int, k=k, half=len(ids) // 2) -> None:
                if done >= max(half, 1):
                    self._drill_die(k)  # drill: die once half the range is sampled, before anything is written

            gen = generate(self.model, identity, ids, self.device, after_batch)
            nc = identity["num_classes"]
            class_pixels = np.bincount(gen["mask"].ravel(), minlength=nc)[:nc].tolist()
            seconds = time.perf_counter() - t0
            footer = {"range": k, "start": start, "stop": stop, "identity": identity, "class_pixels": class_pixels,
                      "seconds": seconds, "nfe_per_sample": gen["nfe"], "code_version": __version__,
                      "hardware": self.hardware}
            name = shards.shard_name(SPLIT, k)
            size = shards.write_table(storage.join_uri(job["output"], name),
                                      range_table(ids, gen, identity, job["teacher_location"], footer))
            self.written += 1
            out_k.append(k)
            out_stats.append(json.dumps({"path": name, "rows": len(ids), "bytes": size, "started_at": started_at,
                                         "finished_at": time.time(), **footer}))
            if job.get("fail_after_ranges") is not None and self.written >= int(job["fail_after_ranges"]):
                raise RuntimeError(f"drill: DAKD_SYNTH_FAIL_AFTER_RANGES={job['fail_after_ranges']} "
                                   f"(failed after writing {name})")
        return {"k": np.asarray(out_k, dtype=np.int64), "stats": np.asarray(out_stats, dtype=object)}


# ---------------------------------------------------------------- contact sheet
def contact_sheet(output: str, files: list[dict], classes: ClassTable, count: int, columns: int = 8) -> np.ndarray | None:
    """The first `count` samples as tiles [image | coloured mask], `columns` tiles per row ->
    (rows*H, columns*2W, 3) uint8 (None when count is 0)."""
    from dakd.eval.figures import sample_grid

    images, masks = [], []
    for f in files:
        if len(images) >= count:
            break
        table = shards.read_table(storage.join_uri(output, f["path"]), columns=["height", "width", "image", "mask"])
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
def _drill_env() -> dict:
    fail = os.environ.get("DAKD_SYNTH_FAIL_AFTER_RANGES")
    die = os.environ.get("DAKD_SYNTH_DIE_AT_RANGE")
    if die and not re.fullmatch(r"\d+:.+", die):
        raise ConfigError(f"DAKD_SYNTH_DIE_AT_RANGE={die!r}: expected k:/path/to/marker")
    return {"fail_after_ranges": int(fail) if fail else None, "die_at_range": die or None}


def run_ranges(cfg: SynthesizeConfig, todo: list[tuple], job: dict, total: int, done_rows: int) -> tuple[list[dict], dict]:
    """Write the `todo` ranges with a Ray Data actor pool; prints progress; returns (stats per
    range, timing {seconds, steady_samples_per_s})."""
    from dakd.runtime import init_ray

    ray = init_ray(cfg.ray)
    items = [{"k": k, "start": s, "stop": e} for k, s, e in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        SynthActor, fn_constructor_kwargs={"job": job}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.actors_min, max_size=cfg.actors_max),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: an actor
        # that dies (node lost, OOM, segfault) is restarted and its call retried; the retry
        # rewrites the same range object with the same bytes
    )
    stats, t0 = [], time.perf_counter()
    done = done_rows
    try:
        for row in ds.iter_rows():
            s = json.loads(row["stats"])
            stats.append(s)
            done += s["rows"]
            now = time.perf_counter()
            rate = (done - done_rows) / max(now - t0, 1e-9)
            print(f"[synthesize] {done}/{total} samples ({len(stats)}/{len(todo)} ranges this run, "
                  f"{rate:.2f} samples/s, last {s['path']})", flush=True)
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


def _synthesize(cfg: SynthesizeConfig) -> dict:
    from dakd import tracking
    from dakd.eval.figures import png_bytes

    t_start = time.perf_counter()
    info = teacher_info(cfg)
    classes, identity = info["classes"], info["identity"]
    if cfg.real:
        check_real_classes(cfg.real, classes)
    output = cfg.output
    storage.ensure_dir(output, create_bucket=cfg.create_bucket)
    storage.check_writable(output)
    ranges = plan_ranges(cfg.count, cfg.rows_per_file)
    todo, kept = check_output(output, identity, ranges, cfg.overwrite)
    print(f"[synthesize] {cfg.count} samples in {len(ranges)} ranges of {cfg.rows_per_file} -> {output}: "
          f"{len(kept)} ranges already complete, {len(todo)} to write; "
          + ("exact (one sample per forward)" if cfg.exact else f"batches of {cfg.batch_size}"), flush=True)
    if not cfg.exact and cfg.rows_per_file % cfg.batch_size:
        log.warning("rows_per_file %d is not a multiple of batch_size %d: the batches that straddle two ranges are "
                    "generated by both (wasted work)", cfg.rows_per_file, cfg.batch_size)

    run_id, uri = None, None
    if cfg.tracking.enabled:  # fail fast, before any compute
        uri = tracking.resolve_tracking_uri(cfg.tracking.uri, output)
        tracking.check_tracking(uri)

    job = {"output": output, "teacher_location": info["location"], "identity": identity,
           "torch_threads": cfg.torch_threads, "gpus_per_actor": cfg.gpus_per_actor, "compile": cfg.compile,
           **_drill_env()}
    timing = {"seconds": 0.0, "samples_per_s": None, "steady_samples_per_s": None}
    new_stats: list[dict] = []
    if todo:
        shards.remove_manifest(output)  # the set is incomplete until the manifest is rewritten
        done_rows = sum(stop - start for k, start, stop in ranges if k in kept)
        new_stats, timing = run_ranges(cfg, todo, job, cfg.count, done_rows)

    # every range: from this run's stats or the kept objects' footers
    by_k = {k: {"path": shards.shard_name(SPLIT, k), "rows": e["rows"], **e["meta"]} for k, e in kept.items()}
    by_k.update({s["range"]: s for s in new_stats})
    missing = [k for k, _, _ in ranges if k not in by_k]
    if missing:
        raise SynthesisError(f"ranges {missing[:5]} were not written; re-run the same command")
    hardware = [json.loads(h) for h in sorted({json.dumps(s.get("hardware"), sort_keys=True)
                                               for s in by_k.values() if s.get("hardware")})]
    files, class_pixels, nfe = [], np.zeros(classes.num_classes, np.int64), None
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
    total_px = int(class_pixels.sum()) or 1

    sheet = contact_sheet(output, files, classes, cfg.contact_sheet_count)
    if sheet is not None:
        storage.write_bytes(storage.join_uri(output, CONTACT_SHEET), png_bytes(sheet))
    generated = sum(s["rows"] for s in new_stats)
    manifest = {
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
        "splits": {SPLIT: {"count": cfg.count, "files": files, "class_pixels": class_pixels.tolist(),
                           "class_share": (class_pixels / total_px).tolist()}},
        "image_sizes": {f"{identity['size']}x{identity['size']}": cfg.count},
        "contact_sheet": CONTACT_SHEET if sheet is not None else None,
        "last_run": {"generated": generated, "ranges_written": len(new_stats), "ranges_kept": len(kept),
                     **timing},
    }
    shards.write_manifest(output, manifest)

    if cfg.tracking.enabled:
        run_id = tracking.start_or_resume_run(uri, cfg.tracking.experiment, run_key=f"synthesize:{output}",
                                              run_name="synthesize", params=dump_config(cfg),
                                              tags={"dakd.job": "synthesize", "dakd.teacher_hash": identity["teacher_hash"]},
                                              parent_run_id=cfg.tracking.parent_run_id)
        logger = tracking.RunLogger(uri, run_id)
        metrics = {"synth/count": cfg.count, "synth/generated": generated}
        metrics.update({f"synth/{k}": v for k, v in timing.items() if v is not None})
        logger.log_metrics(metrics, step=cfg.count)
        if sheet is not None:
            logger.log_image(sheet, CONTACT_SHEET)
        logger.log_dict(manifest, "manifest.json")
        logger.end("FINISHED")
    print(f"[synthesize] done: {cfg.count} samples in {len(files)} shards ({generated} generated this run, "
          f"{len(kept)} ranges kept) -> {output}", flush=True)
    return {"job": "synthesize", "output": output, "count": cfg.count, "files": len(files),
            "generated": generated, "ranges_written": sorted(s["range"] for s in new_stats),
            "ranges_kept": sorted(kept), "samples_per_s": timing["samples_per_s"],
            "steady_samples_per_s": timing["steady_samples_per_s"], "nfe_per_sample": nfe,
            "teacher": info["location"], "teacher_hash": identity["teacher_hash"],
            "class_share": manifest["splits"][SPLIT]["class_share"], "classes": list(classes.names),
            "contact_sheet": storage.join_uri(output, CONTACT_SHEET) if sheet is not None else None,
            "mlflow_run_id": run_id, "seconds": time.perf_counter() - t_start}
