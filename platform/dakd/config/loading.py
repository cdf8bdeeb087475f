"""Loading a job's config: preset <- YAML file <- dotted `--set` overrides -> validated model."""

from __future__ import annotations

import os

import yaml
from pydantic import BaseModel, ValidationError

from dakd.config.base import Strict
from dakd.errors import ConfigError
from dakd.redact import redact


# ---------------------------------------------------------------- loading
def set_dotted(data: dict, dotted: str, value, model: type[BaseModel]) -> None:
    """Set data[a][b][c] = value for dotted 'a.b.c', checking each key against the model."""
    keys = dotted.split(".")
    node, cls = data, model
    for i, key in enumerate(keys):
        where = ".".join(keys[: i + 1])
        if cls is not None:
            if key not in cls.model_fields:
                valid = ", ".join(sorted(cls.model_fields))
                raise ConfigError(f"--set {dotted}: unknown field '{where}' (valid here: {valid})")
            annotation = cls.model_fields[key].annotation
            cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if i == len(keys) - 1:
            node[key] = value
        else:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child


def parse_override(text: str) -> tuple[str, object]:
    """'a.b=c' -> ('a.b', yaml value of c)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set ingest.rows_per_file=128")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from exc
    return key, value


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = err["msg"]
        got = err.get("input")
        got_text = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        lines.append(redact(f"  {where}: {msg}{got_text}"))
    return "\n".join(lines)


# ---------------------------------------------------------------- presets
PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")
# job -> the part of a pipeline preset that configures it: None, the whole preset; a name, that
# section; a tuple, those top-level keys; a dict, {the job's field: the preset's section}
PRESET_SECTIONS: dict[str, str | tuple | dict | None] = {
    "pipeline": None, "ingest": ("source", "rows_per_file", "on_error"), "train-jointnet": "jointnet",
    "synthesize": "synthesize", "evaluate-synthesis": "evaluate_synthesis", "train-saross": "saross",
    "evaluate": "evaluate",
    "tune": {"student": "saross", "teacher": "jointnet", "synthesize": "synthesize",
             "evaluate_synthesis": "evaluate_synthesis"}}


def preset_names() -> list[str]:
    """The pipeline presets shipped with the package (dakd/presets/<name>.yaml)."""
    return sorted(f[:-5] for f in os.listdir(PRESETS_DIR) if f.endswith(".yaml"))


def load_preset(name: str, job: str = "pipeline") -> dict:
    """Preset `name` as config data for `job`: the whole pipeline preset, or the job's section of it."""
    if job not in PRESET_SECTIONS:
        raise ConfigError(f"--preset: {job} has no presets (jobs with presets: {', '.join(PRESET_SECTIONS)})")
    if name not in preset_names():
        raise ConfigError(f"--preset {name}: unknown preset (one of {', '.join(preset_names())})")
    with open(os.path.join(PRESETS_DIR, f"{name}.yaml")) as f:
        data = yaml.safe_load(f) or {}
    section = PRESET_SECTIONS[job]
    if section is None:
        return data
    if isinstance(section, tuple):
        return {k: data[k] for k in section if k in data}
    if isinstance(section, dict):
        return {field: dict(data[key]) for field, key in section.items() if key in data}
    return dict(data.get(section, {}))


def _merge(base: dict, top: dict) -> dict:
    """Nested dicts merged key by key (top wins); other values replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(model: type[Strict], path: str | None = None, overrides: list[str] | tuple = (),
                preset: tuple[str, str] | None = None) -> Strict:
    """Preset (optional: (name, job)) <- YAML file (optional) <- dotted overrides -> validated
    model; ConfigError on any problem."""
    data: dict = load_preset(*preset) if preset else {}
    origin = f"preset {preset[0]}" if preset else "defaults"
    if path:
        origin = f"{origin} + {path}" if preset else path
        if not os.path.exists(path):
            raise ConfigError(f"--config {path}: file not found")
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields at the top level, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value, model)
    if overrides:
        origin += " + --set overrides"
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def dump_config(cfg: BaseModel) -> dict:
    """A config as plain JSON-able data (for manifests, provenance and MLflow params)."""
    return cfg.model_dump(mode="json")
