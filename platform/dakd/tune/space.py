"""Search spaces: `space:` of a TuneConfig (YAML) -> Ray Tune's param_space, checked first.

A key is a dotted config path starting with the job section it sets (`student.lr`,
`student.loss.temperature`, `teacher.b`, `synthesize.steps`); a value is one of
  {grid: [v, ...]}         every value, every combination with the other grids
  {choice: [v, ...]}       one value at random per sample
  {uniform: [lo, hi]}      a float in [lo, hi)
  {loguniform: [lo, hi]}   a float in [lo, hi), log-uniform (0 < lo)
  {randint: [lo, hi]}      an int in [lo, hi) (hi excluded)
Every path is checked against the section's config model, and every value (grid and
choice values; range bounds and an interior point of a range) by building that job's
config with it, so a value the field's type refuses fails here, before any trial.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from dakd.config import (Strict, SynthesizeConfig, TrainJointNetConfig, TrainSarossConfig, set_dotted,
                         dump_config)
from dakd.errors import ConfigError

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SECTIONS: dict[str, type[Strict]] = {"student": TrainSarossConfig, "teacher": TrainJointNetConfig,
                                     "synthesize": SynthesizeConfig}
LEVEL_SECTIONS = {"student": ("student",), "teacher": ("teacher", "synthesize", "student")}
# fields a sweep sets itself for every trial (where it writes, what it tracks, what feeds what)
MANAGED = {"student": {"output", "run_name", "tracking", "ray"},
           "teacher": {"output", "run_name", "tracking", "ray", "init_checkpoint"},
           "synthesize": {"output", "teacher", "tracking", "ray"}}
INTERIOR = 0.3719  # where in a range the interior probe sits (not a round number, so an int field refuses it)


class Dimension:
    """One swept path: kind, values (grid/choice, as the config holds them) or bounds."""

    def __init__(self, key: str, kind: str, values: list):
        self.key, self.kind, self.values = key, kind, values
        self.section, _, self.path = key.partition(".")

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    @property
    def categorical(self) -> bool:
        return self.kind in ("grid", "choice")

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def largest(self):
        """The largest value this dimension can take (ranges: the upper bound)."""
        return max(self.values) if self.kind != "randint" else self.values[1] - 1

    def to_dict(self) -> dict:
        return {self.kind: list(self.values)}


def get_dotted(data: dict, path: str):
    node = data
    for key in path.split("."):
        node = node[key]
    return node


def check_path(model: type[BaseModel], key: str, path: str) -> None:
    """ConfigError unless `path` names a field of `model` (walking nested config models)."""
    cls: type[BaseModel] | None = model
    parts = path.split(".")
    for i, part in enumerate(parts):
        if cls is None:  # inside a plain dict field (e.g. splits): any key
            return
        if part not in cls.model_fields:
            where = ".".join(parts[:i]) or "(top level)"
            valid = ", ".join(sorted(cls.model_fields))
            raise ConfigError(f"space.{key}: '{part}' is not a field of {model.__name__} at {where} "
                              f"(valid there: {valid})")
        annotation = cls.model_fields[part].annotation
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def build(model: type[Strict], base: dict, overrides: dict[str, Any]) -> Strict:
    """A job config: `base` (a full dump) with dotted `overrides` set; raises ValidationError."""
    import copy

    data = copy.deepcopy(base)
    for path, value in overrides.items():
        set_dotted(data, path, value, model)
    return model.model_validate(data)


def _numbers(key: str, kind: str, values: list) -> list:
    if len(values) != 2:
        raise ConfigError(f"space.{key}: {kind} expects [low, high], got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool):
            raise ConfigError(f"space.{key}: {kind} bounds must be numbers, got {v!r}")
        try:
            out.append(int(v) if kind == "randint" and float(v) == int(float(v)) else float(v))
        except (TypeError, ValueError):
            raise ConfigError(f"space.{key}: {kind} bounds must be numbers, got {v!r}") from None
    lo, hi = out
    if kind == "randint" and not all(isinstance(v, int) for v in out):
        raise ConfigError(f"space.{key}: randint bounds must be integers, got {values!r}")
    if not lo < hi:
        raise ConfigError(f"space.{key}: {kind} needs low < high, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"space.{key}: loguniform needs 0 < low, got {values!r}")
    return out


def parse_space(space: dict[str, dict[str, list]], level: str, bases: dict[str, Strict]) -> list[Dimension]:
    """Check a `space:` mapping against the job configs of `level`; returns its dimensions.

    bases: section -> that job's base config (values are checked on top of it)."""
    if not space:
        raise ConfigError("space: empty; give at least one dotted path, e.g. "
                          "space: {student.loss.temperature: {grid: [1, 2, 4]}}")
    allowed = LEVEL_SECTIONS[level]
    dims = []
    for key, spec in space.items():
        section, _, path = key.partition(".")
        if section not in allowed or not path:
            raise ConfigError(f"space.{key}: a path must start with the section it sets, one of "
                              f"{', '.join(s + '.' for s in allowed)} (level {level!r}), e.g. {allowed[0]}.lr")
        model = SECTIONS[section]
        check_path(model, key, path)
        if path.split(".")[0] in MANAGED[section]:
            raise ConfigError(f"space.{key}: {section}.{path.split('.')[0]} is set by the sweep for each trial; "
                              f"it cannot be swept")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"space.{key}: expected one of {{{': [...]}, {'.join(KINDS)}: [...]}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        base = dump_config(bases[section])
        if kind in ("grid", "choice"):
            if not values:
                raise ConfigError(f"space.{key}: {kind} needs at least one value")
            probes, normalised = list(values), []
        else:
            values = _numbers(key, kind, values)
            lo, hi = values
            probes = [lo, hi - 1] if kind == "randint" else [lo, lo + INTERIOR * (hi - lo)]
            if kind == "uniform":
                probes.append(hi)  # [lo, hi) but floats come close to hi: it must be valid too
        for v in probes:
            try:
                cfg = build(model, base, {path: v})
            except ValidationError as exc:
                msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
                what = f"value {v!r}" if kind in ("grid", "choice") else f"{kind} {values!r} (probe {v!r})"
                raise ConfigError(f"space.{key}: {what} refused by {model.__name__}: {msgs}") from None
            except ConfigError as exc:
                raise ConfigError(f"space.{key}: {exc}") from None
            if kind in ("grid", "choice"):
                normalised.append(get_dotted(dump_config(cfg), path))  # as the config holds it (e.g. '1e-5' -> 1e-05)
        dims.append(Dimension(key, kind, normalised if kind in ("grid", "choice") else values))
    _check_grid_product(dims, bases)
    return dims


