"""Pre-training and fine-tuning refuse bad input before writing, lock their folders,
name damaged shards and finish a run a late SIGTERM would have lost (issue 10)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import keras
import pytest

from keras_ssrl.config import (
    ConfigError,
    ConversionConfig,
    PretrainConfig,
    validate_config,
)
from keras_ssrl.data.convert import convert
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.files import LOCK_FILE, FolderLock
from keras_ssrl.finetuning import FinetuneError, check_labelled_splits
from tests.conftest import array_source, load_script, quiet, small_matrix, tree_digest

pretrain_cli = load_script("scripts/pretrain.py")
finetune_cli = load_script("scripts/finetune.py")

# Tiny heads: a pre-training epoch on `labelled_dir` takes about a second.
TINY = {
    "epochs": 1,
    "batch_size": 64,
    "encoder": {"layers": 1, "width": 8},
    "scarf": {"projector_hidden": 8, "projector_dim": 8},
    "byol": {"hidden": 16, "projection_dim": 8},
}


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "sentinel.txt"
    path.write_text("a file of the user's, next to the outputs\n")
    return path


def run(cli, argv, capsys) -> tuple[int, str]:
    """Runs a script's `main`; returns its status and stderr."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_clean_error(err: str, *names: str) -> None:
    """One or two `error: ` lines naming every one of `names`, no traceback.

    Warnings (small test splits) may come first, on lines of their own.
    """
    lines = [
        line for line in err.strip().splitlines() if not line.startswith("warning:")
    ]
    assert lines and lines[0].startswith("error: "), err
    assert len(lines) <= 2 and "Traceback" not in err, err
    for name in names:
        assert str(name) in err, (name, err)


def pretrain_args(data, out, preset, *extra):
    return ["--method", "scarf", "--data", data, "--out", out, "--config", preset,
            "--progress", "none", *extra]  # fmt: skip


# ------------------------------------------------------------------ pre-training


@pytest.mark.parametrize(
    "path, value",
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("learning_rate", float("nan")),
        ("learning_rate", float("inf")),
        ("seed", -1),
        ("pretrain_fraction", 1.5),
        ("encoder.layers", 0),
        ("encoder.width", 0),
        ("encoder.dropout", 1.0),
        ("scarf.corruption_rate", 1.5),
        ("scarf.temperature", 0.0),
        ("scarf.projector_hidden", 0),
        ("scarf.projector_dim", 0),
        ("vime.mask_rate", -0.1),
        ("vime.alpha", -1.0),
        ("byol.corruption_rate", float("nan")),
        ("byol.hidden", 0),
        ("byol.projection_dim", 0),
        ("byol.ema_base", 1.5),
        ("byol.ema_schedule", "linear"),
        ("byol.symmetric", 1),
        ("keep", "first"),
        ("precision", "float64"),
    ],
)
def test_validate_config_refuses_every_out_of_range_setting(path, value):
    config = PretrainConfig()
    *parents, name = path.split(".")
    setattr(getattr(config, parents[0]) if parents else config, name, value)
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")) as caught:
        validate_config(config)
    assert caught.value.field == path
    validate_config(PretrainConfig())  # the defaults are valid


