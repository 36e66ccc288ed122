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
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from data.cache import DiskFullError
from data.prepare import prepare_data
from infra.errors import UserError
from infra.mlflow_logging import metric_entities, param_entities, unavailable
from infra.mlflow_names import ARCH_TAG, ERROR_TAG, KIND_TAG, MODEL_EPOCH_TAG, STOP_TAG
from infra.mlflow_store import (TrackingUnavailable, configure, default_tracking_uri, get_or_create_experiment,
                                require_answering_store, require_free_space, require_writable_store, writable_folder)
from infra.raycluster import Interrupted, init_ray, require_resources, root_cause, signal_name
from infra.sizing import cpus_per_worker_alone
from trainables.checkpoint import FILENAME, CheckpointError, read_payload
from trainables.config import ConfigError, TrainConfig, replace
from trainables.logged_model import log_captioner

EXPERIMENT = "captune-train"
RUN_FILE = "run.json"  # in --out: the job's settings, its MLflow run, how it ended
RESUMABLE_KEYS = {"epochs"}  # what --resume may change: more epochs go on from the last one


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
    state = _job_state(out, cfg, data_root, workers, use_gpu, tracking_uri, experiment, resume)
    require_writable_store(state["tracking_uri"])
    init_ray(ray_address)
    import ray

    from trainables.ray_train import StopSignal, make_trainer

    cpus = cpus_per_worker_alone(workers)
    require_resources(workers, cpus, 1.0 if use_gpu else 0.0, ray_address)
    require_answering_store(state["tracking_uri"])
    # Check the data and decode the images once, here, before any worker starts: a bad dataset
    # fails in seconds with the full report, and the workers find the pixel cache ready.
    data = prepare_data(data_root, cfg.image_size, cfg.cache_path(),
                        skip_bad=cfg.skip_bad, seed=cfg.split_seed)
    if data.skipped:
        print(f"--skip-bad: left out {len(data.skipped)} bad item(s):")
        for p in data.skipped:
            print(f"  {p}")
    _require_space(out, cfg, len(data.vocabulary(cfg.vocab_threshold)))
    state["run_id"] = _open_run(state, cfg)
    _save_state(out, {**state, "status": "RUNNING"})

    stop_name = f"captune-stop-{uuid.uuid4().hex[:12]}"
    stop = StopSignal.options(name=stop_name).remote()
    saved = _complete_checkpoints(out / "ray" / out.name) if resume else {}
    trainer = make_trainer(cfg, data_root, workers=workers, use_gpu=use_gpu, cpus=cpus, name=out.name,
                           storage_path=str(out / "ray"), tracking_uri=state["tracking_uri"],
                           mlflow_run_id=state["run_id"], stop_signal=stop_name,
                           resume_from=str(saved[max(saved)]) if saved else None)
    try:
        error, stopped, at_once = _fit_until_stopped(trainer, stop)
    finally:
        ray.kill(stop)
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
    _save_state(out, state)
    if stopped:  # a stopped command ends within seconds: a few at MLflow, else `captune record` does it
        recorded = _record_within(out, seconds=3.0)
    else:
        recorded = record_run(out, wait_s=float(os.environ.get("CAPTUNE_MLFLOW_WAIT_S", "120")))
    if at_once:
        raise KeyboardInterrupt
    if error:
        raise TrainFailed(f"training failed: {root_cause(error)}" + (f" ({_kept_line(out, kept)})" if kept else ""))
    return TrainOutcome(out, out / FILENAME if kept else None, kept, state["run_id"], stopped, recorded)


STOP_GRACE_S = 2.0
KEPT_CHECKPOINTS = 3  # the two best by bleu4 and the latest (trainables.ray_train.make_trainer)


