"""Config models, YAML + --set overrides, and the CLI surface (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dakd.cli import JOB_HELP, main
from dakd.config import IngestConfig, PipelineConfig, TrainJointNetConfig, TrainSarossConfig, TuneConfig, load_config, parse_override
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


PRESET_MODELS = {"ingest": IngestConfig, "jointnet": TrainJointNetConfig, "saross": TrainSarossConfig, "tune": TuneConfig, "demo": PipelineConfig,
                 "pipeline": PipelineConfig}


def test_presets_validate():
    configs = os.path.join(REPO, "jobs", "configs")
    names = sorted(os.listdir(configs))
    assert names
    for name in names:
        model = PRESET_MODELS[name.split("_")[0].split(".")[0]]
        load_config(model, os.path.join(configs, name))


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
