"""The served graph: signatures against the Keras model, in and out of process.

What is verified here, without a TF Serving server (none is installable on our machines):

- the converter's transform in the graph equals its NumPy version;
- the signatures give the Keras model's outputs on the same raw input within
  `verify.tolerance_for`, in float32 whatever the training precision;
- `predict_examples` on the dataset's own records equals the Keras model on what the
  training input pipeline (`load_dataset`) yields: training and serving cannot drift;
- bad input (NaN, infinite or negative values, another width or dtype) is refused by
  the graph with a message saying so;
- the export loads in a fresh Python process that imports only TensorFlow, and
  `saved_model_cli show --all` lists the signatures and `saved_model_cli run` runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_ssrl.data import schema
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.data.preprocessing import apply_transform
from keras_ssrl.data.reader import load_dataset
from keras_ssrl.serving import export as se
from keras_ssrl.serving.assets import ModelInfo
from keras_ssrl.serving.preprocessing import graph_transform
from keras_ssrl.serving.transports import LocalModel, ServingError
from keras_ssrl.serving.verify import class_disagreements, tolerance_for
from tests.conftest import quiet
from tests.serving_fixtures import (
    SUBPROCESS_ENV,
    TOL,
    assert_close,
    call,
    keras_reference,
    make_exports,
    make_finetune_run,
    raw_samples,
    saved_keras_model,
)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, dataset_dir):
    return make_exports(tmp_path_factory.mktemp("exports"), dataset_dir)


@pytest.fixture(scope="module", autouse=True)
def out_of_process(exports, tmp_path_factory):
    """The out-of-process checks, started before this file's first test.

    Each process spends seconds importing TensorFlow: they run while the in-process
    tests do, and the tests reading their results come last in this file.
    """
    checks = OutOfProcessChecks(exports, tmp_path_factory.mktemp("fresh"))
    yield checks
    checks.stop()


# --------------------------------------------------------------------- in process


@pytest.mark.parametrize("transform", ["log2p1", "log1p", "none"])
def test_graph_transform_matches_the_converter(transform):
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.gamma(0.5, 300.0, 5000), [0.0, 1.0, 3.0, 0.5, 1e-3, 1e6, 2.5e8]]
    ).astype(np.float32)[None, :]
    got = graph_transform(tf.constant(x), transform).numpy()
    want = apply_transform(x.copy(), transform)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_signatures_match_keras_in_process(exports):
    for kind in ("classifier", "encoder"):
        path, run_dir, data_dir = exports[kind]
        loaded = tf.saved_model.load(path)
        raw = raw_samples(data_dir)
        out = loaded.signatures["serving_default"](expression=tf.constant(raw))
        want = keras_reference(run_dir, data_dir, raw=raw)
        assert set(out) == (
            {"probabilities", "class_id", "class_name", "embedding"}
            if kind == "classifier"
            else {"embedding"}
        )
        for name, value in want.items():
            assert out[name].dtype == tf.float32
            assert_close(out[name].numpy(), value, TOL)
        if kind == "classifier":
            class_id = out["class_id"].numpy()
            assert out["class_id"].dtype == tf.int64
            # The Keras model's class, up to near-ties that rounding decides.
            assert class_disagreements(class_id, want["probabilities"], TOL).size == 0
            names = Manifest.load(data_dir).labels
            assert [c.decode() for c in out["class_name"].numpy()] == [
                names[i] for i in class_id
            ]


def test_example_signatures_equal_the_training_pipeline(exports):
    """Records of the test split: served outputs == Keras on `load_dataset` batches."""
    for kind in ("classifier", "encoder"):
        path, run_dir, data_dir = exports[kind]
        manifest = Manifest.load(data_dir)
        loaded = tf.saved_model.load(path)
        records = tf.constant(
            [r.numpy() for r in tf.data.TFRecordDataset(manifest.shard_paths("test"))]
        )
        x, _, ids = next(
            iter(
                load_dataset(
                    data_dir, "test", batch_size=len(records), with_sample_ids=True
                )
            )
        )
        out = loaded.signatures["predict_examples"](examples=records)
        assert [s.decode() for s in out["sample_id"].numpy()] == [
            s.decode() for s in ids.numpy()
        ]
        model = saved_keras_model(run_dir)
        if kind == "classifier":
            logits = call(model, x)
            probabilities = tf.nn.softmax(logits).numpy()
            assert_close(out["probabilities"].numpy(), probabilities, TOL)
            classify = loaded.signatures["classify"](inputs=records)
            assert_close(classify["scores"].numpy(), probabilities, TOL)
            assert classify["classes"].shape == probabilities.shape
            assert [
                c.decode() for c in classify["classes"].numpy()[0]
            ] == manifest.labels
        else:
            assert_close(out["embedding"].numpy(), call(model, x), TOL)


def test_mixed_precision_model_exports_float32_inputs_and_outputs(
    tmp_path, dataset_dir
):
    run = make_finetune_run(tmp_path / "mixed", dataset_dir, policy="mixed_float16")
    model = saved_keras_model(run)
    dense = model.get_layer("encoder").get_layer("dense_0")
    assert dense.dtype_policy.name == "mixed_float16"
    path = se.export_run(run, str(tmp_path / "models"), log=quiet)
    fn = tf.saved_model.load(path).signatures["serving_default"]
    (spec,) = fn.structured_input_signature[1].values()
    assert spec.dtype == tf.float32
    raw = raw_samples(dataset_dir)
    out = fn(expression=tf.constant(raw))
    assert out["probabilities"].dtype == tf.float32
    assert out["embedding"].dtype == tf.float32
    want = keras_reference(run, dataset_dir, raw=raw)
    # The bound follows the 16-bit compute of the nested encoder's layers.
    tol = tolerance_for(model)
    assert tol["compute_dtype"] == "float16" and tol["layers"] == 6
    assert_close(out["probabilities"].numpy(), want["probabilities"], tol)
    assert_close(out["embedding"].numpy(), want["embedding"], tol)
    card = ModelInfo.load(path).card
    assert card["verification"]["tolerance"]["compute_dtype"] == "float16"


# --------------------------------------------------------------------- bad input


def test_served_graph_rejects_bad_input(exports):
    path, _, data_dir = exports["classifier"]
    model = LocalModel(path)
    good = raw_samples(data_dir, rows=2)
    bad = {
        "NaN": np.where(np.arange(good.size).reshape(good.shape) == 3, np.nan, good),
        "infinite": np.where(
            np.arange(good.size).reshape(good.shape) == 3, np.inf, good
        ),
        "negative values": -good,
        "must have 23 columns, the genes of assets/genes.txt": good[:, :-1],
    }
    for message, values in bad.items():
        with pytest.raises(ServingError, match=message):
            model.predict("serving_default", {"expression": values.astype(np.float32)})
    with pytest.raises(ServingError, match="float"):
        model.predict("serving_default", {"expression": good.astype(np.float64)})
    short = schema.serialize_example("a", np.ones(22), 0, "float32")
    with pytest.raises(ServingError, match="does not hold 23 float32"):
        model.predict("predict_examples", {"examples": np.array([short], object)})


# ------------------------------------------------------------- out-of-process checks


FRESH_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf

args = json.loads(sys.argv[1])
result = {}
for kind, spec in args.items():
    model = tf.saved_model.load(spec["path"])
    raw = tf.constant(np.load(spec["raw"]))
    records = tf.constant(
        [r.numpy() for r in tf.data.TFRecordDataset(spec["records"])]
    )
    for name, value in model.signatures["serving_default"](expression=raw).items():
        result[f"{kind}/raw/{name}"] = value.numpy().tolist()
    examples = model.signatures["predict_examples"](examples=records)
    result[f"{kind}/examples/embedding"] = examples["embedding"].numpy().tolist()
    result[f"{kind}/examples/sample_id"] = examples["sample_id"].numpy().tolist()
result["imported"] = sorted(
    m for m in sys.modules if m.split(".")[0] in ("keras_ssrl", "tests")
)
print("RESULT" + json.dumps(result, default=lambda b: b.decode()))
"""


