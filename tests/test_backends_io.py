"""Models across Keras backends: `.keras` files, and the export of JAX-trained models.

- A `.keras` file (encoder, classifier: functional models of standard layers) saved
  under one backend loads under the other with the same weights and outputs.
- `export_run` works whatever backend the calling process runs (under JAX it exports in
  a TensorFlow-backend child process), and a classifier trained and saved under JAX
  exports, through `KERAS_BACKEND=jax python export/export_model.py`, to the SavedModel
  a TensorFlow-backend export writes, which TensorFlow serves with the JAX model's
  classes and accuracy.

Keras fixes its backend once per process, so the other backend runs in a subprocess.
The tests marked `backends` run under either backend (`KERAS_BACKEND=jax python -m
pytest -m backends`): the subprocess then runs the other one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_ssrl.encoders import build_encoder
from keras_ssrl.finetuning import build_classifier
from keras_ssrl.serving import export as se
from keras_ssrl.serving.contract import ExportError
from keras_ssrl.serving.transports import LocalModel
from keras_ssrl.serving.verify import class_disagreements
from tests.conftest import ROOT, quiet
from tests.serving_fixtures import (
    SUBPROCESS_ENV,
    TOL,
    assert_close,
    keras_reference,
    make_finetune_run,
    raw_samples,
)

BACKEND = keras.backend.backend()
OTHER = "jax" if BACKEND == "tensorflow" else "tensorflow"


def start(backend: str, command: list[str]) -> subprocess.Popen:
    """A Python process running `command` under Keras's `backend`, from the repository."""
    return subprocess.Popen(
        [sys.executable, *command],
        env={**SUBPROCESS_ENV, "KERAS_BACKEND": backend},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    """The process's stdout, once it has exited successfully."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def randomised(model, seed: int) -> list[np.ndarray]:
    """Sets non-trivial weights (BatchNorm statistics included); returns them."""
    rng = np.random.default_rng(seed)
    weights = [
        rng.uniform(0.5, 1.5, w.shape).astype(w.dtype)
        if w.ndim == 1  # biases, BatchNorm gamma/beta/mean/variance: positive
        else rng.normal(0.0, 0.3, w.shape).astype(w.dtype)
        for w in model.get_weights()
    ]
    model.set_weights(weights)
    return weights


def small_models(weights=None):
    """The encoder and classifier as the run folders hold them, with fixed weights."""
    encoder = build_encoder(12, layers=2, width=8, dropout=0.1)
    classifier = build_classifier(encoder, 3)
    if weights is None:
        weights = randomised(classifier, seed=0)
    else:
        classifier.set_weights(weights)
    return encoder, classifier, weights


def predict(encoder, classifier, x) -> dict:
    return {
        "embedding": np.asarray(encoder(x, training=False)),
        "logits": np.asarray(classifier(x, training=False)),
    }


# In the other backend: loads this backend's files and predicts; builds the same models
# from the same weights, predicts and saves them.
OTHER_SIDE = r"""
import sys
import keras
import numpy as np
from tests.test_backends_io import predict, small_models

here, there = sys.argv[1:]
x = np.load(f"{here}/x.npy")
arrays = np.load(f"{here}/weights.npz")
loaded = {
    name: keras.saving.load_model(f"{here}/{name}.keras", compile=False)
    for name in ("encoder", "classifier")
}
out = predict(loaded["encoder"], loaded["classifier"], x)
nested = loaded["classifier"].get_layer("encoder")
np.savez(
    f"{there}/loaded.npz",
    **out,
    nested=np.asarray(nested(x, training=False)),
    layers=np.array([layer.name for layer in loaded["classifier"].layers]),
    **{f"w{i}": w for i, w in enumerate(loaded["classifier"].get_weights())},
)
encoder, classifier, _ = small_models([arrays[f"w{i}"] for i in range(len(arrays))])
np.savez(f"{there}/built.npz", **predict(encoder, classifier, x))
encoder.save(f"{there}/encoder.keras")
classifier.save(f"{there}/classifier.keras")
print(keras.backend.backend())
"""


@pytest.mark.backends
def test_keras_files_load_under_the_other_backend(tmp_path):
    here, there = tmp_path / BACKEND, tmp_path / OTHER
    here.mkdir()
    there.mkdir()
    encoder, classifier, weights = small_models()
    x = np.random.default_rng(1).normal(size=(6, 12)).astype(np.float32)
    np.save(here / "x.npy", x)
    np.savez(here / "weights.npz", **{f"w{i}": w for i, w in enumerate(weights)})
    encoder.save(here / "encoder.keras")
    classifier.save(here / "classifier.keras")
    other = start(OTHER, ["-c", OTHER_SIDE, str(here), str(there)])
    want = predict(encoder, classifier, x)
    assert finish(other).split() == [OTHER]

    # This backend's files, loaded there: the same weights, layers and outputs.
    loaded = np.load(there / "loaded.npz")
    for i, w in enumerate(weights):
        np.testing.assert_array_equal(loaded[f"w{i}"], w)  # stored, not computed
    assert list(loaded["layers"]) == ["expression", "encoder", "head"]
    for name in ("embedding", "logits"):
        assert_close(loaded[name], want[name], TOL)
    assert_close(loaded["nested"], want["embedding"], TOL)
    # The same models built there, and their files loaded here.
    built = np.load(there / "built.npz")
    for name in ("embedding", "logits"):
        assert_close(built[name], want[name], TOL)
    back = {
        name: keras.saving.load_model(there / f"{name}.keras", compile=False)
        for name in ("encoder", "classifier")
    }
    for got, w in zip(back["classifier"].get_weights(), weights):
        np.testing.assert_array_equal(got, w)
    got = predict(back["encoder"], back["classifier"], x)
    for name in ("embedding", "logits"):
        assert_close(got[name], want[name], TOL)


@pytest.mark.backends
def test_export_run_works_under_the_running_backend(tmp_path, dataset_dir):
    """Under JAX, `export_run` exports through a TensorFlow-backend child process."""
    run = make_finetune_run(tmp_path / "run", dataset_dir)
    lines = []
    path = se.export_run(run, str(tmp_path / "models"), log=lines.append)
    assert path == str(tmp_path / "models" / "1")
    assert lines[-1].startswith(f"wrote {path}: signatures serving_default")
    assert any("TensorFlow-backend process" in line for line in lines) == (
        BACKEND != "tensorflow"
    )
    raw = raw_samples(dataset_dir)
    served = LocalModel(path).predict("serving_default", {"expression": raw})
    want = keras_reference(run, dataset_dir, raw=raw)  # Keras under this backend
    assert_close(served["probabilities"], want["probabilities"], TOL)
    assert_close(served["embedding"], want["embedding"], TOL)
    assert class_disagreements(served["class_id"], want["probabilities"], TOL).size == 0

    # A refusal found where the model is loaded reaches the caller as it is.
    nan_run = make_finetune_run(tmp_path / "nan", dataset_dir)
    model = keras.saving.load_model(os.path.join(nan_run, "classifier.keras"))
    weights = model.get_weights()
    weights[0][0, 0] = np.nan
    model.set_weights(weights)
    model.save(os.path.join(nan_run, "classifier.keras"))
    with pytest.raises(ExportError, match="weight .* holds NaN or infinite values"):
        se.export_run(nan_run, str(tmp_path / "refused"), log=quiet)
    assert not (tmp_path / "refused").exists()


# Under JAX: trains the run's classifier on the pre-training split, saves it over the
# run's classifier.keras and reports its test metrics and predictions, as a fine-tuning
# run under JAX would.
TRAIN_UNDER_JAX = r"""
import json, sys
import keras
import numpy as np
from keras_ssrl.encoders import build_encoder
from keras_ssrl.finetuning import build_classifier

run, arrays = sys.argv[1:]
assert keras.backend.backend() == "jax"
data = np.load(arrays)
keras.utils.set_random_seed(0)
model = build_classifier(build_encoder(data["x_train"].shape[1], 2, 16), 3)
model.compile(
    optimizer=keras.optimizers.Adam(1e-2),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
model.fit(data["x_train"], data["y_train"], batch_size=16, epochs=30, verbose=0)
model.save(f"{run}/classifier.keras")
logits = np.asarray(model(data["x_test"], training=False), np.float64)
e = np.exp(logits - logits.max(axis=1, keepdims=True))
probabilities = e / e.sum(axis=1, keepdims=True)
accuracy = float(np.mean(probabilities.argmax(axis=1) == data["y_test"]))
with open(f"{run}/metrics.json", "w") as handle:
    json.dump({"accuracy": accuracy}, handle)
np.save(f"{run}/../probabilities.npy", probabilities)
"""


@pytest.mark.skipif(BACKEND != "tensorflow", reason="reads and serves with TensorFlow")
def test_a_classifier_trained_under_jax_exports_and_tensorflow_serves_it(
    tmp_path, dataset_dir
):
    import tensorflow as tf

    from keras_ssrl.data.manifest import Manifest
    from keras_ssrl.data.reader import load_dataset

    def split(name, **kwargs):
        return [
            t.numpy()
            for t in next(iter(load_dataset(dataset_dir, name, 1000, **kwargs)))
        ]

    x_train, y_train = split("pretrain")
    x_test, y_test, ids = split("test", with_sample_ids=True)
    np.savez(tmp_path / "arrays.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)  # fmt: skip
    run = make_finetune_run(tmp_path / "run", dataset_dir)  # records, then JAX's model
    finish(start("jax", ["-c", TRAIN_UNDER_JAX, run, str(tmp_path / "arrays.npz")]))
    with open(os.path.join(run, "metrics.json")) as handle:
        reported = json.load(handle)["accuracy"]
    assert reported > 0.5  # a trained model (3 classes), so the classes mean something
    jax_probabilities = np.load(tmp_path / "probabilities.npy")

    # The command line under KERAS_BACKEND=jax, and the library in this process.
    cli = start(
        "jax", ["export/export_model.py", "--run", run, "--out", str(tmp_path / "jax")]
    )
    try:
        from_tf = se.export_run(run, str(tmp_path / "tf"), log=quiet)
    finally:
        finish(cli)
    from_jax = str(tmp_path / "jax" / "1")

    served = {path: tf.saved_model.load(path) for path in (from_jax, from_tf)}
    signatures = {
        path: {
            name: (fn.structured_input_signature, fn.structured_outputs)
            for name, fn in model.signatures.items()
        }
        for path, model in served.items()
    }
    assert signatures[from_jax] == signatures[from_tf]
    assert set(signatures[from_jax]) == {
        "serving_default",
        "predict_examples",
        "classify",
    }

    # The test split's records as TF Serving gets them: the JAX model's classes.
    records = tf.constant(
        [
            r.numpy()
            for r in tf.data.TFRecordDataset(
                Manifest.load(dataset_dir).shard_paths("test")
            )
        ]
    )
    row = {s: i for i, s in enumerate(ids)}
    for path, model in served.items():
        out = model.signatures["predict_examples"](examples=records)
        order = [row[s] for s in out["sample_id"].numpy()]
        want = jax_probabilities[order]
        assert_close(out["probabilities"].numpy(), want, TOL)
        class_id = out["class_id"].numpy()
        assert class_disagreements(class_id, want, TOL).size == 0, path
        # The accuracy the run reports, up to near-ties (rows where the classes differ).
        differ = int(np.sum(class_id != want.argmax(axis=1)))
        accuracy = float(np.mean(class_id == y_test[order]))
        assert abs(accuracy - reported) * len(order) <= differ, (accuracy, reported)
    # Raw values: the JAX-saved model loaded here gives the served outputs.
    raw = raw_samples(dataset_dir)
    out = served[from_jax].signatures["serving_default"](expression=tf.constant(raw))
    want = keras_reference(run, dataset_dir, raw=raw)
    assert_close(out["probabilities"].numpy(), want["probabilities"], TOL)
    assert_close(out["embedding"].numpy(), want["embedding"], TOL)
