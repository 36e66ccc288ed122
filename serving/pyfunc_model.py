"""MLflow pyfunc wrapper of a captune checkpoint, logged as code (MLflow "models from code").

Input: a DataFrame with a column `image`, each value a JPEG or PNG file's content in base64 (how
REST clients send images) or, in-process only, an image file's path. Params: `beam` (1 = greedy),
`max_len` (words) and `alpha` (the length penalty), by default the decoding stored with the model
(captune.trainables.inference.decoding_of). Output: one caption per row. A request's fault raises MlflowException
INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with HTTP 400 and a JSON error; a
body the server cannot read is answered so too (`answer_request_faults_in_json`). The model runs
on the GPU where there is one.
"""
from __future__ import annotations

import importlib
import logging
import os

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, scoring_server

from captune.trainables.checkpoint import load_checkpoint
from captune.trainables.inference import caption_pixels, decoding_of, image_size_of, max_len_of
from captune.serving.inputs import (PARAMS, RequestError, checked_params, refuse_unknown, request_pixels, shortened,
                                unreadable_body)

_logger = logging.getLogger("mlflow.pyfunc.scoring_server")  # the server's own, printed in its log


class CaptionerModel(PythonModel):
    def load_context(self, context) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded = load_checkpoint(context.artifacts["checkpoint"])
        self.loaded.model.to(self.device).eval()
        refuse_unknown_params()
        if serving():
            quote_requests_briefly()
            answer_request_faults_in_json()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        try:
            how = checked_params(params, decoding_of(self.loaded), max_len_of(self.loaded))
            pixels = request_pixels(list(model_input["image"]), image_size_of(self.loaded), allow_paths=not serving())
        except RequestError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        return caption_pixels(self.loaded, pixels, how, self.device)


def serving() -> bool:
    """Whether this process is MLflow's scoring server, by two variables private to MLflow 3.17:
    `mlflow models serve` gives the server process `__pyfunc_model_path__` (before the model
    loads), and `scoring_server.init` sets `_MLFLOW_IS_IN_SERVING_ENVIRONMENT` (after). A served
    model must not read files of the server's disk that a request names.
    Breaks first: tests/test_serving.py (a path is refused over HTTP)."""
    return ("__pyfunc_model_path__" in os.environ
            or os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true")


def refuse_unknown_params() -> None:
    """Make params the signature does not declare an error for captune models. MLflow 3.17 drops
    them with a log warning (`mlflow.models.utils._enforce_params_schema`, which
    `PyFuncModel.predict` looks up as `mlflow.pyfunc._enforce_params_schema`), so a misspelt
    "beem" would be answered at the default beam. This wraps that function in this process; other
    models' schemas pass through unchanged. Breaks first: tests/test_serving.py (unknown param)."""
    original = mlflow.pyfunc._enforce_params_schema
    if getattr(original, "captune_strict", False):
        return

    def strict(params, schema):
        if schema is not None and isinstance(params, dict) and {p.name for p in schema.params} == set(PARAMS):
            try:
                refuse_unknown(params)
            except RequestError as e:
                raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        return original(params, schema)

    strict.captune_strict = True
    mlflow.pyfunc._enforce_params_schema = strict


def quote_requests_briefly() -> None:
    """MLflow 3.17's scoring server puts the request's data in the message of a 400 error
    (`scoring_server.invocations`: "Failed to predict data '{data}'"); with the `inputs` format
    that is a dict of numpy arrays, whose repr holds each base64 image whole: megabytes of error
    per image. In the server process numpy now prints at most 40 characters of a string. numpy 2
    keeps print options per context (`set_printoptions` would reach only this one, not the
    requests' threads), so this sets the default all contexts start from, a dict private to
    numpy (`numpy._core.printoptions.default_format_options_dict`).
    Breaks first: tests/test_serving.py (the length of a bad request's error)."""
    defaults = importlib.import_module("numpy._core.printoptions").default_format_options_dict
    defaults["formatter"] = {
        "numpystr": lambda s: repr(str(s) if len(s) <= 40 else str(s)[:37] + "...")}


def answer_request_faults_in_json() -> None:
    """Make every fault of a request to MLflow 3.17's scoring server a 4xx with a short JSON body
    (`error_code`, `message`), no stack trace. The server reads the body in
    `scoring_server.invocations(data, content_type, model, input_schema)` before the model is
    called, and left alone it answers JSON nested past the recursion limit, or a number of over
    4,300 digits (json.loads raises RecursionError, ValueError), or no Content-Type header, with 500
    in plain text; a body that is not Parquet or CSV with 400 whose JSON holds the stack trace (the
    key `stack_trace` of `MlflowException.json_kwargs`); a body that is not JSON with the body
    quoted whole; an unsupported content type with 415 in plain text (its `InvocationsResponse`).
    The `/invocations` handler `scoring_server.init` builds looks `invocations` up among the
    module's globals at each request, so wrapping it there, in this process, reaches every request
    (the model loads before the first one). Stack traces go to the server's log. Breaks first:
    tests/test_serving_faults.py::test_scoring_server_internals_the_request_guard_relies_on."""
    original = scoring_server.invocations
    if getattr(original, "captune_guard", False):
        return

    def guarded(data, content_type, model, input_schema):
        if not content_type:
            return _json_error(415, "no Content-Type header: send the request as application/json "
                                    "(or text/csv, application/vnd.apache.parquet)")
        try:
            result = original(data, content_type, model, input_schema)
        except MlflowException as e:
            if stack := e.json_kwargs.pop("stack_trace", None):
                _logger.error("%s\n%s", shortened(e.message), stack)
            e.message = shortened(e.message)
            raise
        except Exception as e:  # the model's own errors come as MlflowException: this is the body
            _logger.exception("unreadable request body")
            raise MlflowException(unreadable_body(e, content_type), error_code=BAD_REQUEST) from None
        if result.status >= 400 and result.mimetype != "application/json":
            return _json_error(result.status, result.response)
        return result

    guarded.captune_guard = True
    scoring_server.invocations = guarded


def _json_error(status: int, message: str):
    body = MlflowException(shortened(message), error_code=BAD_REQUEST).serialize_as_json()
    return scoring_server.InvocationsResponse(response=body, status=status, mimetype="application/json")


mlflow.models.set_model(CaptionerModel())
