"""The client and its transports: inputs in the model's gene order, REST and gRPC.

What is verified here, without a TF Serving server (none is installable on our machines):

- table columns are put in the model's gene order (ids without version suffix), missing
  genes and NaN cells are named before anything is sent;
- the REST request bodies follow TF Serving's documented predict format, checked by a
  local **stand-in** HTTP server (not TF Serving), and gRPC requests are real
  `PredictRequest`s answered by a local **stand-in** gRPC servicer; both give the
  in-process (`--local`) predictions;
- server errors reach the user and leave no predictions file.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
from concurrent import futures

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from keras_ssrl.data.errors import DataError
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.data.reader import load_dataset
from keras_ssrl.serving.assets import ModelInfo
from keras_ssrl.serving.inputs import align_to_model, check_finite, read_record_samples
from keras_ssrl.serving.transports import (
    GrpcModel,
    ServingError,
    rest_outputs,
    rest_request,
)
from tests.conftest import ROOT, load_script, small_matrix, write_samples_as_rows
from tests.serving_fixtures import (
    SUBPROCESS_ENV,
    assert_close,
    call,
    keras_reference,
    make_exports,
    saved_keras_model,
)

client_cli = load_script("export/client.py")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, dataset_dir):
    return make_exports(tmp_path_factory.mktemp("exports"), dataset_dir)


def test_columns_are_put_in_the_model_order(dataset_dir):
    genes = Manifest.load(dataset_dir).genes
    rng = np.random.default_rng(0)
    values = rng.random((3, len(genes))).astype(np.float32)
    order = rng.permutation(len(genes))
    # Shuffled columns, Ensembl versions added, two genes the model does not use.
    shuffled = [f"{genes[i]}.7" for i in order] + ["ENSG99999999999", "extra"]
    table = np.concatenate([values[:, order], np.ones((3, 2), np.float32)], axis=1)
    x, ignored = align_to_model(shuffled, table, genes)
    np.testing.assert_array_equal(x, values)
    assert ignored == 2
    with pytest.raises(DataError, match=f"2 of the model's {len(genes)} genes are missing: "
                       f"{genes[0]}, {genes[1]}"):  # fmt: skip
        align_to_model(genes[2:], values[:, 2:], genes)
    with pytest.raises(DataError, match="occur more than once"):
        align_to_model(genes + [genes[0]], np.ones((3, len(genes) + 1)), genes)
    summed, _ = align_to_model(
        genes + [genes[0]], np.ones((3, len(genes) + 1)), genes, duplicate_genes="sum"
    )
    assert summed[0, 0] == 2.0
    x[1, 4] = np.nan
    with pytest.raises(DataError, match=f"sample 'b', gene '{genes[4]}'"):
        check_finite(x, ["a", "b", "c"], genes, "in.csv")


def test_rest_request_body_follows_tf_serving_format():
    x = np.array([[1.0, 2.5], [3.0, 4.0]], np.float32)
    body = rest_request({"expression": x}, "serving_default", "instances")
    assert body == {
        "signature_name": "serving_default",
        "instances": [{"expression": [1.0, 2.5]}, {"expression": [3.0, 4.0]}],
    }
    body = rest_request({"expression": x}, "serving_default", "inputs")
    assert body == {
        "signature_name": "serving_default",
        "inputs": {"expression": [[1.0, 2.5], [3.0, 4.0]]},
    }
    records = np.array([b"\x00\xffab", b"c"], dtype=object)
    body = rest_request({"examples": records}, "predict_examples", "instances")
    assert body["instances"][0] == {"examples": {"b64": "AP9hYg=="}}
    reply = {
        "predictions": [
            {"class_name": "a", "class_id": 0},
            {"class_name": "b", "class_id": 1},
        ]
    }
    out = rest_outputs(reply, ["class_name", "class_id"])
    assert list(out["class_name"]) == ["a", "b"] and list(out["class_id"]) == [0, 1]
    assert rest_outputs({"outputs": [[1.0], [2.0]]}, ["embedding"])[
        "embedding"
    ].shape == (2, 1)


class _TFServingRestStandIn(http.server.BaseHTTPRequestHandler):
    """A local STAND-IN for TF Serving's REST predict API, not TF Serving itself.

    It validates each request as TF Serving's documented predict API
    (https://www.tensorflow.org/tfx/serving/api_rest#predict_api) does: the URL
    `/v1/models/<name>[/versions/<v>]:predict`, a JSON object with an optional string
    `signature_name` and exactly one of `instances` (a non-empty list: values when the
    signature has one input, else objects with exactly the input names) or `inputs`
    (a value for one input, or an object with every input name), numbers for float
    inputs (float32-representable), `{"b64": ...}` for binary strings, one shape for all
    rows. It answers with the SavedModel's outputs in the matching response form, or
    HTTP 400 `{"error": ...}` as TF Serving does.
    """

    model = None  # the loaded SavedModel
    name = "ssrl"
    bodies: list = []

    def log_message(self, *args):
        pass

    def _reply(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's naming
        try:
            payload = self._predict()
        except (AssertionError, ValueError, KeyError, TypeError) as error:
            return self._reply(400, {"error": f"stand-in: bad request: {error}"})
        except tf.errors.InvalidArgumentError as error:
            return self._reply(400, {"error": error.message})
        self._reply(200, payload)

    def _predict(self):
        path = self.path
        prefix = f"/v1/models/{self.name}"
        assert path.startswith(prefix) and path.endswith(":predict"), path
        middle = path[len(prefix) : -len(":predict")]
        assert middle == "" or (
            middle.startswith("/versions/") and middle[10:].isdigit()
        ), path
        assert self.headers["Content-Type"] == "application/json"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        assert isinstance(body, dict), "body must be a JSON object"
        assert set(body) <= {"signature_name", "instances", "inputs"}, sorted(body)
        signature = body.get("signature_name", "serving_default")
        assert isinstance(signature, str)
        fn = self.model.signatures[signature]
        specs = fn.structured_input_signature[1]
        assert ("instances" in body) != ("inputs" in body), "one of instances/inputs"
        if "instances" in body:
            rows = body["instances"]
            assert isinstance(rows, list) and rows, "instances: a non-empty list"
            if isinstance(rows[0], dict) and set(rows[0]) != {"b64"}:
                for row in rows:
                    assert set(row) == set(specs), f"keys {sorted(row)} != inputs"
                columns = {k: [row[k] for row in rows] for k in specs}
            else:
                assert len(specs) == 1, "plain instances need a single input"
                columns = {next(iter(specs)): rows}
        else:
            inputs = body["inputs"]
            if isinstance(inputs, dict) and set(inputs) != {"b64"}:
                assert set(inputs) == set(specs)
                columns = inputs
            else:
                assert len(specs) == 1
                columns = {next(iter(specs)): inputs}
        tensors = {k: self._tensor(v, specs[k]) for k, v in columns.items()}
        out = {k: v.numpy() for k, v in fn(**tensors).items()}
        values = {k: self._json(v) for k, v in out.items()}
        if "instances" in body:
            n = len(next(iter(values.values())))
            if len(values) == 1:
                return {"predictions": next(iter(values.values()))}
            return {
                "predictions": [{k: v[i] for k, v in values.items()} for i in range(n)]
            }
        return {"outputs": values if len(values) > 1 else next(iter(values.values()))}

    @staticmethod
    def _tensor(value, spec):
        if spec.dtype == tf.string:
            for item in value:
                assert isinstance(item, dict) and set(item) == {"b64"}, "binary as b64"
            return tf.constant([base64.b64decode(item["b64"]) for item in value])
        array = np.asarray(value)
        assert array.dtype.kind in "fi", f"{spec.name}: numbers expected"
        assert np.all(np.abs(array) <= np.finfo(np.float32).max), "lossy float"
        assert array.ndim == len(spec.shape), f"rank {array.ndim} != {len(spec.shape)}"
        return tf.constant(array, dtype=spec.dtype)

    @staticmethod
    def _json(array):
        if array.dtype == object:
            return [a.decode("utf-8") for a in array]
        return array.tolist()


@pytest.fixture()
def rest_standin(exports):
    handler = type("Handler", (_TFServingRestStandIn,), {"bodies": []})
    handler.model = tf.saved_model.load(exports["classifier"][0])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def samples_csv(tmp_path_factory, dataset_dir):
    """10 samples as a user has them: raw counts, versioned ids, any column order."""
    counts, samples, genes, labels = small_matrix()
    order = np.random.default_rng(2).permutation(len(genes))
    path = tmp_path_factory.mktemp("client") / "samples.csv"
    write_samples_as_rows(
        path,
        counts[:10][:, order],
        samples[:10],
        [genes[i] for i in order],
        labels[:10],
    )
    return str(path), counts[:10], samples[:10], genes, labels[:10]


@pytest.mark.parametrize("form", ["instances", "inputs"])
def test_rest_client_against_the_standin(
    rest_standin, samples_csv, exports, tmp_path, form
):
    url, handler = rest_standin
    path, counts, samples, genes, labels = samples_csv
    clf_path, run_dir, data_dir = exports["classifier"]
    out = tmp_path / "rest.csv"
    code = client_cli.main([
        "--input", path, "--label-column", "cancer_type", "--rest", url,
        "--model-name", "ssrl", "--model-version", "1", "--model-dir", clf_path,
        "--rest-format", form, "--batch-size", "4", "--embedding", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    assert len(handler.bodies) == 3  # 10 samples in batches of 4
    assert all(b["signature_name"] == "serving_default" for b in handler.bodies)
    frame = pd.read_csv(out)
    assert list(frame["sample_id"]) == samples and list(frame["label"]) == labels
    manifest = Manifest.load(data_dir)
    assert list(frame["label_id"]) == [manifest.labels.index(v) for v in labels]
    model_genes = set(manifest.genes)
    column = {g.split(".")[0]: i for i, g in enumerate(genes)}
    raw = counts[:, [column[g] for g in manifest.genes]]
    want = keras_reference(run_dir, data_dir, raw=raw)
    probs = frame[[f"p_{c}" for c in manifest.labels]].to_numpy()
    assert_close(probs, want["probabilities"], {"atol": 1e-6, "rtol": 1e-4})
    emb = frame[[c for c in frame if c.startswith("embedding_")]].to_numpy()
    assert_close(emb, want["embedding"], {"atol": 1e-5, "rtol": 1e-4})
    assert list(frame["class_name"]) == [manifest.labels[i] for i in probs.argmax(1)]
    assert len(model_genes) == len(genes) - 1  # the constant gene: ignored, counted

    # The same predictions in-process (--local); its default batch size differs, so
    # float results may differ in the last digits (matmul blocking).
    local = tmp_path / "local.csv"
    assert client_cli.main([
        "--input", path, "--label-column", "cancer_type", "--local", clf_path,
        "--embedding", "--out", str(local),
    ]) == 0  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_csv(local), frame, rtol=1e-4, atol=1e-5)


def test_server_errors_reach_the_user_and_nothing_is_written(
    rest_standin, exports, tmp_path, capsys
):
    url, _ = rest_standin
    clf_path, _, data_dir = exports["classifier"]
    genes = Manifest.load(data_dir).genes
    bad = tmp_path / "negative.csv"
    write_samples_as_rows(bad, -np.ones((2, len(genes))), ["a", "b"], genes)
    out = tmp_path / "p.csv"
    argv = ["--input", str(bad), "--model-dir", clf_path, "--out", str(out)]
    assert client_cli.main(argv + ["--rest", url]) == 3
    assert "negative values" in capsys.readouterr().err
    assert not out.exists()
    # Missing genes: named, before anything is sent.
    short = tmp_path / "short.csv"
    write_samples_as_rows(short, np.ones((2, len(genes) - 1)), ["a", "b"], genes[1:])
    assert client_cli.main(["--input", str(short), "--local", clf_path]) == 2
    assert f"missing: {genes[0]}" in capsys.readouterr().err
    # NaN cells: named, before anything is sent.
    nan = tmp_path / "nan.csv"
    values = np.ones((2, len(genes)))
    values[1, 2] = np.nan
    write_samples_as_rows(nan, values, ["a", "b"], genes)
    assert client_cli.main(["--input", str(nan), "--local", clf_path]) == 2
    assert f"sample 'b', gene '{genes[2]}'" in capsys.readouterr().err
    # Text in a value cell (wrong dtype): the table reader names it.
    text = tmp_path / "text.csv"
    frame = pd.DataFrame(np.ones((1, len(genes))), columns=genes)
    frame.insert(0, "sample_id", ["a"])
    frame[genes[3]] = ["high"]
    frame.to_csv(text, index=False)
    assert client_cli.main(["--input", str(text), "--local", clf_path]) == 2
    assert "high" in capsys.readouterr().err
    # Nobody listening.
    assert client_cli.main(argv + ["--rest", "127.0.0.1:9"]) == 3
    assert "cannot reach the server" in capsys.readouterr().err


def test_client_sends_tfrecords_through_the_example_signature(exports, tmp_path):
    clf_path, run_dir, data_dir = exports["classifier"]
    out = tmp_path / "records.csv"
    assert client_cli.main([
        "--records", data_dir, "--split", "test", "--local", clf_path, "--out", str(out),
    ]) == 0  # fmt: skip
    frame = pd.read_csv(out)
    x, y, ids = next(iter(load_dataset(data_dir, "test", 1000, with_sample_ids=True)))
    assert list(frame["sample_id"]) == [s.decode() for s in ids.numpy()]
    want = tf.nn.softmax(call(saved_keras_model(run_dir), x)).numpy()
    labels = Manifest.load(data_dir).labels
    # The records' true labels sit beside the predictions, by name and class id.
    assert list(frame["label"]) == [labels[i] for i in y.numpy()]
    assert list(frame["label_id"]) == y.numpy().tolist()
    assert_close(
        frame[[f"p_{c}" for c in labels]].to_numpy(), want, {"atol": 1e-6, "rtol": 1e-4}
    )
    # Records of another gene list are refused with a pointer to align.py.
    _, _, f16 = exports["encoder"]
    with pytest.raises(DataError, match="align.py"):
        read_record_samples(f16, "test", ModelInfo.load(clf_path))


def test_grpc_client_against_a_standin_servicer(exports, tmp_path, samples_csv):
    """gRPC: a real `PredictRequest` over a local channel, answered by a STAND-IN."""
    pytest.importorskip("tensorflow_serving")
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    clf_path, _, _ = exports["classifier"]
    loaded = tf.saved_model.load(clf_path)
    seen = []

    class StandIn(prediction_service_pb2_grpc.PredictionServiceServicer):
        """Not TF Serving: checks the request and answers with the SavedModel."""

        def Predict(self, request, context):  # noqa: N802 - gRPC's naming
            seen.append(request)
            assert request.model_spec.name == "ssrl"
            fn = loaded.signatures[
                request.model_spec.signature_name or "serving_default"
            ]
            specs = fn.structured_input_signature[1]
            assert set(request.inputs) == set(specs)
            tensors = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            for name in tensors:
                assert tf.as_dtype(request.inputs[name].dtype) == specs[name].dtype
            try:
                out = fn(**{k: tf.constant(v) for k, v in tensors.items()})
            except tf.errors.InvalidArgumentError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            response = predict_pb2.PredictResponse()
            for name, value in out.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        StandIn(), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        path = samples_csv[0]
        grpc_csv, local_csv = tmp_path / "grpc.csv", tmp_path / "local.csv"
        common = ["--input", path, "--label-column", "cancer_type", "--batch-size", "6"]
        assert client_cli.main(common + [
            "--grpc", f"127.0.0.1:{port}", "--model-name", "ssrl", "--model-version", "1",
            "--model-dir", clf_path, "--out", str(grpc_csv),
        ]) == 0  # fmt: skip
        assert (
            client_cli.main(common + ["--local", clf_path, "--out", str(local_csv)])
            == 0
        )
        pd.testing.assert_frame_equal(pd.read_csv(grpc_csv), pd.read_csv(local_csv))
        assert len(seen) == 2 and seen[0].model_spec.version.value == 1
        assert seen[0].inputs["expression"].tensor_shape.dim[0].size == 6
        # A server-side failure comes back as a ServingError with its message.
        model = GrpcModel(f"127.0.0.1:{port}", "ssrl")
        with pytest.raises(ServingError, match="INVALID_ARGUMENT.*NaN"):
            model.predict(
                "serving_default", {"expression": np.full((1, 23), np.nan, np.float32)}
            )
        model.close()
    finally:
        server.stop(None)


def test_scripts_run_from_the_repository_root(exports, tmp_path):
    """`python export/client.py --help` works as a user runs it (no shadowing)."""
    result = subprocess.run(
        [sys.executable, os.path.join("export", "client.py"), "--help"],
        cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-1000:]
    assert "--rest" in result.stdout and "--local" in result.stdout
