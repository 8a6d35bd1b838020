"""Gene identity: id normalisation, duplicate handling and alignment between datasets.

Gene identity is explicit (docs/protocol.md, "Preprocessing"): every dataset carries
its ordered gene list, and two datasets are combined only through `align_genes`, never by
column position. A `GenePlan` maps the columns of a source to the dataset's genes and is
applied to every block read, so the same mapping serves statistics and writing.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from keras_ssrl.data.errors import DataError, preview

_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GT]\d{11})\.\d+(_PAR_Y)?$")
DUPLICATE_POLICIES = ("error", "sum", "mean", "first", "unique")


def strip_version(gene: str) -> str:
    """`ENSG00000000003.15` -> `ENSG00000000003` (`_PAR_Y` suffixes are kept)."""
    match = _ENSEMBL_VERSION.match(gene)
    if match is None:
        return gene
    return match.group(1) + (match.group(2) or "")


def is_par_y(gene: str) -> bool:
    return gene.endswith("_PAR_Y")


@dataclass
class GenePlan:
    """How the columns of a source become the genes of a dataset.

    Attributes:
        genes: output gene ids, in output order.
        groups: for each output gene, the source columns that feed it.
        policy: duplicate policy used to merge a group of several columns.
        report: counts of what was done (versions stripped, `_PAR_Y` rows dropped,
            duplicates merged), written to the manifest and printed.
    """

    genes: list[str]
    groups: list[np.ndarray]
    policy: str = "error"
    report: dict = field(default_factory=dict)

    def __post_init__(self):
        self._simple = all(len(g) == 1 for g in self.groups)
        self._columns = np.array([g[0] for g in self.groups], dtype=np.int64)
        if not self._simple:
            # Merging with reduceat needs the source columns of a group contiguous.
            order = np.concatenate(self.groups)
            sizes = np.array([len(g) for g in self.groups])
            self._order = order
            self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            self._sizes = sizes

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Maps a `(samples, source columns)` block to `(samples, genes)`."""
        if self._simple or self.policy == "first":
            return values[:, self._columns]
        merged = np.add.reduceat(values[:, self._order], self._starts, axis=1)
        if self.policy == "mean":
            merged = merged / self._sizes
        return merged

    def select(self, indices: Sequence[int]) -> GenePlan:
        """The plan restricted to output genes `indices` (in that order)."""
        indices = list(indices)
        return GenePlan(
            genes=[self.genes[i] for i in indices],
            groups=[self.groups[i] for i in indices],
            policy=self.policy,
            report=dict(self.report),
        )