def _check_grid_product(dims: list[Dimension], bases: dict[str, Strict], limit: int = 256) -> None:
    """Every combination of the grid values builds valid configs (cross-field rules), when few."""
    import itertools

    grids = [d for d in dims if d.kind == "grid"]
    sizes = 1
    for d in grids:
        sizes *= len(d.values)
    if len(grids) < 2 or sizes > limit:
        return
    for combo in itertools.product(*(d.values for d in grids)):
        for section in {d.section for d in grids}:
            over = {d.path: v for d, v in zip(grids, combo) if d.section == section}
            try:
                build(SECTIONS[section], dump_config(bases[section]), over)
            except ValidationError as exc:
                pretty = ", ".join(f"{section}.{p}={v!r}" for p, v in over.items())
                raise ConfigError(f"space: the grid combination {pretty} is refused: "
                                  f"{exc.errors()[0]['msg']}") from None


def param_space(dims: list[Dimension]) -> dict:
    """Ray Tune param_space: {dotted key: domain}."""
    return {d.key: d.tune_domain() for d in dims}


def split_overrides(trial_config: dict, dims: list[Dimension]) -> dict[str, dict[str, Any]]:
    """A trial's sampled {key: value} -> {section: {path: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for d in dims:
        out.setdefault(d.section, {})[d.path] = trial_config[d.key]
    return out
