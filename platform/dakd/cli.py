"""The `dakd` command: one subcommand per job, the same options as `python jobs/<job>.py`.

Common options: --config FILE, --set key=value (repeatable), --json (the last stdout
line is one JSON object summarising what the job did), --verbose (Ray's worker output,
Ray Data progress bars and library logs; by default a job prints one line per stage, one
live progress line and its result: dakd.progress). Jobs connect to the Ray cluster named
by RAY_ADDRESS (or ray.address in config) or start a local one. `dakd report RUN_ROOT`
(re)writes the HTML report of a pipeline run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Callable

from dakd.config import JOB_CONFIGS, PRESET_SECTIONS, load_config, preset_names
from dakd.errors import DakdError
from dakd.redact import RedactingFilter, redact, redact_obj, redacted_std_streams
from dakd.progress import configure_logging, set_verbose


# job -> "module:function" that runs it (imported lazily so --help stays fast)
RUNNERS = {
    "ingest": "dakd.data.ingest:run_ingest",
    "balance": "dakd.data.balance:run_balance",
    "pipeline": "dakd.pipeline:run_pipeline",
    "train-jointnet": "dakd.train.jointnet:run_train_jointnet",
    "sample": "dakd.sample:run_sample",
    "synthesize": "dakd.synth.synthesize:run_synthesize",
    "evaluate-synthesis": "dakd.synth.evaluate:run_evaluate_synthesis",
    "train-saross": "dakd.train.saross:run_train_saross",
    "evaluate": "dakd.eval.evaluate:run_evaluate",
    "predict": "dakd.predict:run_predict",
    "tune": "dakd.tune.sweep:run_tune",
    "report": "dakd.report:write_report",  # takes RUN_ROOT, not a config (see run_job)
}


def _runner(job: str) -> Callable:
    module, function = RUNNERS[job].split(":")
    return getattr(importlib.import_module(module), function)


JOB_HELP = {
    "ingest": "read a data source (procedural, OSD, SOS, folder) into a Parquet shard set",
    "balance": "compute the balancing factor b of a shard set and record it in its manifest",
    "pipeline": "run every stage in order (ingest, balance, ...) under one output root",
    "train-jointnet": "train the SAR-JointNet teacher (3 stages) on Ray Train, with checkpoints and resume",
    "sample": "draw samples from a SAR-JointNet checkpoint into a PNG grid",
    "synthesize": "sample N (image, logits) pairs from a teacher across Ray Data actors into a synthetic shard set",
    "evaluate-synthesis": "FID and Inception Score of a synthetic shard set against a real one",
    "train-saross": "train the SAROSS-Net student (real-only, hard or soft DAKD) on Ray Train; best checkpoint by val mIoU",
    "evaluate": "evaluate a SAROSS-Net checkpoint at full resolution: confusion matrix, IoU, mIoU, F1, P, R, accuracy",
    "predict": "batch-segment a folder or bucket of images with Ray Data: coloured masks + class areas (Parquet, CSV)",
    "tune": "Ray Tune sweep (ASHA) over any config field of the student or teacher; every trial an MLflow child run",
}

# Flags that are shorthands for --set, offered by every job whose config has the field.
SHORTHAND_FIELDS = ("output", "overwrite", "on_error")


def shorthands(job: str) -> list[str]:
    return [f for f in SHORTHAND_FIELDS if f in JOB_CONFIGS[job].model_fields]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dakd", description="DAKD platform: SAR oil-spill segmentation on Ray.")
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for job, model in JOB_CONFIGS.items():
        p = sub.add_parser(job, help=JOB_HELP[job], description=f"{JOB_HELP[job]}. Config model: {model.__name__}.")
        add_job_options(p, job)
    p = sub.add_parser("report", help=REPORT_HELP, description=REPORT_HELP + ".")
    p.add_argument("run_root", metavar="RUN_ROOT", help="the pipeline's output (path, file:// or s3://)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")
    p.add_argument("--verbose", action="store_true", help="library logs too")
    return parser


REPORT_HELP = "write report.html of a pipeline run (data, curves, synthetic samples, FID/IS, evaluations, stage times)"


def add_job_options(p: argparse.ArgumentParser, job: str) -> None:
    if job in PRESET_SECTIONS:
        section = PRESET_SECTIONS[job]
        if section is None:
            what = "the pipeline preset"
        elif isinstance(section, dict):  # tune: several sections, each under this job's own name
            what = "the pipeline preset's " + ", ".join(f"{key} as {field}" for field, key in section.items())
        else:
            what = "this job's section of the pipeline preset"
        p.add_argument("--preset", choices=preset_names(),
                       help=f"start from {what} (dakd/presets/<name>.yaml); --config and --set apply on top")
    p.add_argument("--config", metavar="FILE", help="YAML config file (examples in jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted path, e.g. --set source.kind=sos (repeatable)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's worker output, Ray Data progress bars and library logs (default: one line per "
                        "stage, one progress line, warnings and the result)")
    fields = shorthands(job)
    if "output" in fields:
        p.add_argument("--output", metavar="URI", help="output location (path, file:// or s3://)")
    if "overwrite" in fields:
        p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    if "on_error" in fields:
        p.add_argument("--on-error", dest="on_error", choices=["fail", "skip"],
                       help="fail on the first bad pair (default) or skip bad pairs and list them in the manifest")


def run_job(job: str, args: argparse.Namespace) -> dict:
    if job == "report":
        return _runner(job)(args.run_root)
    overrides = list(args.overrides)
    for field in shorthands(job):
        value = getattr(args, field, None)
        if value is not None:
            overrides.append(f"{field}={json.dumps(value)}")
    preset = getattr(args, "preset", None)
    cfg = load_config(JOB_CONFIGS[job], args.config, overrides, preset=(preset, job) if preset else None)
    if args.print_config:
        print(json.dumps(redact_obj(cfg.model_dump(mode="json")), indent=2))
        return {}
    return _runner(job)(cfg)


def main(argv: list[str] | None = None, job: str | None = None) -> int:
    """Entry point of `dakd` (and, with `job`, of `python jobs/<job>.py`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if job is not None:
        parser = argparse.ArgumentParser(prog=f"jobs/{job}.py", description=JOB_HELP[job])
        add_job_options(parser, job)
        args = parser.parse_args(argv)
        args.job = job
    else:
        args = build_parser().parse_args(argv)
    if args.verbose:
        set_verbose(True)
    configure_logging()
    for handler in logging.getLogger().handlers:  # credentials never reach a log line
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        with redacted_std_streams():  # libraries (MLflow) print tracking URIs straight to stdout
            summary = run_job(args.job, args)
    except DakdError as exc:
        print(redact(f"dakd {args.job}: error: {exc}"), file=sys.stderr, flush=True)
        if args.json:
            _end_output()
            print(json.dumps({"job": args.job, "ok": False, "error": redact(exc)}), flush=True)
        return 2
    if args.json and not getattr(args, "print_config", False):
        _end_output()
        print(json.dumps(redact_obj({"ok": True, **summary}), default=str), flush=True)
    return 0


def _end_output() -> None:
    """Before the --json line: stop the Ray this job started (nothing of it can print after
    the line) and flush what was printed so far."""
    from dakd.runtime import shutdown_ray

    shutdown_ray()
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
