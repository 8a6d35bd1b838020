"""The dataset's preprocessing as the served graph applies it.

`ServingData` is what the graph needs from the manifest of the dataset a model was
trained on (gene list, transform, per-gene statistics); `graph_transform` is the
converter's value transform as TensorFlow ops, and `make_preprocessing` the in-graph
checks and standardisation of the two kinds of served input (raw values and records).

`cpm_log2p1` datasets are refused: that transform divides each sample by its total over
every gene of the source file, including genes the converter dropped, so a model fed the
kept genes cannot reproduce it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from keras_ssrl.data import schema
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.data.preprocessing import standardizer
from keras_ssrl.serving.assets import GENES_TXT
from keras_ssrl.serving.contract import ExportError

SERVABLE_TRANSFORMS = ("log2p1", "log1p", "none")
# Values whose source had to be non-negative (the converter rejects negative ones).
NON_NEGATIVE_VALUES = ("counts", "tpm")

_INV_LN2 = 1.0 / np.log(2.0)


@dataclass
class ServingData:
    """What the served graph needs from the dataset a model was trained on."""

    genes: list[str]
    transform: str
    values: str
    record_dtype: str
    mean: np.ndarray
    std: np.ndarray
    manifest_sha256: str
    info: dict = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ServingData:
        data = manifest.data
        transform = data["transform"]
        if transform == "cpm_log2p1":
            raise ExportError(
                f"{manifest.directory}: the dataset was converted with --transform "
                "cpm_log2p1, which divides each sample by its total over every gene of "
                "the source file (genes dropped by the converter included); a served "
                "model fed the kept genes cannot reproduce that total, so it is not "
                "exported. Convert with --transform log2p1 (or log1p) and train on "
                "that dataset to serve a model."
            )
        if transform not in SERVABLE_TRANSFORMS:
            raise ExportError(f"{manifest.directory}: unknown transform {transform!r}")
        stats = data["statistics"]
        return cls(
            genes=manifest.genes,
            transform=transform,
            values=data.get("values", "counts"),
            record_dtype=manifest.record_dtype,
            mean=manifest.mean,
            std=manifest.std,
            manifest_sha256=manifest.digest(),
            info={
                "name": os.path.basename(os.path.normpath(manifest.directory)),
                "n_samples": data.get("n_samples"),
                "labels": manifest.labels,
                "statistics_fitted_on": stats.get("fitted_on"),
                "statistics_samples": stats.get("num_samples"),
                "source_format": (data.get("source") or {}).get("format"),
                "keras_ssrl_version": data.get("keras_ssrl_version"),
            },
        )


def graph_transform(x, transform: str):
    """The converter's value transform (`apply_transform`) as TensorFlow ops.

    `log2(x + 1)` is computed as `log1p(x) / ln 2`: one transcendental pass, within a
    few float32 ulps of NumPy's `log2(x + 1)` (closer to the exact value for x << 1).
    """
    import tensorflow as tf

    if transform == "none":
        return x
    if transform == "log2p1":
        return tf.math.log1p(x) * tf.constant(_INV_LN2, x.dtype)
    if transform == "log1p":
        return tf.math.log1p(x)
    raise ExportError(f"transform {transform!r} cannot be served")


def make_preprocessing(data: ServingData):
    """The in-graph preprocessing of the two kinds of served input.

    Returns:
        `(raw, records)`: `raw(expression)` checks a float32 `[batch, n_genes]` tensor of
        raw values and returns the standardised model input; `records(serialized)`
        parses schema records (transformed values) and returns `(model input,
        sample ids)`.

    The checks cost two reductions over the batch: a NaN or infinite value makes its
    row's sum non-finite (so would a row summing above 3.4e38, far beyond any
    expression value), and a negative value makes its row's minimum negative. Failing
    rows are named (0-based) in the error.
    """
    import tensorflow as tf

    z_score = standardizer(data.mean, data.std)

    def raw(expression):
        with tf.control_dependencies([_assert_width(expression, data.n_genes)]):
            x = tf.identity(expression)
        checks = [_assert_finite(x, "expression")]
        if data.values in NON_NEGATIVE_VALUES:
            checks.append(_assert_non_negative(x, data))
        with tf.control_dependencies(checks):
            x = tf.identity(x)
        return z_score(graph_transform(x, data.transform))

    def records(serialized):
        parsed = schema.parse_batch(serialized, data.n_genes, data.record_dtype)
        x = tf.cast(parsed[schema.EXPRESSION], tf.float32)
        with tf.control_dependencies([_assert_finite(x, "a record's expression")]):
            x = tf.identity(x)
        return z_score(x), parsed[schema.SAMPLE_ID]

    return raw, records


def _assert_width(expression, n_genes: int):
    import tensorflow as tf

    return tf.debugging.assert_equal(
        tf.shape(expression)[1],
        n_genes,
        message=(
            f"expression must have {n_genes} columns, the genes of assets/{GENES_TXT} "
            "in that order"
        ),
    )


def _assert_finite(x, what: str):
    import tensorflow as tf

    ok = tf.math.is_finite(tf.reduce_sum(x, axis=1))
    return tf.debugging.Assert(
        tf.reduce_all(ok),
        [
            f"{what} holds NaN or infinite values; missing values cannot be "
            "served: impute or drop them before sending. Rows:",
            tf.where(~ok)[:, 0],
        ],
        summarize=10,
    )


def _assert_non_negative(x, data: ServingData):
    import tensorflow as tf

    ok = tf.reduce_min(x, axis=1) >= 0
    return tf.debugging.Assert(
        tf.reduce_all(ok),
        [
            f"expression holds negative values, but the model was trained "
            f"on {data.values} (>= 0) transformed with {data.transform}. "
            "Rows:",
            tf.where(~ok)[:, 0],
        ],
        summarize=10,
    )
