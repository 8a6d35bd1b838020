"""Export a trained encoder or classifier as a versioned SavedModel for TF Serving.

Usage:

    # The classifier of a fine-tuning run, as the next version of models/ssrl:
    python export/export_model.py --run runs/finetune-scarf-unfrozen-p0.1 --out models/ssrl

    # The encoder of a pre-training run, as version 3, its dataset moved to data/tcga:
    python export/export_model.py --run runs/scarf-tcga --out models/ssrl-encoder \
        --model-version 3 --data data/tcga

Writes MODEL_BASE/<version>/ (saved_model.pb, variables/, assets/ with genes.txt,
class_names.txt, manifest_sha256.txt and model_card.json) through a temporary folder
that is renamed only after the SavedModel was loaded back and compared with the Keras
model; the last line printed is the client command for it. The served graph takes
raw expression values in the model's gene order and applies the dataset's transform
and standardisation itself (export/README.md).

One export at a time per MODEL_BASE: the export locks it (MODEL_BASE/.keras_ssrl.lock)
once the run and its model have been checked, and a second export into the same base
is refused, naming the process that holds it. Temporaries `.tmp-<N>-<pid>` left in
MODEL_BASE by a killed export are removed by the next one. Existing versions are never
replaced.

A model trained under any Keras backend exports the same way: the served graph is
TensorFlow's, so this script runs Keras's TensorFlow backend whatever KERAS_BACKEND
says (a `.keras` file loads under any backend).

Exit status: 0 done; 2 bad arguments, run folder, dataset or model, or MODEL_BASE in
use by another export (nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys

# Keras fixes its backend when first imported: choose TensorFlow's before anything
# below imports Keras. (A process that already runs another backend, e.g. a test that
# imports this script under JAX, gets the export from a TensorFlow-backend child
# process instead: keras_ssrl.serving.tensorflow_process.)
REQUESTED_BACKEND = os.environ.get("KERAS_BACKEND")
PINNED_BACKEND = "keras" not in sys.modules
if PINNED_BACKEND:
    os.environ["KERAS_BACKEND"] = "tensorflow"

from keras_ssrl.cli import quiet_native_logs, run_main  # noqa: E402

quiet_native_logs()  # before anything below imports tensorflow

from keras_ssrl.cli import (  # noqa: E402
    add_console_flags,
    log_line,
    print_next,
    setup_logging,
)
from keras_ssrl.data.errors import DataError, report_error  # noqa: E402
from keras_ssrl.files import LockedError  # noqa: E402
from keras_ssrl.serving import ExportError, export_run  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (head -31 export/export_model.py) for examples.",
    )
    p.add_argument(
        "--run",
        required=True,
        metavar="RUN_DIR",
        help="a pre-training run (exports the encoder) or a fine-tuning run (exports "
        "the classifier)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="MODEL_BASE",
        help="the model's base folder (TF Serving's model_base_path); the version is "
        "written below it",
    )
    p.add_argument(
        "--model-version",
        type=int,
        default=None,
        metavar="N",
        help="version number >= 1 (default: the next integer after the largest there); "
        "an existing version is never overwritten",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="the converted dataset the run was trained on, if it moved since (default: "
        "the folder recorded in the run's config.json)",
    )
    return add_console_flags(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args)
    if PINNED_BACKEND and REQUESTED_BACKEND not in (None, "tensorflow"):
        log_line(
            f"KERAS_BACKEND={REQUESTED_BACKEND}: exporting under the TensorFlow backend "
            "(the served graph is TensorFlow's; the model file loads the same)"
        )
    try:
        export_run(
            args.run,
            args.out,
            version=args.model_version,
            data_dir=args.data,
            log=log_line,
        )
    except (ExportError, DataError, LockedError, OSError) as error:
        return report_error(error)
    print_next(
        "python", "export/client.py", "--input", "samples.csv",
        "--local", args.out, "--out", "predictions.csv",
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    run_main(main)
