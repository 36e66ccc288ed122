"""MLflow from inside any process: telling an outage from a refusal, the entities of a batch,
per-epoch metrics written from a thread of their own, and a machine's system metrics."""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from captune.infra.mlflow_names import tags_filter

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
    """Writes each epoch's metrics to an existing run (rank 0 of a training job, a rerun: see
    captune.trainables.reporting), from a thread of its own: a tracking store that is slow,
    locked or down never holds training up or ends it; records wait, in order, and are retried.
    `client`: an MlflowClient, or a worker's captune.infra.mlflow_relay.RelayClient. Epochs up to
    `logged` are in the run already (a resumed run) and not logged again. What it could not write
    by `close` is written by the driver from the checkpoint's history
    (captune.train_record.record_run), so the record is complete either way."""

    def __init__(self, client, run_id: str, logged: int = 0, where: str = "MLflow"):
        self.client, self.run_id, self.logged, self.where = client, run_id, logged, where
        self.queued = logged  # the last epoch handed to `log`
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._write, name="captune-epoch-logger", daemon=True)
        self._thread.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        """`values` at `step` (an epoch), unless the run holds that epoch already."""
        if step > self.queued:
            self.queued = step
            self._queue.put((step, dict(values)))

    def close(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the records in hand, then stop writing."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._closed.set()

    def _write(self) -> None:
        while (record := self._queue.get()) is not None:
            step, values = record
            while not self._closed.is_set():
                try:
                    self.client.log_batch(self.run_id, metrics=metric_entities(values, step))
                    self.logged = max(self.logged, step)
                    break
                except Exception as e:
                    # Down or locked: try again. Anything else (a refused write) is the driver's to
                    # raise when it writes the same record at the end; training goes on meanwhile.
                    retry = unavailable(e)
                    if not self._warned or not retry:
                        self._warned = True
                        print(f"{self.where} did not take epoch {step}'s metrics "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); training goes on, "
                              f"and the record is completed when training ends", flush=True)
                    if not retry:
                        break
                    time.sleep(5)


def find_or_create_run(client, experiment_id: str, tags: dict[str, str], run_name: str,
                       extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The run carrying all `tags`, or a new one with them (a sweep's search parent, its comparison
    run: found again on a resume). Returns (run_id, created)."""
    found = client.search_runs([experiment_id], filter_string=tags_filter(tags), max_results=1)
    if found:
        return found[0].info.run_id, False
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **(extra_tags or {})})
    return run.info.run_id, True


def last_logged_epoch(client, run_id: str, key: str = "bleu4") -> int:
    """The last epoch a run holds (its per-epoch `key`): 0 for a new run."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)


@contextmanager
def system_metrics(client, experiment_id: str, run_tags: dict[str, str], node_id: str | None = None,
                   every_s: float = 5.0) -> Iterator[None]:
    """While the block runs, this machine's CPU, memory, disk, network (and GPU, where NVML sees
    one) are logged as `system/*` metrics (`system/<node_id>/*` when given), every `every_s`
    seconds, to the run of `experiment_id` that carries `run_tags` (the sweep driver creates it as
    the trial starts, so it is looked up until found). `client`: an MlflowClient, or a worker's
    captune.infra.mlflow_relay.RelayClient. The samples are MLflow's own (its metric monitors, the names
    MLflow's monitor logs); MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides `every_s`.
    Auxiliary: a store that refuses is named once and sampling stops; during an outage samples
    are dropped and sampling goes on; training goes on either way."""
    every_s = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or every_s)
    query = tags_filter(run_tags)
    done = threading.Event()
    sampler = _Sampler(client, node_id)

    def run_id_of_run() -> str | None:
        try:
            found = client.search_runs([experiment_id], filter_string=query, max_results=1)
        except Exception as e:
            sampler.failed(e, "the run lookup")
            return None
        return found[0].info.run_id if found else None

    def sample() -> None:
        wait = 0.0  # looked up at once: a worker's first call to the relay also sets up its connection
        while not sampler.refused and not done.wait(wait):
            if sampler.run_id is None:
                sampler.start(run_id_of_run())
            else:
                sampler.publish()
            wait = 1.0 if sampler.run_id is None else every_s

    def finish() -> None:
        thread.join()
        if sampler.run_id is None and not sampler.refused:  # training ended before its run was found
            sampler.start(run_id_of_run())
        # The last, unfinished interval is the trial's last seconds (all of a trial shorter than
        # one interval): it is logged too.
        if sampler.run_id is not None and not sampler.refused:
            sampler.publish()

    thread = threading.Thread(target=sample, name="captune-system-metrics", daemon=True)
    thread.start()
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


class _Sampler:
    """MLflow's metric monitors (mlflow.system_metrics.metrics: what its SystemMetricsMonitor
    samples, MLflow 3.17), sampled and logged at steps that go on from the run's last one."""

    def __init__(self, client, node_id: str | None):
        self.client, self.prefix = client, "system/" + (f"{node_id}/" if node_id else "")
        self.run_id: str | None = None
        self.step = 0
        self.refused = False
        self._monitors: list | None = None

    def start(self, run_id: str | None) -> None:
        if run_id is None:
            return
        try:  # a restarted trial goes on from its run's last system-metrics step
            self.step = 1 + max((m.step for m in self.client.get_metric_history(
                run_id, f"{self.prefix}cpu_utilization_percentage")), default=-1)
        except Exception as e:
            self.failed(e, "the run's last step")
            return
        self.run_id = run_id
        self.collect()

    def monitors(self) -> list:
        # Imported here, in the sampler's thread: a new trial process would otherwise wait for
        # MLflow's import (about a second) before its first training step.
        if self._monitors is None:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

            self._monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
            try:
                self._monitors.append(GPUMonitor())  # raises where NVML sees no GPU
            except Exception:
                pass
        return self._monitors

    def collect(self) -> None:
        for monitor in self.monitors():
            monitor.collect_metrics()

    def publish(self) -> None:
        self.collect()
        values = {}
        for monitor in self.monitors():
            values.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        try:
            self.client.log_batch(self.run_id, metrics=metric_entities(
                {f"{self.prefix}{k}": v for k, v in values.items()}, self.step))
            self.step += 1
        except Exception as e:
            self.failed(e, "a sample")

    def failed(self, error: Exception, what: str) -> None:
        """An outage drops this sample (the next is tried); a refusal stops sampling, said once."""
        if not unavailable(error):
            self.refused = True
            print(f"system metrics not logged: MLflow refused {what} ({type(error).__name__}: {str(error)[:200]})",
                  flush=True)
