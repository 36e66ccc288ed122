"""The captioner a command names: a checkpoint path, or an MLflow model URI (runs:/…, models:/…)."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from captune.infra.mlflow_store import configure
from captune.trainables.checkpoint import Loaded, load_checkpoint


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
    # Only here: `captune caption` or `evaluate` of a checkpoint file needs no MLflow, whose import
    # takes 1.5-3 s on this machine (benchmarks/RESULTS.md, serving).
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
