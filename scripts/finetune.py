"""Fine-tune a pre-trained encoder (or the non-pre-trained baseline) on labelled data.

Usage:

    # Fine-tune a SCARF encoder, unfrozen, on 10% of the labelled training split:
    python scripts/finetune.py --encoder runs/scarf --mode unfrozen --fraction 0.1

    # The same architecture from random initialisation (the baseline):
    python scripts/finetune.py --baseline --fraction 0.1 --out runs/baseline-p0.1

    # Frozen encoder (only the head is trained), on another converted dataset:
    python scripts/finetune.py --encoder runs/byol --mode frozen --data data/tcga

Writes into --out (default `runs/finetune-<method>-<mode>-p<p>-<date>-<time>`):
`classifier.keras` (encoder + linear head producing logits; `export/export_model.py`
serves it), `config.json`, `history.csv` and `metrics.json` (test accuracy, balanced
accuracy, macro-F1, confusion matrix). Defaults (Adam 1e-4, batch 8, at most 100 epochs,
early stopping with patience 30 restoring the best epoch) come from
`keras_ssrl.config.FinetuneConfig`.

Every setting, the encoder run, the data and --out are checked before training starts,
and nothing is written before then: a refused command leaves no trace. --out must be new
or empty; one process at a time per folder (a second one is refused, naming the first
one's PID). Fine-tuning needs at least 2 classes; a test split too small to measure
much (fewer than 30 samples, or 5 of a class) is warned about on stderr.

Exit status: 0 done; 1 the loss became NaN or inf, or a shard of the dataset is damaged
(it is named); 2 bad arguments, data or folders.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_ssrl.config import EncoderConfig, FinetuneConfig  # noqa: E402
from keras_ssrl.data.errors import DamagedDataError, DataError  # noqa: E402
from keras_ssrl.finetuning import MODES, FinetuneError, finetune  # noqa: E402

DEFAULTS = FinetuneConfig()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", metavar="RUN_DIR", help="a pre-training run")
    source.add_argument(
        "--baseline",
        action="store_true",
        help="random initialisation (no pre-training)",
    )
    p.add_argument("--mode", choices=MODES, default=DEFAULTS.mode)
    p.add_argument(
        "--data",
        help="converted, labelled dataset (default: the encoder's dataset, or the "
        "built-in synthetic-tcga)",
    )
    p.add_argument("--fraction", type=float, default=DEFAULTS.fraction, help="p")
    p.add_argument("--repeat", type=int, default=DEFAULTS.repeat)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--out", help="output folder")
    p.add_argument("--learning-rate", type=float, default=DEFAULTS.learning_rate)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--max-epochs", type=int, default=DEFAULTS.max_epochs)
    p.add_argument("--patience", type=int, default=DEFAULTS.patience)
    p.add_argument(
        "--layers", type=int, default=EncoderConfig.layers, help="baseline depth"
    )
    p.add_argument(
        "--width", type=int, default=EncoderConfig.width, help="baseline width"
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.baseline and args.mode == "frozen":
        p.error("the baseline is trained end to end; --mode frozen needs --encoder")
    config = FinetuneConfig(
        mode=args.mode,
        fraction=args.fraction,
        repeat=args.repeat,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        patience=args.patience,
        seed=args.seed,
    )
    method = "baseline" if args.baseline else "encoder"
    out = args.out or os.path.join(
        "runs",
        f"finetune-{method}-{args.mode}-p{args.fraction:g}-"
        f"{datetime.datetime.now():%Y%m%d-%H%M%S}",
    )

    def log(line: str) -> None:
        if line.startswith("warning:"):
            print(line, file=sys.stderr)
        # --quiet drops the per-epoch lines, keeps the summary.
        elif not (args.quiet and line.startswith("epoch")):
            print(line)

    try:
        finetune(
            args.data,
            out,
            encoder_run=args.encoder,
            config=config,
            encoder_config=EncoderConfig(layers=args.layers, width=args.width),
            log=log,
            command=sys.argv if argv is None else ["scripts/finetune.py", *argv],
        )
    except (FloatingPointError, DamagedDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (FinetuneError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
