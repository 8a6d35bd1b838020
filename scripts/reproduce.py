"""Reproduce the paper's experiments end to end and write a report.

Usage:

    # Every figure on the built-in synthetic TCGA-like data, reduced grids (about 25 min
    # on 2 CPU cores, pre-training included):
    python scripts/reproduce.py --setting tcga --preset quick

    # First, a few-minute check that the whole pipeline runs on your data:
    python scripts/reproduce.py --data data/tcga --preset smoke --out results/smoke

    # The paper's grids on your own converted dataset (hours to days: shard it with
    # scripts/evaluate.py ... --shard i/n on several machines instead):
    python scripts/reproduce.py --data data/tcga --preset paper --out results/paper

Runs, into --out: the three pre-training runs (`pretrain/`, shared by every experiment),
`label-efficiency/` (Figure 3), `architectures/` (Figure 4 top), `collapse/` (Figure 4
bottom), `pretrain-size/` (Figure 5), and `report.md` with the figures and tables next to
the paper's findings. The grids of each preset are `keras_ssrl.config.PRESETS`, the
sweeps `keras_ssrl.config.reproduction_plan`. Rerunning resumes every experiment where
it stopped. Every experiment's arguments, data and folders are checked before the first
one starts.
"""

from __future__ import annotations

import argparse
import os

from keras_ssrl.cli import quiet_native_logs, run_main

quiet_native_logs()  # before anything below imports tensorflow

from keras_ssrl.cli import (  # noqa: E402
    Flag,
    FlagTable,
    add_console_flags,
    log_line,
    setup_logging,
)
from keras_ssrl.config import PRESETS, FinetuneConfig, PretrainConfig  # noqa: E402
from keras_ssrl.data.errors import report_error  # noqa: E402
from keras_ssrl.evaluation.reproduction import Reproduction, reproduce  # noqa: E402
from keras_ssrl.evaluation.sweeps import USER_ERRORS  # noqa: E402

FINETUNE_FLAGS = FlagTable(FinetuneConfig, [
    Flag("--seed", "seed", int, "base seed of subsets, initialisations, pre-training"),
    Flag("--max-epochs", "max_epochs", int, "fine-tuning epochs at most (lower it for "
         "a check)"),
])  # fmt: skip
PRETRAIN_FLAGS = FlagTable(PretrainConfig, [
    Flag("--pretrain-epochs", "epochs", int, "epochs of every pre-training"),
])  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--setting",
        default="tcga",
        choices=("tcga", "archs4", "archs4_to_tcga"),
        help="built-in data setting, ignored with --data (default: %(default)s)",
    )
    p.add_argument(
        "--data", help="a converted, labelled dataset instead of built-in data"
    )
    p.add_argument("--pretrain-data", help="pre-training dataset (default: --data)")
    p.add_argument(
        "--preset",
        default="quick",
        choices=sorted(PRESETS),
        help="grids and repeats (default: %(default)s)",
    )
    p.add_argument("--out", help="output folder (default results/reproduce-<setting>)")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 4),
        help="parallel fine-tuning processes (default: the cores, at most 4; on 2 "
        "cores, 2 single-threaded processes run sweeps 1.5x faster than one)",
    )
    p.add_argument("--repeats", type=int, help="override the preset's repeats")
    FINETUNE_FLAGS.add_to(p)
    PRETRAIN_FLAGS.add_to(p)
    return add_console_flags(p)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args)
    name = "custom" if args.data else args.setting
    request = Reproduction(
        out=os.path.abspath(args.out or os.path.join("results", f"reproduce-{name}")),
        preset=args.preset,
        setting=args.setting,
        data=args.data,
        pretrain_data=args.pretrain_data,
        jobs=args.jobs,
        repeats=args.repeats,
        finetune=FINETUNE_FLAGS.apply(args, FinetuneConfig()),
        pretrain_epochs=PRETRAIN_FLAGS.apply(args, PretrainConfig()).epochs,
    )
    try:
        return reproduce(request, log=log_line)
    except USER_ERRORS as error:
        return report_error(error)  # 1 for damaged data, else 2


if __name__ == "__main__":
    run_main(main)
