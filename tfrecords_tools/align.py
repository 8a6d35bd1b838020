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
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_ssrl.cli import Flag, FlagTable  # noqa: E402
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="the converted dataset to re-write")
    parser.add_argument("--to", required=True, help="dataset folder or gene-list file")
    parser.add_argument("--out", required=True, help="output folder")
    FLAGS.add_to(parser)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
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
        )
    except (DataError, OSError) as error:
        return report_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
