"""Summarise a converted dataset and verify its integrity, record by record.

Usage:

    python tfrecords_tools/verify.py data/synthetic-tcga
    python tfrecords_tools/verify.py data/synthetic-tcga --no-checksums   # faster

Prints genes, classes and counts per split, then checks every shard listed in the
manifest (present, size, sha256, every record parses with the right width and label,
record counts). Exits 1 naming each damaged shard (or, when the manifest contradicts
itself or its records, the manifest alone), 2 when the folder is not a dataset or its
manifest names files outside the folder.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_ssrl.data import DataError  # noqa: E402
from keras_ssrl.data.errors import report_error  # noqa: E402
from keras_ssrl.data.integrity import inspect_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="dataset folder (local, gs:// or s3://)")
    parser.add_argument(
        "--no-checksums",
        action="store_true",
        help="skip the sha256 comparison (records are still parsed)",
    )
    args = parser.parse_args(argv)
    try:
        report = inspect_dataset(args.directory, checksums=not args.no_checksums)
    except (DataError, OSError) as error:
        return report_error(error)
    print(report.summary())
    if not report.ok:
        print(f"\nFAILED: {len(report.problems)} problem(s)", file=sys.stderr)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"\nOK: {report.records_checked} records checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
