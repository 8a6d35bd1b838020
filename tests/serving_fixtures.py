"""Shared by the serving tests: run folders written by hand, exports, Keras references.

Run folders are written by hand following the run-folder contract (pre-training:
`encoder.keras` + `config.json` as `run_pretraining` writes it; fine-tuning:
`classifier.keras` with a nested `encoder` and a Dense `head`, `config.json` with
`kind: "finetune"` and `labels`, `metrics.json`), with tiny models so the tests run
fast. The Keras references (`keras_reference`) are independent of the export: the
converter's NumPy transform, the manifest's z-score, the saved Keras model.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np

from keras_ssrl.config import ConversionConfig
from keras_ssrl.data.convert import convert
from keras_ssrl.data.manifest import Manifest, genes_digest
from keras_ssrl.data.preprocessing import apply_transform
from keras_ssrl.encoders import build_encoder
from keras_ssrl.finetuning import build_classifier
from keras_ssrl.serving.export import export_run
from keras_ssrl.serving.verify import TOLERANCE
from tests.conftest import array_source, quiet, small_matrix

SUBPROCESS_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
TOL = TOLERANCE["float32"]


# --------------------------------------------------------------------- run folders


def _data_record(data_dir):
    manifest = Manifest.load(data_dir)
    return {
        "dir": str(data_dir),
        "builtin": None,
        "manifest_sha256": manifest.digest(),
        "n_genes": manifest.n_genes,
        "genes_sha256": genes_digest(manifest.genes),
    }


def _randomise(model, seed):
    """Non-trivial weights everywhere, BatchNorm statistics included."""
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.get_weights():
        if w.ndim == 1:  # BatchNorm gamma/beta/mean/variance and biases: positive
            weights.append(rng.uniform(0.5, 1.5, w.shape).astype(w.dtype))
        else:
            weights.append(w + rng.normal(0, 0.1, w.shape).astype(w.dtype))
    model.set_weights(weights)


def write(path, payload):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle)


def make_pretraining_run(run_dir, data_dir, width=16, seed=0):
    """A pre-training run folder as `run_pretraining` writes it (encoder + records)."""
    os.makedirs(run_dir)
    manifest = Manifest.load(data_dir)
    encoder = build_encoder(manifest.n_genes, layers=2, width=width)
    _randomise(encoder, seed)
    encoder.save(os.path.join(run_dir, "encoder.keras"))
    write(
        os.path.join(run_dir, "config.json"),
        {
            "config": {"method": "scarf", "encoder": {"layers": 2, "width": width}},
            "method": "scarf",
            "precision": "float32",
            "data": _data_record(data_dir),
        },
    )
    write(
        os.path.join(run_dir, "summary.json"), {"status": "complete", "final_loss": 1.0}
    )
    return str(run_dir)


def make_finetune_run(run_dir, data_dir, seed=1, policy=None, n_genes=None):
    """A fine-tuning run folder following the fine-tuning contract."""
    os.makedirs(run_dir)
    manifest = Manifest.load(data_dir)
    n_genes = n_genes or manifest.n_genes
    previous = keras.config.dtype_policy()
    if policy:
        keras.config.set_dtype_policy(policy)
    try:
        encoder = build_encoder(n_genes, layers=2, width=16)
        classifier = build_classifier(encoder, len(manifest.labels))
    finally:
        keras.config.set_dtype_policy(previous)
    _randomise(classifier, seed)
    classifier.save(os.path.join(run_dir, "classifier.keras"))
    write(
        os.path.join(run_dir, "config.json"),
        {
            "kind": "finetune",
            "method": "scarf",
            "mode": "frozen",
            "labels": manifest.labels,
            "data": _data_record(data_dir),
            "encoder_run": "/somewhere/runs/scarf",
            "config": {"epochs": 3},
        },
    )
    write(
        os.path.join(run_dir, "metrics.json"),
        {"accuracy": 0.9, "balanced_accuracy": 0.88, "macro_f1": 0.87},
    )
    return str(run_dir)


# --------------------------------------------------------------------- exports


def f16_dataset(folder) -> str:
    """float16 records (the default), so the example signature decodes float16."""
    counts, samples, genes, labels = small_matrix(n_genes=30, seed=3)
    out = str(folder / "f16")
    convert(
        array_source(counts, samples, genes, labels), out,
        ConversionConfig(record_dtype="float16", shards=2), log=quiet,
    )  # fmt: skip
    return out


def make_exports(root, dataset_dir) -> dict:
    """A classifier (float32 records) and an encoder (float16 records), exported.

    `exports[kind]` is `(version folder, run folder, dataset folder)`, for `kind`
    `classifier` (trained on `dataset_dir`) and `encoder` (on `f16_dataset`, 30 genes).
    Each test file makes them once in a module-scoped `exports` fixture.
    """
    f16_data = f16_dataset(root)
    clf_run = make_finetune_run(root / "finetune", dataset_dir)
    enc_run = make_pretraining_run(root / "scarf", f16_data)
    clf = export_run(clf_run, str(root / "models" / "clf"), log=quiet)
    enc = export_run(enc_run, str(root / "models" / "enc"), log=quiet)
    return {
        "classifier": (clf, clf_run, dataset_dir),
        "encoder": (enc, enc_run, f16_data),
    }


# --------------------------------------------------------------------- references

_MODELS = {}


def saved_keras_model(run_dir):
    """The run's Keras model (loaded once per run folder)."""
    run_dir = str(run_dir)
    if run_dir not in _MODELS:
        name = "classifier.keras"
        if not os.path.exists(os.path.join(run_dir, name)):
            name = "encoder.keras"
        _MODELS[run_dir] = keras.saving.load_model(os.path.join(run_dir, name))
    return _MODELS[run_dir]


def call(model, x):
    """The Keras model called directly, in inference mode."""
    return np.asarray(model(np.asarray(x, np.float32), training=False))


def keras_reference(run_dir, data_dir, raw=None, stored=None):
    """Independent reference: numpy transform + z-score, then the saved Keras model."""
    manifest = Manifest.load(data_dir)
    if stored is None:
        stored = apply_transform(
            np.asarray(raw, np.float32), manifest.data["transform"]
        )
    x = ((np.asarray(stored, np.float32) - manifest.mean) / manifest.std).astype(
        "float32"
    )
    model = saved_keras_model(run_dir)
    if model.name == "classifier":
        logits = call(model, x).astype(np.float64)
        e = np.exp(logits - logits.max(1, keepdims=True))
        embedding = call(model.get_layer("encoder"), x)
        return {"probabilities": e / e.sum(1, keepdims=True), "embedding": embedding}
    return {"embedding": call(model, x)}


def raw_samples(data_dir, rows=6, seed=5):
    """Raw counts in the model's gene order (what a user sends)."""
    manifest = Manifest.load(data_dir)
    rng = np.random.default_rng(seed)
    return rng.poisson(30.0, (rows, manifest.n_genes)).astype(np.float32)


def assert_close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= tol["atol"] + tol["rtol"] * np.abs(want)), (
        np.abs(got - want).max()
    )
