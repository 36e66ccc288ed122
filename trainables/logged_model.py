"""The captioner as an MLflow model: logged from a checkpoint (models from code: pyfunc_model.py
with the packages it runs), and loaded back by URI as the checkpoint it was made from."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from infra.mlflow_store import PROJECT_ROOT, configure
from trainables.catalog import CAPTION_BEAM
from trainables.checkpoint import FILENAME, Loaded, load_checkpoint, read_payload, without_optimizer
from trainables.serving import example_image

MODEL_NAME = "model"  # the logged model's name inside a run
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_CODE = ("data", "infra", "trainables")  # the packages a logged model runs: it carries them


def log_captioner(checkpoint: Path, registered_name: str | None = None):
    """Log a checkpoint, less its optimizer state, as an MLflow pyfunc model in the active run
    (models from code: the wrapper is a source file, nothing is pickled), with the signature and
    input example that MLflow's UI shows as how to call it. The model carries the project's code
    it runs (`code_paths`): a machine with only its pip requirements serves it, with the code it
    was logged with. Returns the ModelInfo."""
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
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("beam", "long", CAPTION_BEAM),
                                              ParamSpec("max_len", "long", max_len)]))


def _requirements() -> list[str]:
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
