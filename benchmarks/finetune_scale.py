"""Fine-tuning at paper scale: runs per hour, stacked runs, and the full grid projected.

Usage (either Keras backend; `KERAS_BACKEND=jax` for JAX):

    python benchmarks/finetune_scale.py --out results/finetune-scale          # ~9 min, CPU
    KERAS_BACKEND=jax python benchmarks/finetune_scale.py --out results/finetune-scale-jax
    bash benchmarks/gpu/run.sh      # on the GPU machine: JAX, no TensorFlow (its 2nd step)
    python benchmarks/finetune_scale.py --tiny --out /tmp/ft-scale           # smoke run

The data are a TCGA-sized synthetic fine-tuning set generated in NumPy (`synthetic_tcga`):
20,000 genes, 33 classes with a 30:1 imbalance, and the paper's split sizes
(docs/protocol.md, "Splits": a fine-tuning set of 1,029 samples, of which 15%, 154,
validate, so 875 train; a test set of 1,029). Each class shifts 4,000 marker genes of
its own on top of N(0, 1) noise, and 10% of the samples carry another class's label, so
that runs learn (the baseline reaches about 0.6 test accuracy at p = 0.02 and 0.87 at
p = 0.3), then overfit their subset and stop early, as on real data.

What is measured, in one process (`finetune_scale.json` and `finetune_scale.md` in
`--out`, rewritten after every case):

- **Epoch time** of N runs trained at once, for each mode (`unfrozen`: encoder and head;
  `frozen`: the head on precomputed embeddings), label fraction p and N: N = 1 is
  `Finetuner.run`, one run at a time; N > 1 is `StackedFinetuner` with N jobs of the
  same fraction (the grid's repeats x methods: the baseline and three stand-in
  pre-trained encoders unfrozen, the three encoders frozen; repeats beyond the
  protocol's 5 where N asks for more). Every case trains `--max-epochs` epochs (no
  early stopping within them) and the time per epoch is the median of the epochs
  after the first, so the figures do not depend on that cap. Also recorded: the
  host-side time of a call outside its epochs (initial weights, embeddings, scoring)
  and the compilation (the first epoch of a new shape, minus a warm one).
- **Epochs per run** under the protocol (at most 100 epochs, patience 30 on the
  validation loss) at `--stop-fractions`, trained to their early stop: the measured
  distribution. Where it was not measured, the projection uses 100, the upper bound.
- **The quick preset end to end** (`--grid quick`: 7 fractions x 3 repeats x 7 kinds of
  network run, stacked by mode at the best N), if the budget allows; its runs' epochs
  join the measured distribution.

Cases run in priority order, so that a short budget still measures what the projection
needs most: frozen timing, unfrozen timing at N <= 8, the epochs per run at the
smallest stop fraction, unfrozen timing at N > 8, the quick grid, the other epochs. A
case is skipped when the time it is predicted to take (from the cases measured before
it, at 100 epochs for runs trained to their stop) exceeds what is left of `--budget`.

The step-count model of the grid: at fraction p a run trains on n(p) samples (the size
of `stratified_subset`, at least one per class), ceil(n(p) / 8) steps per epoch. Per
mode and N, the epoch time is fitted as `a + b x steps` over the measured fractions (a:
the validation pass and per-call work; b: one stacked step). The paper's grid of one
setting is 99 fractions x 5 repeats x 7 kinds = 3,465 runs: 1,980 unfrozen (baseline,
SCARF, VIME, BYOL) and 1,485 frozen (the three methods); logistic regression is not
counted. A mode's runs are sorted by p and stacked N at a time; a call costs its
host-side time plus its longest run's epochs times the epoch time at its largest subset.
Summed over calls, this gives the projected wall time at N = 1 and at the best N.

Early stopping makes run lengths data-dependent; stand-in pre-trained encoders are
random networks (the timing does not depend on their weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from keras_ssrl.config import (  # noqa: E402
    FULL_FRACTIONS,
    FULL_REPEATS,
    QUICK_FRACTIONS,
    QUICK_REPEATS,
    EncoderConfig,
    FinetuneConfig,
)

MODES = ("unfrozen", "frozen")
# Kinds of network run per (p, repeat): unfrozen, the baseline and the three methods;
# frozen, the three methods (the protocol has no frozen baseline).
METHODS = ("scarf", "vime", "byol")
KINDS = {"unfrozen": ("baseline", *METHODS), "frozen": METHODS}
# What the GPU step is judged against (reported, never asserted).
TARGET_GRID_S = 20 * 60
# The paper's TCGA fine-tuning set: 1,029 samples, 15% of them validation; the test
# set has the same size.
TCGA_SPLITS = {"train": 875, "val": 154, "test": 1029}
OUTPUTS = ("finetune_scale.json", "finetune_scale.md")


# --------------------------------------------------------------------------- imports


def import_finetuning():
    """The fine-tuning modules, importable on a machine with only JAX and Keras.

    The GPU image has neither pandas nor scikit-learn. The package `__init__` of
    `keras_ssrl.data` imports the converter and that of `keras_ssrl.finetuning` the run
    writer, which need pandas; the modules used here do not. Where pandas is missing,
    the two packages are registered without running their `__init__`, so that only the
    submodules imported below load. Where scikit-learn is missing, runs are scored by
    a NumPy accuracy instead of `classification_metrics` (scoring is a small part of a
    run's time either way).

    Returns:
        A namespace with `FinetuneData`, `LabelledSplit`, `Manifest`, `Finetuner`,
        `StackedFinetuner`, `Job`, `build_encoder`, `stratified_subset` and
        `subset_seed`.
    """
    import keras_ssrl

    try:
        import pandas  # noqa: F401
    except ImportError:
        root = os.path.dirname(keras_ssrl.__file__)
        for package in ("keras_ssrl.data", "keras_ssrl.finetuning"):
            if package not in sys.modules:
                module = types.ModuleType(package)
                module.__path__ = [os.path.join(root, package.split(".")[1])]
                sys.modules[package] = module
    data = importlib.import_module("keras_ssrl.finetuning.data")
    trainer = importlib.import_module("keras_ssrl.finetuning.trainer")
    stacked = importlib.import_module("keras_ssrl.finetuning.stacked")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        trainer.classification_metrics = accuracy_only
        stacked.classification_metrics = accuracy_only
    return types.SimpleNamespace(
        FinetuneData=data.FinetuneData,
        LabelledSplit=data.LabelledSplit,
        Manifest=importlib.import_module("keras_ssrl.data.manifest").Manifest,
        Finetuner=trainer.Finetuner,
        StackedFinetuner=stacked.StackedFinetuner,
        Job=stacked.Job,
        build_encoder=importlib.import_module("keras_ssrl.encoders").build_encoder,
        stratified_subset=data.stratified_subset,
        subset_seed=data.subset_seed,
    )


def accuracy_only(y_true, y_pred, n_classes: int) -> dict:
    """The accuracy of a run's test predictions (where scikit-learn is missing)."""
    del n_classes  # the signature of `classification_metrics`
    return {"accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))}


# ------------------------------------------------------------------------------ data


def class_sizes(total: int, classes: int, imbalance: float) -> np.ndarray:
    """`total` samples over `classes`, geometric from `imbalance` : 1, at least 1 each."""
    from keras_ssrl.data.splits import allocate

    weights = np.geomspace(imbalance, 1.0, classes)
    counts = np.maximum(np.round(weights / weights.sum() * 100_000), 1)
    return allocate(counts.astype(np.int64), total, minimum=1)


def synthetic_tcga(
    ft,
    n_genes: int = 20_000,
    n_classes: int = 33,
    splits: dict[str, int] | None = None,
    *,
    imbalance: float = 30.0,
    markers: int = 4000,
    shift: float = 1.2,
    mislabelled: float = 0.1,
    seed: int = 0,
):
    """A labelled fine-tuning set in memory: class-structured Gaussian values.

    Each class raises or lowers `markers` genes of its own (shifts drawn from
    N(0, shift)); every value has N(0, 1) noise, as standardised expression has. Each
    split holds every class, in proportion to the class sizes (geometric, largest
    `imbalance` times the smallest, as TCGA's cancer types range from about 1,100 to
    36 samples).

    Args:
        ft: the namespace of `import_finetuning()`.
        n_genes, n_classes: the matrix's width and the number of labels.
        splits: samples of the `train`, `val` and `test` splits (TCGA's by default).
        imbalance, markers, shift: the class structure.
        seed: the generator's seed.

    Returns:
        A `FinetuneData` (values float32, labels int32).
    """
    splits = dict(TCGA_SPLITS if splits is None else splits)
    if set(splits) != set(TCGA_SPLITS) or min(splits.values()) < n_classes:
        raise ValueError(
            f"splits must give train, val and test at least {n_classes} samples each "
            f"(one per class), got {splits}"
        )
    rng = np.random.default_rng(seed)
    means = np.zeros((n_classes, n_genes), np.float32)
    for c in range(n_classes):
        genes = rng.choice(n_genes, size=min(markers, n_genes), replace=False)
        means[c, genes] = rng.normal(0.0, shift, len(genes))
    parts = []
    for name in ("train", "val", "test"):
        y = np.repeat(
            np.arange(n_classes), class_sizes(splits[name], n_classes, imbalance)
        )
        y = rng.permutation(y).astype(np.int32)
        x = rng.standard_normal((len(y), n_genes), dtype=np.float32)
        x += means[y]
        # Samples whose label is not their profile's class: what makes runs overfit
        # their training subset, so that the validation loss turns and runs stop.
        wrong = rng.random(len(y)) < mislabelled
        y[wrong] = (y[wrong] + rng.integers(1, n_classes, int(wrong.sum()))) % n_classes
        parts.append(ft.LabelledSplit(x, y, [f"{name}-{i}" for i in range(len(y))]))
    labels = [f"class-{c:02d}" for c in range(n_classes)]
    manifest = ft.Manifest("synthetic-tcga", {"n_genes": n_genes, "labels": labels})
    return ft.FinetuneData("synthetic-tcga", manifest, *parts)


def stand_in_encoders(ft, n_genes: int, encoder: EncoderConfig, count: int, seed: int):
    """`count` sets of encoder weights in `build_encoder`'s order, drawn with NumPy.

    Stand-ins for pre-trained encoders: what a run costs does not depend on the values.
    """
    variables = ft.build_encoder(n_genes, encoder.layers, encoder.width).weights
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(count):
        weights = []
        for variable in variables:
            shape, name = tuple(variable.shape), variable.path.rsplit("/", 1)[-1]
            if name == "kernel":
                value = rng.normal(0.0, 1.0 / math.sqrt(shape[0]), shape)
            elif name in ("gamma", "moving_variance"):
                value = rng.uniform(0.8, 1.2, shape)
            else:  # bias, beta, moving_mean
                value = rng.normal(0.0, 0.1, shape)
            weights.append(value.astype(np.float32))
        sets.append(weights)
    return sets


def jobs_at(ft, data, p: float, runs: int, mode: str, encoders, seed: int = 0) -> list:
    """`runs` jobs at fraction `p`: the mode's kinds, then the next repeat, and so on.

    Kinds of one repeat share its subset and seed, as the protocol's methods do.
    """
    kinds = KINDS[mode]
    jobs = []
    for i in range(runs):
        kind, repeat = kinds[i % len(kinds)], i // len(kinds)
        run_seed = ft.subset_seed(seed, p, repeat)
        subset = ft.stratified_subset(data.train.y, p, run_seed)
        if kind == "baseline":
            weights, key = None, None
        else:
            weights, key = encoders[METHODS.index(kind)], kind
        jobs.append(ft.Job(subset, run_seed, weights, encoder_key=key))
    return jobs


def subset_sizes(ft, labels: np.ndarray, fractions, seed: int = 0) -> dict[float, int]:
    """n(p): the size of the stratified subset at each fraction (seed-independent)."""
    return {p: len(ft.stratified_subset(labels, p, seed)) for p in fractions}


# ---------------------------------------------------------------------------- timing


class Stamps:
    """Wall-clock times of a run's epochs: a `log` callback of `Finetuner.run`."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, line: str) -> None:
        del line
        self.times.append(time.perf_counter())


def warm_epoch_s(epoch_seconds: list[float]) -> float:
    """The time of an epoch once compiled: the median of the epochs after the first."""
    if len(epoch_seconds) < 2:
        raise ValueError("an epoch time needs at least 2 epochs (the first compiles)")
    return statistics.median(epoch_seconds[1:])


def time_one_at_a_time(tuner, data, jobs) -> dict:
    """`Finetuner.run` on two jobs in turn: epoch time, host time, compilation.

    The tuner's `max_epochs` equals its patience, so both runs train every epoch. The
    first run compiles (a new subset size may need it) and, frozen, embeds the splits:
    `compile_s` is its extra time over the second, warm, run.
    """
    totals, epochs = [], []
    for job in jobs[:2]:
        stamps = Stamps()
        started = time.perf_counter()
        tuner.run(
            data, job.subset, job.seed, job.encoder_weights,
            encoder_key=job.encoder_key, log=stamps,
        )  # fmt: skip
        totals.append(time.perf_counter() - started)
        epochs.append(np.diff([started, *stamps.times]).tolist())
    epoch_s = warm_epoch_s(epochs[1])
    host_s = max(totals[1] - len(epochs[1]) * epoch_s, 0.0)
    return {
        "epoch_s": epoch_s,
        "host_s": host_s,
        "compile_s": max(totals[0] - totals[1], 0.0),
        "epochs_timed": len(epochs[1]) - 1,
        "epoch_seconds": epochs[1],
    }


def time_stacked(tuner, data, jobs, epochs: int, deadline: float) -> dict:
    """`epochs` epochs of `StackedFinetuner` on `jobs` (fewer if `deadline` comes).

    The protocol's patience (30) is longer than the epochs timed: every run trains.
    """
    started = time.perf_counter()
    runs = tuner.start(data, jobs)
    host_s = time.perf_counter() - started
    seconds = []
    while len(seconds) < epochs:
        begun = time.perf_counter()
        runs.epoch()
        seconds.append(time.perf_counter() - begun)
        if len(seconds) >= 2 and time.monotonic() + seconds[-1] > deadline:
            break
    if int(runs.active.sum()) != len(jobs):
        raise RuntimeError("a run stopped early while being timed; time fewer epochs")
    begun = time.perf_counter()
    runs.results()
    host_s += time.perf_counter() - begun
    epoch_s = warm_epoch_s(seconds)
    return {
        "epoch_s": epoch_s,
        "host_s": host_s,
        "compile_s": max(seconds[0] - epoch_s, 0.0),
        "epochs_timed": len(seconds) - 1,
        "epoch_seconds": seconds,
    }


def train_to_stop(tuner, data, jobs, deadline: float) -> dict:
    """The protocol's runs to their early stop, stacked: their epochs and accuracy.

    Runs still training at `deadline` are reported as censored (their epochs so far).
    """
    started = time.perf_counter()
    runs = tuner.start(data, jobs)
    while runs.epoch():
        if time.monotonic() > deadline:
            break
    censored = int(runs.active.sum())
    results = runs.results()
    return {
        "epochs": [r.epochs for r in results],
        "best_epochs": [r.best_epoch for r in results],
        "accuracy": [r.metrics["accuracy"] for r in results],
        "censored": censored,
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------- the step-count model


def steps_per_epoch(n: int, batch: int) -> int:
    return math.ceil(n / batch)


def fit_epoch_model(points: list[tuple[int, float]]) -> tuple[float, float]:
    """`(a, b)` of epoch seconds = a + b x steps, least squares with a, b >= 0.

    One point (or a negative intercept from noise) gives a line through the origin.
    """
    steps = np.array([s for s, _ in points], float)
    seconds = np.array([t for _, t in points], float)
    if len(set(steps.tolist())) >= 2:
        b, a = np.polyfit(steps, seconds, 1)
        if a >= 0 and b >= 0:
            return float(a), float(b)
    return 0.0, float(np.sum(steps * seconds) / np.sum(steps * steps))


class Costs(NamedTuple):
    """What one mode costs at one N: `epoch_s = a + b x steps`, host time per call."""

    a: float
    b: float
    host_s: float

    def epoch_s(self, steps: int) -> float:
        return self.a + self.b * steps


def epochs_table(stops: list[dict], grid: dict | None) -> dict[str, dict]:
    """Measured epochs per run, by mode and fraction: the early-stop cases that ran to
    the end, and the runs of the end-to-end grid."""
    table: dict[str, dict[float, list[int]]] = {}
    for case in stops:
        if case.get("status") == "ok" and not case["censored"]:
            table.setdefault(case["mode"], {}).setdefault(case["p"], []).extend(
                case["epochs"]
            )
    if grid and grid.get("status") == "ok":
        for mode, part in grid["modes"].items():
            for run in part["done"]:
                table.setdefault(mode, {}).setdefault(run["p"], []).append(
                    run["epochs"]
                )
    return table


def run_epochs(measured: dict[float, list[int]] | None, p: float, runs: int, cap: int):
    """Epochs of a call of `runs` runs at fraction `p`: the mean (one run) or the
    longest (a stacked call lasts as long as its longest run), from the measured
    fraction nearest `p`; `cap` (max_epochs, the upper bound) where none was measured.
    """
    if not measured:
        return cap
    nearest = min(measured, key=lambda q: abs(q - p))
    epochs = measured[nearest]
    return float(np.mean(epochs)) if runs == 1 else float(max(epochs))


def project_grid(
    sizes: dict[float, int],
    repeats: int,
    mode: str,
    parallel: int,
    costs: Costs,
    *,
    batch: int,
    max_epochs: int,
    measured: dict[float, list[int]] | None = None,
) -> dict:
    """Projected wall time of one mode's runs of a grid, stacked `parallel` at a time.

    Args:
        sizes: n(p) for every fraction of the grid.
        repeats: repeats per (kind, p).
        mode: `unfrozen` or `frozen` (its number of kinds).
        parallel: N, the runs per call, in order of p.
        costs: the fitted epoch time and host time per call at this N.
        batch, max_epochs: the protocol's.
        measured: measured epochs per run by fraction, or None (every run lasts
            `max_epochs`).

    Returns:
        `seconds`, `runs`, `calls`, `epochs` (summed over calls) and `run_steps`
        (steps summed over runs and epochs).
    """
    runs = sorted(p for p in sizes for _ in range(repeats * len(KINDS[mode])))
    seconds = epochs_total = run_steps = 0.0
    calls = 0
    for start in range(0, len(runs), parallel):
        chunk = runs[start : start + parallel]
        steps = steps_per_epoch(sizes[chunk[-1]], batch)
        epochs = max(run_epochs(measured, p, len(chunk), max_epochs) for p in chunk)
        seconds += costs.host_s + epochs * costs.epoch_s(steps)
        epochs_total += epochs
        run_steps += len(chunk) * epochs * steps
        calls += 1
    return {
        "seconds": seconds,
        "runs": len(runs),
        "calls": calls,
        "epochs": epochs_total,
        "run_steps": run_steps,
    }


def fitted_costs(cases: list[dict]) -> dict[str, dict[int, Costs]]:
    """`Costs` per mode and N from the timed cases that succeeded."""
    points: dict[tuple[str, int], list] = {}
    for case in cases:
        if case.get("status") == "ok":
            points.setdefault((case["mode"], case["parallel"]), []).append(case)
    costs: dict[str, dict[int, Costs]] = {}
    for (mode, parallel), rows in sorted(points.items()):
        a, b = fit_epoch_model([(r["steps"], r["epoch_s"]) for r in rows])
        host = float(np.mean([r["host_s"] for r in rows]))
        costs.setdefault(mode, {})[parallel] = Costs(a, b, host)
    return costs


def projections(results: dict, args) -> dict:
    """The full and quick grids at every measured N, the best N, and the totals."""
    costs = fitted_costs(results["timing"])
    measured = epochs_table(results["stops"], results["grid"])
    sizes = {float(k): v for k, v in results["sizes"].items()}
    quick_sizes = {p: sizes[p] for p in QUICK_FRACTIONS}
    out: dict = {"models": [], "full": {}, "quick": {}, "epochs_measured": {}}
    for mode, fractions in measured.items():
        out["epochs_measured"][mode] = sorted(fractions)
    for grid, grid_sizes, repeats in (
        ("full", sizes, args.grid_repeats),
        ("quick", quick_sizes, QUICK_REPEATS),
    ):
        for mode, by_n in costs.items():
            rows = []
            for parallel, cost in sorted(by_n.items()):
                row = {"mode": mode, "parallel": parallel}
                for label, epochs in (
                    ("bound", None),
                    ("measured", measured.get(mode)),
                ):
                    if label == "measured" and not epochs:
                        continue
                    projected = project_grid(
                        grid_sizes, repeats, mode, parallel, cost,
                        batch=args.batch, max_epochs=args.protocol_max_epochs,
                        measured=epochs,
                    )  # fmt: skip
                    row[f"{label}_s"] = projected["seconds"]
                    row.update(runs=projected["runs"], calls=projected["calls"])
                rows.append(row)
            out[grid][mode] = rows
    for mode, by_n in costs.items():
        for parallel, cost in sorted(by_n.items()):
            out["models"].append({"mode": mode, "parallel": parallel, **cost._asdict()})
    for grid in ("full", "quick"):
        summary = {}
        for label in ("bound", "measured"):
            one = best = 0.0
            complete = set(out[grid]) == set(MODES)
            for mode in MODES:
                rows = [r for r in out[grid].get(mode, []) if f"{label}_s" in r]
                single = [r for r in rows if r["parallel"] == 1]
                if not rows or not single:
                    complete = False
                    continue
                one += single[0][f"{label}_s"]
                fastest = min(rows, key=lambda r: r[f"{label}_s"])
                best += fastest[f"{label}_s"]
                summary.setdefault("best_parallel", {})[f"{label}:{mode}"] = fastest[
                    "parallel"
                ]
            if complete:
                summary[f"{label}_one_at_a_time_s"] = one
                summary[f"{label}_best_s"] = best
        out[grid]["summary"] = summary
    return out


# --------------------------------------------------------------------- a whole grid


def run_grid(
    ft, data, tuners, encoders, fractions, repeats, parallel, deadline, costs
) -> dict:
    """A grid trained end to end under the protocol, stacked `parallel[mode]` at a time.

    A mode's runs go in order of p, N per call. A call starts only if, at the fitted
    `costs` and 100 epochs, it would end before `deadline`.

    Returns:
        Per mode: N, the runs, the runs done, the wall time and each run's p, epochs
        and test accuracy.
    """
    out = {}
    for mode in MODES:
        jobs = [
            (p, job)
            for p in fractions
            for job in jobs_at(ft, data, p, repeats * len(KINDS[mode]), mode, encoders)
        ]
        n = parallel[mode]
        cost = costs.get(mode, {}).get(n)
        started = time.perf_counter()
        done: list[dict] = []
        for begin in range(0, len(jobs), n):
            chunk = jobs[begin : begin + n]
            steps = steps_per_epoch(max(len(j.subset) for _, j in chunk), 8)
            worst = 0.0 if cost is None else cost.host_s + 100 * cost.epoch_s(steps)
            if time.monotonic() + worst > deadline:
                break
            if n == 1:
                job = chunk[0][1]
                results = [
                    tuners["one"][mode].run(
                        data, job.subset, job.seed, job.encoder_weights,
                        encoder_key=job.encoder_key,
                    )
                ]  # fmt: skip
            else:
                results = tuners["stacked"][mode].run_many(data, [j for _, j in chunk])
            for (p, _), result in zip(chunk, results):
                done.append(
                    {"p": p, "epochs": result.epochs,
                     "accuracy": result.metrics["accuracy"]}
                )  # fmt: skip
        out[mode] = {
            "parallel": n,
            "runs": len(jobs),
            "runs_done": len(done),
            "wall_s": time.perf_counter() - started,
            "done": done,
        }
    return out


# ------------------------------------------------------------------------- reporting


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Fine-tuning at paper scale",
        "",
        f"{meta['date']}; backend {meta['backend']} on {meta['device']}; "
        f"{meta['cpu_cores']} CPU cores; {meta['genes']:,} genes, {meta['classes']} "
        f"classes, {meta['splits']['train']} / {meta['splits']['val']} / "
        f"{meta['splits']['test']} train / validation / test; encoder "
        f"{meta['encoder']}; batch {meta['batch']}; {meta['elapsed_s']:.0f} s.",
        "",
    ]
    if meta.get("tiny"):
        lines += ["**tiny smoke run: not performance.**", ""]
    lines += [
        f"## Epoch time (first {meta['max_epochs']} epochs of each case; the first "
        "compiles, the median of the others is kept)",
        "",
        "| mode | p | n | steps | N | epoch s | per run-epoch ms | host s / call "
        "| compile s | runs/h at 100 epochs | vs N = 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    single = {
        (c["mode"], c["p"]): c
        for c in results["timing"]
        if c.get("status") == "ok" and c["parallel"] == 1
    }
    for c in results["timing"]:
        if c.get("status") != "ok":
            continue
        base = single.get((c["mode"], c["p"]))
        ratio = c["runs_per_hour_100"] / base["runs_per_hour_100"] if base else None
        lines.append(
            f"| {c['mode']} | {c['p']:g} | {c['n']} | {c['steps']} | {c['parallel']} "
            f"| {c['epoch_s']:.3f} | {1000 * c['epoch_s'] / c['parallel']:.1f} "
            f"| {c['host_s']:.2f} | {c['compile_s']:.1f} "
            f"| {_num(c['runs_per_hour_100'])} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} |"
        )
    stops = [s for s in results["stops"] if s.get("status") == "ok"]
    if stops:
        lines += [
            "",
            "## Epochs per run under the protocol (at most 100, patience 30)",
            "",
            "| mode | p | runs | epochs mean [min, max] | best epoch mean | "
            "test accuracy mean | censored | wall |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for s in stops:
            lines.append(
                f"| {s['mode']} | {s['p']:g} | {len(s['epochs'])} | "
                f"{np.mean(s['epochs']):.1f} [{min(s['epochs'])}, {max(s['epochs'])}] "
                f"| {np.mean(s['best_epochs']):.1f} | {np.mean(s['accuracy']):.3f} "
                f"| {s['censored']} | {_duration(s['wall_s'])} |"
            )
    projection = results.get("projection") or {}
    sizes = results["sizes"]
    if sizes:
        batch = meta["batch"]
        steps = [steps_per_epoch(n, batch) for n in sizes.values()]
        shown = [p for p in ("0.02", "0.1", "0.3", "0.5", "1") if p in sizes]
        lines += [
            "",
            "## Step-count model",
            "",
            "n(p): "
            + ", ".join(f"{p}: {sizes[p]}" for p in shown)
            + f"; steps per epoch summed over the {len(sizes)} fractions: "
            f"{sum(steps):,} (one repeat of one kind).",
        ]
        models = projection.get("models", [])
        if models:
            lines += [
                "",
                "| mode | N | a, s | b, ms / step | host s / call |",
                "|---|---:|---:|---:|---:|",
            ]
            for m in models:
                lines.append(
                    f"| {m['mode']} | {m['parallel']} | {m['a']:.3f} | "
                    f"{1000 * m['b']:.2f} | {m['host_s']:.2f} |"
                )
    for grid, title in (
        ("full", "Full grid of one setting"),
        ("quick", "Quick preset"),
    ):
        part = projection.get(grid, {})
        rows = [r for mode in MODES for r in part.get(mode, [])]
        if not rows:
            continue
        measured = projection.get("epochs_measured", {})
        lines += [
            "",
            f"## {title}, projected",
            "",
            "`bound`: every run 100 epochs; `measured`: epochs of the measured "
            "fractions (" + "; ".join(f"{m} p = {', '.join(f'{p:g}' for p in ps)}"
                                      for m, ps in measured.items()) + ")."
            if measured else "`bound`: every run 100 epochs (none measured).",
            "",
            "| mode | N | runs | calls | bound | measured |",
            "|---|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in rows:
            lines.append(
                f"| {r['mode']} | {r['parallel']} | {r['runs']:,} | {r['calls']:,} | "
                f"{_duration(r.get('bound_s'))} | {_duration(r.get('measured_s'))} |"
            )
        summary = part.get("summary", {})
        for label in ("bound", "measured"):
            if f"{label}_best_s" in summary:
                best = summary["best_parallel"]
                lines.append(
                    f"\n**{label}**: one at a time "
                    f"{_duration(summary[f'{label}_one_at_a_time_s'])}; at the best N "
                    f"(unfrozen {best[f'{label}:unfrozen']}, frozen "
                    f"{best[f'{label}:frozen']}) {_duration(summary[f'{label}_best_s'])}"
                    + (
                        f" (target on a GPU < {_duration(TARGET_GRID_S)}: "
                        f"{'met' if summary[f'{label}_best_s'] < TARGET_GRID_S else 'not met'})"
                        if grid == "full" and meta["accelerator"]
                        else ""
                    )
                )
    grid = results.get("grid")
    if grid and grid.get("status") == "ok":
        lines += ["", f"## {grid['name']} grid, trained end to end", ""]
        lines += [
            "| mode | N | runs done | wall | epochs mean [min, max] | accuracy mean |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for mode in MODES:
            g = grid["modes"][mode]
            epochs = [d["epochs"] for d in g["done"]] or [0]
            accuracy = [d["accuracy"] for d in g["done"]] or [float("nan")]
            lines.append(
                f"| {mode} | {g['parallel']} | {g['runs_done']} / {g['runs']} | "
                f"{_duration(g['wall_s'])} | {np.mean(epochs):.1f} [{min(epochs)}, "
                f"{max(epochs)}] | {np.mean(accuracy):.3f} |"
            )
    failed = [
        c for part in ("timing", "stops") for c in results[part]
        if c.get("status") != "ok"
    ] + ([grid] if grid and grid.get("status") != "ok" else [])  # fmt: skip
    if failed:
        lines += ["", "## Not measured", ""]
        for c in failed:
            label = " ".join(
                f"{k}={c[k]}"
                for k in ("kind", "mode", "p", "parallel", "name")
                if k in c
            )
            lines.append(f"- {label}: {c.get('status')}: {c.get('error', '')}")
    return "\n".join(lines) + "\n"


def write(results: dict, out: str) -> None:
    """Writes the JSON and the Markdown into `out`, each atomically."""
    for name, text in zip(
        OUTPUTS, (json.dumps(results, indent=1, default=float), markdown(results))
    ):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- main


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and Markdown")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a smoke run: 200 genes, 5 classes, small splits, a 1 x 32 encoder",
    )
    parser.add_argument("--fractions", type=_floats, default=[0.02, 0.1, 0.3],
                        help="label fractions timed")  # fmt: skip
    parser.add_argument("--parallel", type=_ints, default=[1, 4, 8, 16, 35],
                        help="N, runs trained at once (1: Finetuner)")  # fmt: skip
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--max-epochs", type=int, default=3,
        help="epochs timed per case (the first compiles), >= 2",
    )  # fmt: skip
    parser.add_argument(
        "--stop-fractions", type=_floats, default=[0.02, 0.1, 0.3, 1.0],
        help="fractions where runs train to their early stop (epochs per run)",
    )  # fmt: skip
    parser.add_argument("--stop-runs", type=int, default=5,
                        help="runs (stacked) per early-stop case")  # fmt: skip
    parser.add_argument(
        "--grid", choices=("none", "quick"), default="none",
        help="also train a whole grid end to end (quick: 7 fractions x 3 repeats)",
    )  # fmt: skip
    parser.add_argument(
        "--grid-parallel", type=int, default=0,
        help="N of the end-to-end grid (0: the best N measured, per mode)",
    )  # fmt: skip
    parser.add_argument("--budget", type=float, default=540.0, help="whole run, s")
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=33)
    parser.add_argument("--n-train", type=int, default=TCGA_SPLITS["train"])
    parser.add_argument("--n-val", type=int, default=TCGA_SPLITS["val"])
    parser.add_argument("--n-test", type=int, default=TCGA_SPLITS["test"])
    parser.add_argument("--layers", type=int, default=EncoderConfig().layers)
    parser.add_argument("--width", type=int, default=EncoderConfig().width)
    args = parser.parse_args(argv)
    if args.tiny:
        args.genes, args.classes = 200, 5
        args.n_train, args.n_val, args.n_test = 60, 20, 40
        args.layers, args.width = 1, 32
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes: {unknown or 'none'}; choose from {', '.join(MODES)}")
    if args.max_epochs < 2:
        parser.error("--max-epochs must be >= 2: the first epoch compiles")
    for name in ("fractions", "stop_fractions"):
        bad = [p for p in getattr(args, name) if not 0 < p <= 1]
        if bad:
            parser.error(f"--{name.replace('_', '-')}: {bad} outside (0, 1]")
    if not args.parallel or min(args.parallel) < 1:
        parser.error("--parallel: give N >= 1, e.g. 1,4,8,16,35")
    protocol = FinetuneConfig()
    if args.max_epochs >= protocol.patience:
        parser.error(
            f"--max-epochs must be under the protocol's patience ({protocol.patience}),"
            " so that no timed run stops early"
        )
    args.batch, args.protocol_max_epochs = protocol.batch_size, protocol.max_epochs
    args.grid_repeats = FULL_REPEATS
    return args


def device_name() -> tuple[str, bool]:
    """The device the runs train on, and whether it is an accelerator."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        devices = jax.devices()
        kinds = ", ".join(sorted({d.device_kind for d in devices}))
        return f"{kinds} x {len(devices)}", devices[0].platform != "cpu"
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return (f"GPU x {len(gpus)}", True) if gpus else ("CPU", False)


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras

    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.budget
    ft = import_finetuning()
    splits = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    data = synthetic_tcga(ft, args.genes, args.classes, splits)
    encoder = EncoderConfig(layers=args.layers, width=args.width)
    encoders = stand_in_encoders(ft, args.genes, encoder, len(METHODS), seed=1)
    protocol = FinetuneConfig()
    timing = dataclasses.replace(
        protocol, max_epochs=args.max_epochs, patience=args.max_epochs
    )
    shape = (args.genes, args.classes, encoder)
    tuners = {
        "one": {m: ft.Finetuner(*shape, m, timing) for m in args.modes},
        "one_protocol": {},
        "stacked": {m: ft.StackedFinetuner(*shape, m, protocol) for m in args.modes},
    }
    device, accelerator = device_name()
    results = {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "backend": keras.backend.backend(),
            "device": device,
            "accelerator": accelerator,
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
            "keras": keras.__version__,
            "numpy": np.__version__,
            "genes": args.genes,
            "classes": args.classes,
            "splits": splits,
            "encoder": f"{encoder.layers} x {encoder.width}",
            "batch": args.batch,
            "max_epochs": args.max_epochs,
            "tiny": args.tiny,
            "args": {k: v for k, v in vars(args).items()},
            "elapsed_s": 0.0,
        },
        "sizes": {
            f"{p:g}": n
            for p, n in subset_sizes(ft, data.train.y, FULL_FRACTIONS).items()
        },
        "timing": [],
        "stops": [],
        "grid": None,
        "projection": None,
    }

    def finish(record: dict) -> None:
        results["projection"] = projections(results, args)
        results["meta"]["elapsed_s"] = time.monotonic() - started
        results["meta"]["tensorflow_imported"] = "tensorflow" in sys.modules
        write(results, args.out)
        shown = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
        print(json.dumps(shown, default=str), flush=True)

    def guarded(record: dict, predicted_s: float | None, measure) -> None:
        """Runs one case unless its predicted time exceeds what is left; records it."""
        left = deadline - time.monotonic()
        if left <= 0:
            record.update(status="skipped", error="the run's time budget was spent")
        elif predicted_s is not None and predicted_s > left:
            record.update(
                status="skipped",
                error=f"predicted {predicted_s:.0f} s, {left:.0f} s left",
            )
        else:
            begun = time.monotonic()
            try:
                record.update(measure())
                record["status"] = "ok"
            except Exception as error:  # noqa: BLE001 -- any failure is a result
                record.update(status="error", error=f"{type(error).__name__}: {error}")
                traceback.print_exc()
            record["wall_s"] = time.monotonic() - begun
        finish(record)

    def predicted_epoch_s(mode: str, parallel: int, steps: int) -> float | None:
        """An epoch's time from the costliest run-step measured so far in `mode`."""
        rates = [
            c["epoch_s"] / (c["parallel"] * (c["steps"] + 1))
            for c in results["timing"]
            if c.get("status") == "ok" and c["mode"] == mode
        ]
        return max(rates) * parallel * (steps + 1) if rates else None

    def timing_case(mode: str, p: float, parallel: int) -> None:
        n = len(ft.stratified_subset(data.train.y, p, 0))
        steps = steps_per_epoch(n, args.batch)
        record = {"kind": "timing", "mode": mode, "p": p, "n": n, "steps": steps,
                  "parallel": parallel}  # fmt: skip
        results["timing"].append(record)
        epoch = predicted_epoch_s(mode, parallel, steps)
        predicted = None if epoch is None else (args.max_epochs + 2) * epoch

        def measure():
            if parallel == 1:
                # One kind, two repeats: the first run compiles (and, frozen, embeds
                # the splits), the second is warm.
                kinds = len(KINDS[mode])
                jobs = jobs_at(ft, data, p, kinds + 1, mode, encoders)
                out = time_one_at_a_time(
                    tuners["one"][mode], data, [jobs[0], jobs[kinds]]
                )
            else:
                jobs = jobs_at(ft, data, p, parallel, mode, encoders)
                out = time_stacked(
                    tuners["stacked"][mode], data, jobs, args.max_epochs, deadline
                )
            per_run = out["host_s"] + protocol.max_epochs * out["epoch_s"]
            out["runs_per_hour_100"] = 3600.0 * parallel / per_run
            return out

        guarded(record, predicted, measure)

    def stop_case(mode: str, p: float) -> None:
        runs = args.stop_runs
        n = len(ft.stratified_subset(data.train.y, p, 0))
        by_n = fitted_costs(results["timing"]).get(mode, {})
        nearest = min(by_n, key=lambda k: abs(k - runs)) if by_n else None
        # Every run to the epoch cap, at the timed N nearest to `runs`.
        predicted = (
            None if nearest is None
            else by_n[nearest].host_s + protocol.max_epochs
            * by_n[nearest].epoch_s(steps_per_epoch(n, args.batch))
            * max(runs / nearest, 1.0)
        )  # fmt: skip
        record = {"kind": "stop", "mode": mode, "p": p, "n": n, "runs": runs}
        results["stops"].append(record)
        jobs = jobs_at(ft, data, p, runs, mode, encoders)
        guarded(
            record, predicted,
            lambda: train_to_stop(tuners["stacked"][mode], data, jobs, deadline),
        )  # fmt: skip

    def grid_case() -> None:
        # The N with the shortest projected paper grid, per mode, unless given.
        summary = projections(results, args)["full"].get("summary", {})
        chosen = summary.get("best_parallel", {})
        parallel = {
            m: args.grid_parallel or chosen.get(f"bound:{m}", 1) for m in args.modes
        }
        record = {"kind": "grid", "name": "quick", "parallel": parallel}
        results["grid"] = record
        if set(parallel) != set(MODES):
            record.update(status="skipped", error="the grid needs both --modes")
            finish(record)
            return
        for mode, n in parallel.items():
            if n == 1:
                tuners["one_protocol"][mode] = ft.Finetuner(*shape, mode, protocol)
        grid_tuners = {"one": tuners["one_protocol"], "stacked": tuners["stacked"]}
        guarded(
            record, None,
            lambda: {"modes": run_grid(
                ft, data, grid_tuners, encoders, QUICK_FRACTIONS, QUICK_REPEATS,
                parallel, deadline, fitted_costs(results["timing"]),
            )},
        )  # fmt: skip

    # Priority order, so that a short budget still measures what the projection needs
    # most: frozen runs (cheap), small stacks of unfrozen runs, the epochs per run at
    # the smallest stop fraction, large stacks, the end-to-end grid, the other epochs.
    parallel = sorted(args.parallel)
    stops = sorted(args.stop_fractions)
    modes = [m for m in ("frozen", "unfrozen") if m in args.modes]
    for mode in modes:
        small = parallel if mode == "frozen" else [n for n in parallel if n <= 8]
        for p in args.fractions:
            for n in small:
                timing_case(mode, p, n)
    for mode in args.modes:
        for p in stops[:1]:
            stop_case(mode, p)
    if "unfrozen" in args.modes:
        for p in args.fractions:
            for n in (n for n in parallel if n > 8):
                timing_case("unfrozen", p, n)
    if args.grid == "quick":
        grid_case()
    for p in stops[1:]:
        for mode in args.modes:
            stop_case(mode, p)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
