"""A `captune train` job's record: its settings and state in `--out/run.json` (what `--resume`
goes on from), and its MLflow run, opened as the job starts and completed from the kept results
(`captune record` completes it later when the store was away)."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from captune.infra.mlflow_logging import metric_entities, param_entities, unavailable
from captune.infra.mlflow_names import ARCH_TAG, EPOCHS_TAG, ERROR_TAG, KIND_TAG, MODEL_EPOCH_TAG, STOP_TAG
from captune.infra.mlflow_store import (TrackingUnavailable, configure, default_tracking_uri, get_or_create_experiment,
                                require_not_deleted)
from captune.trainables.checkpoint import FILENAME
from captune.trainables.config import ConfigError, TrainConfig, replace
from captune.serving.logged_model import log_captioner
from captune.trainables.reporting import mlflow_epoch

EXPERIMENT = "captune-train"
RUN_FILE = "run.json"  # in --out: the job's settings, its MLflow run, how it ended
RESUMABLE_KEYS = {"epochs"}  # what --resume may change: more epochs go on from the last one


def job_state(out: Path, cfg: TrainConfig, data_root: str | Path, workers: int, use_gpu: bool,
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
    trained = _epochs_kept(out)
    if trained and cfg.epochs <= trained:  # else run.json would say fewer epochs than the run has
        asked = f"--epochs {epochs}" if epochs is not None else f"its {cfg.epochs} epochs"
        raise ConfigError(f"--resume {out}: {asked}, but {trained} epoch(s) are already trained there; give --epochs "
                          f"above {trained} to train more")
    return cfg.validate(), state["data"], state["workers"], state["gpu"]


def _setting(state: dict, key: str):
    return state[key] if key in state else state["config"].get(key)


def _epochs_note(out: Path) -> str:
    kept = _epochs_kept(out)
    return f", {kept} epoch(s) kept" if kept is not None else ""


def _epochs_kept(out: Path) -> int | None:
    """The finished epochs metrics.json holds (None: none kept, or no readable file)."""
    try:
        return len(json.loads((out / 'metrics.json').read_text())['epochs'])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_state(out: Path) -> dict | None:
    path = out / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not a captune run file ({e})") from None


def save_state(out: Path, state: dict) -> None:
    replace_file(out / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=2)))


# --- the MLflow run ---------------------------------------------------------------------------------

def open_run(state: dict, cfg: TrainConfig) -> str:
    """Create the job's MLflow run, or reopen it on --resume. The store must answer now: nothing
    has been trained yet, so refusing costs nothing."""
    uri = configure(state["tracking_uri"])
    try:
        client = MlflowClient(uri)
        if state.get("run_id"):  # --resume: the run goes on; why it stopped is history
            client.update_run(state["run_id"], status="RUNNING")
            for tag in (STOP_TAG, ERROR_TAG):
                if tag in client.get_run(state["run_id"]).data.tags:
                    client.delete_tag(state["run_id"], tag)
            client.set_tag(state["run_id"], EPOCHS_TAG, str(cfg.epochs))  # --epochs may have raised them
            return state["run_id"]
        run = client.create_run(get_or_create_experiment(state["experiment"], uri),
                                run_name=f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={ARCH_TAG: cfg.arch, KIND_TAG: "train", "image_blind": str(cfg.image_blind),
                                      EPOCHS_TAG: str(cfg.epochs)})
        # epochs is the one setting --resume may change, and a param, once logged, cannot: it is a tag
        params = {k: v for k, v in cfg.to_dict().items() if k != "epochs"}
        client.log_batch(run.info.run_id, params=param_entities(
            {**params, "data": state["data"], "workers": state["workers"], "gpu": state["gpu"]}))
        return run.info.run_id
    except Exception as e:
        if not unavailable(e):
            raise
        raise TrackingUnavailable(f"MLflow store {uri} did not answer ({_first_line(e)}); nothing was trained: "
                                  f"run the command again once it answers (a SQLite store is locked while another "
                                  f"process writes to it; an `mlflow server` must be running)") from None


def require_live_record(out: Path, state: dict) -> None:
    """The job's MLflow run (or, before it has one, its experiment) must not be deleted: its
    records could not be written, and training first would only fail at its end."""
    uri = configure(state["tracking_uri"])
    client = MlflowClient(uri)
    if state.get("run_id"):
        require_not_deleted(client, uri, run_id=state["run_id"], what=str(out),
                            hint=f"; once restored, `captune train --resume {out}` or `captune record {out}` goes on")
    else:
        require_not_deleted(client, uri, experiment=client.get_experiment_by_name(state["experiment"]),
                            what=f"--experiment {state['experiment']}", hint=", or pass another --experiment")


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


def record_within(out: Path, seconds: float) -> bool:
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
    require_live_record(out, state)
    uri = configure(state["tracking_uri"])
    client, run_id = MlflowClient(uri), state["run_id"]
    metrics_file = out / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        logged = {m.step for m in client.get_metric_history(run_id, "bleu4")}
        for epoch in metrics["epochs"]:  # what the job's EpochLogger could not write, as it would have
            if epoch["epoch"] not in logged:
                client.log_batch(run_id, metrics=metric_entities(mlflow_epoch(epoch, first=not logged), epoch["epoch"]))
                logged.add(epoch["epoch"])
        best = metrics["best"]
        client.log_batch(run_id, metrics=metric_entities(
            {f"best_{k}": v for k, v in best.items() if k != "epoch"} | {"best_epoch": best["epoch"]}))
        client.log_artifact(run_id, str(metrics_file))
        if client.get_run(run_id).data.tags.get(MODEL_EPOCH_TAG) != str(best["epoch"]):
            with mlflow.start_run(run_id=run_id):
                log_captioner(out / FILENAME)
            client.set_tag(run_id, MODEL_EPOCH_TAG, str(best["epoch"]))
    for tag, value in ((STOP_TAG, state.get("stop_reason")), (ERROR_TAG, state.get("error"))):
        if value:
            client.set_tag(run_id, tag, value)
    client.set_terminated(run_id, state["status"])


def replace_file(path: Path, write) -> None:
    """Write `path` whole or not at all (an interrupt mid-copy leaves the old file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"
