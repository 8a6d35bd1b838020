"""TCGA STAR gene counts downloaded from the GDC portal, streamed one file per sample.

Layout handled: a download folder holding `<File ID>/<File Name>` files named
`<uuid>.rna_seq.augmented_star_gene_counts.tsv` (files directly in the folder are
accepted too), and the portal's sample sheet `gdc_sample_sheet.<date>.tsv` with the
columns `File ID`, `File Name`, `Data Category`, `Data Type`, `Project ID`, `Case ID`,
`Sample ID`, `Sample Type`.

Each counts file is tab-separated:

```
# gene-model: GENCODE v36
gene_id  gene_name  gene_type  unstranded  stranded_first  stranded_second
    tpm_unstranded  fpkm_unstranded  fpkm_uq_unstranded      (one header line)
N_unmapped ... N_ambiguous     (four summary rows, dropped here)
ENSG00000000003.15  TSPAN6  protein_coding  1234  ...
...                            (~60,660 genes, `_PAR_Y` duplicates included)
```

Gene ids are kept exactly as written (the pipeline strips versions and drops `_PAR_Y`
rows). The gene list comes from the first file of the sheet; every other file must list
the same genes in the same order, which is checked as the file is read.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.sources.base import Block, ExpressionSource
from keras_ssrl.data.sources.cells import NA_TOKENS, parse_cell

COUNTS_SUFFIX = ".rna_seq.augmented_star_gene_counts.tsv"
# STAR's summary rows, in file order, above the genes.
SUMMARY_ROWS = ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous")
COLUMNS = (
    "unstranded",
    "stranded_first",
    "stranded_second",
    "tpm_unstranded",
    "fpkm_unstranded",
    "fpkm_uq_unstranded",
)
SHEET_PATTERN = "gdc_sample_sheet*.tsv"
SHEET_COLUMNS = ("File ID", "File Name", "Sample ID")
# Sheets of a mixed cart also list other data types; only gene-level counts are read.
GENE_DATA_TYPE = "Gene Expression Quantification"


@dataclass
class _CountsFile:
    """One parsed counts file: gene ids, values and where each gene row is."""

    gene_model: str | None
    genes: list[str]
    values: np.ndarray
    lines: np.ndarray


def read_counts_file(path: str, column: str = "unstranded") -> _CountsFile:
    """Reads one STAR counts file, dropping the summary rows.

    Args:
        path: str, a `*.rna_seq.augmented_star_gene_counts.tsv` file.
        column: str, the value column to read (e.g. "unstranded", "tpm_unstranded").

    Returns:
        The gene model (from the `# gene-model:` line, or None), the gene ids, the
        float64 values, and the 1-based file line of each gene.

    Raises:
        DataError: the header lacks `gene_id` or `column`, or a value is not a number.
    """
    import pandas as pd

    gene_model = None
    comments = 0
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            for line in handle:
                if not line.startswith("#"):
                    header = line.rstrip("\r\n").split("\t")
                    break
                comments += 1
                text = line.lstrip("#").strip()
                if text.startswith("gene-model:"):
                    gene_model = text.split(":", 1)[1].strip()
            else:
                raise DataError(f"{path}: no header line (is the file empty?)")
        for name in ("gene_id", column):
            if name not in header:
                raise DataError(
                    f"{path}: no column {name!r} in the header ({preview(header, 9)}); "
                    "not a GDC STAR gene-counts file?"
                )
        gene_col, value_col = header.index("gene_id"), header.index(column)
        # Values are read as text: summary rows leave the TPM / FPKM cells empty, and a
        # bad cell must be reported with its line, which pandas' float parser cannot.
        frame = pd.read_csv(
            path,
            sep="\t",
            skiprows=comments + 1,
            header=None,
            usecols=[gene_col, value_col],
            dtype=object,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
            engine="c",
        )
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    ids = frame[gene_col].to_numpy(dtype=object)
    cells = frame[value_col].to_numpy(dtype=object)
    keep = ~np.isin(ids, list(SUMMARY_ROWS))
    lines = np.flatnonzero(keep) + comments + 2
    ids, cells = ids[keep], cells[keep]
    try:
        values = np.asarray(cells, dtype=np.float64)
    except ValueError:
        values = np.empty(len(cells), dtype=np.float64)
        for i, cell in enumerate(cells):
            value = parse_cell(cell)
            if value is None:
                raise DataError(
                    f"{path} line {lines[i]} (gene {ids[i]!r}), column {column!r}: "
                    f"value {cell!r} is not a number"
                ) from None
            values[i] = value
    return _CountsFile(gene_model, [str(g) for g in ids], values, lines)


@dataclass
class GdcSource(ExpressionSource):
    """Streams a GDC download folder, one counts file per sample.

    Attributes:
        files: list of str, the counts file of each sample.
        column: str, the value column read from every file.
    """

    files: list[str] = field(default_factory=list)
    column: str = "unstranded"

    def row_name(self, index: int) -> str:
        return f"sample {self.sample_ids[index]!r} (file {self.files[index]})"

    def iter_blocks(
        self, block_size: int, order: Sequence[int] | None = None
    ) -> Iterator[Block]:
        """Yields blocks of samples, reading one file per sample.

        Args:
            block_size: int, the largest number of samples per block.
            order: optional sequence of block numbers giving the reading order.

        Yields:
            `Block`s with float32 values of shape `(n, len(genes))`.

        Raises:
            DataError: a file lists other genes than the first file (the message names
                the file and the first differing line).
        """
        blocks = range(self.n_blocks(block_size)) if order is None else order
        for block in blocks:
            start, stop = self.block_range(block, block_size)
            values = np.empty((stop - start, self.n_genes), dtype=np.float32)
            for row, index in enumerate(range(start, stop)):
                values[row] = self._read(index)
            yield Block(indices=np.arange(start, stop, dtype=np.int64), values=values)

    def _read(self, index: int) -> np.ndarray:
        path = self.files[index]
        parsed = read_counts_file(path, self.column)
        if parsed.genes != self.genes:
            first = self.files[0]
            n = min(len(parsed.genes), len(self.genes))
            diff = next((i for i in range(n) if parsed.genes[i] != self.genes[i]), n)
            if diff < len(parsed.genes):
                where = f"line {parsed.lines[diff]} has gene {parsed.genes[diff]!r}"
            else:
                where = f"the file ends after {len(parsed.genes)} genes"
            expected = (
                repr(self.genes[diff]) if diff < len(self.genes) else "no more genes"
            )
            raise DataError(
                f"{path}: {where}, but {first} has {expected} there: every file must "
                f"list the same genes in the same order ({len(parsed.genes)} vs "
                f"{len(self.genes)} genes); was it made with another gene model?"
            )
        return parsed.values


def open_gdc(
    folder: str,
    sample_sheet: str | None = None,
    column: str = "unstranded",
    label_column: str | None = "Project ID",
) -> GdcSource:
    """Opens a GDC download folder of STAR gene-count files.

    Args:
        folder: str, the download folder (`<File ID>/<File Name>` files inside).
        sample_sheet: optional str, the sample sheet; None looks for exactly one
            `gdc_sample_sheet*.tsv` in `folder`.
        column: str, the value column to read: "unstranded" (raw counts, default),
            "stranded_first", "stranded_second", "tpm_unstranded", "fpkm_unstranded" or
            "fpkm_uq_unstranded".
        label_column: optional str, the sheet column used as label (default
            `Project ID`, e.g. `TCGA-LUSC`); None for no labels.

    Returns:
        A `GdcSource`; sample ids are the sheet's `Sample ID`, genes those of the first
        file. `info` holds the format, gene model, column and how many counts files in
        the folder the sheet does not list.

    Raises:
        DataError: no or several sample sheets, a sheet column is missing, a file the
            sheet lists is missing, or the sheet lists no gene-count file.

    Example:

    ```python
    source = open_gdc("gdc_download_20260101", column="tpm_unstranded")
    ```
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    if column not in COLUMNS:
        raise DataError(f"unknown GDC value column {column!r}; choose one of {COLUMNS}")
    sheet = _find_sheet(folder, sample_sheet)
    rows = _read_sheet(sheet, label_column)
    files, sample_ids, labels = [], [], []
    for line, row in rows:
        path = _counts_path(folder, row["File ID"], row["File Name"])
        if path is None:
            raise DataError(
                f"{sheet} line {line}: file {row['File ID']}/{row['File Name']} "
                f"(sample {row['Sample ID']!r}) is not in {folder}; download it or "
                "remove the line from the sample sheet"
            )
        files.append(path)
        sample_ids.append(row["Sample ID"])
        if label_column is not None:
            label = row[label_column].strip()
            labels.append(None if label in NA_TOKENS else label)
    present = {
        os.path.normpath(p)
        for p in glob.glob(os.path.join(folder, "*" + COUNTS_SUFFIX))
        + glob.glob(os.path.join(folder, "*", "*" + COUNTS_SUFFIX))
    }
    not_in_sheet = len(present - {os.path.normpath(p) for p in files})
    first = read_counts_file(files[0], column)
    return GdcSource(
        path=folder,
        sample_ids=sample_ids,
        genes=first.genes,
        labels=labels if label_column is not None else None,
        info={
            "format": "gdc",
            "gene_model": first.gene_model,
            "column": column,
            "sample_sheet": os.path.basename(sheet),
            "files_not_in_sheet": not_in_sheet,
        },
        files=files,
        column=column,
    )