def _require_space(out: Path, cfg: TrainConfig, vocab_size: int) -> None:
    """The checkpoints Ray keeps, one more while it writes the next, and model.pt fit in --out; one
    fits in the temporary folder, where each is written first."""
    import tempfile

    from trainables.loop import checkpoint_size

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
    import ray

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
    """From the checkpoints Ray kept (the best two by validation bleu4 and the latest), write
    `model.pt` (the best finished epoch's) and `metrics.json` (every finished epoch) into `out`.
    Returns what metrics.json holds; None when no epoch finished."""
    from trainables.loop import best_so_far

    saved = _complete_checkpoints(checkpoints)
    if not saved:
        return None
    history = read_payload(saved[max(saved)] / FILENAME)["history"]  # the latest holds every epoch
    best = best_so_far(history)["best_epoch"]
    if best not in saved:
        raise CheckpointError(f"{checkpoints}: the checkpoint of the best epoch ({best}) was not kept")
    _replace(out / FILENAME, lambda tmp: shutil.copyfile(saved[best] / FILENAME, tmp))
    metrics = summarize(history, best)
    _replace(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
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


def _replace(path: Path, write) -> None:
    """Write `path` whole or not at all (an interrupt mid-copy leaves the old file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def summarize(history: list[dict], checkpoint_epoch: int) -> dict:
    """metrics.json: every epoch, the final one, and the saved checkpoint's (best bleu4)."""
    keys = ("bleu1", "bleu2", "bleu3", "bleu4")
    saved = history[checkpoint_epoch - 1]
    return {
        "epochs": history,
        "final": {"epoch": history[-1]["epoch"], **{k: history[-1][k] for k in keys}},
        "best": {"epoch": saved["epoch"], **{k: saved[k] for k in keys}},
    }


def _kept_line(out: Path, metrics: dict) -> str:
    best, last = metrics["best"], metrics["final"]["epoch"]
    return (f"kept epochs 1-{last}; the best, epoch {best['epoch']} (bleu4 {best['bleu4']:.4f}), is "
            f"{out / FILENAME}")


# --- the job's state in --out ---------------------------------------------------------------------

def _job_state(out: Path, cfg: TrainConfig, data_root: str | Path, workers: int, use_gpu: bool,
               tracking_uri: str | None, experiment: str, resume: bool) -> dict:
    """The settings to write to OUT/run.json; with --resume, those already there, checked against
    this command's (only the epochs may change)."""
    wanted = {"config": cfg.to_dict(), "data": str(Path(data_root).resolve()), "workers": workers, "gpu": use_gpu,
              "tracking_uri": tracking_uri or default_tracking_uri(), "experiment": experiment,
              "run_id": None}
    before = _load_state(out)
    if before is None:
        if resume:
            raise ConfigError(f"--resume: {out} holds no training run to go on from ({RUN_FILE} is missing); "
                              f"leave out --resume to start one there")
        if (out / "ray").exists() or (out / FILENAME).exists():
            raise ConfigError(f"--out {out}: the folder holds results of another run; choose another --out")
        return wanted
    if not resume:
        raise ConfigError(f"--out {out}: the folder holds a training run ({before.get('status', 'unknown').lower()}"
                          f"{_epochs_note(out)}): go on from its last epoch with --resume, or choose another --out")
    differ = sorted(k for k in set(cfg.to_dict()) | set(before["config"])
                    if k not in RESUMABLE_KEYS and cfg.to_dict().get(k) != before["config"].get(k))
    differ += [k for k in ("data", "workers", "gpu") if wanted[k] != before[k]]
    if tracking_uri and tracking_uri != before["tracking_uri"]:
        differ.append("tracking_uri")
    if differ:
        raise ConfigError(f"--resume: {out} was trained with other settings: " +
                          ", ".join(f"{k}={_setting(before, k)!r} (now {_setting(wanted, k)!r})" for k in differ) +
                          "; only --epochs may change on resume; use another --out to train these settings")
    return {**before, "config": cfg.to_dict()}


def resume_settings(out: Path, *, arch: str | None = None, data: str | None = None, workers: int | None = None,
                    gpu: bool = False, epochs: int | None = None) -> tuple[TrainConfig, str, int, bool]:
    """What `captune train --resume OUT` trains: OUT's settings, with `epochs` if given. The other
    arguments, when given, must agree with them."""
    state = _load_state(out.resolve())
    if state is None:
        raise ConfigError(f"--resume {out}: no training run there ({RUN_FILE} is missing)")
    given = {"arch": arch, "data": data and str(Path(data).resolve()), "workers": workers, "gpu": gpu or None}
    differ = [f"--{k} {v} (the run has {_setting(state, k)})" for k, v in given.items()
              if v is not None and v != _setting(state, k)]
    if differ:
        raise ConfigError(f"--resume {out}: {'; '.join(differ)}; a resumed run keeps its settings")
    cfg = TrainConfig(**state["config"])
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    return cfg.validate(), state["data"], state["workers"], state["gpu"]


def _setting(state: dict, key: str):
    return state[key] if key in state else state["config"].get(key)


def _epochs_note(out: Path) -> str:
    try:
        return f", {len(json.loads((out / 'metrics.json').read_text())['epochs'])} epoch(s) kept"
    except (OSError, ValueError, KeyError):
        return ""


def _load_state(out: Path) -> dict | None:
    path = out / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not a captune run file ({e})") from None


def _save_state(out: Path, state: dict) -> None:
    _replace(out / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=2)))


