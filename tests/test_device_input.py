"""`--cache device`: the pre-training split held on the device, batches by index."""

from __future__ import annotations

import json
import os
import shutil

import keras
import numpy as np
import pytest

from keras_ssrl.config import config_from_dict
from keras_ssrl.layers import DeviceRows
from keras_ssrl.training import (
    CheckpointStore,
    TrainingPlan,
    device_input,
    run_pretraining,
)
from keras_ssrl.training.device_input import choose_input, index_batches
from tests.conftest import converted_builtin


def quiet(_):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return converted_builtin(tmp_path_factory.mktemp("device"), 300, 200)


def tiny(method="scarf", epochs=2):
    return config_from_dict(
        {
            "method": method,
            "epochs": epochs,
            "batch_size": 32,
            "encoder": {"layers": 1, "width": 16},
            "scarf": {"projector_hidden": 16, "projector_dim": 16},
            "byol": {"hidden": 32, "projection_dim": 16},
        }
    )


def test_index_batches_are_a_fresh_permutation_per_epoch():
    plan = TrainingPlan.create(70, 32, 3)  # 2 full batches and one of 6
    batches = [b.numpy() for b in index_batches(plan, seed=4)(0, 3)]
    assert [len(b) for b in batches] == [32, 32, 6] * 3
    epochs = [np.concatenate(batches[i : i + 3]) for i in (0, 3, 6)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(70))
    assert not np.array_equal(epochs[0], epochs[1])
    # Any epoch is known without replaying the earlier ones (what resuming needs).
    again = [b.numpy() for b in index_batches(plan, seed=4)(2, 3)]
    np.testing.assert_array_equal(np.concatenate(again), epochs[2])


def test_choose_input_says_why_it_streams(monkeypatch):
    monkeypatch.setattr(device_input, "free_device_memory", lambda: (10**9, True))
    small = choose_input("auto", 1000, 200, "mixed_bfloat16")
    large = choose_input("device", 100_000, 20_000, "float32")
    off = choose_input("none", 1000, 200, "float32")
    assert large.needed == 100_000 * 20_000 * 2 and not large.on_device
    assert "does not fit" in large.message and "streaming" in large.message
    assert not off.on_device and "--cache none" in off.message
    if keras.backend.backend() == "jax":
        assert small.on_device and small.storage_dtype == "bfloat16"
    else:  # auto holds the split on the device under JAX only
        assert not small.on_device and "--cache device" in small.message
    monkeypatch.setattr(device_input, "free_device_memory", lambda: (10**9, False))
    assert not choose_input("auto", 1000, 200, "float32").on_device  # a CPU
    assert choose_input("device", 1000, 200, "float32").on_device  # asked for


@pytest.mark.backends
def test_device_rows_gather_the_rows_asked_for():
    rows = np.random.default_rng(0).normal(size=(50, 7)).astype("float32")
    layer = DeviceRows(rows, "bfloat16")
    picked = keras.ops.convert_to_numpy(layer(np.array([3, 0, 49, 3], "int32")))
    assert picked.dtype == np.float32
    # bfloat16 keeps 8 significant bits: a relative error under 2**-8.
    np.testing.assert_allclose(picked, rows[[3, 0, 49, 3]], rtol=2**-8, atol=1e-6)
    assert not layer.trainable_weights and layer.nbytes == 50 * 7 * 2


@pytest.mark.backends
@pytest.mark.parametrize("method", ["scarf", "byol"])
def test_device_cache_trains_checkpoints_without_data_and_resumes(
    data, tmp_path, method
):
    run_dir = tmp_path / "run"
    summary = run_pretraining(
        tiny(method), data, str(run_dir), cache="device", checkpoint_every=4,
        verbose=0, log=quiet,
    )  # fmt: skip
    record = json.loads((run_dir / "config.json").read_text())
    assert record["training"]["input"] == "device"
    assert summary["steps"] == 14 and np.isfinite(summary["final"]["loss"])
    store = CheckpointStore(run_dir / "checkpoints")
    (newest, newest_folder), (older, _) = store.checkpoints()[:2]
    with np.load(os.path.join(newest_folder, "ckpt.npz")) as saved:
        largest = max(saved[k].size for k in saved.files if k != "__index__")
    assert largest < 195 * 200  # the split itself is never checkpointed
    final = keras.saving.load_model(run_dir / "encoder.keras").get_weights()
    # Resume from the older checkpoint (mid second epoch): the same batches are
    # gathered again, so the same encoder comes out.
    assert (newest, older) == (14, 12)
    shutil.rmtree(newest_folder)
    for name in ("encoder.keras", "summary.json"):
        (run_dir / name).unlink()
    resumed = run_pretraining(
        tiny(method), data, str(run_dir), resume=True, cache="none", verbose=0,
        log=quiet,
    )  # fmt: skip
    assert resumed["resumed_from_step"] == 12
    again = keras.saving.load_model(run_dir / "encoder.keras").get_weights()
    for a, b in zip(final, again):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