def _saved_model_cli():
    beside = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if os.path.exists(beside):
        return [beside]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


class OutOfProcessChecks:
    """Processes that load the exports without keras_ssrl, started concurrently."""

    def __init__(self, exports, tmp):
        self.tmp = tmp
        self.raws, self.procs = _launch(exports, tmp)
        self._results = None

    def results(self):
        if self._results is None:
            self._results = {}
            for name, proc in self.procs.items():
                out, err = proc.communicate(timeout=600)
                self._results[name] = (proc.returncode, out, err)
        return self._results

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _launch(exports, tmp):
    spec = {}
    raws = {}
    for kind in ("classifier", "encoder"):
        path, run_dir, data_dir = exports[kind]
        raws[kind] = raw_samples(data_dir, rows=4, seed=11)
        np.save(tmp / f"{kind}.npy", raws[kind])
        spec[kind] = {
            "path": path,
            "raw": str(tmp / f"{kind}.npy"),
            "records": Manifest.load(data_dir).shard_paths("test"),
        }
    clf_path, clf_run, clf_data = exports["classifier"]
    row = raws["classifier"][:2]
    manifest = Manifest.load(clf_data)
    stored = apply_transform(row, "log2p1").astype(manifest.record_dtype)
    example = [
        {"sample_id": [f"s{i}".encode()], "expression": [stored[i].tobytes()]}
        for i in range(len(stored))
    ]
    cli = _saved_model_cli()
    commands = {
        "fresh": [sys.executable, "-c", FRESH_PROCESS, json.dumps(spec)],
        "show": cli + ["show", "--dir", clf_path, "--all"],
        "run_raw": cli + [
            "run", "--dir", clf_path, "--tag_set", "serve",
            "--signature_def", "serving_default",
            "--input_exprs", f"expression={row.tolist()!r}",
            "--outdir", str(tmp / "raw"),
        ],
        "run_examples": cli + [
            "run", "--dir", clf_path, "--tag_set", "serve",
            "--signature_def", "predict_examples",
            "--input_examples", f"examples={example!r}",
            "--outdir", str(tmp / "examples"),
        ],
    }  # fmt: skip
    return raws, {
        name: subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=SUBPROCESS_ENV,
            cwd=str(tmp),  # not the repository: nothing of it is importable
        )
        for name, command in commands.items()
    }


