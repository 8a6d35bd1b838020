"""The dataset tools of `tfrecords_tools/`: convert, verify and align, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from keras_ssrl.data import Manifest
from tests.conftest import ROOT, load_script, small_matrix, write_samples_as_rows

convert_cli = load_script("tfrecords_tools/convert.py")
verify_cli = load_script("tfrecords_tools/verify.py")
align_cli = load_script("tfrecords_tools/align.py")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    counts, samples, genes, labels = small_matrix()
    folder = tmp_path_factory.mktemp("table")
    path = write_samples_as_rows(folder / "expr.csv", counts, samples, genes, labels)
    return path, counts, samples, genes, labels


def run(module, *argv):
    return module.main([str(a) for a in argv])


def test_csv_with_label_column(table, tmp_path):
    path, counts, samples, genes, labels = table
    out = tmp_path / "d"
    assert (
        run(
            convert_cli,
            "--input",
            path,
            "--label-column",
            "cancer_type",
            "--out",
            out,
            "--shards",
            2,
        )
        == 0
    )
    manifest = Manifest.load(str(out))
    assert manifest.labels == sorted(set(labels))
    assert manifest.data["source"]["format"] == "csv"
    assert "--label-column" in manifest.data["command"]
    assert run(verify_cli, out) == 0


def test_label_file_joined_on_sample_id(table, tmp_path):
    path, counts, samples, genes, labels = table
    plain = tmp_path / "plain.tsv"
    write_samples_as_rows(plain, counts, samples, genes, None, sep="\t")
    label_file = tmp_path / "pheno.tsv"
    pd.DataFrame(
        {"sample": samples[::-1] + ["EXTRA"], "tumour": labels[::-1] + ["x"]}
    ).to_csv(label_file, sep="\t", index=False)
    out = tmp_path / "d"
    assert (
        run(
            convert_cli,
            "--input",
            plain,
            "--labels",
            label_file,
            "--label-column",
            "tumour",
            "--out",
            out,
        )
        == 0
    )
    manifest = Manifest.load(str(out))
    assert manifest.labels == sorted(set(labels))
    assert manifest.data["report"]["n_label_rows_unused"] == 1


def test_genes_as_rows_table(table, tmp_path):
    path, counts, samples, genes, labels = table
    frame = pd.DataFrame(counts.T, columns=samples)
    frame.insert(0, "gene", genes)
    matrix = tmp_path / "genes_by_samples.tsv"
    frame.to_csv(matrix, sep="\t", index=False)
    label_file = tmp_path / "labels.csv"
    pd.DataFrame({"sample_id": samples, "label": labels}).to_csv(
        label_file, index=False
    )
    out = tmp_path / "d"
    assert (
        run(
            convert_cli,
            "--input",
            matrix,
            "--genes-as-rows",
            "--labels",
            label_file,
            "--out",
            out,
            "--record-dtype",
            "float32",
        )
        == 0
    )
    manifest = Manifest.load(str(out))
    assert manifest.n_genes == len(genes) - 1


def non_numeric(frame):
    frame = frame.astype({frame.columns[3]: object})
    frame.iloc[4, 3] = "abc"
    return frame


def negative(frame):
    frame.iloc[1, 2] = -5
    return frame


def duplicate_sample(frame):
    frame.loc[1, "sample_id"] = frame.loc[0, "sample_id"]
    return frame


@pytest.mark.parametrize(
    "mutate, message",
    [
        (non_numeric, "not a number"),
        (negative, "negative"),
        (duplicate_sample, "occurs more than once"),
    ],
)
def test_bad_tables_exit_non_zero_without_output(
    table, tmp_path, capsys, mutate, message
):
    path, *_ = table
    frame = mutate(pd.read_csv(path))
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    out = tmp_path / "out"
    assert (
        run(convert_cli, "--input", bad, "--label-column", "cancer_type", "--out", out)
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.csv" in err and message in err
    assert not out.exists()


def test_empty_file_and_unknown_orientation(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert run(convert_cli, "--input", empty, "--out", tmp_path / "o") == 2
    assert "empty.csv" in capsys.readouterr().err
    odd = tmp_path / "odd.csv"
    pd.DataFrame({"a": ["x", "y"], "b": [1, 2], "c": [3, 4]}).to_csv(odd, index=False)
    assert run(convert_cli, "--input", odd, "--out", tmp_path / "o") == 2
    assert "orientation" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_align_rewrites_onto_target_gene_order(dataset_dir, tmp_path, capsys):
    source = Manifest.load(dataset_dir)
    target = source.genes[::-2] + ["ENSG99999999999"]
    gene_file = tmp_path / "genes.txt"
    gene_file.write_text("\n".join(target) + "\n")
    out = tmp_path / "aligned"
    assert run(align_cli, dataset_dir, "--to", gene_file, "--out", out) == 0
    aligned = Manifest.load(str(out))
    assert aligned.genes == target[:-1]
    assert aligned.data["alignment"]["n_matched"] == len(target) - 1
    assert aligned.split_names == source.split_names
    np.testing.assert_array_equal(
        aligned.mean, source.mean[[source.genes.index(g) for g in aligned.genes]]
    )
    assert run(verify_cli, out) == 0
    wrong = tmp_path / "symbols.txt"
    wrong.write_text("TP53\nBRCA1\nEGFR\n")
    assert run(align_cli, dataset_dir, "--to", wrong, "--out", tmp_path / "x") == 2
    assert "0 of 3 genes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_aligned_to_another_dataset(table, dataset_dir, tmp_path, capsys):
    path, *_ = table
    out = tmp_path / "d"
    assert (
        run(
            convert_cli,
            "--input",
            path,
            "--label-column",
            "cancer_type",
            "--align-to",
            dataset_dir,
            "--out",
            out,
        )
        == 0
    )
    assert Manifest.load(str(out)).genes == Manifest.load(dataset_dir).genes
    assert "genes matched" in capsys.readouterr().out


def test_verify_exit_codes(dataset_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    shard = sorted(copy.glob("test-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-25])
    assert run(verify_cli, copy) == 1
    assert shard.name in capsys.readouterr().err
    assert run(verify_cli, tmp_path / "nothing") == 2


def test_scripts_run_from_a_shell(tmp_path):
    """The scripts start as users start them, from a shell, with no `sys.path`
    prelude (no script of the folder shadows a standard-library module)."""
    out = tmp_path / "builtin"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [
            sys.executable,
            "tfrecords_tools/convert.py",
            "--builtin",
            "synthetic-tcga",
            "--n-samples",
            "300",
            "--n-genes",
            "200",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "tfrecords_tools/verify.py", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "OK:" in done.stdout and "pretrain" in done.stdout


def test_outputs_of_the_readme_commands_are_git_ignored():
    """Run folders, datasets, results and exported models never show up as changes."""
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    paths = ["runs/scarf/x", "data/mine/x", "results/tcga/x", "models/ssrl/1/x",
             "examples/synthetic_tcga.csv", "predictions.csv"]  # fmt: skip
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.stdout.split() == paths, result.stderr
