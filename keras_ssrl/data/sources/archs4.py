"""ARCHS4 gene-level HDF5 files, streamed in blocks of samples with h5py.

Layouts handled (`info["layout"]`):

- **v2** (`human_gene_v2.latest.h5`, `mouse_gene_v2.latest.h5`): `data/expression`
  holds integer counts of shape (genes, samples) as h5py sees it; gene ids in
  `meta/genes/ensembl_gene` (or `ensembl_gene_id`), symbols in `meta/genes/symbol` (or
  `gene_symbol`); sample ids in `meta/samples/geo_accession`, with `series_id`,
  `title`, `source_name_ch1`, `characteristics_ch1`, `singlecellprobability`, ... beside
  them.
- **v1** (`human_matrix_v9.h5` .. `v11`): the same, but the only gene vector is
  `meta/genes/genes` (symbols).
- **transposed** (the oldest files): `data/expression` is (samples, genes).

The orientation is found by matching an axis length to the length of the gene vector;
a file where neither axis matches, or both do (square matrix), is refused with the
shapes in the message. The expression matrix (tens of GB) is never loaded whole: each
block is a contiguous range of samples, read with one slice. Strings are stored as bytes
and decoded as UTF-8.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.sources.base import Block, ExpressionSource

EXPRESSION = "data/expression"
SAMPLE_IDS = "meta/samples/geo_accession"
GENE_FIELDS = {
    "ensembl": ("meta/genes/ensembl_gene", "meta/genes/ensembl_gene_id"),
    "symbol": ("meta/genes/symbol", "meta/genes/gene_symbol"),
    "genes": ("meta/genes/genes",),
}
GENE_ID_CHOICES = ("auto", "ensembl", "symbol")
# Metadata fields stored as numbers (some releases store them as strings).
NUMERIC_FIELDS = frozenset({"singlecellprobability"})


def decode_strings(values: np.ndarray) -> list[str]:
    """Decodes an HDF5 string dataset read by h5py into a list of str.

    Args:
        values: array of bytes (fixed-length or variable-length) or str objects.

    Returns:
        A list of str, bytes decoded as UTF-8 (invalid bytes replaced, so that one bad
        title does not make a whole file unreadable).
    """
    return [
        v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
        for v in np.asarray(values).ravel().tolist()
    ]


@dataclass
class Archs4Source(ExpressionSource):
    """Streams an ARCHS4 HDF5 file as blocks of samples.

    The HDF5 file is opened only while `iter_blocks` or `sample_metadata` runs, so the
    object is cheap to keep and to pass around.

    Attributes:
        gene_axis: int, the axis of `data/expression` that holds the genes (0 for v2 and
            v1, 1 for transposed files).
        gene_field: str, the dataset the gene ids come from.
    """

    gene_axis: int = 0
    gene_field: str = ""

    def row_name(self, index: int) -> str:
        axis = "column" if self.gene_axis == 0 else "row"
        return f"sample {self.sample_ids[index]!r} ({EXPRESSION} {axis} {index})"

    def iter_blocks(
        self, block_size: int, order: Sequence[int] | None = None
    ) -> Iterator[Block]:
        """Yields blocks of samples, each read as one contiguous slice.

        Args:
            block_size: int, the largest number of samples per block.
            order: optional sequence of block numbers giving the reading order.

        Yields:
            `Block`s with float32 values of shape `(n, len(genes))` (read counts are
            integers, exact in float32 up to 2**24).
        """
        import h5py

        blocks = range(self.n_blocks(block_size)) if order is None else order
        with h5py.File(self.path, "r") as handle:
            data = handle[EXPRESSION]
            for block in blocks:
                start, stop = self.block_range(block, block_size)
                if self.gene_axis == 0:
                    raw = data[:, start:stop].T
                else:
                    raw = data[start:stop, :]
                yield Block(
                    indices=np.arange(start, stop, dtype=np.int64),
                    values=np.ascontiguousarray(raw, dtype=np.float32),
                )

    def sample_metadata(self, fields: Sequence[str]) -> dict[str, list]:
        """Reads per-sample metadata fields from `meta/samples`.

        Args:
            fields: sequence of str, dataset names under `meta/samples`, such as
                `source_name_ch1`, `characteristics_ch1`, `title`, `series_id` or
                `singlecellprobability`.

        Returns:
            A dict from field to a list with one entry per sample: floats for numeric
            datasets (and for `singlecellprobability`, parsed when stored as text; NaN
            where unparseable), str otherwise.

        Raises:
            DataError: a field is missing or does not have one entry per sample.
        """
        import h5py

        out: dict[str, list] = {}
        with h5py.File(self.path, "r") as handle:
            group = handle["meta/samples"]
            for name in fields:
                if name not in group:
                    raise DataError(
                        f"{self.path}: no sample field meta/samples/{name} (fields: "
                        f"{preview(sorted(group.keys()), 12)})"
                    )
                out[name] = _read_field(self.path, group[name], self.n_samples, name)
        return out


def _read_field(path: str, dataset, n_samples: int, name: str) -> list:
    values = dataset[()]
    if np.ndim(values) != 1 or len(values) != n_samples:
        raise DataError(
            f"{path}: meta/samples/{name} has shape {np.shape(values)}, expected "
            f"({n_samples},) (one entry per sample)"
        )
    if values.dtype.kind in "biuf":
        return [float(v) for v in values]
    text = decode_strings(values)
    if name in NUMERIC_FIELDS:
        return [_to_float(v) for v in text]
    return text


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def open_archs4(
    path: str, gene_id: str = "auto", label_field: str | None = None
) -> Archs4Source:
    """Opens an ARCHS4 HDF5 file (v2, v1 or transposed layout) for streaming.

    Args:
        path: str, the `.h5` file.
        gene_id: str, which gene identifiers to use: "ensembl" (`meta/genes/
            ensembl_gene[_id]`), "symbol" (`meta/genes/symbol` / `gene_symbol`, or
            `meta/genes/genes` in older files), or "auto": Ensembl when present, else
            symbols, else `meta/genes/genes`.
        label_field: optional str, a `meta/samples/<field>` dataset whose values become
            the labels (empty strings give unlabelled samples).

    Returns:
        An `Archs4Source`; `info` holds the format, layout, gene id kind and the
        shape of `data/expression`.

    Raises:
        DataError: the file is not HDF5, misses a dataset, or the orientation of
            `data/expression` cannot be told from the gene vector.

    Example:

    ```python
    source = open_archs4("human_gene_v2.latest.h5", gene_id="symbol")
    meta = source.sample_metadata(["source_name_ch1", "singlecellprobability"])
    ```
    """
    import h5py

    path = os.fspath(path)
    if gene_id not in GENE_ID_CHOICES:
        raise DataError(f"unknown gene id {gene_id!r}; choose one of {GENE_ID_CHOICES}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: cannot open as HDF5 ({err})") from None
    with handle:
        if EXPRESSION not in handle:
            raise DataError(
                f"{path}: no {EXPRESSION} dataset, so not an ARCHS4 gene-level file "
                f"(top-level groups: {preview(sorted(handle.keys()))})"
            )
        data = handle[EXPRESSION]
        if data.ndim != 2 or data.dtype.kind not in "biuf":
            raise DataError(
                f"{path}: {EXPRESSION} has shape {data.shape} and type {data.dtype}; "
                "expected a 2-D numeric matrix"
            )
        kind, field = _choose_gene_field(path, handle, gene_id)
        genes = decode_strings(handle[field][()])
        if SAMPLE_IDS not in handle:
            raise DataError(f"{path}: no {SAMPLE_IDS} dataset (the sample ids)")
        sample_ids = decode_strings(handle[SAMPLE_IDS][()])
        gene_axis = _gene_axis(path, data.shape, field, len(genes), len(sample_ids))
        labels = _labels(path, handle, label_field, len(sample_ids))
        info = {
            "format": "archs4",
            "layout": _layout(handle, gene_axis),
            "gene_id": kind,
            "gene_field": field,
            "shape": [int(n) for n in data.shape],
            "chunks": None if data.chunks is None else [int(n) for n in data.chunks],
        }
    return Archs4Source(
        path=path,
        sample_ids=sample_ids,
        genes=genes,
        labels=labels,
        info=info,
        gene_axis=gene_axis,
        gene_field=field,
    )


def _labels(path: str, handle, label_field: str | None, n_samples: int):
    """The labels in `meta/samples/<label_field>` (None: no label field asked for)."""
    if label_field is None:
        return None
    key = f"meta/samples/{label_field}"
    if key not in handle:
        raise DataError(
            f"{path}: no label field {key} (fields: "
            f"{preview(sorted(handle['meta/samples'].keys()), 12)})"
        )
    raw = _read_field(path, handle[key], n_samples, label_field)
    return [None if str(v).strip() == "" else str(v) for v in raw]


def _layout(handle, gene_axis: int) -> str:
    """The file's layout name (see the module docstring)."""
    if gene_axis == 1:
        return "transposed"
    if not any(f in handle for f in GENE_FIELDS["ensembl"] + GENE_FIELDS["symbol"]):
        return "v1"
    return "v2"


