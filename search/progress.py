"""What a sweep shows while it runs: one view for the whole sweep, drawn by the driver.

The searches run in Ray tasks; a Tune callback in each (`ProgressEvents`) sends the trials'
events to a queue the driver reads between its waits. The driver's `SweepView` prints one line
per trial event (started, with its configuration; ended, with its state, epochs and best score)
and keeps, per architecture, trials done / running / pending, the best so far, the time spent and
an estimate of what is left: bars redrawn in place on a terminal (tqdm), plain lines (no escape
codes) otherwise, a summary line after each trial ends.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import ray
from ray.tune import Callback
from tqdm import tqdm

from captune.search.objective import DEFAULT_METRIC, end_state, objective
from captune.trainables.catalog import SCORE_LABELS


@ray.remote(num_cpus=0)
class EventQueue:
    """The searches' events, held until the driver takes them. Named after the sweep, so that a
    search's callback, pickled with Tune's state, finds the queue of the driver that resumes it."""

    def __init__(self):
        self.events: list[dict] = []

    def put(self, event: dict) -> None:
        self.events.append(event)

    def take(self) -> list[dict]:
        events, self.events = self.events, []
        return events


def queue_name(sweep: str) -> str:
    return f"captune-progress-{sweep}"


def note(sweep: str, arch: str, text: str) -> None:
    """A line for the sweep's view, from any process of the sweep."""
    ray.get_actor(queue_name(sweep)).put.remote({"arch": arch, "kind": "note", "text": text, "time": time.time()})


