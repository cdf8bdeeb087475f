"""`dakd pipeline`: every stage in order under one output root, then a short report.

Layout under `output`: `real/` (ingested shard set, with b in its manifest), `teacher/`
(SAR-JointNet run: checkpoints + latest.json), `synthetic/` (synthetic shard set),
`student/<mode>` (one SAROSS-Net run per student mode), `eval/<mode>` (evaluations). A stage whose output already exists for
the same config is skipped, so a re-submitted pipeline continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time

from dakd import storage
from dakd.config import BalanceConfig, IngestConfig, PipelineConfig, TrainSarossConfig, dump_config
from dakd.data import shards
from dakd.data.balance import run_balance
from dakd.data.ingest import run_ingest
from dakd.errors import ConfigError
from dakd.report import STUDENT_NAMES

log = logging.getLogger(__name__)


def real_shards_uri(cfg: PipelineConfig) -> str:
    return storage.join_uri(cfg.output, "real")


def report(shard_set: shards.ShardSet) -> str:
    """A short human-readable report of a shard set (counts, class shares, b)."""
    m = shard_set.manifest
    names = shard_set.classes.names
    lines = [f"shard set {shard_set.root}"]
    for split, entry in sorted(m["splits"].items()):
        shares = ", ".join(f"{n} {100 * s:.1f}%" for n, s in zip(names, entry["class_share"]))
        lines.append(f"  {split:<6} {entry['count']:>6} images in {len(entry['files'])} file(s); pixels: {shares}")
    lines.append(f"  image sizes: {m['image_sizes']}; skipped: {len(m['skipped'])}; off-palette pixels: {m['off_palette']['total_pixels']}")
    if m.get("balance"):
        bal = m["balance"]
        lines.append(f"  balancing factor b = {bal['b']:.4f} (P(x0) = {bal['power_x']:.1f}, P(y0) = {bal['power_y']:.1f}, {bal['images']} {bal['split']} images)")
    return "\n".join(lines)


def _ingest(cfg: PipelineConfig, real: str) -> dict:
    existing = shards.read_manifest(real)
    if existing is not None and not cfg.overwrite and existing.get("source") == dump_config(cfg.source):
        log.info("ingest: %s already holds this source's shard set; skipped", real)
        return {"skipped": True, "output": real}
    return run_ingest(IngestConfig(source=cfg.source, output=real, rows_per_file=cfg.rows_per_file,
                                   on_error=cfg.on_error, overwrite=cfg.overwrite, ray=cfg.ray))


def _balance(cfg: PipelineConfig, real: str) -> dict:
    """b over the train split; skipped when the shard set's manifest already records it (a
    re-ingest writes a new manifest without it)."""
    bal = (shards.read_manifest(real) or {}).get("balance")
    if bal and bal.get("split") == "train" and not cfg.overwrite:
        log.info("balance: %s already records b over its train split; skipped", real)
        return {"job": "balance", "skipped": True, "shards": real,
                **{k: bal[k] for k in ("split", "images", "b", "power_x", "power_y")}}
    return run_balance(BalanceConfig(shards=real, split="train", ray=cfg.ray))


def same_job(stored: dict, cfg) -> bool:
    """A finished run's stored config asks for the same output as the job config `cfg` (where
    it runs and is tracked aside). Settings added to dakd after the run was written count as
    their defaults, so an upgrade alone does not redo finished stages."""
    from pydantic import ValidationError

    try:
        then = dump_config(type(cfg).model_validate(stored))
    except ValidationError:  # a setting since removed or changed in kind: not the same job
        return False
    drop = ("ray", "tracking")
    return {k: v for k, v in then.items() if k not in drop} == {k: v for k, v in dump_config(cfg).items() if k not in drop}


def _tracked(uri: str | None, parent: str | None, cfg: PipelineConfig, stage: str, fn) -> dict:
    """Run a stage that does not track itself inside a child MLflow run of the pipeline."""
    if uri is None:
        return fn()
    from dakd import tracking

    with tracking.job_run(cfg.tracking, uri=uri, job=stage, run_key=f"{cfg.output}#{stage}", run_name=stage,
                          params={}, parent_run_id=parent) as run:
        summary = fn()
        tracking.log_summary(uri, run.run_id, summary)
    return summary


def _train_jointnet(cfg: PipelineConfig, real: str, tracking_cfg) -> dict:
    from dakd.checkpoints import LATEST, read_state
    from dakd.train.jointnet import run_train_jointnet

    jcfg = cfg.jointnet.model_copy(update={"shards": real, "output": storage.join_uri(cfg.output, "teacher"),
                                           "ray": cfg.ray, "tracking": tracking_cfg})
    pointer = storage.join_uri(jcfg.output, jcfg.run_name, LATEST)
    if storage.exists(pointer) and not cfg.overwrite:
        ckpt = json.loads(storage.read_text(pointer))["checkpoint"]
        if same_job(read_state(ckpt)["config"], jcfg):
            log.info("train-jointnet: %s already holds this config's teacher; skipped", ckpt)
            return {"skipped": True, "checkpoint": ckpt}
    return run_train_jointnet(jcfg)


def _synthesize(cfg: PipelineConfig, real: str, teacher: str, tracking_cfg) -> dict:
    """Synthesis is resumable by itself: complete ranges of the same config are kept."""
    from dakd.synth.synthesize import run_synthesize

    scfg = cfg.synthesize.model_copy(update={"teacher": teacher, "output": storage.join_uri(cfg.output, "synthetic"),
                                             "real": real, "ray": cfg.ray, "tracking": tracking_cfg})
    return run_synthesize(scfg)


def _evaluate_synthesis(cfg: PipelineConfig, real: str, tracking_cfg) -> dict:
    from dakd.synth.evaluate import run_evaluate_synthesis

    ecfg = cfg.evaluate_synthesis.model_copy(update={"synthetic": storage.join_uri(cfg.output, "synthetic"),
                                                     "real": real, "ray": cfg.ray, "tracking": tracking_cfg})
    return run_evaluate_synthesis(ecfg)


def _train_students(cfg: PipelineConfig, real: str, tracking_cfg) -> dict:
    """One SAROSS-Net per mode in cfg.student_modes; a finished run of the same config is skipped."""
    return {mode: train_student(cfg, real, mode, tracking_cfg) for mode in cfg.student_modes}


def student_config(cfg: PipelineConfig, real: str, mode: str, tracking_cfg, run_name: str | None = None,
                   **saross_update) -> TrainSarossConfig:
    """The TrainSarossConfig of one student on the pipeline's real and synthetic sets, under
    `student/<run_name or mode>`; `saross_update` changes the `saross` section (nested configs
    as dicts, e.g. loss={...}). The changes are checked here, not in a worker."""
    update = {k: getattr(cfg.saross, k).model_copy(update=v) if isinstance(v, dict) else v
              for k, v in saross_update.items()}
    loss = update.pop("loss", cfg.saross.loss)
    scfg = cfg.saross.model_copy(update={
        **update, "shards": real, "synthetic": storage.join_uri(cfg.output, "synthetic"),
        "output": storage.join_uri(cfg.output, "student"), "run_name": run_name or mode,
        "loss": loss.model_copy(update={"mode": mode}), "ray": cfg.ray, "tracking": tracking_cfg})
    return TrainSarossConfig.model_validate(scfg.model_dump())


def train_student(cfg: PipelineConfig, real: str, mode: str, tracking_cfg, run_name: str | None = None,
                  **saross_update) -> dict:
    """One student (student_config); skipped when its run already holds a best checkpoint of
    the same config."""
    from dakd.checkpoints import BEST, read_state
    from dakd.train.saross import run_train_saross

    name = run_name or mode
    scfg = student_config(cfg, real, mode, tracking_cfg, run_name, **saross_update)
    pointer = storage.join_uri(scfg.output, name, BEST)
    if storage.exists(pointer) and not cfg.overwrite:
        best = json.loads(storage.read_text(pointer))["checkpoint"]
        if same_job(read_state(best)["config"], scfg):
            log.info("train-saross (%s): %s already holds this config's student; skipped", name, best)
            return {"skipped": True, "checkpoint": best}
    return run_train_saross(scfg)


def student_training(run_dir: str) -> dict:
    """What a finished student run trained with: {"steps", "batch_size", "samples_seen",
    "selected_on", "val_miou"} (from its last checkpoint and best.json; val_miou: the
    selecting score of the best checkpoint, 0..1)."""
    from dakd.checkpoints import BEST, LATEST, read_state

    last = read_state(json.loads(storage.read_text(storage.join_uri(run_dir, LATEST)))["checkpoint"])
    best = json.loads(storage.read_text(storage.join_uri(run_dir, BEST)))
    c = TrainSarossConfig.model_construct(**last["config"])  # as it was saved (no re-validation)
    batch = c.per_worker_batch * c.num_workers
    return {"steps": int(last["step"]), "batch_size": batch, "samples_seen": int(last["step"]) * batch,
            "selected_on": best.get("selected_on", best.get("val_split")), "val_miou": best.get("val_miou")}


def _evaluate_students(cfg: PipelineConfig, real: str, students: dict, tracking_cfg) -> dict:
    """Evaluate every student once on the real test split (`evaluate.split`), all in one actor
    pool, and print the paper's tables side by side, with the compute each student got and
    the split it was selected on."""
    from dakd.eval.evaluate import comparison_table

    evaluated = evaluate_students(cfg, real, {mode: (t["checkpoint"], STUDENT_NAMES[mode]) for mode, t in students.items()},
                                  tracking_cfg)
    results = {mode: result for mode, (result, _) in evaluated.items()}
    training = {STUDENT_NAMES[mode]: t for mode, (_, t) in evaluated.items()}
    rows = {STUDENT_NAMES[mode]: r["metrics"] for mode, r in results.items()}
    selected = sorted({t["selected_on"] for t in training.values()})
    images = next(iter(results.values()))["images"] if results else 0
    protocol = (f"Students selected on split {', '.join(map(repr, selected))} (best val mIoU per run), "
                f"reported once on split {cfg.evaluate.split!r} ({images} images, full resolution).")
    if cfg.evaluate.split in selected:
        protocol += f" WARNING: split {cfg.evaluate.split!r} also selected the checkpoints: these figures are optimistic."
    table = comparison_table(rows, training, protocol)
    print(table, flush=True)
    storage.write_text(storage.join_uri(cfg.output, "eval", "comparison.md"), table + "\n")
    return {"skipped": all(r.get("skipped") for r in results.values()),  # every evaluation reused
            "table": table, "miou": {m: r["metrics"]["miou"] for m, r in results.items()},
            "training": {m: training[STUDENT_NAMES[m]] for m in results},
            "outputs": {m: r["output"] for m, r in results.items()}}


def evaluate_students(cfg: PipelineConfig, real: str, students: dict[str, tuple[str, str]],
                      tracking_cfg) -> dict[str, tuple[dict, dict]]:
    """Students {run_name: (checkpoint, table name)} on `evaluate.split`, in one actor pool,
    each written under `eval/<run_name>`; returns {run_name: (run_evaluate's summary,
    student_training of its run)}. An evaluation already there of the same checkpoint, split
    files and settings is skipped (its summary has "skipped": True) unless `overwrite`."""
    from dakd.eval.evaluate import finished_evaluation, run_evaluations

    if not students:
        return {}
    cfgs = {run_name: cfg.evaluate.model_copy(update={
                "checkpoint": checkpoint, "shards": real, "output": storage.join_uri(cfg.output, "eval", run_name),
                "name": name, "ray": cfg.ray, "tracking": tracking_cfg})
            for run_name, (checkpoint, name) in students.items()}
    results = {} if cfg.overwrite else {k: r for k, c in cfgs.items() if (r := finished_evaluation(c)) is not None}
    for run_name, result in results.items():
        log.info("evaluate (%s): %s already holds this checkpoint's evaluation; skipped", run_name, result["output"])
    todo = [k for k in cfgs if k not in results]
    if todo:  # the caller prints one table for all students
        results.update(zip(todo, run_evaluations([cfgs[k] for k in todo], print_table=False)))
    return {run_name: (results[run_name], student_training(storage.join_uri(cfg.output, "student", run_name)))
            for run_name in students}


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every configured stage in order; one MLflow parent run with a child run per stage."""
    from dakd.runtime import run_lock

    with run_lock(cfg.ray, storage.resolve(cfg.output).uri, "pipeline"):
        return _run_stages(cfg)


