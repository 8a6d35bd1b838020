"""Hardening of scripts/evaluate.py and scripts/reproduce.py (issue 10).

Every refusal is checked for what a user relies on: the exit status, a one-line
`error:` naming the flag, file or line, and that nothing outside --out changed (a
sentinel file and the dataset keep their checksums; a new --out is not created).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from keras_ssrl.evaluation import experiments, results
from tests.conftest import ROOT, array_source, load_script, small_matrix, tree_digest

LOGREG = ["logreg", "--fractions", "0.05,0.3", "--repeats", "1"]
FAST = ["--max-epochs", "1", "--patience", "1", "--repeats", "1"]


@pytest.fixture(scope="module")
def cli():
    return load_script("scripts/evaluate.py")


@pytest.fixture
def guard(tmp_path, labelled_dir):
    """Checksums of a sentinel file and of the dataset, compared after the test."""
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("not the tool's\n")
    before = tree_digest(sentinel), tree_digest(labelled_dir)
    yield
    assert (tree_digest(sentinel), tree_digest(labelled_dir)) == before


def error_line(capsys) -> str:
    """The command's stderr, checked to be one `error:` line and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def row(fraction: str, **changes) -> dict:
    """A valid results row of the logistic-regression experiment below."""
    values = {
        "setting": "custom", "method": "logreg", "mode": "none",
        "architecture": "4x256", "q": "1", "p": fraction, "repeat": "0", "seed": "7",
        "n_train": "19", "accuracy": "0.8", "balanced_accuracy": "0.75",
        "macro_f1": "0.7", "epochs": "0", "best_epoch": "0", "seconds": "0.5",
    }  # fmt: skip
    values.update(changes)
    return values


def experiment_folder(folder, data_dir, fractions=(0.05, 0.3)) -> str:
    """An experiment folder with `experiment.json` and one shard table per fraction."""
    experiment = experiments.Experiment(
        kind="label-efficiency", setting="custom", finetune_data=data_dir,
        methods=("logreg",), modes=("unfrozen",), fractions=fractions, repeats=1,
    )  # fmt: skip
    out = str(folder)
    results.prepare_out(experiment, out)
    for i, p in enumerate(("0.05", "0.3"), start=1):
        results.write_results(
            os.path.join(out, f"results.shard-{i}-of-2.csv"), [row(p)]
        )
    return out


# ------------------------------------------------------- item 3, 4: refuse first


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fractions", "0,0.5"], "(--fractions): 0.0 is not in (0, 1]"),
        (["--fractions", "nan,0.1"], "nan is not in (0, 1]"),
        (["--fractions", "0.1,inf"], "inf is not in (0, 1]"),
        (["--fractions", "0.1,x"], "--fractions: expected full, quick"),
        (["--fractions", "0.5,1.0"], "AUPC needs at least two fractions in [0.02"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--jobs", "0"], "--jobs must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--shard", "3/2"], "--shard 3/2"),
        (["--shard", "1/2", "--jobs", "2"], "exclusive"),
        (["--max-epochs", "0"], "max_epochs must be >= 1"),
        (["--learning-rate", "nan"], "learning_rate must be a finite number"),
        (["--methods", "baseline,vime"], "--pretrained vime=RUN_DIR"),
        (["--methods", "scarf", "--pretrained", "scarf=/no/such/run"], "/no/such/run"),
        (["--layers", "0"], "encoder depth (--depths, --layers)"),
    ],
)
def test_refused_arguments_leave_no_trace(cli, labelled_dir, tmp_path, guard, capsys,
                                          args, message):  # fmt: skip
    out = tmp_path / "out"
    base = ["label-efficiency", "--data", labelled_dir, "--methods", "baseline",
            "--fractions", "0.05,0.3", *FAST]  # fmt: skip
    assert cli.main([*base, *args, "--out", str(out)]) == 2
    assert message in error_line(capsys)
    assert not out.exists()  # no experiment.json: a correct rerun is not refused


