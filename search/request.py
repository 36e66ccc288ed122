"""A sweep as asked (`captune sweep`'s options) and as planned: its settings, each architecture's
space and base configuration checked before anything starts, and the job each architecture's
search task is handed. Light: the driver and the search tasks both import it."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from captune.data.cache import default_cache_dir
from captune.infra.mlflow_names import FAST_WITHIN_TAG, SEEDS_TAG, TOP_TAG
from captune.infra.storage import is_uri
from captune.search.space import DEFAULT_FILE, SearchSpace, SweepSettings, load_spaces
from captune.trainables.catalog import ARCHS, HEADLINE, OBJECTIVES, SCORE_LABELS
from captune.trainables.config import ConfigError, TrainConfig, compose, preset_layers, replace


class SweepExists(ConfigError):
    """A sweep of that name exists and --resume was not given (or the reverse)."""


# A sweep's name becomes folder and file names (its Tune results, its Optuna study), a Ray actor's
# name and an MLflow filter's quoted value: one rule keeps it all of those at once.
NAME_RULE = ("letters, digits, '.', '_' and '-', starting with a letter or a digit, at most 100 characters, "
             "no '..'")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def name_fault(name: str) -> str | None:
    """Why `name` cannot name a sweep (NAME_RULE), or None when it can."""
    if not _NAME.fullmatch(name) or ".." in name:
        return f"{name!r} cannot name a sweep: a sweep name is {NAME_RULE}"
    return None


def check_name(name: str, option: str = "--name") -> None:
    fault = name_fault(name)
    if fault:
        raise ConfigError(f"{option} {fault}")


DEFAULT_TOP = 3  # configurations per search retrained over the seeds (captune.search.seed_choice)


@dataclass
class SweepRequest:
    name: str
    data_root: str
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    trials: int | None = None  # None: the config file's
    metric: str | None = None  # the objective, bleu4 or cider; None: the config file's (captune.search.objective)
    epochs: int | None = None
    time_budget: float | None = None  # seconds (captune.search.budget); None: the config file's
    config_file: str | None = None
    overrides: dict = field(default_factory=dict)  # --set, applied to every trial
    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0  # 0: CPU trials
    storage: str | None = None  # None: default_storage()
    resume: bool = False
    warm_start: str | None = None  # a new sweep's searches told another sweep's trials (captune.search.warm_start)
    more_trials: int = 0  # with resume: trials added to each finished search (a Tune run of its own, the study going on)
    seeds: int | None = None  # new seeds per configuration retrained; None: as the sweep started (sweep_seeds)
    top: int | None = None  # configurations per search retrained over the seeds; None: as the sweep started, else 3
    control: bool = True  # after each search, train its champion's configuration image-blind
    fast_within: float | None = None  # @fast's reach below the champion's score; None: the seed noise (captune.search.tradeoff)
    tracking_uri: str | None = None
    address: str | None = None
    verbose: bool = False  # Tune's own output and every trial's epoch lines, not the driver's view


@dataclass
class ArchSearch:
    arch: str
    space: SearchSpace
    base: TrainConfig
    default_point: dict


@dataclass
class ArchOutcome:
    arch: str
    parent_run_id: str
    best: dict | None  # {"trial_id", "run_id", "metric", "score" (its best_<metric>), "epoch" (that epoch),
    #                     "scores" (that epoch's, every score), "config"}
    trials: int
    errors: int
    champion: dict | None = None  # from captune.search.registry.promote
    control: dict | None = None  # from captune.search.control.run_control
    states: dict = field(default_factory=dict)  # {end state: trials} (captune.search.objective)
    first_error: str | None = None  # why the first trial that failed or diverged did
    convergence: str | None = None  # whether more trials could still gain, in words (captune.search.convergence)
    choice: object = None  # its champion chosen over seeds (captune.search.seed_choice.SeedChoice), with --seeds

    def summary(self) -> list[str]:
        """What the search ended with, a line each: its champion trial and its registration, how
        it was chosen over seeds, its decoding, whether more trials could gain, its control."""
        if self.best is None:
            return [self.no_model_text()]
        c, metric = self.champion or {}, self.best["metric"]
        label = SCORE_LABELS[metric]
        verdict = ("now champion" if c.get("promoted") else
                   f"champion stays v{c['previous']['version']} ({label} {c['previous']['score']:.4f})") if c else ""
        others = ", ".join(f"{SCORE_LABELS[k]} {v:.4f}" for k, v in self.best["scores"].items()
                           if k in HEADLINE and k != metric)
        lines = [f"{'champion' if self.choice else 'best'} trial {self.best['trial_id']}: best validation {label} "
                 f"{self.best['score']:.4f} (epoch {self.best['epoch']}; {others}); registered {c.get('name')} "
                 f"v{c.get('version')}, {verdict}; {self.errors} of {self.trials} trials failed"]
        lines += [self.choice.statement()] if self.choice else []
        lines += [f"champion's {c['decoding']}"] if c.get("decoding") else []
        lines += [self.convergence] if self.convergence else []
        if self.control:
            lines.append(f"image-blind control: best validation {label} "
                         f"{self.control['scores'][metric]['control']:.4f}; {self.control['verdict']['text']}")
        return lines

    def no_model_text(self) -> str:
        """Why the search has no model to register, and what to change."""
        diverged, failed = self.states.get("diverged", 0), self.states.get("failed", 0)
        said = [f"{n} {state}" for state, n in sorted(self.states.items())]
        text = f"no usable model: of {self.trials} trial(s), {', '.join(said) or 'none ran'}"
        if diverged:
            text += (" (the training loss became NaN or infinite: lower the learning rate, the `lr` range of the "
                     "sweep file, or set `grad_clip`)")
        if failed or self.first_error:
            text += f"; the first error: {self.first_error}"
        return text


@dataclass
class SearchJob:
    """One architecture's search, as the driver hands it to the task that runs it."""
    req: SweepRequest
    settings: SweepSettings
    search: ArchSearch
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    root: str
    cpus: int
    concurrent: int  # this search's share of the slots (all of them, when it runs alone)
    slots: int  # trial slots shared by the sweep's searches (captune.search.slots); 0: `concurrent` is fixed
    restore: bool  # Tune's experiment state exists: resume it
    deadline: float | None  # the sweep's time budget ends then (time.time(); captune.search.budget); None: no budget
    part: int = 0  # which Tune run of the search: 0 the first, k the k-th `--more-trials` (tune_path)
    trials: int = 0  # this Tune run's trials (the settings' for part 0, --more-trials' after)
    feature_set: str | None = None  # the manifest of shared features the trials read (captune.trainables.feature_job)
    relay: object = None  # the driver's MLflow relay (captune.infra.mlflow_relay), for what runs on any node

    @property
    def experiment(self) -> str:
        """The search's name: its Optuna study's, and its first Tune run's."""
        return f"{self.req.name}-{self.search.arch}"

    @property
    def tune_name(self) -> str:
        return tune_name(self.req.name, self.search.arch, self.part)

    @property
    def tune_path(self) -> str:
        return f"{self.root}/{self.tune_name}"

    def trial_base(self) -> dict:
        """The TrainConfig values every trial (and rerun) of this search starts from: with shared
        features, their folder is the cache the trials read."""
        local = self.feature_set and not is_uri(self.feature_set)  # (from object storage: fetched per node)
        shared = {"cache_dir": str(Path(self.feature_set).parent)} if local else {}
        return {**self.search.base.to_dict(), **shared}

    @property
    def path(self) -> str:
        return f"{self.root}/{self.experiment}"


