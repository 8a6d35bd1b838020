"""The paper's evaluation protocol: label efficiency, architectures, collapse, q sweep.

Usage:

    # Figure 3 on built-in data, quick grid, pre-training the three methods first:
    python scripts/evaluate.py label-efficiency --setting tcga --pretrain \
        --fractions quick --out results/tcga

    # With encoders you pre-trained, the paper's full grid (99 fractions x 5 repeats),
    # split over 4 machines, then merged:
    python scripts/evaluate.py label-efficiency --data data/tcga \
        --pretrained scarf=runs/scarf,vime=runs/vime,byol=runs/byol \
        --out results/tcga --shard 1/4          # ... 2/4, 3/4, 4/4
    python scripts/evaluate.py merge --out results/tcga

    # Figure 4: architecture sweep, and the collapse spectra of pre-trained encoders:
    python scripts/evaluate.py architectures --setting tcga --depths 2,4 --widths 256
    python scripts/evaluate.py collapse --runs scarf=runs/scarf,byol=runs/byol

    # Figure 5: pre-training set size, unfrozen fine-tuning at p = 0.1:
    python scripts/evaluate.py pretrain-size --setting tcga --sizes quick

    # Logistic regression on the standardised genes, on the same subsets:
    python scripts/evaluate.py logreg --setting tcga --fractions quick

Each sub-command writes into --out: `experiment.json` (the resolved settings),
`results.csv` (one row per run), its summary table (`aupc.csv`, `architectures.csv`,
`pretrain_size.csv` or `collapse.csv`) and a PNG figure. Rerunning the same command
resumes: finished runs are skipped. `--jobs N` runs N shards in parallel processes on
this machine and merges them. Grids `full` and `quick` are the `paper` and `quick`
presets of `keras_ssrl.config.PRESETS`.

Every argument, dataset and folder is checked before anything is written: a refused
command leaves no trace. One process writes each results table: a second one on the
same --out (and --shard) is refused, naming the first one's PID.

Exit status: 0 done; 1 damaged data; 2 bad arguments, data or folders, or --out in use;
3 merged, but runs are missing.
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
    print_next,
    setup_logging,
)
from keras_ssrl.config import (  # noqa: E402
    PRESETS,
    PRETRAIN_SIZE_FRACTION,
    FinetuneConfig,
    PretrainConfig,
)
from keras_ssrl.data.errors import report_error  # noqa: E402
from keras_ssrl.evaluation import collapse, sweeps  # noqa: E402
from keras_ssrl.evaluation.experiments import (  # noqa: E402
    DEFAULT_METHODS,
    DEFAULT_MODES,
    Experiment,
    ProtocolError,
    default_repeats,
    grid_values,
    with_encoders,
)

SWEEPS = ("label-efficiency", "architectures", "pretrain-size", "logreg")
USER_ERRORS = sweeps.USER_ERRORS
# Fine-tuning settings of every run; --seed also seeds subsets and pre-training.
FINETUNE_FLAGS = FlagTable(FinetuneConfig, [
    Flag("--batch-size", "batch_size", int, "fine-tuning batch size"),
    Flag("--learning-rate", "learning_rate", float, "fine-tuning Adam learning rate"),
    Flag("--max-epochs", "max_epochs", int, "fine-tuning epochs at most"),
    Flag("--patience", "patience", int, "early-stopping patience in epochs"),
    Flag("--seed", "seed", int, "base seed of subsets, initialisations, pre-training"),
])  # fmt: skip
PRETRAIN_FLAGS = FlagTable(PretrainConfig, [
    Flag("--pretrain-epochs", "epochs", int, "epochs of the pre-training runs started "
         "here"),
])  # fmt: skip
ENCODER_FLAGS = FlagTable(PretrainConfig, [
    Flag("--layers", "encoder.layers", int, "encoder depth (label-efficiency: the "
         "--pretrained runs' if given)"),
    Flag("--width", "encoder.width", int, "encoder width (label-efficiency: the "
         "--pretrained runs' if given)"),
])  # fmt: skip


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ProtocolError(
            f"{flag}: expected comma-separated integers, got {text!r}"
        ) from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _pairs(text: str | None, flag: str) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, _, path = (part.strip() for part in item.partition("="))
        if not name or not path:
            raise ProtocolError(f"{flag}: expected NAME=RUN_DIR, got {item!r}")
        if name in out:
            raise ProtocolError(f"{flag}: {name} is given twice")
        out[name] = os.path.abspath(path)
    return out


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _add_common(s: argparse.ArgumentParser) -> None:
    """The arguments of every sweep: data, folders, parallelism, fine-tuning."""
    s.add_argument("--setting", default="tcga",
                   choices=("tcga", "archs4", "archs4_to_tcga"),
                   help="built-in data setting (ignored with --data)")  # fmt: skip
    s.add_argument("--data", help="a converted, labelled dataset (fine-tuning)")
    s.add_argument("--pretrain-data", help="pre-training dataset (default: --data)")
    s.add_argument("--out", help="output folder (default results/<command>-<setting>)")
    s.add_argument("--repeats", type=int, help="repeats per (method, p)")
    s.add_argument("--shard", help="i/n: run only shard i of n (then merge)")
    s.add_argument("--jobs", type=int, default=1,
                   help="parallel local shards (default: %(default)s)")  # fmt: skip
    s.add_argument("--threads", type=int, help="TensorFlow threads per process")
    s.add_argument("--parallel-runs", default="auto", metavar="N",
                   help="fine-tuning runs trained together as one stacked model "
                   "(auto: the fastest on this device; 1: one at a time)")
    s.add_argument("--tensorboard", action="store_true",
                   help="write each run's loss and accuracy per epoch to "
                   "OUT/tensorboard/ (off by default: thousands of runs)")
    FINETUNE_FLAGS.add_to(s)
    PRETRAIN_FLAGS.add_to(s)
    s.add_argument(
        "--pretrain-dir",
        help="folder of the pre-training runs started here (default "
        "OUT/pretrain/<setting>); share it to share encoders",
    )


def _add_grids(s: argparse.ArgumentParser, name: str) -> None:
    """The grid arguments of one sweep (defaults: the paper's grids)."""
    kind = "label-efficiency" if name == "logreg" else name
    if name != "logreg":
        s.add_argument("--methods", default=",".join(DEFAULT_METHODS[kind]),
                       help="comma list of methods (default: %(default)s)")  # fmt: skip
    if name in ("label-efficiency", "logreg"):
        s.add_argument("--fractions", default="full",
                       help="full (0.02..1.00, 5 repeats), quick (7 values, 3 "
                       "repeats) or a comma list")  # fmt: skip
    if name == "label-efficiency":
        s.add_argument("--modes", default=",".join(DEFAULT_MODES[kind]),
                       help="comma list of fine-tuning modes (default: %(default)s)")  # fmt: skip
        s.add_argument("--pretrained", help="scarf=RUN,vime=RUN,byol=RUN")
        s.add_argument("--pretrain", action="store_true",
                       help="pre-train missing encoders into OUT/pretrain")  # fmt: skip
    if name in ("label-efficiency", "pretrain-size"):
        ENCODER_FLAGS.add_to(s)
    if name == "architectures":
        paper = PRESETS["paper"]
        s.add_argument("--depths", default=",".join(map(str, paper.depths)),
                       help="comma list of encoder depths (default: %(default)s)")  # fmt: skip
        s.add_argument("--widths", default=",".join(map(str, paper.widths)),
                       help="comma list of encoder widths (default: %(default)s)")  # fmt: skip
        s.add_argument("--fractions", default="full",
                       help="p in [0.02, 0.3]: full (step 0.01), quick or a list")  # fmt: skip
    if name == "pretrain-size":
        s.add_argument("--sizes", default="full",
                       help="q: full (Figure 5's 24 values), quick or a list")  # fmt: skip
        s.add_argument("--fraction", type=float, default=PRETRAIN_SIZE_FRACTION,
                       help="p, the labelled fraction (default: %(default)s)")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in SWEEPS:
        s = sub.add_parser(name, help=f"the {name} sweep")
        _add_common(s)
        _add_grids(s, name)
    c = sub.add_parser("collapse", help="covariance spectra of pre-trained encoders")
    c.add_argument("--runs", help="name=RUN_DIR,... pre-training runs")
    c.add_argument("--from", dest="from_dir",
                   help="a folder to search for finished pre-training runs (e.g. an "
                   "experiment's --out or --pretrain-dir)")  # fmt: skip
    c.add_argument("--data", help="dataset whose pretrain_val split is embedded")
    c.add_argument("--out", default=os.path.join("results", "collapse"),
                   help="output folder (default: %(default)s)")  # fmt: skip
    m = sub.add_parser("merge", help="join the shard tables of an experiment folder")
    m.add_argument("--out", required=True, help="the experiment folder")
    for command in (*SWEEPS, "collapse", "merge"):
        add_console_flags(sub.choices[command])
    return add_console_flags(p)


def _grids(args, kind: str) -> dict:
    """The grid fields of the experiment a sweep command asks for."""
    if kind == "pretrain-size":
        grids = {"fractions": (args.fraction,)}
        grid_name = args.sizes
    else:
        grids = {"fractions": grid_values(args.fractions, kind, "fractions",
                                          "--fractions")}  # fmt: skip
        grid_name = args.fractions
    repeats = args.repeats
    grids["repeats"] = default_repeats(grid_name) if repeats is None else repeats
    grids["pretrained"] = _pairs(getattr(args, "pretrained", None), "--pretrained")
    if kind == "architectures":
        grids["depths"] = _ints(args.depths, "--depths")
        grids["widths"] = _ints(args.widths, "--widths")
    else:
        encoder = ENCODER_FLAGS.apply(args, PretrainConfig()).encoder
        grids["depths"], grids["widths"] = (encoder.layers,), (encoder.width,)
    if kind == "pretrain-size":
        grids["pretrain_sizes"] = grid_values(args.sizes, kind, "pretrain_sizes",
                                              "--sizes")  # fmt: skip
    return grids


def experiment_of(args) -> Experiment:
    """The experiment a sweep command asks for (checked later, by `plan_sweep`)."""
    kind = "label-efficiency" if args.command == "logreg" else args.command
    finetune = FINETUNE_FLAGS.apply(args, FinetuneConfig())
    experiment = Experiment(
        kind=kind,
        setting="custom" if args.data else args.setting,
        pretrain_data=_absolute(args.pretrain_data),
        finetune_data=_absolute(args.data),
        methods=("logreg",) if args.command == "logreg" else _names(args.methods),
        # Networks of the other sweeps fine-tune unfrozen; logistic regression has
        # no mode, and its experiments have always recorded this one.
        modes=_names(args.modes)
        if args.command == "label-efficiency"
        else ("unfrozen",),
        pretrain_dir=_absolute(args.pretrain_dir),
        pretrain_epochs=PRETRAIN_FLAGS.apply(args, PretrainConfig()).epochs,
        seed=finetune.seed,
        finetune=finetune,
        **_grids(args, kind),
    )
    if args.command == "label-efficiency":
        experiment = with_encoders(experiment, pretrain=args.pretrain)
    return experiment


def _sweep(args) -> int:
    # Before TensorFlow starts: checking the data starts it.
    sweeps.set_threads(args.threads)
    shard = sweeps.parse_parallelism(args.jobs, args.shard)
    options = sweeps.SweepOptions(
        sweeps.parse_parallel_runs(args.parallel_runs), args.tensorboard
    )
    experiment = experiment_of(args)
    out = args.out or os.path.join("results", f"{args.command}-{experiment.setting}")
    plan = sweeps.plan_sweep(experiment, out, shard)
    for line in plan.notes:
        log_line("warning: " + line.removeprefix("note: "))
    code = sweeps.run_sweep(
        plan, jobs=args.jobs, threads=args.threads, log=log_line, options=options
    )
    if shard is not None:
        log_line(f"shard {args.shard} done; when every shard is:")
        print_next("python", "scripts/evaluate.py", "merge", "--out", out)
    return code


def _command(args) -> int:
    if args.command == "merge":
        return sweeps.merge_folder(args.out, log=log_line)
    if args.command == "collapse":
        runs = collapse.runs_with_found(_pairs(args.runs, "--runs"), args.from_dir)
        collapse.run_collapse(runs, args.data, args.out)
        return 0
    return _sweep(args)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args)
    try:
        return _command(args)
    except USER_ERRORS as error:
        return report_error(error)  # 1 for damaged data, else 2


if __name__ == "__main__":
    run_main(main)
