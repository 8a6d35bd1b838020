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
this machine and merges them.

Every argument, dataset and folder is checked before anything is written: a refused
command leaves no trace. One process writes each results table: a second one on the
same --out (and --shard) is refused, naming the first one's PID.

Exit status: 0 done; 1 damaged data; 2 bad arguments, data or folders, or --out in use;
3 merged, but runs are missing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_ssrl import config as presets  # noqa: E402
from keras_ssrl.data.errors import DataError, report_error  # noqa: E402
from keras_ssrl.evaluation import protocol  # noqa: E402
from keras_ssrl.files import LockedError  # noqa: E402
from keras_ssrl.finetuning import FinetuneError  # noqa: E402
from keras_ssrl.training import ConfigError, RunDirError  # noqa: E402

# Set in the shard processes that --jobs starts (their parent merges).
_CHILD_ENV = "KERAS_SSRL_EVALUATE_CHILD"
SWEEPS = ("label-efficiency", "architectures", "pretrain-size", "logreg")
# What a user can cause (arguments, data, folders, a busy --out): a message, no
# traceback. An OSError is an unreadable file or an unwritable place.
USER_ERRORS = (protocol.ProtocolError, FinetuneError, DataError, ConfigError,
               RunDirError, LockedError, OSError)  # fmt: skip


def _floats(text: str, full, quick, flag: str) -> tuple[float, ...]:
    """A grid: `full`, `quick` or a comma list (ranges are checked by `validate`)."""
    if text == "full":
        return tuple(full)
    if text == "quick":
        return tuple(quick)
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise protocol.ProtocolError(
            f"{flag}: expected full, quick or comma-separated numbers, got {text!r}"
        ) from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise protocol.ProtocolError(
            f"{flag}: expected comma-separated integers, got {text!r}"
        ) from None


def _pairs(text: str | None, flag: str) -> dict[str, str]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, _, path = (part.strip() for part in item.partition("="))
        if not name or not path:
            raise protocol.ProtocolError(f"{flag}: expected NAME=RUN_DIR, got {item!r}")
        if name in out:
            raise protocol.ProtocolError(f"{flag}: {name} is given twice")
        out[name] = os.path.abspath(path)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in SWEEPS:
        s = sub.add_parser(name, help=f"the {name} sweep")
        s.add_argument("--setting", default="tcga",
                       choices=("tcga", "archs4", "archs4_to_tcga"),
                       help="built-in data setting (ignored with --data)")  # fmt: skip
        s.add_argument("--data", help="a converted, labelled dataset (fine-tuning)")
        s.add_argument("--pretrain-data", help="pre-training dataset (default: --data)")
        s.add_argument(
            "--out", help="output folder (default results/<command>-<setting>)"
        )
        s.add_argument("--repeats", type=int, help="repeats per (method, p)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--shard", help="i/n: run only shard i of n (then merge)")
        s.add_argument("--jobs", type=int, default=1, help="parallel local shards")
        s.add_argument("--threads", type=int, help="TensorFlow threads per process")
        s.add_argument(
            "--batch-size", type=int, default=presets.FinetuneConfig.batch_size
        )
        s.add_argument("--learning-rate", type=float,
                       default=presets.FinetuneConfig.learning_rate)  # fmt: skip
        s.add_argument(
            "--max-epochs", type=int, default=presets.FinetuneConfig.max_epochs
        )
        s.add_argument("--patience", type=int, default=presets.FinetuneConfig.patience)
        s.add_argument(
            "--pretrain-epochs", type=int, default=presets.PretrainConfig.epochs
        )
        s.add_argument(
            "--pretrain-dir",
            help="folder of the pre-training runs started here (default "
            "OUT/pretrain/<setting>); share it to share encoders",
        )
        if name in ("label-efficiency", "logreg"):
            s.add_argument("--fractions", default="full",
                           help="full (0.02..1.00, 5 repeats), quick (7 values, 3 "
                           "repeats) or a comma list")  # fmt: skip
        if name == "label-efficiency":
            s.add_argument("--methods", default="baseline,scarf,vime,byol,logreg")
            s.add_argument("--modes", default="frozen,unfrozen")
            s.add_argument("--pretrained", help="scarf=RUN,vime=RUN,byol=RUN")
            s.add_argument("--pretrain", action="store_true",
                           help="pre-train missing encoders into OUT/pretrain")  # fmt: skip
        if name in ("label-efficiency", "pretrain-size"):
            s.add_argument("--layers", type=int, default=presets.EncoderConfig.layers,
                           help="encoder depth (label-efficiency: default the "
                           "--pretrained runs')")  # fmt: skip
            s.add_argument("--width", type=int, default=presets.EncoderConfig.width,
                           help="encoder width (label-efficiency: default the "
                           "--pretrained runs')")  # fmt: skip
        if name == "architectures":
            s.add_argument("--methods", default="baseline,scarf,vime,byol")
            s.add_argument("--depths", default=",".join(map(str, presets.FULL_DEPTHS)))
            s.add_argument("--widths", default=",".join(map(str, presets.FULL_WIDTHS)))
            s.add_argument("--fractions", default="full",
                           help="p in [0.02, 0.3]: full (step 0.01), quick or a list")  # fmt: skip
        if name == "pretrain-size":
            s.add_argument("--methods", default="baseline,scarf,vime,byol")
            s.add_argument("--sizes", default="full",
                           help="q: full (Figure 5's 24 values), quick or a list")  # fmt: skip
            s.add_argument("--fraction", type=float, default=0.1, help="p")
    c = sub.add_parser("collapse", help="covariance spectra of pre-trained encoders")
    c.add_argument("--runs", help="name=RUN_DIR,... pre-training runs")
    c.add_argument("--from", dest="from_dir",
                   help="a folder to search for finished pre-training runs (e.g. an "
                   "experiment's --out or --pretrain-dir)")  # fmt: skip
    c.add_argument("--data", help="dataset whose pretrain_val split is embedded")
    c.add_argument("--out", default=os.path.join("results", "collapse"))
    m = sub.add_parser("merge", help="join the shard tables of an experiment folder")
    m.add_argument("--out", required=True)
    return p


