"""What an export reads from a run folder, checked before anything is written.

`load_run` reads a pre-training run (its `encoder.keras`) or a fine-tuning run (its
`classifier.keras`), the run's record and the manifest of the dataset it was trained on,
and checks that they belong together; `load_model` loads the Keras model and
`check_model` checks it against the dataset and the class names. Every refusal is an
`ExportError` saying why and what to do. The run-folder file names come from
`keras_ssrl.runs`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from keras_ssrl.data.errors import DataError
from keras_ssrl.data.manifest import MANIFEST, Manifest, genes_digest
from keras_ssrl.runs import (
    CLASSIFIER_FILE,
    CONFIG_JSON,
    ENCODER_FILE,
    METRICS_JSON,
    SUMMARY_JSON,
)
from keras_ssrl.serving.contract import CLASSIFIER, ENCODER, ExportError
from keras_ssrl.serving.preprocessing import ServingData

MODEL_FILES = {ENCODER: ENCODER_FILE, CLASSIFIER: CLASSIFIER_FILE}


@dataclass
class Run:
    """A run folder to export: its kind, model file, records and dataset."""

    directory: str
    kind: str
    model_path: str
    record: dict
    data: ServingData
    class_names: list[str] | None
    metrics: dict | None


def load_run(run_dir: str, data_dir: str | None = None) -> Run:
    """Reads a run folder and its dataset's manifest, and checks they belong together.

    Args:
        run_dir: a pre-training run (`encoder.keras`) or a fine-tuning run
            (`classifier.keras`, `config.json` with `kind: "finetune"`).
        data_dir: the converted dataset, when it moved since training (default: the
            folder recorded in the run's `config.json`).

    Raises:
        ExportError: not a run folder, no model in it, no dataset, or a dataset other
            than the one the model was trained on (manifest digest or gene list).
    """
    run_dir = os.fspath(run_dir)
    record = _read_record(run_dir)
    kind = CLASSIFIER if record.get("kind") == "finetune" else ENCODER
    model_path = os.path.join(run_dir, MODEL_FILES[kind])
    if not os.path.isfile(model_path):
        what = "fine-tuning" if kind == CLASSIFIER else "pre-training"
        raise ExportError(
            f"{run_dir}: no {MODEL_FILES[kind]}, so no model to export; the "
            f"{what} run has not finished (or the file was removed). Finish it (the "
            "training scripts' --resume) or export another run."
        )
    data = _run_dataset(run_dir, record, data_dir)
    if kind == CLASSIFIER:
        labels = record.get("labels")
        class_names = [str(c) for c in labels] if isinstance(labels, list) else []
        if not class_names:
            raise ExportError(
                f"{run_dir}/{CONFIG_JSON} has no `labels` (class names in logit order)"
            )
        metrics = _read_json(os.path.join(run_dir, METRICS_JSON), "metrics")
    else:
        class_names = None
        metrics = _read_json(os.path.join(run_dir, SUMMARY_JSON), "summary")
    return Run(run_dir, kind, model_path, record, data, class_names, metrics)


def _read_json(path: str, what: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: unreadable {what} ({error})") from None
    if not isinstance(payload, dict):
        raise ExportError(f"{path}: unreadable {what} (not a JSON object)")
    return payload


def _read_record(run_dir: str) -> dict:
    """The run's `config.json`, as the training scripts wrote it."""
    if not os.path.isdir(run_dir):
        raise ExportError(f"{run_dir}: no such run folder")
    record = _read_json(os.path.join(run_dir, CONFIG_JSON), "run configuration")
    if record is None:
        raise ExportError(
            f"{run_dir}: no {CONFIG_JSON}; is this a run folder written by "
            "scripts/pretrain.py or scripts/finetune.py (a fine-tuning run writes it "
            "last, when it has finished)?"
        )
    return record


def _run_dataset(run_dir: str, record: dict, data_dir: str | None) -> ServingData:
    """The dataset the run was trained on (`data_dir` when it moved), checked."""
    recorded = record.get("data") or {}
    if not isinstance(recorded, dict):
        raise ExportError(f"{run_dir}/{CONFIG_JSON}: `data` is not a JSON object")
    data_dir = data_dir or recorded.get("dir")
    if not data_dir:
        raise ExportError(
            f"{run_dir}/{CONFIG_JSON} names no dataset; pass --data DIR (the converted "
            "dataset the model was trained on)"
        )
    manifest = _load_manifest(str(data_dir))
    try:
        data = ServingData.from_manifest(manifest)
    except ExportError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(
            f"{manifest.directory}/{MANIFEST} is incomplete or malformed "
            f"({type(error).__name__}: {_first_line(error)}); re-run the conversion"
        ) from None
    expected = recorded.get("manifest_sha256")
    digest = manifest.digest()
    if expected and digest != expected:
        genes_sha = recorded.get("genes_sha256")
        if genes_sha and genes_sha != genes_digest(manifest.genes):
            detail = (
                f"another gene list ({data.n_genes} genes; the model was trained "
                f"on {recorded.get('n_genes')})"
            )
        else:
            detail = (
                "the same genes but another manifest (other samples or statistics, "
                "so the standardisation would differ)"
            )
        raise ExportError(
            f"{data_dir} is not the dataset {run_dir} was trained on: it has "
            f"{detail}; manifest digest {digest[:12]}, the run recorded "
            f"{expected[:12]}. Pass --data with the dataset the run used."
        )
    return data


def _load_manifest(data_dir: str) -> Manifest:
    """The dataset's manifest, consistent with itself.

    A missing folder gets the hint that it may have moved; a manifest that contradicts
    itself (gene count vs gene list vs statistics, edited by hand) is named as such.
    """
    try:
        manifest = Manifest.load(data_dir)
    except DataError as error:
        if "://" in data_dir or os.path.isfile(os.path.join(data_dir, MANIFEST)):
            # There, but damaged or unsafe (e.g. a shard entry outside the folder).
            raise ExportError(f"cannot use the run's dataset: {error}") from None
        raise ExportError(
            f"cannot read the run's dataset ({error}). The export needs its "
            f"{MANIFEST} (gene list, transform, statistics); pass --data DIR if "
            "the folder moved."
        ) from None
    problem = manifest.inconsistency()
    if problem:
        raise ExportError(problem)
    return manifest


def load_model(run: Run):
    """Loads the run's Keras model and checks it against the dataset and class names."""
    import keras

    try:
        model = keras.saving.load_model(run.model_path, compile=False)
    except Exception as error:  # noqa: BLE001 - any load failure is the same to a user
        raise ExportError(
            f"{run.model_path}: cannot load the model ({_first_line(error)}); the "
            "file is damaged or was not written by keras_ssrl's training scripts"
        ) from None
    check_model(model, run.kind, run.data.n_genes, run.class_names, run.model_path)
    return model


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first line, short enough for a one-line message."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_model(model, kind: str, n_genes: int, class_names, where: str) -> None:
    """Raises `ExportError` unless `model` is a one-input model of `n_genes` genes."""
    if len(model.inputs) != 1:
        raise ExportError(
            f"{where}: expected one input, the model has {len(model.inputs)}"
        )
    width = model.inputs[0].shape[-1]
    if len(model.inputs[0].shape) != 2 or width != n_genes:
        raise ExportError(
            f"{where}: the model takes inputs of shape {tuple(model.inputs[0].shape)}, "
            f"the dataset has {n_genes} genes: gene list mismatch between the model "
            "and the dataset"
        )
    if kind == CLASSIFIER:
        names = {layer.name for layer in model.layers}
        if "encoder" not in names or "head" not in names:
            raise ExportError(
                f"{where}: a classifier must contain the sub-model `encoder` and the "
                f"layer `head`; it has {', '.join(sorted(names))}"
            )
        n_classes = model.outputs[0].shape[-1]
        if n_classes != len(class_names):
            raise ExportError(
                f"{where}: the model has {n_classes} outputs but the run names "
                f"{len(class_names)} classes"
            )
    for weight in model.weights:
        if not np.all(np.isfinite(np.asarray(weight))):
            raise ExportError(
                f"{where}: weight {weight.path} holds NaN or infinite values (training "
                "diverged); nothing to export"
            )
