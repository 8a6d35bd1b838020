"""Pre-train an MLP encoder on gene expression with SCARF, VIME or BYOL.

Usage:

    # SCARF on the built-in synthetic-tcga data (converted once into the cache folder):
    python scripts/pretrain.py --method scarf

    # BYOL on a converted dataset, 50 epochs, into a chosen run folder:
    python scripts/pretrain.py --method byol --data data/tcga --epochs 50 \
        --out runs/byol-tcga

    # A preset file (a JSON config, or another run's config.json) and one override:
    python scripts/pretrain.py --method vime --config preset.json --alpha 1.0

    # Continue a run after a crash or a preemption (its own settings are reused):
    python scripts/pretrain.py --method byol --out runs/byol-tcga --resume

    # The pre-training-size experiment: 10% of the pre-training split, seed 3:
    python scripts/pretrain.py --method scarf --pretrain-fraction 0.1 --seed 3

Writes into --out (default `runs/<method>`, or `runs/<method>-2`, `-3`, ... when
taken; the last line printed is the fine-tuning command for it): `encoder.keras` (the
kept encoder), `config.json` (resolved settings), `history.csv`, `summary.json`, TensorBoard
logs (`tensorboard --logdir RUN_DIR`) and `checkpoints/`. Defaults of every setting
come from `keras_ssrl.config.PretrainConfig`; explicit flags override `--config`, which
overrides those defaults (and, with --resume, the run's saved settings).

Every setting, the data and the run folder are checked before anything is written: a
refused command leaves no trace. A new run needs a new or empty --out; one process at a
time per run folder (a second one is refused, naming the first one's PID).

Exit status: 0 done (also when a SIGTERM arrives once training has finished); 1 the
loss became NaN or inf (the step is named), or a shard of the dataset is damaged (it is
named); 2 bad arguments, data or run folder; 143 stopped by SIGTERM after writing a
checkpoint (rerun with --resume to continue).
"""

from __future__ import annotations

import argparse
import json
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
from keras_ssrl.config import (  # noqa: E402
    EMA_SCHEDULES,
    KEEP,
    PRECISIONS,
    ConfigError,
    PretrainConfig,
    config_from_dict,
)
from keras_ssrl.data.errors import DamagedDataError, DataError  # noqa: E402
from keras_ssrl.methods import METHODS  # noqa: E402
from keras_ssrl.runs import (  # noqa: E402
    CONFIG_JSON,
    RunDirError,
    free_run_dir,
    load_run_config,
)
from keras_ssrl.training import (  # noqa: E402
    CACHE_MODES,
    DEFAULT_CHECKPOINT_EVERY,
    DISTRIBUTE,
    NonFiniteLossError,
    TrainingInterrupted,
    join_processes,
    run_pretraining,
)

EXIT_SIGTERM = 143  # 128 + SIGTERM: schedulers see that the job did not finish

# The settings flags; their defaults are PretrainConfig's, shown in --help.
FLAGS = FlagTable(
    PretrainConfig,
    [
        Flag("--epochs", "epochs", int, "passes over the pre-training split"),
        Flag("--batch-size", "batch_size", int, "global batch size"),
        Flag("--learning-rate", "learning_rate", float, "Adam learning rate"),
        Flag("--layers", "encoder.layers", int, "encoder blocks"),
        Flag("--width", "encoder.width", int, "encoder width (embedding size)"),
        Flag("--dropout", "encoder.dropout", float, "dropout after each encoder block"),
        Flag("--seed", "seed", int, "seed of weights, corruption, data order, subset"),
        Flag(
            "--pretrain-fraction",
            "pretrain_fraction",
            float,
            "fraction q of the pre-training split used",
        ),
        Flag("--precision", "precision", str, "dtype policy", choices=PRECISIONS),
        Flag(
            "--keep", "keep", str, "encoder kept: last or best val loss", choices=KEEP
        ),
        Flag(
            "--corruption-rate",
            "{method}.corruption_rate",
            float,
            "SCARF's corruption rate c, or BYOL's view corruption p",
            methods=("scarf", "byol"),
        ),
        Flag(
            "--temperature",
            "scarf.temperature",
            float,
            "InfoNCE temperature",
            methods=("scarf",),
        ),
        Flag(
            "--alpha",
            "vime.alpha",
            float,
            "weight of the feature loss",
            methods=("vime",),
        ),
        Flag(
            "--mask-rate",
            "vime.mask_rate",
            float,
            "mask probability p_m",
            methods=("vime",),
        ),
        Flag("--ema-base", "byol.ema_base", float, "lambda_base", methods=("byol",)),
        Flag(
            "--ema-schedule",
            "byol.ema_schedule",
            str,
            "EMA schedule",
            choices=EMA_SCHEDULES,
            methods=("byol",),
        ),
        Flag(
            "--symmetric",
            "byol.symmetric",
            bool,
            "add the swapped loss term",
            methods=("byol",),
        ),
    ],
)
# --progress choices as Keras `fit` verbosities ("auto": decided by the training loop).
PROGRESS = {"auto": "auto", "bar": 1, "epoch": 2, "none": 0}
# Flags of run options (not config fields) that a `ConfigError.field` may name.
OPTION_FLAGS = {"checkpoint_every": "--checkpoint-every"}


