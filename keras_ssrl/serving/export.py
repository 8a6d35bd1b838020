"""SavedModel export of trained encoders and classifiers for TF Serving.

`export_run(run_dir, model_base)` writes `MODEL_BASE/<version>/` (`saved_model.pb`,
`variables/`, `assets/`) from a pre-training run (its `encoder.keras`) or a fine-tuning
run (its `classifier.keras`), through `keras.export.ExportArchive`. This module owns the
writing: version numbers, the model base's lock, the model card and the rename into
place. The steps it calls live beside it:

- `keras_ssrl.serving.loading`: the run folder, its dataset and model, checked;
- `keras_ssrl.serving.signatures`: the served graph (`serving_default` on raw values,
  `predict_examples` and `classify` on records), with the dataset's preprocessing
  (`keras_ssrl.serving.preprocessing`) inside;
- `keras_ssrl.serving.verify`: the written SavedModel against the Keras model;
- `keras_ssrl.serving.assets`: the gene list, class names, digest and model card.

The version folder is written to a temporary folder in MODEL_BASE, loaded back and
compared with the Keras model (`keras_ssrl.serving.verify.TOLERANCE`), then renamed:
TF Serving never sees a half-written or unverified version, and a failed export leaves
nothing behind.

The export runs under Keras's TensorFlow backend, whatever backend trained the model: a
`.keras` file loads under any backend, and a process running another one (JAX) exports
through a TensorFlow-backend child process (`keras_ssrl.serving.tensorflow_process`),
which writes the same SavedModel.
"""

from __future__ import annotations

import datetime
import operator
import os
import shutil

from keras_ssrl import __version__
from keras_ssrl.data.manifest import genes_digest
from keras_ssrl.files import FolderLock, remove_stale_temporaries
from keras_ssrl.serving.assets import write_assets
from keras_ssrl.serving.contract import CLASSIFIER, PREDICT_EXAMPLES, ExportError
from keras_ssrl.serving.loading import Run, load_model, load_run
from keras_ssrl.serving.signatures import build_archive, signature_docs
from keras_ssrl.serving.verify import verify_export

# A version being written is `MODEL_BASE/.tmp-<version>-<pid>` (TF Serving loads only
# integer-named folders); one whose process is gone was left by a killed export.
STALE_TEMPORARY = r"\.tmp-\d+-(?P<pid>\d+)"


def export_run(
    run_dir: str,
    model_base: str,
    *,
    version: int | None = None,
    data_dir: str | None = None,
    log=print,
) -> str:
    """Exports a run's model as `model_base/<version>/` for TF Serving.

    Everything is checked before anything is written: the arguments, the run, its
    dataset and its model. The export always runs under Keras's TensorFlow backend:
    called where Keras runs another backend (JAX), it runs in a child process that
    runs TensorFlow's (`keras_ssrl.serving.tensorflow_process`), with the same result,
    errors and progress lines. Then the model base is locked (`FolderLock`: one export at
    a time per base; a lock left by a dead process is taken over), temporaries left
    there by a killed export are removed, and the version is written to a temporary
    folder, verified and renamed into place. Nothing in `model_base` is ever replaced
    or deleted, except those dead exports' temporaries.

    Args:
        run_dir: a pre-training run (exports the encoder) or a fine-tuning run
            (exports the classifier).
        model_base: the model's base folder, as TF Serving's `--model_base_path`.
        version: int >= 1; default: the next integer after the largest version there.
        data_dir: the converted dataset when it moved (default: the run's record).
        log: callable receiving progress lines.

    Returns:
        The path of the written version folder.

    Raises:
        ExportError: a run without a model, another dataset, a gene-list mismatch, a
            model with non-finite weights, an existing version, or a SavedModel that
            does not reproduce the Keras model. Nothing is left in `model_base` (and
            no `model_base` when the export would have created it).
        LockedError: another live process is exporting into `model_base`.
        RuntimeError: under another backend than TensorFlow's, the export process
            failed otherwise (a bug: its traceback is on stderr).

    Example:

    ```python
    path = export_run("runs/finetune-scarf", "models/ssrl")  # models/ssrl/1
    ```
    """
    model_base = _check_model_base(os.fspath(model_base))
    if version is not None:
        version = _check_version(version)
        _refuse_existing(model_base, version)
    run = load_run(run_dir, data_dir)
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        # The served graph is TensorFlow's (see `keras_ssrl.serving.tensorflow_process`);
        # the `.keras` file loads the same there, whatever backend trained it.
        from keras_ssrl.serving.tensorflow_process import export_in_tensorflow_process

        log(
            f"Keras runs the {backend} backend in this process: exporting in a "
            "TensorFlow-backend process"
        )
        return export_in_tensorflow_process(
            run.directory, model_base, version=version, data_dir=data_dir, log=log
        )
    model = load_model(run)
    lock = _lock_model_base(model_base)
    try:
        remove_stale_temporaries(model_base, STALE_TEMPORARY, log)
        version = version or next_version(model_base)
        _refuse_existing(model_base, version)  # written by an export since the check
        final, report = _write_version(run, model, model_base, version, log)
    except BaseException:
        if lock.created:
            # The export made the base: take it away again, lock file included.
            _remove_quietly(lock.path)
            lock.release()
            _remove_quietly(model_base, folder=True)
        raise
    finally:
        lock.release()
    worst = max(report["max_abs_difference"].values())
    log(
        f"wrote {final}: signatures {', '.join(signature_docs(run.kind, run.data, 1, 1))}; "
        f"largest difference from the Keras model {worst:.2g}"
    )
    return final


