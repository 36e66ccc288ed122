"""MLflow: where runs go, per-epoch logging, logging captioners as models, resolving model URIs."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "model"  # the logged model's name inside a run
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")


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


class EpochLogger:
    """Logs one epoch's numeric metrics to an existing run (used on rank 0 of a training job)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict) -> None:
        import time

        from mlflow.entities import Metric

        step, now = int(metrics.get("epoch", 0)), int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and k != "epoch"]
        self.client.log_batch(self.run_id, metrics=batch)


def log_captioner(checkpoint: Path, registered_name: str | None = None):
    """Log a checkpoint as an MLflow pyfunc model in the active run (models from code: the
    wrapper is a source file, nothing is pickled). Returns the ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema([ColSpec("string")]))
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=str(PYFUNC_FILE), artifacts={"checkpoint": str(checkpoint)},
        registered_model_name=registered_name, pip_requirements=_requirements(), signature=signature,
    )


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


def resolve_model(model: str, tracking_uri: str | None = None) -> Path:
    """A local checkpoint file for MODEL: a path (file, or folder with model.pt) or an MLflow
    model URI such as runs:/<id>/model or models:/<name>@<alias>."""
    if "://" not in model and not model.startswith(("runs:/", "models:/")):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"{model}: no such checkpoint file or folder "
                                    "(or give an MLflow URI: runs:/<run_id>/model, models:/<name>@<alias>)")
        return path
    import mlflow

    configure(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as e:
        raise FileNotFoundError(f"{model}: cannot fetch this model from MLflow at "
                                f"{mlflow.get_tracking_uri()} ({type(e).__name__}: {e})") from None
    found = sorted(local.rglob("model.pt"))
    if not found:
        raise FileNotFoundError(f"{model}: the MLflow model holds no captune checkpoint (model.pt)")
    return found[0]
