"""Hardening of export and client: tolerances, unsafe manifests, locks, clean refusals.

Every refusal is checked as a user meets it: exit status 2, one `error: ` line naming
the file, entry or flag, no traceback, and nothing changed outside the folders the
command names (digests of a sentinel file, the dataset and the run before and after).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest

from keras_ssrl.data.manifest import Manifest
from keras_ssrl.encoders import build_encoder
from keras_ssrl.files import FolderLock
from keras_ssrl.finetuning import build_classifier
from keras_ssrl.serving import verify
from keras_ssrl.serving.contract import ExportError
from keras_ssrl.serving.export import export_run
from tests.conftest import load_script, quiet, tree_digest, write_samples_as_rows
from tests.serving_fixtures import make_pretraining_run

export_cli = load_script("export/export_model.py")
client_cli = load_script("export/client.py")

# --------------------------------------------------------------------- tolerance


def _classifier(policy: str, n_genes: int = 23):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return build_classifier(build_encoder(n_genes, layers=2, width=16), 3)
    finally:
        keras.config.set_dtype_policy(previous)


def test_tolerance_follows_the_compute_dtype_of_nested_layers():
    assert verify.tolerance_for(_classifier("float32")) == {
        "compute_dtype": "float32",
        "layers": 0,
        **verify.TOLERANCE["float32"],
    }
    # The classifier and its head are float32; the 16-bit layers sit in the encoder.
    f16 = verify.tolerance_for(_classifier("mixed_float16"))
    assert f16["compute_dtype"] == "float16" and f16["layers"] == 6
    assert f16["rtol"] == pytest.approx(2 * 2.0**-10 * 6)
    bf16 = verify.tolerance_for(_classifier("mixed_bfloat16"))
    assert bf16["compute_dtype"] == "bfloat16"
    assert bf16["rtol"] == pytest.approx(8 * f16["rtol"])  # eps 2^-7 vs 2^-10


def test_mixed_float16_verification_accepts_rounding_refuses_real_differences():
    tol = verify.tolerance_for(_classifier("mixed_float16"))
    rng = np.random.default_rng(0)
    embedding = rng.uniform(0.5, 1.5, (8, 16)).astype(np.float32)
    # What an Intel AVX-512 CPU gave between the Keras call and the served graph.
    rounded = {"embedding": embedding + np.float32(0.0039)}
    reference = {"embedding": embedding}
    report = verify.check_outputs("serving_default", rounded, reference, tol)
    assert report["serving_default/embedding"] == pytest.approx(0.0039, rel=1e-3)
    # The former fixed float32 bound refused it: the export failed on that CPU.
    with pytest.raises(ExportError, match="differs from the Keras model"):
        verify.check_outputs(
            "serving_default", rounded, reference, {**verify.TOLERANCE["float32"]}
        )
    wrong = {"embedding": embedding + np.float32(0.1)}
    with pytest.raises(
        ExportError, match=r"on embedding by up to 0\.1 .*float16 compute"
    ):
        verify.check_outputs("serving_default", wrong, reference, tol)


def test_predicted_classes_must_agree_except_near_ties():
    tol = verify.tolerance_for(_classifier("mixed_float16"))
    names = ["a", "b", "c"]

    def served(probabilities, class_id):
        return {
            "probabilities": np.array(probabilities, np.float32),
            "class_id": np.array(class_id),
            "class_name": [names[i].encode() for i in class_id],
        }

    def check(out, reference):
        ref = {"probabilities": np.array(reference, np.float32)}
        return verify.check_outputs("serving_default", out, ref, tol, names)

    # A near-tie (gap 0.005, within the bound): rounding may decide either way.
    check(served([[0.4975, 0.5025, 0.0]], [1]), [[0.5025, 0.4975, 0.0]])
    # Every probability within the bound, but the Keras model's classes are 0.03
    # apart: a flipped class is a wrong prediction.
    with pytest.raises(ExportError, match=r"another class .* probe row\(s\) 0"):
        check(served([[0.499, 0.501, 0.0]], [1]), [[0.515, 0.485, 0.0]])
    # class_id must be the served graph's own most probable class.
    with pytest.raises(ExportError, match="class_id is not the most probable"):
        check(served([[0.6, 0.4, 0.0]], [1]), [[0.6, 0.4, 0.0]])


# --------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def served(tmp_path_factory, dataset_dir):
    """A copy of the dataset, a pre-training run on it, and its export (version 1)."""
    root = tmp_path_factory.mktemp("hardening-serving")
    data = str(root / "data")
    shutil.copytree(dataset_dir, data)
    run = make_pretraining_run(root / "run", data)
    base = root / "models"
    version = export_run(run, str(base), log=quiet)
    return {"root": root, "data": data, "run": run, "base": base, "version": version}


@pytest.fixture()
def sentinel(tmp_path):
    path = tmp_path / "sentinel.tfrecord"
    path.write_bytes(b"someone else's file\n" * 100)
    return path


def refused(capsys, code, *needles):
    """Asserts exit 2 and one `error: ` line holding every needle; returns it."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _edited_copy(data, tmp_path, edit):
    """A copy of the dataset `data` whose manifest went through `edit(manifest)`."""
    bad = tmp_path / "bad-data"
    shutil.copytree(data, bad)
    with open(bad / "manifest.json") as handle:
        manifest = json.load(handle)
    edit(manifest)
    with open(bad / "manifest.json", "w") as handle:
        json.dump(manifest, handle)
    return str(bad)