def flag_of(field: str | None) -> str | None:
    """The command-line flag that sets config path (or run option) `field`."""
    return FLAGS.flag_of(field) or OPTION_FLAGS.get(field)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (head -40 scripts/pretrain.py) for examples.",
    )
    p.add_argument(
        "--method", required=True, choices=METHODS, help="pre-training method"
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="converted dataset folder (default: built-in synthetic-tcga)",
    )
    p.add_argument(
        "--out",
        metavar="RUN_DIR",
        help="run folder, new or empty (default: runs/<method>, or runs/<method>-2, "
        "-3, ... when that one is taken)",
    )
    p.add_argument(
        "--config",
        metavar="FILE.json",
        help="preset: a JSON config (or a run's config.json); flags override it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete checkpoint",
    )
    FLAGS.add_to(p)
    p.add_argument(
        "--distribute",
        choices=DISTRIBUTE,
        default="none",
        help="data-parallel: the global batch split over every device (GPUs; with "
        "KERAS_BACKEND=jax, every device of every host); mirrored is TensorFlow's "
        "older name for it (default: %(default)s)",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="auto",
        help="device: keep the standardised split on the accelerator and gather "
        "batches there (falls back to streaming when it does not fit); auto: so "
        "under KERAS_BACKEND=jax on a GPU when it fits; none: stream from the host "
        "(default: %(default)s)",
    )
    hosts = p.add_argument_group(
        "multi-host (KERAS_BACKEND=jax, with --distribute data-parallel)"
    )
    hosts.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0; every process of the run passes the same one",
    )
    hosts.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="number of processes (hosts) in the run",
    )
    hosts.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        help="this process's index, 0 to N-1 (Slurm and other clusters are "
        "detected when these three are omitted and --multi-host is given)",
    )
    hosts.add_argument(
        "--multi-host",
        action="store_true",
        help="join a multi-host run (implied by --coordinator)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULT_CHECKPOINT_EVERY,
        metavar="STEPS",
        help="checkpoint period in steps, besides every epoch end (0: epoch ends "
        "only; default: %(default)s)",
    )
    p.add_argument(
        "--progress",
        choices=tuple(PROGRESS),
        default="auto",
        help="Keras progress: a bar, a line per epoch, or none; auto is a bar on a "
        "terminal, else a line per epoch, none with --quiet (default: %(default)s)",
    )
    return add_console_flags(p)


def resolve_config(args, p: argparse.ArgumentParser) -> PretrainConfig:
    """Defaults <- saved run (with --resume) <- --config file <- explicit flags."""
    config = PretrainConfig()
    if args.resume and args.out:
        saved = load_run_config(args.out)
        if saved is not None:
            try:
                config = config_from_dict(saved)
            except ConfigError as error:
                raise RunDirError(
                    f"{os.path.join(args.out, CONFIG_JSON)}: not a pre-training "
                    f"run's configuration ({error})"
                ) from None
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as handle:
                config = config_from_dict(json.load(handle))
        except (OSError, ValueError, TypeError) as error:
            p.error(f"--config {args.config}: {error}")
    config.method = args.method
    try:
        return FLAGS.apply(args, config, method=args.method)
    except ValueError as error:  # a flag of another method
        p.error(str(error))


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    log = setup_logging(args)
    if args.resume and not args.out:
        p.error("--resume needs --out RUN_DIR (the run to continue)")
    if args.multi_host or args.coordinator:
        if not args.out:
            p.error("a multi-host run needs --out RUN_DIR (the same on every process)")
        try:
            index, count = join_processes(
                args.coordinator, args.num_processes, args.process_id
            )
        except ConfigError as error:
            p.error(str(error))
        if index > 0:
            # Every process holds the same model; process 0 writes RUN_DIR, the
            # others their own copy beside it (the folders never collide).
            args.out = f"{args.out.rstrip(os.sep)}.process-{index}"
        log.info(f"process {index} of {count}; run folder {args.out}")
    out = args.out or free_run_dir(os.path.join("runs", args.method))
    progress = PROGRESS[args.progress]
    if args.quiet and args.progress == "auto":
        progress = 0
    try:
        config = resolve_config(args, p)
        run_pretraining(
            config,
            args.data,
            out,
            resume=args.resume,
            distribute=args.distribute,
            cache=args.cache,
            checkpoint_every=args.checkpoint_every,
            verbose=progress,
            log=log_line,
            command=sys.argv if argv is None else ["scripts/pretrain.py", *argv],
        )
    except ConfigError as error:
        flag = flag_of(error.field)
        log.error(f"{error}" + (f" ({flag})" if flag else ""))
        return 2
    except (NonFiniteLossError, DamagedDataError) as error:
        log.error(error)
        return 1
    except (DataError, RunDirError) as error:
        log.error(error)
        return 2
    except TrainingInterrupted as error:
        log.error(f"interrupted: {error}")
        return EXIT_SIGTERM
    data = ["--data", args.data] if args.data else []
    finetune = ["--encoder", out, *data, "--mode", "unfrozen", "--fraction", "0.1"]
    print_next("python", "scripts/finetune.py", *finetune)
    return 0


if __name__ == "__main__":
    run_main(main)