# ------------------------------------------- out of process (started by `out_of_process`)


def test_fresh_tensorflow_only_process_gives_the_keras_outputs(exports, out_of_process):
    results, raws = out_of_process.results(), out_of_process.raws
    code, out, err = results["fresh"]
    assert code == 0, err[-2000:]
    result = json.loads(out.split("RESULT", 1)[1])
    assert result["imported"] == []  # neither keras_ssrl nor the tests were imported
    for kind in ("classifier", "encoder"):
        _, run_dir, data_dir = exports[kind]
        want = keras_reference(run_dir, data_dir, raw=raws[kind])
        for name, value in want.items():
            assert_close(result[f"{kind}/raw/{name}"], value, TOL)
        # Records: the embedding of each sample equals Keras on the reader's batch.
        x, ids = next(
            iter(
                load_dataset(
                    data_dir, "test", 1000, with_labels=False, with_sample_ids=True
                )
            )
        )
        row = {s.decode(): i for i, s in enumerate(ids.numpy())}
        order = [row[s] for s in result[f"{kind}/examples/sample_id"]]
        model = saved_keras_model(run_dir)
        if kind == "classifier":
            model = model.get_layer("encoder")
        want = call(model, x.numpy()[order])
        assert_close(result[f"{kind}/examples/embedding"], want, TOL)
    names = Manifest.load(exports["classifier"][2]).labels
    assert set(result["classifier/raw/class_name"]) <= set(names)


def test_saved_model_cli_show_lists_the_signatures(out_of_process):
    code, out, err = out_of_process.results()["show"]
    assert code == 0, err[-2000:]
    for line in (
        "signature_def['serving_default']",
        "signature_def['predict_examples']",
        "signature_def['classify']",
        "inputs['expression']",
        "inputs['examples']",
        "inputs['inputs']",
        "outputs['probabilities']",
        "outputs['class_name']",
        "outputs['classes']",
        "outputs['scores']",
        "outputs['sample_id']",
    ):
        assert line in out, line
    assert "shape: (-1, 23)" in out  # the gene count of the dataset


def test_saved_model_cli_run_on_raw_values_and_examples(exports, out_of_process):
    checks = out_of_process
    results, raws, tmp = checks.results(), checks.raws, checks.tmp
    _, run_dir, data_dir = exports["classifier"]
    want = keras_reference(run_dir, data_dir, raw=raws["classifier"][:2])
    for name in ("run_raw", "run_examples"):
        code, out, err = results[name]
        assert code == 0, err[-2000:]
    raw = np.load(tmp / "raw" / "probabilities.npy")
    assert_close(raw, want["probabilities"], TOL)
    # The examples went through the CLI's own tf.Example builder (float32 records).
    examples = np.load(tmp / "examples" / "probabilities.npy")
    assert_close(examples, want["probabilities"], TOL)
    ids = np.load(tmp / "examples" / "sample_id.npy", allow_pickle=True)
    assert [i.decode() for i in ids] == ["s0", "s1"]
