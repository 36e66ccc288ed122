"""Search strategies replayed on a learning-curve table (benchmarks/curves.py) with a simulated
clock and W parallel workers: how soon each finds a configuration within reach of the table's best.

    python benchmarks/search_replay.py --table benchmarks/curves/synth1000.jsonl.gz [--metric bleu4]

Each strategy is real Optuna (its samplers and pruners through ask and tell) or captune's own
search: the sampler `captune.search.strategy.make_sampler` builds for a sweep, the preset enqueued
first, and ASHA's stop rule as Ray's `ASHAScheduler` applies it (`AshaRule`, held equal to a real
Ray sweep's stops by tests/test_search_replay.py). The clock: a worker starts a trial (1 s, as a
reused trial actor does here), then each epoch takes the seconds the table recorded for it; a
trial stopped, finished or diverged frees its worker for the next one at once.

The surrogate: a proposed point is answered by the nearest configuration of the table (in the
unit cube: log scale for loguniform keys, choices by their rank), so every answer is a curve that
was really trained; its error on held-out configurations is printed (leave-one-out).
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curves import read_table  # noqa: E402

TRIAL_START_S = 1.0  # a reused trial actor, trial start to first step (benchmarks/RESULTS.md "light trials")


# --- the table, one architecture ----------------------------------------------------------------

@dataclass
class ArchTable:
    arch: str
    space: dict  # key -> (kind, args), the searched keys
    configs: list[dict]
    val: np.ndarray  # (n, E) the metric on the validation split per epoch; nan after a divergence
    test: np.ndarray  # (n, E) the same on the test split
    seconds: np.ndarray  # (n, E) training + validation per epoch
    diverged: np.ndarray  # (n,) the epoch the loss became NaN in, 0 for none
    preset: dict  # the dataset preset's values of the searched keys (a sweep's first trial)
    units: np.ndarray = field(init=False)  # (n, D) the configurations in the unit cube

    def __post_init__(self):
        self.units = np.array([self.unit(c) for c in self.configs])

    @property
    def epochs(self) -> int:
        return self.val.shape[1]

    def unit(self, point: dict) -> list[float]:
        out = []
        for key, (kind, args) in self.space.items():
            v = point[key]
            if kind == "loguniform":
                out.append((math.log(v) - math.log(args[0])) / (math.log(args[1]) - math.log(args[0])))
            elif kind == "choice":
                out.append(args.index(v) / max(1, len(args) - 1))
            else:
                out.append((v - args[0]) / (args[1] - args[0]))
        return out

    def nearest(self, point: dict, exclude: int | None = None) -> int:
        d = ((self.units - np.array(self.unit(point))) ** 2).sum(axis=1)
        if exclude is not None:
            d[exclude] = np.inf
        return int(np.argmin(d))

    def objective(self) -> np.ndarray:
        """(n, E) the running best of the metric: what a trial reports as best_<metric>."""
        return np.fmax.accumulate(np.nan_to_num(self.val, nan=-np.inf), axis=1)

    def best(self) -> float:
        return float(np.nanmax(self.val))

    def distributions(self) -> dict:
        """The Optuna distributions Ray's OptunaSearch gives Optuna for this space."""
        from ray.tune.search.optuna import OptunaSearch
        from captune.search.space import SearchSpace

        return OptunaSearch.convert_search_space(SearchSpace(self.arch, dict(self.space)).to_tune())


