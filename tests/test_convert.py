"""Conversion: round trip, manifest, splits, statistics without leakage, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from keras_ssrl.config import ConversionConfig, SplitConfig
from keras_ssrl.data import DataError, Manifest, convert, load_dataset
from keras_ssrl.data.genes import strip_version
from tests.conftest import array_source, small_matrix

QUIET = {"log": lambda _: None}
# Relative spacing of float32 (2**-23) and float16 (2**-10) values: record precision.
FLOAT32_ULP = float(np.finfo(np.float32).eps)
FLOAT16_ULP = float(np.finfo(np.float16).eps)


def read_split(directory, split, standardize=False):
    ds = load_dataset(
        directory, split, 64, standardize=standardize, with_sample_ids=True
    )
    xs, ys, ids = [], [], []
    for x, y, sid in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
        ids.extend(s.decode() for s in sid.numpy())
    return np.concatenate(xs), np.concatenate(ys), ids


def test_round_trip_values_and_gene_order(dataset_dir, matrix):
    counts, samples, genes, labels = matrix
    manifest = Manifest.load(dataset_dir)
    kept = [g for i, g in enumerate(genes) if i != 5]  # gene 5 is constant
    assert manifest.genes == [strip_version(g) for g in kept]
    assert manifest.data["dropped_genes"]["zero_variance"] == [strip_version(genes[5])]
    position = {s: i for i, s in enumerate(samples)}
    columns = [i for i in range(len(genes)) if i != 5]
    for split in manifest.split_names:
        x, y, ids = read_split(dataset_dir, split)
        expected = np.log2(counts[[position[s] for s in ids]][:, columns] + 1)
        # The converter computes log2 in float32, this test in float64: SIMD
        # implementations of float32 log2 (AVX-512 among them) are a few ulp off the
        # correctly rounded value, so compare within 4 ulp of float32, not exactly.
        np.testing.assert_allclose(x, expected, rtol=4 * FLOAT32_ULP, atol=0)
        assert [manifest.labels[k] for k in y] == [labels[position[s]] for s in ids]


def test_float16_records_are_within_half_precision(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    convert(array_source(counts, samples, genes, labels), str(tmp_path / "d"), **QUIET)
    x, _, ids = read_split(str(tmp_path / "d"), "pretrain")
    position = {s: i for i, s in enumerate(samples)}
    columns = [i for i in range(len(genes)) if i != 5]
    expected = np.log2(counts[[position[s] for s in ids]][:, columns] + 1)
    # Rounding to float16 is off by at most half an ulp (2**-11 relative), on top of
    # the few float32 ulp of the converter's log2.
    np.testing.assert_allclose(
        x, expected, rtol=FLOAT16_ULP / 2 + 4 * FLOAT32_ULP, atol=0
    )


def test_manifest_contents(dataset_dir, matrix):
    counts, samples, genes, labels = matrix
    data = json.load(open(os.path.join(dataset_dir, "manifest.json")))
    assert data["n_genes"] == len(genes) - 1 == len(data["genes"])
    assert data["labels"] == sorted(set(labels))
    assert data["transform"] == "log2p1" and data["values"] == "counts"
    assert data["schema_version"] == 1 and data["record_dtype"] == "float32"
    assert data["statistics"]["fitted_on"] == "pretrain"
    assert len(data["statistics"]["mean"]) == data["n_genes"]
    assert data["command"]
    total = 0
    for split, info in data["splits"].items():
        assert sum(s["num_records"] for s in info["shards"]) == info["num_records"]
        for shard in info["shards"]:
            assert shard["file"].startswith(f"{split}-")
            assert len(shard["sha256"]) == 64
            assert (
                os.path.getsize(os.path.join(dataset_dir, shard["file"]))
                == (shard["bytes"])
            )
        total += info["num_records"]
    assert total == len(samples)
    splits = pd.read_csv(os.path.join(dataset_dir, "splits.csv"))
    assert list(splits.columns) == ["sample_id", "split"]
    assert sorted(splits.sample_id) == sorted(samples)
    assert data["splits"]["pretrain"]["shards"][0]["file"] == (
        "pretrain-00000-of-00004.tfrecord"
    )


def test_statistics_fitted_on_pretraining_split_only(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    convert(array_source(counts, samples, genes, labels), str(tmp_path / "a"), **QUIET)
    splits = pd.read_csv(tmp_path / "a" / "splits.csv").set_index("sample_id").split
    shifted = counts.copy()
    held_out = np.array([splits[s] != "pretrain" for s in samples])
    shifted[held_out] *= 50.0  # a massive shift of every non-pre-training sample
    convert(array_source(shifted, samples, genes, labels), str(tmp_path / "b"), **QUIET)
    a, b = Manifest.load(str(tmp_path / "a")), Manifest.load(str(tmp_path / "b"))
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.std, b.std)
    # The shift is visible in the standardised test data: nothing was absorbed.
    x_a, _, _ = read_split(str(tmp_path / "a"), "test", standardize=True)
    x_b, _, _ = read_split(str(tmp_path / "b"), "test", standardize=True)
    assert (x_b.mean() - x_a.mean()) > 1.0


def test_splits_are_stratified_and_deterministic(tmp_path):
    counts, samples, genes, labels = small_matrix(n_samples=400, n_classes=4)
    config = ConversionConfig(split=SplitConfig(finetune_size=0.2, seed=3))
    convert(
        array_source(counts, samples, genes, labels),
        str(tmp_path / "a"),
        config,
        **QUIET,
    )
    convert(
        array_source(counts, samples, genes, labels),
        str(tmp_path / "b"),
        config,
        **QUIET,
    )
    a = Manifest.load(str(tmp_path / "a"))
    b = Manifest.load(str(tmp_path / "b"))
    assert (
        open(tmp_path / "a" / "splits.csv").read()
        == open(tmp_path / "b" / "splits.csv").read()
    )
    for split in a.split_names:
        assert [s["sha256"] for s in a.split(split)["shards"]] == [
            s["sha256"] for s in b.split(split)["shards"]
        ]
    assert a.num_records("finetune") + a.num_records("finetune_val") == 80
    assert a.num_records("test") == 80
    for split in ("finetune", "test", "pretrain"):
        counts_per_class = a.split(split)["label_counts"]
        assert set(counts_per_class) == set(a.labels)
        share = np.array(list(counts_per_class.values())) / a.num_records(split)
        np.testing.assert_allclose(share, 0.25, atol=0.03)
    other = ConversionConfig(split=SplitConfig(finetune_size=0.2, seed=4))
    convert(
        array_source(counts, samples, genes, labels),
        str(tmp_path / "c"),
        other,
        **QUIET,
    )
    assert (
        open(tmp_path / "a" / "splits.csv").read()
        != open(tmp_path / "c" / "splits.csv").read()
    )


def test_every_class_reaches_every_labelled_split(tmp_path):
    counts, samples, genes, _ = small_matrix(n_samples=300)
    labels = ["big"] * 290 + ["rare"] * 10
    convert(array_source(counts, samples, genes, labels), str(tmp_path / "d"), **QUIET)
    manifest = Manifest.load(str(tmp_path / "d"))
    for split in ("finetune", "finetune_val", "test"):
        assert manifest.split(split)["label_counts"].get("rare", 0) >= 1


def test_unlabelled_source_goes_to_pretraining(tmp_path):
    counts, samples, genes, _ = small_matrix()
    convert(array_source(counts, samples, genes, None), str(tmp_path / "u"), **QUIET)
    manifest = Manifest.load(str(tmp_path / "u"))
    assert manifest.split_names == ["pretrain", "pretrain_val"]
    assert manifest.labels == []
    _, y, _ = read_split(str(tmp_path / "u"), "pretrain")
    assert (y == -1).all()


# --- bad input: a clear error, nothing written -------------------------------------


def expect_error(tmp_path, source, match, config=None, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        convert(source, str(out), config, **QUIET, **kwargs)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_nan_is_an_error_naming_sample_and_gene(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    bad = counts.copy()
    bad[7, 3] = np.nan
    expect_error(
        tmp_path,
        array_source(bad, samples, genes, labels),
        rf"sample 'S0007', gene '{genes[3]}'.*missing",
    )


def test_nan_policies_report_counts(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    bad = counts.copy()
    bad[7, 3] = np.nan
    config = ConversionConfig(missing_values="drop-genes")
    manifest = convert(
        array_source(bad, samples, genes, labels), str(tmp_path / "d"), config, **QUIET
    )
    assert manifest.data["dropped_genes"]["missing_values"] == [strip_version(genes[3])]
    assert manifest.data["report"]["n_missing_cells"] == 1
    config = ConversionConfig(missing_values="zero")
    manifest = convert(
        array_source(bad, samples, genes, labels), str(tmp_path / "z"), config, **QUIET
    )
    assert manifest.n_genes == len(genes) - 1
    assert manifest.data["report"]["n_missing_cells"] == 1


def test_infinite_and_negative_values_are_errors(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    bad = counts.copy()
    bad[2, 4] = np.inf
    expect_error(tmp_path, array_source(bad, samples, genes, labels), "infinite")
    bad = counts.copy()
    bad[9, 1] = -3
    expect_error(
        tmp_path,
        array_source(bad, samples, genes, labels),
        rf"sample 'S0009', gene '{genes[1]}': value -3.0 is negative.*log2",
    )


def test_log2_values_may_be_negative(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    logged = np.log2(counts + 0.001)  # Xena TOIL TPM style: negative values are valid
    config = ConversionConfig(values="log2", record_dtype="float32")
    manifest = convert(
        array_source(logged, samples, genes, labels),
        str(tmp_path / "d"),
        config,
        **QUIET,
    )
    assert manifest.data["transform"] == "none"
    x, _, _ = read_split(str(tmp_path / "d"), "test")
    assert x.min() < 0


def test_duplicate_samples_are_an_error(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    samples = list(samples)
    samples[10] = samples[3]
    expect_error(
        tmp_path,
        array_source(counts, samples, genes, labels),
        "sample id 'S0003' occurs more than once",
    )


def test_duplicate_genes_error_or_merge_with_report(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    genes = list(genes)
    genes[8] = genes[2].split(".")[0] + ".9"  # same gene, other version
    expect_error(
        tmp_path,
        array_source(counts, samples, genes, labels),
        "occur more than once.*--duplicate-genes",
    )
    config = ConversionConfig(duplicate_genes="sum", record_dtype="float32")
    manifest = convert(
        array_source(counts, samples, genes, labels),
        str(tmp_path / "d"),
        config,
        **QUIET,
    )
    assert manifest.data["report"]["genes"]["n_duplicate_rows"] == 1
    assert manifest.n_genes == len(genes) - 2  # merged + constant gene dropped
    x, _, ids = read_split(str(tmp_path / "d"), "test")
    row = samples.index(ids[0])
    merged = manifest.genes.index(strip_version(genes[2]))
    np.testing.assert_allclose(
        x[0, merged], np.log2(counts[row, 2] + counts[row, 8] + 1), rtol=1e-6
    )


def test_console_says_why_genes_were_dropped(tmp_path, matrix):
    """Every gene change is on the console with its reason, not only in the manifest."""
    counts, samples, genes, labels = matrix
    genes = list(genes)
    genes[7] = genes[6].split(".")[0] + "_PAR_Y"
    genes[9] = genes[8].split(".")[0] + ".2_PAR_Y"
    lines = []
    convert(
        array_source(counts, samples, genes, labels),
        str(tmp_path / "d"),
        align_to=[strip_version(g) for g in genes[:20]],
        align_name="data/tcga",
        log=lines.append,
    )
    text = "\n".join(lines)
    assert "version suffixes stripped from 23 ids" in text
    assert "2 _PAR_Y rows dropped" in text and "--keep-par-y" in text
    assert "18 of 20 target genes matched" in text  # the _PAR_Y rows are not kept
    assert "4 genes not in the target dropped" in text
    assert "1 dropped for zero variance on the pre-training split" in text
    assert f"constant on the pre-training split (nothing to learn): {genes[5][:15]}" in (
        text
    )


def test_missing_labels_policies(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    labels = list(labels)
    labels[4] = labels[11] = None
    expect_error(
        tmp_path,
        array_source(counts, samples, genes, labels),
        "2 of 120 samples have no label.*S0004",
    )
    config = ConversionConfig(missing_labels="unlabelled")
    m = convert(
        array_source(counts, samples, genes, labels),
        str(tmp_path / "u"),
        config,
        **QUIET,
    )
    assert m.data["report"]["n_missing_labels"] == 2
    assert m.data["n_samples"] == 120
    assert m.split("pretrain")["num_labelled"] + 2 >= m.num_records("pretrain")
    config = ConversionConfig(missing_labels="drop")
    m = convert(
        array_source(counts, samples, genes, labels),
        str(tmp_path / "d"),
        config,
        **QUIET,
    )
    assert m.data["n_samples"] == 118 and m.data["report"]["n_samples_dropped"] == 2


def test_class_too_small_to_stratify(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    labels = list(labels)
    labels[0:3] = ["tiny"] * 3
    labels = [lab if lab == "tiny" or i >= 3 else lab for i, lab in enumerate(labels)]
    expect_error(
        tmp_path,
        array_source(counts, samples, genes, labels),
        "'tiny' has 3.*--drop-small-classes",
    )
    config = ConversionConfig(split=SplitConfig(drop_small_classes=True))
    m = convert(
        array_source(counts, samples, genes, labels),
        str(tmp_path / "d"),
        config,
        **QUIET,
    )
    assert "tiny" not in m.labels
    assert m.data["report"]["small_classes_dropped"] == {"tiny": 3}


def test_existing_output_is_not_overwritten_by_default(tmp_path, matrix):
    counts, samples, genes, labels = matrix
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="already exists"):
        convert(
            array_source(counts, samples, genes, labels), str(tmp_path / "out"), **QUIET
        )
    assert (tmp_path / "out" / "keep.txt").exists()
