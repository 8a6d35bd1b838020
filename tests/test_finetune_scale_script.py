"""`benchmarks/finetune_scale.py`: the paper-scale fine-tuning benchmark, run tiny.

The GPU machine it is written for has JAX and Keras but no TensorFlow, pandas or
scikit-learn, so the end-to-end run goes under KERAS_BACKEND=jax in a new interpreter
where importing any of them fails. The configuration is tiny (200 genes, 5 classes, a
1 x 32 encoder, 2 timed epochs): the figures are not performance; what is checked is
that every kind of case runs through `Finetuner` and `StackedFinetuner`, that the
records follow the protocol and the step-count model, and that a spent budget skips
cases instead of overrunning. The model's arithmetic and the synthetic data are
checked in this process, with NumPy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_ssrl.config import FULL_FRACTIONS, FinetuneConfig
from tests.blockers import import_blocker
from tests.conftest import ROOT, load_script

# As on the GPU machine: no TensorFlow, pandas or scikit-learn.
BLOCKED = ("tensorflow", "pandas", "sklearn")
SCRIPT = import_blocker(*BLOCKED) + f"BLOCKED = {BLOCKED!r}\n" + r"""
import json, os, sys

sys.path.insert(0, "benchmarks")
import finetune_scale

out = sys.argv[1]
finetune_scale.main([
    "--tiny", "--out", os.path.join(out, "run"), "--fractions", "0.1,1",
    "--parallel", "1,3", "--max-epochs", "2", "--stop-fractions", "0.5",
    "--stop-runs", "3", "--grid", "quick",
])
# Nothing left in the budget: the cases that predict their time are skipped.
finetune_scale.main([
    "--tiny", "--out", os.path.join(out, "spent"), "--fractions", "0.1,1",
    "--parallel", "1,3", "--max-epochs", "2", "--stop-fractions", "0.5",
    "--budget", "0",
])
print("BLOCKED", json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))))
"""


@pytest.fixture(scope="module")
def scale():
    """The script's module, imported as `python benchmarks/finetune_scale.py` would."""
    return load_script("benchmarks/finetune_scale.py")