def load_tables(path: str | Path, metric: str = "bleu4") -> tuple[dict, dict[str, ArchTable]]:
    meta, rows = read_table(path)
    tables = {}
    for arch in meta["spaces"]:
        mine = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["id"])
        if not mine:
            continue
        n, E = len(mine), meta["epochs"]
        val, test, sec = (np.full((n, E), np.nan) for _ in range(3))
        diverged = np.zeros(n, dtype=int)
        for i, r in enumerate(mine):
            for e in r["epochs"]:
                val[i, e["epoch"] - 1], test[i, e["epoch"] - 1] = e[f"val_{metric}"], e[f"test_{metric}"]
                sec[i, e["epoch"] - 1] = e["seconds"]
            diverged[i] = r["diverged_in_epoch"] or 0
            if diverged[i]:  # the epoch it diverged in took about as long as the one before
                sec[i, diverged[i] - 1] = sec[i, diverged[i] - 2] if diverged[i] > 1 else np.nanmedian(sec[:, 0])
        space = {k: (kind, args) for k, (kind, args) in meta["spaces"][arch].items()}
        tables[arch] = ArchTable(arch, space, [r["config"] for r in mine], val, test, sec, diverged,
                                 preset_point(meta, arch, space))
    return meta, tables


def restricted(tab: ArchTable, space) -> ArchTable:
    """The table's configurations inside a narrower SearchSpace (a sweep file's, e.g. search/demo.yaml's),
    searched in that space."""
    def inside(config: dict) -> bool:
        for key, (kind, args) in space.searched.items():
            v = config[key]
            if not (v in args if kind == "choice" else args[0] <= v <= args[1]):
                return False
        return True

    keep = np.array([inside(c) for c in tab.configs])
    return ArchTable(tab.arch, dict(space.searched), [c for c, k in zip(tab.configs, keep) if k], tab.val[keep],
                     tab.test[keep], tab.seconds[keep], tab.diverged[keep], tab.preset)


def preset_point(meta: dict, arch: str, space: dict) -> dict:
    """The searched keys' values in the dataset's preset (the built-in preset when the dataset
    folder is not on this machine)."""
    import yaml
    from captune.data.synth import PRESET
    from captune.trainables.config import compose, preset_layers

    data = Path(meta["data"])
    layers = preset_layers(data, arch) if (data / "captune.yaml").is_file() else \
        [("built-in preset", yaml.safe_load(PRESET)[arch])]
    cfg = compose(arch, layers)
    return {k: getattr(cfg, k) for k in space}


# --- ASHA as Ray applies it --------------------------------------------------------------------

class AshaRule:
    """Ray's ASHAScheduler (one bracket, stop_last_trials=True; ray/tune/schedulers/async_hyperband.py,
    Ray 2.60): rungs at grace * rf**k below max_t; a trial reaching a rung is stopped when its
    score is below the (1 - 1/rf) quantile of the scores recorded there before it; its score is
    recorded either way. A trial reaching max_t is finished."""

    def __init__(self, grace: int, max_t: int, rf: float):
        count = int(np.log(max_t / grace) / np.log(rf) + 1)
        self.rf, self.max_t = rf, max_t
        self.rungs = [(grace * rf ** k, {}) for k in reversed(range(count))]

    def stop(self, trial, t: int, score: float) -> bool:
        if t >= self.max_t:
            return True
        return self._on_result(trial, t, score)

    def complete(self, trial, t: int, score: float) -> None:
        self._on_result(trial, t, score)

    def _on_result(self, trial, t: int, score: float) -> bool:
        for milestone, recorded in self.rungs:
            if t < milestone or trial in recorded:
                continue
            cut = np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100) if recorded else None
            recorded[trial] = score
            return cut is not None and score < cut
        return False


# --- strategies ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Strategy:
    name: str
    sampler: str = "tpe"  # captune.search.strategy.SAMPLERS; "tpe-ray": TPESampler(seed) as Ray's OptunaSearch builds it
    args: dict = field(default_factory=dict)  # the sampler's keyword arguments (a sweep file's sampler_args)
    stopper: str = "none"  # none | asha (Ray's rule) | median | hyperband (Optuna's pruners)
    grace: int = 1
    rf: int = 2
    preset_first: bool = False  # captune enqueues the dataset's preset as the first trial

    def make_sampler(self, seed: int):
        from captune.search.strategy import make_sampler

        if self.sampler == "tpe-ray":
            return make_sampler("tpe", seed, {})
        return make_sampler(self.sampler, seed, self.args)

    def make_pruner(self, max_t: int):
        import optuna

        if self.stopper == "median":
            return optuna.pruners.MedianPruner()
        if self.stopper == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=self.grace, max_resource=max_t, reduction_factor=self.rf)
        return optuna.pruners.NopPruner()


