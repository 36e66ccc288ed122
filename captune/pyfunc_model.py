"""MLflow pyfunc wrapper of a captune checkpoint, logged as code (MLflow "models from code").

Input: a pandas DataFrame with a column `image` of image file paths; output: one caption each.
"""
from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class CaptionerModel(PythonModel):
    def load_context(self, context) -> None:
        from trainables.checkpoint import load_checkpoint

        self.loaded = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from trainables.inference import caption_images

        params = params or {}
        return caption_images(self.loaded, list(model_input["image"]), beam=int(params.get("beam", 1)))


mlflow.models.set_model(CaptionerModel())
