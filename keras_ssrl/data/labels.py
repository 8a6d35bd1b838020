"""Labels: reading label files, joining them on sample id, and rule-based labels.

Labels come from a column of the expression table, from the source's own metadata (GDC
sample sheet, ARCHS4 fields) or from a separate file joined on sample id (a UCSC Xena
phenotype file, a user's CSV). Samples without a label are never dropped silently: the
`missing_labels` policy decides, and the counts are reported.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence

import pandas as pd

from keras_ssrl.data.errors import DataError, preview

_SAMPLE_COLUMNS = ("sample", "sample_id", "sampleID", "Sample ID", "caseID", "id")
_MISSING = {"", "na", "nan", "none", "null"}
MISSING_LABEL_POLICIES = ("error", "unlabelled", "drop")


def _read_text_table(path: str) -> pd.DataFrame:
    sep = "," if str(path).endswith((".csv", ".csv.gz")) else "\t"
    # Xena phenotype files are not always valid UTF-8; latin-1 reads any byte.
    for encoding in ("utf-8", "latin-1"):
        try:
            return pd.read_csv(
                path, sep=sep, dtype=str, keep_default_na=False, encoding=encoding
            )
        except UnicodeDecodeError:
            continue
        except (pd.errors.EmptyDataError, FileNotFoundError) as error:
            raise DataError(f"{path}: cannot read the label file ({error})") from None
    raise DataError(f"{path}: cannot decode the label file")


def read_label_file(
    path: str, label_column: str | None = None, sample_column: str | None = None
) -> dict[str, str | None]:
    """Reads a sample -> label table (CSV, TSV or Parquet).

    Args:
        path: str, the file.
        label_column: str, the column holding the class names; may be omitted when the
            file has exactly two columns.
        sample_column: str, the column holding sample ids; default: the first of
            `sample`, `sample_id`, `sampleID`, `Sample ID`, `caseID`, `id` present, else
            the first column.

    Returns:
        A dict from sample id to class name (None where the cell is empty or NA).
    """
    if str(path).endswith((".parquet", ".pq")):
        frame = pd.read_parquet(path).astype(str)
    else:
        frame = _read_text_table(path)
    if frame.shape[0] == 0:
        raise DataError(f"{path}: the label file has no rows")
    columns = list(frame.columns)
    if sample_column is None:
        sample_column = next((c for c in _SAMPLE_COLUMNS if c in columns), columns[0])
    if sample_column not in columns:
        raise DataError(
            f"{path}: no sample column {sample_column!r}; columns are "
            f"{preview(columns, 10)}. Pass --sample-column."
        )
    if label_column is None:
        others = [c for c in columns if c != sample_column]
        if len(others) != 1:
            raise DataError(
                f"{path}: say which column holds the labels with --label-column "
                f"(columns: {preview(columns, 10)})"
            )
        label_column = others[0]
    if label_column not in columns:
        raise DataError(
            f"{path}: no label column {label_column!r}; columns are "
            f"{preview(columns, 10)}"
        )
    ids = frame[sample_column].astype(str).str.strip()
    duplicated = ids[ids.duplicated()].unique().tolist()
    if duplicated:
        rows = [int(i) + 2 for i in ids.index[ids.isin(duplicated[:1])]]
        raise DataError(
            f"{path}: {len(duplicated)} sample id(s) occur more than once, e.g. "
            f"{duplicated[0]!r} on lines {rows}; a sample must have one label"
        )
    labels = frame[label_column].astype(str).str.strip()
    return {
        sid: (None if lab.lower() in _MISSING else lab) for sid, lab in zip(ids, labels)
    }


def join_labels(
    sample_ids: Sequence[str], mapping: dict[str, str | None], path: str = ""
) -> tuple[list[str | None], dict]:
    """Looks every sample up in a label mapping; reports what did not match."""
    labels = [mapping.get(sid) for sid in sample_ids]
    known = set(sample_ids)
    report = {
        "label_file": str(path),
        "n_label_rows": len(mapping),
        "n_label_rows_unused": sum(1 for sid in mapping if sid not in known),
        "n_samples_without_label": sum(lab is None for lab in labels),
    }
    if report["n_samples_without_label"] == len(labels):
        raise DataError(
            f"{path}: none of the {len(labels)} samples has a label in this file; "
            f"samples look like {preview(sample_ids, 3)}, label rows like "
            f"{preview(list(mapping), 3)}"
        )
    return labels, report


def apply_missing_label_policy(
    labels: list[str | None], sample_ids: Sequence[str], policy: str, path: str = ""
) -> tuple[list[str | None], list[int], dict]:
    """Applies the `missing_labels` policy.

    Returns:
        `(labels, dropped, report)`: the labels, the positions of samples to drop (under
        `drop`), and counts for the report.
    """
    missing = [i for i, lab in enumerate(labels) if lab is None]
    report = {"missing_labels_policy": policy, "n_missing_labels": len(missing)}
    if not missing:
        return labels, [], report
    if policy == "error":
        raise DataError(
            f"{path}: {len(missing)} of {len(labels)} samples have no label, e.g. "
            f"{preview([sample_ids[i] for i in missing], 5)}. Add their labels, or "
            "pass --missing-labels unlabelled (they become pre-training data) or "
            "--missing-labels drop (they are left out); either way they are counted."
        )
    if policy == "drop":
        return labels, missing, report
    if policy == "unlabelled":
        return labels, [], report
    raise DataError(
        f"unknown --missing-labels {policy!r}; choose one of "
        f"{', '.join(MISSING_LABEL_POLICIES)}"
    )


def read_label_rules(path: str) -> list[tuple[str, re.Pattern]]:
    """Reads ordered `(label, regular expression)` rules from JSON or CSV/TSV.

    JSON: `[{"label": "lung", "pattern": "lung|pulmonary"}, ...]` or
    `{"lung": "lung|pulmonary", ...}`; CSV/TSV: columns `label` and `pattern`.
    Patterns match case-insensitively anywhere in the fields; the first rule that
    matches wins (ARCHS4 has no clean tissue field, see data-formats.md).
    """
    try:
        if str(path).endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                raw = json.load(handle)
            items = (
                raw.items()
                if isinstance(raw, dict)
                else [(r["label"], r["pattern"]) for r in raw]
            )
        else:
            with open(path, encoding="utf-8", newline="") as handle:
                dialect = "excel-tab" if not str(path).endswith(".csv") else "excel"
                items = [
                    (r["label"], r["pattern"])
                    for r in csv.DictReader(handle, dialect=dialect)
                ]
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise DataError(
            f"{path}: cannot read label rules ({error}); expected label/pattern pairs"
        ) from None
    rules = []
    for label, pattern in items:
        try:
            rules.append((str(label), re.compile(str(pattern), re.IGNORECASE)))
        except re.error as error:
            raise DataError(
                f"{path}: rule for {label!r} is not a valid regular expression "
                f"({error})"
            ) from None
    if not rules:
        raise DataError(f"{path}: no label rules")
    return rules


def apply_label_rules(
    fields: dict[str, Sequence[str]], rules: list[tuple[str, re.Pattern]]
) -> tuple[list[str | None], dict]:
    """Labels each sample by the first rule matching any of its text fields."""
    columns = list(fields.values())
    n = len(columns[0]) if columns else 0
    labels: list[str | None] = []
    ambiguous = 0
    for i in range(n):
        text = " | ".join(str(col[i]) for col in columns)
        hits = [label for label, pattern in rules if pattern.search(text)]
        labels.append(hits[0] if hits else None)
        ambiguous += len(set(hits)) > 1
    report = {
        "label_rules": len(rules),
        "rule_fields": list(fields),
        "n_matched_by_rules": sum(lab is not None for lab in labels),
        "n_matched_several_labels": ambiguous,
    }
    return labels, report
