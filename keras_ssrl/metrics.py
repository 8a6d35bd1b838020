"""Label-free monitors of dimensional collapse (docs/protocol.md, "Dimensional collapse").

Pure NumPy functions of an embedding matrix `z` of shape `(N, d)` (one row per sample),
computed in float64 so that the singular values of a collapsed matrix are not drowned in
float32 rounding. `CollapseMonitor` (in `keras_ssrl.callbacks`) logs them to TensorBoard
at every epoch end during pre-training.

- `embedding_std`: collapse to a point drives it to 0; isotropic embeddings give
  about `1 / sqrt(d)`.
- `effective_rank`: RankMe, between 1 (all rows on a line) and `min(N, d)`.
- `collapsed_dimensions`: the number of (numerically) zero singular values of the
  covariance, the count of Figure 4 (bottom) of the paper.
"""

from __future__ import annotations

import numpy as np

# Singular values below this fraction of the largest count as collapsed (docs/protocol.md).
COLLAPSE_THRESHOLD = 1e-6
# RankMe's epsilon, added to the normalised singular values before the log.
RANKME_EPS = 1e-7


def _as_matrix(embeddings) -> np.ndarray:
    z = np.asarray(embeddings, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"expected an (N, d) embedding matrix, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("embeddings contain NaN or inf")
    return z


def embedding_std(embeddings, eps: float = 1e-12) -> float:
    """Mean over dimensions of the per-dimension std of l2-normalised embeddings.

    `mean_j std_i(z_ij / ||z_i||)`. A representation collapsed to a constant vector
    gives 0; rows spread uniformly on the unit sphere give about `1 / sqrt(d)`.

    Args:
        embeddings: array-like of shape `(N, d)`.
        eps: float, guards the division for all-zero rows.

    Returns:
        A float.

    Example:

    >>> embedding_std(np.ones((10, 4)))
    0.0

    Reference:
        Chen & He, Exploring Simple Siamese Representation Learning, CVPR 2021
        (section 4.1, "std of the l2-normalised output").
    """
    z = _as_matrix(embeddings)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return float(np.mean(np.std(z / np.maximum(norms, eps), axis=0)))


def covariance_spectrum(embeddings) -> np.ndarray:
    """Singular values of the embedding covariance, in decreasing order.

    `C = (1/N) sum_i (z_i - z_bar)(z_i - z_bar)^T`, a `(d, d)` matrix; its singular
    values are what Figure 4 (bottom) of the paper plots on a log scale.

    Args:
        embeddings: array-like of shape `(N, d)`.

    Returns:
        A float64 array of shape `(d,)`.
    """
    z = _as_matrix(embeddings)
    centred = z - z.mean(axis=0, keepdims=True)
    covariance = centred.T @ centred / z.shape[0]
    return np.linalg.svd(covariance, compute_uv=False)


def effective_rank(embeddings, eps: float = RANKME_EPS) -> float:
    """RankMe: the exponential of the entropy of the normalised singular values.

    With `sigma_k` the singular values of the embedding matrix `Z` (`(N, d)`, not
    centred, as in RankMe), `p_k = sigma_k / sum(sigma) + eps` and
    `rank = exp(-sum_k p_k log p_k)`. It is 1 when every row lies on one line and
    `min(N, d)` when all singular values are equal.

    Args:
        embeddings: array-like of shape `(N, d)`.
        eps: float, RankMe's epsilon (1e-7).

    Returns:
        A float.

    Example:

    >>> round(effective_rank(np.outer(np.arange(1, 9), np.ones(4))), 3)
    1.0

    Reference:
        Garrido et al., RankMe: Assessing the Downstream Performance of Pretrained
        Self-Supervised Representations by Their Rank, ICML 2023.
    """
    z = _as_matrix(embeddings)
    sigma = np.linalg.svd(z, compute_uv=False)
    total = sigma.sum()
    if total <= 0:
        return 1.0  # all-zero embeddings: nothing to spread, the minimum rank
    p = sigma / total + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def collapsed_dimensions(embeddings, threshold: float = COLLAPSE_THRESHOLD) -> int:
    """The number of covariance singular values below `threshold` times the largest.

    Counts the dimensions of the embedding space that the data does not use
    (docs/protocol.md: below `1e-6 * max`). An all-constant embedding has all `d` collapsed.

    Args:
        embeddings: array-like of shape `(N, d)`.
        threshold: float, relative to the largest singular value (1e-6).

    Returns:
        An int between 0 and `d`.

    Example:

    >>> z = np.outer(np.arange(8.0), [1.0, 2.0, 0.0])  # rank 1 in 3 dimensions
    >>> collapsed_dimensions(z)
    2
    """
    spectrum = covariance_spectrum(embeddings)
    largest = spectrum[0] if spectrum.size else 0.0
    if largest <= 0:
        return int(spectrum.size)
    return int(np.sum(spectrum < threshold * largest))


def collapse_metrics(embeddings) -> dict[str, float]:
    """The three monitors at once: `embedding_std`, `effective_rank`, `collapsed_dims`."""
    return {
        "embedding_std": embedding_std(embeddings),
        "effective_rank": effective_rank(embeddings),
        "collapsed_dims": float(collapsed_dimensions(embeddings)),
    }
