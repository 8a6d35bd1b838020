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
the paper's findings. Rerunning resumes every experiment where it stopped.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402

import evaluate  # noqa: E402

from keras_ssrl.evaluation.report import write_report  # noqa: E402

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


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    name = "custom" if args.data else args.setting
    out = os.path.abspath(args.out or os.path.join("results", f"reproduce-{name}"))
    common = ["--seed", str(args.seed), "--pretrain-dir", os.path.join(out, "pretrain")]
    if args.data:
        common += ["--data", args.data]
        if args.pretrain_data:
            common += ["--pretrain-data", args.pretrain_data]
    else:
        common += ["--setting", args.setting]
    if args.pretrain_epochs:
        common += ["--pretrain-epochs", str(args.pretrain_epochs)]
    if args.jobs > 1:
        common += ["--jobs", str(args.jobs)]
    if args.max_epochs:
        common += ["--max-epochs", str(args.max_epochs)]
    preset = PRESETS[args.preset]
    steps = [
        ["label-efficiency", "--pretrain", *preset["label-efficiency"]],
        ["architectures", *preset["architectures"]],
        ["pretrain-size", *preset["pretrain-size"]],
    ]
    for step in steps:
        if args.repeats:
            step = [*step, "--repeats", str(args.repeats)]
        print(f"== {step[0]}", flush=True)
        code = evaluate.main([*step, *common, "--out", os.path.join(out, step[0])])
        if code:
            return code
    print("== collapse", flush=True)
    pretrained = os.path.join(out, "pretrain")
    arch = _architecture(preset["label-efficiency"])
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