def catalog(epochs: int) -> list[Strategy]:
    """Every strategy replayed: peers as their libraries ship them, captune's today and variants
    (one change at a time from today's: TPE's start-up, ASHA's grace period and reduction factor,
    the preset). Optuna 5's TPE is multivariate with a constant liar already (`multivariate` is
    unused, `constant_liar=True` by default): replayed with `multivariate`, `group` and
    `constant_liar` given, every draw was the same, so those are not variants."""
    def ours(startup: int, g: int, rf: int, preset: bool = True) -> Strategy:
        return Strategy(f"TPE({startup} random) + ASHA({g}, {rf})" + (" + preset" if preset else ", no preset"), "tpe",
                        {"n_startup_trials": startup}, stopper="asha", grace=g, rf=rf, preset_first=preset)

    return [
        Strategy("random (full training)", "random"),
        Strategy("random + ASHA (Ray's defaults: grace 1, rf 4)", "random", stopper="asha", grace=1, rf=4),
        Strategy("random + ASHA(2, 2)", "random", stopper="asha", grace=2, rf=2),
        Strategy("TPE (full training)", "tpe"),
        Strategy("Optuna default: TPE + MedianPruner", "tpe", stopper="median"),
        Strategy("Hyperband (random + Optuna HyperbandPruner, rf 3)", "random", stopper="hyperband", grace=1, rf=3),
        Strategy("BOHB-like (TPE + Optuna HyperbandPruner, rf 3)", "tpe", stopper="hyperband", grace=1, rf=3),
        Strategy("GP (full training)", "gp"),
        Strategy("GP + preset (full training)", "gp", preset_first=True),
        Strategy("GP + ASHA(2, 2) + preset", "gp", stopper="asha", grace=2, rf=2, preset_first=True),
        Strategy("captune before N: TPE(10 random) + ASHA(2, 2) + preset", "tpe-ray", stopper="asha", grace=2, rf=2,
                 preset_first=True),
        ours(10, 2, 2, preset=False), ours(3, 2, 2), ours(4, 2, 2), ours(6, 2, 2), ours(16, 2, 2),
        *[ours(10, g, rf) for g, rf in ((1, 2), (1, 3), (2, 3), (3, 2)) if g * rf <= epochs],
    ]


# --- the simulated clock ------------------------------------------------------------------------

@dataclass
class Report:
    time: float
    trial: int  # Optuna's trial number
    row: int  # the table's configuration
    epoch: int
    score: float  # the running best, what the trial reports
    best_epoch: int  # the epoch that score came from


