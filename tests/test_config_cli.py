"""Config models, YAML + --set overrides, and the CLI surface (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dakd.cli import JOB_HELP, main
from dakd.config import (JOB_CONFIGS, PIPELINE_STAGES, PRESET_SECTIONS, IngestConfig, PipelineConfig,
                         TuneConfig, dump_config, load_config, parse_override, preset_names)
from dakd.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_and_override_types(tmp_path):
    cfg = load_config(IngestConfig, None, ["rows_per_file=7", "source.procedural.looks=2", "overwrite=true"])
    assert cfg.rows_per_file == 7 and cfg.source.procedural.looks == 2 and cfg.overwrite is True
    # defaults untouched elsewhere
    assert cfg.on_error == IngestConfig().on_error


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output: /tmp/x\nsource:\n  kind: sos\n  root: /data/sos\n")
    cfg = load_config(IngestConfig, str(path), ["source.sensors=[palsar]"])
    assert cfg.output == "/tmp/x" and cfg.source.kind == "sos" and cfg.source.sensors == ["palsar"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["rows_per_fil=3"], "rows_per_fil"),                    # unknown top-level field
        (["source.procedural.lookz=3"], "source.procedural.lookz"),  # unknown nested field
        (["rows_per_file=zero"], "rows_per_file"),               # wrong type
        (["rows_per_file=0"], "rows_per_file"),                  # out of range
        (["source.kind=sar"], "source.kind"),                    # not a choice
        (["source.kind=osd"], "source.root"),                    # missing dependent field
    ],
)
def test_config_errors_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(IngestConfig, None, overrides)
    assert needle in str(err.value)


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output: x\nsource:\n  knd: sos\n")
    with pytest.raises(ConfigError) as err:
        load_config(IngestConfig, str(path))
    assert "source.knd" in str(err.value) and "unknown field" in str(err.value)


def test_override_parsing():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=null") == ("a", None)
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_example_configs_validate():
    configs = os.path.join(REPO, "jobs", "configs")
    names = sorted(os.listdir(configs))
    assert names
    for name in names:
        load_config(TuneConfig, os.path.join(configs, name))


# what a paper-scale preset needs from the user (nothing is downloaded)
PAPER_SCALE_NEEDS = ["source.root=/data/x", "evaluate_synthesis.inception_weights=/weights/inception.pth"]


@pytest.mark.parametrize("name", ["tiny", "demo", "osd", "sos", "sos-cpu"])
def test_every_preset_builds_every_job_it_serves(name):
    assert name in preset_names()
    needs = {"osd": PAPER_SCALE_NEEDS, "sos": PAPER_SCALE_NEEDS, "sos-cpu": PAPER_SCALE_NEEDS[:1]}.get(name, [])
    pipe = load_config(PipelineConfig, None, needs, preset=(name, "pipeline"))
    assert pipe.stages == list(PIPELINE_STAGES)
    for job, section in PRESET_SECTIONS.items():
        if job == "pipeline":
            continue
        section_needs = {"ingest": needs[:1], "evaluate-synthesis": [n.split(".", 1)[1] for n in needs[1:]],
                         "tune": needs[1:]}
        cfg = load_config(JOB_CONFIGS[job], None, section_needs.get(job, []), preset=(name, job))
        # a job's preset is its section of the pipeline preset, field for field
        if isinstance(section, tuple):
            assert {k: getattr(cfg, k) for k in section} == {k: getattr(pipe, k) for k in section}, job
        elif isinstance(section, dict):  # tune: its student/teacher/... sections are the pipeline's
            for field, key in section.items():
                assert dump_config(getattr(cfg, field)) == dump_config(getattr(pipe, key)), (job, field)
        else:
            assert dump_config(cfg) == dump_config(getattr(pipe, section)), job
    # every preset selects students on a val split and reports on test
    assert pipe.saross.val_split == "val" and pipe.evaluate.split == "test"
    assert pipe.source.val_fraction is not None or "val" in pipe.source.procedural.splits
    if name in ("osd", "sos"):  # the paper's numbers
        assert pipe.jointnet.use_gpu and pipe.jointnet.crop_size == 256 and pipe.saross.model.encoder == "mambavision_b"
        assert pipe.saross.model.pretrained == "imagenet"
        assert pipe.synthesize.count == {"osd": 4480, "sos": 6400}[name] and pipe.synthesize.steps == 200


def test_preset_file_and_set_layer_in_order(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("jointnet:\n  stages:\n    stage1: {iterations: 7, lr: 0.01}\n")
    cfg = load_config(PipelineConfig, str(path), ["jointnet.crop_size=64"], preset=("tiny", "pipeline"))
    assert cfg.jointnet.stages.stage1.iterations == 7  # the file over the preset ...
    assert cfg.jointnet.stages.stage2.iterations == 4  # ... merged key by key, the preset's other keys kept
    assert cfg.jointnet.crop_size == 64 and cfg.jointnet.model.block_out_channels == [8, 16]
    assert main(["pipeline", "--preset", "tiny", "--set", "synthesize.count=3", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["synthesize"]["count"] == 3 and printed["source"]["procedural"]["height"] == 32
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["pipeline", "--preset", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(PipelineConfig, None, [], preset=("huge", "pipeline"))
    with pytest.raises(ConfigError, match="source.root is required"):
        load_config(PipelineConfig, None, [], preset=("osd", "pipeline"))


@pytest.mark.parametrize("job", sorted(JOB_HELP))
def test_every_subcommand_has_help(job, capsys):
    with pytest.raises(SystemExit) as ex:
        main([job, "--help"])
    assert ex.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("job", sorted(JOB_HELP))
def test_job_scripts_have_the_same_options(job):
    out = subprocess.run([sys.executable, os.path.join(REPO, "jobs", f"{job.replace('-', '_')}.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--config", "--set", "--json"):
        assert flag in out


def test_config_error_exit_code_and_json(capsys):
    code = main(["ingest", "--set", "rows_per_file=-1", "--json"])
    captured = capsys.readouterr()
    assert code == 2
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["ok"] is False and "rows_per_file" in summary["error"]
    assert "rows_per_file" in captured.err


def test_print_config_resolves_shorthands(capsys):
    assert main(["ingest", "--print-config", "--overwrite", "--on-error", "skip", "--output", "s3://b/p"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["overwrite"] is True and cfg["on_error"] == "skip" and cfg["output"] == "s3://b/p"


def test_same_job_counts_settings_added_since_as_their_defaults():
    """A pipeline re-run skips a finished stage whose stored config matches, also when dakd has
    gained settings since (at their defaults); any real difference redoes it."""
    from dakd.config import TrainSarossConfig, dump_config
    from dakd.pipeline import same_job

    cfg = load_config(TrainSarossConfig, None, ["epochs=3", "loss.mode=soft"])
    stored = dump_config(cfg)
    older = {k: v for k, v in stored.items() if k != "ema_decay"}  # written before these settings existed
    older["loss"] = {k: v for k, v in stored["loss"].items() if k != "soft_synthetic"}
    assert same_job(stored, cfg) and same_job(older, cfg)
    assert same_job({**stored, "ray": {"address": "auto"}}, cfg)  # where it runs does not matter
    assert not same_job(older, cfg.model_copy(update={"ema_decay": 0.99}))  # a new setting, not at its default
    assert not same_job({**stored, "epochs": 4}, cfg)
    assert not same_job({**stored, "retired_setting": 1}, cfg)  # a setting dakd no longer has
