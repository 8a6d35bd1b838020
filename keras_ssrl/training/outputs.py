"""What a finished pre-training run leaves: encoder, projector, history, summary.

- `encoder.keras`: the kept encoder (last, or best by validation loss), saved in
  float32 whatever the training precision, loadable with plain Keras;
- `logs/embeddings/`: validation embeddings for TensorBoard's projector;
- `history.csv`: written during training by Keras' `CSVLogger`; `truncate_history`
  drops the rows of epochs a resume redoes;
- `summary.json`: final losses, steps, epochs, time, samples/s, the encoder kept.
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from keras_ssrl.config import PretrainConfig
from keras_ssrl.data import schema
from keras_ssrl.files import atomic_path, write_json_atomic
from keras_ssrl.runs import (
    ENCODER_FILE,
    HISTORY_CSV,
    LOGS_DIR,
    PROJECTOR_DIR,
    SUMMARY_JSON,
)
from keras_ssrl.training.context import ResumePoint, RunContext, RunModel

# Rows written to the TensorBoard embedding projector (it handles this many well).
PROJECTOR_ROWS = 10000


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def truncate_history(path: str, first_epoch: int) -> None:
    """Keeps the rows of the `first_epoch` epochs done; drops those redone now.

    Rows are numbered from 1 (`keras_ssrl.callbacks.HistoryCSV`): rows 1 to
    `first_epoch` were complete before a stop.
    """
    if not os.path.isfile(path):
        return
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if r and r[0].isdigit() and int(r[0]) <= first_epoch]
    with (
        atomic_path(path) as tmp,
        open(tmp, "w", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(kept)


def _last_history_row(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    out = {}
    for key, value in rows[-1].items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def finish(
    run: RunContext, built: RunModel, start: ResumePoint, seconds: float
) -> dict:
    """Writes the kept encoder, the projector files and `summary.json`; returns it.

    Args:
        run: the run.
        built: the trained model.
        start: where this session started training.
        seconds: this session's training time.
    """
    kept = "last"
    if run.config.keep == "best":
        if built.best.restore_best():
            kept = "best"
        else:
            run.log("keep=best: no validation loss recorded, keeping the last encoder")
    saved = save_encoder(built.encoder, run.config, run.manifest.n_genes, run.run_dir)
    rows = write_projector(saved, run)
    summary = _summary(run, built, start, seconds, kept=kept, projector_rows=rows)
    write_json_atomic(run.path(SUMMARY_JSON), summary)
    run.log(
        f"done: {summary['steps']} steps, loss {summary['final_loss']}, val_loss "
        f"{summary['final_val_loss']}; kept the {kept} encoder in "
        f"{run.path(ENCODER_FILE)}"
    )
    return summary


def _summary(
    run: RunContext,
    built: RunModel,
    start: ResumePoint,
    seconds: float,
    *,
    kept: str,
    projector_rows: int,
) -> dict:
    """The content of `summary.json`."""
    plan = run.plan
    final = _last_history_row(run.path(HISTORY_CSV))
    samples = plan.samples_at(plan.total_steps) - plan.samples_at(start.step)
    best = built.best.state()
    return {
        "status": "complete",
        "method": run.config.method,
        "precision": run.precision,
        "steps": plan.total_steps,
        "total_steps": plan.total_steps,
        "epochs": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "batch_size": plan.batch_size,
        "n_train": plan.n_train,
        "final_loss": _finite_or_none(final.get("loss")),
        "final_val_loss": _finite_or_none(final.get("val_loss")),
        "final": {
            k: _finite_or_none(v) if isinstance(v, float) else v
            for k, v in final.items()
            if k != "epoch"
        },
        # Wall time of training, validation and monitors, over every session.
        "seconds": round(start.seconds + seconds, 3),
        # This session's training samples over its time (None if it had nothing to do).
        "samples_per_second": round(samples / seconds, 2) if samples else None,
        "kept_encoder": kept,
        "best": {
            "val_loss": best["value"],
            "epoch": None if best["epoch"] is None else best["epoch"] + 1,
        },
        "resumed_from_step": start.step if start.resumed else None,
        "encoder_file": ENCODER_FILE,
        "encoder_dtype_policy": "float32",
        "projector_rows": projector_rows,
    }


def save_encoder(encoder, config: PretrainConfig, n_genes: int, run_dir: str):
    """Saves a float32 copy of `encoder` as `encoder.keras` (atomically); returns it.

    Under mixed precision the layers carry a `mixed_*` policy that a saved model would
    impose on every later use; the variables are float32 either way, so a float32
    encoder with the same weights is saved instead.
    """
    import keras

    from keras_ssrl.encoders import build_encoder

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = build_encoder(
            n_genes,
            config.encoder.layers,
            config.encoder.width,
            config.encoder.dropout,
            name=encoder.name,
        )
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(encoder.get_weights())
    path = os.path.join(run_dir, ENCODER_FILE)
    with atomic_path(path, ".keras") as tmp:
        copy.save(tmp)
    return copy


def _embed_validation(encoder, run: RunContext):
    """Up to `PROJECTOR_ROWS` validation embeddings, their labels and sample ids."""
    from keras_ssrl.data.reader import load_dataset

    bs = run.plan.batch_size
    data = (
        load_dataset(
            run.data_dir,
            schema.PRETRAIN_VAL,
            bs,
            with_labels=True,
            with_sample_ids=True,
        )
        .unbatch()
        .take(PROJECTOR_ROWS)
        .batch(bs)
    )
    embeddings, labels, ids = [], [], []
    for x, y, sample_ids in data:
        embeddings.append(np.asarray(encoder(x, training=False), dtype=np.float32))
        labels.extend(int(v) for v in y.numpy())
        ids.extend(s.decode("utf-8") for s in sample_ids.numpy())
    return embeddings, labels, ids


def _write_metadata(path: str, labels: list[int], ids: list[str], names) -> bool:
    """Writes the projector's `metadata.tsv`; True when it has a label column."""
    labelled = bool(names) and any(v >= 0 for v in labels)

    def clean(text: str) -> str:
        return text.replace("\t", " ").replace("\n", " ")

    with open(path, "w", encoding="utf-8") as f:
        if labelled:
            f.write("label\tsample_id\n")
            for v, sid in zip(labels, ids):
                name = names[v] if 0 <= v < len(names) else "unlabelled"
                f.write(f"{clean(name)}\t{clean(sid)}\n")
        else:  # one column: the projector reads it without a header
            for sid in ids:
                f.write(f"{clean(sid)}\n")
    return labelled