def _with_shard_entry(data, tmp_path, entry):
    """A copy of `data` whose first test shard is named `entry` in the manifest."""

    def edit(manifest):
        manifest["splits"]["test"]["shards"][0]["file"] = entry

    return _edited_copy(data, tmp_path, edit)


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_export_refuses_shard_entries_outside_the_dataset(
    served, tmp_path, sentinel, capsys, kind
):
    entry = "../sentinel.tfrecord" if kind == "relative" else str(sentinel)
    bad = _with_shard_entry(served["data"], tmp_path, entry)
    before = {p: tree_digest(p) for p in (sentinel, bad, served["run"])}
    out = tmp_path / "models"
    code = export_cli.main(["--run", served["run"], "--out", str(out), "--data", bad])
    err = refused(capsys, code, f"shard entry {entry!r}", "manifest.json")
    assert "moved" not in err  # the folder is there; its manifest is unsafe
    assert not out.exists()
    assert {p: tree_digest(p) for p in before} == before


def test_client_refuses_records_with_shard_entries_outside_the_dataset(
    served, tmp_path, sentinel, capsys
):
    bad = _with_shard_entry(served["data"], tmp_path, "../sentinel.tfrecord")
    before = tree_digest(sentinel)
    out = tmp_path / "p.csv"
    code = client_cli.main(
        ["--records", bad, "--local", served["version"], "--out", str(out)]
    )
    refused(capsys, code, "shard entry '../sentinel.tfrecord'")
    assert not out.exists() and tree_digest(sentinel) == before


