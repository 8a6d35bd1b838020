"""The pre-training driver, its fault tolerance and `scripts/pretrain.py`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ssrl.config import ConfigError, PretrainConfig, config_from_dict
from keras_ssrl.runs import RunDirError
from keras_ssrl.training import (
    CheckpointStore,
    NonFiniteLossError,
    TrainingPlan,
    VariablesCheckpoint,
    pretrain_subset,
    resolve_precision,
    run_pretraining,
    steps_per_epoch,
)
from tests.conftest import ROOT, converted_builtin, load_script

pretrain_cli = load_script("scripts/pretrain.py")

# Small heads so that every method trains in well under a second per epoch.
TINY = {
    "batch_size": 32,
    "encoder": {"layers": 1, "width": 16},
    "scarf": {"projector_hidden": 16, "projector_dim": 16},
    "byol": {"hidden": 32, "projection_dim": 16},
}


def tiny_config(method="scarf", epochs=2, **overrides) -> PretrainConfig:
    config = config_from_dict({**TINY, "method": method, "epochs": epochs})
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def quiet(_):
    pass


def fit(config, data, run_dir, **kwargs):
    return run_pretraining(config, data, str(run_dir), verbose=0, log=quiet, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """synthetic-tcga, 300 samples x 200 genes: 195 pre-training, 34 validation."""
    return converted_builtin(tmp_path_factory.mktemp("train"), 300, 200)


@pytest.fixture(scope="module")
def scarf_run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "scarf"
    summary = fit(tiny_config(keep="best"), data, run_dir, checkpoint_every=3)
    return run_dir, summary


def read_history(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "history.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def event_tags(folder) -> set[str]:
    tags = set()
    for name in os.listdir(folder):
        if name.startswith("events.out"):
            for event in tf.compat.v1.train.summary_iterator(
                os.path.join(folder, name)
            ):
                tags.update(value.tag for value in event.summary.value)
    return tags


@pytest.mark.backends
def test_run_writes_every_output(scarf_run, data):
    run_dir, summary = scarf_run
    for name in ("encoder.keras", "config.json", "history.csv", "summary.json"):
        assert os.path.isfile(run_dir / name), name

    record = json.loads((run_dir / "config.json").read_text())
    assert record["method"] == "scarf"
    assert record["precision"] == "float32"  # auto on CPU
    assert record["config"]["encoder"] == {"layers": 1, "width": 16, "dropout": 0.0}
    assert record["config"]["learning_rate"] == PretrainConfig().learning_rate
    assert record["data"]["n_genes"] == 174
    assert len(record["data"]["manifest_sha256"]) == 64
    assert record["training"]["steps_per_epoch"] == 7  # 195 / 32: 6 full + 3

    assert summary["steps"] == summary["total_steps"] == 14
    assert summary["kept_encoder"] == "best"
    assert summary["best"]["epoch"] in (1, 2)
    assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["final_val_loss"])
    assert summary["samples_per_second"] > 0
    assert json.loads((run_dir / "summary.json").read_text()) == summary

    history = read_history(run_dir)
    # Numbered from 1, as fine-tuning's history.csv and summary.json's best epoch.
    assert [row["epoch"] for row in history] == ["1", "2"]
    for key in ("loss", "val_loss", "val_effective_rank", "val_collapsed_dims"):
        assert np.isfinite(float(history[0][key])), key

    encoder = keras.saving.load_model(run_dir / "encoder.keras")
    assert encoder.dtype_policy.name == "float32"
    assert encoder.output_shape == (None, 16)

    logs = run_dir / "logs"
    assert {"epoch_loss", "epoch_learning_rate"} <= event_tags(logs / "train")
    assert {
        "epoch_loss",
        "epoch_embedding_std",
        "epoch_effective_rank",
        "epoch_collapsed_dims",
    } <= event_tags(logs / "validation")
    projector = logs / "embeddings"
    lines = (projector / "metadata.tsv").read_text().splitlines()
    assert lines[0] == "label\tsample_id" and len(lines) == 1 + 34
    assert (projector / "projector_config.pbtxt").is_file()
    embedding = tf.train.load_variable(
        str(projector), "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    )
    assert embedding.shape == (34, 16)

    checkpoints = CheckpointStore(run_dir / "checkpoints").checkpoints()
    assert [step for step, _ in checkpoints] == [14, 12]  # the newest two


@pytest.mark.backends
@pytest.mark.parametrize(
    "method, columns",
    [("vime", {"mask_loss", "feature_loss"}), ("byol", {"ema_decay"})],
)
def test_other_methods_log_their_components(data, tmp_path, method, columns):
    summary = fit(tiny_config(method, epochs=1), data, tmp_path / method)
    assert summary["steps"] == 7
    row = read_history(tmp_path / method)[0]
    assert columns | {f"val_{c}" for c in columns} <= set(row)
    assert all(np.isfinite(float(row[c])) for c in columns)


def test_resume_refuses_another_run(scarf_run, data, tmp_path):
    run_dir, _ = scarf_run
    with pytest.raises(RunDirError, match="already holds a run"):
        fit(tiny_config(), data, run_dir)
    with pytest.raises(RunDirError, match="method: the run used 'scarf', now 'vime'"):
        fit(tiny_config("vime"), data, run_dir, resume=True)
    with pytest.raises(RunDirError, match="config learning_rate"):
        fit(tiny_config(learning_rate=1e-3), data, run_dir, resume=True)
    with pytest.raises(RunDirError, match="config encoder.width"):
        config = tiny_config()
        config.encoder.width = 32
        fit(config, data, run_dir, resume=True)

    # The same samples under other gene names: another gene list.
    other = tmp_path / "renamed"
    shutil.copytree(data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["genes"][0] = "RENAMED"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="gene list"):
        fit(tiny_config(), str(other), run_dir, resume=True)

    # Through the command line: a clear message and exit status 2.
    code = pretrain_cli.main(
        ["--method", "scarf", "--data", data, "--out", str(run_dir), "--resume"]
        + ["--learning-rate", "0.01", "--progress", "none"]
    )
    assert code == 2


@pytest.mark.backends
def test_resume_of_a_complete_run_rewrites_the_same_outputs(scarf_run, data):
    run_dir, summary = scarf_run
    before = keras.saving.load_model(run_dir / "encoder.keras").get_weights()
    again = fit(tiny_config(keep="best"), data, run_dir, resume=True)
    assert again["steps"] == summary["steps"] and again["resumed_from_step"] == 14
    after = keras.saving.load_model(run_dir / "encoder.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.backends
def test_non_finite_loss_names_the_step(data, tmp_path):
    config = tiny_config(learning_rate=1e30)  # the first update overflows
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(epoch 1, batch 2\)"):
        fit(config, data, tmp_path / "nan", checkpoint_every=1)
    # Nothing was saved after the non-finite step.
    steps = [
        s for s, _ in CheckpointStore(tmp_path / "nan" / "checkpoints").checkpoints()
    ]
    assert steps == [1]


@pytest.mark.backends
def test_checkpoint_restores_everything(tmp_path):
    """The reason for the design: weights, optimizer, loss scale and seeds round-trip."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        from keras_ssrl.encoders import build_encoder
        from keras_ssrl.methods import build_method

        config = tiny_config("byol")
        x = np.random.default_rng(0).normal(size=(32, 12)).astype("float32")

        def make():
            keras.utils.set_random_seed(1)
            encoder = build_encoder(12, 1, 8, dropout=0.1)
            model = build_method("byol", encoder, 12, config, total_steps=10)
            model.compile(optimizer=keras.optimizers.Adam(1e-3))
            model.optimizer.build(model.trainable_variables)
            checkpoint = VariablesCheckpoint(
                model=model.variables, optimizer=model.optimizer.variables
            )
            return model, checkpoint

        def state(model):
            return [np.asarray(v) for v in model.variables + model.optimizer.variables]

        a, checkpoint_a = make()
        a.fit(x, batch_size=8, epochs=1, verbose=0, shuffle=False)
        store = CheckpointStore(tmp_path / "ckpt")
        store.save(checkpoint_a, 4, {})
        b, checkpoint_b = make()
        store.restore(checkpoint_b, store.latest()[0])
        assert any(
            "loss_scale" in v.path or "dynamic_scale" in v.path
            for v in a.optimizer.variables
        )
        assert all(np.array_equal(u, v) for u, v in zip(state(a), state(b)))
        # Training on continues identically (same corruption and dropout draws).
        a.fit(x, batch_size=8, epochs=1, verbose=0, shuffle=False)
        b.fit(x, batch_size=8, epochs=1, verbose=0, shuffle=False)
        assert all(np.array_equal(u, v) for u, v in zip(state(a), state(b)))
    finally:
        keras.config.set_dtype_policy(previous)


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", log=quiet)
    variable = keras.Variable(1.0)
    checkpoint = VariablesCheckpoint(v=[variable])
    store.save(checkpoint, 1, {"epoch": 0})
    variable.assign(2.0)
    store.save(checkpoint, 2, {"epoch": 0})
    # A kill during a write leaves a temporary folder; a folder without its state
    # file is incomplete (never produced by the store, but must not be trusted).
    os.makedirs(tmp_path / "ckpt" / ".tmp-000000003-99")
    os.makedirs(tmp_path / "ckpt" / "step-000000009")
    path, state = store.latest()
    assert state["step"] == 2 and path.endswith("step-000000002")
    variable.assign(0.0)
    store.restore(checkpoint, path)
    assert float(variable) == 2.0
    variable.assign(3.0)
    store.save(checkpoint, 3, {})
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["step-000000002", "step-000000003", "step-000000009"]
    # A damaged newest checkpoint falls back to the previous one.
    for name in os.listdir(tmp_path / "ckpt" / "step-000000003"):
        if name.startswith("ckpt."):
            (tmp_path / "ckpt" / "step-000000003" / name).write_bytes(b"")
    shutil.rmtree(tmp_path / "ckpt" / "step-000000009")
    path, state = store.restore_latest(checkpoint)
    assert state["step"] == 2 and float(variable) == 2.0


