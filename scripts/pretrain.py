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

Writes into --out (default `runs/<method>-<date>-<time>`): `encoder.keras` (the kept
encoder), `config.json` (resolved settings), `history.csv`, `summary.json`, TensorBoard
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
import datetime
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_ssrl.config import PretrainConfig  # noqa: E402
from keras_ssrl.data.errors import DamagedDataError, DataError  # noqa: E402
from keras_ssrl.methods import METHODS  # noqa: E402
from keras_ssrl.training import (  # noqa: E402
    DEFAULT_CHECKPOINT_EVERY,
    DISTRIBUTE,
    KEEP,
    PRECISIONS,
    ConfigError,
    NonFiniteLossError,
    RunDirError,
    TrainingInterrupted,
    config_from_dict,
    load_run_config,
    run_pretraining,
)

EXIT_SIGTERM = 143  # 128 + SIGTERM: schedulers see that the job did not finish
DEFAULTS = PretrainConfig()

# flag dest -> (config path, methods it applies to or None for all)
FLAGS = {
    "epochs": ("epochs", None),
    "batch_size": ("batch_size", None),
    "learning_rate": ("learning_rate", None),
    "seed": ("seed", None),
    "pretrain_fraction": ("pretrain_fraction", None),
    "precision": ("precision", None),
    "keep": ("keep", None),
    "layers": ("encoder.layers", None),
    "width": ("encoder.width", None),
    "dropout": ("encoder.dropout", None),
    "temperature": ("scarf.temperature", ("scarf",)),
    "alpha": ("vime.alpha", ("vime",)),
    "mask_rate": ("vime.mask_rate", ("vime",)),
    "ema_base": ("byol.ema_base", ("byol",)),
    "ema_schedule": ("byol.ema_schedule", ("byol",)),
    "symmetric": ("byol.symmetric", ("byol",)),
}


def flag_of(field: str | None) -> str | None:
    """The command-line flag that sets config path `field`, if there is one."""
    if field is None:
        return None
    if field.endswith(".corruption_rate"):
        return "--corruption-rate"
    for dest, (path, _) in FLAGS.items():
        if path == field:
            return "--" + dest.replace("_", "-")
    if field == "checkpoint_every":
        return "--checkpoint-every"
    return None


def default(path: str):
    value = DEFAULTS
    for part in path.split("."):
        value = getattr(value, part)
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (head -40 scripts/pretrain.py) for examples.",
    )
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument(
        "--data",
        metavar="DIR",
        help="converted dataset folder (default: built-in synthetic-tcga)",
    )
    p.add_argument(
        "--out", metavar="RUN_DIR", help="run folder (default: runs/<method>-<time>)"
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

    def flag(name, dest, kind, help_text, **kwargs):
        p.add_argument(
            name,
            dest=dest,
            type=kind,
            default=None,
            help=f"{help_text} (default: {default(FLAGS[dest][0])})",
            **kwargs,
        )

    flag("--epochs", "epochs", int, "passes over the pre-training split")
    flag("--batch-size", "batch_size", int, "global batch size")
    flag("--learning-rate", "learning_rate", float, "Adam learning rate")
    flag("--layers", "layers", int, "encoder blocks")
    flag("--width", "width", int, "encoder width (embedding size)")
    flag("--dropout", "dropout", float, "dropout after each encoder block")
    flag("--seed", "seed", int, "seed of weights, corruption, data order, subset")
    flag(
        "--pretrain-fraction",
        "pretrain_fraction",
        float,
        "fraction q of the pre-training split used",
    )
    flag("--precision", "precision", str, "dtype policy", choices=PRECISIONS)
    flag("--keep", "keep", str, "encoder kept: last or best val loss", choices=KEEP)
    p.add_argument(
        "--corruption-rate",
        type=float,
        default=None,
        help="SCARF's corruption rate c, or BYOL's view corruption p (default: "
        f"{DEFAULTS.scarf.corruption_rate} / {DEFAULTS.byol.corruption_rate})",
    )
    flag("--temperature", "temperature", float, "SCARF InfoNCE temperature")
    flag("--alpha", "alpha", float, "VIME weight of the feature loss")
    flag("--mask-rate", "mask_rate", float, "VIME mask probability p_m")
    flag("--ema-base", "ema_base", float, "BYOL lambda_base")
    flag(
        "--ema-schedule",
        "ema_schedule",
        str,
        "BYOL EMA schedule",
        choices=("cosine", "constant"),
    )
    p.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"BYOL: add the swapped loss term (default: {DEFAULTS.byol.symmetric})",
    )
    p.add_argument("--distribute", choices=DISTRIBUTE, default="none")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULT_CHECKPOINT_EVERY,
        metavar="STEPS",
        help="checkpoint period in steps, besides every epoch end (0: epoch ends "
        "only; default: %(default)s)",
    )
    p.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="Keras progress: 1 a bar, 2 a line per epoch, 0 none (default: auto)",
    )
    return p


def set_path(config: PretrainConfig, path: str, value) -> None:
    *parents, name = path.split(".")
    target = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)


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
                    f"{os.path.join(args.out, 'config.json')}: not a pre-training "
                    f"run's configuration ({error})"
                ) from None
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as handle:
                config = config_from_dict(json.load(handle))
        except (OSError, ValueError, TypeError) as error:
            p.error(f"--config {args.config}: {error}")
    config.method = args.method
    for dest, (path, methods) in FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if methods and args.method not in methods:
            p.error(
                f"--{dest.replace('_', '-')} applies to {', '.join(methods)}, not "
                f"{args.method}"
            )
        set_path(config, path, value)
    if args.corruption_rate is not None:
        if args.method == "vime":
            p.error(
                "--corruption-rate applies to scarf and byol; VIME uses --mask-rate"
            )
        set_path(config, f"{args.method}.corruption_rate", args.corruption_rate)
    return config


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.resume and not args.out:
        p.error("--resume needs --out RUN_DIR (the run to continue)")
    out = args.out or os.path.join(
        "runs", f"{args.method}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    try:
        config = resolve_config(args, p)
        run_pretraining(
            config,
            args.data,
            out,
            resume=args.resume,
            distribute=args.distribute,
            checkpoint_every=args.checkpoint_every,
            verbose="auto" if args.verbose is None else args.verbose,
            command=sys.argv if argv is None else ["scripts/pretrain.py", *argv],
        )
    except ConfigError as error:
        flag = flag_of(error.field)
        print(f"error: {error}" + (f" ({flag})" if flag else ""), file=sys.stderr)
        return 2
    except (NonFiniteLossError, DamagedDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (DataError, RunDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return EXIT_SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
