"""Tests of the built-in synthetic RNA-seq generator (`keras_ssrl.data.synthetic`)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from keras_ssrl.data.synthetic import (
    DEFAULT_N_CLASSES,
    DEFAULT_N_GENES,
    DEFAULT_N_SAMPLES,
    SOURCES,
    SyntheticExpression,
    class_names,
    make_synthetic,
)

# Small sizes keep the whole file fast; the biology is the same at any size.
N_SAMPLES = 300
N_GENES = 400


def _make(source: str = "synthetic-tcga", seed: int = 0, **kwargs):
    kwargs.setdefault("n_samples", N_SAMPLES)
    kwargs.setdefault("n_genes", N_GENES)
    return make_synthetic(source, seed=seed, **kwargs)


@pytest.fixture(scope="module")
def tcga() -> SyntheticExpression:
    return _make("synthetic-tcga")


@pytest.fixture(scope="module")
def archs4() -> SyntheticExpression:
    return _make("synthetic-archs4")


def _strip_version(gene: str) -> str:
    return gene.split(".", 1)[0]


def _log_mean_by_gene(data: SyntheticExpression) -> dict[str, float]:
    means = np.log2(data.counts + 1.0).mean(axis=0)
    return {_strip_version(g): m for g, m in zip(data.genes, means, strict=True)}


def test_defaults_match_the_documented_sizes():
    assert SOURCES == ("synthetic-tcga", "synthetic-archs4")
    assert DEFAULT_N_SAMPLES == {"synthetic-tcga": 4000, "synthetic-archs4": 8000}
    assert DEFAULT_N_GENES == 5000
    assert DEFAULT_N_CLASSES == 19


@pytest.mark.parametrize("source", SOURCES)
def test_same_arguments_give_bit_identical_data(source):
    first, second = _make(source, seed=3), _make(source, seed=3)
    assert first.counts.dtype == second.counts.dtype
    np.testing.assert_array_equal(first.counts, second.counts)
    np.testing.assert_array_equal(first.library_size, second.library_size)
    assert first.sample_ids == second.sample_ids
    assert first.genes == second.genes
    assert first.symbols == second.symbols
    assert first.labels == second.labels
    assert first.classes == second.classes


@pytest.mark.parametrize("source", SOURCES)
def test_different_seeds_draw_different_samples_from_the_same_world(source):
    first, second = _make(source, seed=0), _make(source, seed=1)
    assert not np.array_equal(first.counts, second.counts)
    assert first.labels != second.labels
    # The genes and classes belong to the world, not to the seed.
    assert first.genes == second.genes
    assert first.symbols == second.symbols
    assert first.classes == second.classes


@pytest.mark.parametrize("source", SOURCES)
def test_shapes_and_dtypes(source):
    data = _make(source, n_classes=7)
    assert data.source == source
    assert data.counts.shape == (N_SAMPLES, N_GENES)
    assert np.issubdtype(data.counts.dtype, np.integer)
    assert data.counts.min() >= 0
    assert len(data.sample_ids) == len(set(data.sample_ids)) == N_SAMPLES
    assert len(data.genes) == len(set(data.genes)) == N_GENES
    assert len(data.symbols) == len(set(data.symbols)) == N_GENES
    assert len(data.labels) == N_SAMPLES
    assert len(data.classes) == 7
    assert set(data.labels) == set(data.classes)
    assert data.library_size.dtype == np.int64
    np.testing.assert_array_equal(data.library_size, data.counts.sum(axis=1))


def test_identifier_formats(tcga, archs4):
    assert all(re.fullmatch(r"ENSG\d{11}\.\d+", g) for g in tcga.genes)
    assert all(re.fullmatch(r"ENSG\d{11}", g) for g in archs4.genes)
    assert all(re.fullmatch(r"SYNG\d+", s) for s in tcga.symbols + archs4.symbols)
    assert all(re.fullmatch(r"TCGA-SYN-\d{6}-01", s) for s in tcga.sample_ids)
    assert all(re.fullmatch(r"GSMSYN\d{7}", s) for s in archs4.sample_ids)
    # Stripping the versions keeps the TCGA ids unique.
    assert len({_strip_version(g) for g in tcga.genes}) == len(tcga.genes)


@pytest.mark.parametrize("source", SOURCES)
def test_many_genes_are_low_or_zero(source):
    data = _make(source)
    mean = data.counts.mean(axis=0)
    assert 0.15 < np.mean(mean < 1.0) < 0.7
    assert np.mean(data.counts == 0) > 0.2
    # ... but a good part of the genes is well expressed, as in real RNA-seq.
    assert np.mean(mean > 100.0) > 0.2


def test_counts_are_overdispersed(tcga):
    # Negative binomial: within one class the variance of expressed genes exceeds
    # the mean (a Poisson would give variance == mean).
    labels = np.array(tcga.labels)
    biggest = max(tcga.classes, key=tcga.labels.count)
    counts = tcga.counts[labels == biggest].astype(float)
    expressed = counts.mean(axis=0) > 20
    ratio = counts[:, expressed].var(axis=0) / counts[:, expressed].mean(axis=0)
    assert np.median(ratio) > 5


def test_library_sizes_vary_and_differ_between_sources(tcga, archs4):
    for data in (tcga, archs4):
        log_size = np.log(data.library_size)
        assert np.std(log_size) > 0.2
        assert data.library_size.min() > 0
    # ARCHS4 pools many studies: a wider library-size distribution.
    assert np.std(np.log(archs4.library_size)) > np.std(np.log(tcga.library_size))


def test_classes_are_imbalanced(tcga):
    counts = [tcga.labels.count(name) for name in tcga.classes]
    assert min(counts) >= 5
    assert max(counts) > 2 * min(counts)


def test_sources_share_class_names_and_symbols(tcga, archs4):
    assert tcga.classes == archs4.classes == class_names(DEFAULT_N_CLASSES)
    assert set(tcga.labels) == set(archs4.labels) == set(tcga.classes)
    # A shared gene has the same symbol in both sources.
    tcga_symbols = dict(zip(map(_strip_version, tcga.genes), tcga.symbols, strict=True))
    archs4_symbols = dict(zip(archs4.genes, archs4.symbols, strict=True))
    shared = tcga_symbols.keys() & archs4_symbols.keys()
    assert all(tcga_symbols[g] == archs4_symbols[g] for g in shared)


def test_gene_lists_overlap_partly_and_are_ordered_differently(tcga, archs4):
    tcga_genes = [_strip_version(g) for g in tcga.genes]
    shared = set(tcga_genes) & set(archs4.genes)
    assert 0.5 < len(shared) / len(tcga_genes) < 0.95
    assert 0.5 < len(shared) / len(archs4.genes) < 0.95
    tcga_order = [g for g in tcga_genes if g in shared]
    archs4_order = [g for g in archs4.genes if g in shared]
    assert tcga_order != archs4_order


def test_batch_effect_between_sources(tcga, archs4):
    tcga_other_seed = _make("synthetic-tcga", seed=1)
    reference = _log_mean_by_gene(tcga)
    replicate = _log_mean_by_gene(tcga_other_seed)
    other_source = _log_mean_by_gene(archs4)
    shared = sorted(reference.keys() & other_source.keys())
    within = np.mean([abs(reference[g] - replicate[g]) for g in shared])
    between = np.mean([abs(reference[g] - other_source[g]) for g in shared])
    assert between > 2 * within


def test_labels_are_learnable_but_not_trivially():
    data = _make("synthetic-tcga", seed=0)
    x = np.log2(data.counts + 1.0)
    y = np.array(data.labels)
    train, test = train_test_split(
        np.arange(len(y)), train_size=0.5, stratify=y, random_state=0
    )
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    z = (x - mean) / np.where(std > 0, std, 1.0)

    def accuracy(rows):
        model = LogisticRegression(max_iter=2000).fit(z[rows], y[rows])
        return model.score(z[test], y[test])

    one_per_class = np.array([train[y[train] == name][0] for name in data.classes])
    few = accuracy(one_per_class)
    many = accuracy(train)
    chance = 1.0 / len(data.classes)
    assert 3 * chance < few < 0.95
    assert many > few + 0.1


def test_class_names():
    assert class_names(3) == ["breast", "ovary", "uterus"]
    many = class_names(30)
    assert len(many) == len(set(many)) == 30
    assert many[:19] == class_names(19)


def test_same_world_for_both_sources_at_any_seed():
    first = _make("synthetic-tcga", seed=5)
    second = _make("synthetic-archs4", seed=9)
    assert first.classes == second.classes
    tcga_genes = {_strip_version(g) for g in first.genes}
    assert 0.5 < len(tcga_genes & set(second.genes)) / N_GENES < 0.95


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "tcga"}, "synthetic-tcga"),
        ({"n_classes": 1}, "n_classes"),
        ({"n_classes": 2.5}, "n_classes"),
        ({"n_classes": True}, "n_classes"),
        ({"n_samples": 50, "n_classes": 19}, "n_samples"),
        ({"n_genes": 10}, "n_genes"),
        ({"seed": -1}, "seed"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    kwargs = {"n_samples": N_SAMPLES, "n_genes": N_GENES, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_synthetic(**kwargs)


def test_unknown_source_names_the_valid_ones():
    with pytest.raises(ValueError) as error:
        make_synthetic("archs4")
    assert all(source in str(error.value) for source in SOURCES)
