"""The client routine: samples in, predictions CSV out.

`run_client(model, info, samples, out)` sends `Samples` (read by
`keras_ssrl.serving.inputs`) in batches through a transport (`RestModel`, `GrpcModel`
or `LocalModel` of `keras_ssrl.serving.transports`) and writes one row per sample to a
CSV: `sample_id` (and the true `label` and its `label_id` among the model's classes,
when the table's label column or the records carry one), `class_name`, `class_id` and
one probability column `p_<class>` per class for a classifier, `embedding_<i>` columns
for an encoder (or on request). `check_output` refuses, before any input is read, an
output path that would replace anything but an earlier predictions CSV. The gene list
and class names come from the export's `assets/` (`keras_ssrl.serving.assets.ModelInfo`),
since TF Serving serves tensors, not files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from keras_ssrl.data.errors import DataError
from keras_ssrl.files import write_csv_atomic
from keras_ssrl.serving.assets import ModelInfo
from keras_ssrl.serving.contract import CLASSIFIER, as_text
from keras_ssrl.serving.inputs import Samples

DEFAULT_BATCH = 64


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_predictions_csv(path: str) -> bool:
    """Whether `path` starts like a CSV this client wrote (`predictions_frame`)."""
    try:
        with open(path, encoding="utf-8") as handle:
            header = handle.readline().rstrip("\r\n").split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return header[0] == "sample_id" and (
        "class_name" in header or "embedding_0" in header
    )


def check_output(out: str, inputs: Sequence[str | None]) -> None:
    """Refuses an `--out` that would replace something other than earlier predictions.

    The predictions CSV is written atomically over `out`, so `out` may only be a new
    file or a predictions CSV of this client: never an input (the samples table, a
    file in the records folder or in the model folder) or any other existing file.

    Raises:
        DataError: naming `out` and why, before any input is read.
    """
    out = os.fspath(out)
    if os.path.isdir(out):
        raise DataError(f"--out {out}: is a folder; name the predictions CSV file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise DataError(f"--out {out}: no folder {parent}; create it first")
    for source in filter(None, inputs):
        if _inside(out, source):
            where = (
                "an input file"
                if os.path.isfile(source)
                else f"inside the input folder {source}"
            )
            raise DataError(
                f"--out {out} is {where}; the predictions would replace it. Choose "
                "another --out."
            )
    if os.path.lexists(out) and not _is_predictions_csv(out):
        raise DataError(
            f"--out {out} exists and is not a predictions CSV of export/client.py; it "
            "is never replaced. Choose another --out, or remove it yourself."
        )


def predict(
    model, samples: Samples, output_names, batch_size: int = DEFAULT_BATCH
) -> dict:
    """Sends `samples` in batches; returns output name -> concatenated array."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts: dict[str, list] = {}
    for start in range(0, len(samples.values), batch_size):
        batch = {samples.input_name: samples.values[start : start + batch_size]}
        for name, value in model.predict(
            samples.signature, batch, output_names
        ).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def predictions_frame(
    samples: Samples, outputs: dict, info: ModelInfo, embedding: bool
):
    """The predictions as a `pandas.DataFrame`, one row per sample."""
    import pandas as pd

    ids = samples.sample_ids or [as_text(s) for s in outputs["sample_id"]]
    columns = {"sample_id": ids}
    if samples.labels is not None:
        columns["label"] = ["" if v is None else v for v in samples.labels]
        if info.kind == CLASSIFIER and info.class_names:
            # The true label's class id, comparable with `class_id`; -1 for a label
            # that is not one of the model's classes (or missing).
            index = {name: i for i, name in enumerate(info.class_names)}
            columns["label_id"] = np.array(
                [index.get(v, -1) for v in samples.labels], dtype=np.int64
            )
    if info.kind == CLASSIFIER:
        columns["class_name"] = [as_text(s) for s in outputs["class_name"]]
        columns["class_id"] = np.asarray(outputs["class_id"], dtype=np.int64)
        probabilities = np.asarray(outputs["probabilities"], dtype=np.float32)
        names = info.class_names or [str(i) for i in range(probabilities.shape[1])]
        for i, name in enumerate(names):
            columns[f"p_{name}"] = probabilities[:, i]
    if embedding or info.kind != CLASSIFIER:
        emb = np.asarray(outputs["embedding"], dtype=np.float32)
        for i in range(emb.shape[1]):
            columns[f"embedding_{i}"] = emb[:, i]
    return pd.DataFrame(columns)


def run_client(
    model,
    info: ModelInfo,
    samples: Samples,
    out: str,
    *,
    batch_size: int = DEFAULT_BATCH,
    embedding: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Predicts every sample through `model` and writes the predictions CSV to `out`.

    Returns:
        A summary: samples, genes ignored, output path.
    """
    outputs = predict(model, samples, info.output_names(samples.signature), batch_size)
    frame = predictions_frame(samples, outputs, info, embedding)
    write_csv_atomic(frame, out)
    summary = {
        "samples": len(frame),
        "ignored_genes": samples.ignored_genes,
        "signature": samples.signature,
        "out": out,
    }
    log(
        f"wrote {len(frame)} predictions to {out} (signature {samples.signature}"
        + (
            f"; {samples.ignored_genes} input genes not used by the model ignored"
            if samples.ignored_genes
            else ""
        )
        + ")"
    )
    return summary
