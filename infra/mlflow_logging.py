"""MLflow from inside any process: telling an outage from a refusal, the entities of a batch,
per-epoch metrics written from a thread of their own, and a machine's system metrics."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from infra.mlflow_names import tags_filter

# mlflow (and requests) are imported inside the functions: infra is imported by every layer, and
# most importers never talk to MLflow.


def unavailable(error: BaseException) -> bool:
    """Whether an MLflow call failed because the store could not be reached or was busy (a server
    down, a SQLite file locked by another process), rather than refusing what was asked."""
    import requests
    from mlflow.exceptions import MlflowException

    text = str(error)
    # sqlalchemy's OperationalError (a locked or missing database file) by name: a client of a
    # tracking server may have mlflow-skinny without sqlalchemy
    sql_operational = any(c.__name__ == "OperationalError" for c in type(error).__mro__)
    return sql_operational or isinstance(error, (requests.exceptions.RequestException, ConnectionError)) or (
        isinstance(error, MlflowException) and any(
            sign in text for sign in ("Max retries exceeded", "Connection", "database is locked")))


def flat_params(prefix: str, values: dict) -> dict[str, str]:
    return {f"{prefix}{k}": str(v) for k, v in values.items()}


def metric_entities(values: dict[str, float], step: int = 0) -> list:
    """Metrics for MlflowClient.log_batch, all stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def param_entities(values: dict) -> list:
    """Params for MlflowClient.log_batch (MLflow keeps 6,000 characters of a value)."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


@contextmanager
def optional_step(what: str, client, run_id: str, note_tag: str) -> Iterator[None]:
    """An optional step (an analysis, a chart, a figure): whatever it raises is recorded on the
    run as `note_tag` ("<what> not made: <why>") and printed, and the caller goes on. No optional
    step may cost a sweep its results. Ctrl-C and SIGTERM still stop it."""
    try:
        yield
    except Exception as e:
        text = str(e).strip()
        why = f"{what} not made: {type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
        print(f"WARNING: {why}", flush=True)
        try:
            client.set_tag(run_id, note_tag, why[:5000])
        except Exception as again:  # the store itself failing: the line above is what is left
            print(f"WARNING: ... and MLflow did not take that note ({type(again).__name__})", flush=True)


class EpochLogger:
    """Logs each epoch's numeric metrics to an existing run (rank 0 of a training job), from a
    thread of its own: a tracking store that is slow, locked or down never holds training up or
    ends it. What it could not write by `close` is written by the driver from the checkpoint's
    history (captune.train_record.record_run), so the record is complete either way."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._write, name="captune-epoch-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: dict) -> None:
        self._queue.put(dict(metrics))

    def close(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the records in hand, then stop writing."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._closed.set()

    def _write(self) -> None:
        from mlflow import MlflowClient

        client = None
        while (metrics := self._queue.get()) is not None:
            while not self._closed.is_set():
                try:
                    client = client or MlflowClient(self.tracking_uri)
                    step = int(metrics.get("epoch", 0))
                    client.log_batch(self.run_id, metrics=metric_entities(
                        {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}, step))
                    break
                except Exception as e:
                    # Down or locked: try again. Anything else (a refused write) is the driver's to
                    # raise when it writes the same record at the end; training goes on meanwhile.
                    retry = unavailable(e)
                    if not self._warned or not retry:
                        self._warned = True
                        print(f"MLflow ({self.tracking_uri}) did not take epoch {metrics.get('epoch')}'s metrics "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); training goes on, "
                              f"and the record is completed when training ends", flush=True)
                    if not retry:
                        break
                    time.sleep(5)


@contextmanager
def system_metrics(tracking_uri: str, experiment_id: str, run_tags: dict[str, str], node_id: str | None = None,
                   every_s: float = 5.0) -> Iterator[None]:
    """While the block runs, this machine's CPU, memory, disk, network (and GPU, where NVML sees
    one) are logged as `system/*` metrics, by MLflow's own monitor, to the run of `experiment_id`
    that carries `run_tags`. The sweep driver creates that run as the trial starts, so it is looked
    up until found. MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides `every_s`.
    Auxiliary: a store that refuses is named once; during an outage the lookup is tried again, a
    started monitor stops (MLflow's behaviour), and training goes on either way."""
    # MLflow's monitor logs INFO lines at start and stop ("Skip logging GPU metrics" on a CPU),
    # and a warning as it stops for good when the store does not answer: noise in the sweep's
    # console, where a trial's output arrives (the sweep says once that MLflow is unreachable).
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    query = tags_filter(run_tags)
    done = threading.Event()
    monitors: list = []  # of MLflow's SystemMetricsMonitor
    refused: list[Exception] = []

    def monitor_of_run():
        # Imported here, in the finder's thread: a new trial process would otherwise wait for
        # MLflow's import (about a second) before its first training step.
        from mlflow import MlflowClient
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            found = MlflowClient(tracking_uri).search_runs([experiment_id], filter_string=query, max_results=1)
        except Exception as e:
            if not unavailable(e) and not refused:
                refused.append(e)
                print(f"system metrics not logged: MLflow ({tracking_uri}) refused the run lookup "
                      f"({type(e).__name__}: {str(e)[:200]})", flush=True)
            return None
        # resume_logging: a restarted trial goes on from its run's last system-metrics step.
        return SystemMetricsMonitor(found[0].info.run_id, sampling_interval=every_s, resume_logging=True,
                                    node_id=node_id, tracking_uri=tracking_uri) if found else None

    def start_once_found() -> None:
        wait = 0.0
        while not refused and not done.wait(wait):
            wait = 1.0
            if monitor := monitor_of_run():
                monitor.start()
                monitors.append(monitor)
                return

    def finish() -> None:
        finder.join()
        if not monitors and not refused and (monitor := monitor_of_run()):
            monitors.append(monitor)  # training ended before its run was found: one sample, below
        for monitor in monitors:
            monitor.finish()
            # MLflow's monitor drops the samples of its last, unfinished interval: they are the
            # trial's last seconds (all of a trial shorter than one interval), so they are logged.
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as e:  # auxiliary figures never fail the training they describe
                print(f"system metrics: the last interval was not logged ({type(e).__name__}: {str(e)[:200]})",
                      flush=True)

    finder = threading.Thread(target=start_once_found, name="captune-system-metrics", daemon=True)
    finder.start()
    try:
        yield
    finally:
        done.set()
        # A store that is down (its client retries for minutes) must not hold the trial's end: Tune
        # reuses a trial's actor only if the trial's thread ends within 2 s of its last result
        # (TUNE_FUNCTION_THREAD_TIMEOUT_S), and ends the trial in error otherwise.
        closer = threading.Thread(target=finish, name="captune-system-metrics-end", daemon=True)
        closer.start()
        closer.join(timeout=1)