def test_pretrain_subset_is_deterministic_and_nested(data, tmp_path):
    assert pretrain_subset(data, 1.0, seed=0) is None
    small = pretrain_subset(data, 0.2, seed=0)
    assert small == pretrain_subset(data, 0.2, seed=0)
    assert len(small) == 39  # round(0.2 * 195)
    assert set(small) < set(pretrain_subset(data, 0.5, seed=0))
    assert small != pretrain_subset(data, 0.2, seed=1)
    # Training reads exactly that subset: 39 samples -> 2 steps of 32 (+7).
    summary = fit(
        tiny_config(epochs=1, pretrain_fraction=0.2), data, tmp_path / "subset"
    )
    assert summary["n_train"] == 39 and summary["steps"] == 2


def test_small_helpers():
    assert resolve_precision("auto") == "float32"  # no GPU here
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert steps_per_epoch(195, 32) == 7
    assert steps_per_epoch(193, 32) == 6  # a final batch of one is dropped
    assert steps_per_epoch(193, 32, min_rows=1) == 7
    # JAX data parallelism over 2 devices: 3 rows are cut to 2, under 2 per device.
    assert steps_per_epoch(195, 32, min_rows=4, row_multiple=2) == 6
    assert steps_per_epoch(197, 32, min_rows=4, row_multiple=2) == 7  # 5 -> 4 rows
    plan = TrainingPlan.create(197, 32, 1, replicas=2, row_multiple=2)
    assert plan.samples_per_epoch == 196
    with pytest.raises(ConfigError, match="multiple of 2"):
        TrainingPlan.create(197, 33, 1, replicas=2, row_multiple=2)
    plan = TrainingPlan.create(n_train=195, batch_size=32, epochs=3)
    assert (plan.steps_per_epoch, plan.total_steps) == (7, 21)
    assert plan.phases(0) == [(0, 3, 0)]
    assert plan.phases(7) == [(1, 3, 0)]
    assert plan.phases(9) == [(1, 2, 2), (2, 3, 0)]  # finish epoch 1, then the rest
    assert plan.phases(20) == [(2, 3, 6)] and plan.phases(21) == []
    assert plan.samples_at(7) == 195 and plan.samples_at(9) == 195 + 64
    with pytest.raises(ConfigError, match="too small"):
        TrainingPlan.create(n_train=195, batch_size=3, epochs=1, replicas=2)
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_dict({"encoder": {"depth": 3}})
    with pytest.raises(ConfigError, match="epochs must be int"):
        config_from_dict({"epochs": "5"})
    assert config_from_dict({"learning_rate": 1}).learning_rate == 1.0
    config = config_from_dict({"config": {"method": "byol", "byol": {"ema_base": 0.9}}})
    assert config.byol.ema_base == 0.9 and config.epochs == PretrainConfig().epochs


