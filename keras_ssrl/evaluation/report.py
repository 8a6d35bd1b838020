"""`report.md`: the reproduced figures and tables next to the paper's findings."""

from __future__ import annotations

import datetime
import os

from keras_ssrl.files import atomic_path

PAPER_FINDINGS = {
    "label-efficiency": (
        "Pre-trained encoders fine-tuned **unfrozen** beat the non-pre-trained baseline "
        "at low label fractions (positive AUPC gain over p in [0.02, 0.3]); **frozen** "
        "encoders do worse than unfrozen ones; BYOL gives the largest gains, most "
        "clearly when pre-training on ARCHS4 and fine-tuning on TCGA."
    ),
    "architectures": (
        "At width 256 all three methods help at every depth (gain from 0.00, VIME with "
        "2 layers, to 0.07, SCARF with 10). At width 1024 VIME's gain falls with depth "
        "and turns negative; SCARF and BYOL stay beneficial."
    ),
    "collapse": (
        "VIME shows dimensional collapse, worse with depth (9 x 1024: about 100 "
        "non-zero singular values); SCARF collapses partly (up to 20% of the values at "
        "width 256, 50% at 1024) yet performs well; BYOL does not collapse at any "
        "architecture."
    ),
    "pretrain-size": (
        "Gains grow with the pre-training proportion q; SCARF and BYOL help from "
        "q = 0.05 (about 2500 examples), VIME from q = 0.2; very small pre-training "
        "sets fall below the baseline."
    ),
}


def _table(path: str, columns: list[str] | None = None, digits: int = 4) -> str:
    import pandas as pd

    if not os.path.exists(path):
        return f"_missing: {os.path.basename(path)}_\n"
    frame = pd.read_csv(path, dtype={"mode": str, "architecture": str})
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        cells = [_cell(v, digits) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}g}"  # NaN: not applicable
    return str(value)


def _gains(path: str):
    """The rows of a gain table that have a gain, or None without the table."""
    import pandas as pd

    if not os.path.exists(path):
        return None
    frame = pd.read_csv(path, dtype={"mode": str, "architecture": str, "note": str})
    return frame.dropna(subset=["gain_vs_baseline"])


def _single_repeat(gains) -> bool:
    return bool((gains["repeats"] < 2).any())


def label_efficiency_findings(path: str) -> str:
    """What this run shows, in the terms of the paper's claims (from `aupc.csv`).

    Nothing with a single repeat: without an interval no gain is a finding (the
    table's notes say so).
    """
    gains = _gains(path)
    if gains is None or gains.empty or _single_repeat(gains):
        return ""
    lines = []
    for mode in ("unfrozen", "frozen"):
        rows = gains[(gains["mode"] == mode)]
        if rows.empty:
            continue
        better = rows[rows["ci_low"] > 0]["method"].tolist()
        worse = rows[rows["ci_high"] < 0]["method"].tolist()
        best = rows.loc[rows["gain_vs_baseline"].idxmax()]
        lines.append(
            f"- {mode}: better than the baseline (95% interval above 0): "
            f"{', '.join(better) or 'none'}; worse: {', '.join(worse) or 'none'}; "
            f"largest gain {best['method']} ({best['gain_vs_baseline']:+.4f})."
        )
    pivot = gains.pivot_table(index="method", columns="mode", values="gain_vs_baseline")
    if {"frozen", "unfrozen"} <= set(pivot.columns):
        both = pivot[["frozen", "unfrozen"]].dropna()
        lines.append(
            f"- frozen below unfrozen for {int((both['frozen'] < both['unfrozen']).sum())}"
            f" of {len(both)} pre-training methods."
        )
    logreg = gains[gains["method"] == "logreg"]
    if not logreg.empty:
        lines.append(
            "- logistic regression on all genes: gain "
            f"{logreg['gain_vs_baseline'].iloc[0]:+.4f} over the baseline."
        )
    return "Here:\n\n" + "\n".join(lines) + "\n" if lines else ""


def _label(row) -> str:
    arch = getattr(row, "architecture", "")
    return " ".join(str(v) for v in (row.method, row.mode, arch) if v == v and v)


def gain_notes(path: str, n_test: int | None) -> str:
    """Warnings under a gain table: a grid short of the AUPC interval, a single
    repeat (no interval, no claim), gains or intervals below the resolution of a
    test split of `n_test` samples (one sample is 1 / n_test of accuracy)."""
    gains = _gains(path)
    if gains is None or gains.empty:
        return ""
    notes = sorted({n for n in gains["note"].dropna() if n})
    if _single_repeat(gains):
        notes.append(
            "one repeat per fraction gives no interval (ci_low and ci_high are -): "
            "this table supports no claim that a method is better or worse than the "
            "baseline, and its gains are single measurements"
        )
    if n_test:
        resolution = 2.0 / n_test
        small = [r for r in gains.itertuples() if abs(r.gain_vs_baseline) < resolution]
        narrow = [r for r in gains.itertuples()
                  if (r.ci_high - r.ci_low) / 2 < resolution]  # fmt: skip
        worth = f"2 / {n_test} = {resolution:.3g}, two test samples"
        if small:
            notes.append(
                f"the gains of {', '.join(_label(r) for r in small)} are below {worth}"
                ": within what the test split can resolve"
            )
        if narrow:
            notes.append(
                f"the intervals of {', '.join(_label(r) for r in narrow)} are "
                f"narrower than {worth}; they resample repeats, not the {n_test} test "
                "samples every run shares, so they understate the uncertainty"
            )
    return "".join(f"> **Warning**: {n}.\n\n" for n in notes)