def replay(strategy: Strategy, tab: ArchTable, workers: int, seed: int, horizon: float,
           enqueued: list[dict] = (), trials: int | None = None) -> dict:
    """One search on the simulated clock until `horizon` seconds (or `trials` trials, as a sweep's
    `trials:`): every report, and how trials ended. `enqueued`: points the study hands out first,
    after the preset (for tests)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=strategy.make_sampler(seed),
                                pruner=strategy.make_pruner(tab.epochs))
    if strategy.preset_first:
        study.enqueue_trial(tab.preset)
    for point in enqueued:
        study.enqueue_trial(point)
    dists = tab.distributions()
    asha = AshaRule(strategy.grace, tab.epochs, strategy.rf) if strategy.stopper == "asha" else None
    clock, order = [], itertools.count()  # (time, tie-break, trial number)
    running, reports, ended = {}, [], {"finished": 0, "stopped": 0, "diverged": 0}
    asked = itertools.count(1)

    def start(t: float) -> None:
        if trials is not None and next(asked) > trials:  # (enqueued points are trials already, waiting)
            return
        trial = study.ask(fixed_distributions=dists)
        row = tab.nearest(trial.params)
        running[trial.number] = [trial, row, 0, -math.inf, 0]  # trial, row, epochs done, best, best epoch
        heapq.heappush(clock, (t + TRIAL_START_S + tab.seconds[row, 0], next(order), trial.number))

    def end(number: int, t: float, state, value=None, how="finished") -> None:
        study.tell(running.pop(number)[0], value, state=state)
        ended[how] += 1
        start(t)

    for _ in range(workers):
        start(0.0)
    now = 0.0
    while clock:
        t, _, number = heapq.heappop(clock)
        if t > horizon:
            break
        now = t
        item = running[number]
        trial, row = item[0], item[1]
        epoch = item[2] = item[2] + 1
        if tab.diverged[row] == epoch:  # captune's trial reports every score 0 (search/trial.py), then fails
            if asha is not None:
                asha.stop(number, epoch, 0.0)
                trial.report(0.0, epoch)
            end(number, t, TrialState.FAIL, how="diverged")
            continue
        score = tab.val[row, epoch - 1]
        if score >= item[3]:  # on a tie the later epoch, as captune.trainables.loop.best_so_far
            item[3], item[4] = score, epoch
        trial.report(item[3], epoch)
        reports.append(Report(t, number, row, epoch, item[3], item[4]))
        if asha is not None and asha.stop(number, epoch, item[3]):
            if epoch >= tab.epochs:
                asha.complete(number, epoch, item[3])
                end(number, t, TrialState.COMPLETE, item[3])
            else:
                end(number, t, TrialState.PRUNED, how="stopped")
        elif epoch >= tab.epochs:
            end(number, t, TrialState.COMPLETE, item[3])
        elif strategy.stopper in ("median", "hyperband") and trial.should_prune():
            end(number, t, TrialState.PRUNED, how="stopped")
        else:
            heapq.heappush(clock, (t + tab.seconds[row, epoch], next(order), number))
    diverged = {n for n, tr in enumerate(study.get_trials(deepcopy=False)) if tr.state == TrialState.FAIL}
    return {"reports": [r for r in reports if r.trial not in diverged], "ended": ended, "all_reports": reports,
            "trials": len(running) + sum(ended.values()), "epochs": len(reports), "end_time": now}


# --- figures --------------------------------------------------------------------------------------

def anytime(reports: list[Report], grid: np.ndarray) -> np.ndarray:
    """The best score reported by `grid` times (-inf before the first report)."""
    times = np.array([r.time for r in reports])
    best = np.maximum.accumulate(np.array([r.score for r in reports])) if reports else np.array([])
    idx = np.searchsorted(times, grid, side="right") - 1
    return np.where(idx >= 0, best[np.clip(idx, 0, None)] if len(best) else -np.inf, -np.inf)


def time_to(reports: list[Report], target: float) -> float:
    return next((r.time for r in reports if r.score >= target), math.inf)


def pick(reports: list[Report], budget: float) -> Report | None:
    """The trial a sweep would register at `budget` (captune.search.objective.trial_order): the
    best score, then fewer epochs to reach it, then the earlier trial; as its best epoch."""
    seen = [r for r in reports if r.time <= budget]
    return min(seen, key=lambda r: (-r.score, r.best_epoch, r.trial)) if seen else None


def summarize(reports: list[Report], tab: ArchTable, targets: tuple[float, ...], budget: float,
              grid: np.ndarray) -> dict:
    chosen = pick(reports, budget)
    return {"times": [time_to(reports, t) for t in targets], "anytime": anytime(reports, grid).tolist(),
            "pick_val": chosen.score if chosen else None,
            "pick_test": float(tab.test[chosen.row, chosen.best_epoch - 1]) if chosen else None}


def epoch_correlations(tab: ArchTable) -> list[float]:
    """Spearman correlation, over the configurations that never diverged, of each epoch's running
    best with the last epoch's: does a trial's score at epoch e predict where it ends?"""
    from scipy.stats import spearmanr

    obj = tab.objective()[tab.diverged == 0]
    return [float(spearmanr(obj[:, e], obj[:, -1]).statistic) for e in range(tab.epochs)]


def surrogate_error(tab: ArchTable) -> dict:
    """Leave-one-out: each configuration's final score answered by its nearest other configuration."""
    from scipy.stats import spearmanr

    final = tab.objective()[:, -1]
    keep = np.isfinite(final)
    guess = np.array([final[tab.nearest(c, exclude=i)] for i, c in enumerate(tab.configs)])
    ok = keep & np.isfinite(guess)
    return {"mae": float(np.abs(guess[ok] - final[ok]).mean()), "spread": float(final[keep].std()),
            "spearman": float(spearmanr(guess[ok], final[ok]).statistic)}


