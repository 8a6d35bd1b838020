"""Sweeps as commands run them: plan (check everything), run, shard, merge, summarise.

`plan_sweep` checks an experiment, its folders and its data and writes nothing;
`run_sweep` runs the plan under the lock of its results table, in local parallel
shard processes when asked (each a `python -m keras_ssrl.evaluation.sweeps` worker),
then merges and summarises. `scripts/evaluate.py` and `scripts/reproduce.py` are
command lines over these functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

from keras_ssrl.config import ConfigError
from keras_ssrl.data.errors import DataError, report_error
from keras_ssrl.evaluation.experiments import (
    Experiment,
    ProtocolError,
    deduplicated,
    parse_shard,
    validate,
)
from keras_ssrl.evaluation.results import (
    check_out,
    check_tables,
    check_writable_folder,
    evaluation_lock,
    load_experiment,
    merge,
    prepare_out,
)
from keras_ssrl.evaluation.runner import (
    SweepOptions,
    check_data,
    parse_parallel_runs,
    pretrain_encoders,
    run_experiment,
)
from keras_ssrl.evaluation.summaries import summarize
from keras_ssrl.files import LockedError
from keras_ssrl.finetuning import FinetuneError
from keras_ssrl.runs import RunDirError

# What a user can cause (arguments, data, folders, a busy --out): a message, no
# traceback. An OSError is an unreadable file or an unwritable place.
USER_ERRORS = (ProtocolError, FinetuneError, DataError, ConfigError, RunDirError,
               LockedError, OSError)  # fmt: skip
# Exit status of a sweep merged with runs still missing (its other shards).
EXIT_MISSING = 3
_WORKER = "keras_ssrl.evaluation.sweeps"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sweep, checked: what it runs, where, and what to tell the user."""

    experiment: Experiment
    out: str
    shard: tuple[int, int] | None = None
    notes: tuple[str, ...] = ()


def parse_parallelism(jobs: int, shard: str | None) -> tuple[int, int] | None:
    """Checks `--jobs` and `--shard` together; returns the parsed shard."""
    if jobs < 1:
        raise ProtocolError(f"--jobs must be >= 1, got {jobs}")
    if jobs > 1 and shard:
        raise ProtocolError("--jobs and --shard are exclusive")
    return parse_shard(shard)


def plan_sweep(
    experiment: Experiment, out: str, shard: tuple[int, int] | None = None
) -> Plan:
    """Checks the experiment, its folders and its data; writes nothing in `out`.

    Repeated grid values are dropped (with a note). Built-in data is converted into
    its cache first.

    Raises:
        ProtocolError (and the data and fine-tuning errors): the first problem.
    """
    experiment, notes = deduplicated(experiment)
    validate(experiment)
    if experiment.pretrain_dir:
        check_writable_folder(experiment.pretrain_dir, "--pretrain-dir")
    check_out(experiment, out)
    notes = [f"note: {n}" for n in notes]
    notes += [f"warning: {w}" for w in check_data(experiment, out)]
    return Plan(experiment, out, shard, tuple(notes))


def set_threads(threads: int | None) -> None:
    """TensorFlow's thread pools; call before TensorFlow starts (checking data does)."""
    if threads is not None and threads < 1:
        raise ProtocolError(f"--threads must be >= 1, got {threads}")
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def merge_and_summarize(out: str, log=print) -> int:
    """Merges the tables and writes the summaries; `EXIT_MISSING` while runs are
    missing, else 0. The caller holds the folder's lock."""
    _, missing = merge(out, log=log)
    if missing:
        return EXIT_MISSING
    summarize(out, log=log)
    return 0


def merge_folder(out: str, log=print) -> int:
    """`merge_and_summarize` under the folder's lock, once the folder is checked."""
    # Refuse a folder of something else, or a damaged table, before locking.
    load_experiment(out)
    check_tables(out)
    with evaluation_lock(out):
        return merge_and_summarize(out, log=log)


def run_sweep(
    plan: Plan,
    *,
    jobs: int = 1,
    threads: int | None = None,
    log=print,
    options: SweepOptions | None = None,
) -> int:
    """Runs a planned sweep; returns an exit status (0, or `EXIT_MISSING`).

    With `jobs` > 1 the shards run in parallel worker processes (`threads` each,
    default the cores shared out) and are merged; an unsharded sweep is merged and
    summarised; a shard leaves that to `merge_folder` once all are done. `options`
    (stacked runs, TensorBoard) apply to every process.
    """
    options = options or SweepOptions()
    if jobs > 1:
        with evaluation_lock(plan.out):
            return _run_workers(plan, jobs, threads, log, options)
    with evaluation_lock(plan.out, plan.shard):
        run_experiment(
            plan.experiment, plan.out, shard=plan.shard, log=log, options=options
        )
        if plan.shard is None:
            return merge_and_summarize(plan.out, log=log)
    return 0


def _run_workers(
    plan: Plan, jobs: int, threads: int | None, log, options: SweepOptions
) -> int:
    """Runs `jobs` shards as worker processes, then merges.

    The caller holds the folder's lock; each worker takes its shard's own lock.
    """
    experiment, out = plan.experiment, plan.out
    prepare_out(experiment, out, log=log)
    if experiment.kind == "label-efficiency":
        # Encoders first, once: the workers then find them finished.
        pretrain_encoders(experiment, out, log=log)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    command = [sys.executable, "-m", _WORKER, "--out", out, "--threads", str(threads),
               "--experiment", json.dumps(experiment.to_json()),
               *options.argv()]  # fmt: skip
    workers = [
        subprocess.Popen([*command, "--shard", f"{i}/{jobs}"])
        for i in range(1, jobs + 1)
    ]
    codes = [worker.wait() for worker in workers]
    if any(codes):
        print(f"error: shard exit codes {codes}; rerun to resume", file=sys.stderr)
        return 2
    return merge_and_summarize(out, log=log)


def _worker(argv: list[str] | None = None) -> int:
    """One shard of a `run_sweep(jobs=n)`: the experiment comes from the parent, as
    JSON (its `experiment.json` may hold encoder paths of an earlier invocation)."""
    parser = argparse.ArgumentParser(description=_worker.__doc__)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--parallel-runs", default="auto")
    parser.add_argument("--tensorboard", action="store_true")
    args = parser.parse_args(argv)
    try:
        set_threads(args.threads)
        experiment = Experiment.from_json(json.loads(args.experiment))
        shard = parse_shard(args.shard)
        options = SweepOptions(
            parse_parallel_runs(args.parallel_runs), args.tensorboard
        )
        with evaluation_lock(args.out, shard):
            run_experiment(experiment, args.out, shard=shard, options=options)
    except USER_ERRORS as error:
        return report_error(error)  # 1 for damaged data, else 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
