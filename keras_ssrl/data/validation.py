"""What the converter refuses: invalid settings, and cells that are not expression.

`validate_config` checks a `ConversionConfig` before any input is read or written;
`check_block` checks every raw block during the statistics pass of
`keras_ssrl.data.convert` (numeric, finite, non-negative for counts / TPM, missing
values according to the policy). Messages name the command-line flag, or the sample and
the gene.
"""

from __future__ import annotations

import math

import numpy as np

from keras_ssrl.config import ConversionConfig
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError
from keras_ssrl.data.genes import DUPLICATE_POLICIES
from keras_ssrl.data.labels import MISSING_LABEL_POLICIES
from keras_ssrl.data.preprocessing import resolve_transform
from keras_ssrl.data.sources.base import ExpressionSource

MISSING_VALUE_POLICIES = ("error", "zero", "drop-genes")


def _finite(value) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _whole(value, minimum: int) -> bool:
    return _finite(value) and float(value).is_integer() and value >= minimum


def _require(ok: bool, flag: str, value, expected: str) -> None:
    if not ok:
        raise DataError(f"{flag} must be {expected}, got {value!r}")


def validate_config(config: ConversionConfig) -> None:
    """Refuses every setting that is invalid, before any input is read or written.

    Raises:
        DataError: naming the command-line flag, what it accepts and the value given.
    """
    resolve_transform(config.values, config.transform)
    choices = {
        "--record-dtype": (config.record_dtype, schema.RECORD_DTYPES),
        "--missing-values": (config.missing_values, MISSING_VALUE_POLICIES),
        "--missing-labels": (config.missing_labels, MISSING_LABEL_POLICIES),
        "--duplicate-genes": (config.duplicate_genes, DUPLICATE_POLICIES),
        "par_y": (config.par_y, ("drop", "keep")),
    }
    for flag, (value, allowed) in choices.items():
        _require(value in allowed, flag, value, f"one of {', '.join(allowed)}")
    _require(_whole(config.shards, 1), "--shards", config.shards, "a whole number >= 1")
    _require(
        config.block_size is None or _whole(config.block_size, 1),
        "--block-size",
        config.block_size,
        "a whole number >= 1",
    )
    _require(
        _finite(config.min_variance) and config.min_variance >= 0,
        "min_variance",
        config.min_variance,
        "a number >= 0",
    )
    _require(
        _finite(config.align_min_overlap) and 0 <= config.align_min_overlap <= 1,
        "--min-overlap",
        config.align_min_overlap,
        "a fraction between 0 and 1",
    )
    split = config.split
    for flag, size in (
        ("--finetune-size", split.finetune_size),
        ("--test-size", split.test_size),
    ):
        _require(
            size is None or (_finite(size) and (0 <= size < 1 or _whole(size, 1))),
            flag,
            size,
            "a fraction between 0 and 1 or a whole count",
        )
    _require(
        _finite(split.val_fraction) and 0 <= split.val_fraction < 1,
        "--val-fraction",
        split.val_fraction,
        "a fraction >= 0 and < 1",
    )
    _require(
        _whole(split.min_class_size, 1),
        "--min-class-size",
        split.min_class_size,
        "a whole number >= 1",
    )
    _require(_whole(split.seed, 0), "--seed", split.seed, "a whole number >= 0")


def check_block(
    source: ExpressionSource,
    indices: np.ndarray,
    values: np.ndarray,
    config: ConversionConfig,
    nan_columns: np.ndarray,
) -> int:
    """Validates one raw block of a source; returns its number of missing cells.

    Args:
        source: the source the block was read from (named in messages).
        indices: the block's sample positions in the source.
        values: the block's raw values, `(samples, genes)`.
        config: the conversion settings (`missing_values`, `values`).
        nan_columns: bool `(genes,)`, updated in place: the source columns holding a
            missing value (for `--missing-values drop-genes`).

    Raises:
        DataError: an infinite value, a missing value under `--missing-values error`,
            or a negative value for counts / TPM, naming the sample and the gene.
    """
    finite = np.isfinite(values)
    if not finite.all():
        nan = np.isnan(values)
        infinite = ~finite & ~nan
        if infinite.any():
            row, col = np.argwhere(infinite)[0]
            raise DataError(
                f"{source.path}: {source.row_name(int(indices[row]))}, gene "
                f"{source.genes[col]!r}: value {values[row, col]} is infinite; fix the "
                "file (infinite values are never valid expression)"
            )
        if config.missing_values == "error":
            row, col = np.argwhere(nan)[0]
            raise DataError(
                f"{source.path}: {source.row_name(int(indices[row]))}, gene "
                f"{source.genes[col]!r}: value is missing (NaN/NA); {int(nan.sum())} "
                "missing cell(s) in this block. Fix the file, or pass "
                "--missing-values zero|drop-genes (counted in the report)."
            )
        nan_columns |= nan.any(axis=0)
        missing = int(nan.sum())
    else:
        missing = 0
    if config.values != "log2":
        negative = values < 0
        if negative.any():
            row, col = np.argwhere(negative)[0]
            raise DataError(
                f"{source.path}: {source.row_name(int(indices[row]))}, gene "
                f"{source.genes[col]!r}: value {values[row, col]} is negative, but "
                f"--values {config.values} must be >= 0. If the file is already "
                "log-transformed, pass --values log2."
            )
    return missing
