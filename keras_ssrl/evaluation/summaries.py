"""Summaries of a finished sweep: AUPC and gain tables, the pre-training-size table,
and their figures (docs/protocol.md, "Label efficiency and AUPC", "Architecture
sweep", "Pre-training size")."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from keras_ssrl.config import AUPC_RANGE
from keras_ssrl.evaluation.experiments import LOGREG, Experiment, aupc_fractions
from keras_ssrl.evaluation.results import load_experiment, results_name
from keras_ssrl.files import write_csv_atomic
from keras_ssrl.finetuning import BASELINE

# `gain_vs_baseline`, `ci_low` and `ci_high` are on the scale of `aupc_normalised` (a
# difference of mean accuracies); `gain_area_vs_baseline` is the same gain as an area,
# on the scale of `aupc`. `note` says when the grid does not span AUPC_RANGE.
GAIN_COLUMNS = ("architecture", "q", "method", "mode", "aupc", "aupc_normalised",
                "gain_vs_baseline", "ci_low", "ci_high", "gain_area_vs_baseline",
                "repeats", "note")  # fmt: skip

_LOG = logging.getLogger(__name__)


def results_frame(path: str):
    """A results table as a pandas DataFrame (modes and architectures as text)."""
    import pandas as pd

    return pd.read_csv(path, dtype={"mode": str, "architecture": str})


def accuracy_matrix(frame, fractions: Sequence[float], repeats: int) -> np.ndarray:
    """(P, R) accuracies of one method's rows; NaN where a run is missing."""
    out = np.full((len(fractions), repeats), np.nan)
    index = {round(p, 6): i for i, p in enumerate(fractions)}
    for p, r, a in zip(frame["p"], frame["repeat"], frame["accuracy"]):
        i = index.get(round(float(p), 6))
        if i is not None and int(r) < repeats:
            out[i, int(r)] = a
    return out


def _gain(acc: np.ndarray, base, fractions, repeats: int, n_boot: int) -> dict:
    """The gain of accuracies `acc` over the baseline's runs (empty if incomplete)."""
    from keras_ssrl.evaluation.aupc import paired_bootstrap_gain

    base_acc = accuracy_matrix(base, fractions, repeats)
    if np.isnan(base_acc).any():
        return {}
    stats = paired_bootstrap_gain(fractions, acc, base_acc, n_boot=n_boot)
    # Dividing by the interval's length puts the gain (and its interval: the same
    # linear map of every resample) on aupc_normalised's scale.
    span = AUPC_RANGE[1] - AUPC_RANGE[0]
    return {"gain_vs_baseline": stats["gain"] / span,
            "ci_low": stats["ci_low"] / span, "ci_high": stats["ci_high"] / span,
            "gain_area_vs_baseline": stats["gain"]}  # fmt: skip


def gain_table(frame, experiment: Experiment, n_boot: int = 2000):
    """AUPC per (architecture, q, method, mode) and its gain over the baseline.

    The baseline of a pre-trained method is the non-pre-trained model of the same
    architecture; logistic regression is compared with the baseline of the default
    architecture. `gain_vs_baseline` is the difference of the `aupc_normalised`
    values, with its paired bootstrap interval (`ci_low`, `ci_high`) on that scale;
    `gain_area_vs_baseline` the difference of the areas. Every row's `note` says
    when the grid leaves part of the AUPC interval out (empty otherwise).
    """
    import pandas as pd

    from keras_ssrl.evaluation.aupc import aupc, span_gap

    low, high = AUPC_RANGE
    fractions = aupc_fractions(experiment)
    note = span_gap(fractions) or ""
    rows = []
    groups = frame.groupby(["architecture", "q", "method", "mode"], sort=True)
    base_arch = f"{experiment.depths[0]}x{experiment.widths[0]}"
    for (arch, q, method, mode), group in groups:
        acc = accuracy_matrix(group, fractions, experiment.repeats)
        if np.isnan(acc).any():
            continue  # incomplete: reported once every run is there
        area = aupc(fractions, acc.mean(axis=1))
        row = {"architecture": arch, "q": q, "method": method, "mode": mode,
               "aupc": area, "aupc_normalised": area / (high - low),
               "repeats": experiment.repeats, "note": note}  # fmt: skip
        base = frame[
            (frame["method"] == BASELINE)
            & (frame["architecture"] == (base_arch if method == LOGREG else arch))
        ]
        if method != BASELINE and len(base):
            row.update(_gain(acc, base, fractions, experiment.repeats, n_boot))
        rows.append(row)
    return pd.DataFrame(rows, columns=list(GAIN_COLUMNS))


def pretrain_size_table(frame):
    """Mean, std and count of the accuracy per (method, q, p): Figure 5's points."""
    return (
        frame.groupby(["method", "q", "p"])["accuracy"]
        .agg(["mean", "std", "count"])
        .reset_index()
        .rename(columns={"mean": "accuracy", "std": "accuracy_std", "count": "runs"})
    )


def figure_title(experiment: Experiment) -> str:
    """What every figure of a sweep names: its setting and its repeats."""
    repeats = experiment.repeats
    return f"{experiment.setting}, {repeats} repeat{'' if repeats == 1 else 's'}"


def summarize(out_dir: str, log=print) -> list[str]:
    """Writes the experiment's tables and figures from `results.csv`; returns paths.

    A grid that leaves part of the AUPC interval out is warned on the log (stderr)
    as well as in the table's `note`.
    """
    from keras_ssrl.evaluation import plots
    from keras_ssrl.evaluation.aupc import span_gap

    experiment = load_experiment(out_dir)
    frame = results_frame(os.path.join(out_dir, results_name(None)))
    title = figure_title(experiment)
    if experiment.kind in ("label-efficiency", "architectures"):
        gap = span_gap(aupc_fractions(experiment))
        if gap:
            _LOG.warning("%s: %s", out_dir, gap)
    if experiment.kind == "label-efficiency":
        table = os.path.join(out_dir, "aupc.csv")
        write_csv_atomic(gain_table(frame, experiment), table)
        figure = os.path.join(out_dir, "label_efficiency.png")
        plots.label_efficiency(frame, figure, title=title)
    elif experiment.kind == "architectures":
        gains = gain_table(frame, experiment)
        table = os.path.join(out_dir, "architectures.csv")
        write_csv_atomic(gains, table)
        figure = os.path.join(out_dir, "architectures.png")
        plots.architectures(gains, figure, title=title)
    else:  # pretrain-size
        sizes = pretrain_size_table(frame)
        table = os.path.join(out_dir, "pretrain_size.csv")
        write_csv_atomic(sizes, table)
        figure = os.path.join(out_dir, "pretrain_size.png")
        plots.pretrain_size(sizes, figure, title=title)
    for path in (table, figure):
        log(f"wrote {path}")
    return [table, figure]
