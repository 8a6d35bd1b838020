"""Text cells and files of the formats users bring: numbers, missing values, compression.

Shared by the table reader (`tables`), the GDC reader (`gdc`) and the writers of
`keras_ssrl.data.layouts`, so that every format agrees on what a number is, which cells
are missing values, how a compressed file is recognised and which format a file name
names.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os

from keras_ssrl.data.errors import DataError

# Cells read as missing values (NaN), whatever the column.
NA_TOKENS = frozenset(
    {
        "",
        "NA",
        "na",
        "NaN",
        "nan",
        "-NaN",
        "-nan",
        "N/A",
        "n/a",
        "#N/A",
        "NULL",
        "null",
        "None",
        "<NA>",
    }
)

_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".tab": "tsv",
    ".xena": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION_EXTENSIONS = (".gz", ".bz2", ".xz")
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))
_OPENERS = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}


def parse_cell(cell: str) -> float | None:
    """Parses one text cell as a number.

    Args:
        cell: str, the cell as written in the file.

    Returns:
        The float value, NaN for a missing-value token (see `NA_TOKENS`), or None when
        the cell is not a number.
    """
    text = cell.strip()
    if text in NA_TOKENS:
        return float("nan")
    # Python's float() accepts "1_000", which no table reader does: reject it so that
    # the fast (pandas) path and this slow path agree on what a number is.
    if "_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def format_from_path(path: str) -> str:
    """Guesses the table format from a file name.

    Args:
        path: str, the file name (`.csv`, `.tsv`/`.txt`/`.tab`, `.parquet`/`.pq`,
            optionally followed by `.gz`, `.bz2` or `.xz` for text).

    Returns:
        "csv", "tsv" or "parquet".

    Raises:
        DataError: when the extension is not one of those.
    """
    name = os.path.basename(str(path)).lower()
    for ext in _COMPRESSION_EXTENSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise DataError(
            f"cannot tell the format of {path} from its extension {ext or '(none)'!r}: "
            "pass the format explicitly (csv, tsv or parquet)"
        )
    return _EXTENSIONS[ext]


def detect_compression(path: str) -> str | None:
    """Returns "gzip", "bz2", "xz" or None, from the file's first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def open_text(path: str, compression: str | None = None) -> io.TextIOBase:
    """Opens a possibly compressed UTF-8 text file for the `csv` module.

    Args:
        path: str, the file.
        compression: "gzip", "bz2", "xz" or None (plain text).

    Returns:
        A text stream (newline="" as the `csv` module needs; a byte-order mark is
        dropped).
    """
    opener = _OPENERS.get(compression, open)
    return opener(path, "rt", encoding="utf-8-sig", newline="")
