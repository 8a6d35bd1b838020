"""The newcomer's path: next commands that work as printed, clean logs, --help."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from keras_ssrl import __version__
from tests.conftest import ROOT, load_script, tiny_pretrain_config

CLIS = (
    "scripts/pretrain.py",
    "scripts/finetune.py",
    "scripts/evaluate.py",
    "scripts/reproduce.py",
    "scripts/make_example_files.py",
    "tfrecords_tools/convert.py",
    "tfrecords_tools/verify.py",
    "tfrecords_tools/align.py",
    "export/export_model.py",
    "export/client.py",
)
# Words of TensorFlow's native start-up lines: those TF_CPP_MIN_LOG_LEVEL silences, and
# absl's pre-initialisation notice and XLA's service lines, which no variable silences
# in TensorFlow 2.16 and `keras_ssrl.cli.native_log_filter` drops.
NOISE = (
    "oneDNN", "cuda", "cuFFT", "cuDNN", "cuBLAS", "TensorRT", "cpu_feature",
    "absl::InitializeLog", "XLA service", "StreamExecutor", "Compiled cluster",
)  # fmt: skip


def parsers(parser):
    """The parser and its sub-command parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action.choices, dict):  # sub-commands
            for sub in action.choices.values():
                yield from parsers(sub)


@pytest.mark.parametrize("script", CLIS)
def test_every_flag_has_help_with_its_default_once(script):
    module = load_script(script)
    for parser in parsers(module.parser()):
        names = {a.option_strings[0] for a in parser._actions if a.option_strings}
        assert {"--quiet", "--verbose", "--version"} <= names, script
        for action in parser._actions:
            if isinstance(action.choices, dict):  # the sub-commands
                continue
            text = action.help % vars(action) if action.help else ""
            flag = (action.option_strings or [action.dest])[0]
            assert text, f"{script} {flag} has no help"
            assert "default: None" not in text, f"{script} {flag}: {text}"
            assert text.count("default:") <= 1, f"{script} {flag}: {text}"


def run_tool(*words, cwd=ROOT):
    """A tool as a user runs it, stdout to a pipe (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # set by the test session, not by users
    return subprocess.run(
        [sys.executable, *map(str, words)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def test_version():
    done = run_tool(os.path.join(ROOT, "tfrecords_tools/verify.py"), "--version")
    assert done.returncode == 0 and __version__ in done.stdout


def test_pretrain_then_the_printed_next_command(labelled_dir, tmp_path):
    """Pretrain (stdout a pipe), then finetune exactly as pretrain printed it."""
    config = tmp_path / "tiny.json"
    from keras_ssrl.config import to_dict

    config.write_text(json.dumps(to_dict(tiny_pretrain_config())))
    pretrain = os.path.join(ROOT, "scripts/pretrain.py")
    args = ("--method", "scarf", "--data", labelled_dir, "--config", config)
    done = run_tool(pretrain, *args, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "\x1b[" not in output  # one line per epoch, no ANSI progress bar
    assert not [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert (tmp_path / "runs" / "scarf" / "encoder.keras").is_file()
    last = done.stdout.strip().splitlines()[-1]
    assert last == (
        f"next: python scripts/finetune.py --encoder runs/scarf --data {labelled_dir} "
        "--mode unfrozen --fraction 0.1"
    )
    # The same command again goes beside the first run; --quiet drops info lines.
    again = run_tool(pretrain, *args, "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "runs" / "scarf-2" / "encoder.keras").is_file()
    assert again.stdout.strip() == ""
    words = shlex.split(last.removeprefix("next: "))
    words[1] = os.path.join(ROOT, words[1])
    tuned = run_tool(*words[1:], "--max-epochs", "1", cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    run = "runs/finetune-scarf-unfrozen-p0.1"
    assert (tmp_path / run / "classifier.keras").is_file()
    assert tuned.stdout.strip().splitlines()[-1] == (
        f"next: python export/export_model.py --run {run} --out models/ssrl"
    )


def test_example_files_fit_the_builtin_model_and_refuse_too_few(tmp_path, capsys):
    from keras_ssrl.data.synthetic import make_synthetic

    tool = load_script("scripts/make_example_files.py")
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--n-samples", "20", "--out", str(tmp_path / "few")])
    assert exit_.value.code == 2
    assert "--n-samples must be at least" in capsys.readouterr().err
    assert not (tmp_path / "few").exists()
    out = str(tmp_path / "ex")
    assert tool.main(["--formats", "csv", "--n-samples", "100", "--out", out]) == 0
    header = (tmp_path / "ex" / "synthetic_tcga.csv").read_text().split("\n", 1)[0]
    builtin = make_synthetic("synthetic-tcga", n_samples=100)
    assert set(builtin.genes) <= set(header.split(","))


def test_native_log_filter_drops_absl_lines_and_passes_the_rest():
    """The stderr filter: absl-format lines dropped, everything else kept, in order."""
    from keras_ssrl.cli import _pump

    noise = (
        b"WARNING: All log messages before absl::InitializeLog() is called are "
        b"written to STDERR\n"
        b"I0000 00:00:1796002762.877042    4271 service.cc:145] XLA service 0x7f\n"
        b"W1130 00:29:51.374688     123 foo.cc:12] a native warning\n"
    )
    kept = b"Epoch 1/2\nwarning: Index 3 is small\nIt ends without a newline\r"
    source, sink = os.pipe(), os.pipe()
    os.write(source[1], noise[:50])  # lines arrive in pieces
    os.write(source[1], noise[50:] + kept[:12] + b"\nerror: x\n" + kept[12:])
    os.close(source[1])
    _pump(source[0], sink[1])
    os.close(sink[1])
    with os.fdopen(sink[0], "rb") as out:
        assert out.read() == kept[:12] + b"\nerror: x\n" + kept[12:]
    os.close(source[0])
