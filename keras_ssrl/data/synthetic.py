"""Deterministic synthetic bulk RNA-seq data: the package's built-in default dataset.

Two sources, `"synthetic-tcga"` and `"synthetic-archs4"`, imitate the two datasets of
the paper closely enough to exercise the whole pipeline without downloading anything:

- Counts are negative binomial (gamma-Poisson) with per-sample library sizes and a
  gene-wise, mean-dependent dispersion, so many genes are low or never expressed.
- Expression follows a few shared gene programs (sparse loadings, per-sample
  activities). Tissue groups and classes shift some program activities and switch on
  marker genes; a per-sample purity dilutes the class-specific part, as normal tissue
  does in tumour samples. Classes are imbalanced, as in TCGA.
- Both sources are drawn from one fixed "world" (gene universe, programs, class biology,
  batch effect), so they share class names and biology, but ARCHS4 carries a gene-wise
  batch shift, per-study effects, another library-size distribution and other class
  proportions, and each source keeps a different, differently ordered ~80% of the gene
  universe. TCGA writes versioned Ensembl ids (`ENSG00000012345.14`), ARCHS4 does not.

The world depends only on `n_classes` and `n_genes` (and an internal constant), never on
the user's `seed`: the two sources agree whenever they are made with the same
`n_classes` and `n_genes`. The `seed` only draws the samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOURCES = ("synthetic-tcga", "synthetic-archs4")

# Defaults per source: small enough to convert and train in minutes on two CPU cores.
DEFAULT_N_SAMPLES = {"synthetic-tcga": 4000, "synthetic-archs4": 8000}
DEFAULT_N_GENES = 5000
DEFAULT_N_CLASSES = 19  # the paper's number of TCGA classes

# Tissues in groups of related classes: classes of one group share part of their
# biology (program shifts, markers), which makes them confusable with few labels.
_TISSUE_GROUPS = (
    ("breast", "ovary", "uterus"),
    ("colon", "stomach", "esophagus"),
    ("kidney", "bladder", "prostate"),
    ("lung", "head_neck", "cervix"),
    ("brain", "adrenal", "thyroid"),
    ("liver", "pancreas", "bile_duct"),
    ("skin", "soft_tissue", "blood"),
    ("testis", "muscle", "spleen"),
)
_GROUP_SIZE = 3

# Fixes the world (genes, programs, class biology, batch effect) for every user seed.
_WORLD_SEED = 20_240_521
_SHARED_GENE_FRACTION = 0.8  # genes kept by both sources, as a fraction of n_genes
_N_PROGRAMS = 16
_MIN_SAMPLES_PER_CLASS = 5
_MIN_GENES = 100
_CHUNK_ROWS = 1024  # samples drawn per block: bounds memory, fixed for determinism

# Strength of the biology, tuned so that a linear classifier needs many labels: about
# one labelled example per class gives ~0.5 accuracy, a few hundred give ~0.9.
_GROUP_PROGRAM_SHIFT = (2.0, 4.0)
_CLASS_PROGRAM_SHIFT = (2.0, 4.0)
_N_GROUP_MARKERS = 15
_N_CLASS_MARKERS = 15
_MARKER_LOG_FC = (2.0, 4.5)
_ACTIVITY_SD = 1.0


@dataclass
class SyntheticExpression:
    """A synthetic samples x genes count matrix with its metadata.

    Attributes:
        source: the source name, one of `SOURCES`.
        counts: integer array of shape `(n_samples, n_genes)`, samples as rows.
        sample_ids: unique sample identifiers, in row order.
        genes: gene ids as the source writes them (`"synthetic-tcga"`: versioned
            Ensembl ids such as `ENSG00000012345.14`; `"synthetic-archs4"`: no version).
        symbols: gene symbols, in the order of `genes`.
        labels: the class name of each sample, in row order.
        classes: all class names, in a fixed order (the same for both sources).
        library_size: int64 array of shape `(n_samples,)`, the total count per sample.
    """

    source: str
    counts: np.ndarray
    sample_ids: list[str]
    genes: list[str]
    symbols: list[str]
    labels: list[str]
    classes: list[str]
    library_size: np.ndarray


@dataclass
class _World:
    """Everything both sources share, over the whole gene universe."""

    ensembl: np.ndarray  # int64 (U,), the numeric part of the Ensembl ids
    versions: np.ndarray  # int64 (U,), the TCGA version suffix
    symbols: list[str]  # (U,)
    source_genes: dict[str, np.ndarray]  # source -> universe indices, in file order
    base_log_mean: np.ndarray  # (U,), log expected count at the reference depth
    loadings: np.ndarray  # (U, K), sparse program loadings
    group_of_class: np.ndarray  # (C,)
    group_shift: np.ndarray  # (G, K), program activity shifts of each group
    class_shift: np.ndarray  # (C, K), program activity shifts of each class
    group_markers: np.ndarray  # (G, U), log fold changes of group markers
    class_markers: dict[str, np.ndarray]  # source -> (C, U), class marker log FC
    dispersion: np.ndarray  # (U,), NB dispersion at the reference depth
    archs4_shift: np.ndarray  # (U,), ARCHS4 vs TCGA gene-wise log fold change
    class_weights: dict[str, np.ndarray]  # source -> (C,) class proportions
    classes: list[str]


def class_names(n_classes: int = DEFAULT_N_CLASSES) -> list[str]:
    """Returns the class names used for `n_classes` classes, in their fixed order.

    Args:
        n_classes: the number of classes (at least 2).

    Returns:
        A list of `n_classes` tissue-like names; past the built-in tissues the names
        are `tissue_25`, `tissue_26`, ...

    Example:

    >>> class_names(4)
    ['breast', 'ovary', 'uterus', 'colon']
    """
    _check_int("n_classes", n_classes, minimum=2)
    names = [name for group in _TISSUE_GROUPS for name in group]
    names += [f"tissue_{i + 1:02d}" for i in range(len(names), n_classes)]
    return names[:n_classes]


def make_synthetic(
    source: str = "synthetic-tcga",
    n_samples: int | None = None,
    n_genes: int | None = None,
    n_classes: int = DEFAULT_N_CLASSES,
    seed: int = 0,
) -> SyntheticExpression:
    """Generates a deterministic synthetic bulk RNA-seq count matrix.

    Args:
        source: `"synthetic-tcga"` or `"synthetic-archs4"`.
        n_samples: number of samples (rows); None for the source's default (4000 for
            TCGA, 8000 for ARCHS4). At least `5 * n_classes`.
        n_genes: number of genes the source keeps; None for the default (5000). About
            80% of them are shared with the other source made with the same `n_genes`.
        n_classes: number of classes (tissues), at least 2; 19 as in the paper.
        seed: draws the samples (non-negative int). The genes, class biology and batch
            effect do not depend on it, so the two sources agree for any seeds.

    Returns:
        A `SyntheticExpression`; the same arguments give a bit-identical result.

    Example:

    >>> data = make_synthetic("synthetic-archs4", n_samples=200, n_genes=300, seed=1)
    >>> data.counts.shape
    (200, 300)
    >>> data.classes[:3]
    ['breast', 'ovary', 'uterus']
    """
    n_samples, n_genes = _checked_sizes(source, n_samples, n_genes, n_classes, seed)
    world = _make_world(n_classes, n_genes)
    source_index = SOURCES.index(source)
    # The source index and sizes enter the stream so that the two sources (and two
    # sizes) never reuse the same random numbers for one user seed.
    rng = np.random.default_rng(
        np.random.SeedSequence([seed, source_index, n_classes, n_genes, n_samples])
    )
    samples = _draw_samples(rng, world, source, n_samples)
    counts = _draw_counts(rng, world, source, samples)
    cols = world.source_genes[source]
    ensembl = [f"ENSG{number:011d}" for number in world.ensembl[cols]]
    if source == "synthetic-archs4":
        genes = ensembl
        sample_ids = [f"GSMSYN{i + 1:07d}" for i in range(n_samples)]
    else:
        # TCGA (GDC) files write versioned ids, so id normalisation gets exercised.
        genes = [
            f"{gid}.{v}" for gid, v in zip(ensembl, world.versions[cols], strict=True)
        ]
        sample_ids = [f"TCGA-SYN-{i + 1:06d}-01" for i in range(n_samples)]
    return SyntheticExpression(
        source=source,
        counts=counts,
        sample_ids=sample_ids,
        genes=genes,
        symbols=[world.symbols[i] for i in cols],
        labels=[world.classes[i] for i in samples.y],
        classes=list(world.classes),
        library_size=counts.sum(axis=1, dtype=np.int64),
    )


def _checked_sizes(
    source: str, n_samples: int | None, n_genes: int | None, n_classes: int, seed: int
) -> tuple[int, int]:
    """`(n_samples, n_genes)` with the source's defaults; a ValueError naming a bad one."""
    if source not in SOURCES:
        raise ValueError(
            f"Unknown synthetic source {source!r}: valid sources are "
            f"{', '.join(repr(s) for s in SOURCES)}."
        )
    _check_int("n_classes", n_classes, minimum=2)
    if n_samples is None:
        n_samples = DEFAULT_N_SAMPLES[source]
    if n_genes is None:
        n_genes = DEFAULT_N_GENES
    _check_int("n_samples", n_samples, minimum=_MIN_SAMPLES_PER_CLASS * n_classes)
    _check_int("n_genes", n_genes, minimum=_MIN_GENES)
    _check_int("seed", seed, minimum=0)
    return n_samples, n_genes


