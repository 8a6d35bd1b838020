"""A source over a matrix already in memory (tables, built-in synthetic data)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from keras_ssrl.data.sources.base import Block, ExpressionSource


@dataclass
class ArraySource(ExpressionSource):
    """Serves blocks of a `(samples, genes)` array held in memory.

    Attributes:
        values: array of shape `(n_samples, n_genes)`.
        row_offset: how error messages number rows: the file row of sample 0 (e.g. 2
            for a CSV whose first line is a header), or None to name samples by id only.
    """

    values: np.ndarray | None = None
    row_offset: int | None = None
    row_label: str = "row"

    def row_name(self, index: int) -> str:
        name = f"sample {self.sample_ids[index]!r}"
        if self.row_offset is not None:
            name = f"{self.row_label} {index + self.row_offset} ({name})"
        return name

    def iter_blocks(
        self, block_size: int, order: Sequence[int] | None = None
    ) -> Iterator[Block]:
        blocks = range(self.n_blocks(block_size)) if order is None else order
        for block in blocks:
            start, stop = self.block_range(block, block_size)
            values = np.asarray(self.values[start:stop])
            if not np.issubdtype(values.dtype, np.floating):
                values = values.astype(np.float32)  # integer counts
            yield Block(np.arange(start, stop, dtype=np.int64), values)
