"""`captune train`: one Ray Train job. Its results live in --out first (checkpoints, `model.pt`,
`metrics.json`, `run.json`); the MLflow run is written from those files, so a tracking store that
is locked or down loses nothing: `captune record OUT` writes what it could not take."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray

from captune.train_record import (EXPERIMENT, job_state, open_run, record_run, record_within, replace_file,
                                  require_live_record, save_state)
from captune.data.cache import DiskFullError
from captune.data.prepare import prepare_data
from captune.infra.errors import UserError
from captune.infra.mlflow_relay import start_relay
from captune.infra.mlflow_store import require_answering_store, require_free_space, require_writable_store, writable_folder
from captune.infra.raycluster import Interrupted, init_ray, require_resources, root_cause, signal_name
from captune.infra.sizing import cpus_per_worker_alone
from captune.trainables import WORKER_PRELOAD
from captune.trainables.catalog import SCORES
from captune.trainables.checkpoint import FILENAME, CheckpointError, read_payload
from captune.trainables.config import TrainConfig
from captune.trainables.loop import best_so_far, checkpoint_size
from captune.trainables.ray_train import StopSignal, make_trainer


class TrainFailed(UserError, RuntimeError):
    """The training job failed; the message carries the worker's own error and what was kept."""


@dataclass
class TrainOutcome:
    out_dir: Path
    checkpoint: Path | None  # None: no epoch finished
    metrics: dict | None  # what metrics.json holds
    run_id: str
    stopped: str | None = None  # why training stopped before its last epoch (a signal)
    recorded: bool = True  # the MLflow run holds everything (else `captune record OUT`)


def run_train(cfg: TrainConfig, data_root: str | Path, out: str | Path, *, workers: int = 1,
              use_gpu: bool = False, tracking_uri: str | None = None, experiment: str = EXPERIMENT,
              ray_address: str | None = None, resume: bool = False) -> TrainOutcome:
    out = writable_folder(Path(out).resolve(), "--out")
    state = job_state(out, cfg, data_root, workers, use_gpu, tracking_uri, experiment, resume)
    require_writable_store(state["tracking_uri"])
    init_ray(ray_address, preload=WORKER_PRELOAD)
    cpus = cpus_per_worker_alone(workers)
    require_resources(workers, cpus, 1.0 if use_gpu else 0.0, ray_address)
    require_answering_store(state["tracking_uri"])
    require_live_record(out, state)  # a deleted run (or experiment): refused before the data or any run
    # Check the data and decode the images once, here, before any worker starts: a bad dataset
    # fails in seconds with the full report, and the workers find the pixel cache ready.
    data = prepare_data(data_root, cfg.image_size, cfg.cache_path(),
                        skip_bad=cfg.skip_bad, seed=cfg.split_seed)
    if data.skipped:
        print(f"--skip-bad: left out {len(data.skipped)} bad item(s):")
        for p in data.skipped:
            print(f"  {p}")
    _require_space(out, cfg, len(data.vocabulary(cfg.vocab_threshold)))
    state["run_id"] = open_run(state, cfg)
    save_state(out, {**state, "status": "RUNNING"})

    stop_name = f"captune-stop-{uuid.uuid4().hex[:12]}"
    stop = StopSignal.options(name=stop_name).remote()
    relay = start_relay(state["tracking_uri"])  # rank 0 may run on another node: its epochs go through here
    saved = _complete_checkpoints(out / "ray" / out.name) if resume else {}
    trainer = make_trainer(cfg, data_root, workers=workers, use_gpu=use_gpu, cpus=cpus, name=out.name,
                           storage_path=str(out / "ray"), relay=relay,
                           mlflow_run_id=state["run_id"], stop_signal=stop_name,
                           resume_from=str(saved[max(saved)]) if saved else None)
    try:
        error, stopped, at_once = _fit_until_stopped(trainer, stop)
    finally:
        ray.kill(stop)
        ray.kill(relay)
    try:
        kept = keep_results(out, out / "ray" / out.name)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise DiskFullError(f"--out {out}: no space left on its device to write model.pt and metrics.json ({e}). "
                            f"The finished epochs' checkpoints are in {out / 'ray'}: free some space, then "
                            f"`captune train --resume {out}` keeps them") from None
    if stopped and not at_once and kept and kept["final"]["epoch"] >= cfg.epochs:
        stopped = None  # asked during the last epoch's validation: nothing was cut short
    state.update(status="KILLED" if stopped else "FAILED" if error else "FINISHED", stop_reason=stopped,
                 error=root_cause(error)[:5000] if error else None)
    save_state(out, state)
    if stopped:  # a stopped command ends within seconds: a few at MLflow, else `captune record` does it
        recorded = record_within(out, seconds=3.0)
    else:
        recorded = record_run(out, wait_s=float(os.environ.get("CAPTUNE_MLFLOW_WAIT_S", "120")))
    if at_once:
        raise KeyboardInterrupt
    if error:
        raise TrainFailed(f"training failed: {root_cause(error)}" + (f" ({_kept_line(out, kept)})" if kept else ""))
    return TrainOutcome(out, out / FILENAME if kept else None, kept, state["run_id"], stopped, recorded)


