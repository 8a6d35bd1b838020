"""Serving: SavedModel export, its contract, the client and its transports.

What is verified here, without a TF Serving server (none is installable on our machines):

- the export loads in a fresh Python process that imports only TensorFlow, and its
  signatures give the Keras model's outputs on the same raw input within
  `export.tolerance_for`; `saved_model_cli show --all` lists the signatures and
  `saved_model_cli run` runs them;
- `predict_examples` on the dataset's own records equals the Keras model on what the
  training input pipeline (`load_dataset`) yields: training and serving cannot drift;
- the REST request bodies follow TF Serving's documented predict format, checked by a
  local **stand-in** HTTP server (not TF Serving), and gRPC requests are real
  `PredictRequest`s answered by a local **stand-in** gRPC servicer;
- bad runs, data and inputs fail with clear messages and leave nothing behind.

Run folders are written by hand following the run-folder contract (pre-training:
`encoder.keras` + `config.json` as `run_pretraining` writes it; fine-tuning:
`classifier.keras` with a nested `encoder` and a Dense `head`, `config.json` with
`kind: "finetune"` and `labels`, `metrics.json`), with tiny models so the file runs fast.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent import futures

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from keras_ssrl.config import ConversionConfig, FinetuneConfig
from keras_ssrl.data import schema
from keras_ssrl.data.convert import convert
from keras_ssrl.data.errors import DataError
from keras_ssrl.data.manifest import Manifest, genes_digest
from keras_ssrl.data.preprocessing import apply_transform
from keras_ssrl.data.reader import load_dataset
from keras_ssrl.encoders import build_encoder
from keras_ssrl.finetuning import build_classifier, finetune
from keras_ssrl.serving import client as sc
from keras_ssrl.serving import export as se
from tests.conftest import (
    ROOT,
    array_source,
    load_script,
    small_matrix,
    write_samples_as_rows,
)

export_cli = load_script("export/export_model.py")
client_cli = load_script("export/client.py")

SUBPROCESS_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def quiet(_):
    pass


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


@pytest.fixture(scope="module")
def f16_data(tmp_path_factory):
    """float16 records (the default), so the example signature decodes float16."""
    counts, samples, genes, labels = small_matrix(n_genes=30, seed=3)
    out = str(tmp_path_factory.mktemp("serving") / "f16")
    convert(
        array_source(counts, samples, genes, labels), out,
        ConversionConfig(record_dtype="float16", shards=2), log=quiet,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, dataset_dir, f16_data):
    """A classifier (float32 records) and an encoder (float16 records), exported.

    The out-of-process checks (a fresh TensorFlow-only process, `saved_model_cli`) start
    here, as soon as the exports exist, and run while the in-process tests do: each
    process spends seconds importing TensorFlow. The tests reading their results come
    last in this file.
    """
    root = tmp_path_factory.mktemp("exports")
    clf_run = make_finetune_run(root / "finetune", dataset_dir)
    enc_run = make_pretraining_run(root / "scarf", f16_data)
    clf = se.export_run(clf_run, str(root / "models" / "clf"), log=quiet)
    enc = se.export_run(enc_run, str(root / "models" / "enc"), log=quiet)
    result = {
        "classifier": (clf, clf_run, dataset_dir),
        "encoder": (enc, enc_run, f16_data),
        "root": root,
    }
    checks = OutOfProcessChecks(result, tmp_path_factory.mktemp("fresh"))
    result["checks"] = checks
    yield result
    checks.stop()


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


TOL = se.TOLERANCE["float32"]


# --------------------------------------------------------------------- the graph


@pytest.mark.parametrize("transform", ["log2p1", "log1p", "none"])
def test_graph_transform_matches_the_converter(transform):
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.gamma(0.5, 300.0, 5000), [0.0, 1.0, 3.0, 0.5, 1e-3, 1e6, 2.5e8]]
    ).astype(np.float32)[None, :]
    got = se.graph_transform(tf.constant(x), transform).numpy()
    want = apply_transform(x.copy(), transform)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_cpm_datasets_are_refused(tmp_path):
    counts, samples, genes, labels = small_matrix(n_samples=60)
    data = str(tmp_path / "cpm")
    convert(
        array_source(counts, samples, genes, labels), data,
        ConversionConfig(transform="cpm_log2p1", shards=1), log=quiet,
    )  # fmt: skip
    run = make_pretraining_run(tmp_path / "run", data)
    with pytest.raises(se.ExportError, match="cpm_log2p1.*cannot reproduce"):
        se.export_run(run, str(tmp_path / "models"), log=quiet)
    assert not os.path.exists(tmp_path / "models")


# --------------------------------------------------------------------- the export


def test_version_folder_layout_and_assets(exports, dataset_dir):
    path, run_dir, _ = exports["classifier"]
    base = os.path.dirname(path)
    assert os.path.basename(path) == "1"
    # No temporary folder left; the lock file of the base (never a version) stays.
    assert sorted(os.listdir(base)) == [".keras_ssrl.lock", "1"]
    for name in ("saved_model.pb", "variables", "assets"):
        assert os.path.exists(os.path.join(path, name))
    manifest = Manifest.load(dataset_dir)
    info = sc.ModelInfo.load(base)
    assert info.directory == path
    assert info.genes == manifest.genes
    assert info.class_names == manifest.labels
    with open(os.path.join(path, "assets", "manifest_sha256.txt")) as handle:
        assert handle.read().strip() == manifest.digest()
    card = info.card
    assert card["kind"] == "classifier" and card["method"] == "scarf"
    assert card["mode"] == "frozen" and card["config"] == {"epochs": 3}
    assert card["test_metrics"]["accuracy"] == 0.9
    assert card["data"]["manifest_sha256"] == manifest.digest()
    assert card["data"]["transform"] == "log2p1"
    assert set(card["signatures"]) == {
        "serving_default",
        "predict_examples",
        "classify",
    }
    assert card["encoder_run"] == "scarf"  # a name, not the machine's path
    text = json.dumps(card)
    assert str(dataset_dir) not in text and str(run_dir) not in text
    assert max(card["verification"]["max_abs_difference"].values()) < 1e-4


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
            assert se.class_disagreements(class_id, want["probabilities"], TOL).size == 0
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
    tol = se.tolerance_for(model)
    assert tol["compute_dtype"] == "float16" and tol["layers"] == 6
    assert_close(out["probabilities"].numpy(), want["probabilities"], tol)
    assert_close(out["embedding"].numpy(), want["embedding"], tol)
    card = sc.ModelInfo.load(path).card
    assert card["verification"]["tolerance"]["compute_dtype"] == "float16"


# --------------------------------------------------------------------- bad input


def test_served_graph_rejects_bad_input(exports):
    path, _, data_dir = exports["classifier"]
    model = sc.LocalModel(path)
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
        with pytest.raises(sc.ServingError, match=message):
            model.predict("serving_default", {"expression": values.astype(np.float32)})
    with pytest.raises(sc.ServingError, match="float"):
        model.predict("serving_default", {"expression": good.astype(np.float64)})
    short = schema.serialize_example("a", np.ones(22), 0, "float32")
    with pytest.raises(sc.ServingError, match="does not hold 23 float32"):
        model.predict("predict_examples", {"examples": np.array([short], object)})


def test_bad_runs_fail_clearly_and_write_nothing(
    tmp_path, dataset_dir, f16_data, exports
):
    base = tmp_path / "models"

    def fails(run, match, **kwargs):
        with pytest.raises(se.ExportError, match=match):
            se.export_run(str(run), str(base), log=quiet, **kwargs)
        assert not base.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "no config.json")
    no_model = tmp_path / "unfinished"
    shutil.copytree(exports["classifier"][1], no_model)
    os.remove(no_model / "classifier.keras")
    fails(no_model, "no classifier.keras, so no model to export")
    # Another dataset (other genes) than the one the run was trained on.
    fails(
        exports["classifier"][1],
        "not the dataset .* another gene list",
        data_dir=f16_data,
    )
    # Model width != the dataset's gene count.
    wide = make_finetune_run(tmp_path / "wide", dataset_dir, n_genes=30)
    fails(wide, "gene list mismatch")
    # NaN weights.
    nan_run = make_finetune_run(tmp_path / "nan", dataset_dir)
    model = keras.saving.load_model(os.path.join(nan_run, "classifier.keras"))
    weights = model.get_weights()
    weights[0][0, 0] = np.nan
    model.set_weights(weights)
    model.save(os.path.join(nan_run, "classifier.keras"))
    fails(nan_run, "NaN or infinite")
    # The recorded dataset folder moved: a clear message, and --data fixes it.
    moved = make_finetune_run(tmp_path / "moved", dataset_dir)
    with open(os.path.join(moved, "config.json")) as handle:
        record = json.load(handle)
    record["data"]["dir"] = str(tmp_path / "gone")
    write(os.path.join(moved, "config.json"), record)
    fails(moved, "pass --data DIR if the folder moved")
    assert os.path.isdir(
        se.export_run(moved, str(base), data_dir=dataset_dir, log=quiet)
    )


def test_versions_are_never_overwritten_and_failures_leave_nothing(
    exports, tmp_path, monkeypatch
):
    _, run_dir, _ = exports["encoder"]
    base = tmp_path / "models"
    # (Version 1 of a new base: the `exports` fixture.)
    assert se.export_run(run_dir, str(base), version=5, log=quiet).endswith("5")
    (base / "7-notes").mkdir()  # not a version: ignored
    assert se.export_run(run_dir, str(base), log=quiet).endswith(os.sep + "6")
    before = sorted(os.listdir(base))
    with pytest.raises(se.ExportError, match="versions are never overwritten"):
        se.export_run(run_dir, str(base), version=5, log=quiet)
    with pytest.raises(se.ExportError, match=">= 1"):
        se.export_run(run_dir, str(base), version=0, log=quiet)

    def broken(*args, **kwargs):
        raise se.ExportError("simulated failure after writing")

    monkeypatch.setattr(se, "verify_export", broken)
    with pytest.raises(se.ExportError, match="simulated"):
        se.export_run(run_dir, str(base), log=quiet)
    assert sorted(os.listdir(base)) == before  # no new version, no temporary folder
    with pytest.raises(se.ExportError, match="simulated"):
        se.export_run(run_dir, str(tmp_path / "new"), log=quiet)
    assert not (tmp_path / "new").exists()


def test_export_cli(exports, tmp_path, capsys):
    _, run_dir, _ = exports["encoder"]
    out = tmp_path / "m"
    assert export_cli.main(["--run", run_dir, "--out", str(out), "--version", "3"]) == 0
    assert os.path.isfile(out / "3" / "saved_model.pb")
    assert "wrote" in capsys.readouterr().out
    assert export_cli.main(["--run", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no config.json" in err and "\n" not in err


# --------------------------------------------------------------------- the client


def test_columns_are_put_in_the_model_order(dataset_dir):
    genes = Manifest.load(dataset_dir).genes
    rng = np.random.default_rng(0)
    values = rng.random((3, len(genes))).astype(np.float32)
    order = rng.permutation(len(genes))
    # Shuffled columns, Ensembl versions added, two genes the model does not use.
    shuffled = [f"{genes[i]}.7" for i in order] + ["ENSG99999999999", "extra"]
    table = np.concatenate([values[:, order], np.ones((3, 2), np.float32)], axis=1)
    x, ignored = sc.align_to_model(shuffled, table, genes)
    np.testing.assert_array_equal(x, values)
    assert ignored == 2
    with pytest.raises(DataError, match=f"2 of the model's {len(genes)} genes are missing: "
                       f"{genes[0]}, {genes[1]}"):  # fmt: skip
        sc.align_to_model(genes[2:], values[:, 2:], genes)
    with pytest.raises(DataError, match="occur more than once"):
        sc.align_to_model(genes + [genes[0]], np.ones((3, len(genes) + 1)), genes)
    summed, _ = sc.align_to_model(
        genes + [genes[0]], np.ones((3, len(genes) + 1)), genes, duplicate_genes="sum"
    )
    assert summed[0, 0] == 2.0
    x[1, 4] = np.nan
    with pytest.raises(DataError, match=f"sample 'b', gene '{genes[4]}'"):
        sc.check_finite(x, ["a", "b", "c"], genes, "in.csv")


def test_rest_request_body_follows_tf_serving_format():
    x = np.array([[1.0, 2.5], [3.0, 4.0]], np.float32)
    body = sc.rest_request({"expression": x}, "serving_default", "instances")
    assert body == {
        "signature_name": "serving_default",
        "instances": [{"expression": [1.0, 2.5]}, {"expression": [3.0, 4.0]}],
    }
    body = sc.rest_request({"expression": x}, "serving_default", "inputs")
    assert body == {
        "signature_name": "serving_default",
        "inputs": {"expression": [[1.0, 2.5], [3.0, 4.0]]},
    }
    records = np.array([b"\x00\xffab", b"c"], dtype=object)
    body = sc.rest_request({"examples": records}, "predict_examples", "instances")
    assert body["instances"][0] == {"examples": {"b64": "AP9hYg=="}}
    reply = {
        "predictions": [
            {"class_name": "a", "class_id": 0},
            {"class_name": "b", "class_id": 1},
        ]
    }
    out = sc.rest_outputs(reply, ["class_name", "class_id"])
    assert list(out["class_name"]) == ["a", "b"] and list(out["class_id"]) == [0, 1]
    assert sc.rest_outputs({"outputs": [[1.0], [2.0]]}, ["embedding"])[
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
        "--model-name", "ssrl", "--version", "1", "--model-dir", clf_path,
        "--rest-format", form, "--batch-size", "4", "--embedding", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    assert len(handler.bodies) == 3  # 10 samples in batches of 4
    assert all(b["signature_name"] == "serving_default" for b in handler.bodies)
    frame = pd.read_csv(out)
    assert list(frame["sample_id"]) == samples and list(frame["label"]) == labels
    manifest = Manifest.load(data_dir)
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
    x, _, ids = next(iter(load_dataset(data_dir, "test", 1000, with_sample_ids=True)))
    assert list(frame["sample_id"]) == [s.decode() for s in ids.numpy()]
    want = tf.nn.softmax(call(saved_keras_model(run_dir), x)).numpy()
    labels = Manifest.load(data_dir).labels
    assert_close(
        frame[[f"p_{c}" for c in labels]].to_numpy(), want, {"atol": 1e-6, "rtol": 1e-4}
    )
    # Records of another gene list are refused with a pointer to align.py.
    _, _, f16 = exports["encoder"]
    with pytest.raises(DataError, match="align.py"):
        sc.read_record_samples(f16, "test", sc.ModelInfo.load(clf_path))


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
            "--grpc", f"127.0.0.1:{port}", "--model-name", "ssrl", "--version", "1",
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
        model = sc.GrpcModel(f"127.0.0.1:{port}", "ssrl")
        with pytest.raises(sc.ServingError, match="INVALID_ARGUMENT.*NaN"):
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


# ------------------------------------------------- out of process (started by `exports`)


def test_fresh_tensorflow_only_process_gives_the_keras_outputs(exports):
    checks = exports["checks"]
    results, raws = checks.results(), checks.raws
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


def test_saved_model_cli_show_lists_the_signatures(exports):
    code, out, err = exports["checks"].results()["show"]
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


def test_saved_model_cli_run_on_raw_values_and_examples(exports):
    checks = exports["checks"]
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


def test_a_real_finetuning_run_exports_and_serves(labelled_dir, tiny_scarf_run, tmp_path):
    """scripts/finetune.py's output (not a hand-built folder) exports and serves."""
    run = str(tmp_path / "ft")
    config = FinetuneConfig(fraction=0.5, max_epochs=2, patience=1)
    finetune(labelled_dir, run, encoder_run=tiny_scarf_run, config=config, log=quiet)
    path = se.export_run(run, str(tmp_path / "models"), log=quiet)
    served = tf.saved_model.load(path).signatures["serving_default"]
    raw = raw_samples(labelled_dir, rows=5)
    out = served(expression=tf.constant(raw))
    want = keras_reference(run, labelled_dir, raw=raw)
    assert_close(out["probabilities"].numpy(), want["probabilities"], TOL)
    assert_close(out["embedding"].numpy(), want["embedding"], TOL)
    labels = Manifest.load(labelled_dir).labels
    names = [labels[i] for i in out["class_id"].numpy()]
    assert [n.decode() for n in out["class_name"].numpy()] == names
