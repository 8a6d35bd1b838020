"""Experiment folders: results tables, their checks, resume, locks and merge.

Every finished run is one row of `results.csv` (or `results.shard-i-of-n.csv`),
rewritten atomically after each run; a rerun skips the rows already there, and
`merge` joins the shard files. Every row read back (to resume or merge) is checked
(`read_results`).

Nothing is written before everything is checked (`check_out`): a refused request
leaves no trace. One process writes each results table: its writer holds
`evaluation_lock(out_dir, shard)`, and a second one is refused.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable

from keras_ssrl.evaluation.experiments import (
    LOGREG,
    METHODS,
    NO_MODE,
    SETTINGS,
    Experiment,
    ProtocolError,
    build_units,
    validate,
)
from keras_ssrl.files import (
    LOCK_FILE,
    FolderLock,
    atomic_path,
    remove_stale_temporaries,
    write_json_atomic,
)

EXPERIMENT_JSON = "experiment.json"
RESULTS = "results"
# Per-run TensorBoard logs of a sweep run with --tensorboard.
TENSORBOARD_DIR = "tensorboard"
RESULT_COLUMNS = (
    "setting", "method", "mode", "architecture", "q", "p", "repeat", "seed",
    "n_train", "accuracy", "balanced_accuracy", "macro_f1", "epochs", "best_epoch",
    "seconds",
)  # fmt: skip
KEY_COLUMNS = ("setting", "method", "mode", "architecture", "q", "p", "repeat")
# A temporary `atomic_path` name (NAME.tmp-PID[.ext]): a writer killed mid-write
# leaves it behind.
TEMPORARY = r".+\.tmp-(?P<pid>\d+)(\.[A-Za-z]+)?"


def results_name(shard: tuple[int, int] | None) -> str:
    """The results table of `shard` (None: the merged `results.csv`)."""
    if shard is None:
        return f"{RESULTS}.csv"
    return f"{RESULTS}.shard-{shard[0]}-of-{shard[1]}.csv"


# ------------------------------------------------------------------- results tables


class ResultsTable:
    """A CSV of run rows, rewritten atomically after each appended row."""

    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict] = read_results(path) if os.path.exists(path) else []
        self.keys = {row_key(row) for row in self.rows}

    def __contains__(self, key) -> bool:
        return tuple(key) in self.keys

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.keys.add(row_key(row))
        write_results(self.path, self.rows)


def row_key(row: dict) -> tuple[str, ...]:
    return tuple(str(row[c]) for c in KEY_COLUMNS)


# What a cell of each results column must hold: (parse, check, what it should be).
_FRACTION = (float, lambda v: math.isfinite(v) and 0.0 < v <= 1.0, "a number in (0, 1]")
_METRIC = (float, lambda v: math.isfinite(v) and 0.0 <= v <= 1.0, "a number in [0, 1]")
_COUNT = (int, lambda v: v >= 0, "an integer >= 0")
_CELLS = {
    "setting": (str, lambda v: v in SETTINGS, f"one of {', '.join(SETTINGS)}"),
    "method": (str, lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "mode": (str, lambda v: v in (NO_MODE, "frozen", "unfrozen"),
             "none, frozen or unfrozen"),
    "architecture": (str, lambda v: re.fullmatch(r"[1-9]\d*x[1-9]\d*", v),
                     "LAYERSxWIDTH"),
    "q": _FRACTION, "p": _FRACTION,
    "repeat": _COUNT, "seed": _COUNT,
    "n_train": (int, lambda v: v >= 1, "an integer >= 1"),
    "accuracy": _METRIC, "balanced_accuracy": _METRIC, "macro_f1": _METRIC,
    "epochs": _COUNT, "best_epoch": _COUNT,
    "seconds": (float, lambda v: math.isfinite(v) and v >= 0.0, "a number >= 0"),
}  # fmt: skip


def _row_problem(row: dict) -> str | None:
    """What is wrong with one row of a results table (None: nothing)."""
    values = {}
    for column in RESULT_COLUMNS:
        text = row[column]
        if text is None or not text.strip():
            return f"{column} is empty"
        parse, check, expected = _CELLS[column]
        try:
            values[column] = parse(text)
        except ValueError:
            return f"{column} is {text!r}, not {expected}"
        if not check(values[column]):
            return f"{column} is {text!r}, not {expected}"
    # Networks train at least one epoch and restore one of them; logistic
    # regression has no epochs (0, 0).
    least = 0 if values["method"] == LOGREG else 1
    if not least <= values["best_epoch"] <= values["epochs"]:
        return (
            f"epochs {values['epochs']} and best_epoch {values['best_epoch']} are "
            f"impossible for {values['method']}"
        )
    return None


def read_results(path: str) -> list[dict]:
    """The rows of a results table, every cell checked.

    Raises:
        ProtocolError: naming the file and line (the header is line 1) of the first
            row that is cut (a writer stopped mid-row), incomplete or impossible.
    """
    with open(path, newline="", encoding="utf-8") as handle:
        text = handle.read()
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    missing = set(RESULT_COLUMNS) - set(header)
    if missing:
        raise ProtocolError(
            f"{path}: not a results table (missing columns {sorted(missing)})"
        )
    rows = []
    for cells in reader:
        if not cells:
            continue  # a blank line holds no run
        line = reader.line_num
        cut = reader.line_num == text.count("\n") + 1 and not text.endswith("\n")
        if cut or len(cells) != len(header):
            problem = (
                "the row is cut (no end of line)"
                if cut
                else f"{len(cells)} fields, the header has {len(header)}"
            )
        else:
            row = dict(zip(header, cells))
            problem = _row_problem(row)
        if problem:
            raise ProtocolError(
                f"{path}, line {line}: {problem}; the table is damaged: remove that "
                "line (or the file) and rerun the same command to redo its runs"
            )
        rows.append(row)
    return rows


def write_results(path: str, rows: Iterable[dict]) -> None:
    """Writes a results table atomically (and durably: it is the sweep's progress)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row[c] for c in RESULT_COLUMNS})
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def results_tables(out_dir: str) -> list[str]:
    """The names of the results tables in `out_dir` (merged and shards), sorted."""
    return sorted(
        n
        for n in os.listdir(out_dir)
        if n.startswith(f"{RESULTS}.") and n.endswith(".csv")
    )


def check_tables(out_dir: str) -> None:
    """Reads every results table of `out_dir`; a damaged row is an error (see
    `read_results`). A resume or merge would stop on it: it is refused first."""
    for name in results_tables(out_dir):
        read_results(os.path.join(out_dir, name))


# ---------------------------------------------------------------- experiment folders


def lock_name(shard: tuple[int, int] | None) -> str:
    """The lock file of the process writing `results_name(shard)`.

    The shards of one sweep write one folder, each its own table: each takes its own
    lock, so that only two processes writing the same table refuse each other. The
    unsharded sweep and `merge` (which write `results.csv`) share the folder's lock.
    """
    if shard is None:
        return LOCK_FILE
    return f"{LOCK_FILE.removesuffix('.lock')}.shard-{shard[0]}-of-{shard[1]}.lock"


def evaluation_lock(out_dir: str, shard: tuple[int, int] | None = None) -> FolderLock:
    """The exclusive lock of the process writing `out_dir`'s table of `shard`."""
    return FolderLock(out_dir, "evaluation folder", name=lock_name(shard))


def _is_ours(name: str) -> bool:
    """Whether a name in an evaluation folder is a lock file or a temporary of ours."""
    lock = name.startswith(LOCK_FILE.removesuffix(".lock")) and name.endswith(".lock")
    return lock or re.fullmatch(TEMPORARY, name) is not None


def check_writable_folder(path: str, flag: str = "--out") -> None:
    """Refuses a `path` that is not a folder, or cannot be created as one."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ProtocolError(f"{flag} {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ProtocolError(f"{flag} {path} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ProtocolError(
            f"{flag} {path} cannot be created: {parent} is not a writable folder"
        )


def check_out(experiment: Experiment, out_dir: str) -> None:
    """Refuses an `out_dir` that cannot hold this experiment; writes nothing.

    It must be new, empty, or an experiment folder of the same experiment (to
    resume): a folder of other files is refused, since a sweep would write its
    tables over files of the same name.
    """
    check_writable_folder(out_dir)
    if not os.path.isdir(out_dir):
        return
    path = os.path.join(out_dir, EXPERIMENT_JSON)
    if not os.path.exists(path):
        foreign = sorted(n for n in os.listdir(out_dir) if not _is_ours(n))
        if foreign:
            raise ProtocolError(
                f"--out {out_dir} holds other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}) and no {EXPERIMENT_JSON}; "
                "choose a new or empty folder"
            )
        return
    saved = load_experiment(out_dir)
    if saved.comparable() != experiment.comparable():
        diff = sorted(
            k
            for k, v in experiment.comparable().items()
            if saved.comparable().get(k) != v
        )
        raise ProtocolError(
            f"{out_dir} holds another experiment (differs in {', '.join(diff)}); "
            "choose another --out, or rerun with the same arguments to resume"
        )
    check_tables(out_dir)


def prepare_out(experiment: Experiment, out_dir: str, log=print) -> None:
    """Creates OUT with `experiment.json`, or checks that it holds the same experiment.

    Temporaries left by writers that were killed (their PID gone) are removed.
    """
    check_out(experiment, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(out_dir, TEMPORARY, log=log)
    path = os.path.join(out_dir, EXPERIMENT_JSON)
    if not os.path.exists(path):
        write_json_atomic(path, experiment.to_json())


def load_experiment(out_dir: str) -> Experiment:
    """The experiment recorded in `out_dir`, checked; an error naming the folder."""
    path = os.path.join(out_dir, EXPERIMENT_JSON)
    if not os.path.isdir(out_dir):
        raise ProtocolError(f"{out_dir}: no such folder")
    if not os.path.exists(path):
        raise ProtocolError(
            f"{out_dir}: no {EXPERIMENT_JSON}; not an experiment folder"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            experiment = Experiment.from_json(json.load(handle))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ProtocolError(
            f"{path}: unreadable ({type(error).__name__}: {error}); it is written by "
            "the sweep that started this folder"
        ) from None
    validate(experiment)
    return experiment


# ---------------------------------------------------------------------------- merge


def _rows_of_tables(out_dir: str, names: list[str]) -> dict[tuple, dict]:
    """Every row of the tables, by key; an error when two tables disagree on a run."""
    rows: dict[tuple, dict] = {}
    for name in names:
        for row in read_results(os.path.join(out_dir, name)):
            key = row_key(row)
            if key in rows and rows[key]["accuracy"] != row["accuracy"]:
                raise ProtocolError(
                    f"{name}: run {'/'.join(key)} has another result in an earlier file; "
                    "shards of one experiment must not overlap (same --shard n everywhere)"
                )
            rows.setdefault(key, row)
    return rows


def merge(out_dir: str, log=print) -> tuple[str, int]:
    """Joins `results.shard-*.csv` (and any `results.csv`) into `results.csv`.

    Every row of every file is checked first; nothing is written when one is cut,
    incomplete or impossible. The caller holds `evaluation_lock(out_dir)`.

    Returns:
        (path, number of runs of the experiment still missing).

    Raises:
        ProtocolError: a damaged row (naming file and line), or two files disagree
            on a run's result.
    """
    experiment = load_experiment(out_dir)
    names = results_tables(out_dir)
    rows = _rows_of_tables(out_dir, names)
    expected = [r.key for u in build_units(experiment) for r in u.runs]
    order = {key: i for i, key in enumerate(expected)}
    extra = [k for k in rows if k not in order]
    if extra:
        raise ProtocolError(
            f"{out_dir}: {len(extra)} row(s) do not belong to this experiment (e.g. "
            f"{'/'.join(extra[0])})"
        )
    path = os.path.join(out_dir, results_name(None))
    write_results(path, sorted(rows.values(), key=lambda r: order[row_key(r)]))
    missing = len(expected) - len(rows)
    log(
        f"merged {len(names)} file(s): {len(rows)} of {len(expected)} runs"
        + (f", {missing} missing (run the remaining shards)" if missing else "")
    )
    return path, missing