def plan(req: SweepRequest) -> tuple[SweepSettings, list[ArchSearch]]:
    """Everything checked before any trial starts: settings, spaces, every architecture's base
    configuration and that its defaults lie inside its space."""
    check_name(req.name)  # first: the name makes paths, and a bad one should not wait for anything else
    for arch in req.archs:
        if arch not in ARCHS:
            raise ConfigError(f"--arch: unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if req.more_trials and not req.resume:
        raise ConfigError(f"--more-trials {req.more_trials}: it adds trials to a sweep that has run; give --resume "
                          f"with it (a new sweep takes --trials)")
    if req.top is not None and not req.seeds and not req.resume:  # (a resume reads the seeds it started with)
        raise ConfigError(f"--top {req.top}: it says how many configurations are retrained over new seeds to "
                          f"choose each champion; give --seeds K (2 or more) with it")
    if req.fast_within is not None and not 0 <= req.fast_within < float("inf"):
        raise ConfigError(f"--fast-within {req.fast_within:g}: a validation score difference, 0 or more (how far "
                          f"below the champion's score @fast may be)")
    if req.warm_start is not None:
        check_name(req.warm_start, "--warm-start")
        if req.resume or req.warm_start == req.name:
            raise ConfigError(f"--warm-start {req.warm_start}: it starts a new sweep from another sweep's trials; "
                              + ("a resumed sweep goes on from its own" if req.resume else "name another sweep"))
    settings, spaces = load_spaces(req.config_file)
    if req.trials is not None:
        settings.trials = req.trials
    if req.epochs is not None:
        settings.max_epochs = req.epochs
    if req.time_budget is not None:
        settings.time_budget = req.time_budget
    if req.metric is not None:
        if req.metric not in OBJECTIVES:
            raise ConfigError(f"--metric {req.metric!r}: choose one of {', '.join(OBJECTIVES)}")
        settings.metric = req.metric
    settings.grace_period = min(settings.grace_period, settings.max_epochs)
    source = str(req.config_file or DEFAULT_FILE)  # the installed file, wherever captune is installed
    searches = []
    for arch in req.archs:
        space = spaces[arch]
        if not space.searched:  # Tune would fail later, after Ray and MLflow started, with "no search space"
            raise ConfigError(f"{source} [{arch}]: nothing to search: no key has a range or choices "
                              f"({{loguniform: [low, high]}}, {{choice: [...]}}, ...); give one a range, or train the "
                              f"single configuration with `captune train`")
        if "metric" in req.overrides or "metric" in space.fixed or "metric" in space.searched:
            raise ConfigError(f"{'--set' if 'metric' in req.overrides else f'{source} [{arch}]'}: metric is the "
                              f"sweep's objective, the same for every trial: choose it with --metric or in the "
                              f"file's `sweep:` section")
        fixed_by_set = sorted(set(req.overrides) & set(space.searched))
        if fixed_by_set:  # a trial's drawn value would silently win over --set
            raise ConfigError(f"--set {', '.join(fixed_by_set)}: {source} searches {' and '.join(fixed_by_set)} for "
                              f"{arch}; to fix it, copy that file, give it a plain value there and pass the copy "
                              f"with --config")
        base = compose(arch, preset_layers(req.data_root, arch) + [(f"{source} [{arch}]", space.fixed),
                                                                   ("--set", req.overrides)])
        base = replace(base, epochs=settings.max_epochs, metric=settings.metric)
        for key in space.searched:  # each bound of the space must make a valid configuration
            kind, args = space.searched[key]
            for value in (args if kind == "choice" else args[:2]):
                try:
                    replace(base, **{key: value})
                except (ConfigError, TypeError) as e:
                    raise ConfigError(f"{source} [{arch}]: {key} value {value!r} is invalid: {e}") from None
        searches.append(ArchSearch(arch, space, base, space.default_point(base, f"{source} [{arch}]")))
    return settings, searches


def tune_name(sweep: str, arch: str, part: int) -> str:
    """The Tune run of a search's `part`: the first (0), then one per `--resume --more-trials`."""
    return f"{sweep}-{arch}" + (f"-more{part}" if part else "")


def default_storage() -> str:
    """$CAPTUNE_STORAGE/sweeps (a cluster's one storage setting, see cluster.yaml), else a local folder."""
    shared = os.environ.get("CAPTUNE_STORAGE", "").rstrip("/")
    return f"{shared}/sweeps" if shared else "runs/sweeps"


def storage_root(storage: str | None) -> str:
    storage = storage or default_storage()
    return storage if "://" in storage else str(Path(storage).resolve())


def optuna_url(root: str, name: str) -> str:
    """The Optuna study's SQLite file sits beside the Tune results when those are on a local or
    mounted path; with s3:// results it stays on the driver's disk."""
    folder = Path(root) if "://" not in root else default_cache_dir() / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / f'{name}-optuna.db'}"


