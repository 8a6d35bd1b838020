"""The data tools never read, write or delete outside their own folders, and refuse bad
input before doing any work (issue 10: shard entries, --overwrite, early validation,
unwritable --out, inconsistent manifests, stale temporaries, too-small splits)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from keras_ssrl.config import ConversionConfig, SplitConfig
from keras_ssrl.data import DamagedDataError, DataError, Manifest, convert, load_dataset
from keras_ssrl.data import output as output_module
from tests.conftest import (
    array_source,
    load_script,
    small_matrix,
    tree_digest,
    write_samples_as_rows,
)

convert_cli = load_script("tfrecords_tools/convert.py")
verify_cli = load_script("tfrecords_tools/verify.py")
align_cli = load_script("tfrecords_tools/align.py")
QUIET = {"log": lambda _: None}


def run(module, *argv):
    return module.main([str(a) for a in argv])


def error_lines(capsys) -> list[str]:
    """stderr of the last command, checked to be a short `error:` and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), err
    return lines


def leftovers(folder) -> list[str]:
    """Temporary folders a converter or alignment left in `folder`."""
    return [name for name in os.listdir(folder) if ".tmp-" in name]


def dead_pid() -> int:
    """The PID of a process that has ended (as a kill -9 leaves it)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    counts, samples, genes, labels = small_matrix()
    folder = tmp_path_factory.mktemp("table")
    return write_samples_as_rows(folder / "expr.csv", counts, samples, genes, labels)


def convert_table(table, out, *extra):
    return run(
        convert_cli, "--input", table, "--label-column", "cancer_type", "--out", out,
        "--shards", 2, *extra,
    )  # fmt: skip


# --- 1. shard entries may only name files inside the dataset folder ----------------


def escaping_dataset(dataset_dir, tmp_path, kind):
    """A copy of `dataset_dir` whose first shard entry leads to `victim.tfrecord`.

    The victim (a valid shard of the same dataset, so that a tool following the entry
    would read it without complaint) lies outside the copy.
    """
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = manifest["splits"]["pretrain"]["shards"][0]
    victim = tmp_path / "victim.tfrecord"
    shutil.copy(data / shard["file"], victim)
    if kind == "parent":
        shard["file"] = "../victim.tfrecord"
    elif kind == "absolute":
        shard["file"] = str(victim)
    else:  # a link inside the folder that points outside it
        os.remove(data / shard["file"])
        os.symlink(victim, data / shard["file"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data, victim, shard["file"]


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_shard_entries_outside_the_folder_are_refused(
    dataset_dir, tmp_path, capsys, kind
):
    data, victim, entry = escaping_dataset(dataset_dir, tmp_path, kind)
    out = tmp_path / "aligned"
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(Manifest.load(dataset_dir).genes) + "\n")
    before = tree_digest(tmp_path)

    assert run(verify_cli, data) == 2
    (line,) = error_lines(capsys)
    assert repr(entry) in line and "manifest.json" in line

    assert run(align_cli, data, "--to", genes, "--out", out) == 2
    assert repr(entry) in error_lines(capsys)[0]

    assert run(convert_cli, "--builtin", "synthetic-tcga", "--n-samples", 300,
               "--n-genes", 100, "--align-to", data, "--out", out) == 2  # fmt: skip
    assert repr(entry) in error_lines(capsys)[0]

    with pytest.raises(DataError, match="outside|separator|absolute"):
        load_dataset(str(data), "pretrain", 8)

    pretrain_cli = load_script("scripts/pretrain.py")
    run_dir = tmp_path / "run"
    code = run(pretrain_cli, "--method", "scarf", "--data", data, "--out", run_dir,
               "--epochs", 1, "--progress", "none")  # fmt: skip
    assert code == 2
    assert repr(entry) in capsys.readouterr().err

    # Nothing was written anywhere: not the victim, not an output, no temporaries.
    assert tree_digest(tmp_path) == before
    assert not out.exists() and not run_dir.exists()
    assert not leftovers(tmp_path)


def test_align_writes_its_shards_only_inside_its_output(dataset_dir, tmp_path):
    """Output shard paths are built from the entries too: they must land in --out."""
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(Manifest.load(dataset_dir).genes[:10]) + "\n")
    out = tmp_path / "aligned"
    assert run(align_cli, dataset_dir, "--to", genes, "--out", out) == 0
    written = set(os.listdir(out))
    manifest = Manifest.load(str(out))
    for split in manifest.split_names:
        for path in manifest.shard_paths(split):
            assert os.path.dirname(path) == str(out)
            assert os.path.basename(path) in written
    assert sorted(os.listdir(tmp_path)) == ["aligned", "genes.txt"]


# --- 2. --overwrite replaces only a dataset the converter wrote ----------------------


def test_overwrite_refuses_a_folder_of_other_files(table, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "figures").mkdir()
    (out / "figures" / "f1.png").write_bytes(b"\x89PNG")
    before = tree_digest(out)
    assert convert_table(table, out, "--overwrite") == 2
    (line,) = error_lines(capsys)
    assert str(out) in line and "thesis.tex" in line and "not a dataset" in line
    assert tree_digest(out) == before
    assert not leftovers(tmp_path)


def test_overwrite_refuses_a_dataset_with_foreign_files(table, tmp_path, capsys):
    out = tmp_path / "d"
    assert convert_table(table, out) == 0
    capsys.readouterr()  # the first conversion's own messages
    (out / "notes.txt").write_text("mine")
    before = tree_digest(out)
    assert convert_table(table, out, "--overwrite") == 2
    (line,) = error_lines(capsys)
    assert str(out) in line and "notes.txt" in line
    assert tree_digest(out) == before


def test_overwrite_never_replaces_a_folder_holding_an_input(table, tmp_path, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(table, folder / "expr.csv")
    before = tree_digest(tmp_path)
    for out in (folder, tmp_path, folder / "expr.csv"):
        code = run(convert_cli, "--input", folder / "expr.csv", "--label-column",
                   "cancer_type", "--out", out, "--overwrite")  # fmt: skip
        assert code == 2
        assert "input" in error_lines(capsys)[0]
    assert tree_digest(tmp_path) == before
    assert not leftovers(tmp_path) and not leftovers(folder)


def test_overwrite_never_replaces_the_alignment_target(
    table, dataset_dir, tmp_path, capsys
):
    target = tmp_path / "target"
    shutil.copytree(dataset_dir, target)
    before = tree_digest(target)
    code = run(convert_cli, "--input", table, "--label-column", "cancer_type",
               "--align-to", target, "--out", target, "--overwrite")  # fmt: skip
    assert code == 2 and "input" in error_lines(capsys)[0]
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(Manifest.load(dataset_dir).genes) + "\n")
    assert run(align_cli, target, "--to", genes, "--out", target, "--overwrite") == 2
    assert "input" in error_lines(capsys)[0]
    assert tree_digest(target) == before


def test_overwrite_replaces_a_previous_dataset_atomically(table, tmp_path, capsys):
    out = tmp_path / "d"
    assert convert_table(table, out, "--seed", 1) == 0
    capsys.readouterr()  # the first conversion's own messages
    first = tree_digest(out)
    assert convert_table(table, out, "--seed", 2) == 2  # no --overwrite
    assert "--overwrite" in error_lines(capsys)[0]
    assert tree_digest(out) == first
    assert convert_table(table, out, "--seed", 2, "--overwrite") == 0
    assert tree_digest(out) != first
    assert Manifest.load(str(out)).data["config"]["split"]["seed"] == 2
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_a_failed_swap_keeps_the_old_dataset(dataset_dir, tmp_path, monkeypatch):
    out = tmp_path / "d"
    shutil.copytree(dataset_dir, out)
    before = tree_digest(out)
    replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(f".d.tmp-{os.getpid()}"):  # moving the new one in
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(output_module.os, "replace", failing_replace)
    counts, samples, genes, labels = small_matrix()
    with pytest.raises(DataError, match="cannot move the new dataset into place"):
        convert(array_source(counts, samples, genes, labels), str(out),
                overwrite=True, **QUIET)  # fmt: skip
    assert tree_digest(out) == before
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_a_plain_file_is_not_an_output_folder(table, tmp_path, capsys):
    out = tmp_path / "data.csv"
    out.write_text("precious")
    assert convert_table(table, out, "--overwrite") == 2
    assert "is a file" in error_lines(capsys)[0]
    assert out.read_text() == "precious"


# --- 3. every argument is checked before anything is written -------------------------


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--val-fraction", "nan", "--val-fraction must be"),
        ("--val-fraction", "1.5", "--val-fraction must be"),
        ("--min-overlap", "1.5", "--min-overlap must be"),
        ("--shards", "0", "--shards must be"),
        ("--seed", "-1", "--seed must be"),
        ("--finetune-size", "1.5", "--finetune-size must be"),
        ("--test-size", "inf", "--test-size must be"),
        ("--min-class-size", "0", "--min-class-size must be"),
    ],
)
def test_bad_settings_are_refused_before_any_write(
    table, tmp_path, capsys, flag, value, message
):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("untouched")
    out = tmp_path / "new" / "deeper" / "d"
    assert convert_table(table, out, flag, value) == 2
    (line,) = error_lines(capsys)
    assert message in line and value in line
    assert sorted(os.listdir(tmp_path)) == ["sentinel.txt"]


def test_failure_after_start_leaves_no_parent_folders(tmp_path):
    counts, samples, genes, labels = small_matrix()
    counts = counts.copy()
    counts[3, 2] = np.nan  # found during the first pass, after the folders exist
    with pytest.raises(DataError, match="missing"):
        convert(array_source(counts, samples, genes, labels),
                str(tmp_path / "new" / "deeper" / "d"), **QUIET)  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_builtin_sizes_are_checked(tmp_path, capsys):
    out = tmp_path / "d"
    assert run(convert_cli, "--builtin", "synthetic-tcga", "--n-samples", 3,
               "--out", out) == 2  # fmt: skip
    assert "n_samples" in error_lines(capsys)[0]
    assert os.listdir(tmp_path) == []


# --- 4. unwritable --out: one line, no traceback -------------------------------------


def test_out_under_a_file_is_refused(table, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "sub" / "d"
    assert convert_table(table, out) == 2
    (line,) = error_lines(capsys)
    assert str(out) in line and "is a file" in line
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes into read-only folders",
)
def test_out_in_a_read_only_folder_is_refused(table, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert convert_table(table, locked / "d") == 2
        (line,) = error_lines(capsys)
        assert "not writable" in line and str(locked) in line
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


# --- 5. an inconsistent manifest is one problem, not one per shard -------------------


def edited(dataset_dir, tmp_path, edit):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    edit(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def wrong_n_genes(manifest):
    manifest["n_genes"] += 1


def short_statistics(manifest):
    manifest["statistics"]["std"] = manifest["statistics"]["std"][:-1]


def one_gene_less(manifest):
    """Consistent within itself, but no longer with the records."""
    manifest["n_genes"] -= 1
    manifest["genes"].pop()
    for key in ("mean", "std"):
        manifest["statistics"][key].pop()


@pytest.mark.parametrize(
    "edit, message",
    [
        (wrong_n_genes, "n_genes says 24, genes lists 23"),
        (short_statistics, "statistics.std has 22"),
        (one_gene_less, "n_genes says 22 (88 bytes of float32), every shard's records"),
    ],
)
def test_verify_names_the_manifest_once(dataset_dir, tmp_path, capsys, edit, message):
    data = edited(dataset_dir, tmp_path, edit)
    assert run(verify_cli, data) == 1
    err = capsys.readouterr().err
    assert "FAILED: 1 problem(s)" in err and "Traceback" not in err
    assert "manifest.json is inconsistent" in err and message in err
    assert ".tfrecord" not in err  # no shard is blamed


def test_reader_refuses_an_inconsistent_manifest(dataset_dir, tmp_path):
    data = edited(dataset_dir, tmp_path, wrong_n_genes)
    with pytest.raises(DamagedDataError, match="manifest.json is inconsistent"):
        load_dataset(str(data), "pretrain", 8)


def test_align_names_a_damaged_shard(dataset_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    shard = sorted(data.glob("test-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-25])
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(Manifest.load(dataset_dir).genes) + "\n")
    assert run(align_cli, data, "--to", genes, "--out", tmp_path / "out") == 1
    line = error_lines(capsys)[0]
    assert shard.name in line and "verify.py" in line
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# --- 6. temporaries of killed runs are removed by the next run -----------------------


def test_stale_temporaries_are_removed_live_ones_kept(table, tmp_path, capsys):
    dead, alive = dead_pid(), os.getppid()
    for pid in (dead, alive):
        (tmp_path / f".d.tmp-{pid}").mkdir()
        (tmp_path / f".d.tmp-{pid}" / "pretrain-00000-of-00002.tfrecord").write_bytes(
            b"half"
        )
    (tmp_path / f".d.tmp-{dead}.old").mkdir()
    assert convert_table(table, tmp_path / "d") == 0
    assert f"left by process {dead}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(["d", f".d.tmp-{alive}"])


def test_a_dataset_moved_aside_by_a_killed_replacement_is_restored(
    dataset_dir, tmp_path, capsys
):
    old = tmp_path / f".d.tmp-{dead_pid()}.old"
    shutil.copytree(dataset_dir, old)
    before = tree_digest(old)
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(Manifest.load(dataset_dir).genes) + "\n")
    assert run(align_cli, dataset_dir, "--to", genes, "--out", tmp_path / "d") == 2
    err = capsys.readouterr().err
    assert "already holds a dataset" in err
    assert tree_digest(tmp_path / "d") == before
    assert sorted(os.listdir(tmp_path)) == ["d", "genes.txt"]


# --- 7. too-small splits are flagged at conversion -----------------------------------


def test_small_test_split_is_flagged(tmp_path):
    counts, samples, genes, labels = small_matrix()
    lines = []
    manifest = convert(
        array_source(counts, samples, genes, labels), str(tmp_path / "d"),
        log=lines.append,
    )  # fmt: skip
    (warning,) = manifest.data["report"]["warnings"]
    assert "test split has 13 samples" in warning and "--test-size" in warning
    assert "--finetune-size" in warning
    assert f"warning: {warning}" in lines


def test_single_class_and_large_splits(tmp_path):
    counts, samples, genes, _ = small_matrix(n_samples=400)
    manifest = convert(
        array_source(counts, samples, genes, ["only"] * 400), str(tmp_path / "one"),
        ConversionConfig(split=SplitConfig(finetune_size=0.2)), **QUIET,
    )  # fmt: skip
    assert any("1 class" in w for w in manifest.data["report"]["warnings"])
    counts, samples, genes, labels = small_matrix(n_samples=400, n_classes=4)
    manifest = convert(
        array_source(counts, samples, genes, labels), str(tmp_path / "four"),
        ConversionConfig(split=SplitConfig(finetune_size=0.2)), **QUIET,
    )  # fmt: skip
    assert "warnings" not in manifest.data["report"]