# --- a sweep file's budget -------------------------------------------------------------------------

def _sweep_run(task: tuple) -> tuple:
    path, metric, space_file, strategy, arch, workers, trials, seed = task
    from captune.search.space import load_spaces

    key = (path, metric, space_file)
    if key not in _tables:
        tabs = load_tables(path, metric)[1]
        spaces = load_spaces(space_file)[1]
        _tables[key] = {a: restricted(t, spaces[a]) for a, t in tabs.items()}
    tab = _tables[key][arch]
    run = replay(strategy, tab, workers, seed, math.inf, trials=trials)
    chosen = pick(run["reports"], math.inf)
    return (strategy.name, trials, arch, seed, run["end_time"], chosen.score if chosen else None,
            float(tab.test[chosen.row, chosen.best_epoch - 1]) if chosen else None, run["epochs"])


def sweep_budget(args) -> None:
    """Each candidate strategy with a sweep's trial count, in a sweep file's narrower space, on
    `--workers` slots per architecture: the simulated time it takes and the champion it registers,
    to set a trial count that costs what today's did."""
    from captune.search.strategy import startup_trials

    def scaled(s: Strategy, n: int) -> list[Strategy]:  # as a sweep of n trials builds it (search.strategy.make_sampler)
        if s.sampler not in ("tpe", "gp") or "n_startup_trials" in s.args:
            return [s]
        return [replace(s, name=f"{s.name} [start-up {k}]", args={**s.args, "n_startup_trials": k})
                for k in (args.startups or [startup_trials(n)])]

    today = next(s for s in catalog(6) if s.name.startswith("captune before N"))
    candidates = [(today, 6)] + [(v, n) for s in catalog(6) for n in args.trial_counts
                                 if any(s.name.startswith(o) for o in (args.only or [])) for v in scaled(s, n)]
    archs = list(load_tables(args.table, args.metric)[1])
    tasks = [(args.table, args.metric, args.sweep_budget, s, a, args.workers[0], n, seed)
             for s, n in candidates for a in archs for seed in range(args.seeds)]
    with mp.get_context("spawn").Pool(args.processes) as pool:
        out = pool.map(_sweep_run, tasks, chunksize=4)
    print(f"{args.sweep_budget}: {args.workers[0]} trial(s) at a time per architecture, {args.seeds} seeds; "
          f"median simulated minutes, validation and test {args.metric} of the champion")
    for s, n in candidates:
        cells = []
        for a in archs:
            rs = [r for r in out if r[0] == s.name and r[1] == n and r[2] == a]
            cells.append(f"{a}: {np.median([r[4] for r in rs]) / 60:.1f} min, val {np.median([r[5] for r in rs]):.4f}, "
                         f"test {np.median([r[6] for r in rs]):.4f}")
        print(f"  {s.name}, {n} trials | " + " | ".join(cells))


# --- the command ----------------------------------------------------------------------------------

_tables: dict = {}


