"""One fine-tuning run on disk: `finetune`, what `scripts/finetune.py` calls.

Run folder written by `finetune` (file names from `keras_ssrl.runs`):

- `classifier.keras`: float32 functional model, input `expression` (standardised values,
  in the dataset's gene order) -> logits; `get_layer("encoder")` is the encoder and the
  head is the `Dense` layer `head`.
- `config.json`: kind, method, mode, labels (in logit order), data, encoder run, settings.
- `history.csv` (epoch, loss, val_loss), `metrics.json` (test accuracy, balanced
  accuracy, macro-F1, confusion matrix with its `classes`, rows true and columns
  predicted, epochs, best epoch, seconds).

`finetune` checks every setting, the encoder run, the dataset (at least 2 classes,
`check_labelled_splits`) and the output folder before it trains; nothing is written
before then. It holds an exclusive lock on the output folder while it trains and writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable

import numpy as np

from keras_ssrl import __version__
from keras_ssrl.config import (
    ConfigError,
    EncoderConfig,
    FinetuneConfig,
    PretrainConfig,
    to_dict,
    validate_config,
)
from keras_ssrl.data.manifest import Manifest, genes_digest
from keras_ssrl.files import atomic_path, remove_stale_temporaries, write_json_atomic
from keras_ssrl.finetuning.data import (
    FinetuneData,
    check_labelled_splits,
    load_finetune_data,
    stratified_subset,
    subset_seed,
)
from keras_ssrl.finetuning.model import (
    encoder_config_of,
    load_encoder_weights,
    pretraining_record,
)
from keras_ssrl.finetuning.settings import (
    BASELINE,
    FinetuneError,
    validate_finetune_config,
)
from keras_ssrl.finetuning.trainer import Finetuner, RunResult
from keras_ssrl.runs import (
    CLASSIFIER_FILE,
    CONFIG_JSON,
    ENCODER_FILE,
    HISTORY_CSV,
    LOGS_DIR,
    METRICS_JSON,
    check_output_folder,
    check_outside,
    locked_folder,
    stale_temporaries_pattern,
)

# How `metrics.json` says which way its confusion matrix reads.
CONFUSION_AXES = "rows: true class, columns: predicted class, both in `classes` order"

# The files of a fine-tuning folder (`atomic_path` writes each; its temporaries are ours).
FINETUNE_FILES = (CLASSIFIER_FILE, CONFIG_JSON, METRICS_JSON, HISTORY_CSV, LOGS_DIR)


@dataclasses.dataclass
class _Run:
    """One fine-tuning run, resolved and checked: what it trains and what it records."""

    out_dir: str
    data: FinetuneData
    config: FinetuneConfig
    encoder_config: EncoderConfig
    method: str
    encoder_run: str | None
    weights: list[np.ndarray] | None
    seed: int
    subset: np.ndarray
    tuner: Finetuner
    command: list[str] | None


def finetune(
    data_dir: str | None,
    out_dir: str,
    *,
    encoder_run: str | None = None,
    config: FinetuneConfig | None = None,
    encoder_config: EncoderConfig | None = None,
    tensorboard: bool = False,
    log: Callable[[str], None] = print,
    command: list[str] | None = None,
) -> dict:
    """Fine-tunes a pre-trained encoder (or the baseline) and writes a run folder.

    Args:
        data_dir: a converted, labelled dataset, or None: the pre-training run's
            dataset when `encoder_run` is given, else the built-in `synthetic-tcga`.
        out_dir: the output folder: missing, empty, or left by a failed attempt
            (holding only fine-tuning's own files); never a finished run or a folder
            of other files. Locked while the run trains and writes.
        encoder_run: a pre-training RUN_DIR, or None for the non-pre-trained baseline.
        config: a `FinetuneConfig`; `mode` must be `unfrozen` for the baseline.
        encoder_config: the baseline's architecture (default: protocol's 4 x 256);
            ignored with `encoder_run` (the run's architecture is used).
        tensorboard: also write `logs/train` and `logs/validation` for TensorBoard:
            loss and accuracy per epoch (steps numbered from 1, as in history.csv).
        log: callable receiving progress lines.
        command: the command line, recorded in `config.json`.

    Returns:
        The test metrics written to `metrics.json`.

    Raises:
        FinetuneError: a setting, the encoder run (missing, unloadable, another gene
            list), fewer than 2 classes, or the output folder (a run, foreign files,
            in use by another process: its PID is named).
        DataError: unreadable data; `DamagedDataError` names a damaged shard.
        FloatingPointError: the loss became NaN or inf.
    """
    config = config or FinetuneConfig()
    _check_settings(config, encoder_run, encoder_config)
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir)
    run = _prepare(
        data_dir,
        out_dir,
        encoder_run=encoder_run,
        config=config,
        encoder_config=encoder_config,
        log=log,
        command=command,
    )
    with locked_folder(out_dir, "fine-tuning folder", FinetuneError):
        _check_out_dir(out_dir)  # again: another process may have finished meanwhile
        remove_stale_temporaries(
            out_dir, stale_temporaries_pattern(FINETUNE_FILES), log
        )
        log(
            f"fine-tuning {run.method} ({config.mode}) on {len(run.subset)} of "
            f"{len(run.data.train.y)} training samples, {len(run.data.classes)} classes"
        )
        result = run.tuner.run(run.data, run.subset, run.seed, run.weights, log=log)
        metrics = _write_run(run, result, tensorboard)
    log(
        f"test accuracy {metrics['accuracy']:.4f}, balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"(best epoch {result.best_epoch} of {result.epochs}); wrote {out_dir}"
    )
    return metrics


def _check_settings(
    config: FinetuneConfig,
    encoder_run: str | None,
    encoder_config: EncoderConfig | None,
) -> None:
    """Refuses bad settings, a frozen baseline and a bad baseline architecture."""
    validate_finetune_config(config)
    if encoder_run is None and config.mode == "frozen":
        raise FinetuneError(
            "the baseline is trained end to end; --mode frozen needs --encoder RUN_DIR"
        )
    if encoder_run is None and encoder_config is not None:
        # Only the baseline's encoder differs from the defaults: check it as a whole
        # pre-training config would be checked.
        try:
            validate_config(PretrainConfig(encoder=encoder_config))
        except ConfigError as error:
            raise FinetuneError(f"baseline {error}") from None


def _check_out_dir(out_dir: str) -> None:
    """Refuses an output folder holding a run, or files fine-tuning did not write."""
    if os.path.exists(os.path.join(out_dir, CONFIG_JSON)):
        raise FinetuneError(
            f"{out_dir} already holds a fine-tuning run; choose another"
        )
    # A folder left by a failed attempt holds only fine-tuning's own files.
    check_output_folder(
        out_dir, FINETUNE_FILES, "fine-tuning run", FinetuneError, own_files=True
    )


def _resolve_data_dir(data_dir: str | None, record: dict | None, log) -> str:
    """The dataset: given, else the encoder run's, else the built-in one (converted
    into the cache folder on first use)."""
    if data_dir is None:
        data_dir = (record or {}).get("data", {}).get("dir")
        if data_dir is None:
            from keras_ssrl.data.builtin import ensure_builtin
            from keras_ssrl.training import DEFAULT_BUILTIN

            data_dir = ensure_builtin(DEFAULT_BUILTIN, log=log)
    return os.path.abspath(data_dir)


def _prepare(
    data_dir: str | None,
    out_dir: str,
    *,
    encoder_run: str | None,
    config: FinetuneConfig,
    encoder_config: EncoderConfig | None,
    log: Callable[[str], None],
    command: list[str] | None,
) -> _Run:
    """Reads and checks everything the run needs; writes nothing."""
    record = pretraining_record(encoder_run) if encoder_run is not None else None
    data_dir = _resolve_data_dir(data_dir, record, log)
    check_outside(out_dir, data_dir, "fine-tuning folder", FinetuneError)
    check_labelled_splits(Manifest.load(data_dir), log)
    data = load_finetune_data(data_dir)
    weights, method = None, BASELINE
    if encoder_run is not None:
        encoder_config = encoder_config_of(encoder_run)
        weights = load_encoder_weights(encoder_run, data.manifest)
        method = record["method"]
    encoder_config = encoder_config or EncoderConfig()
    seed = subset_seed(config.seed, config.fraction, config.repeat)
    subset = stratified_subset(data.train.y, config.fraction, seed)
    tuner = Finetuner(
        data.n_genes, len(data.classes), encoder_config, config.mode, config
    )
    if weights is not None and [w.shape for w in weights] != [
        tuple(v.shape) for v in tuner.encoder.weights
    ]:
        raise FinetuneError(
            f"{os.path.join(encoder_run, ENCODER_FILE)}: its weights do not match "
            f"the architecture its config.json records ({encoder_config})"
        )
    return _Run(
        out_dir=out_dir,
        data=data,
        config=config,
        encoder_config=encoder_config,
        method=method,
        encoder_run=encoder_run,
        weights=weights,
        seed=seed,
        subset=subset,
        tuner=tuner,
        command=command,
    )


def _record(run: _Run, result: RunResult) -> dict:
    """The run's `config.json`."""
    import keras

    data = run.data
    return {
        "kind": "finetune",
        "method": run.method,
        "mode": run.config.mode,
        "labels": data.classes,
        "data": {
            "dir": data.data_dir,
            "manifest_sha256": data.manifest.digest(),
            "n_genes": data.n_genes,
            "genes_sha256": genes_digest(data.manifest.genes),
            "n_train": result.n_train,
            "n_val": len(data.val.y),
            "n_test": len(data.test.y),
        },
        "encoder_run": os.path.abspath(run.encoder_run) if run.encoder_run else None,
        "encoder": to_dict(run.encoder_config),
        "config": to_dict(run.config),
        "seed": run.seed,
        "versions": {"keras_ssrl": __version__, "keras": keras.__version__},
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": list(run.command) if run.command is not None else None,
    }


