"""MLflow: where runs go, per-epoch logging, logging captioners as models, loading them back."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from trainables.config import ConfigError

if TYPE_CHECKING:
    from trainables.checkpoint import Loaded

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "model"  # the logged model's name inside a run
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_CODE = ("captune", "data", "trainables")  # the packages a logged model runs: it carries them


def _store_dir() -> Path:
    """The project's mlflow/ folder when running from a checkout, else ./mlflow."""
    here = PROJECT_ROOT / "mlflow"
    return here if here.is_dir() else Path.cwd() / "mlflow"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{_store_dir() / 'mlflow.db'}"


def configure(tracking_uri: str | None = None) -> str:
    """Point the mlflow library at the store and return its URI."""
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def require_writable_store(tracking_uri: str | None = None) -> None:
    """A local SQLite store that cannot be written is refused up front, naming it: SQLite would
    otherwise retry for minutes once training is under way, then end in a traceback."""
    uri = tracking_uri or default_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.is_dir():
        raise ConfigError(f"MLflow store {db}: a folder of that name exists; the store is a file (e.g. {db}/mlflow.db)")
    writable_folder(db.parent, f"MLflow store {db}")
    if db.exists() and not os.access(db, os.W_OK):
        raise ConfigError(f"MLflow store {db}: the file is read-only")


def writable_folder(folder: Path, what: str) -> Path:
    """`folder`, created if need be, once a file could be written in it; else a ConfigError naming
    it (a file in the way, a read-only file system, no permission), before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".captune-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    return folder


class TrackingUnavailable(RuntimeError):
    """The MLflow store did not answer (a server down, a SQLite file locked by another process);
    the message says what was kept and how to go on."""


def require_answering_store(tracking_uri: str | None = None) -> None:
    """The store must answer before a command starts work it would have to record (a SQLite store
    another process holds locked waits 20 s, then refuses)."""
    from mlflow import MlflowClient

    uri = configure(tracking_uri)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        if not unavailable(e):
            raise
        text = str(e).strip()
        raise TrackingUnavailable(
            f"MLflow store {uri} did not answer ({type(e).__name__}: {text.splitlines()[0][:200] if text else ''}); "
            f"nothing was started: run the command again once it answers (a SQLite store is locked while another "
            f"process writes to it; an `mlflow server` must be running)") from None


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


def require_free_space(needs: list[tuple[Path, int, str]]) -> None:
    """Refuse up front what the disks cannot hold: each (folder, bytes, what for) is summed per
    file system and compared with its free space, naming the folder, before any work starts."""
    import shutil

    per_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, size, what in needs:
        folder = next(p for p in (folder, *folder.parents) if p.exists())
        per_device.setdefault(folder.stat().st_dev, []).append((folder, size, what))
    for items in per_device.values():
        need, free = sum(size for _, size, _ in items), shutil.disk_usage(items[0][0]).free
        if need > free:
            wanted = "; ".join(f"{what} in {folder}: about {_mb(size)}" for folder, size, what in items)
            together = f" (together {_mb(need)})" if len(items) > 1 else ""
            raise ConfigError(f"not enough free space: {wanted}{together}; its file system has {_mb(free)} free")


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size < 10e9 else f"{size / 1e9:,.1f} GB"


def experiment_id(name: str, tracking_uri: str) -> str:
    """Get or create an experiment. On a local SQLite store its artifacts go beside the database
    (mlflow/artifacts), not into whatever folder the command happened to run in."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flat_params(prefix: str, values: dict) -> dict[str, str]:
    return {f"{prefix}{k}": str(v) for k, v in values.items()}


def metric_entities(values: dict[str, float], step: int = 0) -> list:
    """Metrics for MlflowClient.log_batch, all stamped now."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def param_entities(values: dict) -> list:
    """Params for MlflowClient.log_batch (MLflow keeps 6,000 characters of a value)."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


class EpochLogger:
    """Logs each epoch's numeric metrics to an existing run (rank 0 of a training job), from a
    thread of its own: a tracking store that is slow, locked or down never holds training up or
    ends it. What it could not write by `close` is written by the driver from the checkpoint's
    history (captune.training.record_run), so the record is complete either way."""

    def __init__(self, tracking_uri: str, run_id: str):
        import queue
        import threading

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
        import time

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
    import logging
    import threading

    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # MLflow's monitor logs INFO lines at start and stop ("Skip logging GPU metrics" on a CPU),
    # and a warning as it stops for good when the store does not answer: noise in the sweep's
    # console, where a trial's output arrives (the sweep says once that MLflow is unreachable).
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in run_tags.items())
    done = threading.Event()
    monitors: list[SystemMetricsMonitor] = []
    refused: list[Exception] = []

    def monitor_of_run() -> SystemMetricsMonitor | None:
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


