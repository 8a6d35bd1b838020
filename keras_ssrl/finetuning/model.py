"""The classifier and the pre-trained encoder it starts from.

Owns `build_classifier` (the shared MLP encoder plus one `Dense(n_classes)` head
producing logits: the softmax lives in the loss, docs/protocol.md, "Fine-tuning", forbids
one before a cross-entropy), and the checks of a pre-training run that fine-tuning reads:
`pretraining_record` (its `config.json`), `encoder_config_of` (its architecture) and
`load_encoder_weights` (its `encoder.keras`, checked against the dataset's genes).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from keras_ssrl.config import EncoderConfig
from keras_ssrl.data.manifest import Manifest, genes_digest
from keras_ssrl.finetuning.settings import FinetuneError
from keras_ssrl.runs import ENCODER_FILE, RunDirError, load_run_config


def build_classifier(encoder, n_classes: int, name: str = "classifier"):
    """Encoder + `Dense(n_classes)` head producing logits (float32)."""
    import keras

    inputs = keras.Input(shape=encoder.input_shape[1:], name="expression")
    head = keras.layers.Dense(n_classes, name="head", dtype="float32")
    return keras.Model(inputs, head(encoder(inputs)), name=name)


def pretraining_record(run_dir: str) -> dict:
    """The `config.json` of a pre-training run, refusing anything else.

    Raises:
        FinetuneError: no such folder, no or an unreadable `config.json`, or the record
            of something else (a fine-tuning run, a dataset).
    """
    hint = "pass the RUN_DIR given to scripts/pretrain.py --out"
    try:
        record = load_run_config(run_dir)
    except RunDirError as error:
        raise FinetuneError(f"{error}; {hint}") from None
    if record is None:
        raise FinetuneError(
            f"{run_dir}: not a pre-training run folder (no config.json); {hint}"
        )
    encoder = (record.get("config") or {}).get("encoder")
    if (
        record.get("kind") not in (None, "pretrain")
        or not isinstance(record.get("method"), str)
        or not isinstance(encoder, dict)
        or not {"layers", "width", "dropout"} <= set(encoder)
    ):
        raise FinetuneError(
            f"{run_dir}: not a pre-training run folder (its config.json records "
            f"{record.get('kind') or 'no encoder'}); {hint}"
        )
    return record


def encoder_config_of(run_dir: str) -> EncoderConfig:
    """The encoder architecture recorded by a pre-training run."""
    values = pretraining_record(run_dir)["config"]["encoder"]
    return EncoderConfig(**{k: values[k] for k in ("layers", "width", "dropout")})


def load_encoder_weights(run_dir: str, manifest: Manifest) -> list[np.ndarray]:
    """Weights of a pre-training run's encoder, checked against the dataset's genes."""
    import keras

    path = os.path.join(run_dir, ENCODER_FILE)
    if not os.path.exists(path):
        raise FinetuneError(
            f"{run_dir}: no {ENCODER_FILE}; the pre-training run did not finish "
            "(resume it with scripts/pretrain.py --resume)"
        )
    record = load_run_config(run_dir) or {}
    digest = record.get("data", {}).get("genes_sha256")
    if digest is not None and digest != genes_digest(manifest.genes):
        raise FinetuneError(
            f"{run_dir}: the encoder was pre-trained on another gene list than "
            f"{manifest.directory} ({record['data'].get('n_genes')} vs "
            f"{manifest.n_genes} genes); align the datasets with tfrecords_tools/align.py"
        )
    try:
        # Keras reports a file that is not a zip archive as "File not found".
        if not zipfile.is_zipfile(path):
            raise ValueError("not a .keras archive")
        encoder = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - whatever is wrong, the file is bad
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FinetuneError(
            f"{path}: cannot load the encoder ({reason[:200]}); the file is damaged: "
            "re-copy the run folder or re-run the pre-training"
        ) from None
    if encoder.input_shape[-1] != manifest.n_genes:
        raise FinetuneError(
            f"{path}: the encoder takes {encoder.input_shape[-1]} genes, the dataset "
            f"has {manifest.n_genes}"
        )
    return encoder.get_weights()
