"""The client's inputs: samples read and put in the model's gene order.

Inputs are either a table (CSV / TSV / Parquet, samples as rows or genes as rows, read
by the converter's own table reader) whose gene columns are put in the model's gene
order (`align_to_model`: ids matched without Ensembl version suffix, as the converter
matches them; a missing model gene is an error naming it, genes the model does not use
are ignored and counted), or a converted TFRecord folder whose records go to the
`predict_examples` signature unchanged (`read_record_samples`: its gene list must be
the model's; the records' true labels are read beside them). Either way the result is
`Samples`, ready to send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.genes import plan_genes, strip_version
from keras_ssrl.serving.assets import ASSETS, GENES_TXT, ModelInfo
from keras_ssrl.serving.contract import (
    EXAMPLES_INPUT,
    INPUT,
    PREDICT_EXAMPLES,
    SERVING_DEFAULT,
)


@dataclass
class Samples:
    """Model inputs ready to send: raw values, or serialized records."""

    sample_ids: list[str]
    signature: str
    input_name: str
    values: np.ndarray  # float32 (n, genes), or object array of bytes (n,)
    labels: list | None = None  # the true class name per sample (None: unknown)
    ignored_genes: int = 0


def align_to_model(
    genes: Sequence[str],
    values: np.ndarray,
    model_genes: Sequence[str],
    path: str = "input",
    duplicate_genes: str = "error",
) -> tuple[np.ndarray, int]:
    """Puts a `(samples, genes)` block in the model's gene order.

    Gene ids are matched without Ensembl version suffix (`strip_version`, as the
    converter does), and columns of one id are merged by `duplicate_genes` (`sum`,
    `mean` or `first`, the converter's `plan_genes` policies) or refused (`error`,
    the default). Only the model's genes matter: duplicates among the genes it
    ignores are ignored too.

    Returns:
        `(float32 array (samples, len(model_genes)), number of genes ignored)`.

    Raises:
        DataError: model genes missing from the input (named), or duplicate ids of
            model genes under `error` (named, with the client's `--duplicate-genes`).
    """
    refuse = duplicate_genes == "error"
    plan = plan_genes(
        list(genes), path, strip_versions=True, par_y="keep",
        duplicate_genes="first" if refuse else duplicate_genes,
    )  # fmt: skip
    position = {g: i for i, g in enumerate(plan.genes)}
    wanted = [strip_version(g) for g in model_genes]
    if refuse:
        used = [position[w] for w in wanted if w in position]
        _refuse_duplicate_genes(plan, used, path)
    missing = [g for g, w in zip(model_genes, wanted) if w not in position]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of the model's {len(model_genes)} genes are "
            f"missing: {preview(missing, 10)}. Every gene of the model's "
            f"{ASSETS}/{GENES_TXT} needs a column (ids are matched without version "
            "suffix); a gene not measured cannot be imputed here."
        )
    merged = plan.apply(np.asarray(values))
    columns = np.array([position[w] for w in wanted], dtype=np.int64)
    return np.ascontiguousarray(
        merged[:, columns], dtype=np.float32
    ), plan.n_genes - len(columns)


def _refuse_duplicate_genes(plan, used: Sequence[int], path: str) -> None:
    """Raises `DataError` naming the model genes that have several input columns."""
    groups = [(plan.genes[i], plan.groups[i]) for i in used]
    duplicated = [
        f"{gene} (input genes {', '.join(str(c + 1) for c in columns[:4])})"
        for gene, columns in groups
        if len(columns) > 1
    ]
    if duplicated:
        raise DataError(
            f"{path}: {len(duplicated)} of the model's gene id(s) occur more than once "
            f"(ids compared without version suffix), e.g. {preview(duplicated, 5)}. "
            "Choose how to merge them with --duplicate-genes sum|mean|first (sum adds "
            "the counts of the columns)."
        )


def _refuse_duplicate_samples(sample_ids: Sequence[str], path: str, row_name) -> None:
    """Raises `DataError` naming sample ids that occur more than once.

    Each row of the predictions CSV is keyed by its sample id: two samples with one id
    would give two predictions nobody can tell apart.
    """
    seen: dict[str, int] = {}
    duplicated: dict[str, list[int]] = {}
    for i, sid in enumerate(sample_ids):
        sid = str(sid)
        if sid in seen:
            duplicated.setdefault(sid, [seen[sid]]).append(i)
        else:
            seen[sid] = i
    if duplicated:
        rows = next(iter(duplicated.values()))[:2]
        raise DataError(
            f"{path}: {len(duplicated)} sample id(s) occur more than once: "
            f"{preview(duplicated, 5)}; e.g. {' and '.join(map(row_name, rows))}. "
            "Predictions are keyed by sample id, so ids must be unique: rename or drop "
            "the duplicates."
        )


def check_finite(x: np.ndarray, sample_ids: Sequence[str], genes: Sequence[str], path):
    """Raises `DataError` naming the first sample and gene with a NaN or inf value."""
    bad = ~np.isfinite(x)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise DataError(
            f"{path}: {int(bad.sum())} missing or infinite value(s) in the model's genes "
            f"({len(set(rows.tolist()))} sample(s)), e.g. sample {sample_ids[rows[0]]!r}, "
            f"gene {genes[cols[0]]!r}: the model cannot be served NaN; impute or drop "
            "them first"
        )


def read_table_samples(
    path: str,
    info: ModelInfo,
    *,
    fmt: str = "auto",
    sample_column: str | None = None,
    label_column: str | None = None,
    genes_as_rows: bool | None = None,
    duplicate_genes: str = "error",
) -> Samples:
    """Reads a CSV / TSV / Parquet expression table into model inputs."""
    from keras_ssrl.data.sources.tables import open_table

    source = open_table(
        path, fmt=fmt, sample_column=sample_column, label_column=label_column,
        genes_as_rows=genes_as_rows,
    )  # fmt: skip
    _refuse_duplicate_samples(source.sample_ids, path, source.row_name)
    x, ignored = align_to_model(
        source.genes, source.values, info.genes, path, duplicate_genes
    )
    check_finite(x, source.sample_ids, info.genes, path)
    return Samples(
        list(source.sample_ids), SERVING_DEFAULT, INPUT, x, source.labels, ignored
    )


def read_record_samples(data_dir: str, split: str, info: ModelInfo) -> Samples:
    """Reads a converted TFRecord split as serialized records, for `predict_examples`.

    Raises:
        DataError: a manifest naming files outside its folder, another gene list,
            transform or record dtype than the model's; `DamagedDataError` for a shard
            that is missing or differs from its manifest checksum.
    """
    import tensorflow as tf

    from keras_ssrl.data.manifest import Manifest
    from keras_ssrl.data.reader import verify_shards

    manifest = Manifest.load(data_dir)
    _check_records_fit(manifest, info, data_dir)
    # Every byte is sent anyway: check them all first, so a damaged shard is named
    # (DamagedDataError) rather than failing mid-way as "corrupted record at N".
    verify_shards(manifest, split, "checksum")
    records = [r.numpy() for r in tf.data.TFRecordDataset(manifest.shard_paths(split))]
    if not records:
        raise DataError(f"{data_dir}: split {split!r} holds no records")
    values = np.empty(len(records), dtype=object)
    values[:] = records
    # Sample ids come back from the model (output sample_id).
    return Samples(
        [], PREDICT_EXAMPLES, EXAMPLES_INPUT, values, _record_labels(records, manifest)
    )


def _record_labels(records: Sequence[bytes], manifest) -> list | None:
    """The class name of every record (None when it has none), or None for records
    without any label, so that predictions can sit beside the truth."""
    from tensorflow.core.example import example_pb2

    from keras_ssrl.data import schema

    ids = [
        example_pb2.Example.FromString(r).features.feature[schema.LABEL].int64_list.value
        for r in records
    ]
    ids = [v[0] if len(v) else schema.UNLABELLED for v in ids]
    if all(i == schema.UNLABELLED for i in ids):
        return None
    return [manifest.labels[i] if i != schema.UNLABELLED else None for i in ids]


def _check_records_fit(manifest, info: ModelInfo, data_dir: str) -> None:
    """Raises `DataError` unless the records hold what the model was exported for."""
    data = info.card["data"]
    if manifest.genes != info.genes:
        first = next(
            (i for i, (a, b) in enumerate(zip(manifest.genes, info.genes)) if a != b),
            min(manifest.n_genes, len(info.genes)),
        )
        raise DataError(
            f"{data_dir}: its {manifest.n_genes} genes are not the model's "
            f"{len(info.genes)} in the same order (first difference at position "
            f"{first + 1}); records must hold the model's genes. Re-write them with "
            "tfrecords_tools/align.py --to the model's dataset, or send a table with "
            "--input."
        )
    for key, have in (
        ("transform", manifest.data["transform"]),
        ("record_dtype", manifest.record_dtype),
    ):
        if have != data[key]:
            raise DataError(
                f"{data_dir}: records are {key} {have!r}, the model expects "
                f"{data[key]!r}; re-convert with the model's settings"
            )
