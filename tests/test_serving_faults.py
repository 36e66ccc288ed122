"""Bodies a client can send by mistake to a served captioner (`mlflow models serve`): each one a 4xx
with MLflow's JSON error naming the fault, no stack trace, and the server goes on serving; and the
scoring server's internals that this relies on."""
import http.client
import inspect
import io
import json
import shutil

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc import scoring_server

from captune.infra.mlflow_store import get_or_create_experiment
from captune.serving.logged_model import log_captioner
from captune.serving.inputs import example_image
from tests.test_serving import serving, tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_champion(tmp_path_factory, store_template) -> str:
    """An untrained tiny captioner as `captune-cnn-lstm@champion` in a fresh SQLite store (a served
    model without a sweep, in seconds); its tracking URI."""
    folder = tmp_path_factory.mktemp("tiny-store")
    shutil.copyfile(store_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=get_or_create_experiment("tiny", uri)):
        info = log_captioner(tiny_checkpoint(folder), "captune-cnn-lstm")
    mlflow.MlflowClient(uri).set_registered_model_alias("captune-cnn-lstm", "champion", info.registered_model_version)
    return uri


def send(port: int, body: bytes, content_type: str | None) -> tuple[int, str, bytes]:
    """POST /invocations with exactly this body and Content-Type header (none if None)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


JSON, CSV, PARQUET = "application/json", "text/csv", "application/vnd.apache.parquet"


def refusal(answer: bytes, message: str) -> bool:
    """Whether an error's body is MLflow's JSON error naming the fault, with no stack trace and
    without the request quoted back whole."""
    try:
        error = json.loads(answer)
    except ValueError:
        return False
    return (len(answer) < 2000 and error.get("error_code") and message in error.get("message", "")
            and "stack_trace" not in error and "Traceback" not in error["message"])


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_every_body_a_client_can_send_by_mistake_is_refused_in_json_without_a_stack_trace(tiny_champion, tmp_path):
    good = json.dumps({"inputs": {"image": [example_image()]}}).encode()
    mistakes = {
        "nested too deeply": [(b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", JSON),
                              (b"[" * 100_000 + b"]" * 100_000, JSON),
                              (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, JSON)],
        "Parquet magic bytes not found": [(b"garbage, not parquet", PARQUET)],
        "Parquet file size is 0 bytes": [(b"", PARQUET)],
        "Unterminated string": [(good[:-20], JSON),  # truncated; the body is not quoted back whole
                                (json.dumps({"inputs": {"image": ["A" * 3_000_000]}}).encode()[:-5], JSON)],
        "Expecting value": [(b"", JSON), (b"\xff\xfe{}", JSON)],
        "Got 'text/plain'": [(good, "text/plain")],
        "no Content-Type header": [(good, None)],
        "only supports UTF-8": [(good, "application/json; charset=latin-1")],
        "EOF inside string": [(b'"unterminated\n\x01,,\n', CSV)],
        "No columns to parse": [(b"", CSV)],
        "valid UTF-8": [(b"\xff\xfe", CSV)],
        "Model is missing inputs ['image']": [(b"a,b\n1,2\n", CSV)],
        "value has 100000 digits": [(b"9" * 100_000, JSON),
                                    (b'{"inputs": {"image": [' + b"9" * 100_000 + b"]}}", JSON)],
        "row 0: `image` is not base64": [(b'{"inputs": {"image": [1e999999]}}', JSON)],
        "Failed to validate type and shape for 'beam'": [(good[:-1] + b', "params": {"beam": 1e21}}', JSON),
                                                          (good[:-1] + b', "params": {"beam": ' + b'{"a":' * 900 + b"1"
                                                           + b"}" * 900 + b"}}", JSON)],  # the message is cut short
    }
    wrong = []
    with serving("models:/captune-cnn-lstm@champion", tiny_champion, tmp_path) as port:
        for message, bodies in mistakes.items():
            for body, content_type in bodies:
                status, answer_type, answer = send(port, body, content_type)
                if not (400 <= status < 500 and answer_type == JSON and refusal(answer, message)):
                    wrong.append((message, content_type, body[:30], status, len(answer), answer[:200]))
        assert send(port, good, JSON)[0] == 200  # still serving
    assert not wrong, "\n".join(map(str, wrong))
    assert "RecursionError" in (tmp_path / "serve.log").read_text()  # the server's log says what happened


def test_scoring_server_internals_the_request_guard_relies_on():
    """What pyfunc_model.answer_request_faults_in_json relies on in MLflow 3.17's scoring server."""
    # the /invocations handler looks `invocations` up among the module's globals at each request
    handler = next(c for c in scoring_server.init.__code__.co_consts if getattr(c, "co_name", "") == "transformation")
    assert "invocations" in handler.co_names and "invocations" not in handler.co_freevars
    assert list(inspect.signature(scoring_server.invocations).parameters) == ["data", "content_type", "model",
                                                                              "input_schema"]
    assert scoring_server.InvocationsResponse._fields == ("response", "status", "mimetype")
    # a stack trace is a key of the error's JSON, and what is left of it is what the client gets
    error = MlflowException("bad body", error_code=BAD_REQUEST, stack_trace="Traceback ...")
    assert error.json_kwargs.pop("stack_trace") == "Traceback ..."
    error.message = "short"
    assert json.loads(error.serialize_as_json())["message"] == "short" and error.get_http_status_code() == 400
    # the faults it answers: json.loads raises these, not JSONDecodeError, which MLflow catches
    for body, raised in ((b"[" * 5000 + b"]" * 5000, RecursionError), (b"9" * 5000, ValueError)):
        with pytest.raises(raised):
            scoring_server._decode_json_input(body)
    with pytest.raises(MlflowException) as parquet:
        scoring_server.parse_parquet_input(io.BytesIO(b"garbage"))
    assert "stack_trace" in parquet.value.json_kwargs