def write_projector(encoder, run: RunContext) -> int:
    """Writes validation embeddings (and labels, if any) for TensorBoard's projector.

    Labels are read here, after training, only to colour the points. Returns the
    number of rows written.
    """
    import tensorflow as tf
    from tensorboard.plugins import projector

    folder = run.path(LOGS_DIR, PROJECTOR_DIR)
    os.makedirs(folder, exist_ok=True)
    embeddings, labels, ids = _embed_validation(encoder, run)
    if not embeddings:
        return 0
    z = np.concatenate(embeddings)
    labelled = _write_metadata(
        os.path.join(folder, "metadata.tsv"), labels, ids, run.manifest.labels
    )
    variable = tf.Variable(z, name="embedding")
    tf.train.Checkpoint(embedding=variable).save(os.path.join(folder, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    embedding.metadata_path = "metadata.tsv"
    projector.visualize_embeddings(folder, config)
    # An event file makes the folder a TensorBoard run, where the projector looks.
    writer = tf.summary.create_file_writer(folder)
    with writer.as_default():
        tf.summary.text(
            "embeddings",
            f"{len(z)} pre-training validation samples embedded by the kept encoder"
            + (
                ", coloured by label (labels never used in training)"
                if labelled
                else ""
            ),
            step=0,
        )
    writer.close()
    run.log(f"projector: {len(z)} validation embeddings in {folder}")
    return int(len(z))
