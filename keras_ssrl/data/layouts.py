"""Writers that put a samples x genes matrix into the layouts users download.

The real files (ARCHS4 HDF5, UCSC Xena matrices, GDC STAR-count folders, the authors'
tables) cannot be downloaded on every machine, so tests, and users who want to try the
converter, build small files of the same layout with these functions; the readers in
`keras_ssrl.data.sources` read them exactly as they read the real ones. Everything is
deterministic: the same arguments give the same bytes (HDF5 files aside, whose headers
hold no timestamps but may differ across h5py versions).

- `write_table`: CSV / TSV (optionally `.gz`) / Parquet, samples as rows or as columns.
- `write_archs4`: ARCHS4 gene-level HDF5, layouts "v2", "v1" and "transposed".
- `write_xena`: a UCSC Xena genes x samples TSV (header cell `sample`).
- `write_gdc`: a GDC download folder of STAR gene-count files plus its sample sheet.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import random
import uuid
from collections.abc import Sequence

import numpy as np

from keras_ssrl.data.sources.cells import format_from_path
from keras_ssrl.data.sources.gdc import COLUMNS, COUNTS_SUFFIX, SUMMARY_ROWS

GDC_SHEET_NAME = "gdc_sample_sheet.2026-01-01.tsv"
GDC_SHEET_COLUMNS = (
    "File ID",
    "File Name",
    "Data Category",
    "Data Type",
    "Project ID",
    "Case ID",
    "Sample ID",
    "Sample Type",
)
GDC_HEADER = ("gene_id", "gene_name", "gene_type", *COLUMNS)
ARCHS4_LAYOUTS = ("v2", "v1", "transposed")
# Samples per HDF5 chunk along the sample axis: a block read touches few chunks.
_ARCHS4_SAMPLE_CHUNK = 100
_ARCHS4_GENE_CHUNK = 2048


def _check_shape(values: np.ndarray, sample_ids: Sequence, genes: Sequence) -> None:
    if values.shape != (len(sample_ids), len(genes)):
        raise ValueError(
            f"values has shape {values.shape}, expected (len(sample_ids), len(genes)) "
            f"= ({len(sample_ids)}, {len(genes)})"
        )


def _number(value: float) -> str:
    """A cell as the text tools write: integers without `.0`, NaN as `NA`."""
    if math.isnan(value):
        return "NA"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _open_text_out(path: str) -> io.TextIOBase:
    if str(path).endswith(".gz"):
        # mtime=0 keeps the bytes identical from one run to the next.
        return io.TextIOWrapper(
            gzip.GzipFile(path, "wb", compresslevel=6, mtime=0),
            encoding="utf-8",
            newline="",
        )
    return open(path, "w", encoding="utf-8", newline="")


def write_table(
    path: str,
    values: np.ndarray,
    sample_ids: Sequence[str],
    genes: Sequence[str],
    *,
    labels: Sequence[str | None] | None = None,
    genes_as_rows: bool = False,
    fmt: str | None = None,
    sample_column: str = "sample_id",
    label_column: str = "label",
) -> str:
    """Writes a samples x genes matrix as a CSV, TSV or Parquet table.

    Args:
        path: str, the output file; the format follows its extension (`.csv`, `.tsv`,
            `.txt`, `.tab`, each optionally `.gz`; `.parquet`, `.pq`) unless `fmt` is
            given.
        values: float array of shape `(samples, genes)`; NaN is written as `NA` (null in
            Parquet).
        sample_ids: sequence of str, one per sample.
        genes: sequence of str, one per gene.
        labels: optional sequence of str or None, one per sample (samples as rows only);
            None is written as an empty cell.
        genes_as_rows: bool, write genes as rows (first column `gene_id`) and samples as
            columns, instead of samples as rows.
        fmt: optional str, "csv", "tsv" or "parquet".
        sample_column: str, the header of the sample-id column (samples as rows).
        label_column: str, the header of the label column (samples as rows).

    Returns:
        The path written.
    """
    path = os.fspath(path)
    values = np.asarray(values, dtype=np.float64)
    _check_shape(values, sample_ids, genes)
    if labels is not None and genes_as_rows:
        raise ValueError("labels can only be written with samples as rows")
    if labels is not None and len(labels) != len(sample_ids):
        raise ValueError("labels must have one entry per sample")
    fmt = fmt or format_from_path(path)
    if genes_as_rows:
        header = ["gene_id", *map(str, sample_ids)]
        ids, matrix, extra = list(map(str, genes)), values.T, None
    else:
        header = [sample_column]
        extra = None
        if labels is not None:
            header.append(label_column)
            extra = [None if lab is None else str(lab) for lab in labels]
        header += list(map(str, genes))
        ids, matrix = list(map(str, sample_ids)), values
    if fmt == "parquet":
        _write_parquet(path, header, ids, extra, matrix)
        return path
    if fmt not in ("csv", "tsv"):
        raise ValueError(f"unknown table format {fmt!r}")
    with _open_text_out(path) as handle:
        writer = csv.writer(
            handle, delimiter="," if fmt == "csv" else "\t", lineterminator="\n"
        )
        writer.writerow(header)
        for i, row_id in enumerate(ids):
            cells = [row_id]
            if extra is not None:
                cells.append("" if extra[i] is None else extra[i])
            cells += [_number(v) for v in matrix[i].tolist()]
            writer.writerow(cells)
    return path


def _write_parquet(
    path: str,
    header: list[str],
    ids: list[str],
    extra: list[str | None] | None,
    matrix: np.ndarray,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = [pa.array(ids, type=pa.string())]
    if extra is not None:
        arrays.append(pa.array(extra, type=pa.string()))
    for column in np.asarray(matrix).T:
        arrays.append(pa.array(column, type=pa.float64(), from_pandas=True))
    # from_arrays keeps duplicate names, as a real table may have them.
    pq.write_table(pa.Table.from_arrays(arrays, names=header), path)


def _bytes_array(items: Sequence[str]) -> np.ndarray:
    """Fixed-length byte strings, as h5py returns them from the real files."""
    encoded = [str(s).encode("utf-8") for s in items]
    width = max([len(b) for b in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}")


def write_archs4(
    path: str,
    counts: np.ndarray,
    sample_ids: Sequence[str],
    genes: Sequence[str],
    *,
    symbols: Sequence[str] | None = None,
    layout: str = "v2",
    sample_meta: dict[str, Sequence] | None = None,
) -> str:
    """Writes counts as an ARCHS4 gene-level HDF5 file.

    Args:
        path: str, the `.h5` file to write.
        counts: array of shape `(samples, genes)`, rounded to int32 read counts.
        sample_ids: sequence of str, GEO accessions (`meta/samples/geo_accession`).
        genes: sequence of str: for "v2" the Ensembl ids (`meta/genes/ensembl_gene`);
            for "v1" and "transposed" the single gene vector `meta/genes/genes`
            (symbols in the real files).
        symbols: optional sequence of str, gene symbols (`meta/genes/symbol`, "v2"
            only; default: `genes`).
        layout: str, "v2" (`data/expression` is (genes, samples)), "v1" (same, genes in
            `meta/genes/genes`) or "transposed" ((samples, genes), oldest files).
        sample_meta: optional dict from a `meta/samples` field name to one value per
            sample (str, or numbers for e.g. `singlecellprobability`); `series_id`,
            `title`, `source_name_ch1`, `characteristics_ch1` and
            `singlecellprobability` get plausible defaults when not given.

    Returns:
        The path written.
    """
    import h5py

    path = os.fspath(path)
    counts = np.asarray(counts)
    _check_shape(counts, sample_ids, genes)
    if layout not in ARCHS4_LAYOUTS:
        raise ValueError(
            f"unknown ARCHS4 layout {layout!r}; choose one of {ARCHS4_LAYOUTS}"
        )
    if symbols is not None and layout != "v2":
        raise ValueError("older ARCHS4 layouts keep one gene vector: pass it as genes")
    matrix = np.rint(counts).astype(np.int32)
    meta = {
        "series_id": ["GSE1000" for _ in sample_ids],
        "title": [f"sample {s}" for s in sample_ids],
        "source_name_ch1": ["" for _ in sample_ids],
        "characteristics_ch1": ["" for _ in sample_ids],
        "singlecellprobability": [0.0 for _ in sample_ids],
    }
    meta.update(sample_meta or {})
    with h5py.File(path, "w") as handle:
        _write_archs4_matrix(handle, matrix, layout)
        gene_group = handle.create_group("meta/genes")
        if layout == "v2":
            gene_group["ensembl_gene"] = _bytes_array(genes)
            gene_group["symbol"] = _bytes_array(
                symbols if symbols is not None else genes
            )
            gene_group["biotype"] = _bytes_array(["protein_coding"] * len(genes))
        else:
            gene_group["genes"] = _bytes_array(genes)
        _write_archs4_samples(handle, sample_ids, meta)
        info = handle.create_group("meta/info")
        info["version"] = _bytes_array([f"keras_ssrl layouts {layout}"])
    return path


def _write_archs4_matrix(handle, matrix: np.ndarray, layout: str) -> None:
    """`data/expression`, chunked along samples as the real files are."""
    n_samples, n_genes = matrix.shape
    sample_chunk = max(1, min(n_samples, _ARCHS4_SAMPLE_CHUNK))
    gene_chunk = max(1, min(n_genes, _ARCHS4_GENE_CHUNK))
    if layout == "transposed":
        data, chunks = matrix, (sample_chunk, gene_chunk)
    else:
        data, chunks = matrix.T, (gene_chunk, sample_chunk)
    handle.create_dataset(
        "data/expression", data=data, chunks=chunks, compression="gzip"
    )


def _write_archs4_samples(
    handle, sample_ids: Sequence[str], meta: dict[str, Sequence]
) -> None:
    """`meta/samples`: the accessions, then each field (numbers or strings)."""
    sample_group = handle.create_group("meta/samples")
    sample_group["geo_accession"] = _bytes_array(sample_ids)
    for name, column in meta.items():
        column = list(column)
        if len(column) != len(sample_ids):
            raise ValueError(f"sample_meta[{name!r}] must have one value per sample")
        if all(isinstance(v, (int, float, np.number)) for v in column):
            sample_group[name] = np.asarray(column, dtype=np.float64)
        else:
            sample_group[name] = _bytes_array(column)


def write_xena(
    path: str,
    values: np.ndarray,
    sample_ids: Sequence[str],
    genes: Sequence[str],
) -> str:
    """Writes a UCSC Xena genes x samples matrix (TSV, gzip when `path` ends in .gz).

    Args:
        path: str, the output file.
        values: float array of shape `(samples, genes)`; NaN is written as `NA`.
        sample_ids: sequence of str, sample barcodes (the header after `sample`).
        genes: sequence of str, gene ids (the first column).

    Returns:
        The path written.
    """
    path = os.fspath(path)
    values = np.asarray(values, dtype=np.float64)
    _check_shape(values, sample_ids, genes)
    with _open_text_out(path) as handle:
        handle.write("\t".join(["sample", *map(str, sample_ids)]) + "\n")
        for gene, column in zip(genes, values.T, strict=True):
            cells = [str(gene), *(_number(v) for v in column.tolist())]
            handle.write("\t".join(cells) + "\n")
    return path


def write_gdc(
    folder: str,
    counts: np.ndarray,
    sample_ids: Sequence[str],
    genes: Sequence[str],
    labels: Sequence[str | None],
    *,
    symbols: Sequence[str] | None = None,
    par_y: int = 2,
    seed: int = 0,
) -> str:
    """Writes a GDC download folder of STAR gene-count files and its sample sheet.

    Each sample gets `<File ID>/<File ID-like uuid>.rna_seq.augmented_star_gene_counts
    .tsv` with the `# gene-model: GENCODE v36` line, the STAR header, the four `N_`
    summary rows, then one row per gene. The first `par_y` genes are followed by a
    `<gene>_PAR_Y` row of zeros, as in the real files, so a reader returns
    `len(genes) + par_y` gene rows. Stranded counts, TPM, FPKM and FPKM-UQ are derived
    from the counts with made-up gene lengths. The sample sheet is
    `gdc_sample_sheet.2026-01-01.tsv`.

    Args:
        folder: str, the folder to fill (created if needed).
        counts: array of shape `(samples, genes)`, rounded to integer counts.
        sample_ids: sequence of str, the sheet's `Sample ID` (TCGA barcodes in the
            real sheets; `Case ID` is their first 12 characters).
        genes: sequence of str, versioned Ensembl ids.
        labels: sequence of str or None, the sheet's `Project ID` (e.g. `TCGA-LUSC`).
        symbols: optional sequence of str, the `gene_name` column (default: `genes`).
        par_y: int, how many genes get a `_PAR_Y` duplicate row.
        seed: int, seeds the File IDs and gene lengths.

    Returns:
        The path of the sample sheet.
    """
    folder = os.fspath(folder)
    counts = np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64)
    _check_shape(counts, sample_ids, genes)
    if len(labels) != len(sample_ids):
        raise ValueError("labels must have one entry per sample")
    symbols = list(genes) if symbols is None else list(symbols)
    rng = random.Random(seed)
    lengths = np.array([rng.randint(500, 12000) for _ in genes], dtype=np.float64)
    os.makedirs(folder, exist_ok=True)
    sheet_rows = []
    for i, sample in enumerate(sample_ids):
        file_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        file_name = str(uuid.UUID(int=rng.getrandbits(128), version=4)) + COUNTS_SUFFIX
        os.makedirs(os.path.join(folder, file_id), exist_ok=True)
        _write_star_file(
            os.path.join(folder, file_id, file_name),
            counts[i],
            genes,
            symbols,
            lengths,
            par_y,
        )
        sample = str(sample)
        case = sample[:12] if sample.startswith("TCGA-") else sample
        sheet_rows.append(
            [
                file_id,
                file_name,
                "Transcriptome Profiling",
                "Gene Expression Quantification",
                "" if labels[i] is None else str(labels[i]),
                case,
                sample,
                "Primary Tumor",
            ]
        )
    sheet = os.path.join(folder, GDC_SHEET_NAME)
    with open(sheet, "w", encoding="utf-8", newline="") as handle:
        handle.write("\t".join(GDC_SHEET_COLUMNS) + "\n")
        for row in sheet_rows:
            handle.write("\t".join(row) + "\n")
    return sheet


def _write_star_file(
    path: str,
    counts: np.ndarray,
    genes: Sequence[str],
    symbols: Sequence[str],
    lengths: np.ndarray,
    par_y: int,
) -> None:
    """One STAR augmented gene-counts file, with the real file's rows and columns."""
    total = max(int(counts.sum()), 1)
    rate = counts / lengths
    tpm = rate / max(rate.sum(), 1e-12) * 1e6
    fpkm = counts * 1e9 / (lengths * total)
    upper_quartile = max(float(np.percentile(counts, 75)), 1.0)
    fpkm_uq = counts * 1e9 / (lengths * upper_quartile)
    first = counts // 2
    lines = ["# gene-model: GENCODE v36", "\t".join(GDC_HEADER)]
    # Summary counts of a typical library, scaled to this one.
    for k, name in enumerate(SUMMARY_ROWS):
        n = str(total // (10 * (k + 1)))
        lines.append("\t".join([name, "", "", n, n, n, "", "", ""]))
    for g, gene in enumerate(genes):
        lines.append(
            "\t".join(
                [
                    str(gene),
                    str(symbols[g]),
                    "protein_coding",
                    str(int(counts[g])),
                    str(int(first[g])),
                    str(int(counts[g] - first[g])),
                    f"{tpm[g]:.4f}",
                    f"{fpkm[g]:.4f}",
                    f"{fpkm_uq[g]:.4f}",
                ]
            )
        )
        if g < par_y:
            zeros = ["0", "0", "0", "0.0000", "0.0000", "0.0000"]
            lines.append(
                "\t".join([f"{gene}_PAR_Y", str(symbols[g]), "protein_coding", *zeros])
            )
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("\n".join(lines) + "\n")