def next_version(model_base: str) -> int:
    """1 + the largest integer-named folder in `model_base` (1 when there is none)."""
    versions = [
        int(name)
        for name in (os.listdir(model_base) if os.path.isdir(model_base) else [])
        if name.isdigit() and os.path.isdir(os.path.join(model_base, name))
    ]
    return max(versions, default=0) + 1


def model_card(run: Run, model, report: dict, version: int) -> dict:
    """The small model card written to `assets/model_card.json`."""
    import keras
    import tensorflow as tf

    record = run.record
    width = (
        int(model.get_layer("encoder").output.shape[-1])
        if run.kind == CLASSIFIER
        else int(model.output.shape[-1])
    )
    encoder_run = record.get("encoder_run")
    data = run.data
    return {
        "name": os.path.basename(os.path.normpath(run.directory)),
        "kind": run.kind,
        "version": version,
        "method": record.get("method") or (record.get("config") or {}).get("method"),
        "mode": record.get("mode"),
        "encoder_run": os.path.basename(os.path.normpath(encoder_run))
        if encoder_run
        else None,
        "precision": record.get("precision"),
        "config": record.get("config"),
        "classes": run.class_names,
        "test_metrics"
        if run.kind == CLASSIFIER
        else "pretraining_summary": run.metrics,
        "data": {
            **data.info,
            "manifest_sha256": data.manifest_sha256,
            "n_genes": data.n_genes,
            "genes_sha256": genes_digest(data.genes),
            "values": data.values,
            "transform": data.transform,
            "record_dtype": data.record_dtype,
        },
        "preprocessing": (
            f"serving_default: x -> {data.transform}(x) -> (x - mean) / std per gene "
            "(manifest statistics of the pre-training split), in float32. The records "
            f"the model was trained on were rounded to {data.record_dtype} after the "
            "transform; the raw signature does not round, a difference below that "
            f"dtype's precision. {PREDICT_EXAMPLES}: records as the converter writes "
            "them (transformed), standardisation only."
        ),
        "signatures": signature_docs(
            run.kind, data, len(run.class_names or []) or None, width
        ),
        "verification": report,
        "exported": {
            "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "keras_ssrl": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        },
    }


def _check_model_base(model_base: str) -> str:
    if "://" in model_base:
        raise ExportError(
            f"{model_base}: MODEL_BASE must be a local folder (versions are renamed "
            "into place atomically); export locally, then copy the version folder"
        )
    if os.path.exists(model_base) and not os.path.isdir(model_base):
        raise ExportError(f"{model_base}: exists and is not a folder")
    return model_base


def _check_version(version) -> int:
    try:
        number = None if isinstance(version, bool) else operator.index(version)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ExportError(f"--version must be an integer >= 1, got {version!r}")
    return number


def _refuse_existing(model_base: str, version: int) -> None:
    final = os.path.join(model_base, str(version))
    if os.path.exists(final):
        raise ExportError(
            f"{final} exists: versions are never overwritten (TF Serving may be serving "
            "it); choose another --version or leave it out for the next one"
        )


def _lock_model_base(model_base: str) -> FolderLock:
    try:
        return FolderLock(model_base, "model base").acquire()
    except OSError as error:
        raise ExportError(
            f"{model_base}: cannot create or lock the model base "
            f"({error.strerror or error}); choose a writable --out"
        ) from None


def _remove_quietly(path: str, folder: bool = False) -> None:
    try:
        (os.rmdir if folder else os.remove)(path)
    except OSError:  # not empty (another writer arrived) or already gone: leave it
        pass


def _write_version(run: Run, model, model_base: str, version: int, log):
    """Writes, verifies and renames `model_base/<version>`; returns (path, report)."""
    final = os.path.join(model_base, str(version))
    tmp = os.path.join(model_base, f".tmp-{version}-{os.getpid()}")
    try:
        log(
            f"exporting the {run.kind} of {run.directory} ({run.data.n_genes} genes"
            + (f", {len(run.class_names)} classes" if run.class_names else "")
            + f") as version {version} of {model_base}"
        )
        archive = build_archive(model, run.kind, run.data, run.class_names)
        archive.write_out(tmp, verbose=False)
        report = verify_export(tmp, model, run.kind, run.data, run.class_names)
        write_assets(
            tmp,
            model_card(run, model, report, version),
            genes=run.data.genes,
            class_names=run.class_names,
            manifest_sha256=run.data.manifest_sha256,
        )
        # os.replace would swap an empty folder for ours: refuse anything there.
        if os.path.exists(final):
            raise ExportError(f"{final} appeared during the export; not replaced")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, report
