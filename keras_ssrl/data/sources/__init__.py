"""Readers for the formats users bring, behind one `open_source` entry point.

| format  | what                                                   | module     |
|---------|--------------------------------------------------------|------------|
| csv/tsv/parquet | generic tables, samples as rows or columns     | `tables`   |
| archs4  | ARCHS4 gene-level HDF5 (v2, v9-v11, transposed)        | `archs4`   |
| xena    | UCSC Xena genes x samples matrix (+ phenotype file)    | `xena`     |
| gdc     | GDC STAR-count folder + sample sheet                   | `gdc`      |
| builtin | the synthetic `synthetic-tcga` / `synthetic-archs4`    | `builtin`  |
"""

from __future__ import annotations

import os

from keras_ssrl.data.errors import DataError
from keras_ssrl.data.labels import (
    apply_label_rules,
    join_labels,
    read_label_file,
    read_label_rules,
)
from keras_ssrl.data.sources.base import Block, ExpressionSource

FORMATS = ("auto", "csv", "tsv", "parquet", "archs4", "xena", "gdc")
DEFAULT_RULE_FIELDS = ("source_name_ch1", "characteristics_ch1", "title")


def detect_format(path: str) -> str:
    """The format of `path` from its kind and extension."""
    if os.path.isdir(path):
        return "gdc"
    name = os.path.basename(path).lower()
    if name.endswith((".h5", ".hdf5", ".hdf")):
        return "archs4"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz", ".tab", ".xena", ".gz")):
        return "tsv"
    raise DataError(
        f"{path}: cannot tell the format from the name; pass "
        f"--format {'|'.join(FORMATS[1:])}"
    )


def open_source(
    path: str,
    fmt: str = "auto",
    *,
    labels: str | None = None,
    label_column: str | None = None,
    sample_column: str | None = None,
    labels_sample_column: str | None = None,
    genes_as_rows: bool | None = None,
    gene_id: str = "auto",
    label_rules: str | None = None,
    rule_fields: tuple[str, ...] = DEFAULT_RULE_FIELDS,
    gdc_column: str = "unstranded",
    sample_sheet: str | None = None,
) -> tuple[ExpressionSource, dict]:
    """Opens an expression file of any supported format, with its labels.

    Args:
        path: str, the file (or GDC folder).
        fmt: one of `FORMATS`; `auto` decides from the path.
        labels: optional label file joined on sample id (a Xena phenotype file, a CSV).
            It takes precedence over labels found in the source itself.
        label_column: the label column: in `labels` when given, else in the table
            (samples as rows), or the ARCHS4 `meta/samples` field, or the GDC sample
            sheet column (default `Project ID`).
        sample_column: the sample-id column of a samples-as-rows table.
        labels_sample_column: the sample-id column of the label file.
        genes_as_rows: table orientation; None detects it.
        gene_id: ARCHS4 gene ids: `ensembl`, `symbol` or `auto`.
        label_rules: ARCHS4: a file of `(label, regex)` rules applied to `rule_fields`.
        rule_fields: ARCHS4 `meta/samples` fields the rules search.
        gdc_column: GDC count column (`unstranded`, `tpm_unstranded`, ...).
        sample_sheet: GDC sample sheet (default: the one `gdc_sample_sheet*.tsv` in the
            folder).

    Returns:
        `(source, report)`, the report saying where labels came from and what matched.
    """
    if not os.path.exists(path) and "://" not in path:
        raise DataError(f"{path}: no such file or folder")
    fmt = detect_format(path) if fmt == "auto" else fmt
    in_source_label = None if labels else label_column
    report: dict = {}
    if fmt in ("csv", "tsv", "parquet"):
        from keras_ssrl.data.sources.tables import open_table

        source = open_table(
            path,
            fmt=fmt,
            sample_column=sample_column,
            label_column=in_source_label,
            genes_as_rows=genes_as_rows,
        )
    elif fmt == "archs4":
        from keras_ssrl.data.sources.archs4 import open_archs4

        source = open_archs4(path, gene_id=gene_id, label_field=in_source_label)
        if label_rules and not labels:
            source.labels, report = _rule_labels(source, label_rules, rule_fields)
    elif fmt == "xena":
        from keras_ssrl.data.sources.xena import open_xena

        source = open_xena(path)
    elif fmt == "gdc":
        from keras_ssrl.data.sources.gdc import open_gdc

        source = open_gdc(
            path,
            sample_sheet=sample_sheet,
            column=gdc_column,
            label_column=in_source_label or "Project ID",
        )
    else:
        raise DataError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if labels:
        mapping = read_label_file(labels, label_column, labels_sample_column)
        source.labels, report = join_labels(source.sample_ids, mapping, labels)
    report["format"] = fmt
    return source, report


def _rule_labels(source, label_rules: str, rule_fields: tuple[str, ...]):
    """ARCHS4 labels from `(label, regex)` rules over metadata fields, and a report."""
    rules = read_label_rules(label_rules)
    fields = source.sample_metadata(list(rule_fields))
    return apply_label_rules(fields, rules)


__all__ = ["Block", "ExpressionSource", "FORMATS", "detect_format", "open_source"]