def _find_sheet(folder: str, sample_sheet: str | None) -> str:
    if sample_sheet is not None:
        sample_sheet = os.fspath(sample_sheet)
        if not os.path.isfile(sample_sheet):
            raise DataError(f"{sample_sheet}: no such sample sheet")
        return sample_sheet
    found = sorted(glob.glob(os.path.join(folder, SHEET_PATTERN)))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise DataError(
            f"{folder}: found {what} sample sheets ({SHEET_PATTERN}"
            f"{': ' + preview(os.path.basename(f) for f in found) if found else ''}); "
            "download the sample sheet from the GDC cart into the folder, or pass it "
            "with --sample-sheet"
        )
    return found[0]


def _read_sheet(sheet: str, label_column: str | None) -> list[tuple[int, dict]]:
    """Returns (file line, row) for each gene-count file the sheet lists."""
    try:
        with open(sheet, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            header = reader.fieldnames or []
            needed = SHEET_COLUMNS + ((label_column,) if label_column else ())
            missing = [c for c in needed if c not in header]
            if missing:
                raise DataError(
                    f"{sheet}: no column {', '.join(map(repr, missing))} (columns: "
                    f"{preview(header, 10)}); is this a GDC sample sheet?"
                )
            rows = []
            for row in reader:
                if not any(
                    (v or "").strip() for v in row.values() if isinstance(v, str)
                ):
                    continue
                if "Data Type" in row and row["Data Type"] not in (GENE_DATA_TYPE, ""):
                    continue
                clean = {k: (v or "") for k, v in row.items() if k is not None}
                rows.append((reader.line_num, clean))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{sheet}: cannot read ({err})") from None
    if not rows:
        raise DataError(f"{sheet}: lists no gene-count files ({GENE_DATA_TYPE})")
    return rows


def _counts_path(folder: str, file_id: str, file_name: str) -> str | None:
    for path in (
        os.path.join(folder, file_id, file_name),
        os.path.join(folder, file_name),
    ):
        if file_name and os.path.isfile(path):
            return path
    return None
