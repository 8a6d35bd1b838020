"""Re-write a converted dataset onto another dataset's gene list.

Usage (the archs4_to_tcga setting: both datasets on their common genes):

    python tfrecords_tools/align.py data/archs4 --to data/tcga --out data/archs4_on_tcga
    python tfrecords_tools/align.py data/tcga --to data/archs4_on_tcga \
        --out data/tcga_on_common

Keeps the genes of DATASET that are also in --to (a dataset folder or a text file with
one gene id per line), in the order of --to, and reports how many matched; refuses when
fewer than --min-overlap of the target's genes are found. Splits, shards and per-gene
statistics (fitted on the pre-training split) are carried over unchanged. Exits 2 for bad
arguments, folders or gene lists (checked before anything is written), 1 when a shard of
DATASET is damaged. --overwrite replaces only a dataset folder written by these tools,
never DATASET, the --to target or a folder holding anything else.
"""

from __future__ import annotations

import argparse
import sys

from keras_ssrl.cli import quiet_native_logs, run_main

quiet_native_logs()  # before anything below imports tensorflow

from keras_ssrl.cli import (  # noqa: E402
    Flag,
    FlagTable,
    add_console_flags,
    log_line,
    print_next,
    setup_logging,
)
from keras_ssrl.config import ConversionConfig  # noqa: E402
from keras_ssrl.data import DataError  # noqa: E402
from keras_ssrl.data.align import rewrite_onto, target_genes  # noqa: E402
from keras_ssrl.data.errors import report_error  # noqa: E402

FLAGS = FlagTable(
    ConversionConfig,
    [
        Flag(
            "--min-overlap",
            "align_min_overlap",
            float,
            "refuse when fewer than this fraction of the target's genes is found",
        )
    ],
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="the converted dataset to re-write")
    p.add_argument("--to", required=True, help="dataset folder or gene-list file")
    p.add_argument("--out", required=True, help="output folder")
    FLAGS.add_to(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset this tool wrote at --out (nothing else)",
    )
    return add_console_flags(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args)
    config = FLAGS.apply(args, ConversionConfig())
    try:
        genes, name = target_genes(args.to)
        rewrite_onto(
            args.dataset,
            genes,
            args.out,
            target_name=name,
            min_overlap=config.align_min_overlap,
            overwrite=args.overwrite,
            inputs=[args.to],
            command=sys.argv if argv is None else argv,
            log=log_line,
        )
    except (DataError, OSError) as error:
        return report_error(error)
    print_next("python", "tfrecords_tools/verify.py", args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
