"""Unit tests: gene id handling, alignment, label files and rules, split allocation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from keras_ssrl.config import SplitConfig
from keras_ssrl.data import DataError
from keras_ssrl.data.genes import align_genes, plan_genes, strip_version
from keras_ssrl.data.labels import (
    apply_label_rules,
    join_labels,
    read_label_file,
    read_label_rules,
)
from keras_ssrl.data.splits import allocate, assign_splits


def test_strip_version_keeps_par_y_and_symbols():
    assert strip_version("ENSG00000000003.15") == "ENSG00000000003"
    assert strip_version("ENSG00000182378.14_PAR_Y") == "ENSG00000182378_PAR_Y"
    assert strip_version("TP53") == "TP53"
    assert strip_version("ENSMUSG00000000001.4") == "ENSMUSG00000000001"


def test_plan_drops_par_y_and_reports():
    genes = ["ENSG00000000001.1", "ENSG00000000002.3", "ENSG00000000002.3_PAR_Y"]
    plan = plan_genes(genes)
    assert plan.genes == ["ENSG00000000001", "ENSG00000000002"]
    assert plan.report["n_par_y_dropped"] == 1
    assert plan.report["n_versions_stripped"] == 3
    kept = plan_genes(genes, par_y="keep")
    assert kept.genes[-1] == "ENSG00000000002_PAR_Y"


@pytest.mark.parametrize(
    "policy, expected",
    [("sum", [[1, 5, 4]]), ("mean", [[1, 2.5, 4]]), ("first", [[1, 2, 4]])],
)
def test_duplicate_policies(policy, expected):
    genes = ["A", "B", "C", "B"]
    plan = plan_genes(genes, duplicate_genes=policy)
    assert plan.genes == ["A", "B", "C"]
    np.testing.assert_allclose(plan.apply(np.array([[1.0, 2, 4, 3]])), expected)


def test_unique_policy_renames():
    plan = plan_genes(["A", "B", "B"], duplicate_genes="unique")
    assert plan.genes == ["A", "B", "B-2"]


def test_duplicate_error_names_gene_and_rows():
    with pytest.raises(DataError, match=r"B \(gene rows 2, 4\)"):
        plan_genes(["A", "B", "C", "B"], path="x.tsv")


def test_empty_gene_id_is_an_error():
    with pytest.raises(DataError, match="gene 2 has an empty id"):
        plan_genes(["A", "", "C"], path="x.tsv")


def test_alignment_keeps_target_order_and_refuses_small_overlap():
    alignment = align_genes(["a", "b", "c", "d"], ["d", "x", "b"], min_overlap=0.5)
    assert alignment.genes == ["d", "b"]
    assert list(alignment.source_indices) == [3, 1]
    assert alignment.report()["n_matched"] == 2
    with pytest.raises(DataError, match="1 of 4 genes of target"):
        align_genes(["a", "b"], ["a", "x", "y", "z"], min_overlap=0.5)


def test_label_file_and_join(tmp_path):
    path = tmp_path / "pheno.tsv"
    path.write_text("sample\tdisease\nS1\tlung\nS2\tNA\nS3\tbreast\nS9\tkidney\n")
    mapping = read_label_file(str(path), "disease")
    assert mapping == {"S1": "lung", "S2": None, "S3": "breast", "S9": "kidney"}
    labels, report = join_labels(["S1", "S2", "S3", "S4"], mapping, str(path))
    assert labels == ["lung", None, "breast", None]
    assert report["n_samples_without_label"] == 2
    assert report["n_label_rows_unused"] == 1
    with pytest.raises(DataError, match="none of the 2 samples"):
        join_labels(["Q1", "Q2"], mapping, str(path))


def test_label_file_errors(tmp_path):
    path = tmp_path / "pheno.csv"
    path.write_text("sample_id,label\nS1,a\nS1,b\n")
    with pytest.raises(DataError, match="'S1' on lines \\[2, 3\\]"):
        read_label_file(str(path))
    with pytest.raises(DataError, match="no label column 'tissue'"):
        read_label_file(str(path), "tissue")


def test_latin1_phenotype_file(tmp_path):
    path = tmp_path / "pheno.txt"
    path.write_bytes("sample\tsite\nS1\tK\xe9ratinocyte\n".encode("latin-1"))
    assert read_label_file(str(path), "site") == {"S1": "Kératinocyte"}


def test_label_rules_first_match_wins(tmp_path):
    rules_path = tmp_path / "rules.json"
    rules_path.write_text(json.dumps({"lung": "lung|pulmon", "blood": "pbmc|blood"}))
    rules = read_label_rules(str(rules_path))
    fields = {
        "source_name_ch1": ["Lung tumour", "PBMC", "liver", "lung blood vessel"],
        "title": ["x", "y", "z", "w"],
    }
    labels, report = apply_label_rules(fields, rules)
    assert labels == ["lung", "blood", None, "lung"]
    assert report["n_matched_by_rules"] == 3
    assert report["n_matched_several_labels"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": "("}))
    with pytest.raises(DataError, match="not a valid regular expression"):
        read_label_rules(str(bad))


def test_allocate_is_proportional_and_exact():
    counts = np.array([50, 30, 20])
    assert list(allocate(counts, 10)) == [5, 3, 2]
    result = allocate(np.array([97, 2, 1]), 10, minimum=1)
    assert result.sum() == 10 and (result >= 1).all()


def test_split_sizes_counts_and_errors():
    labels = [f"c{i % 3}" for i in range(300)]
    split = assign_splits(labels, SplitConfig(finetune_size=60, test_size=30, seed=0))
    assert (split == "test").sum() == 30
    assert ((split == "finetune") | (split == "finetune_val")).sum() == 60
    assert (split == "finetune_val").sum() == 9
    with pytest.raises(DataError, match="leave no pre-training data"):
        assign_splits(labels, SplitConfig(finetune_size=0.6))
    with pytest.raises(DataError, match="fraction between 0 and 1 or a whole count"):
        assign_splits(labels, SplitConfig(finetune_size=2.5))
