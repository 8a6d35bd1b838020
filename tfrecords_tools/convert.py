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

import argparse
import sys

from keras_ssrl.cli import quiet_native_logs, run_main

quiet_native_logs()  # before anything below imports tensorflow

from keras_ssrl.cli import (  # noqa: E402
    Flag,
    FlagTable,
    add_console_flags,
    add_orientation_flags,
    log_line,
    print_next,
    setup_logging,
)
from keras_ssrl.config import (  # noqa: E402
    SPLIT_PRESETS,
    ConversionConfig,
    SplitConfig,
)
from keras_ssrl.data import DataError, convert  # noqa: E402
from keras_ssrl.data.align import target_genes  # noqa: E402
from keras_ssrl.data.builtin import BUILTIN, builtin_source  # noqa: E402
from keras_ssrl.data.errors import report_error  # noqa: E402
from keras_ssrl.data.genes import DUPLICATE_POLICIES  # noqa: E402
from keras_ssrl.data.labels import MISSING_LABEL_POLICIES  # noqa: E402
from keras_ssrl.data.output import check_output  # noqa: E402
from keras_ssrl.data.preprocessing import TRANSFORMS, VALUE_KINDS  # noqa: E402
from keras_ssrl.data.schema import RECORD_DTYPES  # noqa: E402
from keras_ssrl.data.sources import (  # noqa: E402
    DEFAULT_RULE_FIELDS,
    FORMATS,
    open_source,
)
from keras_ssrl.data.validation import (  # noqa: E402
    MISSING_VALUE_POLICIES,
    validate_config,
)

SIZE_PRESETS = SPLIT_PRESETS  # tcga, archs4, cohort (one labelled cohort)


