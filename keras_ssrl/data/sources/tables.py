"""Generic expression tables: CSV, TSV and Parquet, samples as rows or as columns.

Layouts handled:

- **Samples as rows** (the authors' Parquet files): one id column (`sample_column`, else
  the first column; the authors call it `caseID`), optionally one label column, and one
  column per gene whose header cell is the gene id.
- **Genes as rows** (most public matrices): the first column holds gene ids, every other
  header cell is a sample id.

Text files may be gzip, bzip2 or xz compressed (recognised by their first bytes, so
an extension-less download works too). A header with one cell fewer than the data rows
(R's `write.table` with row names) is read as if its first cell were empty; a delimiter
at the end of every line is ignored. Blank lines are skipped (line numbers in error
messages count them, later row numbers assume there are none).

Values: empty cells and the usual missing-value tokens (`NA`, `NaN`, `N/A`, `NULL`,
...; see `keras_ssrl.data.sources.cells`) become NaN, which the conversion pipeline
reports with its own policy; any other cell that is not a number is a `DataError`
naming the file, line, sample and gene. A data row with fewer cells than the header is
padded with NaN.

Orientation, when `genes_as_rows` is None, is decided by these rules, in order:

1. `sample_column` or `label_column` is a header cell -> samples as rows.
2. The first column's cells (first 100 data rows) look like gene ids (mostly Ensembl
   ids `ENS[A-Z]*G` + 11 digits, optional `.version`) while the header cells do not
   -> genes as rows.
3. The header cells (after the first) look like Ensembl ids while the first column does
   not -> samples as rows.
4. Gene symbols cannot be told from sample names, but common sample-id shapes can
   (`GSM123`, `SRR123`, `TCGA-...`, `GTEX-...`, `TARGET-...`): if the header cells
   look like sample ids and the first column does not -> genes as rows; the reverse ->
   samples as rows.
5. Otherwise: a `DataError` asking for `--genes-as-rows` or `--samples-as-rows`.

"Look like" means more than half of the non-empty cells match.
"""

from __future__ import annotations

import csv
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.sources.cells import (
    NA_TOKENS,
    detect_compression,
    format_from_path,
    open_text,
    parse_cell,
)
from keras_ssrl.data.sources.memory import ArraySource

FORMATS = ("auto", "csv", "tsv", "parquet")

ENSEMBL_GENE_RE = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?(_PAR_Y)?$")
_SAMPLE_ID_RE = re.compile(r"^(GSM\d+|[SED]R[RSX]\d+|TCGA-\w|TARGET-\w|GTEX-\w)")
# What reading a damaged or non-UTF-8 (possibly compressed) text file raises.
_READ_ERRORS = (OSError, EOFError, zlib.error, csv.Error, UnicodeDecodeError)
# Rows examined to detect the orientation: enough to be robust, cheap on huge files.
_DETECT_ROWS = 100


def looks_like_ensembl(cells: Sequence[str]) -> bool:
    """Whether most non-empty cells are Ensembl gene ids (optionally versioned).

    Args:
        cells: sequence of str, header cells or first-column cells.

    Returns:
        True when more than half of the non-empty cells match.
    """
    return _mostly(cells, ENSEMBL_GENE_RE)


def _mostly(cells: Sequence[str], pattern: re.Pattern) -> bool:
    cells = [c.strip() for c in cells if c.strip()]
    if not cells:
        return False
    hits = sum(1 for c in cells if pattern.match(c))
    return hits * 2 > len(cells)


@dataclass
class _Layout:
    """Where things are in a table: decided from the header and the first column."""

    genes_as_rows: bool
    detected: bool
    id_col: int
    label_col: int | None
    value_cols: list[int]


