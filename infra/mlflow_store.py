"""Where MLflow runs go and whether the store can take them: the default local store, checks
made before any work starts (writable, answering, room on disk), a sweep's experiment, and a
dataset as a run input."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from captune.infra.errors import UserError
from captune.infra.fingerprint import files_fingerprint
from captune.infra.mlflow_logging import unavailable
from captune.infra.sqlite_store import ready_sqlite_store

# mlflow is imported inside the functions: infra is imported by every layer (the CLI among them,
# which answers `--help` and refuses bad options before MLflow loads).

# In a checkout (installed editable) the repository, which holds mlflow/server.sh beside infra/; in
# an installed wheel, site-packages/captune, which holds no mlflow/ folder (site-packages/mlflow is
# the library, hence the check for server.sh).
CHECKOUT = Path(__file__).resolve().parents[1]


class StoreError(UserError, ValueError):
    """A store or folder that cannot be written: named, before any work starts."""


def checkout_server_script() -> Path | None:
    """The checkout's mlflow/server.sh when captune runs from a checkout; None when installed."""
    script = CHECKOUT / "mlflow" / "server.sh"
    return script if script.is_file() else None


def _store_dir() -> Path:
    """The checkout's mlflow/ folder (the one its server.sh serves), else ./mlflow."""
    script = checkout_server_script()
    return script.parent if script else Path.cwd() / "mlflow"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{_store_dir() / 'mlflow.db'}"


def configure(tracking_uri: str | None = None) -> str:
    """Point the mlflow library at the store, ready to use (a new SQLite store created), and
    return its URI."""
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        ready_sqlite_store(uri)  # a new store: created by one process at a time
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
        raise StoreError(f"MLflow store {db}: a folder of that name exists; the store is a file (e.g. {db}/mlflow.db)")
    writable_folder(db.parent, f"MLflow store {db}")
    if db.exists() and not os.access(db, os.W_OK):
        raise StoreError(f"MLflow store {db}: the file is read-only")


def writable_folder(folder: Path, what: str) -> Path:
    """`folder`, created if need be, once a file could be written in it; else a StoreError naming
    it (a file in the way, a read-only file system, no permission), before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{what}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".captune-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StoreError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    return folder


class TrackingUnavailable(UserError, RuntimeError):
    """The MLflow store did not answer (a server down, a SQLite file locked by another process);
    the message says what was kept and how to go on."""


def require_answering_store(tracking_uri: str | None = None) -> None:
    """The store must answer before a command starts work it would have to record (a SQLite store
    another process holds locked waits 20 s, then refuses)."""
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    try:
        MlflowClient(configure(uri)).search_experiments(max_results=1)  # (a new store is made here, if need be)
    except Exception as e:
        if not unavailable(e):
            raise
        text = str(e).strip()
        raise TrackingUnavailable(
            f"MLflow store {uri} did not answer ({type(e).__name__}: {text.splitlines()[0][:200] if text else ''}); "
            f"nothing was started: run the command again once it answers (a SQLite store is locked while another "
            f"process writes to it; an `mlflow server` must be running)") from None


def require_free_space(needs: list[tuple[Path, int, str]]) -> None:
    """Refuse up front what the disks cannot hold: each (folder, bytes, what for) is summed per
    file system and compared with its free space, naming the folder, before any work starts."""
    per_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, size, what in needs:
        folder = next(p for p in (folder, *folder.parents) if p.exists())
        per_device.setdefault(folder.stat().st_dev, []).append((folder, size, what))
    for items in per_device.values():
        need, free = sum(size for _, size, _ in items), shutil.disk_usage(items[0][0]).free
        if need > free:
            wanted = "; ".join(f"{what} in {folder}: about {_mb(size)}" for folder, size, what in items)
            together = f" (together {_mb(need)})" if len(items) > 1 else ""
            raise StoreError(f"not enough free space: {wanted}{together}; its file system has {_mb(free)} free")


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size < 10e9 else f"{size / 1e9:,.1f} GB"


def get_or_create_experiment(name: str, tracking_uri: str) -> str:
    """Get or create an experiment. On a local SQLite store its artifacts go beside the database
    (mlflow/artifacts), not into whatever folder the command happened to run in."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        require_not_deleted(client, tracking_uri, experiment=found)  # its runs could not be written
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


def record_dataset(client, run_id: str, data_root: str | Path) -> None:
    """The dataset as an input of the run, once. Safe when another process records the same
    dataset into the experiment at the same moment (two searches' first trials): MLflow inserts
    an experiment's dataset row on first use, and the slower of two writers fails on its unique
    key; the dataset is then there, and the second try only links it."""
    runs_input = dataset_input(data_root)
    for attempt in (1, 2):
        try:
            client.log_inputs(run_id, datasets=[runs_input])
            return
        except Exception as e:  # (through a tracking server, the same clash comes back as its text)
            clash = any(c.__name__ == "IntegrityError" for c in type(e).__mro__) or "UNIQUE constraint" in str(e)
            if attempt == 2 or not clash:
                raise


def dataset_input(data_root: str | Path):
    """The dataset as an MLflow run input (what the runs table's Dataset column shows): its
    folder's name, a digest of its caption and split files (names, sizes, times; no reading) and
    its path."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    root = Path(data_root).resolve()
    files = sorted(p for pattern in ("*.txt", "*.json", "*/*.txt") for p in root.glob(pattern) if p.is_file())
    dataset = Dataset(name=root.name, digest=files_fingerprint(files)[:12], source_type="local",
                      source=json.dumps({"uri": str(root)}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


class DeletedInStore(UserError, LookupError):
    """An MLflow experiment or run a command needs was deleted (it is in the store's trash, from
    which MLflow's own commands restore it)."""


def require_not_deleted(client, uri: str, *, experiment=None, run_id: str | None = None, what: str = "",
                        hint: str = "") -> None:
    """Refuse, naming it, the store and MLflow's command that restores it, an `experiment` (an
    Experiment, or None) or the run `run_id` (or its experiment) that was deleted: MLflow reads a
    deleted experiment as empty and refuses writes to a deleted run only deep inside the work.
    `what`: the command's words for it, first; `hint`: the message's end (what to do after, or
    instead)."""
    import shlex

    run = client.get_run(run_id) if run_id else None
    if run is not None:
        experiment = client.get_experiment(run.info.experiment_id)
    restore = f"MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow"
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        gone = (f"MLflow experiment {experiment.name!r} (id {experiment.experiment_id}) was deleted in the store "
                f"{uri}; restore it, with its runs: `{restore} experiments restore --experiment-id "
                f"{experiment.experiment_id}`")
    elif run is not None and run.info.lifecycle_stage == "deleted":
        gone = (f"MLflow run {run_id} (experiment {experiment.name!r}) was deleted in the store {uri}; restore it: "
                f"`{restore} runs restore --run-id {run_id}`")
    else:
        return
    raise DeletedInStore(f"{what + ': ' if what else ''}{gone}; nothing was written{hint}")