def _choose_gene_field(path: str, handle, gene_id: str) -> tuple[str, str]:
    """Returns (kind, dataset path) of the gene identifiers asked for."""
    kinds = {
        "auto": ("ensembl", "symbol", "genes"),
        "ensembl": ("ensembl",),
        # The older files keep symbols in meta/genes/genes.
        "symbol": ("symbol", "genes"),
    }[gene_id]
    for kind in kinds:
        for field in GENE_FIELDS[kind]:
            if field in handle:
                return ("symbol" if kind == "genes" else kind), field
    present = sorted(handle["meta/genes"].keys()) if "meta/genes" in handle else []
    wanted = [f for kind in kinds for f in GENE_FIELDS[kind]]
    raise DataError(
        f"{path}: no gene identifiers for gene id {gene_id!r}: looked for "
        f"{', '.join(wanted)}; meta/genes has {preview(present, 12) or 'nothing'}"
    )


def _gene_axis(
    path: str, shape: tuple, field: str, n_genes: int, n_samples: int
) -> int:
    """Which axis of the expression matrix holds the genes (see module docstring)."""
    matches = [axis for axis in (0, 1) if shape[axis] == n_genes]
    if len(matches) != 1:
        why = (
            "neither axis matches"
            if not matches
            else "both axes match (square matrix), so the orientation is ambiguous"
        )
        raise DataError(
            f"{path}: cannot tell the orientation of {EXPRESSION}: its shape is "
            f"{tuple(int(n) for n in shape)}, {field} lists {n_genes} genes and "
            f"{SAMPLE_IDS} {n_samples} samples; {why}"
        )
    axis = matches[0]
    if shape[1 - axis] != n_samples:
        raise DataError(
            f"{path}: {EXPRESSION} has shape {tuple(int(n) for n in shape)}: "
            f"{shape[1 - axis]} samples, but {SAMPLE_IDS} lists {n_samples} ids"
        )
    return axis