def plan_genes(
    genes: Sequence[str],
    path: str = "",
    strip_versions: bool = True,
    par_y: str = "drop",
    duplicate_genes: str = "error",
) -> GenePlan:
    """Builds the column -> gene mapping of a source and reports what it changed.

    Args:
        genes: gene ids as the source writes them.
        path: the source, named in error messages.
        strip_versions: bool, strip Ensembl version suffixes.
        par_y: `"drop"` or `"keep"` the `_PAR_Y` rows.
        duplicate_genes: `"error"`, `"sum"`, `"mean"`, `"first"` or `"unique"`.

    Returns:
        A `GenePlan`.

    Raises:
        DataError: an empty gene id, or duplicate ids under the `"error"` policy (the
            message names them and their rows and says which policies exist).
    """
    if duplicate_genes not in DUPLICATE_POLICIES:
        raise DataError(
            f"unknown duplicate-gene policy {duplicate_genes!r}; "
            f"choose one of {', '.join(DUPLICATE_POLICIES)}"
        )
    if par_y not in ("drop", "keep"):
        raise DataError(f"unknown _PAR_Y policy {par_y!r}; choose drop or keep")
    report = {"n_source_genes": len(genes)}
    ids = []
    for column, gene in enumerate(genes):
        gene = str(gene).strip()
        if not gene or gene.lower() in ("nan", "none"):
            raise DataError(
                f"{path}: gene {column + 1} has an empty id; every gene needs an id"
            )
        ids.append(gene)
    if strip_versions:
        stripped = [strip_version(g) for g in ids]
        report["n_versions_stripped"] = sum(a != b for a, b in zip(ids, stripped))
        ids = stripped
    columns = list(range(len(ids)))
    if par_y == "drop":
        dropped = [c for c in columns if is_par_y(ids[c])]
        report["n_par_y_dropped"] = len(dropped)
        columns = [c for c in columns if not is_par_y(ids[c])]
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for column in columns:
        groups.setdefault(ids[column], []).append(column)
    duplicated = {g: cols for g, cols in groups.items() if len(cols) > 1}
    report["n_duplicate_ids"] = len(duplicated)
    report["n_duplicate_rows"] = sum(len(c) - 1 for c in duplicated.values())
    report["duplicate_policy"] = duplicate_genes
    if duplicated and duplicate_genes == "error":
        examples = [
            f"{g} (gene rows {', '.join(str(c + 1) for c in cols[:4])})"
            for g, cols in list(duplicated.items())[:5]
        ]
        raise DataError(
            f"{path}: {len(duplicated)} gene id(s) occur more than once, e.g. "
            f"{'; '.join(examples)}. Choose how to merge them with "
            "--duplicate-genes sum|mean|first|unique (sum adds the counts of the rows)."
        )
    if duplicate_genes == "unique":
        out_genes, out_groups = [], []
        for gene, cols in groups.items():
            for k, column in enumerate(cols):
                out_genes.append(gene if k == 0 else f"{gene}-{k + 1}")
                out_groups.append(np.array([column]))
        return GenePlan(out_genes, out_groups, "first", report)
    return GenePlan(
        genes=list(groups),
        groups=[np.array(cols, dtype=np.int64) for cols in groups.values()],
        policy=duplicate_genes,
        report=report,
    )


@dataclass
class Alignment:
    """The result of aligning a gene list onto a target gene list."""

    genes: list[str]  # the matched genes, in target order
    source_indices: np.ndarray  # position of each matched gene in the source list
    n_source: int
    n_target: int

    @property
    def n_matched(self) -> int:
        return len(self.genes)

    def report(self) -> dict:
        return {
            "n_source_genes": self.n_source,
            "n_target_genes": self.n_target,
            "n_matched": self.n_matched,
            "fraction_of_target": self.n_matched / max(self.n_target, 1),
        }


def align_genes(
    source: Sequence[str],
    target: Sequence[str],
    min_overlap: float = 0.5,
    source_name: str = "source",
    target_name: str = "target",
) -> Alignment:
    """Intersects a gene list with a target list, keeping the target's order.

    Args:
        source: the gene ids of the data to re-write.
        target: the gene ids whose order the result follows.
        min_overlap: float, the smallest accepted fraction of target genes matched.
        source_name, target_name: how error messages name the two lists.

    Returns:
        An `Alignment`.

    Raises:
        DataError: fewer than `min_overlap` of the target genes are matched; the message
            gives the counts and example ids from both sides (a frequent cause is one
            side using symbols and the other Ensembl ids, or version suffixes).
    """
    if not (isinstance(min_overlap, (int, float)) and 0 <= min_overlap <= 1):
        # NaN fails this test too (and would otherwise accept any overlap).
        raise DataError(
            f"--min-overlap must be a fraction between 0 and 1, got {min_overlap!r}"
        )
    position = {gene: i for i, gene in enumerate(source)}
    matched = [gene for gene in target if gene in position]
    alignment = Alignment(
        genes=matched,
        source_indices=np.array([position[g] for g in matched], dtype=np.int64),
        n_source=len(source),
        n_target=len(target),
    )
    if alignment.n_matched < max(1, min_overlap * len(target)):
        raise DataError(
            f"gene lists do not match: {alignment.n_matched} of {len(target)} genes of "
            f"{target_name} ({alignment.n_matched / max(len(target), 1):.1%}) are in "
            f"{source_name} ({len(source)} genes); at least {min_overlap:.0%} are "
            f"required. {source_name} ids look like {preview(source, 3)}; "
            f"{target_name} ids look like {preview(target, 3)}. Use the same id type "
            "(Ensembl ids without version, or symbols) on both sides, or lower "
            "--min-overlap if a small overlap is intended."
        )
    return alignment