def _run(task: tuple) -> tuple:
    path, metric, strategy, arch, workers, seed, horizon, targets = task
    import torch

    torch.set_num_threads(1)  # the GP sampler's; one process per core
    if (path, metric) not in _tables:
        _tables[(path, metric)] = load_tables(path, metric)[1]
    tab = _tables[(path, metric)][arch]
    grid = np.linspace(0, horizon, 101)
    started = time.perf_counter()
    run = replay(strategy, tab, workers, seed, horizon)
    out = summarize(run["reports"], tab, targets, horizon, grid)
    return (strategy.name, arch, workers, seed, {**out, "trials": run["trials"], "epochs": run["epochs"],
                                                  "ended": run["ended"], "cpu_s": time.perf_counter() - started})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="benchmarks/curves/synth.jsonl.gz")
    p.add_argument("--metric", default="bleu4", choices=("bleu4", "cider"))
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 16])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--budget", type=float, default=64,
                   help="compute per search, in full trainings of the table's mean configuration")
    p.add_argument("--only", nargs="*", help="strategies whose name starts with one of these")
    p.add_argument("--skip", nargs="*", default=[], help="strategies whose name starts with one of these, left out")
    p.add_argument("--gp-workers", type=int, nargs="+", default=[4],
                   help="the GP sampler (0.5 s per draw after 50 trials) only at these W")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON of every run (default: next to the table)")
    p.add_argument("--sweep-budget", metavar="SWEEP_FILE",
                   help="instead: the strategies of --only with each of --trial-counts trials, against captune's "
                        "search before issue N with 6, in this sweep file's space on --workers slots (its first value)")
    p.add_argument("--trial-counts", type=int, nargs="+", default=[6, 8, 10, 12, 16])
    p.add_argument("--startups", type=int, nargs="+",
                   help="with --sweep-budget: these random start-ups (the preset counts) instead of the scaled default")
    args = p.parse_args(argv)
    if args.sweep_budget:
        return sweep_budget(args)
    meta, tables = load_tables(args.table, args.metric)
    tolerance = 0.005 if args.metric == "bleu4" else 0.02
    strategies = [s for s in catalog(meta["epochs"]) if (not args.only or any(s.name.startswith(o) for o in args.only))
                  and not any(s.name.startswith(o) for o in args.skip)]
    tasks = []
    for arch, tab in tables.items():
        full = float(np.nansum(tab.seconds, axis=1).mean()) + TRIAL_START_S
        targets = (tab.best() - tolerance,)
        for w in args.workers:
            horizon = args.budget * full / w
            for s in strategies:
                if s.sampler == "gp" and w not in args.gp_workers:
                    continue
                tasks += [(args.table, args.metric, s, arch, w, seed, horizon, targets) for seed in range(args.seeds)]
    print(f"{len(tasks)} replays on {args.processes} processes", flush=True)
    results = []
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.processes) as pool:
        for i, r in enumerate(pool.imap_unordered(_run, tasks, chunksize=4), 1):
            results.append(r)
            if i % 200 == 0:
                print(f"  {i}/{len(tasks)} ({time.perf_counter() - started:.0f} s)", flush=True)
    out = Path(args.out or Path(args.table).with_name(f"replay-{args.metric}.json"))
    info = {arch: {"best": tab.best(), "target": tab.best() - tolerance, "preset_row": tab.nearest(tab.preset),
                   "preset_score": float(np.nanmax(tab.val[tab.nearest(tab.preset)])),
                   "full_training_s": float(np.nansum(tab.seconds, axis=1).mean()) + TRIAL_START_S,
                   "within_target": int((np.nanmax(tab.val, axis=1) >= tab.best() - tolerance).sum()),
                   "configs": len(tab.configs), "epoch_spearman": epoch_correlations(tab),
                   "surrogate": surrogate_error(tab)} for arch, tab in tables.items()}
    out.write_text(json.dumps({"table": args.table, "metric": args.metric, "budget": args.budget, "tolerance": tolerance,
                               "seeds": args.seeds, "archs": info, "strategies": [s.name for s in strategies],
                               "runs": [{"strategy": s, "arch": a, "workers": w, "seed": seed, **res}
                                        for s, a, w, seed, res in results]}, allow_nan=True))
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    import replay_report
    replay_report.report(out)


if __name__ == "__main__":
    main()
