"""The interface every input format implements.

A source exposes its metadata (sample ids, gene ids, optional labels) without reading the
expression matrix, and streams the matrix as blocks of samples. The conversion pipeline
(`keras_ssrl.data.convert`) only talks to this interface, so memory stays bounded by the
block size for formats that can be read in blocks (ARCHS4 HDF5, GDC folders) and every
format gets the same validation, gene handling, splitting and writing.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Block:
    """A block of samples read from a source.

    Attributes:
        indices: int64 array of shape `(n,)`, positions of the samples in
            `source.sample_ids`.
        values: float array of shape `(n, len(source.genes))`, the raw values as the file
            stores them (NaN where a cell is missing; non-numeric cells are errors).
    """

    indices: np.ndarray
    values: np.ndarray


@dataclass
class ExpressionSource(abc.ABC):
    """A samples x genes expression matrix in some file format.

    Attributes:
        path: the file or folder the data comes from (used in error messages).
        sample_ids: sample identifiers, in the order the source stores them.
        genes: gene identifiers as the file writes them (version suffixes and duplicates
            are handled later, by `keras_ssrl.data.genes`).
        labels: one class name per sample (None where the sample has no label), or None
            when the source carries no labels at all.
        info: format-specific facts reported in the manifest (layout, orientation, ...).
    """

    path: str
    sample_ids: list[str]
    genes: list[str]
    labels: list[str | None] | None = None
    info: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def row_name(self, index: int) -> str:
        """How an error message names sample `index` (file row / column and id)."""
        return f"sample {self.sample_ids[index]!r}"

    @abc.abstractmethod
    def iter_blocks(
        self, block_size: int, order: Sequence[int] | None = None
    ) -> Iterator[Block]:
        """Yields the matrix as blocks of at most `block_size` samples.

        Args:
            block_size: int, the largest number of samples per block.
            order: optional sequence of block numbers (0 .. n_blocks - 1) giving the
                order in which blocks are read; all blocks are read once either way.
        """

    def n_blocks(self, block_size: int) -> int:
        return -(-self.n_samples // block_size)

    def block_range(self, block: int, block_size: int) -> tuple[int, int]:
        start = block * block_size
        return start, min(start + block_size, self.n_samples)
