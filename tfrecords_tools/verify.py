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

from keras_ssrl.cli import quiet_native_logs, run_main

quiet_native_logs()  # before anything below imports tensorflow

from keras_ssrl.cli import add_console_flags, setup_logging  # noqa: E402
from keras_ssrl.data import DataError  # noqa: E402
from keras_ssrl.data.errors import report_error  # noqa: E402
from keras_ssrl.data.integrity import inspect_dataset  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="dataset folder (local, gs:// or s3://)")
    p.add_argument(
        "--no-checksums",
        action="store_true",
        help="skip the sha256 comparison (records are still parsed)",
    )
    return add_console_flags(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    log = setup_logging(args)
    try:
        report = inspect_dataset(args.directory, checksums=not args.no_checksums)
    except (DataError, OSError) as error:
        return report_error(error)
    # The report is the result: on stdout, even with --quiet.
    print(report.summary())
    if not report.ok:
        log.error(f"FAILED: {len(report.problems)} problem(s)")
        for problem in report.problems:
            log.error(f"  {problem}")
        return 1
    log.info(f"OK: {report.records_checked} records checked")
    return 0


if __name__ == "__main__":
    run_main(main)
