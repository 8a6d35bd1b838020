"""`benchmarks/gpu_scale.py` and `benchmarks/precision_jax.py` on the CPU, without TensorFlow.

The GPU machine they are written for has JAX and Keras but no TensorFlow, so they run
here under KERAS_BACKEND=jax in a new interpreter in which any import of TensorFlow
fails. The configuration is tiny (200 genes, batch 64, a 1 x 32 encoder, a few steps):
the figures are not performance; what is checked is that every kind of measurement runs
through the real models and `fit`, that results are recorded (JSON and Markdown) even
when cases fail or the time budget is spent, and the FLOP model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.blockers import import_blocker
from tests.conftest import ROOT

SCRIPTS = import_blocker("tensorflow") + r"""
import json, os, sys

sys.path.insert(0, "benchmarks")  # where `python benchmarks/precision_jax.py` looks
import gpu_scale, precision_jax
from keras_ssrl.config import PretrainConfig

out = sys.argv[1]
gpu_scale.main(["--tiny", "--methods", "scarf", "--out", os.path.join(out, "run")])
precision_jax.main([
    "--genes", "200", "--batch-size", "64", "--methods", "scarf", "--precisions",
    "float32,mixed_bfloat16", "--steps", "2", "--reps", "1", "--layers", "1",
    "--width", "32",
])
# Nothing left in the budget: every case is recorded as skipped.
gpu_scale.main(["--tiny", "--budget", "0", "--out", os.path.join(out, "skipped")])

# Every measurement fails: each failure is recorded with its case and the run goes on.
def broken(*args, **kwargs):
    raise RuntimeError("planted failure")

gpu_scale.measure_gemm = gpu_scale.measure_pretraining = broken
gpu_scale.measure_epoch = broken
gpu_scale.main(["--tiny", "--methods", "scarf", "--out", os.path.join(out, "failed")])

flops = {
    method: gpu_scale.training_flops(method, 20000, 2048, PretrainConfig())
    for method in ("scarf", "vime", "byol")
}
print("FLOPS", json.dumps(flops))
print("TENSORFLOW", any(m.split(".")[0] == "tensorflow" for m in sys.modules))
"""


def run_scripts(out) -> str:
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": ROOT,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # Compiling is what this run waits for, not steps: XLA's quickest code
        # generation halves it (the figures are not looked at).
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPTS, str(out)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def load(folder):
    with open(os.path.join(folder, "gpu_scale.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    with open(os.path.join(folder, "gpu_scale.md"), encoding="utf-8") as handle:
        return results, handle.read()


def expected_flops(genes=20000, batch=2048, w=256):
    """The docstring's FLOP model, written out for the protocol's default models."""
    encoder = 2 * genes * w + 3 * 2 * w * w
    first_input_gradient = 2 * genes * w
    projector = 2 * w * 256 + 2 * 256 * 256
    scarf = 2 * (3 * (encoder + projector) - first_input_gradient) + 6 * batch * 256
    decoder = 4 * 2 * w * w + 2 * w * genes
    vime = 3 * encoder - first_input_gradient + 2 * 3 * decoder
    head = 2 * w * 4096 + 2 * 4096 * 256  # BYOL's projector; the predictor alike
    byol = 3 * (encoder + 2 * head) - first_input_gradient + encoder + head
    return {"scarf": scarf, "vime": vime, "byol": byol}


def test_gpu_scale_and_precision_scripts_run_without_tensorflow(tmp_path):
    stdout = run_scripts(tmp_path)
    lines = stdout.splitlines()
    assert "TENSORFLOW False" in lines, stdout[-2000:]

    results, table = load(tmp_path / "run")
    meta = results["meta"]
    assert meta["backend"] == "jax" and meta["tiny"]
    assert meta["tensorflow_imported"] is False
    assert "tiny smoke run: not performance" in table
    # The priority plan for SCARF: both precisions on the device, bf16 streaming, and
    # the three ways of driving the step on the first case.
    cases = {(r["precision"], r["input"]): r for r in results["pretrain"]}
    assert list(cases) == [
        ("mixed_bfloat16", "device"),
        ("float32", "device"),
        ("mixed_bfloat16", "stream"),
    ]
    for record in cases.values():
        assert record["status"] == "ok", record
        assert record["samples_per_s"] > 0 and record["finite"]
        assert len(record["reps_s"]) == 2 and record["steps_per_rep"] >= 2
        assert 0 < record["fraction_of_bound"] < 1.5, record
    first = cases[("mixed_bfloat16", "device")]
    assert first["fit_per_batch_samples_per_s"] > 0 and first["scan_samples_per_s"] > 0
    assert "scan_samples_per_s" not in cases[("mixed_bfloat16", "stream")]
    # Epochs: the whole split each time, and the 700k projection from it.
    assert [e["name"] for e in results["epochs"]] == ["tcga", "archs4"]
    for epoch in results["epochs"]:
        assert epoch["status"] == "ok", epoch
        assert epoch["steps"] == math.ceil(epoch["rows"] / 64)
        assert math.isclose(
            epoch["projected_700k_s"], epoch["epoch_s"] * 700_000 / epoch["rows"]
        )
    shapes = {(g["m"], g["k"], g["n"], g["dtype"]) for g in results["matmul"]}
    assert shapes == {
        (m, k, n, d)
        for (m, k, n) in ((256, 256, 256), (64, 200, 32))
        for d in ("bfloat16", "float32")
    }
    assert all(g["status"] == "ok" and g["tflops"] > 0 for g in results["matmul"])
    # No 20k-gene case in a tiny run: the ARCHS4 target is the one reported.
    (target,) = results["targets"]
    assert target["target"].startswith("ARCHS4-sized epoch, 700,000 x 200")
    assert target["met"] is (target["value"] < 1.0)

    rates = [line for line in lines if "samples/s" in line and "x first" in line]
    assert len(rates) == 2, stdout[-2000:]
    assert "float32" in rates[0] and "1.00x first" in rates[0]
    assert "mixed_bfloat16" in rates[1]

    skipped, _ = load(tmp_path / "skipped")
    records = [r for part in ("pretrain", "epochs", "matmul") for r in skipped[part]]
    assert len(records) > 10
    assert {r["status"] for r in records} == {"skipped"}

    failed, table = load(tmp_path / "failed")
    records = [r for part in ("pretrain", "epochs", "matmul") for r in failed[part]]
    assert len(records) == len(cases) + 2 + 4
    assert all(r["error"] == "RuntimeError: planted failure" for r in records)
    assert "## Not measured" in table and failed["targets"] == []

    flops = json.loads(next(x for x in lines if x.startswith("FLOPS "))[6:])
    assert flops == {
        method: {
            "exact": count,
            "3x": {
                "scarf": 6 * (10_633_216 + 262_144),
                "vime": 3 * (10_633_216 + 2 * (524_288 + 10_240_000)),
                "byol": 3 * (10_633_216 + 2 * 4_194_304) + 10_633_216 + 4_194_304,
            }[method],
        }
        for method, count in expected_flops().items()
    }
