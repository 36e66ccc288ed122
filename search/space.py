"""Sweep settings and per-architecture search spaces, read from YAML (search/spaces.yaml by
default), kept apart from the model code and turned into Ray Tune distributions here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ray import tune

from captune.search.budget import parse_duration
from captune.search.strategy import DEFAULT_SAMPLER_ARGS, EARLY_STOPPING, SAMPLERS, SamplerError, make_sampler
from captune.trainables.catalog import ARCHS, OBJECTIVES
from captune.trainables.config import KEYS, ConfigError, TrainConfig, read_yaml_mapping

DEFAULT_FILE = Path(__file__).with_name("spaces.yaml")
KINDS = ("loguniform", "uniform", "int", "choice")


@dataclass
class SweepSettings:
    trials: int = 12
    max_epochs: int = 12
    early_stopping: str = "none"  # "asha" or "none" (captune.search.strategy.EARLY_STOPPING)
    grace_period: int = 3  # ASHA's, when early_stopping is "asha"
    reduction_factor: int = 2
    seed: int = 0
    max_concurrent: int = 0  # 0: as many trials as the cluster's CPUs (or GPUs) hold
    max_failures: int = 2  # restarts of a trial whose process died, from its last checkpoint
    metric: str = "bleu4"  # the validation score the search optimises (captune.search.objective): bleu4 or cider
    sampler: str = "gp"  # Optuna's sampler (captune.search.strategy.SAMPLERS) and its keyword arguments
    sampler_args: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLER_ARGS["gp"]))
    time_budget: float = 0.0  # seconds the search may take (captune.search.budget); 0: no budget


@dataclass
class SearchSpace:
    """Searched keys as {key: (kind, args)} and fixed keys as {key: value}, for one architecture."""
    arch: str
    searched: dict[str, tuple[str, list]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def to_tune(self) -> dict[str, Any]:
        out = {}
        for key, (kind, args) in self.searched.items():
            if kind == "loguniform":
                out[key] = tune.loguniform(*args)
            elif kind == "uniform":
                out[key] = tune.uniform(*args)
            elif kind == "int":
                out[key] = tune.randint(args[0], args[1] + 1)  # randint's upper end is exclusive
            else:
                out[key] = tune.choice(args)
        return out

    def default_point(self, base: TrainConfig, source: str) -> dict[str, Any]:
        """The base configuration's values of the searched keys, checked to lie in the space."""
        point = {}
        for key, (kind, args) in self.searched.items():
            value = getattr(base, key)
            inside = value in args if kind == "choice" else args[0] <= value <= args[1]
            if not inside:
                raise ConfigError(f"{source}: the default {key}={value!r} of {self.arch} lies outside its "
                                  f"search space {{{kind}: {args}}}; widen the space or change the default")
            point[key] = value
        return point


def load_spaces(path: str | Path | None = None) -> tuple[SweepSettings, dict[str, SearchSpace]]:
    path = Path(path) if path else DEFAULT_FILE
    doc = read_yaml_mapping(path)
    unknown = set(doc) - {"sweep", *ARCHS}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected 'sweep', {', '.join(ARCHS)}")
    settings = _settings(doc.get("sweep") or {}, f"{path} [sweep]")
    return settings, {arch: _space(arch, doc.get(arch) or {}, f"{path} [{arch}]") for arch in ARCHS}


def _settings(section: dict, source: str) -> SweepSettings:
    known = {f.name for f in fields(SweepSettings)}
    values = {}
    for key, value in section.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        if key == "sampler_args":
            continue  # checked below, against the sampler
        if key == "time_budget":
            try:
                values[key] = parse_duration(value, f"{source}: time_budget")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            continue
        if key in ("metric", "sampler", "early_stopping"):
            allowed = {"metric": OBJECTIVES, "sampler": SAMPLERS, "early_stopping": EARLY_STOPPING}[key]
            if value not in allowed:
                raise ConfigError(f"{source}: {key}={value!r} must be one of {', '.join(allowed)}")
            values[key] = value
            continue
        lowest = 0 if key in ("seed", "max_concurrent", "max_failures") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise ConfigError(f"{source}: {key}={value!r} must be an integer >= {lowest}")
        values[key] = value
    kind = values.get("sampler", SweepSettings.sampler)
    values["sampler_args"] = _sampler_args(kind, dict(section.get("sampler_args", DEFAULT_SAMPLER_ARGS[kind])), source)
    return SweepSettings(**values)


def _sampler_args(kind: str, value, source: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: sampler_args must be a mapping of {kind}'s keyword arguments, got {value!r}")
    try:
        make_sampler(kind, 0, value)  # refused here, naming the file, not when the search starts
    except SamplerError as e:
        raise ConfigError(f"{source}: sampler_args: {e}") from None
    return value


def _space(arch: str, section: dict, source: str) -> SearchSpace:
    space = SearchSpace(arch)
    for key, spec in section.items():
        if key not in KEYS or key == "arch":
            raise ConfigError(f"{source}: unknown training key {key!r}; known keys: {', '.join(k for k in KEYS if k != 'arch')}")
        if not isinstance(spec, dict):
            space.fixed[key] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{source}: {key}: expected one of {{{' | '.join(KINDS)}: ...}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
            raise ConfigError(f"{source}: {key}: {kind} takes {'a list of values' if kind == 'choice' else '[low, high]'}, got {args!r}")
        if kind != "choice":
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args) \
                    or args[0] >= args[1]:
                raise ConfigError(f"{source}: {key}: {kind} needs finite numbers low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{source}: {key}: loguniform needs low > 0, got {args!r}")
            if kind == "int" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{source}: {key}: int needs integer bounds, got {args!r}")
        space.searched[key] = (kind, list(args))
    return space