def _run_stages(cfg: PipelineConfig) -> dict:
    from dakd import tracking

    real = real_shards_uri(cfg)
    storage.ensure_dir(cfg.output, create_bucket=cfg.create_bucket)  # the one place a pipeline may create a bucket
    uri = tracking.tracking_uri(cfg.tracking, cfg.output)  # before any compute
    with tracking.job_run(cfg.tracking, uri=uri, job="pipeline", run_key=f"{cfg.output}#pipeline",
                          run_name="pipeline", params=dump_config(cfg)) as run:
        summary = _stages_in_run(cfg, real, uri, run.run_id)
        if run:
            tracking.log_summary(uri, run.run_id, summary)
    summary["report"] = _write_report(cfg, {**summary, "tracking_uri": uri})
    return summary


def _stages_in_run(cfg: PipelineConfig, real: str, uri: str | None, parent: str | None) -> dict:
    """The configured stages in order, their runs nested under the pipeline's run `parent`."""
    child_tracking = cfg.tracking.model_copy(update={"uri": uri, "parent_run_id": parent})
    stages = _TimedStages()
    if "ingest" in cfg.stages:
        stages["ingest"] = _tracked(uri, parent, cfg, "ingest", lambda: _ingest(cfg, real))
    if "balance" in cfg.stages:
        stages["balance"] = _tracked(uri, parent, cfg, "balance", lambda: _balance(cfg, real))
        print(report(shards.open_shard_set(real)), flush=True)
    if "train-jointnet" in cfg.stages:
        stages["train-jointnet"] = _train_jointnet(cfg, real, child_tracking)
        print(f"teacher checkpoint: {stages['train-jointnet']['checkpoint']}", flush=True)
    teacher = storage.join_uri(cfg.output, "teacher", cfg.jointnet.run_name)
    if "synthesize" in cfg.stages:
        stages["synthesize"] = _synthesize(cfg, real, teacher, child_tracking)
    if "evaluate-synthesis" in cfg.stages:
        stages["evaluate-synthesis"] = _evaluate_synthesis(cfg, real, child_tracking)
        print(f"synthetic set: FID ({cfg.evaluate_synthesis.features}) = {stages['evaluate-synthesis']['fid']:.4g}",
              flush=True)
    if "train-saross" in cfg.stages:
        stages["train-saross"] = _train_students(cfg, real, child_tracking)
    if "evaluate" in cfg.stages:
        if "train-saross" not in stages:
            raise ConfigError("stages: evaluate needs train-saross in the same pipeline run")
        stages["evaluate"] = _evaluate_students(cfg, real, stages["train-saross"], child_tracking)
    return {"job": "pipeline", "output": cfg.output, "stages": dict(stages), "stage_seconds": stages.seconds,
            "mlflow_run_id": parent}


class _TimedStages(dict):
    """The stages' summaries; `seconds` records each stage's wall time (s), from the previous
    stage's end (or the start) to the moment its summary is stored."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __setitem__(self, stage: str, summary: dict) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now
        super().__setitem__(stage, summary)


def _write_report(cfg: PipelineConfig, summary: dict) -> str | None:
    """pipeline.json (the summary, stage times, tracking URI) and report.html under the output.
    A report that cannot be written is a warning, not a failed run."""
    from dakd.report import SUMMARY, write_report

    storage.write_text(storage.join_uri(cfg.output, SUMMARY), json.dumps(summary, indent=2, default=str))
    try:
        return write_report(cfg.output)["report"]
    except Exception as exc:  # noqa: BLE001 - every stage's outputs are already written
        log.warning("the run report could not be written (%s: %s); `dakd report %s` retries", type(exc).__name__, exc,
                    cfg.output)
        return None