STOP_GRACE_S = 2.0
KEPT_CHECKPOINTS = 3  # the two best by the validation metric and the latest (captune.trainables.ray_train.make_trainer)


def _require_space(out: Path, cfg: TrainConfig, vocab_size: int) -> None:
    """The checkpoints Ray keeps, one more while it writes the next, and model.pt fit in --out; one
    fits in the temporary folder, where each is written first."""
    size = checkpoint_size(cfg, vocab_size)
    present = sum(1 for p in (out / "ray" / out.name).glob("checkpoint_*") if p.is_dir())  # on --resume
    require_free_space([
        (out, size * max(1, KEPT_CHECKPOINTS + 2 - present), f"--out ({KEPT_CHECKPOINTS} kept checkpoints of "
                                                              f"{size / 1e6:.1f} MB, one being written, model.pt)"),
        (Path(tempfile.gettempdir()), size, "one checkpoint being written")])


def _fit_until_stopped(trainer, stop) -> tuple[BaseException | None, str | None, bool]:
    """Run the trainer to its end; the first SIGINT or SIGTERM asks its workers to stop at their
    next step (they end the run themselves, keeping every epoch reported), a second stops at once.
    Returns the trainer's error, why it was stopped, and whether at once.
    The trainer runs in a thread of its own: in the main thread Ray Train would install its own
    SIGINT handler, which aborts the workers mid-epoch and leaves the run failed."""
    outcome: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the main thread, which raises or reports it
            outcome["error"] = e

    asked: list[str] = []

    def on_signal(signum, _frame) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signal_name(Interrupted(signal.Signals(signum).name)))
        print(f"\ncaptune: {asked[0]}: stopping at the next training step; every finished epoch is kept "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)
        stop.set.remote()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopped = stop.wait_stopped.remote()
    try:
        thread = threading.Thread(target=fit, name="captune-train-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # short waits: signal handlers run between them
            if asked and ray.wait([stopped], timeout=0)[0]:
                # Every finished epoch's checkpoint is stored: give Ray Train a moment to end
                # the run, not the up to 12 s its placement-group cleaner may take to stop.
                thread.join(STOP_GRACE_S)
                break
    except KeyboardInterrupt:  # asked twice: the workers are left as they are; what they reported stays
        return None, f"{asked[0]}, twice: stopped at once", True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome.get("error"), (asked[0] if asked else None), False


def keep_results(out: Path, checkpoints: Path) -> dict | None:
    """From the checkpoints Ray kept (the best two by the validation metric and the latest), write
    `model.pt` (the best finished epoch's) and `metrics.json` (every finished epoch) into `out`.
    Returns what metrics.json holds; None when no epoch finished."""
    saved = _complete_checkpoints(checkpoints)
    if not saved:
        return None
    latest = read_payload(saved[max(saved)] / FILENAME)  # the latest holds every epoch
    history, metric = latest["history"], latest["train_config"].get("metric", "bleu4")
    best = best_so_far(history, metric)["best_epoch"]
    if best not in saved:
        raise CheckpointError(f"{checkpoints}: the checkpoint of the best epoch ({best}) was not kept")
    replace_file(out / FILENAME, lambda tmp: shutil.copyfile(saved[best] / FILENAME, tmp))
    metrics = summarize(history, best, metric)
    replace_file(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    return metrics


def _complete_checkpoints(checkpoints: Path) -> dict[int, Path]:
    """The checkpoint folders under `checkpoints` that hold a whole checkpoint, by epoch."""
    saved = {}
    for folder in sorted(p for p in checkpoints.glob("checkpoint_*") if p.is_dir()):
        try:
            saved[int(read_payload(folder / FILENAME)["epoch"])] = folder
        except (CheckpointError, KeyError, OSError, RuntimeError) as e:  # a copy cut short by a kill
            print(f"note: {folder} is not a complete checkpoint ({e}); left out", file=sys.stderr)
    return saved


def summarize(history: list[dict], checkpoint_epoch: int, metric: str = "bleu4") -> dict:
    """metrics.json: every epoch, the final one, and the saved checkpoint's (the best by `metric`)."""
    saved = history[checkpoint_epoch - 1]
    return {
        "metric": metric,
        "epochs": history,
        "final": {"epoch": history[-1]["epoch"], **{k: history[-1][k] for k in SCORES if k in history[-1]}},
        "best": {"epoch": saved["epoch"], **{k: saved[k] for k in SCORES if k in saved}},
    }


def _kept_line(out: Path, metrics: dict) -> str:
    best, last, metric = metrics["best"], metrics["final"]["epoch"], metrics.get("metric", "bleu4")
    return (f"kept epochs 1-{last}; the best, epoch {best['epoch']} ({metric} {best[metric]:.4f}), is "
            f"{out / FILENAME}")


# --- the job's state in --out ---------------------------------------------------------------------
