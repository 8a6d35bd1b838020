"""Send expression samples to an exported model (TF Serving or in-process); write CSV.

Usage:

    # A CSV of samples x genes, to TF Serving's REST API (model name ssrl):
    python export/client.py --input samples.csv --rest localhost:8501 --model-name ssrl \
        --model-dir models/ssrl --out predictions.csv

    # The same over gRPC, version 2, columns of a Parquet file with a label column:
    python export/client.py --input samples.parquet --label-column cancer_type \
        --grpc localhost:8500 --model-name ssrl --model-version 2 --model-dir models/ssrl/2

    # In-process, no server: the SavedModel called with the same inputs and outputs:
    python export/client.py --input samples.tsv --local models/ssrl --out predictions.csv

    # A converted TFRecord folder (test split), records sent as tf.train.Example:
    python export/client.py --records data/tcga --split test --local models/ssrl

Columns are matched to the model's gene list (assets/genes.txt of the export, read from
--model-dir or --local) by gene id without version suffix: missing genes are an error
that names them, extra genes are ignored and counted. The CSV holds sample_id (and the
true label with its label_id among the model's classes, from --label-column or the
records' labels), class_name, class_id and one probability column p_<class> per
class for a classifier, embedding_<i> columns for an encoder (or with --embedding).

Sample ids must be unique (duplicates are refused, naming them). --out is written
atomically and only ever replaces an earlier predictions CSV of this client: never an
input (the table, a file of the records or model folder) or another existing file.

Exit status: 0 done; 1 a damaged --records folder (a shard differs from its manifest);
2 bad arguments or input; 3 the server refused or failed.
"""

from __future__ import annotations

import argparse
import os

from keras_ssrl.cli import quiet_native_logs, run_main

quiet_native_logs()  # before anything below imports tensorflow

from keras_ssrl.cli import (  # noqa: E402
    add_console_flags,
    add_orientation_flags,
    setup_logging,
)
from keras_ssrl.data.errors import DataError, report_error  # noqa: E402
from keras_ssrl.data.genes import DUPLICATE_POLICIES  # noqa: E402
from keras_ssrl.data.schema import SPLITS, TEST  # noqa: E402
from keras_ssrl.serving import (  # noqa: E402
    DEFAULT_BATCH,
    REST_FORMS,
    GrpcModel,
    LocalModel,
    ModelInfo,
    RestModel,
    ServingError,
    check_output,
    read_record_samples,
    read_table_samples,
    run_client,
)
from keras_ssrl.serving.assets import SAVED_MODEL_PB  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (head -31 export/client.py) for examples.",
    )
    src = p.add_argument_group("samples")
    what = src.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--input", help="CSV / TSV / Parquet of samples with gene columns"
    )
    what.add_argument("--records", metavar="DATA_DIR", help="converted TFRecord folder")
    src.add_argument(
        "--split",
        default=TEST,
        choices=SPLITS,
        help="with --records: the split sent (default: %(default)s)",
    )
    src.add_argument(
        "--format",
        default="auto",
        choices=("auto", "csv", "tsv", "parquet"),
        help="--input's format (default: auto, from the name)",
    )
    src.add_argument("--sample-column", help="sample-id column (default: the first)")
    src.add_argument("--label-column", help="a label column, copied to the output")
    add_orientation_flags(src)
    src.add_argument(
        "--duplicate-genes",
        default="error",
        choices=[d for d in DUPLICATE_POLICIES if d != "unique"],
        help="how columns with the same gene id are merged (default: error)",
    )
    srv = p.add_argument_group("model")
    where = srv.add_mutually_exclusive_group(required=True)
    where.add_argument("--rest", metavar="HOST:PORT", help="TF Serving REST endpoint")
    where.add_argument("--grpc", metavar="HOST:PORT", help="TF Serving gRPC endpoint")
    where.add_argument(
        "--local", metavar="MODEL_DIR", help="call the export in-process (no server)"
    )
    srv.add_argument(
        "--model-dir",
        metavar="MODEL_DIR",
        help="the export (MODEL_BASE or a version folder, or a copy): its assets give "
        "the gene list and class names; required with --rest / --grpc",
    )
    srv.add_argument("--model-name", default="ssrl", help="TF Serving model name")
    srv.add_argument(
        "--model-version",
        type=int,
        metavar="N",
        help="model version (default: the server's, or --local's only one)",
    )
    srv.add_argument(
        "--rest-format",
        default="instances",
        choices=REST_FORMS,
        help="REST request body: row (instances) or columnar (inputs) format "
        "(default: %(default)s)",
    )
    srv.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds per request (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help="samples per request (default: %(default)s)",
    )
    p.add_argument("--embedding", action="store_true", help="also write embeddings")
    p.add_argument(
        "--out", default="predictions.csv", help="predictions CSV (default: %(default)s)"
    )
    return add_console_flags(p)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.local is None and args.model_dir is None:
        p.error("--rest / --grpc need --model-dir (the export, for its gene list)")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def local_dir(args) -> str | None:
    """--local, or its version folder MODEL_BASE/<version> when --model-version is given."""
    if (
        args.local
        and args.model_version is not None
        and not os.path.isfile(os.path.join(args.local, SAVED_MODEL_PB))
    ):
        return os.path.join(args.local, str(args.model_version))
    return args.local


def read_samples(args, info: ModelInfo):
    if args.records:
        return read_record_samples(args.records, args.split, info)
    return read_table_samples(
        args.input,
        info,
        fmt=args.format,
        sample_column=args.sample_column,
        label_column=args.label_column,
        genes_as_rows=args.genes_as_rows,
        duplicate_genes=args.duplicate_genes,
    )


def open_model(args, local: str | None):
    if local:
        return LocalModel(local)
    if args.rest:
        return RestModel(
            args.rest, args.model_name, version=args.model_version, form=args.rest_format,
            timeout=args.timeout,
        )  # fmt: skip
    return GrpcModel(
        args.grpc, args.model_name, version=args.model_version, timeout=args.timeout
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    log = setup_logging(args)
    model = None
    local = local_dir(args)
    try:
        check_output(args.out, [args.input, args.records, args.model_dir, local])
        info = ModelInfo.load(args.model_dir or local)
        samples = read_samples(args, info)
        model = open_model(args, local)
        run_client(
            model, info, samples, args.out, batch_size=args.batch_size,
            embedding=args.embedding,
        )  # fmt: skip
    except (DataError, OSError) as error:
        return report_error(error)  # 1 for a damaged dataset, else 2
    except ServingError as error:
        log.error(error)
        return 3
    finally:
        if isinstance(model, GrpcModel):
            model.close()
    return 0


if __name__ == "__main__":
    run_main(main)
