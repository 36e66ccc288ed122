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

from infra.errors import UserError
from infra.mlflow_logging import unavailable
from trainables.config import ConfigError

if TYPE_CHECKING:
    from trainables.checkpoint import Loaded

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "model"  # the logged model's name inside a run
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_CODE = ("captune", "data", "infra", "trainables")  # the packages a logged model runs: it carries them


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


class TrackingUnavailable(UserError, RuntimeError):
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


def dataset_input(data_root: str | Path):
    """The dataset as an MLflow run input (what the runs table's Dataset column shows): its
    folder's name, a digest of its caption and split files (names, sizes, times; no reading) and
    its path."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from infra.fingerprint import files_fingerprint

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
    import pandas as pd

    import mlflow
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
