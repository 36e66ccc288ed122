"""The captioner as an MLflow model: logged from a checkpoint (models from code: pyfunc_model.py
with the packages it runs), and loaded back by URI as the checkpoint it was made from."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from captune.infra.package_files import package_folder
from captune.trainables.catalog import CAPTION_BEAM
from captune.trainables.checkpoint import FILENAME, read_payload, without_optimizer
from captune.trainables.decoding import Decoding
from captune.serving.inputs import example_image

MODEL_NAME = "model"  # the logged model's name inside a run
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_CODE = ("captune.data", "captune.infra", "captune.trainables", "captune.serving")  # the packages a logged model runs: it carries them


def log_captioner(checkpoint: Path, registered_name: str | None = None, decoding: Decoding | None = None):
    """Log a checkpoint, less its optimizer state, as an MLflow pyfunc model in the active run
    (models from code: the wrapper is a source file, nothing is pickled), with the signature and
    input example that MLflow's UI shows as how to call it. `decoding` (default: beam
    CAPTION_BEAM) is how it captions unless a request or command says otherwise: stored in its
    checkpoint (captune.trainables.inference.decoding_of) and as its signature's param defaults
    (what `mlflow models serve` fills in). The model carries the project's code it runs
    (`code_paths`): a machine with only its pip requirements serves it, with the code it was
    logged with. Returns the ModelInfo."""
    max_len = int(read_payload(checkpoint).get("train_config", {}).get("max_len", 30))
    decoding = decoding or Decoding(beam=CAPTION_BEAM)
    params = {"beam": decoding.beam, "max_len": decoding.max_len or max_len, "alpha": decoding.alpha}
    with tempfile.TemporaryDirectory(prefix="captune-model-") as folder:
        stripped = without_optimizer(checkpoint, Path(folder) / FILENAME, decoding=asdict(decoding))
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(PYFUNC_FILE), code_paths=[str(model_code(Path(folder) / "code"))],
            artifacts={"checkpoint": str(stripped)}, registered_model_name=registered_name,
            pip_requirements=_requirements(), signature=_signature(params),
            input_example=(pd.DataFrame({"image": [example_image()]}), params),
        )


def model_code(folder: Path) -> Path:
    """A `captune` package in `folder` that holds only what a logged model runs (MODEL_CODE), as
    they are installed here: MLflow puts its parent first on the serving process's sys.path, so
    the model imports `captune.serving...` from it, whether or not captune is installed there."""
    package = folder / "captune"
    package.mkdir(parents=True)
    shutil.copy2(package_folder("captune") / "__init__.py", package)
    for name in MODEL_CODE:
        shutil.copytree(package_folder(name), package / name.rpartition(".")[2],
                        ignore=shutil.ignore_patterns("__pycache__"))
    return package


def _signature(params: dict):
    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("beam", "long", params["beam"]),
                                              ParamSpec("max_len", "long", params["max_len"]),
                                              ParamSpec("alpha", "double", params["alpha"])]))


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