def open_table(
    path: str,
    fmt: str = "auto",
    sample_column: str | None = None,
    label_column: str | None = None,
    genes_as_rows: bool | None = None,
) -> ArraySource:
    """Reads a CSV / TSV / Parquet expression table into memory.

    Args:
        path: str, the table file.
        fmt: str, "auto" (from the extension), "csv", "tsv" or "parquet".
        sample_column: optional str, the header of the sample-id column when samples are
            rows (default: the first column).
        label_column: optional str, the header of a column holding class labels (samples
            as rows only); empty / NA cells give unlabelled samples.
        genes_as_rows: optional bool, True when genes are rows and samples are columns,
            False for samples as rows, None to detect it (see the module docstring).

    Returns:
        An `ArraySource` with float64 values of shape `(samples, genes)`; ids are kept
        exactly as written (duplicates included: the pipeline checks them).
        `row_name` gives the file line (samples as rows) or column (genes as rows).

    Raises:
        DataError: the file is empty, has no gene or sample columns, a column named in
            the arguments is missing, the orientation cannot be determined, or a cell is
            not a number.

    Example:

    ```python
    source = open_table("expression.parquet", sample_column="caseID",
                        label_column="cancer_type")
    ```
    """
    path = os.fspath(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown table format {fmt!r}; choose one of {FORMATS}")
    if fmt == "auto":
        fmt = format_from_path(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty")
    if fmt == "parquet":
        reader = _ParquetTable(path)
    else:
        reader = _TextTable(path, sep="," if fmt == "csv" else "\t")
    layout = _decide_layout(
        path,
        reader.header,
        reader.first_cells,
        sample_column,
        label_column,
        genes_as_rows,
    )
    return _table_source(path, fmt, reader, layout)


def _table_source(path: str, fmt: str, reader, layout: _Layout) -> ArraySource:
    """Reads a table whose layout is decided into an `ArraySource` (samples as rows)."""
    ids, labels, values = reader.read(layout)
    header = reader.header
    if layout.genes_as_rows:
        sample_ids = [header[c] for c in layout.value_cols]
        genes = ids
        if not genes:
            raise DataError(f"{path}: no genes (no data rows below the header)")
        # Samples are named by column; column 1 holds the gene ids.
        row_offset, row_label = 2, "column"
        values = np.ascontiguousarray(values.T)
    else:
        sample_ids = ids
        genes = [header[c] for c in layout.value_cols]
        if not sample_ids:
            raise DataError(f"{path}: no samples (no data rows below the header)")
        row_offset, row_label = reader.first_row, reader.row_label
    orientation = "genes_as_rows" if layout.genes_as_rows else "samples_as_rows"
    return ArraySource(
        path=path,
        sample_ids=sample_ids,
        genes=genes,
        labels=labels,
        info={
            "format": fmt,
            "orientation": orientation,
            "orientation_detected": layout.detected,
        },
        values=values,
        row_offset=row_offset,
        row_label=row_label,
    )


def _decide_layout(
    path: str,
    header: list[str],
    first_cells: list[str],
    sample_column: str | None,
    label_column: str | None,
    genes_as_rows: bool | None,
) -> _Layout:
    """Applies the orientation rules of the module docstring."""
    for arg, name in (("sample_column", sample_column), ("label_column", label_column)):
        if name is not None and name not in header:
            raise DataError(
                f"{path}: {arg} {name!r} is not a header column (header: "
                f"{preview(header)})"
            )
    if sample_column is not None and sample_column == label_column:
        raise DataError(f"{path}: sample and label column are both {sample_column!r}")
    detected = genes_as_rows is None
    if detected and len(header) < 2:
        raise DataError(
            f"{path}: only one column ({preview(header)}), so no gene or sample columns"
        )
    if detected:
        genes_as_rows = _detect_genes_as_rows(
            path, header, first_cells, sample_column, label_column
        )
    if genes_as_rows:
        for arg, name in (
            ("label_column", label_column),
            ("sample_column", sample_column),
        ):
            if name is not None:
                raise DataError(
                    f"{path}: {arg} {name!r} makes no sense when genes are rows (every "
                    "column after the first is a sample); give labels in a separate "
                    "label file, or pass --samples-as-rows if samples are rows"
                )
        if len(header) < 2:
            raise DataError(f"{path}: no sample columns (header: {preview(header)})")
        return _Layout(True, detected, 0, None, list(range(1, len(header))))
    id_col = header.index(sample_column) if sample_column is not None else 0
    label_col = header.index(label_column) if label_column is not None else None
    value_cols = [c for c in range(len(header)) if c not in (id_col, label_col)]
    if not value_cols:
        raise DataError(f"{path}: no gene columns (header: {preview(header)})")
    return _Layout(False, detected, id_col, label_col, value_cols)


def _detect_genes_as_rows(
    path: str,
    header: list[str],
    first_cells: list[str],
    sample_column: str | None,
    label_column: str | None,
) -> bool:
    if sample_column is not None or label_column is not None:
        return False
    others = header[1:]
    first_genes = looks_like_ensembl(first_cells)
    header_genes = looks_like_ensembl(others)
    if first_genes != header_genes:
        return first_genes
    if not (first_genes or header_genes):
        first_samples = _mostly(first_cells, _SAMPLE_ID_RE)
        header_samples = _mostly(others, _SAMPLE_ID_RE)
        if first_samples != header_samples:
            return header_samples
    raise DataError(
        f"cannot determine the orientation of {path}: pass --genes-as-rows or "
        f"--samples-as-rows (header starts {preview(header, 4)}; first column starts "
        f"{preview(first_cells, 4)}; neither or both look like Ensembl gene ids)"
    )


def _bad_cell_error(
    path: str,
    where: str,
    *,
    row_id: str,
    column: str,
    cell: str,
    genes_as_rows: bool,
    column_number: int,
) -> DataError:
    """The message for a cell that is not a number, naming sample and gene."""
    if genes_as_rows:
        place = (
            f"{path} {where} (gene {row_id!r}), column {column_number} "
            f"(sample {column!r})"
        )
    else:
        place = f"{path} {where} (sample {row_id!r}), gene {column!r}"
    return DataError(
        f"{place}: value {cell!r} is not a number (missing values may be empty or NA)"
    )


def _text(cell) -> str:
    """An id cell as a string; a cell missing from a short row (NaN) is empty."""
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return ""
    return str(cell)


def _labels_from(cells: Iterable) -> list[str | None]:
    labels: list[str | None] = []
    for cell in cells:
        text = _text(cell)
        labels.append(None if text.strip() in NA_TOKENS else text)
    return labels


class _TextTable:
    """A delimited text table: header and first column peeked, values read by pandas."""

    row_label = "line"
    first_row = 2

    def __init__(self, path: str, sep: str):
        self.path = path
        self.sep = sep
        self.compression = detect_compression(path)
        rows = []
        try:
            with open_text(path, self.compression) as handle:
                reader = csv.reader(handle, delimiter=sep)
                for row in reader:
                    if row:
                        rows.append(row)
                    if len(rows) > _DETECT_ROWS:
                        break
        except _READ_ERRORS as err:
            raise DataError(
                f"{path}: cannot read as {self.fmt_name} text ({err})"
            ) from None
        if not rows:
            raise DataError(f"{path} is empty")
        header = rows[0]
        # A delimiter at the end of every line leaves empty trailing header cells.
        while len(header) > 1 and not header[-1].strip():
            header = header[:-1]
        data = rows[1:]
        # R's write.table with row names leaves out the first header cell.
        if data and len(data[0]) == len(header) + 1 and data[0][-1].strip():
            header = [""] + header
        self.header = header
        self.first_cells = [row[0] for row in data]

    @property
    def fmt_name(self) -> str:
        return "CSV" if self.sep == "," else "TSV"

    def read(self, layout: _Layout) -> tuple[list[str], list | None, np.ndarray]:
        import pandas as pd

        n = len(self.header)
        value_set = set(layout.value_cols)
        na = sorted(NA_TOKENS)
        try:
            frame = pd.read_csv(
                self.path,
                sep=self.sep,
                header=None,
                skiprows=1,
                names=list(range(n)),
                index_col=False,
                dtype={c: (np.float64 if c in value_set else object) for c in range(n)},
                keep_default_na=False,
                na_values={c: na for c in layout.value_cols},
                compression=self.compression,
                encoding="utf-8",
                engine="c",
            )
        except ValueError as err:
            if isinstance(err, UnicodeDecodeError):
                raise DataError(f"{self.path}: not UTF-8 text ({err})") from None
            # pandas says which line is ragged; for a cell that is not a number it
            # says neither line nor column, so find the first such cell ourselves.
            try:
                self._raise_bad_cell(layout)
            except _READ_ERRORS as scan_err:
                raise DataError(f"{self.path}: cannot read ({scan_err})") from None
            raise DataError(
                f"{self.path}: cannot read as {self.fmt_name} ({err})"
            ) from None
        except _READ_ERRORS as err:
            raise DataError(f"{self.path}: cannot read ({err})") from None
        ids = [_text(v) for v in frame[layout.id_col].tolist()]
        labels = None
        if layout.label_col is not None:
            labels = _labels_from(frame[layout.label_col].tolist())
        values = frame[layout.value_cols].to_numpy(dtype=np.float64)
        if not values.flags.c_contiguous and not layout.genes_as_rows:
            values = np.ascontiguousarray(values)
        return ids, labels, values

    def _raise_bad_cell(self, layout: _Layout) -> None:
        """Scans the file for the first cell that is not a number and raises on it."""
        cols = layout.value_cols
        with open_text(self.path, self.compression) as handle:
            reader = csv.reader(handle, delimiter=self.sep)
            next(reader, None)
            for row in reader:
                if not row:
                    continue
                # Short rows are padded with missing values, as pandas does.
                cells = [row[c] if c < len(row) else "" for c in cols]
                try:
                    # Fast check for the common all-numeric row.
                    np.asarray(cells, dtype=np.float64)
                    if not any("_" in cell for cell in cells):
                        continue
                except ValueError:
                    pass
                for c, cell in zip(cols, cells, strict=True):
                    if parse_cell(cell) is None:
                        row_id = row[layout.id_col] if layout.id_col < len(row) else ""
                        raise _bad_cell_error(
                            self.path,
                            f"line {reader.line_num}",
                            row_id=row_id,
                            column=self.header[c],
                            cell=cell,
                            genes_as_rows=layout.genes_as_rows,
                            column_number=c + 1,
                        )


class _ParquetTable:
    """A Parquet table read with pyarrow; pandas index columns come first."""

    row_label = "row"
    first_row = 1

    def __init__(self, path: str):
        pq = _import_parquet()
        self.path = path
        try:
            self.table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several unrelated types
            raise DataError(f"{path}: cannot read as Parquet ({err})") from None
        names = list(self.table.column_names)
        order = list(range(len(names)))
        # A pandas DataFrame saved with its index keeps it as a column listed in the
        # metadata, stored last: the index is the sample (or gene) id, so put it first.
        meta = self.table.schema.pandas_metadata or {}
        index_cols = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
        if index_cols:
            first = [names.index(c) for c in index_cols if c in names]
            order = first + [i for i in order if i not in first]
        self.order = order
        self.header = [
            "" if names[i].startswith("__index_level_") else names[i] for i in order
        ]
        if not self.header:
            raise DataError(f"{path} is empty (no columns)")
        column = self.table.column(order[0]).slice(0, _DETECT_ROWS)
        self.first_cells = ["" if v is None else str(v) for v in column.to_pylist()]

    def read(self, layout: _Layout) -> tuple[list[str], list | None, np.ndarray]:
        ids = [_text(v) for v in self._column(layout.id_col).to_pylist()]
        labels = None
        if layout.label_col is not None:
            labels = _labels_from(self._column(layout.label_col).to_pylist())
        n_rows = self.table.num_rows
        if layout.genes_as_rows:
            # Fill (samples, genes) directly: one stored column is one sample.
            out = np.empty((len(layout.value_cols), n_rows), dtype=np.float64)
            for k, c in enumerate(layout.value_cols):
                out[k] = self._numbers(c, ids, layout)
            return ids, labels, out.T
        out = np.empty((n_rows, len(layout.value_cols)), dtype=np.float64)
        for k, c in enumerate(layout.value_cols):
            out[:, k] = self._numbers(c, ids, layout)
        return ids, labels, out

    def _column(self, c: int):
        return self.table.column(self.order[c])

    def _numbers(self, c: int, ids: list[str], layout: _Layout) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        column = self._column(c)
        kind = column.type
        if pa.types.is_dictionary(kind):
            column = column.cast(kind.value_type)
            kind = column.type
        if pa.types.is_null(kind):
            return np.full(len(column), np.nan)
        if (
            pa.types.is_integer(kind)
            or pa.types.is_floating(kind)
            or pa.types.is_decimal(kind)
        ):
            # Nulls become NaN in the float64 array.
            return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            cells = column.to_pylist()
            out = np.empty(len(cells), dtype=np.float64)
            for row, cell in enumerate(cells):
                value = float("nan") if cell is None else parse_cell(cell)
                if value is None:
                    raise _bad_cell_error(
                        self.path,
                        f"row {row + 1}",
                        row_id=ids[row],
                        column=self.header[c],
                        cell=cell,
                        genes_as_rows=layout.genes_as_rows,
                        column_number=c + 1,
                    )
                out[row] = value
            return out
        raise DataError(
            f"{self.path}: column {self.header[c]!r} has type {kind}, not numbers"
        )


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            f"reading Parquet needs a working pyarrow ({err}); install one that "
            "matches this numpy (pyarrow 26 needs numpy 2; pyarrow<26 works with "
            "numpy 1.26)"
        ) from err
    return pq
