"""Convert expression data into sharded TFRecords with a manifest.

Usage:

    # The built-in synthetic data (no download):
    python tfrecords_tools/convert.py --builtin synthetic-tcga --out data/synthetic-tcga

    # A CSV with samples as rows and a label column:
    python tfrecords_tools/convert.py --input expr.csv --label-column cancer_type \
        --out data/mine

    # UCSC Xena TOIL counts (already log2(x + 1)) with the phenotype file:
    python tfrecords_tools/convert.py --input tcga_gene_expected_count.gz --format xena \
        --values log2 --labels TcgaTargetGTEX_phenotype.txt \
        --label-column "primary disease or tissue" --out data/tcga

    # ARCHS4 HDF5, labels from regular-expression rules, aligned to the TCGA genes:
    python tfrecords_tools/convert.py --input human_gene_v2.latest.h5 \
        --label-rules tissue_rules.json --missing-labels unlabelled \
        --split-sizes archs4 --align-to data/tcga --out data/archs4

    # GDC STAR counts (folder of <File ID>/<File Name> + gdc_sample_sheet*.tsv):
    python tfrecords_tools/convert.py --input gdc_download/ --out data/gdc

Writes `<split>-00000-of-000NN.tfrecord` shards for pretrain, pretrain_val, finetune,
finetune_val and test, `manifest.json` and `splits.csv` into --out. Every argument and
the --out folder are checked before anything is read or written; bad input stops with a
message naming the file, row and gene (exit 2), and leaves nothing behind. --overwrite
replaces only a dataset folder this tool wrote (nothing else inside), never a folder that
is, holds or lies inside an input.
"""

from __future__ import annotations

import os
import sys

# This folder holds a script named inspect.py: keep it (and its neighbours) from
# shadowing the standard library's `inspect`, which numpy and TensorFlow import.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_ssrl.config import (  # noqa: E402
    ARCHS4_FINETUNE_FRACTION,
    TCGA_FINETUNE_FRACTION,
    ConversionConfig,
    SplitConfig,
)
from keras_ssrl.data import DataError, convert  # noqa: E402
from keras_ssrl.data.align import target_genes  # noqa: E402
from keras_ssrl.data.builtin import BUILTIN, builtin_source  # noqa: E402
from keras_ssrl.data.convert import validate_config  # noqa: E402
from keras_ssrl.data.errors import report_error  # noqa: E402
from keras_ssrl.data.output import check_output  # noqa: E402
from keras_ssrl.data.sources import FORMATS, open_source  # noqa: E402

SIZE_PRESETS = {"tcga": TCGA_FINETUNE_FRACTION, "archs4": ARCHS4_FINETUNE_FRACTION}