def resume_command(req: SweepRequest) -> str:
    """The command that goes on with this sweep."""
    q = shlex.quote
    words = ["captune sweep --name", q(req.name), "--data", q(req.data_root), "--resume"]
    if req.config_file:
        words += ["--config", q(req.config_file)]
    if sorted(req.archs) != sorted(ARCHS):
        words += ["--arch", q(",".join(req.archs))]
    for flag, value in (("--trials", req.trials), ("--epochs", req.epochs), ("--metric", req.metric),
                        ("--time-budget", None if req.time_budget is None else f"{req.time_budget:g}s"),
                        ("--storage", req.storage),
                        ("--tracking-uri", req.tracking_uri), ("--address", req.address)):
        if value is not None:
            words += [flag, q(str(value))]
    words += [f"--set {q(f'{k}={v}')}" for k, v in req.overrides.items()]
    if req.workers_per_trial != 1:
        words += ["--workers-per-trial", str(req.workers_per_trial)]
    if req.gpus_per_worker:
        words += ["--gpus-per-worker", f"{req.gpus_per_worker:g}"]
    if req.seeds:
        words += ["--seeds", str(req.seeds)]
    if req.seeds and req.top not in (None, DEFAULT_TOP):
        words += ["--top", str(req.top)]
    if req.fast_within is not None:
        words += ["--fast-within", f"{req.fast_within:g}"]
    if not req.control:
        words.append("--no-control")
    return " ".join(words)


def sweep_seeds(client, experiment_id: str, req: SweepRequest) -> int:
    """The sweep's seeds and top (how many configurations per search are retrained over them), and
    its --fast-within,
    remembered in its experiment (SEEDS_TAG, TOP_TAG) as it starts, so that `--resume` without them
    goes on as the sweep was started; given, they win and are remembered. Sets req.seeds and
    req.top; returns the seeds."""
    tags = client.get_experiment(experiment_id).tags if req.resume else {}
    if req.seeds is None and req.resume:
        req.seeds = int(tags.get(SEEDS_TAG, 0))  # (0: a sweep from before)
    if req.top is None:
        req.top = int(tags.get(TOP_TAG, 1 if SEEDS_TAG in tags else DEFAULT_TOP))  # (1: from before --top)
    req.seeds = req.seeds or 0
    if req.fast_within is None and tags.get(FAST_WITHIN_TAG):
        req.fast_within = float(tags[FAST_WITHIN_TAG])
    if req.fast_within is not None:
        client.set_experiment_tag(experiment_id, FAST_WITHIN_TAG, f"{req.fast_within:g}")
    client.set_experiment_tag(experiment_id, SEEDS_TAG, str(req.seeds))
    client.set_experiment_tag(experiment_id, TOP_TAG, str(req.top))
    return req.seeds
