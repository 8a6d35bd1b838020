"""Fine-tuning on either Keras backend: the same runs, the same results, no TensorFlow.

`Finetuner` has one training loop per backend (keras_ssrl/finetuning/loops.py). These
tests train the same tiny runs (same data, subsets and seeds; the data built from NumPy
arrays):

- under JAX in a subprocess where every import of `tensorflow` fails, as on a machine
  without TensorFlow;
- under TensorFlow in this process, to compare: the runs start from the same weights
  and see the same batches, so they agree up to floating-point order.

The tests marked `backends` also run under `KERAS_BACKEND=jax python -m pytest -m
backends`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_ssrl.config import EncoderConfig, FinetuneConfig
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.encoders import build_encoder
from keras_ssrl.finetuning import (
    FinetuneData,
    FinetuneError,
    Finetuner,
    LabelledSplit,
    stratified_subset,
)
from tests.blockers import import_blocker

BACKEND = keras.backend.backend()
N_GENES, CLASSES = 20, ["a", "b", "c"]
SPLIT_SIZES = {"train": 30, "val": 12, "test": 18}
ENCODER = EncoderConfig(layers=2, width=16)
CONFIG = FinetuneConfig(max_epochs=40, patience=4, learning_rate=1e-2)
# (mode, pre-trained encoder, training samples, seed). 21 = 2 batches of 8 + 5: the
# last, partial batch runs at its own shape; 16 is whole batches only.
RUNS = (
    ("unfrozen", False, 21, 1),
    ("unfrozen", True, 16, 2),
    ("frozen", True, 21, 3),
)


def tiny_data(seed: int = 0) -> FinetuneData:
    """60 samples x 20 genes in 3 classes (4 genes shifted each), from NumPy."""
    rng = np.random.default_rng(seed)
    n = sum(SPLIT_SIZES.values())
    y = (np.arange(n) % len(CLASSES)).astype(np.int32)
    rng.shuffle(y)
    x = rng.normal(size=(n, N_GENES))
    for c in range(len(CLASSES)):
        x[y == c, 4 * c : 4 * c + 4] += 2.0
    manifest = Manifest("memory", {"n_genes": N_GENES, "labels": CLASSES})
    splits, start = [], 0
    for name, size in SPLIT_SIZES.items():
        rows = slice(start, start + size)
        ids = [f"{name}{i}" for i in range(size)]
        splits.append(LabelledSplit(x[rows].astype(np.float32), y[rows], ids))
        start += size
    return FinetuneData("memory", manifest, *splits)


def encoder_weights(seed: int = 1) -> list[np.ndarray]:
    """Stand-in pre-trained weights of the `ENCODER` architecture, from NumPy."""
    rng = np.random.default_rng(seed)
    weights = []
    for variable in build_encoder(N_GENES, ENCODER.layers, ENCODER.width).weights:
        shape, name = tuple(variable.shape), variable.path.rsplit("/", 1)[-1]
        if name == "kernel":
            weights.append(rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape))
        elif name in ("gamma", "moving_variance"):
            weights.append(rng.uniform(0.8, 1.2, shape))
        else:  # bias, beta, moving_mean
            weights.append(rng.normal(0.0, 0.1, shape))
    return [w.astype(np.float32) for w in weights]


def train_runs() -> list[dict]:
    """Trains `RUNS` on `tiny_data()`; what each produced, JSON-ready."""
    data, weights = tiny_data(), encoder_weights()
    tuners, results = {}, []
    for mode, pretrained, size, seed in RUNS:
        if mode not in tuners:
            tuners[mode] = Finetuner(N_GENES, len(CLASSES), ENCODER, mode, CONFIG)
        tuner = tuners[mode]
        subset = stratified_subset(data.train.y, size / SPLIT_SIZES["train"], seed)
        result = tuner.run(
            data, subset, seed, weights if pretrained else None, encoder_key="stand-in"
        )
        # Through the Keras model: the best epoch's weights were assigned to it.
        logits = tuner.classifier(data.test.x, training=False)
        results.append(
            {
                "mode": mode,
                "n_train": result.n_train,
                "accuracy": result.metrics["accuracy"],
                "epochs": result.epochs,
                "best_epoch": result.best_epoch,
                "first_epoch": result.history[0],
                "predictions": keras.ops.convert_to_numpy(logits).argmax(1).tolist(),
            }
        )
    return results


# Run with `python -c` under KERAS_BACKEND=jax: TensorFlow cannot be imported, as on a
# machine without it; prints the runs as JSON on the last line.
JAX_WITHOUT_TENSORFLOW = import_blocker("tensorflow") + r"""
import json
import sys