def test_architecture_grid_is_checked_before_the_first_run(cli, labelled_dir, tmp_path,
                                                           guard, capsys):  # fmt: skip
    out = tmp_path / "arch"
    code = cli.main(["architectures", "--data", labelled_dir, "--methods", "baseline",
                     "--depths", "1,0", "--widths", "8", "--fractions", "0.05,0.3",
                     *FAST, "--out", str(out)])  # fmt: skip
    assert code == 2 and "encoder depth" in error_line(capsys)
    code = cli.main(["architectures", "--data", labelled_dir, "--methods", "baseline",
                     "--depths", "1", "--widths", "8", "--fractions", "0.5,1",
                     *FAST, "--out", str(out)])  # fmt: skip
    assert code == 2 and "AUPC needs at least two fractions" in error_line(capsys)
    assert not out.exists()


def test_missing_data_folder_is_refused(cli, tmp_path, capsys):
    out = tmp_path / "out"
    missing = str(tmp_path / "nowhere")
    assert cli.main([*LOGREG, "--data", missing, "--out", str(out)]) == 2
    assert missing in error_line(capsys)
    assert not out.exists()


def test_refused_command_leaves_an_existing_experiment_unchanged(
    cli, labelled_dir, tmp_path, guard, capsys
):
    out = tmp_path / "done"
    assert cli.main([*LOGREG, "--data", labelled_dir, "--out", str(out)]) == 0
    capsys.readouterr()
    before = tree_digest(out)
    bad = [a if a != "0.05,0.3" else "0.05,nan" for a in LOGREG]
    assert cli.main([*bad, "--data", labelled_dir, "--out", str(out)]) == 2
    assert "nan" in error_line(capsys)
    assert tree_digest(out) == before


def test_out_inside_the_dataset_is_refused(cli, labelled_dir, guard, capsys):
    out = os.path.join(labelled_dir, "results")
    assert cli.main([*LOGREG, "--data", labelled_dir, "--out", out]) == 2
    assert "inside the dataset folder" in error_line(capsys)
    assert not os.path.exists(out)


@pytest.mark.parametrize("content", ["a file", None])
def test_out_that_is_not_an_experiment_folder_is_refused(
    cli, labelled_dir, tmp_path, guard, capsys, content
):
    out = tmp_path / "mine"
    if content:  # --out is a file
        out.write_text(content)
    else:  # --out is a folder of someone's files, one named like a sweep's table
        out.mkdir()
        (out / "results.csv").write_text("my own table\n")
    before = tree_digest(out)
    assert cli.main([*LOGREG, "--data", labelled_dir, "--out", str(out)]) == 2
    message = error_line(capsys)
    assert str(out) in message
    assert ("not a folder" if content else "choose a new or empty folder") in message
    assert tree_digest(out) == before


