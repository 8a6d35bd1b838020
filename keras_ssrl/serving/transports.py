"""Transports: one `predict(signature, inputs, output_names)` method, three ways.

- `RestModel`: TF Serving's REST API, `POST /v1/models/<name>[/versions/<v>]:predict`
  with a JSON body in the row (`{"instances": [{"expression": [...]}, ...]}`) or the
  columnar (`{"inputs": {"expression": [[...], ...]}}`) form; strings are sent as
  `{"b64": ...}`. Standard library only (no TensorFlow import).
- `GrpcModel`: TF Serving's gRPC `PredictionService/Predict` with a `PredictRequest`
  from the `tensorflow-serving-api` package (the `serving` extra).
- `LocalModel`: the SavedModel loaded in-process with `tf.saved_model.load`, same
  inputs and outputs.

Each raises `ServingError` with the server's message when a request is refused or
fails.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np

from keras_ssrl.serving.assets import version_dir

REST_FORMS = ("instances", "inputs")
# gRPC messages: a batch of 64 samples x 57k genes is 15 MB, above gRPC's 4 MB default.
GRPC_MAX_MESSAGE = 1 << 30


class ServingError(RuntimeError):
    """The model server (or the in-process model) refused or failed a request."""


def _clean_tf_message(text: str) -> str:
    """The message of a TensorFlow error without its graph-location decorations."""
    keep = []
    for line in str(text).splitlines():
        line = line.strip()
        if not line or line.startswith(
            ("Detected at node", "<stack", "[[", "Graph ex")
        ):
            continue
        keep.append(re.sub(r"\s*\[\[\{\{.*$|\s*\[Op:.*$", "", line))
    return " ".join(keep) or str(text)


def _json_value(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.ndarray):
        return (
            [_json_value(v) for v in value] if value.dtype == object else value.tolist()
        )
    if isinstance(value, np.generic):
        return value.item()
    return value


def rest_request(inputs: dict, signature: str, form: str = "instances") -> dict:
    """The JSON body of a TF Serving REST predict request.

    Args:
        inputs: input name -> array with the batch on the first axis.
        signature: the signature name.
        form: `instances` (row form: one object per sample, keyed by input name) or
            `inputs` (columnar form: one entry per input holding the whole batch).
    """
    if form not in REST_FORMS:
        raise ValueError(f"form must be one of {REST_FORMS}, got {form!r}")
    body = {"signature_name": signature}
    if form == "inputs":
        body["inputs"] = {
            name: _json_value(np.asarray(v)) for name, v in inputs.items()
        }
    else:
        n = len(next(iter(inputs.values())))
        body["instances"] = [
            {name: _json_value(v[i]) for name, v in inputs.items()} for i in range(n)
        ]
    return body


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _array(values) -> np.ndarray:
    values = _from_json(values)
    flat = values
    while isinstance(flat, list) and flat:
        flat = flat[0]
    if isinstance(flat, (str, bytes)):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values)


def rest_outputs(reply: dict, output_names: Sequence[str]) -> dict:
    """Output name -> array from a TF Serving REST predict response (either form)."""
    single = output_names[0] if len(output_names) == 1 else None
    if "predictions" in reply:
        rows = reply["predictions"]
        if rows and isinstance(rows[0], dict):
            return {k: _array([row[k] for row in rows]) for k in rows[0]}
        return {single: _array(rows)}
    if "outputs" in reply:
        outputs = reply["outputs"]
        if isinstance(outputs, dict):
            return {k: _array(v) for k, v in outputs.items()}
        return {single: _array(outputs)}
    raise ServingError(f"unexpected response (keys {sorted(reply)})")


class RestModel:
    """A model served by TF Serving's REST API (`--rest_api_port`, 8501 by default)."""

    def __init__(
        self,
        url: str,
        model_name: str,
        version: int | None = None,
        form: str = "instances",
        timeout: float = 120.0,
    ):
        if form not in REST_FORMS:
            raise ValueError(f"form must be one of {REST_FORMS}, got {form!r}")
        if "://" not in url:
            url = f"http://{url}"
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.version = version
        self.form = form
        self.timeout = timeout

    @property
    def endpoint(self) -> str:
        path = f"{self.url}/v1/models/{self.model_name}"
        if self.version is not None:
            path += f"/versions/{self.version}"
        return path + ":predict"

    def predict(self, signature: str, inputs: dict, output_names: Sequence[str]):
        body = json.dumps(rest_request(inputs, signature, self.form), allow_nan=False)
        request = urllib.request.Request(
            self.endpoint,
            data=body.encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            try:
                text = json.loads(text).get("error", text)
            except ValueError:
                pass
            raise ServingError(
                f"{self.endpoint}: HTTP {error.code}: {_clean_tf_message(text)}"
            ) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServingError(
                f"{self.endpoint}: cannot reach the server ({reason}); is TF Serving "
                "running with its REST port published (-p 8501:8501)?"
            ) from None
        return rest_outputs(reply, output_names)


def predict_request(model_name, signature, inputs, version=None):
    """A TF Serving gRPC `PredictRequest` (needs `tensorflow-serving-api`)."""
    import tensorflow as tf

    predict_pb2 = _serving_apis()[0]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def _serving_apis():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError:
        raise ServingError(
            "gRPC needs the tensorflow-serving-api package (pip install -e "
            '".[serving]"); or call the REST API with --rest'
        ) from None
    return predict_pb2, prediction_service_pb2_grpc


class GrpcModel:
    """A model served by TF Serving's gRPC API (`--port`, 8500 by default)."""

    def __init__(
        self,
        target: str,
        model_name: str,
        version: int | None = None,
        timeout: float = 120.0,
    ):
        import grpc

        grpc_stub = _serving_apis()[1]
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self._grpc = grpc
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ],
        )
        self._stub = grpc_stub.PredictionServiceStub(self._channel)

    def predict(self, signature: str, inputs: dict, output_names=None):
        import tensorflow as tf

        request = predict_request(self.model_name, signature, inputs, self.version)
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as error:
            raise ServingError(
                f"{self.target}: {error.code().name}: "
                f"{_clean_tf_message(error.details())}"
            ) from None
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def close(self):
        self._channel.close()


class LocalModel:
    """The SavedModel called in-process, with TF Serving's inputs and outputs."""

    def __init__(self, model_dir: str):
        import tensorflow as tf

        self.directory = version_dir(model_dir)
        self._tf = tf
        self._loaded = tf.saved_model.load(self.directory)

    def predict(self, signature: str, inputs: dict, output_names=None):
        tf = self._tf
        if signature not in self._loaded.signatures:
            raise ServingError(
                f"{self.directory}: no signature {signature!r} (it has "
                f"{', '.join(self._loaded.signatures)})"
            )
        function = self._loaded.signatures[signature]
        try:
            out = function(**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, TypeError, ValueError) as error:
            text = getattr(error, "message", None) or str(error)
            raise ServingError(f"{self.directory}: {_clean_tf_message(text)}") from None
        return {k: v.numpy() for k, v in out.items()}