def test_client_names_a_damaged_records_shard(served, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(served["data"], data)
    shard = Manifest.load(str(data)).shard_paths("test")[0]
    with open(shard, "r+b") as handle:  # same size, one byte flipped
        handle.seek(40)
        byte = handle.read(1)
        handle.seek(40)
        handle.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "p.csv"
    code = client_cli.main(
        ["--records", str(data), "--local", served["version"], "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and "\n" not in err, err
    assert shard in err and "damaged" in err
    assert not out.exists()


def test_a_second_export_into_a_locked_base_is_refused(served, tmp_path, capsys):
    base = tmp_path / "models"
    with FolderLock(str(base), "model base"):  # another export, in the middle
        before = tree_digest(base)
        code = export_cli.main(["--run", served["run"], "--out", str(base)])
        refused(capsys, code, f"in use by process {os.getpid()}", str(base))
        assert tree_digest(base) == before  # no version, no temporary
    assert sorted(os.listdir(base)) == [".keras_ssrl.lock"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_dead_exports_lock_and_temporaries_are_taken_over(served, tmp_path, capsys):
    base = tmp_path / "models"
    base.mkdir()
    dead, live = _dead_pid(), os.getppid()
    (base / ".keras_ssrl.lock").write_text(f"pid={dead}\nhost=x\ncommand=kill -9 me\n")
    for name in (f".tmp-1-{dead}", f".tmp-2-{live}"):
        (base / name / "variables").mkdir(parents=True)
        (base / name / "saved_model.pb").write_bytes(b"half")
    assert export_cli.main(["--run", served["run"], "--out", str(base)]) == 0
    assert f"removed {base / f'.tmp-1-{dead}'}" in capsys.readouterr().out
    # The live writer's temporary stays; the lock now names this process.
    assert sorted(os.listdir(base)) == [".keras_ssrl.lock", f".tmp-2-{live}", "1"]
    assert f"pid={os.getpid()}\n" in (base / ".keras_ssrl.lock").read_text()


def test_refused_exports_leave_no_trace(served, tmp_path, sentinel, capsys):
    run, base = served["run"], served["base"]
    watched = (sentinel, served["data"], run, base)
    before = {p: tree_digest(p) for p in watched}
    new = tmp_path / "new-models"

    def export(run_dir, out, *more):
        return export_cli.main(["--run", str(run_dir), "--out", str(out), *more])

    # An unloadable model: named, one line.
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "encoder.keras").write_bytes(b"not a zip file")
    refused(capsys, export(broken, new), "encoder.keras: cannot load the model")
    # A config.json that is not a run record.
    odd = tmp_path / "odd"
    shutil.copytree(run, odd)
    (odd / "config.json").write_text("[1, 2]")
    refused(capsys, export(odd, new), "config.json", "not a JSON object")
    # A manifest that contradicts itself (edited by hand).
    inconsistent = _edited_copy(
        served["data"], tmp_path, lambda m: m["statistics"]["mean"].pop()
    )
    refused(capsys, export(run, new, "--data", inconsistent), "is inconsistent")
    # An existing version, a bad version, an impossible MODEL_BASE.
    refused(capsys, export(run, base, "--model-version", "1"), "never overwritten")
    refused(capsys, export(run, new, "--model-version", "0"), ">= 1")
    refused(capsys, export(run, sentinel / "models"), "cannot create or lock")
    assert not new.exists()
    assert {p: tree_digest(p) for p in watched} == before


# --------------------------------------------------------------------- client


@pytest.fixture()
def table(served, tmp_path):
    """Raw counts for the model's genes: writes a samples-as-rows CSV."""
    genes = Manifest.load(served["data"]).genes
    rng = np.random.default_rng(0)

    def write(name, samples, columns=None):
        columns = columns or genes
        values = rng.poisson(20.0, (len(samples), len(columns))).astype(float)
        return write_samples_as_rows(tmp_path / name, values, samples, columns)

    write.genes = genes
    return write


def test_client_refuses_duplicate_sample_ids(served, table, tmp_path, capsys):
    path = table("dup.csv", ["a", "b", "a", "c", "c"])
    before = tree_digest(path)
    out = tmp_path / "p.csv"
    code = client_cli.main(
        ["--input", str(path), "--local", served["version"], "--out", str(out)]
    )
    err = refused(capsys, code, str(path), "2 sample id(s) occur more than once: a, c")
    assert "e.g. line 2 (sample 'a') and line 4 (sample 'a')" in err
    assert not out.exists() and tree_digest(path) == before


def test_duplicate_gene_hint_names_the_clients_own_flag(
    served, table, tmp_path, capsys
):
    genes = table.genes
    path = table("dup-genes.csv", ["a", "b"], genes + [genes[3]])
    argv = ["--input", str(path), "--local", served["version"]]
    out = tmp_path / "p.csv"
    err = refused(
        capsys,
        client_cli.main(argv + ["--out", str(out)]),
        genes[3].split(".")[0],
        "--duplicate-genes sum|mean|first",
    )
    assert not out.exists()
    # Every policy the hint names is one the client accepts.
    hint = err.split("--duplicate-genes ", 1)[1].split()[0]
    for policy in hint.split("|"):
        assert (
            client_cli.main(argv + ["--duplicate-genes", policy, "--out", str(out)])
            == 0
        )
        assert len(pd.read_csv(out)) == 2
    # Duplicates of a gene the model does not use do not matter.
    extra = table("dup-extra.csv", ["a", "b"], genes + ["ENSG99", "ENSG99"])
    assert client_cli.main(["--input", str(extra), "--local", served["version"],
                            "--out", str(out)]) == 0  # fmt: skip


def test_client_out_never_replaces_an_input_or_a_foreign_file(
    served, table, tmp_path, capsys
):
    path = table("samples.csv", ["a", "b"])
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    watched = (path, notes, served["version"])
    before = {p: tree_digest(p) for p in watched}

    def client(out):
        return client_cli.main(
            ["--input", str(path), "--local", served["version"], "--out", str(out)]
        )

    refused(capsys, client(path), f"--out {path} is an input file")
    refused(capsys, client(notes), "not a predictions CSV", str(notes))
    inside = os.path.join(served["version"], "assets", "p.csv")
    refused(capsys, client(inside), f"is inside the input folder {served['version']}")
    refused(capsys, client(tmp_path / "nowhere" / "p.csv"), "no folder")
    assert {p: tree_digest(p) for p in watched} == before
    # Earlier predictions are replaced (a re-run).
    out = tmp_path / "p.csv"
    assert client(out) == 0 and client(out) == 0
    assert list(pd.read_csv(out)["sample_id"]) == ["a", "b"]