import keras

from tests.test_finetune_backends import train_runs

assert keras.backend.backend() == "jax", keras.backend.backend()
runs = train_runs()
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
assert not loaded, loaded
for run in runs:
    print(f"{run['mode']} n_train={run['n_train']}: accuracy {run['accuracy']:.3f}")
print(json.dumps(runs))
"""


@pytest.fixture(scope="module")
def jax_runs():
    """`train_runs()` under JAX, in a subprocess that cannot import TensorFlow."""
    from tests.conftest import ROOT

    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.run(
        [sys.executable, "-c", JAX_WITHOUT_TENSORFLOW],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_finetuner_trains_under_jax_without_tensorflow(jax_runs):
    assert [(r["mode"], r["n_train"]) for r in jax_runs] == [
        (mode, size) for mode, _, size, _ in RUNS
    ]
    n_test = SPLIT_SIZES["test"]
    for run in jax_runs:
        # Chance is 1/3: this much means the runs learnt.
        assert run["accuracy"] >= 0.5, run
        # The reported accuracy is that of the Keras model's own predictions.
        y_test = tiny_data().test.y
        correct = int(np.sum(np.array(run["predictions"]) == y_test))
        assert run["accuracy"] == pytest.approx(correct / n_test)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="compares TensorFlow with JAX")
def test_tensorflow_and_jax_train_the_same_runs(jax_runs):
    n_test = SPLIT_SIZES["test"]
    for ours, theirs in zip(train_runs(), jax_runs, strict=True):
        label = f"{ours['mode']} n_train={ours['n_train']}"
        # Same start, same batches: the first epoch differs only by float order.
        for key in ("loss", "val_loss"):
            assert ours["first_epoch"][key] == pytest.approx(
                theirs["first_epoch"][key], rel=1e-4
            ), label
        differing = np.sum(np.array(ours["predictions"]) != theirs["predictions"])
        assert differing <= 1, (label, ours["predictions"], theirs["predictions"])
        assert abs(ours["accuracy"] - theirs["accuracy"]) <= 1 / n_test + 1e-9, label
        assert abs(ours["best_epoch"] - theirs["best_epoch"]) <= 2, label
        assert abs(ours["epochs"] - theirs["epochs"]) <= 2, label


@pytest.mark.backends
def test_frozen_with_dropout_keeps_the_encoder_and_repeats_runs():
    """Frozen with dropout trains the whole classifier at every step (no precomputed
    embeddings): the encoder stays fixed and a run depends on its seed only."""
    data, weights = tiny_data(), encoder_weights()
    encoder = EncoderConfig(layers=2, width=16, dropout=0.2)
    tuner = Finetuner(N_GENES, len(CLASSES), encoder, "frozen", CONFIG)
    assert not tuner.precompute
    subset = stratified_subset(data.train.y, 0.7, 5)
    first = tuner.run(data, subset, 5, weights)
    for before, after in zip(weights, tuner.encoder.get_weights()):
        np.testing.assert_array_equal(before, after)
    tuner.run(data, stratified_subset(data.train.y, 1.0, 6), 6, weights)
    again = tuner.run(data, subset, 5, weights)
    # Dropout masks restart from the seed, whatever ran before.
    assert again.history == first.history
    assert again.metrics == first.metrics


@pytest.mark.backends
def test_bad_subsets_are_refused_before_training():
    data = tiny_data()
    tuner = Finetuner(N_GENES, len(CLASSES), ENCODER, "unfrozen", CONFIG)
    n_train = SPLIT_SIZES["train"]
    cases = {
        "non-empty 1-D array of integer indices": [np.array([], np.int64), [0.5, 1.5]],
        f"outside the training split \\({n_train} samples\\)": [[0, n_train], [-1]],
    }
    for message, subsets in cases.items():
        for subset in subsets:
            with pytest.raises(FinetuneError, match=message):
                tuner.run(data, subset, 0, None)


@pytest.mark.backends
@pytest.mark.skipif(BACKEND != "jax", reason="JAX's compilation cache")
def test_jax_epochs_compile_once_per_partial_batch_size():
    """Subsets of any size share one compiled epoch per size of the last batch."""
    data = tiny_data()
    config = FinetuneConfig(max_epochs=2, patience=2)
    tuner = Finetuner(N_GENES, len(CLASSES), ENCODER, "unfrozen", config)
    epoch = tuner._loop._epoch
    for size, compiled in ((16, 1), (24, 1), (8, 1), (21, 2), (29, 2)):
        tuner.run(data, np.arange(size), 0, None)
        assert epoch._cache_size() == compiled, size