def test_repeated_fractions_are_planned_once(cli, labelled_dir, tmp_path, capsys):
    """`0.1,0.1` left a sweep that could never complete (exit 3 forever)."""
    out = tmp_path / "twice"
    args = ["logreg", "--fractions", "0.05,0.3,0.05", "--repeats", "1"]
    assert cli.main([*args, "--data", labelled_dir, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fractions: 0.05 is given twice; it is planned once" in err
    rows = results.read_results(str(out / "results.csv"))
    assert sorted(r["p"] for r in rows) == ["0.05", "0.3"]


def test_folder_written_with_repeated_fractions_completes(
    cli, labelled_dir, tmp_path, capsys
):
    """A folder recorded with a repeated fraction (before the fix) merges complete."""
    out = experiment_folder(tmp_path / "old", labelled_dir, fractions=(0.05, 0.3, 0.05))
    assert cli.main(["merge", "--out", out]) == 0
    assert "2 of 2 runs" in capsys.readouterr().out


# ---------------------------------------------------------- item 6, 7: merge checks


@pytest.mark.parametrize(
    "damage, line, message",
    [
        ({"accuracy": "5.0"}, 2, "accuracy is '5.0', not a number in [0, 1]"),
        ({"accuracy": "abc"}, 2, "accuracy is 'abc', not a number in [0, 1]"),
        ({"macro_f1": "nan"}, 2, "macro_f1 is 'nan'"),
        ({"n_train": ""}, 2, "n_train is empty"),
        ({"n_train": "0"}, 2, "n_train is '0', not an integer >= 1"),
        ({"p": "1.5"}, 2, "p is '1.5', not a number in (0, 1]"),
        ({"repeat": "-1"}, 2, "repeat is '-1'"),
        ({"seconds": "-2"}, 2, "seconds is '-2'"),
        ({"method": "baseline", "epochs": "0"}, 2,
         "epochs 0 and best_epoch 0 are impossible for baseline"),
        ("cut", 3, "the row is cut (no end of line)"),
        ("short", 3, "11 fields, the header has 15"),
    ],
)
def test_merge_refuses_impossible_or_cut_rows(cli, labelled_dir, tmp_path, capsys,
                                              damage, line, message):  # fmt: skip
    out = experiment_folder(tmp_path / "exp", labelled_dir)
    shard = os.path.join(out, "results.shard-2-of-2.csv")
    if isinstance(damage, dict):
        results.write_results(shard, [row("0.3", **damage)])
    else:  # a second row, cut by a writer that stopped (or a short line)
        with open(shard, "a") as handle:
            handle.write("custom,logreg,none,4x256,1,0.05,1,7,19,0.8,0.7")
            handle.write("" if damage == "cut" else "\n")
    before = tree_digest(out)
    assert cli.main(["merge", "--out", out]) == 2
    text = error_line(capsys)
    assert f"{shard}, line {line}: {message}" in text
    assert "remove that line" in text
    assert tree_digest(out) == before  # no results.csv, no summary


def test_merge_with_a_non_numeric_cell_prints_one_line(labelled_dir, tmp_path):
    """As a user runs it: exit 2, one `error:` line, no traceback."""
    out = experiment_folder(tmp_path / "exp", labelled_dir)
    shard = os.path.join(out, "results.shard-1-of-2.csv")
    results.write_results(shard, [row("0.05", accuracy="0,8")])
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "merge",
         "--out", out],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: "), done.stderr
    assert "line 2: accuracy is '0,8'" in lines[0]


def test_valid_shards_merge(cli, labelled_dir, tmp_path):
    out = experiment_folder(tmp_path / "exp", labelled_dir)
    assert cli.main(["merge", "--out", out]) == 0
    assert len(results.read_results(os.path.join(out, "results.csv"))) == 2
    assert os.path.exists(os.path.join(out, "aupc.csv"))


def test_resume_refuses_a_damaged_results_table(cli, labelled_dir, tmp_path, capsys):
    out = experiment_folder(tmp_path / "exp", labelled_dir)
    results.write_results(
        os.path.join(out, "results.csv"), [row("0.05", accuracy="5.0")]
    )
    before = tree_digest(out)
    assert cli.main([*LOGREG, "--data", labelled_dir, "--out", out]) == 2
    assert "results.csv, line 2: accuracy is '5.0'" in error_line(capsys)
    assert tree_digest(out) == before


# ---------------------------------------------------------------- item 5: locks


class Holder:
    """Another process holding one lock of a folder until stopped."""

    def __init__(self, folder: str, name: str):
        code = (
            "import sys, time\n"
            "from keras_ssrl.files import FolderLock\n"
            "FolderLock(sys.argv[1], 'test', name=sys.argv[2]).acquire()\n"
            "print('locked', flush=True)\n"
            "time.sleep(300)\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, folder, name],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        assert self.process.stdout.readline().strip() == "locked"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


def test_second_process_on_one_results_table_is_refused(
    cli, labelled_dir, tmp_path, capsys
):
    out = experiment_folder(tmp_path / "exp", labelled_dir)
    holder = Holder(out, results.lock_name(None))
    try:
        before = tree_digest(out)
        for args in (["merge", "--out", out],
                     [*LOGREG, "--data", labelled_dir, "--out", out]):  # fmt: skip
            assert cli.main(args) == 2
            message = error_line(capsys)
            assert f"in use by process {holder.process.pid}" in message
        assert tree_digest(out) == before
    finally:
        holder.stop()
    # The holder died (as after kill -9): its lock is taken over.
    assert cli.main(["merge", "--out", out]) == 0


def test_shards_lock_only_their_own_table(cli, labelled_dir, tmp_path, capsys):
    out = str(tmp_path / "sharded")
    args = [*LOGREG, "--data", labelled_dir, "--out", out]
    holder = Holder(out, results.lock_name((1, 2)))
    try:
        assert cli.main([*args, "--shard", "1/2"]) == 2
        assert f"process {holder.process.pid}" in error_line(capsys)
        assert not os.path.exists(os.path.join(out, "experiment.json"))
        assert cli.main([*args, "--shard", "2/2"]) == 0  # another table: runs
    finally:
        holder.stop()
    assert cli.main([*args, "--shard", "1/2"]) == 0
    assert cli.main(["merge", "--out", out]) == 0


# -------------------------------------------------------------- item 10: classes


@pytest.fixture(scope="module")
def one_class_dir(tmp_path_factory):
    from keras_ssrl.config import ConversionConfig
    from keras_ssrl.data.convert import convert

    counts, samples, genes, _ = small_matrix(n_samples=80)
    out = str(tmp_path_factory.mktemp("one-class") / "data")
    source = array_source(counts, samples, genes, ["only"] * len(samples))
    convert(source, out, ConversionConfig(shards=1), log=lambda _: None)
    return out


def test_fewer_than_two_classes_is_refused_before_any_run(
    cli, one_class_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    before = tree_digest(one_class_dir)
    assert cli.main([*LOGREG, "--data", one_class_dir, "--out", str(out)]) == 2
    message = error_line(capsys)
    assert one_class_dir in message and "1 class" in message
    assert not out.exists()
    assert tree_digest(one_class_dir) == before


def test_small_test_split_is_warned_on_stderr_and_in_the_report(
    cli, labelled_dir, tmp_path, capsys
):
    from keras_ssrl.evaluation.report import write_report

    out = tmp_path / "label-efficiency"
    assert cli.main([*LOGREG, "--data", labelled_dir, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "test split is too small" in err
    assert "--test-size" in err and labelled_dir in err
    report = open(write_report(str(tmp_path), preset="test", setting="custom")).read()
    assert "test split is too small" in report and "--test-size" in report


# --------------------------------------------------------------- collapse, reproduce


def test_collapse_refusal_leaves_no_out(cli, tiny_scarf_run, dataset_dir, tmp_path,
                                        capsys):  # fmt: skip
    out = tmp_path / "collapse"
    code = cli.main(["collapse", "--runs", f"scarf={tiny_scarf_run}", "--data",
                     dataset_dir, "--out", str(out)])  # fmt: skip
    assert code == 2 and "genes" in error_line(capsys)
    assert not out.exists()


def test_reproduce_checks_every_experiment_before_the_first(labelled_dir, tmp_path,
                                                            guard, capsys):  # fmt: skip
    reproduce = load_script("scripts/reproduce.py")
    out = tmp_path / "reproduce"
    common = ["--data", labelled_dir, "--preset", "smoke", "--out", str(out),
              "--jobs", "1", "--pretrain-epochs", "1", "--max-epochs", "1"]  # fmt: skip
    assert reproduce.main([*common, "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in error_line(capsys)
    assert not out.exists()
    # The third experiment's folder holds another experiment: refused before the
    # first one trains anything.
    other = experiments.Experiment(kind="pretrain-size", fractions=(0.1,))
    results.prepare_out(other, str(out / "pretrain-size"))
    before = tree_digest(out)
    assert reproduce.main(common) == 2
    assert "holds another experiment" in error_line(capsys)
    assert tree_digest(out) == before
    assert sorted(os.listdir(out)) == ["pretrain-size"]