@dataclass
class _Samples:
    """What is drawn per sample of one source, before the counts."""

    y: np.ndarray  # (N,) class index
    log_depth: np.ndarray  # (N,) log sequencing depth relative to the reference
    purity: np.ndarray  # (N,) weight of the class-specific biology
    activity: np.ndarray  # (N, K) program activities
    gene_offset: np.ndarray  # (G,) log expected count of each gene of the source
    extra_dispersion: float  # the source's dispersion relative to the world's
    study: np.ndarray | None = None  # (N,) ARCHS4 study of each sample
    study_shift: np.ndarray | None = None  # (studies, G) gene-wise study effects


def _draw_samples(
    rng: np.random.Generator, world: _World, source: str, n_samples: int
) -> _Samples:
    """Classes, depth, purity, study and program activity of every sample."""
    cols = world.source_genes[source]
    # Labels: exact imbalanced class counts, then shuffled so classes interleave.
    class_counts = _allocate(n_samples, world.class_weights[source])
    y = np.repeat(np.arange(len(world.classes)), class_counts)
    y = y[rng.permutation(n_samples)]
    # Sequencing depth relative to the reference depth of `base_log_mean`. ARCHS4
    # pools many studies (~40 samples each here): shallower on average, much wider,
    # with a per-study depth and gene-wise study effect on top of the batch effect.
    study = study_shift = None
    if source == "synthetic-archs4":
        n_studies = max(1, n_samples // 40)
        study = rng.integers(0, n_studies, size=n_samples)
        study_depth = rng.normal(0.0, 0.5, size=n_studies)
        study_shift = rng.normal(0.0, 0.3, size=(n_studies, len(cols)))
        log_depth = np.log(0.6) + study_depth[study] + rng.normal(0.0, 0.5, n_samples)
        gene_offset = world.base_log_mean[cols] + world.archs4_shift[cols]
        purity = rng.beta(6.0, 2.0, size=n_samples)
        extra_dispersion = 1.5
    else:
        log_depth = rng.normal(0.0, 0.35, size=n_samples)
        gene_offset = world.base_log_mean[cols]
        purity = rng.beta(5.0, 2.0, size=n_samples)
        extra_dispersion = 1.0
    group = world.group_of_class[y]
    activity = (
        world.group_shift[group]
        + purity[:, None] * world.class_shift[y]
        + rng.normal(0.0, _ACTIVITY_SD, size=(n_samples, _N_PROGRAMS))
    )
    return _Samples(
        y=y,
        log_depth=log_depth,
        purity=purity,
        activity=activity,
        gene_offset=gene_offset,
        extra_dispersion=extra_dispersion,
        study=study,
        study_shift=study_shift,
    )


def _draw_counts(
    rng: np.random.Generator, world: _World, source: str, samples: _Samples
) -> np.ndarray:
    """Negative binomial counts `(N, G)`, drawn in blocks of `_CHUNK_ROWS` samples."""
    cols = world.source_genes[source]
    y, purity, activity = samples.y, samples.purity, samples.activity
    n_samples, n_kept = len(y), len(cols)
    loadings = world.loadings[cols]
    group_markers = world.group_markers[:, cols]
    class_markers = world.class_markers[source][:, cols]
    # Gamma shape 1 / phi: a higher dispersion means a noisier gene.
    shape = 1.0 / (world.dispersion[cols] * samples.extra_dispersion)

    # Per class, everything that does not vary between its samples.
    class_offset = samples.gene_offset + group_markers[world.group_of_class]
    program_genes = [np.flatnonzero(loadings[:, k]) for k in range(_N_PROGRAMS)]
    # Expected total count of a sample at the reference depth, before any biology.
    reference_total = np.exp(world.base_log_mean[cols]).sum()
    counts = np.empty((n_samples, n_kept), dtype=np.int32)
    # Buffers reused by every block: allocating fresh ones costs more than the math.
    log_mu = np.empty((min(_CHUNK_ROWS, n_samples), n_kept))
    scratch = np.empty_like(log_mu)
    for start in range(0, n_samples, _CHUNK_ROWS):
        rows = slice(start, min(start + _CHUNK_ROWS, n_samples))
        n_rows = rows.stop - rows.start
        out, tmp = log_mu[:n_rows], scratch[:n_rows]
        np.take(class_offset, y[rows], axis=0, out=out)
        np.take(class_markers, y[rows], axis=0, out=tmp)
        tmp *= purity[rows, None]
        out += tmp
        if samples.study is not None:
            np.take(samples.study_shift, samples.study[rows], axis=0, out=tmp)
            out += tmp
        # One program at a time (not a matrix product) keeps the sums bit-identical
        # whatever BLAS and thread count are installed.
        for k, genes_k in enumerate(program_genes):
            out[:, genes_k] += activity[rows, k, None] * loadings[genes_k, k]
        # RNA-seq is compositional: reads taken by up-regulated genes are missing from
        # the others, so each sample's expected total is set by its depth alone.
        out -= out.max(axis=1, keepdims=True)
        mu = np.exp(out, out=out)
        depth = np.exp(samples.log_depth[rows]) * reference_total / mu.sum(axis=1)
        mu *= depth[:, None]
        # Gamma-Poisson is the negative binomial with mean mu, variance mu + phi mu^2.
        mu *= rng.gamma(shape, 1.0 / shape, size=mu.shape)
        counts[rows] = rng.poisson(mu)
    return counts


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raises ValueError unless `value` is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Splits `total` into per-class counts: a minimum each, the rest by `weights`."""
    n_classes = len(weights)
    rest = total - _MIN_SAMPLES_PER_CLASS * n_classes
    share = rest * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    # Largest remainder: deterministic and sums exactly to `total`.
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: rest - counts.sum()]] += 1
    return counts + _MIN_SAMPLES_PER_CLASS


def _make_world(n_classes: int, n_genes: int) -> _World:
    """Draws the biology and gene lists shared by both sources."""
    rng = np.random.default_rng(
        np.random.SeedSequence([_WORLD_SEED, n_classes, n_genes])
    )
    universe = _gene_universe(rng, n_genes)
    base_log_mean = universe["base_log_mean"]
    n_universe = len(base_log_mean)
    loadings, dispersion = _programs_and_dispersion(rng, base_log_mean)

    n_groups = -(-n_classes // _GROUP_SIZE)
    group_of_class = np.arange(n_classes) // _GROUP_SIZE
    group_shift = _program_shifts(rng, n_groups, 2, _GROUP_PROGRAM_SHIFT)
    class_shift = _program_shifts(rng, n_classes, 2, _CLASS_PROGRAM_SHIFT)
    group_markers = _markers(rng, n_groups, n_universe, _N_GROUP_MARKERS, base_log_mean)
    class_markers = _markers(
        rng, n_classes, n_universe, _N_CLASS_MARKERS, base_log_mean
    )

    # ARCHS4 vs TCGA: a small shift for every gene (protocol, alignment pipeline)
    # and a large one for a few (e.g. poly-A selection vs total RNA).
    archs4_shift = rng.normal(0.0, 0.5, size=n_universe)
    strong = rng.random(n_universe) < 0.1
    archs4_shift[strong] += rng.normal(0.0, 2.0, size=strong.sum())

    # The classes are not quite the same biology in both sources (tumours vs mostly
    # normal tissue and cell lines): ARCHS4 markers have other strengths, and a few
    # markers of its own, so a model moved from one source to the other loses a little.
    archs4_class_markers = class_markers * rng.lognormal(0.0, 0.5, class_markers.shape)
    archs4_class_markers += _markers(
        rng, n_classes, n_universe, _N_CLASS_MARKERS // 3, base_log_mean
    )

    # Imbalanced class proportions like TCGA (largest ~8x the smallest); ARCHS4 has
    # its own proportions around the same ones.
    tcga_weights = np.arange(1, n_classes + 1, dtype=float) ** -0.7
    tcga_weights = tcga_weights[rng.permutation(n_classes)]
    archs4_weights = tcga_weights * rng.lognormal(0.0, 0.5, size=n_classes)

    return _World(
        **universe,
        loadings=loadings,
        group_of_class=group_of_class,
        group_shift=group_shift,
        class_shift=class_shift,
        group_markers=group_markers,
        class_markers={
            "synthetic-tcga": class_markers,
            "synthetic-archs4": archs4_class_markers,
        },
        dispersion=dispersion,
        archs4_shift=archs4_shift,
        class_weights={
            "synthetic-tcga": tcga_weights,
            "synthetic-archs4": archs4_weights,
        },
        classes=class_names(n_classes),
    )


def _gene_universe(rng: np.random.Generator, n_genes: int) -> dict:
    """Gene ids, the genes each source keeps and their baseline expression.

    Returns the `_World` fields `ensembl`, `versions`, `symbols`, `source_genes` and
    `base_log_mean`.
    """
    n_shared = round(_SHARED_GENE_FRACTION * n_genes)
    n_own = n_genes - n_shared
    n_universe = n_shared + 2 * n_own

    ensembl = rng.choice(np.arange(3, 300_000), n_universe, replace=False)
    versions = rng.integers(1, 20, size=n_universe)
    symbol_numbers = rng.choice(np.arange(1, 100_000), n_universe, replace=False)
    symbols = [f"SYNG{number}" for number in symbol_numbers]

    # Which genes each source keeps: a shared core plus genes of its own. TCGA lists
    # genes by Ensembl id (as GDC files do), ARCHS4 by symbol, so the orders differ.
    perm = rng.permutation(n_universe)
    tcga = np.concatenate([perm[:n_shared], perm[n_shared:n_genes]])
    archs4 = np.concatenate([perm[:n_shared], perm[n_genes:]])
    tcga = tcga[np.argsort(ensembl[tcga], kind="stable")]
    archs4 = archs4[np.argsort(np.array(symbols)[archs4], kind="stable")]

    # Baseline log expected count at the reference depth: a mixture of expressed,
    # lowly expressed and essentially silent genes, as in any tissue.
    kind = rng.choice(3, size=n_universe, p=[0.62, 0.28, 0.10])
    centre = np.log(np.array([150.0, 0.3, 0.002]))[kind]
    spread = np.array([1.5, 1.0, 1.0])[kind]
    base_log_mean = centre + spread * rng.standard_normal(n_universe)

    return {
        "ensembl": ensembl,
        "versions": versions,
        "symbols": symbols,
        "source_genes": {"synthetic-tcga": tcga, "synthetic-archs4": archs4},
        "base_log_mean": base_log_mean,
    }


def _programs_and_dispersion(
    rng: np.random.Generator, base_log_mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse program loadings `(U, K)` and the NB dispersion of every gene `(U,)`."""
    n_universe = len(base_log_mean)
    # Sparse program loadings, mostly positive (co-expressed modules).
    member = rng.random((n_universe, _N_PROGRAMS)) < 0.08
    magnitude = np.abs(rng.normal(0.5, 0.25, size=member.shape))
    sign = np.where(rng.random(member.shape) < 0.8, 1.0, -1.0)
    loadings = np.where(member, sign * magnitude, 0.0)

    # Mean-dependent dispersion, phi = a0 + a1 / mu as in DESeq2's trend, with
    # gene-wise scatter; capped so silent genes stay mostly zero but not degenerate.
    mean = np.exp(base_log_mean)
    scatter = rng.lognormal(0.0, 0.5, size=n_universe)
    dispersion = np.minimum((0.1 + 1.0 / np.maximum(mean, 1e-3)) * scatter, 20.0)
    return loadings, dispersion


def _program_shifts(
    rng: np.random.Generator, n_rows: int, n_programs: int, size: tuple[float, float]
) -> np.ndarray:
    """Shifts `n_programs` random program activities per row by +-Uniform(size)."""
    shifts = np.zeros((n_rows, _N_PROGRAMS))
    for row in range(n_rows):
        chosen = rng.choice(_N_PROGRAMS, n_programs, replace=False)
        sign = np.where(rng.random(n_programs) < 0.5, -1.0, 1.0)
        shifts[row, chosen] = sign * rng.uniform(*size, size=n_programs)
    return shifts


def _markers(
    rng: np.random.Generator,
    n_rows: int,
    n_universe: int,
    n_markers: int,
    base_log_mean: np.ndarray,
) -> np.ndarray:
    """Log fold changes of `n_markers` marker genes per row (class or group).

    Markers are drawn among expressed genes (a fold change of a silent gene would be
    invisible), mostly up-regulated.
    """
    expressed = np.flatnonzero(base_log_mean > np.log(5.0))
    n_markers = min(n_markers, len(expressed))
    fold = np.zeros((n_rows, n_universe))
    for row in range(n_rows):
        chosen = rng.choice(expressed, n_markers, replace=False)
        sign = np.where(rng.random(n_markers) < 0.8, 1.0, -1.0)
        fold[row, chosen] = sign * rng.uniform(*_MARKER_LOG_FC, size=n_markers)
    return fold
