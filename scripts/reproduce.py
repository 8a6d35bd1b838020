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
the paper's findings. Rerunning resumes every experiment where it stopped. Every
experiment's arguments, data and folders are checked before the first one starts.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402

import evaluate  # noqa: E402

from keras_ssrl.data.errors import report_error  # noqa: E402
from keras_ssrl.evaluation import protocol  # noqa: E402
from keras_ssrl.evaluation.report import write_report  # noqa: E402
from keras_ssrl.files import FolderLock  # noqa: E402

# (arguments per experiment) for each preset. quick: the reduced grids of protocol.md;
# paper: the full grids (99 fractions x 5 repeats, depth 2..10 x width 256/1024, 24 q).
PRESETS = {
    "quick": {
        "label-efficiency": ["--fractions", "quick"],
        "architectures": [
            "--depths",
            "2,4,6",
            "--widths",
            "256",
            "--fractions",
            "quick",
        ],
        "pretrain-size": ["--sizes", "quick", "--repeats", "3"],
    },
    "paper": {
        "label-efficiency": ["--fractions", "full"],
        "architectures": ["--fractions", "full"],
        "pretrain-size": ["--sizes", "full"],
    },
    # A minutes-long check that the whole pipeline runs on your data before a long
    # run: tiny encoders (2 x 16), two fractions, one repeat. Not a result.
    "smoke": {
        "label-efficiency": ["--fractions", "0.05,0.3", "--repeats", "1",
                             "--layers", "2", "--width", "16"],
        "architectures": ["--depths", "1,2", "--widths", "16", "--fractions",
                          "0.05,0.3", "--repeats", "1"],
        "pretrain-size": ["--sizes", "0.5,1", "--repeats", "1", "--layers", "2",
                          "--width", "16"],
    },  # fmt: skip
}


def _architecture(arguments: list[str]) -> str:
    """The `LxW` encoder of an argument list (evaluate.py's defaults otherwise)."""
    values = dict(zip(arguments[::2], arguments[1::2]))
    return f"{values.get('--layers', 4)}x{values.get('--width', 256)}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--setting", default="tcga", choices=("tcga", "archs4", "archs4_to_tcga")
    )
    p.add_argument(
        "--data", help="a converted, labelled dataset instead of built-in data"
    )
    p.add_argument("--pretrain-data", help="pre-training dataset (default: --data)")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--out", help="output folder (default results/reproduce-<setting>)")
    p.add_argument("--pretrain-epochs", type=int, help="epochs of every pre-training")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 4),
        help="parallel fine-tuning processes (default: the cores, at most 4; on 2 "
        "cores, 2 single-threaded processes run sweeps 1.5x faster than one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, help="override the preset's repeats")
    p.add_argument(
        "--max-epochs", type=int, help="override fine-tuning's 100 epochs (for a check)"
    )
    return p


def steps_of(args, out: str) -> list[list[str]]:
    """The evaluate.py command line of each sweep."""
    common = ["--seed", str(args.seed), "--pretrain-dir", os.path.join(out, "pretrain")]
    if args.data:
        common += ["--data", args.data]
        if args.pretrain_data:
            common += ["--pretrain-data", args.pretrain_data]
    else:
        common += ["--setting", args.setting]
    optional = {"--pretrain-epochs": args.pretrain_epochs, "--jobs": args.jobs,
                "--max-epochs": args.max_epochs}  # fmt: skip
    for flag, value in optional.items():
        if value is not None:
            common += [flag, str(value)]
    preset = PRESETS[args.preset]
    steps = [
        ["label-efficiency", "--pretrain", *preset["label-efficiency"]],
        ["architectures", *preset["architectures"]],
        ["pretrain-size", *preset["pretrain-size"]],
    ]
    repeats = [] if args.repeats is None else ["--repeats", str(args.repeats)]
    return [
        [*step, *repeats, *common, "--out", os.path.join(out, step[0])]
        for step in steps
    ]


def check(args, out: str) -> None:
    """Checks every sweep's arguments, data and folders before the first one runs."""
    protocol.check_writable_folder(out)
    if args.pretrain_data and not args.data:
        raise protocol.ProtocolError("--pretrain-data needs --data")
    for step in steps_of(args, out):
        evaluate.plan(evaluate.parser().parse_args(step))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    name = "custom" if args.data else args.setting
    out = os.path.abspath(args.out or os.path.join("results", f"reproduce-{name}"))
    try:
        check(args, out)
        with FolderLock(out, "reproduction folder"):
            return _reproduce(args, out, name)
    except evaluate.USER_ERRORS as error:
        return report_error(error)  # 1 for damaged data, else 2


def _reproduce(args, out: str, name: str) -> int:
    for step in steps_of(args, out):
        print(f"== {step[0]}", flush=True)
        code = evaluate.main(step)
        if code:
            return code
    print("== collapse", flush=True)
    pretrained = os.path.join(out, "pretrain")
    arch = _architecture(PRESETS[args.preset]["label-efficiency"])
    runs = {
        method: os.path.join(pretrained, entry)
        for method in ("scarf", "vime", "byol")
        for entry in sorted(os.listdir(pretrained))
        if entry.startswith(f"{method}-{arch}-q1-")
    }
    code = evaluate.main(
        ["collapse", "--runs", ",".join(f"{k}={v}" for k, v in runs.items()),
         "--out", os.path.join(out, "collapse")]
        + (["--data", args.pretrain_data or args.data] if args.data else [])
    )  # fmt: skip
    if code:
        return code
    path = write_report(out, preset=args.preset, setting=name)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