def _experiments(out_dir: str) -> dict:
    """kind -> (pre-training, fine-tuning) `Manifest`s of each experiment folder
    under `out_dir` whose data can be read (the sweeps report those that cannot)."""
    from keras_ssrl.data.errors import DataError
    from keras_ssrl.data.manifest import Manifest
    from keras_ssrl.evaluation.experiments import KINDS, ProtocolError
    from keras_ssrl.evaluation.results import EXPERIMENT_JSON, load_experiment
    from keras_ssrl.evaluation.runner import setting_data

    found = {}
    for name in KINDS:
        folder = os.path.join(out_dir, name)
        if not os.path.exists(os.path.join(folder, EXPERIMENT_JSON)):
            continue
        try:
            # Built-in data is converted by the sweeps before any report.
            folders = setting_data(load_experiment(folder), log=lambda _: None)
            found[name] = tuple(Manifest.load(f) for f in folders)
        except (ProtocolError, DataError):
            continue
    return found


def split_sizes(data: dict) -> str:
    """n per split of every dataset the experiments use (pre-training splits of
    the pre-training data, labelled splits of the fine-tuning data)."""
    from keras_ssrl.data import schema

    seen, lines = set(), []
    for pretrain, finetune in data.values():
        for manifest, splits in (
            (pretrain, (schema.PRETRAIN, schema.PRETRAIN_VAL)),
            (finetune, (schema.FINETUNE, schema.FINETUNE_VAL, schema.TEST)),
        ):
            key = (manifest.directory, splits)
            if key in seen:
                continue
            seen.add(key)
            sizes = ", ".join(
                f"{s} {manifest.num_records(s)}"
                for s in splits
                if s in manifest.split_names
            )
            lines.append(f"- `{manifest.directory}`: {sizes}")
    return "Samples per split:\n\n" + "\n".join(lines) + "\n" if lines else ""


def data_warnings(data: dict) -> str:
    """Warnings about the fine-tuning data of the experiments (`_experiments`).

    A test split too small to measure much is said next to the numbers it makes
    coarse.
    """
    from keras_ssrl.finetuning import FinetuneError, check_labelled_splits

    warnings: list[str] = []
    for _, finetune in data.values():
        try:
            found = check_labelled_splits(finetune)
        except FinetuneError:
            continue  # the sweeps themselves report these
        warnings += [w for w in found if w not in warnings]
    return "".join(f"> **Warning**: {w}\n\n" for w in warnings)


def _figure(out_dir: str, relative: str, caption: str) -> str:
    if not os.path.exists(os.path.join(out_dir, relative)):
        return f"_missing figure: {relative}_\n"
    return f"![{caption}]({relative})\n"


def _n_test(data: dict, kind: str) -> int | None:
    from keras_ssrl.data import schema

    manifests = data.get(kind)
    if manifests is None or schema.TEST not in manifests[1].split_names:
        return None
    return manifests[1].num_records(schema.TEST)


def write_report(out_dir: str, preset: str, setting: str) -> str:
    """Writes `out_dir/report.md` from the experiment folders under `out_dir`."""
    gain_columns = ["method", "mode", "aupc_normalised", "gain_vs_baseline", "ci_low",
                    "ci_high", "repeats"]  # fmt: skip
    data = _experiments(out_dir)
    aupc_csv = os.path.join(out_dir, "label-efficiency", "aupc.csv")
    arch_csv = os.path.join(out_dir, "architectures", "architectures.csv")
    sections = [
        f"# keras_ssrl reproduction: setting `{setting}`, preset `{preset}`\n",
        f"Written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Each folder "
        "holds `experiment.json` (every setting) and `results.csv` (one row per run). "
        "AUPC is integrated over p in [0.02, 0.3] and divided by 0.28 "
        "(`aupc_normalised`, a mean accuracy); the gain is the difference of "
        "`aupc_normalised` from the non-pre-trained baseline of the same architecture "
        "(`gain_vs_baseline`, in accuracy), with a 95% paired bootstrap interval over "
        "repeats on the same scale.\n",
        split_sizes(data),
        data_warnings(data),
        "## Label efficiency (Figure 3)\n",
        f"Paper: {PAPER_FINDINGS['label-efficiency']}\n",
        _figure(out_dir, "label-efficiency/label_efficiency.png", "label efficiency"),
        _table(aupc_csv, gain_columns),
        gain_notes(aupc_csv, _n_test(data, "label-efficiency")),
        label_efficiency_findings(aupc_csv),
        "## Architectures (Figure 4, top)\n",
        f"Paper: {PAPER_FINDINGS['architectures']}\n",
        _figure(out_dir, "architectures/architectures.png", "architectures"),
        _table(arch_csv, ["architecture", *gain_columns]),
        gain_notes(arch_csv, _n_test(data, "architectures")),
        "## Dimensional collapse (Figure 4, bottom)\n",
        f"Paper: {PAPER_FINDINGS['collapse']}\n",
        _figure(out_dir, "collapse/collapse.png", "covariance spectrum"),
        _table(os.path.join(out_dir, "collapse", "collapse.csv")),
        "## Pre-training set size (Figure 5)\n",
        f"Paper: {PAPER_FINDINGS['pretrain-size']}\n",
        _figure(out_dir, "pretrain-size/pretrain_size.png", "pre-training size"),
        _table(os.path.join(out_dir, "pretrain-size", "pretrain_size.csv")),
    ]
    path = os.path.join(out_dir, "report.md")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write("\n".join(sections))
    return path