def size(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("sizes are >= 0")
    return value


# The settings flags, by argument group; their defaults are ConversionConfig's.
INPUT_FLAGS = FlagTable(
    ConversionConfig,
    [
        Flag(
            "--values",
            "values",
            help="what the file holds; log2 = already log-transformed",
            choices=VALUE_KINDS,
        ),
        Flag(
            "--transform",
            "transform",
            help="applied to counts / TPM before storing",
            choices=TRANSFORMS,
        ),
    ],
)
POLICY_FLAGS = FlagTable(
    ConversionConfig,
    [
        Flag(
            "--duplicate-genes",
            "duplicate_genes",
            help="rows with the same gene id: an error, or how to merge them",
            choices=DUPLICATE_POLICIES,
        ),
        Flag(
            "--missing-values",
            "missing_values",
            help="NaN / NA cells: an error, set to 0, or drop their genes",
            choices=MISSING_VALUE_POLICIES,
        ),
        Flag(
            "--missing-labels",
            "missing_labels",
            help="samples without a label: an error, pre-training only, or dropped",
            choices=MISSING_LABEL_POLICIES,
        ),
        Flag(
            "--drop-small-classes",
            "split.drop_small_classes",
            bool,
            "leave out classes too small to stratify (else an error)",
        ),
        Flag(
            "--min-overlap",
            "align_min_overlap",
            float,
            "refuse an alignment matching fewer target genes",
        ),
    ],
)
OUTPUT_FLAGS = FlagTable(
    ConversionConfig,
    [
        Flag("--shards", "shards", int, "shards of the largest split"),
        Flag(
            "--record-dtype",
            "record_dtype",
            help="how records store the values",
            choices=RECORD_DTYPES,
        ),
        Flag(
            "--block-size",
            "block_size",
            int,
            "samples read at a time, which bounds memory (None: about 64 MiB of "
            "float32)",
        ),
        Flag("--seed", "split.seed", int, "split (and --builtin) seed"),
        Flag(
            "--finetune-size",
            "split.finetune_size",
            size,
            "fraction or count of labelled samples for fine-tuning (overrides "
            "--split-sizes)",
        ),
        Flag(
            "--test-size",
            "split.test_size",
            size,
            "fraction or count for the test set (overrides --split-sizes, whose tcga and "
            "archs4 presets take the fine-tuning size and cohort 0.3)",
        ),
        Flag(
            "--val-fraction",
            "split.val_fraction",
            float,
            "fraction of pre-training and of fine-tuning held out for validation",
        ),
        Flag(
            "--min-class-size",
            "split.min_class_size",
            int,
            "smallest class that can be stratified into every split",
        ),
    ],
)
FLAG_TABLES = (INPUT_FLAGS, POLICY_FLAGS, OUTPUT_FLAGS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("input")
    what = src.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="expression file, or a GDC folder")
    what.add_argument("--builtin", choices=BUILTIN, help="built-in synthetic data")
    src.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="input format (default: auto, from the name)",
    )
    src.add_argument("--labels", help="label file joined on sample id")
    src.add_argument("--label-column", help="label column (in --labels or the table)")
    src.add_argument("--sample-column", help="sample-id column of the table")
    src.add_argument("--labels-sample-column", help="sample-id column of --labels")
    add_orientation_flags(src)
    INPUT_FLAGS.add_to(src)
    src.add_argument(
        "--gene-id",
        default="auto",
        choices=("auto", "ensembl", "symbol"),
        help="ARCHS4: which gene ids to use (default: auto)",
    )
    src.add_argument("--label-rules", help="ARCHS4: (label, regex) rules file")
    src.add_argument(
        "--rule-fields",
        default=",".join(DEFAULT_RULE_FIELDS),
        help="ARCHS4: comma-separated meta/samples fields the rules search "
        "(default: %(default)s)",
    )
    src.add_argument(
        "--gdc-column",
        default="unstranded",
        help="GDC: count column (tpm_unstranded with --values tpm; default: "
        "%(default)s)",
    )
    src.add_argument(
        "--sample-sheet", help="GDC: sample sheet (default: in the folder)"
    )
    src.add_argument("--n-samples", type=int, help="--builtin: number of samples")
    src.add_argument("--n-genes", type=int, help="--builtin: number of genes")

    pol = p.add_argument_group("policies (every choice is counted in the manifest)")
    POLICY_FLAGS.add_to(pol)
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

    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output folder")
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset this tool wrote at --out (nothing else)",
    )
    OUTPUT_FLAGS.add_to(out)
    out.add_argument(
        "--split-sizes",
        choices=tuple(SIZE_PRESETS),
        default="tcga",
        help="preset fine-tuning/test fractions: the paper's tcga or archs4 ratios, "
        "or cohort for one labelled cohort of 100-300 samples (50%% fine-tuning, 30%% "
        "test; docs/small-cohorts.md) (default: %(default)s)",
    )
    return add_console_flags(p)


def conversion_config(args: argparse.Namespace) -> ConversionConfig:
    """Defaults <- the --split-sizes preset <- the flags given."""
    config = ConversionConfig(
        split=SplitConfig(**SIZE_PRESETS[args.split_sizes])
    )
    for table in FLAG_TABLES:
        table.apply(args, config)
    if args.keep_gene_versions:
        config.strip_versions = False
    if args.keep_par_y:
        config.par_y = "keep"
    return config


def open_input(args: argparse.Namespace, seed: int):
    """The source named by --input (with its labels) or --builtin, and its report."""
    if args.builtin:
        source = builtin_source(args.builtin, args.n_samples, args.n_genes, seed)
        return source, {"format": "builtin"}
    return open_source(
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


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    log = setup_logging(args)
    config = conversion_config(args)
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
        source, report = open_input(args, config.split.seed)
        log.info(
            f"read {source.path}: {source.n_samples} samples x {source.n_genes} genes"
        )
        for key, value in report.items():
            log.info(f"  {key}: {value}")
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
            log=log_line,
        )
    except (DataError, OSError) as error:
        return report_error(error)
    print_next("python", "scripts/pretrain.py", "--method", "scarf", "--data", args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
