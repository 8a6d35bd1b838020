"""Every download layout through `tfrecords_tools/convert.py` to readable TFRecords."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from keras_ssrl.data import Manifest, layouts, load_dataset
from keras_ssrl.data.genes import strip_version
from tests.conftest import load_script, small_matrix

convert_cli = load_script("tfrecords_tools/convert.py")


@pytest.fixture(scope="module")
def data():
    counts, samples, genes, labels = small_matrix(n_samples=80, n_genes=16)
    return counts.astype(np.int64), samples, genes, labels


def convert(*argv):
    return convert_cli.main([str(a) for a in argv])


def read_back(out):
    """Stored values by sample id, and labels by sample id."""
    manifest = Manifest.load(str(out))
    values, labels = {}, {}
    for split in manifest.split_names:
        ds = load_dataset(str(out), split, 32, standardize=False, with_sample_ids=True)
        for x, y, ids in ds:
            for row, lab, sid in zip(x.numpy(), y.numpy(), ids.numpy()):
                values[sid.decode()] = row
                labels[sid.decode()] = manifest.labels[lab] if lab >= 0 else None
    return manifest, values, labels


def check(out, counts, samples, genes, labels, transform=np.log2, offset=1.0):
    manifest, values, read_labels = read_back(out)
    columns = [genes.index(g) for g in genes if strip_version(g) in manifest.genes]
    assert manifest.genes == [strip_version(genes[c]) for c in columns]
    for i, sid in enumerate(samples):
        expected = transform(counts[i, columns] + offset)
        np.testing.assert_allclose(values[sid], expected, rtol=2**-10, atol=1e-3)
        if labels is not None:
            assert read_labels[sid] == labels[i]
    return manifest


@pytest.mark.parametrize("layout", ["v2", "v1", "transposed"])
def test_archs4_layouts_with_label_rules(tmp_path, data, layout):
    counts, samples, genes, labels = data
    ids = [strip_version(g) for g in genes]
    h5 = layouts.write_archs4(
        str(tmp_path / "a.h5"),
        counts,
        samples,
        ids,
        layout=layout,
        sample_meta={
            "source_name_ch1": [f"human {lab} biopsy" for lab in labels],
            "title": ["x"] * len(labels),
        },
    )
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({f"tissue {c}": c for c in sorted(set(labels))}))
    out = tmp_path / "out"
    assert (
        convert(
            "--input",
            h5,
            "--label-rules",
            rules,
            "--out",
            out,
            "--record-dtype",
            "float32",
        )
        == 0
    )
    manifest = check(out, counts, samples, ids, [f"tissue {lab}" for lab in labels])
    assert manifest.data["source"]["layout"] == layout
    assert manifest.data["report"]["n_matched_by_rules"] == len(samples)


def test_archs4_label_field(tmp_path, data):
    counts, samples, genes, labels = data
    ids = [strip_version(g) for g in genes]
    h5 = layouts.write_archs4(
        str(tmp_path / "a.h5"),
        counts,
        samples,
        ids,
        sample_meta={"source_name_ch1": labels},
    )
    out = tmp_path / "out"
    assert (
        convert("--input", h5, "--label-column", "source_name_ch1", "--out", out) == 0
    )
    check(out, counts, samples, ids, labels)


def test_gdc_folder(tmp_path, data):
    counts, samples, genes, labels = data
    projects = [f"TCGA-{lab.upper()}" for lab in labels]
    layouts.write_gdc(str(tmp_path / "gdc"), counts, samples, genes, projects)
    out = tmp_path / "out"
    assert convert("--input", tmp_path / "gdc", "--out", out) == 0
    manifest = check(out, counts, samples, genes, projects)
    assert manifest.data["report"]["genes"]["n_par_y_dropped"] == 2
    assert manifest.data["source"]["gene_model"].startswith("GENCODE")


def test_xena_matrix_with_phenotype(tmp_path, data):
    counts, samples, genes, labels = data
    logged = np.log2(counts + 1.0)
    matrix = layouts.write_xena(str(tmp_path / "x.tsv.gz"), logged, samples, genes)
    pheno = tmp_path / "pheno.tsv"
    pd.DataFrame({"sample": samples, "_primary_disease": labels}).to_csv(
        pheno, sep="\t", index=False
    )
    out = tmp_path / "out"
    assert (
        convert(
            "--input",
            matrix,
            "--format",
            "xena",
            "--values",
            "log2",
            "--labels",
            pheno,
            "--label-column",
            "_primary_disease",
            "--out",
            out,
        )
        == 0
    )
    manifest = check(out, counts, samples, genes, labels)
    assert manifest.data["transform"] == "none"


@pytest.mark.parametrize(
    "name, orientation", [("t.csv", False), ("t.tsv", True), ("t.parquet", False)]
)
def test_tables(tmp_path, data, name, orientation):
    if name.endswith("parquet"):
        pytest.importorskip("pyarrow")
    counts, samples, genes, labels = data
    path = layouts.write_table(
        str(tmp_path / name),
        counts,
        samples,
        genes,
        labels=None if orientation else labels,
        genes_as_rows=orientation,
    )
    if orientation:
        label_file = tmp_path / "labels.csv"
        pd.DataFrame({"sample_id": samples, "label": labels}).to_csv(
            label_file, index=False
        )
        extra = ["--labels", label_file]
    else:
        extra = ["--label-column", "label"]
    out = tmp_path / "out"
    assert convert("--input", path, *extra, "--out", out) == 0
    manifest = check(out, counts, samples, genes, labels)
    assert manifest.data["source"]["orientation"] == (
        "genes_as_rows" if orientation else "samples_as_rows"
    )