def experiment_of(args) -> protocol.Experiment:
    command = args.command
    kind = "label-efficiency" if command == "logreg" else command
    aupc_low, aupc_high = presets.AUPC_RANGE
    if command in ("label-efficiency", "logreg"):
        fractions = _floats(
            args.fractions,
            presets.FULL_FRACTIONS,
            presets.QUICK_FRACTIONS,
            "--fractions",
        )
    elif command == "architectures":
        full = tuple(round(0.01 * i, 2) for i in range(2, 31))
        quick = tuple(p for p in presets.QUICK_FRACTIONS if p <= aupc_high)
        fractions = _floats(args.fractions, full, quick, "--fractions")
    else:
        fractions = (args.fraction,)
    grid = getattr(args, "fractions", None) or getattr(args, "sizes", "full")
    default_repeats = presets.QUICK_REPEATS if grid == "quick" else presets.FULL_REPEATS
    methods = (
        ("logreg",)
        if command == "logreg"
        else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    )
    experiment = protocol.Experiment(
        kind=kind,
        setting="custom" if args.data else args.setting,
        pretrain_data=os.path.abspath(args.pretrain_data)
        if args.pretrain_data
        else None,
        finetune_data=os.path.abspath(args.data) if args.data else None,
        methods=methods,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip())
        if command == "label-efficiency"
        else ("unfrozen",),
        fractions=fractions,
        repeats=default_repeats if args.repeats is None else args.repeats,
        pretrained=_pairs(getattr(args, "pretrained", None), "--pretrained"),
        pretrain_dir=os.path.abspath(args.pretrain_dir) if args.pretrain_dir else None,
        pretrain_epochs=args.pretrain_epochs,
        seed=args.seed,
        finetune=presets.FinetuneConfig(
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_epochs=args.max_epochs,
            patience=args.patience,
            seed=args.seed,
        ),
    )
    if command == "architectures":
        experiment.depths = _ints(args.depths, "--depths")
        experiment.widths = _ints(args.widths, "--widths")
    if command == "pretrain-size":
        experiment.depths, experiment.widths = (args.layers,), (args.width,)
        experiment.pretrain_sizes = _floats(
            args.sizes, presets.FULL_PRETRAIN_SIZES, (0.05, 0.2, 1.0), "--sizes"
        )
    if command == "label-efficiency":
        experiment.depths, experiment.widths = (args.layers,), (args.width,)
        if experiment.pretrained:
            layers, width = protocol.architecture_of_runs(experiment.pretrained)
            experiment.depths, experiment.widths = (layers,), (width,)
        missing = [
            m for m in methods
            if m in protocol.SSL_METHODS and m not in experiment.pretrained
        ]  # fmt: skip
        if missing and not args.pretrain:
            raise protocol.ProtocolError(
                f"no encoder for {', '.join(missing)}: pass --pretrained "
                f"{missing[0]}=RUN_DIR,... or --pretrain to pre-train them here"
            )
    return experiment


def _finished_runs(folder: str) -> list[tuple[str, str]]:
    """(name, RUN_DIR) of the finished pre-training runs under `folder` (any depth)."""
    from keras_ssrl.training import ENCODER_FILE

    found = []
    for here, dirs, files in os.walk(folder):
        dirs.sort()
        if ENCODER_FILE in files:
            found.append((os.path.basename(here), here))
            dirs[:] = []  # a run's own sub-folders hold no other runs
    return found