def config_text(config: dict, keys: list[str]) -> str:
    """The searched values of a trial, short: "lr=0.0021 hidden_size=256 vocab_threshold=2"."""
    def short(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return " ".join(f"{k}={short(config[k])}" for k in keys if k in config)


class ProgressEvents(Callback):
    """Tune callback, in a search task: each trial's start and end, put on the driver's queue."""

    def __init__(self, sweep: str, arch: str, searched: list[str], max_epochs: int, metric: str = DEFAULT_METRIC):
        self.sweep, self.arch, self.searched, self.max_epochs = sweep, arch, searched, max_epochs
        self.target = objective(metric)
        self.best: dict[str, tuple[float, int]] = {}  # trial_id -> (its objective, the epoch)
        self._queue = None

    def __getstate__(self) -> dict:  # pickled with Tune's experiment state: no actor handle
        return {**self.__dict__, "_queue": None}

    def note(self, text: str) -> None:
        note(self.sweep, self.arch, text)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._put("start", trial, config=config_text(trial.config, self.searched))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.target in result:
            self.best[trial.trial_id] = (float(result[self.target]), int(result.get("best_epoch", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self._ended(trial, end_state(last, self.max_epochs, errored=False), int(last.get("epoch", 0)))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "failed", int((trial.last_result or {}).get("epoch", 0)))

    def _ended(self, trial, state: str, epochs: int) -> None:
        best, epoch = self.best.get(trial.trial_id, (None, 0))
        self._put("end", trial, state=state, epochs=epochs, best=best, best_epoch=epoch,
                  config=config_text(trial.config, self.searched))

    def _put(self, kind: str, trial, **fields) -> None:
        self._send({"arch": self.arch, "kind": kind, "trial": trial.trial_id, "time": time.time(), **fields})

    def _send(self, event: dict) -> None:
        if self._queue is None:
            self._queue = ray.get_actor(queue_name(self.sweep))
        self._queue.put.remote(event)  # in order, without waiting


@dataclass
class ArchState:
    trials: int  # the search's trials in all
    concurrent: int = 1
    numbers: dict[str, int] = field(default_factory=dict)  # trial id -> its number in this search, from 1
    running: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    durations: list[float] = field(default_factory=list)  # of ended trials, seconds
    started: dict[str, float] = field(default_factory=dict)
    best: tuple[float, str, int] | None = None  # (the objective, trial id, epoch)

    def label(self, trial_id: str) -> str:
        """"trial 3 (a1b2c3d4)": numbered in order of start, with Tune's id (the leaderboard's)."""
        number = self.numbers.setdefault(trial_id, len(self.numbers) + 1)
        return f"trial {number} ({trial_id})"

    def ended(self, trial_id: str, best: float | None, best_epoch: int) -> None:
        self.running.discard(trial_id)
        self.done.add(trial_id)
        self.label(trial_id)  # numbered, if it was not yet
        if best is not None and (self.best is None or best > self.best[0]):
            self.best = (best, trial_id, best_epoch)

    @property
    def pending(self) -> int:
        return max(0, self.trials - len(self.done) - len(self.running))

    def seconds_left(self, now: float) -> float | None:
        """Trials not ended, at the mean ended trial's length, `concurrent` at a time, less what
        the running ones have done. None before a trial has ended."""
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        running = sum(max(0.0, mean - (now - self.started.get(t, now))) for t in self.running)
        return (running + self.pending * mean) / max(1, self.concurrent)


class SweepView:
    """The driver's view of a sweep's progress (see the module's text). `tty` None: whether `out`
    is a terminal."""

    def __init__(self, name: str, trials: dict[str, int], concurrent: dict[str, int], out: IO[str] | None = None,
                 tty: bool | None = None, clock=time.time, metric: str = DEFAULT_METRIC, deadline: float | None = None):
        self.name, self.out, self.clock = name, out or sys.stdout, clock
        self.deadline = deadline  # the time budget's end (captune.search.budget), None without one
        self.score_label = SCORE_LABELS[metric]
        self.tty = self.out.isatty() if tty is None else tty
        self.archs = {arch: ArchState(n, concurrent=concurrent.get(arch, 1)) for arch, n in trials.items()}
        self.began = clock()
        self.bars = {}
        if self.tty:
            # a terminal that reports no size (0 x 0) gets 80 x 24, not hidden bars
            size = {"ncols": shutil.get_terminal_size().columns, "nrows": shutil.get_terminal_size().lines}
            for position, arch in enumerate(self.archs):
                self.bars[arch] = tqdm(total=trials[arch], desc=f"{arch:<10}", position=position, file=self.out,
                                       leave=True, bar_format="{desc} {bar:10} {n_fmt}/{total_fmt} done{postfix}",
                                       **size)
            self.status = tqdm(total=0, position=len(self.archs), file=self.out, leave=True, bar_format="{desc}",
                               **size)
            self._redraw()

    def ended_before(self, arch: str, trial_id: str, best: float | None, best_epoch: int) -> None:
        """A trial that ended before a resume (call in order of start): counted, no line shown."""
        self.archs[arch].ended(trial_id, best, best_epoch)
        self._redraw()

    def handle(self, event: dict) -> None:
        if event["kind"] == "note":
            self._line(f"[{event['arch']}] {event['text']}")
            return
        arch, trial = event["arch"], event["trial"]
        state = self.archs[arch]
        if event["kind"] == "start":
            again = trial in state.done or trial in state.started  # resumed, or restarted after a failure
            state.done.discard(trial)
            state.running.add(trial)
            state.started.setdefault(trial, event["time"])
            self._line(f"[{arch}] {state.label(trial)} {'resumed' if again else 'started'}: {event['config']}")
        elif event["kind"] == "end":
            state.durations.append(event["time"] - state.started.get(trial, event["time"]))
            best = event.get("best")
            state.ended(trial, best, event.get("best_epoch", 0))
            score = f", best {self.score_label} {best:.4f} (epoch {event.get('best_epoch')})" if best is not None else ""
            self._line(f"[{arch}] {state.label(trial)} {event['state']} after {event['epochs']} epoch(s){score}")
            if not self.tty:
                self._line(self.summary())
        self._redraw()

    def summary(self) -> str:
        """One line: each architecture's counts and best, the time spent and the estimate left."""
        now = self.clock()
        parts = [f"{arch} {len(s.done)}/{s.trials} done, {len(s.running)} running, {s.pending} pending"
                 + (f", best {s.best[0]:.4f} by {s.label(s.best[1])}" if s.best else "") for arch, s in self.archs.items()]
        return f"sweep {self.name}: " + "; ".join(parts) + f" | {duration_text(now - self.began)} spent" + self._left(now)

    def _left(self, now: float) -> str:
        return self._estimate(now) + self._budget(now)

    def _budget(self, now: float) -> str:
        if self.deadline is None:
            return ""
        if now < self.deadline:
            return f" | budget: {duration_text(self.deadline - now)} left"
        running = sum(len(s.running) for s in self.archs.values())
        return " | budget spent: no trial starts" + (f", {running} running stop(s) at the next epoch" if running else "")

    def _estimate(self, now: float) -> str:
        lefts = [s.seconds_left(now) for s in self.archs.values() if len(s.done) < s.trials]
        if not lefts:
            return ""
        if any(left is None for left in lefts):
            return ", time left: known after the first trial ends"
        left = max(lefts)  # the searches run side by side
        if self.deadline is not None and left > self.deadline - now:  # the rest cannot run in the budget
            return f", the rest would take about {duration_text(left)}: some trials will not start"
        return f", about {duration_text(left)} left"

    def _redraw(self) -> None:
        if not self.tty:
            return
        now = self.clock()
        for arch, bar in self.bars.items():
            s = self.archs[arch]
            bar.n = len(s.done)
            bar.set_postfix_str(f"{len(s.running)} running, {s.pending} pending"
                                + (f" | best {s.best[0]:.4f} (trial {s.numbers[s.best[1]]})" if s.best else ""),
                                refresh=False)
            bar.refresh()
        self.status.set_description_str(f"sweep {self.name}: {duration_text(now - self.began)} spent{self._left(now)}")

    def tick(self) -> None:
        """Called between the driver's waits: keeps the elapsed time and estimate moving."""
        if self.tty:
            self._redraw()

    def _line(self, text: str) -> None:
        if self.tty:
            tqdm.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        for bar in [*self.bars.values(), *([self.status] if self.tty else [])]:
            bar.close()
        if self.tty:
            print(self.summary(), file=self.out, flush=True)


def quiet_libraries() -> None:
    """Silence what Ray Tune, Optuna and MLflow print that the sweep's view replaces (`--verbose`
    keeps it). Ray 2.60's new output engine prints its experiment box and a TensorBoard hint even
    at verbosity 0 (`tune.run` calls `experiment_started` whatever the verbosity): the legacy
    engine, at 0, prints nothing. Breaks first: tests/test_sweep.py (a sweep's output holds no
    Tune box)."""
    import optuna  # here, not on import: the driver's view does not need it

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables", ...
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna's parallel-coordinates plot of a parameter with one value tried
    warnings.filterwarnings("ignore", message="Attempting to set identical low and high ylims")


@contextlib.contextmanager
def held_back(quiet: bool) -> Iterator[None]:
    """Stderr held back while the block runs, shown only if it fails: MLflow prints each model
    registration ("Successfully registered model ...", "Created version ...") to stderr, which
    the sweep's closing lines already say."""
    if not quiet:
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def duration_text(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
