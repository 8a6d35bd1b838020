"""Collapse monitors against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from keras_ssrl.metrics import (
    collapse_metrics,
    collapsed_dimensions,
    covariance_spectrum,
    effective_rank,
    embedding_std,
)


def rank_one(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return np.outer(rng.normal(size=n), rng.normal(size=d))


def isotropic(n=4000, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_rank_one_embeddings_are_collapsed():
    z = rank_one()
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-4)
    assert collapsed_dimensions(z) == 15
    spectrum = covariance_spectrum(z)
    assert spectrum.shape == (16,)
    assert np.all(np.diff(spectrum) <= 1e-12)  # decreasing


def test_isotropic_embeddings_use_every_dimension():
    z = isotropic()
    assert 15.5 < effective_rank(z) <= 16.0
    assert collapsed_dimensions(z) == 0
    # Points spread on the sphere: per-dimension std of z / ||z|| is about 1/sqrt(d).
    assert embedding_std(z) == pytest.approx(1 / np.sqrt(16), rel=0.05)


def test_constant_embeddings():
    z = np.tile([1.0, -2.0, 0.5], (50, 1))
    assert embedding_std(z) == pytest.approx(0.0, abs=1e-12)
    assert collapsed_dimensions(z) == 3  # zero covariance: nothing is used
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(np.zeros((5, 3))) == 1.0


def test_effective_rank_by_hand():
    # Z with orthogonal columns of norms 3 and 1: singular values (3, 1),
    # p = (0.75, 0.25), rank = exp(-(0.75 ln 0.75 + 0.25 ln 0.25)).
    z = np.array([[3.0, 0.0], [0.0, 1.0]])
    p = np.array([0.75, 0.25])
    assert effective_rank(z) == pytest.approx(np.exp(-np.sum(p * np.log(p))), 1e-6)


def test_embedding_std_by_hand():
    # Normalised rows (1, 0) and (0, 1): each column is {1, 0}, std 0.5.
    assert embedding_std([[2.0, 0.0], [0.0, 5.0]]) == pytest.approx(0.5)


def test_collapsed_dimensions_threshold():
    # Covariance eigenvalues 1, 1e-4 and 1e-9 (relative): one below 1e-6.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    white = rng.normal(size=(5000, 3))
    white = (white - white.mean(0)) / white.std(0)
    white = white @ np.linalg.inv(np.linalg.cholesky(np.cov(white.T, bias=True))).T
    z = white * np.sqrt([1.0, 1e-4, 1e-9]) @ q.T
    assert collapsed_dimensions(z) == 1
    assert collapsed_dimensions(z, threshold=1e-3) == 2


def test_metrics_and_input_checks():
    metrics = collapse_metrics(isotropic(n=500, d=4))
    assert set(metrics) == {"embedding_std", "effective_rank", "collapsed_dims"}
    with pytest.raises(ValueError, match="NaN"):
        embedding_std([[np.nan, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        effective_rank(np.ones(3))