def dataset_input(data_root: str | Path):
    """The dataset as an MLflow run input (what the runs table's Dataset column shows): its
    folder's name, a digest of its caption and split files (names, sizes, times; no reading) and
    its path."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from data.fingerprint import files_fingerprint

    root = Path(data_root).resolve()
    files = sorted(p for pattern in ("*.txt", "*.json", "*/*.txt") for p in root.glob(pattern) if p.is_file())
    dataset = Dataset(name=root.name, digest=files_fingerprint(files)[:12], source_type="local",
                      source=json.dumps({"uri": str(root)}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def log_captioner(checkpoint: Path, registered_name: str | None = None):
    """Log a checkpoint, less its optimizer state, as an MLflow pyfunc model in the active run
    (models from code: the wrapper is a source file, nothing is pickled), with the signature and
    input example that MLflow's UI shows as how to call it. The model carries the project's code
    it runs (`code_paths`): a machine with only its pip requirements serves it, with the code it
    was logged with. Returns the ModelInfo."""
    import mlflow
    import pandas as pd

    from captune.serving import example_image
    from trainables.catalog import CAPTION_BEAM
    from trainables.checkpoint import FILENAME, read_payload, without_optimizer

    max_len = int(read_payload(checkpoint).get("train_config", {}).get("max_len", 30))
    with tempfile.TemporaryDirectory(prefix="captune-model-") as folder:
        code = [shutil.copytree(PROJECT_ROOT / package, Path(folder) / "code" / package,
                                ignore=shutil.ignore_patterns("__pycache__")) for package in MODEL_CODE]
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(PYFUNC_FILE), code_paths=[str(c) for c in code],
            artifacts={"checkpoint": str(without_optimizer(checkpoint, Path(folder) / FILENAME))},
            registered_model_name=registered_name, pip_requirements=_requirements(),
            signature=_signature(max_len), input_example=(pd.DataFrame({"image": [example_image()]}),
                                                          {"beam": CAPTION_BEAM, "max_len": max_len}),
        )


def _signature(max_len: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from trainables.catalog import CAPTION_BEAM

    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("beam", "long", CAPTION_BEAM),
                                              ParamSpec("max_len", "long", max_len)]))


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    def pinned(*names: str) -> str:  # the first of these that is installed
        for name in names:
            try:
                return f"{name}=={version(name)}"
            except PackageNotFoundError:
                pass
        raise PackageNotFoundError(f"none of {', '.join(names)} is installed: the model's requirements need it")

    # mlflow-skinny serves as well as mlflow to load the model (a GPU image may carry only that)
    return [pinned("torch"), pinned("torchvision"), pinned("mlflow", "mlflow-skinny"), pinned("nltk"),
            pinned("pillow"), pinned("pandas")]


def load_captioner(model: str, tracking_uri: str | None = None, arch: str | None = None) -> Loaded:
    """The captioner MODEL names: a checkpoint path (file, or folder with model.pt) or an MLflow
    model URI such as runs:/<id>/model or models:/<name>@<alias>."""
    with local_checkpoint(model, tracking_uri) as path:
        from trainables.checkpoint import load_checkpoint

        return load_checkpoint(path, arch)


@contextmanager
def local_checkpoint(model: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local checkpoint file for MODEL (see `load_captioner`). An MLflow model is downloaded into
    a folder removed on exit: MLflow's own download folder would stay in /tmp, 40-140 MB a call."""
    if "://" not in model and not model.startswith(("runs:/", "models:/")):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"{model}: no such checkpoint file or folder "
                                    "(or give an MLflow URI: runs:/<run_id>/model, models:/<name>@<alias>)")
        yield path
        return
    import mlflow

    configure(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="captune-model-") as folder:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=folder))
        except Exception as e:
            raise FileNotFoundError(f"{model}: cannot fetch this model from MLflow at "
                                    f"{mlflow.get_tracking_uri()} ({type(e).__name__}: {e})") from None
        found = sorted(local.rglob("model.pt"))
        if not found:
            raise FileNotFoundError(f"{model}: the MLflow model holds no captune checkpoint (model.pt)")
        yield found[0]
