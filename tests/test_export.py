"""Export: the version folder and its assets, versions, refusals, the command line.

`export_run` writes `MODEL_BASE/<version>/` from a run folder (written by hand, see
`tests/serving_fixtures.py`, or by a real fine-tuning run); bad runs and data fail with
clear messages and leave nothing behind. The served graph itself is tested in
`tests/test_serving_graph.py`, the client in `tests/test_client.py`.
"""

from __future__ import annotations

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ssrl.config import ConversionConfig, FinetuneConfig
from keras_ssrl.data.convert import convert
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.finetuning import finetune
from keras_ssrl.serving import export as se
from keras_ssrl.serving.assets import ModelInfo
from keras_ssrl.serving.contract import ExportError
from tests.conftest import array_source, load_script, quiet, small_matrix
from tests.serving_fixtures import (
    TOL,
    assert_close,
    keras_reference,
    make_exports,
    make_finetune_run,
    make_pretraining_run,
    raw_samples,
    write,
)

export_cli = load_script("export/export_model.py")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, dataset_dir):
    return make_exports(tmp_path_factory.mktemp("exports"), dataset_dir)


def test_cpm_datasets_are_refused(tmp_path):
    counts, samples, genes, labels = small_matrix(n_samples=60)
    data = str(tmp_path / "cpm")
    convert(
        array_source(counts, samples, genes, labels), data,
        ConversionConfig(transform="cpm_log2p1", shards=1), log=quiet,
    )  # fmt: skip
    run = make_pretraining_run(tmp_path / "run", data)
    with pytest.raises(ExportError, match="cpm_log2p1.*cannot reproduce"):
        se.export_run(run, str(tmp_path / "models"), log=quiet)
    assert not os.path.exists(tmp_path / "models")


def test_version_folder_layout_and_assets(exports, dataset_dir):
    path, run_dir, _ = exports["classifier"]
    base = os.path.dirname(path)
    assert os.path.basename(path) == "1"
    # No temporary folder left; the lock file of the base (never a version) stays.
    assert sorted(os.listdir(base)) == [".keras_ssrl.lock", "1"]
    for name in ("saved_model.pb", "variables", "assets"):
        assert os.path.exists(os.path.join(path, name))
    manifest = Manifest.load(dataset_dir)
    info = ModelInfo.load(base)
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


def test_bad_runs_fail_clearly_and_write_nothing(tmp_path, dataset_dir, exports):
    base = tmp_path / "models"

    def fails(run, match, **kwargs):
        with pytest.raises(ExportError, match=match):
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
        data_dir=exports["encoder"][2],
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
    with pytest.raises(ExportError, match="versions are never overwritten"):
        se.export_run(run_dir, str(base), version=5, log=quiet)
    with pytest.raises(ExportError, match=">= 1"):
        se.export_run(run_dir, str(base), version=0, log=quiet)

    def broken(*args, **kwargs):
        raise ExportError("simulated failure after writing")

    monkeypatch.setattr(se, "verify_export", broken)
    with pytest.raises(ExportError, match="simulated"):
        se.export_run(run_dir, str(base), log=quiet)
    assert sorted(os.listdir(base)) == before  # no new version, no temporary folder
    with pytest.raises(ExportError, match="simulated"):
        se.export_run(run_dir, str(tmp_path / "new"), log=quiet)
    assert not (tmp_path / "new").exists()


def test_export_cli(exports, tmp_path, capsys):
    _, run_dir, _ = exports["encoder"]
    out = tmp_path / "m"
    assert export_cli.main(["--run", run_dir, "--out", str(out), "--model-version", "3"]) == 0
    assert os.path.isfile(out / "3" / "saved_model.pb")
    assert "wrote" in capsys.readouterr().out
    assert export_cli.main(["--run", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no config.json" in err and "\n" not in err


def test_a_real_finetuning_run_exports_and_serves(
    labelled_dir, tiny_scarf_run, tmp_path
):
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
