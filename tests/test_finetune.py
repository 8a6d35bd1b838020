"""Fine-tuning: subsets, frozen weights, early stopping, outputs, no test-split leakage.

The tests marked `backends` also run under `KERAS_BACKEND=jax python -m pytest -m
backends`; tests/test_finetune_backends.py compares the two backends' runs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from keras_ssrl.config import EncoderConfig, FinetuneConfig
from keras_ssrl.finetuning import (
    FinetuneError,
    Finetuner,
    LabelledSplit,
    classification_metrics,
    finetune,
    load_finetune_data,
    stratified_subset,
    subset_seed,
)
from tests.conftest import load_script, quiet

TINY_ENCODER = EncoderConfig(layers=2, width=16)
FAST = FinetuneConfig(max_epochs=4, patience=2)


@pytest.fixture(scope="module")
def data_dir(labelled_dir):
    return labelled_dir


@pytest.fixture(scope="module")
def data(data_dir):
    return load_finetune_data(data_dir)


@pytest.fixture(scope="module")
def scarf_run(tiny_scarf_run):
    return tiny_scarf_run


def test_stratified_subsets_keep_balance_and_every_class():
    labels = np.repeat(np.arange(5), [40, 20, 10, 5, 2])
    for fraction in (0.02, 0.1, 0.5):
        subset = stratified_subset(labels, fraction, seed=1)
        counts = np.bincount(labels[subset], minlength=5)
        assert (counts >= 1).all(), counts
        assert len(np.unique(subset)) == len(subset)
        assert abs(len(subset) - max(round(fraction * 77), 5)) <= 1
    half = np.bincount(labels[stratified_subset(labels, 0.5, seed=1)], minlength=5)
    quota = np.array([40, 20, 10, 5, 2]) * half.sum() / 77
    assert np.all(np.abs(half - quota) <= 1.0), (half, quota)  # proportional
    assert len(stratified_subset(labels, 1.0, seed=3)) == len(labels)


def test_subsets_are_shared_by_methods_and_differ_across_repeats():
    labels = np.repeat(np.arange(4), 25)
    # The subset is a function of (seed, p, repeat) only: every method calls the same.
    a = stratified_subset(labels, 0.2, subset_seed(0, 0.2, repeat=0))
    b = stratified_subset(labels, 0.2, subset_seed(0, 0.2, repeat=0))
    c = stratified_subset(labels, 0.2, subset_seed(0, 0.2, repeat=1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert subset_seed(0, 0.2, 0) != subset_seed(0, 0.3, 0)
    with pytest.raises(FinetuneError, match="fraction"):
        stratified_subset(labels, 0.0, 1)


def test_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 0])
    m = classification_metrics(y_true, y_pred, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    f1 = [2 * (2 / 3) * (2 / 3) / (4 / 3), 2 * (2 / 3) * 1 / (5 / 3), 0.0]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


@pytest.mark.backends
def test_frozen_mode_keeps_the_encoder_bit_identical(data, scarf_run):
    from keras_ssrl.finetuning import load_encoder_weights

    weights = load_encoder_weights(scarf_run, data.manifest)
    tuner = Finetuner(data.n_genes, len(data.classes), TINY_ENCODER, "frozen", FAST)
    subset = stratified_subset(data.train.y, 1.0, 0)
    tuner.run(data, subset, 0, weights)
    after = tuner.encoder.get_weights()  # kernels, biases and BatchNorm statistics
    assert len(after) == len(weights)
    for before, now in zip(weights, after):
        np.testing.assert_array_equal(before, now)
    # Unfrozen from the same start moves the encoder.
    tuner = Finetuner(data.n_genes, len(data.classes), TINY_ENCODER, "unfrozen", FAST)
    tuner.run(data, subset, 0, weights)
    moved = tuner.encoder.get_weights()
    assert not np.array_equal(moved[0], weights[0])


@pytest.mark.backends
def test_early_stopping_restores_the_best_epoch(data):
    config = FinetuneConfig(max_epochs=60, patience=3, learning_rate=0.03)
    tuner = Finetuner(data.n_genes, len(data.classes), TINY_ENCODER, "unfrozen", config)
    subset = stratified_subset(data.train.y, 1.0, 0)
    result = tuner.run(data, subset, 0, None)
    val = [row["val_loss"] for row in result.history]
    best = int(np.argmin(val)) + 1
    assert result.best_epoch == best
    # Stopped `patience` epochs after the best one (or at max_epochs).
    assert result.epochs == min(best + config.patience, config.max_epochs)
    assert result.epochs < config.max_epochs, "the loss did not plateau: test is void"
    logits = tuner.logits(data.val.x)
    restored = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        data.val.y, logits
    )
    assert float(restored) == pytest.approx(min(val), rel=1e-5)


@pytest.mark.backends
def test_runs_are_reproducible_and_independent_of_earlier_runs(data):
    subset = stratified_subset(data.train.y, 0.5, 7)
    shared = Finetuner(data.n_genes, len(data.classes), TINY_ENCODER, "unfrozen", FAST)
    first = shared.run(data, subset, 7, None)
    shared.run(data, stratified_subset(data.train.y, 1.0, 8), 8, None)
    again = shared.run(data, subset, 7, None)
    fresh = Finetuner(data.n_genes, len(data.classes), TINY_ENCODER, "unfrozen", FAST)
    new = fresh.run(data, subset, 7, None)
    assert first.history == again.history == new.history
    assert first.metrics == again.metrics == new.metrics


@pytest.mark.backends
def test_the_test_split_never_influences_training(data):
    """Scrambling the test split changes the scores only, never the trained model."""
    rng = np.random.default_rng(0)
    scrambled = dataclasses.replace(
        data,
        test=LabelledSplit(
            rng.normal(size=data.test.x.shape).astype(np.float32) * 50,
            rng.permutation(data.test.y),
            data.test.ids,
        ),
    )
    subset = stratified_subset(data.train.y, 0.5, 1)
    models = []
    for d in (data, scrambled):
        tuner = Finetuner(d.n_genes, len(d.classes), TINY_ENCODER, "unfrozen", FAST)
        result = tuner.run(d, subset, 1, None)
        models.append((result.history, tuner.classifier.get_weights()))
    assert models[0][0] == models[1][0]
    for a, b in zip(models[0][1], models[1][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.backends
def test_finetune_writes_a_loadable_classifier(data_dir, data, scarf_run, tmp_path):
    out = str(tmp_path / "ft")
    config = FinetuneConfig(mode="unfrozen", fraction=0.5, max_epochs=3, patience=2)
    metrics = finetune(data_dir, out, encoder_run=scarf_run, config=config, log=quiet)
    assert set(os.listdir(out)) >= {
        "classifier.keras", "config.json", "history.csv", "metrics.json"
    }  # fmt: skip
    record = json.load(open(os.path.join(out, "config.json")))
    assert record["kind"] == "finetune"
    assert record["method"] == "scarf" and record["mode"] == "unfrozen"
    assert record["labels"] == data.classes
    assert record["data"]["manifest_sha256"] == data.manifest.digest()
    assert record["encoder_run"] == os.path.abspath(scarf_run)
    model = keras.saving.load_model(os.path.join(out, "classifier.keras"))
    assert model.get_layer("encoder").output.shape[-1] == 16
    predictions = model.predict(data.test.x, verbose=0).argmax(axis=1)
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == data.test.y))
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["accuracy"] == metrics["accuracy"]
    assert np.array(saved["confusion_matrix"]).sum() == len(data.test.y)
    # The matrix carries its class names: row k counts the test samples of classes[k].
    assert saved["classes"] == data.classes
    assert saved["confusion_matrix_axes"].startswith("rows: true class")
    assert np.array(saved["confusion_matrix"]).sum(axis=1).tolist() == np.bincount(
        data.test.y, minlength=len(data.classes)
    ).tolist()
    with pytest.raises(FinetuneError, match="already holds"):
        finetune(data_dir, out, encoder_run=scarf_run, config=config, log=quiet)


def test_finetune_history_and_tensorboard_number_epochs_from_one(data_dir, tmp_path):
    import csv

    import tensorflow as tf

    out = tmp_path / "ft"
    config = FinetuneConfig(mode="unfrozen", fraction=0.5, max_epochs=3, patience=3)
    finetune(data_dir, str(out), config=config, tensorboard=True, log=quiet)
    with open(out / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows)
    for run, prefix in (("train", ""), ("validation", "val_")):
        (events,) = (out / "logs" / run).iterdir()
        seen = {}
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                seen[(value.tag, event.step)] = number
        for row in rows:
            step = int(row["epoch"])
            for name in ("loss", "accuracy"):
                assert seen[(f"epoch_{name}", step)] == pytest.approx(
                    float(row[prefix + name]), rel=1e-5
                )


@pytest.mark.backends
def test_finetune_cli_baseline_and_errors(data_dir, scarf_run, tmp_path, capsys):
    cli = load_script("scripts/finetune.py")
    out = str(tmp_path / "base")
    code = cli.main(
        ["--baseline", "--data", data_dir, "--fraction", "0.3", "--max-epochs", "2",
         "--layers", "1", "--width", "8", "--out", out, "--quiet"]
    )  # fmt: skip
    assert code == 0
    record = json.load(open(os.path.join(out, "config.json")))
    assert record["method"] == "baseline" and record["encoder_run"] is None
    assert record["encoder"]["layers"] == 1
    with pytest.raises(SystemExit):
        cli.main(["--baseline", "--mode", "frozen", "--data", data_dir])
    code = cli.main(["--encoder", str(tmp_path / "nothing"), "--data", data_dir,
                     "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2
    assert "not a pre-training run" in capsys.readouterr().err


def test_finetune_cli_help_shows_every_default_once(capsys):
    cli = load_script("scripts/finetune.py")
    parser = cli.parser()
    helps = {a.dest: a.help for a in parser._actions}
    assert all(helps.values()), [dest for dest, text in helps.items() if not text]
    tables = ((cli.FLAGS, FinetuneConfig()), (cli.BASELINE_FLAGS, EncoderConfig()))
    for table, defaults in tables:
        for flag in table.flags:
            text = helps[flag.dest]
            assert text.count("(default: ") == 1, text
            assert f"(default: {getattr(defaults, flag.path)})" in text, text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "(default: None)" not in capsys.readouterr().out
    # Defaults come from the config dataclasses; a flag overrides only its own field.
    args = parser.parse_args(["--baseline", "--patience", "3", "--width", "8"])
    assert cli.FLAGS.apply(args, FinetuneConfig()) == FinetuneConfig(patience=3)
    assert cli.BASELINE_FLAGS.apply(args, EncoderConfig()) == EncoderConfig(width=8)
