"""Fine-tune a pre-trained encoder (or the non-pre-trained baseline) on labelled data.

Usage:

    # Fine-tune a SCARF encoder, unfrozen, on 10% of the labelled training split:
    python scripts/finetune.py --encoder runs/scarf --mode unfrozen --fraction 0.1

    # The same architecture from random initialisation (the baseline):
    python scripts/finetune.py --baseline --fraction 0.1

    # Frozen encoder (only the head is trained), on another converted dataset:
    python scripts/finetune.py --encoder runs/byol --mode frozen --data data/tcga

Writes into --out (default `runs/finetune-<method>-<mode>-p<p>`, e.g.
`runs/finetune-scarf-unfrozen-p0.1`, numbered `-2`, `-3`, ... when taken; the last line
printed is the export command for it):
`classifier.keras` (encoder + linear head producing logits; `export/export_model.py`
serves it), `config.json`, `history.csv` and `metrics.json` (test accuracy, balanced
accuracy, macro-F1, confusion matrix). Training is Adam with early stopping on the
validation loss, restoring the best epoch (docs/protocol.md, "Fine-tuning"). The defaults
of every setting come from `keras_ssrl.config.FinetuneConfig`, and the baseline's
architecture from `EncoderConfig`; --help shows them.

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
import os
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
from keras_ssrl.config import EncoderConfig, FinetuneConfig  # noqa: E402
from keras_ssrl.data.errors import DamagedDataError, DataError  # noqa: E402
from keras_ssrl.finetuning import MODES, FinetuneError, finetune  # noqa: E402
from keras_ssrl.runs import RunDirError, free_run_dir, load_run_config  # noqa: E402

# The settings flags; their defaults come from the config dataclasses, shown in --help.
FLAGS = FlagTable(
    FinetuneConfig,
    [
        Flag(
            "--mode",
            "mode",
            str,
            "unfrozen: encoder and head trained; frozen: only the head (needs --encoder)",
            choices=MODES,
        ),
        Flag(
            "--fraction",
            "fraction",
            float,
            "p, the stratified fraction of the labelled training split used",
            metavar="P",
        ),
        Flag(
            "--repeat",
            "repeat",
            int,
            "index of the repeat: with --seed it fixes the subset and initialisation",
        ),
        Flag("--seed", "seed", int, "base seed of subsets and initialisation"),
        Flag("--learning-rate", "learning_rate", float, "Adam learning rate"),
        Flag("--batch-size", "batch_size", int, "samples per step"),
        Flag("--max-epochs", "max_epochs", int, "at most this many epochs"),
        Flag(
            "--patience",
            "patience",
            int,
            "early stopping: epochs without a better validation loss",
        ),
    ],
)
# The baseline's architecture (a pre-trained encoder keeps its run's).
BASELINE_FLAGS = FlagTable(
    EncoderConfig,
    [
        Flag("--layers", "layers", int, "baseline depth"),
        Flag("--width", "width", int, "baseline width"),
    ],
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", metavar="RUN_DIR", help="a pre-training run")
    source.add_argument(
        "--baseline",
        action="store_true",
        help="random initialisation (no pre-training)",
    )
    p.add_argument(
        "--data",
        help="converted, labelled dataset (default: the encoder's dataset, or the "
        "built-in synthetic-tcga)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write loss and accuracy per epoch (train, validation) to "
        "OUT/logs for TensorBoard",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output folder, new or empty (default: runs/finetune-<method>-<mode>-p<p>, "
        "or that name -2, -3, ... when taken)",
    )
    FLAGS.add_to(p.add_argument_group("fine-tuning settings"))
    BASELINE_FLAGS.add_to(p.add_argument_group("baseline architecture"))
    return add_console_flags(p)


def default_out(args, config: FinetuneConfig) -> str:
    """`runs/finetune-<method>-<mode>-p<p>`, numbered when taken.

    <method> is the encoder run's (`scarf`), or `baseline`.
    """
    method = "baseline"
    if args.encoder:
        try:
            method = (load_run_config(args.encoder) or {}).get("method") or "encoder"
        except RunDirError:  # finetune() names the problem
            method = "encoder"
    name = f"finetune-{method}-{config.mode}-p{config.fraction:g}"
    return free_run_dir(os.path.join("runs", name))


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    log = setup_logging(args)
    config = FLAGS.apply(args, FinetuneConfig())
    if args.baseline and config.mode == "frozen":
        p.error("the baseline is trained end to end; --mode frozen needs --encoder")
    out = args.out or default_out(args, config)
    try:
        finetune(
            args.data,
            out,
            encoder_run=args.encoder,
            tensorboard=args.tensorboard,
            config=config,
            encoder_config=BASELINE_FLAGS.apply(args, EncoderConfig()),
            log=log_line,
            command=sys.argv if argv is None else ["scripts/finetune.py", *argv],
        )
    except (FloatingPointError, DamagedDataError) as error:
        log.error(error)
        return 1
    except (FinetuneError, DataError) as error:
        log.error(error)
        return 2
    print_next("python", "export/export_model.py", "--run", out, "--out", "models/ssrl")
    return 0


if __name__ == "__main__":
    run_main(main)