def _set_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise protocol.ProtocolError(f"--threads must be >= 1, got {threads}")
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _run_jobs(args, argv: list[str], experiment, out: str) -> int:
    """Runs `--jobs` shards as child processes of this script, then merges.

    The caller holds the folder's lock; each child takes its shard's own lock.
    """
    protocol.prepare_out(experiment, out)
    if experiment.kind == "label-efficiency":
        # Encoders first, once: the children then find them finished.
        pretrain_data, _ = protocol.setting_data(experiment)
        root = protocol.pretrain_root(experiment, out)
        for method in experiment.methods:
            if method in protocol.SSL_METHODS and method not in experiment.pretrained:
                spec = protocol.PretrainSpec(
                    method,
                    experiment.depths[0],
                    experiment.widths[0],
                    1.0,
                    experiment.pretrain_epochs,
                    experiment.seed,
                )
                protocol.ensure_pretrained(spec, pretrain_data, root)
    base = [a for a in _strip(argv, "--jobs") if a]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    children = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                *base,
                "--shard",
                f"{i}/{args.jobs}",
                "--threads",
                str(threads),
                "--out",
                out,
            ],
            env={**os.environ, _CHILD_ENV: "1"},
        )
        for i in range(1, args.jobs + 1)
    ]
    codes = [child.wait() for child in children]
    if any(codes):
        print(f"error: shard exit codes {codes}; rerun to resume", file=sys.stderr)
        return 2
    return _merge(out)


def _strip(argv: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in (*flags, "--out", "--shard", "--threads"):
            skip = "=" not in item
            continue
        out.append(item)
    return out


def _merge(out: str) -> int:
    """Merges and summarises; the caller holds the folder's lock."""
    _, missing = protocol.merge(out)
    if missing:
        return 3
    protocol.summarize(out)
    return 0


class Plan(NamedTuple):
    """A sweep command, checked: what it runs, where, and what to tell the user."""

    experiment: protocol.Experiment
    out: str
    shard: tuple[int, int] | None
    notes: list[str]


def plan(args) -> Plan:
    """Checks every argument, dataset and folder of a sweep; writes nothing in --out.

    Raises:
        ProtocolError (and the data and fine-tuning errors): the first problem.
    """
    if args.jobs < 1:
        raise protocol.ProtocolError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and args.shard:
        raise protocol.ProtocolError("--jobs and --shard are exclusive")
    shard = protocol.parse_shard(args.shard)
    experiment, notes = protocol.deduplicated(experiment_of(args))
    protocol.validate(experiment)
    out = args.out or os.path.join("results", f"{args.command}-{experiment.setting}")
    if experiment.pretrain_dir:
        protocol.check_writable_folder(experiment.pretrain_dir, "--pretrain-dir")
    protocol.check_out(experiment, out)
    notes = [f"note: {n}" for n in notes]
    notes += [f"warning: {w}" for w in protocol.check_data(experiment, out)]
    return Plan(experiment, out, shard, notes)


def _sweep(args, argv: list[str]) -> int:
    _set_threads(args.threads)  # before TensorFlow starts: checking the data starts it
    checked = plan(args)
    child = bool(os.environ.get(_CHILD_ENV))
    if not child:  # the parent of --jobs has said it
        for line in checked.notes:
            print(line, file=sys.stderr)
    out, shard = checked.out, checked.shard
    if args.jobs > 1:
        with protocol.evaluation_lock(out):
            return _run_jobs(args, argv, checked.experiment, out)
    with protocol.evaluation_lock(out, shard):
        protocol.run_experiment(checked.experiment, out, shard=shard)
        if shard is None:
            return _merge(out)
    if not child:
        print(f"shard {args.shard} done; `evaluate.py merge --out {out}` when all are")
    return 0


def _collapse(args) -> int:
    runs = _pairs(args.runs, "--runs")
    if args.from_dir:
        if not os.path.isdir(args.from_dir):
            raise protocol.ProtocolError(f"--from {args.from_dir}: no such folder")
        runs.update(
            (name, path)
            for name, path in _finished_runs(args.from_dir)
            if name not in runs
        )
    protocol.run_collapse(runs, args.data, args.out)
    return 0


def _command(args, argv: list[str]) -> int:
    if args.command == "merge":
        # Refuse a folder of something else, or a damaged table, before locking.
        protocol.load_experiment(args.out)
        protocol.check_tables(args.out)
        with protocol.evaluation_lock(args.out):
            return _merge(args.out)
    if args.command == "collapse":
        return _collapse(args)
    return _sweep(args, argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        return _command(args, argv)
    except USER_ERRORS as error:
        return report_error(error)  # 1 for damaged data, else 2


if __name__ == "__main__":
    sys.exit(main())
