"""The training core on Keras's JAX backend: data parallelism, and no TensorFlow.

Each test starts Python processes of its own, because the Keras backend (and JAX's
number of host devices) is fixed when a process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.blockers import import_blocker
from tests.conftest import ROOT, converted_builtin

# Two CPU devices for JAX: `keras.distribution.DataParallel` then splits each batch.
TWO_DEVICES = "--xla_force_host_platform_device_count=2"


def run_python(code: str, *, backend="jax", xla_flags="", timeout=300, env=None):
    """Runs `code` in a new interpreter; returns its stdout (fails the test on error)."""
    environment = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "XLA_FLAGS": xla_flags,
        "PYTHONPATH": ROOT,
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# One SGD step (learning rate 1) on the same batch, on one device and data parallel
# over two: the weight change is minus the gradient, so equal updates mean equal
# gradients, negatives from the global batch and the masks one device would draw.
GRADIENTS = r"""
import contextlib, json
import jax, keras, numpy as np
from keras_ssrl.config import PretrainConfig
from keras_ssrl.encoders import build_encoder
from keras_ssrl.methods import build_method

assert len(jax.devices()) == 2, jax.devices()
x = np.random.default_rng(0).normal(size=(16, 24)).astype("float32")
out = {}
for method in ("scarf", "vime", "byol"):
    config = PretrainConfig(method=method)
    config.scarf.projector_hidden = config.scarf.projector_dim = 16
    config.byol.hidden, config.byol.projection_dim = 32, 8
    steps = {}
    for placement in ("one", "two"):
        distribution = (
            keras.distribution.DataParallel(devices=jax.devices())
            if placement == "two" else None
        )
        scope = distribution.scope() if distribution else contextlib.nullcontext()
        with scope:
            keras.utils.set_random_seed(1)
            model = build_method(
                method, build_encoder(24, 2, 16), 24, config, total_steps=4, seed=3
            )
            model.compile(optimizer=keras.optimizers.SGD(1.0))
            before = [np.array(v) for v in model.trainable_variables]
            model.fit(x, batch_size=16, epochs=1, shuffle=False, verbose=0)
            after = [np.array(v) for v in model.trainable_variables]
        steps[placement] = [a - b for a, b in zip(after, before)]
    # Relative to the largest gradient entry of the model: a Dense bias before a
    # BatchNorm has a zero gradient, whose float noise has no relative precision.
    scale = max(float(np.max(np.abs(a))) for a in steps["one"])
    out[method] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(steps["one"], steps["two"])
    ) / scale
print(json.dumps(out))
"""


def test_jax_data_parallel_gradients_equal_the_one_device_step():
    worst = json.loads(run_python(GRADIENTS, xla_flags=TWO_DEVICES).splitlines()[-1])
    # float32 sums in another order: a few ulp of the largest gradient entry.
    for method, relative in worst.items():
        assert relative < 1e-4, (method, relative)


# The training core on a JAX-only machine: any import of TensorFlow fails.
WITHOUT_TENSORFLOW = import_blocker("tensorflow") + r"""
import sys

import keras, numpy as np
from keras_ssrl import encoders, heads, losses, layers, methods
from keras_ssrl.config import PretrainConfig

