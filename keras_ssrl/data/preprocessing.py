"""Value transforms and per-gene statistics.

The transform (`log2(x + 1)` by default) is applied once at conversion, and the records
store transformed values; standardisation (z-score per gene) is applied in the graph by
the reader and by the exported model, with statistics fitted on the pre-training split
only (docs/protocol.md, "Preprocessing": fitting on all data leaks test information).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from keras_ssrl.data.errors import DataError

VALUE_KINDS = ("counts", "tpm", "log2")
TRANSFORMS = ("log2p1", "log1p", "cpm_log2p1", "none")


def resolve_transform(values: str, transform: str) -> str:
    """The transform actually applied: none for values that are already log-scale."""
    if values not in VALUE_KINDS:
        raise DataError(
            f"unknown --values {values!r}; choose one of {', '.join(VALUE_KINDS)}"
        )
    if transform not in TRANSFORMS:
        raise DataError(
            f"unknown --transform {transform!r}; choose one of {', '.join(TRANSFORMS)}"
        )
    return "none" if values == "log2" else transform


def apply_transform(values: np.ndarray, transform: str) -> np.ndarray:
    """Applies a transform to a `(samples, genes)` block of non-negative values.

    `cpm_log2p1` scales each sample to counts per million over the genes given, so it
    must see every gene of the sample (the converter calls it before dropping genes).
    """
    if transform == "none":
        return values
    if transform == "log2p1":
        return np.log2(values + values.dtype.type(1))
    if transform == "log1p":
        return np.log1p(values)
    if transform == "cpm_log2p1":
        totals = values.sum(axis=1, keepdims=True)
        totals[totals == 0] = 1.0
        return np.log2(values * (1e6 / totals) + values.dtype.type(1))
    raise DataError(f"unknown transform {transform!r}")


def standardizer(mean: np.ndarray, std: np.ndarray):
    """The in-graph z-score of the reader and of the exported model: one definition.

    Args:
        mean, std: per-gene statistics of the stored values (the manifest's, fitted on
            the pre-training split; zero-variance genes were dropped, so `std > 0`).

    Returns:
        A function mapping a float32 tensor `(batch, genes)` to `(x - mean) * (1 / std)`
        (the reciprocal computed once, in float32), for `tf.data` maps and
        `tf.function`s alike. Training and serving call this same function, so the
        two cannot drift apart.
    """
    import tensorflow as tf

    mean = tf.constant(np.asarray(mean, dtype=np.float32))
    inv_std = tf.constant(1.0 / np.asarray(std, dtype=np.float32))

    def standardize(x):
        return (x - mean) * inv_std

    return standardize


@dataclass
class RunningMoments:
    """Per-gene mean and variance accumulated over blocks (Chan et al.'s merge).

    Float64 accumulators, so millions of samples do not lose precision; memory is two
    vectors of the gene count whatever the number of samples.
    """

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def update(self, block: np.ndarray, rows: int = 128) -> None:
        """Adds a `(samples, genes)` block, `rows` samples at a time.

        Working in slices keeps the float64 temporaries small (128 x 57k genes is
        58 MB) however large the block.
        """
        for start in range(0, block.shape[0], rows):
            self._merge(np.asarray(block[start : start + rows], dtype=np.float64))

    def _merge(self, block: np.ndarray) -> None:
        if block.shape[0] == 0:
            return
        n_b = block.shape[0]
        mean_b = block.mean(axis=0)
        m2_b = ((block - mean_b) ** 2).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / total)
        self.n = total

    @property
    def variance(self) -> np.ndarray:
        """Population variance (1/N), as the z-score of the protocol uses."""
        return self.m2 / max(self.n, 1)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)