def _write_run(run: _Run, result: RunResult, tensorboard: bool = False) -> dict:
    """Writes the classifier, history, logs, metrics and (last) `config.json`."""
    record = _record(run, result)
    out_dir = run.out_dir
    with atomic_path(os.path.join(out_dir, CLASSIFIER_FILE), ".keras") as tmp:
        run.tuner.classifier.save(tmp)
    _write_history(os.path.join(out_dir, HISTORY_CSV), result.history)
    if tensorboard:
        write_tensorboard(os.path.join(out_dir, LOGS_DIR), result.history)
    metrics = {
        **result.metrics,
        # What the confusion matrix's rows (true) and columns (predicted) are.
        "classes": run.data.classes,
        "confusion_matrix_axes": CONFUSION_AXES,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "n_train": result.n_train,
        "seconds": round(result.seconds, 3),
    }
    write_json_atomic(os.path.join(out_dir, METRICS_JSON), metrics)
    # config.json last: its presence marks a complete run folder.
    write_json_atomic(os.path.join(out_dir, CONFIG_JSON), record)
    return metrics


HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def _write_history(path: str, history: list[dict]) -> None:
    """One row per epoch, numbered from 1 (as pre-training's history.csv)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(",".join(HISTORY_COLUMNS) + "\n")
        for row in history:
            values = [str(row["epoch"])] + [
                f"{row[k]:.6g}" for k in HISTORY_COLUMNS[1:]
            ]
            handle.write(",".join(values) + "\n")


def write_tensorboard(folder: str, history: list[dict]) -> None:
    """TensorBoard runs `train` and `validation` of a fine-tuning run's history.

    The tags are those of Keras' TensorBoard callback in pre-training (`epoch_loss`,
    `epoch_accuracy`), so both kinds of run compare in one TensorBoard. A folder left
    by a failed attempt is replaced (it is this run's own).
    """
    import shutil

    import tensorflow as tf

    if os.path.isdir(folder):
        shutil.rmtree(folder)
    for run, prefix in (("train", ""), ("validation", "val_")):
        writer = tf.summary.create_file_writer(os.path.join(folder, run))
        with writer.as_default():
            for row in history:
                for name in ("loss", "accuracy"):
                    tf.summary.scalar(f"epoch_{name}", row[prefix + name], row["epoch"])
        writer.close()