def test_cli_flags_override_the_preset(tmp_path):
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"epochs": 3, "byol": {"ema_base": 0.9}}))
    parser = pretrain_cli.parser()
    args = parser.parse_args(
        ["--method", "byol", "--config", str(preset), "--ema-base", "0.95"]
        + ["--corruption-rate", "0.2", "--no-symmetric", "--width", "64"]
    )
    config = pretrain_cli.resolve_config(args, parser)
    assert (config.method, config.epochs, config.byol.ema_base) == ("byol", 3, 0.95)
    assert config.byol.corruption_rate == 0.2 and config.scarf.corruption_rate == 0.3
    assert config.encoder.width == 64 and config.byol.symmetric is False
    assert config.learning_rate == PretrainConfig().learning_rate
    with pytest.raises(SystemExit):  # --alpha is VIME's
        pretrain_cli.resolve_config(
            parser.parse_args(["--method", "scarf", "--alpha", "1"]), parser
        )


# ---------------------------------------------------------------- hard stops


def cli_command(data, run_dir, preset, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "scripts", "pretrain.py"),
        "--method", "scarf", "--data", data, "--out", str(run_dir),
        "--config", str(preset), "--epochs", "4", "--checkpoint-every", "2",
        "--progress", "none", *extra,
    ]  # fmt: skip


ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def launch(command):
    return subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finish(process) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=180)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def hard_stops(data, tmp_path_factory):
    """One run killed (SIGKILL) and one stopped (SIGTERM) once a checkpoint exists,
    both resumed, next to the same run uninterrupted (in-process).

    The two command-line runs go side by side: most of their time is TensorFlow's
    start-up, which the two cores share well.
    """
    folder = tmp_path_factory.mktemp("hard")
    preset = folder / "preset.json"
    preset.write_text(json.dumps(TINY))
    signals = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
    runs = {name: folder / name for name in signals}
    processes = {
        name: launch(cli_command(data, runs[name], preset)) for name in signals
    }
    pending = dict(signals)
    deadline = time.monotonic() + 180
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if processes[name].poll() is not None:
                del pending[name]  # finished (or failed) before a checkpoint
            elif CheckpointStore(runs[name] / "checkpoints").checkpoints():
                processes[name].send_signal(pending.pop(name))
        time.sleep(0.01)
    stopped = {name: finish(process) for name, process in processes.items()}
    last = {name: CheckpointStore(runs[name] / "checkpoints").latest() for name in runs}
    summaries = {name: (runs[name] / "summary.json").exists() for name in runs}
    resumes = {
        name: launch(cli_command(data, runs[name], preset, "--resume"))
        for name in signals
    }
    # The reference trains while the resumed runs start TensorFlow.
    reference = fit(
        tiny_config(epochs=4), data, folder / "reference", checkpoint_every=2
    )
    weights = keras.saving.load_model(folder / "reference" / "encoder.keras")
    resumed = {name: finish(process) for name, process in resumes.items()}
    return {
        "runs": runs,
        "stopped": stopped,
        "last": last,
        "summary_before_resume": summaries,
        "resumed": resumed,
        "reference": reference,
        "weights": weights.get_weights(),
        "history": read_history(folder / "reference"),
    }


@pytest.mark.backends
@pytest.mark.parametrize("name", ["kill", "term"])
def test_stop_and_resume_matches_an_uninterrupted_run(hard_stops, name):
    h = hard_stops
    stopped, last, run_dir = h["stopped"][name], h["last"][name], h["runs"][name]
    if name == "kill":
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr
    else:  # a checkpoint at the current step, a message, the documented status
        assert stopped.returncode == 143, stopped.stderr
        assert "continue with --resume" in stopped.stderr
    assert not h["summary_before_resume"][name]
    assert last is not None and 0 < last[1]["step"] < h["reference"]["total_steps"]

    resumed = h["resumed"][name]
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == h["reference"]["steps"] == 28
    assert summary["resumed_from_step"] == last[1]["step"]
    # Same batches, corruption and updates: the same encoder and the same history.
    restored = keras.saving.load_model(run_dir / "encoder.keras").get_weights()
    for a, b in zip(h["weights"], restored):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rows = read_history(run_dir)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in h["history"]]
    for a, b in zip(rows, h["history"]):
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4)
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)