def run_script(out) -> str:
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": ROOT,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # Compilation is what a tiny run waits for: XLA's quickest code generation.
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def load(folder):
    with open(os.path.join(folder, "finetune_scale.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    with open(os.path.join(folder, "finetune_scale.md"), encoding="utf-8") as handle:
        return results, handle.read()


def test_benchmark_runs_without_tensorflow_pandas_or_sklearn(tmp_path):
    stdout = run_script(tmp_path)
    assert "BLOCKED []" in stdout.splitlines(), stdout[-2000:]
    results, table = load(tmp_path / "run")
    meta = results["meta"]
    assert meta["backend"] == "jax" and meta["tiny"]
    assert meta["tensorflow_imported"] is False
    assert "tiny smoke run: not performance" in table
    protocol = FinetuneConfig()

    # Timing: every (mode, p, N), each with a warm epoch time and its runs per hour.
    timing = results["timing"]
    assert [(c["mode"], c["p"], c["parallel"]) for c in timing] == [
        (mode, p, n) for mode in ("frozen", "unfrozen") for p in (0.1, 1.0)
        for n in (1, 3)
    ]  # fmt: skip
    for case in timing:
        assert case["status"] == "ok", case
        assert case["steps"] == math.ceil(case["n"] / protocol.batch_size)
        assert case["epoch_s"] > 0 and case["host_s"] >= 0
        # 2 epochs: the first compiles, one warm epoch is timed.
        assert len(case["epoch_seconds"]) == 2 and case["epochs_timed"] == 1
        per_run = case["host_s"] + protocol.max_epochs * case["epoch_s"]
        assert case["runs_per_hour_100"] == pytest.approx(
            3600 * case["parallel"] / per_run, rel=1e-9
        )

    # The end-to-end quick grid: every network run, each stopped by the protocol.
    grid = results["grid"]
    assert grid["status"] == "ok", grid
    for mode, kinds in (("unfrozen", 4), ("frozen", 3)):
        part = grid["modes"][mode]
        assert part["runs"] == part["runs_done"] == 7 * 3 * kinds
        assert all(1 <= run["epochs"] <= protocol.max_epochs for run in part["done"])
    stops = results["stops"]
    assert [(s["mode"], s["p"]) for s in stops] == [("unfrozen", 0.5), ("frozen", 0.5)]
    for stop in stops:
        assert stop["status"] == "ok" and stop["censored"] == 0, stop
        for epochs, best in zip(stop["epochs"], stop["best_epochs"]):
            # Early stopping: `patience` epochs after the best one, or the cap.
            assert epochs == min(best + protocol.patience, protocol.max_epochs)

    # The projection of the paper grid: 99 fractions x 5 repeats x 7 kinds.
    projection = results["projection"]
    assert len(results["sizes"]) == len(FULL_FRACTIONS)
    for mode, kinds in (("unfrozen", 4), ("frozen", 3)):
        rows = projection["full"][mode]
        assert [r["parallel"] for r in rows] == [1, 3]
        for row in rows:
            assert row["runs"] == 99 * 5 * kinds
            assert row["calls"] == math.ceil(row["runs"] / row["parallel"])
            # Measured epochs (at most 100) never cost more than the bound.
            assert 0 < row["measured_s"] <= row["bound_s"] * (1 + 1e-9)
    summary = projection["full"]["summary"]
    assert summary["bound_best_s"] <= summary["bound_one_at_a_time_s"]
    for heading in ("## Epoch time", "## Step-count model", "## Full grid of one "
                    "setting, projected", "## quick grid, trained end to end"):  # fmt: skip
        assert heading in table

    spent, table = load(tmp_path / "spent")
    # A spent budget: every case recorded as skipped, nothing projected.
    records = spent["timing"] + spent["stops"]
    assert len(records) == 10 and {r["status"] for r in records} == {"skipped"}
    assert spent["projection"]["full"] == {"summary": {}}
    assert "## Not measured" in table


def test_step_count_model(scale):
    # An epoch model recovered from exact points, and refused to go negative.
    assert scale.fit_epoch_model([(5, 0.6), (11, 1.2), (33, 3.4)]) == pytest.approx(
        (0.1, 0.1)
    )
    a, b = scale.fit_epoch_model([(10, 1.0), (20, 1.0), (30, 0.5)])
    assert a >= 0 and b >= 0
    # Two fractions of 10 and 17 samples, 2 repeats, frozen (3 kinds): 12 runs.
    costs = scale.Costs(a=0.5, b=0.1, host_s=2.0)
    sizes = {0.1: 10, 0.2: 17}
    one = scale.project_grid(
        sizes, 2, "frozen", 1, costs, batch=8, max_epochs=100
    )  # fmt: skip
    assert one["runs"] == one["calls"] == 12
    # One at a time: 6 runs of 2 steps and 6 of 3, each host time + 100 epochs.
    assert one["seconds"] == pytest.approx(6 * (2 + 100 * 0.7) + 6 * (2 + 100 * 0.8))
    stacked = scale.project_grid(
        sizes, 2, "frozen", 5, costs, batch=8, max_epochs=100,
        measured={0.1: [40, 60], 0.2: [50, 70]},
    )  # fmt: skip
    # Calls of 5 runs in order of p: [0.1 x5], [0.1, 0.2 x4], [0.2 x2]; a call lasts
    # its longest run (the nearest measured fraction's longest) at its largest subset.
    assert stacked["calls"] == 3
    expected = (2 + 60 * 0.7) + (2 + 70 * 0.8) + (2 + 70 * 0.8)
    assert stacked["seconds"] == pytest.approx(expected)
    # One run at a time lasts the mean of the measured epochs.
    assert scale.run_epochs({0.1: [40, 60]}, 0.12, 1, 100) == 50
    assert scale.run_epochs(None, 0.12, 4, 100) == 100


def test_synthetic_tcga_has_the_papers_splits(scale):
    ft = scale.import_finetuning()
    data = scale.synthetic_tcga(ft, n_genes=64, markers=16)
    assert (len(data.train.y), len(data.val.y), len(data.test.y)) == (875, 154, 1029)
    assert data.n_genes == 64 and len(data.classes) == 33
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == np.float32 and split.x.shape[1] == 64
        assert set(np.unique(split.y)) <= set(range(33))
    # Every class reaches the training split, and the largest is about 30 x the smallest.
    counts = np.bincount(data.train.y, minlength=33)
    assert counts.min() >= 1 and 15 < counts.max() / counts.min() < 60
    again = scale.synthetic_tcga(ft, n_genes=64, markers=16)
    np.testing.assert_array_equal(again.test.x, data.test.x)
    # n(p): at least one sample per class at small p; the whole split at p = 1.
    sizes = scale.subset_sizes(ft, data.train.y, FULL_FRACTIONS)
    assert sizes[0.02] == 33 and sizes[1.0] == 875
    assert all(a <= b for a, b in zip(list(sizes.values()), list(sizes.values())[1:]))
    with pytest.raises(ValueError, match="at least 33 samples"):
        scale.synthetic_tcga(
            ft, n_genes=64, splits={"train": 10, "val": 40, "test": 40}
        )