assert keras.backend.backend() == "jax"
x = np.random.default_rng(0).normal(size=(64, 20)).astype("float32")
for policy in ("mixed_float16",):  # float16: the loss scaling path, without TF
    keras.config.set_dtype_policy(policy)
    for name in methods.METHODS:
        config = PretrainConfig(method=name)
        config.byol.hidden = 32
        model = methods.build_method(
            name, encoders.build_encoder(20, 2, 16), 20, config, total_steps=8
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        history = model.fit(x, batch_size=16, epochs=2, verbose=0)
        assert all(np.isfinite(v).all() for v in history.history.values()), name
        print(policy, name, round(history.history["loss"][-1], 4))
assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
print("ok")
"""


def test_training_core_trains_on_numpy_without_tensorflow():
    out = run_python(WITHOUT_TENSORFLOW)
    assert out.splitlines()[-1] == "ok", out
    assert sum(line.startswith("mixed_float16") for line in out.splitlines()) == 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 320 samples: 210 pre-training rows, 6 batches of 32 and one of 18, which
    # splits evenly over 2 devices, so both runs take the same steps.
    return converted_builtin(tmp_path_factory.mktemp("backends"), 320, 200)


def pretrain_command(data, run_dir, *extra):
    preset = os.path.join(os.path.dirname(str(run_dir)), "tiny.json")
    with open(preset, "w", encoding="utf-8") as handle:
        json.dump(
            {"batch_size": 32, "encoder": {"layers": 1, "width": 16}, "epochs": 2}
            | {"scarf": {"projector_hidden": 16, "projector_dim": 16}},
            handle,
        )
    return [
        sys.executable, os.path.join(ROOT, "scripts", "pretrain.py"),
        "--method", "scarf", "--data", data, "--out", str(run_dir),
        "--config", preset, "--progress", "none", "--quiet", *extra,
    ]  # fmt: skip


JAX_ENV = {"KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}


def launch(command, **env):
    environment = {**os.environ, **JAX_ENV, **env}
    if "XLA_FLAGS" not in env:
        environment.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait(processes):
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def one_device(data, tmp_path_factory):
    """The reference: the tiny SCARF run on one device under JAX."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    wait([launch(pretrain_command(data, run_dir))])
    return run_dir


def test_jax_data_parallel_pretraining_matches_one_device(data, one_device, tmp_path):
    """The command line under JAX: two devices give one device's run."""
    run_dir = tmp_path / "run"
    wait(
        [
            launch(
                pretrain_command(data, run_dir, "--distribute", "data-parallel"),
                XLA_FLAGS=TWO_DEVICES,
            )
        ]
    )
    runs = {"none": one_device, "data-parallel": run_dir}
    records = {
        name: json.loads((folder / "config.json").read_text())
        for name, folder in runs.items()
    }
    assert records["none"]["training"]["replicas"] == 1
    assert records["data-parallel"]["training"]["replicas"] == 2
    assert records["data-parallel"]["versions"]["backend"] == "jax"
    plans = [records[name]["training"] for name in runs]
    assert plans[0]["steps_per_epoch"] == plans[1]["steps_per_epoch"] == 7, plans
    assert plans[0]["samples_per_epoch"] == plans[1]["samples_per_epoch"] == 210
    weights = {
        name: keras.saving.load_model(folder / "encoder.keras").get_weights()
        for name, folder in runs.items()
    }
    # 14 Adam steps at the default learning rate: float order effects stay tiny.
    for a, b in zip(weights["none"], weights["data-parallel"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_mirrored_is_refused_under_jax_with_the_flag_to_use(data, tmp_path):
    done = subprocess.run(
        pretrain_command(data, tmp_path / "run", "--distribute", "mirrored"),
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--distribute data-parallel" in done.stderr
    assert not (tmp_path / "run").exists()


def free_port() -> int:
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def test_two_processes_on_localhost_train_one_devices_run(data, one_device, tmp_path):
    """Multi-host under JAX: two processes (one CPU device each, gloo collectives)."""
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    wait(
        [
            launch(
                pretrain_command(
                    data, run_dir, "--distribute", "data-parallel", "--coordinator",
                    address, "--num-processes", "2", "--process-id", str(i),
                )  # fmt: skip
            )
            for i in range(2)
        ]
    )
    record = json.loads((run_dir / "config.json").read_text())
    assert record["training"]["replicas"] == 2
    assert record["training"]["processes"] == 2
    reference = keras.saving.load_model(one_device / "encoder.keras").get_weights()
    for folder in (run_dir, tmp_path / "run.process-1"):
        weights = keras.saving.load_model(folder / "encoder.keras").get_weights()
        for a, b in zip(reference, weights):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(
    keras.backend.backend() == "jax", reason="this run is the JAX run already"
)
def test_backend_neutral_tests_pass_under_jax():
    """The tests marked `backends` again, under KERAS_BACKEND=jax, in one child run.

    `python -m pytest -q` thus covers both backends with one command (CI included).
    """
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "backends", "-p",
         "no:cacheprovider", "-x", "--no-header"],
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=1800,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