# --- the MLflow run ---------------------------------------------------------------------------------

def _open_run(state: dict, cfg: TrainConfig) -> str:
    """Create the job's MLflow run, or reopen it on --resume. The store must answer now: nothing
    has been trained yet, so refusing costs nothing."""
    from mlflow import MlflowClient

    uri = configure(state["tracking_uri"])
    try:
        client = MlflowClient(uri)
        if state.get("run_id"):  # --resume: the run goes on; why it stopped is history
            client.update_run(state["run_id"], status="RUNNING")
            for tag in (STOP_TAG, ERROR_TAG):
                if tag in client.get_run(state["run_id"]).data.tags:
                    client.delete_tag(state["run_id"], tag)
            return state["run_id"]
        run = client.create_run(get_or_create_experiment(state["experiment"], uri),
                                run_name=f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={ARCH_TAG: cfg.arch, KIND_TAG: "train", "image_blind": str(cfg.image_blind)})
        client.log_batch(run.info.run_id, params=param_entities(
            {**cfg.to_dict(), "data": state["data"], "workers": state["workers"], "gpu": state["gpu"]}))
        return run.info.run_id
    except Exception as e:
        if not unavailable(e):
            raise
        raise TrackingUnavailable(f"MLflow store {uri} did not answer ({_first_line(e)}); nothing was trained: "
                                  f"run the command again once it answers (a SQLite store is locked while another "
                                  f"process writes to it; an `mlflow server` must be running)") from None


def record_run(out: Path, wait_s: float = 0.0) -> bool:
    """Bring the job's MLflow run up to date with what OUT holds: every finished epoch's metrics
    (those the workers could not log), the best epoch's, metrics.json, the model, the end state.
    Safe to repeat. While the store is down or locked, retries for `wait_s` seconds; then says how
    to finish later and returns False."""
    state = _load_state(out)
    if state is None:
        raise ConfigError(f"{out}: not a `captune train` output folder ({RUN_FILE} is missing)")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _write_record(out, state)
            return True
        except Exception as e:
            if not unavailable(e):
                raise
            if time.monotonic() >= deadline:
                print(f"captune: MLflow store {state['tracking_uri']} did not answer ({_first_line(e)}). The results "
                      f"are safe in {out}; once the store answers, `captune record {out}` completes the MLflow "
                      f"run {state['run_id']}", file=sys.stderr, flush=True)
                return False
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def _record_within(out: Path, seconds: float) -> bool:
    """`record_run`, given up after `seconds` (a locked SQLite store holds each call 20 s)."""
    done: list = []

    def record() -> None:
        try:
            done.append(record_run(out))
        except Exception as e:  # raised below, in the command's thread
            done.append(e)

    thread = threading.Thread(target=record, name="captune-record", daemon=True)
    thread.start()
    thread.join(seconds)
    if done and isinstance(done[0], Exception):
        raise done[0]
    if not done:
        state = _load_state(out)
        print(f"captune: MLflow store {state['tracking_uri']} did not answer within {seconds:.0f}s. The results are "
              f"safe in {out}; `captune record {out}` completes the MLflow run {state['run_id']}",
              file=sys.stderr, flush=True)
    return bool(done and done[0])


def _write_record(out: Path, state: dict) -> None:
    import mlflow
    from mlflow import MlflowClient

    uri = configure(state["tracking_uri"])
    client, run_id = MlflowClient(uri), state["run_id"]
    metrics_file = out / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        logged = {m.step for m in client.get_metric_history(run_id, "bleu4")}
        for epoch in metrics["epochs"]:
            if epoch["epoch"] not in logged:
                client.log_batch(run_id, metrics=metric_entities(
                    {k: v for k, v in epoch.items() if isinstance(v, (int, float)) and k != "epoch"}, epoch["epoch"]))
        best = metrics["best"]
        client.log_batch(run_id, metrics=metric_entities(
            {f"best_{k}": v for k, v in best.items() if k.startswith("bleu")} | {"best_epoch": best["epoch"]}))
        client.log_artifact(run_id, str(metrics_file))
        if client.get_run(run_id).data.tags.get(MODEL_EPOCH_TAG) != str(best["epoch"]):
            with mlflow.start_run(run_id=run_id):
                log_captioner(out / FILENAME)
            client.set_tag(run_id, MODEL_EPOCH_TAG, str(best["epoch"]))
    for tag, value in ((STOP_TAG, state.get("stop_reason")), (ERROR_TAG, state.get("error"))):
        if value:
            client.set_tag(run_id, tag, value)
    client.set_terminated(run_id, state["status"])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"