def size(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("sizes are >= 0")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    defaults = ConversionConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("input")
    what = src.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="expression file, or a GDC folder")
    what.add_argument("--builtin", choices=BUILTIN, help="built-in synthetic data")
    src.add_argument("--format", default="auto", choices=FORMATS)
    src.add_argument("--labels", help="label file joined on sample id")
    src.add_argument("--label-column", help="label column (in --labels or the table)")
    src.add_argument("--sample-column", help="sample-id column of the table")
    src.add_argument("--labels-sample-column", help="sample-id column of --labels")
    orient = src.add_mutually_exclusive_group()
    orient.add_argument(
        "--genes-as-rows",
        dest="genes_as_rows",
        action="store_true",
        default=None,
        help="the table has one row per gene",
    )
    orient.add_argument(
        "--samples-as-rows",
        dest="genes_as_rows",
        action="store_false",
        help="the table has one row per sample",
    )
    src.add_argument(
        "--values",
        default=defaults.values,
        choices=("counts", "tpm", "log2"),
        help="what the file holds; log2 = already log-transformed",
    )
    src.add_argument(
        "--transform",
        default=defaults.transform,
        choices=("log2p1", "log1p", "cpm_log2p1", "none"),
    )
    src.add_argument(
        "--gene-id",
        default="auto",
        choices=("auto", "ensembl", "symbol"),
        help="ARCHS4: which gene ids to use",
    )
    src.add_argument("--label-rules", help="ARCHS4: (label, regex) rules file")
    src.add_argument(
        "--rule-fields",
        default="source_name_ch1,characteristics_ch1,title",
        help="ARCHS4: comma-separated meta/samples fields the rules search",
    )
    src.add_argument(
        "--gdc-column",
        default="unstranded",
        help="GDC: count column (tpm_unstranded with --values tpm)",
    )
    src.add_argument(
        "--sample-sheet", help="GDC: sample sheet (default: in the folder)"
    )
    src.add_argument("--n-samples", type=int, help="--builtin: number of samples")
    src.add_argument("--n-genes", type=int, help="--builtin: number of genes")

    pol = p.add_argument_group("policies (every choice is counted in the manifest)")
    pol.add_argument(
        "--duplicate-genes",
        default=defaults.duplicate_genes,
        choices=("error", "sum", "mean", "first", "unique"),
    )
    pol.add_argument(
        "--missing-values",
        default=defaults.missing_values,
        choices=("error", "zero", "drop-genes"),
    )
    pol.add_argument(
        "--missing-labels",
        default=defaults.missing_labels,
        choices=("error", "unlabelled", "drop"),
    )
    pol.add_argument(
        "--drop-small-classes",
        action="store_true",
        help="leave out classes too small to stratify (else an error)",
    )
    pol.add_argument(
        "--keep-gene-versions",
        action="store_true",
        help="keep Ensembl version suffixes",
    )
    pol.add_argument("--keep-par-y", action="store_true", help="keep _PAR_Y rows")
    pol.add_argument(
        "--align-to",
        help="dataset folder or gene-list file: keep only its genes, in its order",
    )
    pol.add_argument(
        "--min-overlap",
        type=float,
        default=defaults.align_min_overlap,
        help="refuse an alignment matching fewer target genes",
    )

    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output folder")
    out.add_argument("--overwrite", action="store_true")
    out.add_argument("--shards", type=int, default=defaults.shards)
    out.add_argument(
        "--record-dtype", default=defaults.record_dtype, choices=("float16", "float32")
    )
    out.add_argument(
        "--block-size",
        type=int,
        default=defaults.block_size,
        help="samples read at a time (bounds memory; default: ~64 MiB of float32)",
    )
    out.add_argument("--seed", type=int, default=0, help="split (and --builtin) seed")
    out.add_argument(
        "--split-sizes",
        choices=tuple(SIZE_PRESETS),
        default="tcga",
        help="preset fine-tuning/test fractions of the paper's datasets",
    )
    out.add_argument(
        "--finetune-size",
        type=size,
        help="fraction or count of labelled samples for fine-tuning",
    )
    out.add_argument(
        "--test-size",
        type=size,
        help="fraction or count for the test set (default: = fine-tuning)",
    )
    out.add_argument("--val-fraction", type=float, default=SplitConfig.val_fraction)
    out.add_argument("--min-class-size", type=int, default=SplitConfig.min_class_size)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    split = SplitConfig(
        finetune_size=(
            args.finetune_size
            if args.finetune_size is not None
            else SIZE_PRESETS[args.split_sizes]
        ),
        test_size=args.test_size,
        val_fraction=args.val_fraction,
        min_class_size=args.min_class_size,
        drop_small_classes=args.drop_small_classes,
        seed=args.seed,
    )
    config = ConversionConfig(
        values=args.values,
        transform=args.transform,
        record_dtype=args.record_dtype,
        shards=args.shards,
        block_size=args.block_size,
        duplicate_genes=args.duplicate_genes,
        strip_versions=not args.keep_gene_versions,
        par_y="keep" if args.keep_par_y else "drop",
        missing_values=args.missing_values,
        missing_labels=args.missing_labels,
        align_min_overlap=args.min_overlap,
        split=split,
    )
    inputs = [
        args.input,
        args.labels,
        args.label_rules,
        args.sample_sheet,
        args.align_to,
    ]
    try:
        # Refuse bad settings and output folders before reading (or writing) anything.
        validate_config(config)
        check_output(args.out, args.overwrite, inputs)
        align, align_name = (None, "target")
        if args.align_to:
            align, align_name = target_genes(args.align_to)
        if args.builtin:
            source = builtin_source(
                args.builtin, args.n_samples, args.n_genes, args.seed
            )
            report = {"format": "builtin"}
        else:
            source, report = open_source(
                args.input,
                args.format,
                labels=args.labels,
                label_column=args.label_column,
                sample_column=args.sample_column,
                labels_sample_column=args.labels_sample_column,
                genes_as_rows=args.genes_as_rows,
                gene_id=args.gene_id,
                label_rules=args.label_rules,
                rule_fields=tuple(f for f in args.rule_fields.split(",") if f),
                gdc_column=args.gdc_column,
                sample_sheet=args.sample_sheet,
            )
        print(
            f"read {source.path}: {source.n_samples} samples x {source.n_genes} genes"
        )
        for key, value in report.items():
            print(f"  {key}: {value}")
        convert(
            source,
            args.out,
            config,
            align_to=align,
            align_name=align_name,
            extra_report=report,
            command=sys.argv if argv is None else argv,
            overwrite=args.overwrite,
            inputs=inputs,
        )
    except (DataError, OSError) as error:
        return report_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
