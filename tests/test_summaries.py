"""Honest summaries and readable figures: gains on the normalised scale, a grid short of
the AUPC interval, one repeat, n per split, and what the figures name (no training)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest

from keras_ssrl.data import schema
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.evaluation import plots
from keras_ssrl.evaluation.aupc import paired_bootstrap_gain, span_gap
from keras_ssrl.evaluation.experiments import Experiment
from keras_ssrl.evaluation.report import write_report
from keras_ssrl.evaluation.results import prepare_out
from keras_ssrl.evaluation.summaries import figure_title, gain_table, summarize

FULL = (0.02, 0.1, 0.3)
# Accuracy per (method, repeat), the same at every p: AUPC_norm is their mean.
ACCURACY = {"baseline": (0.5, 0.5), "scarf": (0.6, 0.7)}


def results(fractions=FULL, repeats=2, accuracy=None) -> pd.DataFrame:
    accuracy = accuracy or ACCURACY
    rows = [
        {
            "setting": "custom",
            "method": method,
            "mode": "none" if method == "baseline" else "unfrozen",
            "architecture": "4x256",
            "q": 1.0,
            "p": p,
            "repeat": r,
            "accuracy": accuracy[method][r],
        }  # fmt: skip
        for method in accuracy
        for p in fractions
        for r in range(repeats)
    ]
    return pd.DataFrame(rows)


def experiment(fractions=FULL, repeats=2, data=None) -> Experiment:
    return Experiment(kind="label-efficiency", setting="custom", finetune_data=data,
                      methods=("baseline", "scarf", "vime"), modes=("unfrozen",),
                      fractions=fractions, repeats=repeats)  # fmt: skip


def sweep_folder(root, fractions=FULL, repeats=2, data=None, accuracy=None) -> str:
    """A finished label-efficiency folder (experiment.json, results.csv, summaries)."""
    out = os.path.join(root, "label-efficiency")
    prepare_out(experiment(fractions, repeats, data), out, log=lambda _: None)
    results(fractions, repeats, accuracy).to_csv(
        os.path.join(out, "results.csv"), index=False
    )
    summarize(out, log=lambda _: None)
    return out


def test_gain_is_the_difference_of_normalised_aupcs():
    table = gain_table(results(), experiment(), n_boot=200)
    base = table[table["method"] == "baseline"].iloc[0]
    scarf = table[table["method"] == "scarf"].iloc[0]
    assert base["aupc_normalised"] == pytest.approx(0.5)
    assert scarf["aupc_normalised"] == pytest.approx(0.65)
    assert scarf["gain_vs_baseline"] == pytest.approx(0.15)  # 0.65 - 0.5
    assert scarf["gain_area_vs_baseline"] == pytest.approx(0.15 * 0.28)
    assert scarf["gain_area_vs_baseline"] == pytest.approx(scarf["aupc"] - base["aupc"])
    # The interval is the bootstrap's, on the same scale as the gain.
    acc = {m: np.array([ACCURACY[m]] * len(FULL)) for m in ACCURACY}
    stats = paired_bootstrap_gain(FULL, acc["scarf"], acc["baseline"], n_boot=200)
    assert scarf["ci_low"] == pytest.approx(stats["ci_low"] / 0.28)
    assert scarf["ci_high"] == pytest.approx(stats["ci_high"] / 0.28)
    assert scarf["ci_low"] <= scarf["gain_vs_baseline"] <= scarf["ci_high"]
    assert np.isnan(base["gain_vs_baseline"]) and not scarf["note"]


def test_grid_short_of_the_interval_is_noted_in_table_report_and_log(tmp_path, caplog):
    assert span_gap(FULL) is None
    gap = span_gap((0.05, 0.3, 1.0))
    assert "[0.02, 0.05] missing" in gap and "span 0.25" in gap and "0.28" in gap
    with caplog.at_level(logging.WARNING):
        out = sweep_folder(str(tmp_path), fractions=(0.05, 0.3))
    assert any("[0.02, 0.05] missing" in r.getMessage() for r in caplog.records)
    table = pd.read_csv(os.path.join(out, "aupc.csv"))
    assert (table["note"] == gap).all()
    report = open(write_report(str(tmp_path), preset="t", setting="custom")).read()
    assert "**Warning**: the AUPC grid covers p in [0.05, 0.3]" in report


def test_one_repeat_gives_no_interval_and_no_claim(tmp_path):
    sweep_folder(str(tmp_path), repeats=1)
    report = open(write_report(str(tmp_path), preset="t", setting="custom")).read()
    assert "one repeat per fraction gives no interval" in report
    assert "no claim" in report
    assert "better: none" not in report and "worse: none" not in report
    assert "largest gain scarf" not in report  # the paper's findings say "largest"
    # With repeats the findings are stated.
    sweep_folder(str(tmp_path / "two"), repeats=2)
    report = open(write_report(str(tmp_path / "two"), "t", "custom")).read()
    assert "largest gain scarf (+0.1500)" in report
    assert "one repeat" not in report


def test_report_states_n_per_split_and_the_test_resolution(tmp_path, labelled_dir):
    # Gains of 1 and 0.5 test samples' worth, repeats nearly equal: narrow intervals.
    accuracy = {"baseline": (0.5, 0.5), "scarf": (0.515, 0.516),
                "vime": (0.507, 0.508)}  # fmt: skip
    sweep_folder(str(tmp_path), data=labelled_dir, accuracy=accuracy)
    report = open(write_report(str(tmp_path), preset="t", setting="custom")).read()
    manifest = Manifest.load(labelled_dir)
    n = {s: manifest.num_records(s) for s in schema.SPLITS}
    assert (
        f"`{labelled_dir}`: pretrain {n['pretrain']}, pretrain_val {n['pretrain_val']}"
        in report
    )
    assert (
        f"finetune {n['finetune']}, finetune_val {n['finetune_val']}, test {n['test']}"
        in report
    )
    small = "the gains of scarf unfrozen 4x256, vime unfrozen 4x256 are below"
    assert f"{small} 2 / {n['test']}" in report
    assert f"narrower than 2 / {n['test']}" in report
    assert "understate the uncertainty" in report


def test_figures_name_setting_and_repeats(tmp_path):
    title = figure_title(experiment(repeats=3))
    assert title == "custom, 3 repeats"
    assert figure_title(experiment(repeats=1)) == "custom, 1 repeat"
    fig = plots.label_efficiency(results(), str(tmp_path / "le.png"), title=title)
    assert [ax.get_title() for ax in fig.axes] == ["custom, 3 repeats: unfrozen"]
    gains = gain_table(results(), experiment(), n_boot=50)
    fig = plots.architectures(gains, str(tmp_path / "a.png"), title=title)
    assert fig.axes[0].get_title() == title


def test_collapse_figure_reference_style_threshold_and_title(tmp_path):
    from keras_ssrl.encoders import build_encoder
    from keras_ssrl.evaluation.collapse import RANDOM_INIT, spectrum_title
    from keras_ssrl.metrics import COLLAPSE_THRESHOLD

    encoder = build_encoder(10, layers=2, width=8)
    title = spectrum_title({"scarf": encoder, RANDOM_INIT: encoder}, "tcga")
    assert title == "tcga, encoder 2x8, 1 run each"
    values = np.logspace(0, -8, 8)
    fig = plots.spectrum({"scarf": values, RANDOM_INIT: values}, str(tmp_path / "c.png"),
                         title, reference=RANDOM_INIT,
                         threshold=COLLAPSE_THRESHOLD)  # fmt: skip
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    scarf, reference = lines["scarf"], lines[RANDOM_INIT]
    assert scarf.get_color() == plots.COLOURS["scarf"]
    assert reference.get_color() != scarf.get_color()
    assert reference.get_linestyle() == "--" != scarf.get_linestyle()
    threshold = next(v for k, v in lines.items() if k.startswith("collapse threshold"))
    assert set(threshold.get_ydata()) == {COLLAPSE_THRESHOLD}
    assert ax.get_title() == title
