"""One labelled cohort of 100-300 samples: the `cohort` split preset
(docs/small-cohorts.md)."""

from __future__ import annotations

import collections

from keras_ssrl.config import SPLIT_PRESETS, SplitConfig
from keras_ssrl.data import Manifest
from keras_ssrl.data.splits import assign_splits
from tests.conftest import load_script, small_matrix, write_samples_as_rows

convert_cli = load_script("tfrecords_tools/convert.py")


def cohort_labels(n=158, n_classes=4):
    return [f"subtype_{i % n_classes}" for i in range(n)]


def test_cohort_preset_gives_a_158_sample_cohort_room_to_measure():
    counts = collections.Counter(
        assign_splits(cohort_labels(), SplitConfig(**SPLIT_PRESETS["cohort"]))
    )
    # The numbers docs/small-cohorts.md and config.py state.
    assert counts == {
        "finetune": 67, "finetune_val": 12, "test": 47, "pretrain": 27,
        "pretrain_val": 5,
    }  # fmt: skip
    # The paper's ratio leaves the same cohort almost nothing to train and test on.
    paper = collections.Counter(
        assign_splits(cohort_labels(), SplitConfig(**SPLIT_PRESETS["tcga"]))
    )
    assert (paper["finetune"], paper["test"]) == (13, 17)


def test_converter_accepts_the_cohort_preset(tmp_path, capsys):
    counts, samples, genes, labels = small_matrix(n_samples=158, n_classes=4)
    path = write_samples_as_rows(tmp_path / "cohort.csv", counts, samples, genes, labels)
    out = tmp_path / "cohort"
    code = convert_cli.main([
        "--input", str(path), "--label-column", "cancer_type", "--split-sizes",
        "cohort", "--out", str(out),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = Manifest.load(str(out))
    sizes = {s: manifest.num_records(s) for s in manifest.split_names}
    assert (sizes["finetune"], sizes["finetune_val"], sizes["test"]) == (67, 12, 47)
    assert manifest.data["config"]["split"]["test_size"] == 0.3
    # 47 test samples, at least 5 per class: no "mostly noise" warning.
    assert "mostly noise" not in capsys.readouterr().out