def test_refused_pretraining_leaves_no_trace(labelled_dir, tmp_path, preset, sentinel,
                                             capsys):  # fmt: skip
    out = tmp_path / "run"
    data_before, sentinel_before = tree_digest(labelled_dir), tree_digest(sentinel)
    bad_preset = tmp_path / "bad.json"
    bad_preset.write_text(json.dumps({**TINY, "scarf": {"projector_dim": 0}}))
    refused = [
        # (extra arguments, what the message names)
        (["--corruption-rate", "1.5"], ["scarf.corruption_rate", "--corruption-rate"]),
        (["--temperature", "0"], ["scarf.temperature", "--temperature"]),
        (["--dropout", "1"], ["encoder.dropout", "--dropout"]),
        (["--width", "0"], ["encoder.width", "--width"]),
        (["--learning-rate", "nan"], ["learning_rate", "--learning-rate"]),
        (["--seed", "-1"], ["seed", "--seed"]),
        (["--checkpoint-every", "-1"], ["checkpoint_every", "--checkpoint-every"]),
        (["--config", bad_preset], ["scarf.projector_dim"]),
        (["--batch-size", "1"], ["batch_size 1"]),
        # A subset of one sample cannot make a batch.
        (["--pretrain-fraction", "0.001"], ["pretrain_fraction"]),
        (["--resume"], ["no run to resume", out]),
    ]
    for extra, names in refused:
        code, err = run(pretrain_cli, pretrain_args(labelled_dir, out, preset, *extra),
                        capsys)  # fmt: skip
        assert code == 2, (extra, err)
        assert_clean_error(err, *names)
        assert not out.exists(), extra
    for extra, names in [
        (
            ["--method", "vime", "--mask-rate", "-0.1"],
            ["vime.mask_rate", "--mask-rate"],
        ),
        (["--method", "byol", "--ema-base", "1.5"], ["byol.ema_base", "--ema-base"]),
    ]:  # the later --method wins
        code, err = run(pretrain_cli, pretrain_args(labelled_dir, out, preset, *extra),
                        capsys)  # fmt: skip
        assert code == 2 and not out.exists(), err
        assert_clean_error(err, *names)
    missing = tmp_path / "no-such-data"
    code, err = run(pretrain_cli, pretrain_args(missing, out, preset), capsys)
    assert code == 2 and not out.exists()
    assert_clean_error(err, missing)
    assert tree_digest(labelled_dir) == data_before
    assert tree_digest(sentinel) == sentinel_before

    # The same --out then takes the correct command.
    code, err = run(pretrain_cli, pretrain_args(labelled_dir, out, preset), capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_pretraining_never_writes_among_foreign_files(labelled_dir, tmp_path, preset,
                                                     capsys):  # fmt: skip
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    copy = tmp_path / "data"
    shutil.copytree(labelled_dir, copy)
    before = {p: tree_digest(p) for p in (folder, a_file, copy)}
    cases = [
        (folder, ["notes.txt", "not a pre-training run"]),
        (a_file, ["is not a folder"]),
        (copy / "run", ["inside the dataset folder"]),
    ]
    for out, names in cases:
        data = copy if out == copy / "run" else labelled_dir
        code, err = run(pretrain_cli, pretrain_args(data, out, preset), capsys)
        assert code == 2, err
        assert_clean_error(err, out, *names)
    assert {p: tree_digest(p) for p in before} == before
    assert not (copy / "run").exists()


def test_one_process_per_run_folder(tiny_scarf_run, labelled_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_scarf_run, run_dir)
    args = ["--method", "scarf", "--data", labelled_dir, "--out", run_dir, "--resume",
            "--progress", "none"]  # fmt: skip
    with FolderLock(str(run_dir), "run folder"):
        before = tree_digest(run_dir)
        code, err = run(pretrain_cli, args, capsys)
        assert code == 2
        assert_clean_error(err, f"process {os.getpid()}", run_dir)
        assert tree_digest(run_dir) == before

    # A lock (and a temporary) left by a process that no longer runs: taken over.
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = finished.pid
    (run_dir / LOCK_FILE).write_text(
        f"pid={dead}\nhost={socket.gethostname()}\ncommand=killed\n"
    )
    stale = run_dir / f"encoder.keras.tmp-{dead}.keras"
    stale.write_text("half an encoder")
    code, err = run(pretrain_cli, args, capsys)
    assert code == 0, err
    assert not stale.exists()
    assert f"pid={os.getpid()}" in (run_dir / LOCK_FILE).read_text()


def test_damaged_shard_is_named(labelled_dir, tmp_path, preset, sentinel, capsys):
    data = tmp_path / "data"
    shutil.copytree(labelled_dir, data)
    manifest = Manifest.load(str(data))
    shard = manifest.shard_paths("pretrain")[-1]
    raw = bytearray(open(shard, "rb").read())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    with open(shard, "wb") as handle:  # same size: the reader's size check passes
        handle.write(raw)
    sentinel_before = tree_digest(sentinel)
    out = tmp_path / "run"
    code, err = run(pretrain_cli, pretrain_args(data, out, preset), capsys)
    assert code == 1, err
    assert_clean_error(err, os.path.basename(shard), "tfrecords_tools/verify.py")
    assert tree_digest(sentinel) == sentinel_before


def test_sigterm_once_training_finished_completes_the_run(
    labelled_dir, tmp_path, preset, monkeypatch, capsys
):
    from keras_ssrl.training import outputs

    write_projector = outputs.write_projector

    def signalled(*args, **kwargs):  # SIGTERM while the outputs are being written
        os.kill(os.getpid(), signal.SIGTERM)
        return write_projector(*args, **kwargs)

    monkeypatch.setattr(outputs, "write_projector", signalled)

    def killed(signum, frame):  # the default action: the process would end (143)
        raise RuntimeError("SIGTERM ended the process after training")

    previous = signal.signal(signal.SIGTERM, killed)
    try:
        out = tmp_path / "run"
        code, err = run(pretrain_cli, pretrain_args(labelled_dir, out, preset), capsys)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["projector_rows"] > 0
    assert keras.saving.load_model(out / "encoder.keras").output_shape[-1] == 8
    assert (out / "logs" / "embeddings" / "metadata.tsv").is_file()


# -------------------------------------------------------------------- fine-tuning


def finetune_args(data, out, *extra):
    return ["--baseline", "--data", data, "--out", out, "--layers", "1", "--width",
            "8", "--max-epochs", "2", "--quiet", *extra]  # fmt: skip


def test_refused_finetuning_leaves_no_trace(labelled_dir, tmp_path, sentinel, capsys):
    out = tmp_path / "ft"
    data_before, sentinel_before = tree_digest(labelled_dir), tree_digest(sentinel)
    refused = [
        (["--fraction", "nan"], ["fraction"]),
        (["--fraction", "inf"], ["fraction"]),
        (["--fraction", "0"], ["fraction"]),
        (["--fraction", "1.5"], ["fraction"]),
        (["--batch-size", "0"], ["batch_size"]),
        (["--learning-rate", "-1"], ["learning_rate"]),
        (["--repeat", "-1"], ["repeat"]),
        (["--layers", "0"], ["encoder.layers"]),
    ]
    for extra, names in refused:
        code, err = run(finetune_cli, finetune_args(labelled_dir, out, *extra), capsys)
        assert code == 2, (extra, err)
        assert_clean_error(err, *names)
        assert not out.exists(), extra
    code, err = run(finetune_cli, finetune_args(labelled_dir, out)[1:]  # no source
                    + ["--encoder", tmp_path / "nothing"], capsys)  # fmt: skip
    assert code == 2 and not out.exists()
    assert_clean_error(err, "not a pre-training run")
    assert tree_digest(labelled_dir) == data_before
    assert tree_digest(sentinel) == sentinel_before

    # The same --out then takes the correct command; the small test split is warned
    # about (19 classes, about 3 test samples each), naming the converter's flags.
    code, err = run(finetune_cli, finetune_args(labelled_dir, out), capsys)
    assert code == 0, err
    assert "warning:" in err and "--test-size" in err and "--finetune-size" in err
    assert (out / "config.json").is_file()


def test_finetune_refuses_an_unloadable_encoder(tiny_scarf_run, labelled_dir,
                                               tmp_path, capsys):  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(os.path.join(tiny_scarf_run, "config.json"), run_dir)
    (run_dir / "encoder.keras").write_bytes(os.urandom(2048))
    out = tmp_path / "ft"
    code, err = run(finetune_cli, ["--encoder", run_dir, "--data", labelled_dir,
                                   "--out", out, "--max-epochs", "1"], capsys)  # fmt: skip
    assert code == 2
    assert_clean_error(err, run_dir / "encoder.keras", "cannot load the encoder")
    assert not out.exists()


def test_finetune_lock_names_the_holder(labelled_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    with FolderLock(str(out), "fine-tuning folder"):
        code, err = run(finetune_cli, finetune_args(labelled_dir, out), capsys)
        assert code == 2
        assert_clean_error(err, f"process {os.getpid()}")
        assert os.listdir(out) == [LOCK_FILE]  # nothing written


@pytest.fixture(scope="module")
def one_class_dir(tmp_path_factory):
    counts, samples, genes, _ = small_matrix(n_samples=60)
    out = str(tmp_path_factory.mktemp("one-class") / "data")
    source = array_source(counts, samples, genes, ["only"] * len(samples))
    convert(source, out, ConversionConfig(shards=1), log=quiet)
    return out


def test_finetuning_refuses_a_single_class(one_class_dir, tmp_path, sentinel, capsys):
    with pytest.raises(FinetuneError, match="1 class"):
        check_labelled_splits(Manifest.load(one_class_dir))
    before = tree_digest(one_class_dir), tree_digest(sentinel)
    out = tmp_path / "ft"
    code, err = run(finetune_cli, finetune_args(one_class_dir, out), capsys)
    assert code == 2
    assert_clean_error(err, one_class_dir, "1 class", "at least 2")
    assert not out.exists()
    assert (tree_digest(one_class_dir), tree_digest(sentinel)) == before


def test_small_test_split_warnings(labelled_dir, dataset_dir):
    logged = []
    warnings = check_labelled_splits(Manifest.load(labelled_dir), logged.append)
    assert len(warnings) == 1 and logged == [f"warning: {warnings[0]}"]
    assert labelled_dir in warnings[0] and "fewer than 5" in warnings[0]
    # 120 samples, 13 of them in the test split.
    (warning,) = check_labelled_splits(Manifest.load(dataset_dir))
    assert "13 samples" in warning
