"""The paper's experiments as resumable, shardable sweeps of fine-tuning runs.

An experiment (label efficiency, architectures, pre-training size) is a list of
*units*; a unit is the runs that share one pre-trained encoder (or one run of the
baseline or of logistic regression) and is the unit of sharding: `--shard i/n` takes
its share of the units (balanced by cost), so each run belongs to exactly one shard.
Every finished run is one row of `results.csv` (or `results.shard-i-of-n.csv`),
rewritten atomically after each run; a rerun skips the rows already there, and `merge`
joins the shard files.

Everything the protocol fixes (grids, AUPC interval, fine-tuning settings) comes from
`keras_ssrl.config`. Subsets are a function of (seed, p, repeat) only, so every method
sees the same subset for a (p, repeat) and repeats differ; the test split is read only
to score a trained model, and nothing (statistics, subsets, early stopping) uses it.

Nothing is written before everything is checked (`validate`, `check_out`,
`check_data`): a refused request leaves no trace. One process writes each results
table: its writer holds `evaluation_lock(out_dir, shard)`, and a second one is refused.
Every row read back (to resume or merge) is checked (`read_results`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from keras_ssrl.config import (
    AUPC_RANGE,
    EncoderConfig,
    FinetuneConfig,
    PretrainConfig,
)
from keras_ssrl.data.manifest import (
    Manifest,
    atomic_path,
    genes_digest,
    write_csv_atomic,
    write_json_atomic,
)
from keras_ssrl.files import LOCK_FILE, FolderLock, remove_stale_temporaries
from keras_ssrl.finetuning import (
    BASELINE,
    FinetuneData,
    Finetuner,
    check_labelled_splits,
    classification_metrics,
    load_encoder_weights,
    load_finetune_data,
    stratified_subset,
    subset_seed,
    validate_finetune_config,
)

LOGREG = "logreg"
SSL_METHODS = ("scarf", "vime", "byol")
METHODS = (BASELINE, *SSL_METHODS, LOGREG)
NO_MODE = "none"  # the baseline and logistic regression have no frozen/unfrozen mode
EXPERIMENT_JSON = "experiment.json"
RESULTS = "results"
RESULT_COLUMNS = (
    "setting", "method", "mode", "architecture", "q", "p", "repeat", "seed",
    "n_train", "accuracy", "balanced_accuracy", "macro_f1", "epochs", "best_epoch",
    "seconds",
)  # fmt: skip
KEY_COLUMNS = ("setting", "method", "mode", "architecture", "q", "p", "repeat")
KINDS = ("label-efficiency", "architectures", "pretrain-size")
SETTINGS = ("tcga", "archs4", "archs4_to_tcga", "custom")


class ProtocolError(ValueError):
    """An invalid experiment request."""


# ------------------------------------------------------------------------ run specs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One fine-tuning (or logistic regression) run of an experiment."""

    setting: str
    method: str
    mode: str
    layers: int
    width: int
    q: float
    p: float
    repeat: int

    @property
    def architecture(self) -> str:
        return f"{self.layers}x{self.width}"

    @property
    def key(self) -> tuple[str, ...]:
        return (self.setting, self.method, self.mode, self.architecture,
                f"{self.q:g}", f"{self.p:g}", str(self.repeat))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """A pre-training run an experiment needs."""

    method: str
    layers: int
    width: int
    q: float
    epochs: int
    seed: int

    @property
    def name(self) -> str:
        return (f"{self.method}-{self.layers}x{self.width}-q{self.q:g}"
                f"-e{self.epochs}-s{self.seed}")  # fmt: skip


@dataclasses.dataclass
class Unit:
    """Runs sharing one encoder: the unit of sharding."""

    name: str
    pretrain: PretrainSpec | None
    runs: list[RunSpec]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`"i/n"` (1 <= i <= n) -> (i, n); None -> None."""
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ProtocolError(
            f"--shard must look like i/n (e.g. 1/4), got {text!r}"
        ) from None
    if not 1 <= index <= count:
        raise ProtocolError(f"--shard {text}: i must be between 1 and n")
    return index, count


def unit_cost(unit: Unit) -> float:
    """A rough relative cost of a unit, to balance shards (not a time estimate).

    A network run costs about its label fraction p (steps per epoch grow with p), a
    frozen or logistic-regression run a tenth of that, a pre-training a few runs.
    """
    cost = 0.0
    for run in unit.runs:
        cheap = run.mode == "frozen" or run.method == LOGREG
        cost += (0.1 if cheap else 1.0) * (0.05 + run.p)
    if unit.pretrain is not None and len(unit.runs) > 1:
        cost += 5.0 * unit.pretrain.q
    return cost


def shard_units(units: Sequence[Unit], shard: tuple[int, int] | None) -> list[Unit]:
    """The units of shard i/n, in name order.

    Units are dealt largest first to the least loaded shard (by `unit_cost`), so
    shards finish together; the deal depends only on the experiment, so every
    process computes the same partition and each run belongs to exactly one shard.
    """
    ordered = sorted(units, key=lambda u: u.name)
    if shard is None:
        return ordered
    index, count = shard
    loads = [0.0] * count
    mine = []
    for unit in sorted(ordered, key=lambda u: (-unit_cost(u), u.name)):
        target = min(range(count), key=lambda i: (loads[i], i))
        loads[target] += unit_cost(unit)
        if target == index - 1:
            mine.append(unit)
    return sorted(mine, key=lambda u: u.name)


def results_name(shard: tuple[int, int] | None) -> str:
    if shard is None:
        return f"{RESULTS}.csv"
    return f"{RESULTS}.shard-{shard[0]}-of-{shard[1]}.csv"


# ---------------------------------------------------------------------- experiments


GRID_FIELDS = ("methods", "modes", "fractions", "depths", "widths", "pretrain_sizes")


@dataclasses.dataclass
class Experiment:
    """Everything an experiment needs, recorded in `experiment.json`.

    Attributes:
        kind: `label-efficiency`, `architectures` or `pretrain-size`.
        setting: `tcga`, `archs4`, `archs4_to_tcga` or `custom`.
        pretrain_data, finetune_data: dataset folders (None: built-in for the setting).
        methods: among baseline, scarf, vime, byol, logreg.
        modes: among frozen, unfrozen (for the pre-trained methods).
        fractions: label fractions p.
        repeats: repeats per (method, p).
        depths, widths: architectures (architectures sweep; else the default only).
        pretrain_sizes: q values (pretrain-size experiment; else 1.0).
        pretrained: method -> RUN_DIR for the default architecture and q = 1.
        pretrain_dir: where pre-training runs started here go (default
            OUT/pretrain/<setting>); experiments sharing it share their encoders.
        pretrain_epochs: epochs of the pre-training runs this experiment starts.
        seed: base seed of subsets, initialisations and pre-training.
        finetune: fine-tuning settings (batch, learning rate, epochs, patience).
    """

    kind: str
    setting: str = "tcga"
    pretrain_data: str | None = None
    finetune_data: str | None = None
    methods: tuple[str, ...] = (BASELINE, *SSL_METHODS, LOGREG)
    modes: tuple[str, ...] = ("frozen", "unfrozen")
    fractions: tuple[float, ...] = ()
    repeats: int = 3
    depths: tuple[int, ...] = (4,)
    widths: tuple[int, ...] = (256,)
    pretrain_sizes: tuple[float, ...] = (1.0,)
    pretrained: dict = dataclasses.field(default_factory=dict)
    pretrain_dir: str | None = None
    pretrain_epochs: int = PretrainConfig.epochs
    seed: int = 0
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Experiment:
        data = dict(data)
        data["finetune"] = FinetuneConfig(**data["finetune"])
        for name in GRID_FIELDS:
            data[name] = tuple(data[name])
        # Folders written before repeated grid values were merged hold them twice;
        # reading them merged lets those sweeps resume and complete.
        return deduplicated(cls(**data))[0]

    def comparable(self) -> dict:
        """The fields that must match to resume or merge into the same folder."""
        data = self.to_json()
        data.pop("pretrained")  # paths may differ between machines
        data.pop("pretrain_dir")
        return data


def architecture_of_runs(runs: dict[str, str]) -> tuple[int, int]:
    """The (layers, width) shared by pre-training runs; an error if they differ."""
    from keras_ssrl.finetuning import encoder_config_of

    found = {name: encoder_config_of(run) for name, run in runs.items()}
    shapes = {(c.layers, c.width) for c in found.values()}
    if len(shapes) > 1:
        listing = ", ".join(f"{n} {c.layers}x{c.width}" for n, c in found.items())
        raise ProtocolError(
            f"the --pretrained encoders differ in architecture ({listing}); a "
            "label-efficiency comparison needs one architecture"
        )
    return shapes.pop()


def _grid_text(value) -> str:
    """How a grid value is recorded in results (p and q to 6 significant digits)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def deduplicated(experiment: Experiment) -> tuple[Experiment, list[str]]:
    """The experiment with repeated grid values dropped, and a note per drop.

    A grid is a set of values: `--fractions 0.1,0.1` asks for nothing more than
    `0.1`, but planning it twice would give two runs one results key, and a sweep
    that never completes. Values that results record identically (p and q to 6
    significant digits) are the same value; the first one is kept.
    """
    changes, notes = {}, []
    for name in GRID_FIELDS:
        kept, seen = [], {}
        for value in getattr(experiment, name):
            text = _grid_text(value)
            if text in seen:
                notes.append(
                    f"{name}: {text} is given twice; it is planned once"
                    if value == seen[text]
                    else f"{name}: {value!r} and {seen[text]!r} are one value in "
                    f"results ({text}); {seen[text]!r} is planned"
                )
                continue
            seen[text] = value
            kept.append(value)
        if len(kept) != len(getattr(experiment, name)):
            changes[name] = tuple(kept)
    return dataclasses.replace(experiment, **changes), notes


def aupc_fractions(experiment: Experiment) -> list[float]:
    """The sorted fractions inside the AUPC interval; an error when fewer than two."""
    low, high = AUPC_RANGE
    fractions = sorted(
        float(p) for p in experiment.fractions if low - 1e-9 <= p <= high + 1e-9
    )
    if len(fractions) < 2:
        raise ProtocolError(
            f"AUPC needs at least two fractions in [{low}, {high}]; the grid has "
            f"{len(fractions)} ({', '.join(f'{p:g}' for p in experiment.fractions)})"
        )
    return fractions


def _in_unit_interval(name: str, values: Iterable[float]) -> None:
    for value in values:
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ProtocolError(f"{name}: {value} is not in (0, 1]")


def _at_least(name: str, values: Iterable[int], minimum: int) -> None:
    for value in values:
        if value < minimum:
            raise ProtocolError(f"{name} must be >= {minimum}, got {value}")


def validate(experiment: Experiment) -> None:
    """Checks every setting of the experiment; raises an error naming one.

    Called before anything is written, so a refused request leaves no trace.

    Raises:
        ProtocolError: naming the setting (by its evaluate.py flag) and the value.
        FinetuneError: a fine-tuning setting (`validate_finetune_config`).
    """
    e = experiment
    if e.kind not in KINDS:
        raise ProtocolError(f"unknown experiment {e.kind!r}; choose among {KINDS}")
    if e.setting not in SETTINGS:
        raise ProtocolError(f"unknown setting {e.setting!r}; choose among {SETTINGS}")
    if not e.methods:
        raise ProtocolError("no methods given")
    unknown = set(e.methods) - set(METHODS)
    if unknown:
        raise ProtocolError(
            f"unknown method(s) {sorted(unknown)}; choose among {', '.join(METHODS)}"
        )
    bad_modes = set(e.modes) - {"frozen", "unfrozen"}
    if bad_modes or not e.modes:
        raise ProtocolError(f"modes must be among frozen, unfrozen; got {e.modes}")
    if not e.fractions:
        raise ProtocolError("no label fractions given")
    _in_unit_interval("label fraction (--fractions)", e.fractions)
    if not e.pretrain_sizes:
        raise ProtocolError("no pre-training sizes given")
    _in_unit_interval("pre-training fraction (--sizes)", e.pretrain_sizes)
    if not e.depths or not e.widths:
        raise ProtocolError("no encoder depths or widths given")
    _at_least("encoder depth (--depths, --layers)", e.depths, 1)
    _at_least("encoder width (--widths, --width)", e.widths, 1)
    _at_least("--repeats", [e.repeats], 1)
    _at_least("--pretrain-epochs", [e.pretrain_epochs], 1)
    _at_least("--seed", [e.seed], 0)  # numpy's SeedSequence takes no negative seed
    validate_finetune_config(e.finetune)
    foreign = set(e.pretrained) - set(SSL_METHODS)
    if foreign:
        raise ProtocolError(
            f"--pretrained names {', '.join(sorted(foreign))}; pre-trained encoders "
            f"are for {', '.join(SSL_METHODS)}"
        )
    if e.kind in ("label-efficiency", "architectures"):
        aupc_fractions(e)  # summarised by AUPC: refuse a grid it cannot integrate


def build_units(experiment: Experiment) -> list[Unit]:
    """The experiment's runs, grouped by the encoder they share."""
    validate(experiment)
    e = experiment
    units: list[Unit] = []
    grid = [(p, r) for p in e.fractions for r in range(e.repeats)]
    for layers in e.depths:
        for width in e.widths:
            arch = f"{layers}x{width}"
            for method in e.methods:
                if method in SSL_METHODS:
                    modes = e.modes if e.kind == "label-efficiency" else ("unfrozen",)
                    for q in e.pretrain_sizes:
                        pre = PretrainSpec(
                            method, layers, width, q, e.pretrain_epochs, e.seed
                        )
                        runs = [
                            RunSpec(e.setting, method, mode, layers, width, q, p, r)
                            for mode in modes
                            for p, r in grid
                        ]
                        if e.kind == "label-efficiency":
                            # Encoders are ready before the sweep: split finely.
                            units += [
                                Unit(
                                    f"{arch}/{method}/{'/'.join(run.key)}", pre, [run]
                                )  # fmt: skip
                                for run in runs
                            ]
                        else:
                            units.append(Unit(f"{arch}/{method}/q{q:g}", pre, runs))
                else:
                    if method == LOGREG and (layers, width) != (
                        e.depths[0],
                        e.widths[0],
                    ):
                        continue  # no encoder: one set of runs is enough
                    units += [
                        Unit(
                            f"{arch}/{method}/{p:g}/{r}",
                            None,
                            [
                                RunSpec(
                                    e.setting, method, NO_MODE, layers, width, 1.0, p, r
                                )
                            ],
                        )
                        for p, r in grid
                    ]
    return units


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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row[c] for c in RESULT_COLUMNS})
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------ progress


class Progress:
    """A progress line with the ETA, redrawn in place on a terminal.

    Off a terminal (logs, CI) it prints a line at most every `every` seconds.
    """

    def __init__(self, total: int, label: str, stream=None, every: float = 15.0):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.done, self.started = every, 0, time.perf_counter()
        self._last = 0.0

    def update(self, note: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        if not self.tty and now - self._last < self.every and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/"
            f"{self.total} runs, {_clock(elapsed)} elapsed, ETA {_clock(eta)}"
            + (f" ({note})" if note else "")
        )
        end = "" if self.tty and self.done < self.total else "\n"
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return (
        f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        if hours
        else f"{rest // 60}:{rest % 60:02d}"
    )


# ----------------------------------------------------------------------- data sets


def setting_data(experiment: Experiment, log=print) -> tuple[str, str]:
    """(pre-training data, fine-tuning data) folders of the experiment's setting."""
    from keras_ssrl.data.builtin import cache_root, ensure_builtin

    e = experiment
    if e.finetune_data is not None:
        return e.pretrain_data or e.finetune_data, e.finetune_data
    if e.setting == "tcga":
        folder = ensure_builtin("synthetic-tcga", log=log)
        return e.pretrain_data or folder, folder
    if e.setting == "archs4":
        folder = ensure_builtin("synthetic-archs4", log=log)
        return e.pretrain_data or folder, folder
    if e.setting == "archs4_to_tcga":
        archs4 = ensure_builtin("synthetic-archs4", log=log)
        tcga = ensure_builtin("synthetic-tcga", log=log)
        pretrain, finetune = align_pair(archs4, tcga, cache_root(), log=log)
        return e.pretrain_data or pretrain, finetune
    raise ProtocolError(
        f"unknown setting {e.setting!r}; choose tcga, archs4 or archs4_to_tcga, or "
        "pass --data"
    )


def align_pair(
    pretrain_dir: str, finetune_dir: str, root: str, log=print
) -> tuple[str, str]:
    """Both datasets restricted to their common genes, in one order (transfer setting).

    The pre-training data is rewritten onto the fine-tuning genes it shares, then the
    fine-tuning data onto that list, so that both hold exactly the same genes in the
    same order (protocol.md: datasets are combined only through explicit alignment,
    never by column position). Each keeps its own statistics (fitted on its own
    pre-training split). The aligned folders are written once under `root`.
    """
    from keras_ssrl.data.align import rewrite_onto
    from keras_ssrl.data.manifest import Manifest

    def name(path):
        return os.path.basename(os.path.normpath(path))

    source = os.path.join(root, f"{name(pretrain_dir)}-on-{name(finetune_dir)}")
    target = os.path.join(root, f"{name(finetune_dir)}-on-{name(pretrain_dir)}")
    if not os.path.exists(os.path.join(source, "manifest.json")):
        log(f"aligning {name(pretrain_dir)} onto the genes of {name(finetune_dir)}")
        rewrite_onto(pretrain_dir, Manifest.load(finetune_dir).genes, source,
                     target_name=name(finetune_dir), log=log)  # fmt: skip
    if not os.path.exists(os.path.join(target, "manifest.json")):
        rewrite_onto(finetune_dir, Manifest.load(source).genes, target,
                     target_name=name(source), log=log)  # fmt: skip
    return source, target


def check_data(
    experiment: Experiment, out_dir: str | None = None, log=print
) -> list[str]:
    """Checks the experiment's datasets and encoders; writes nothing in OUT.

    Built-in data is converted into its cache first. Everything a run would later
    stop on is checked here: the folders (OUT must not be inside a dataset), the
    classes, the records of the fine-tuning splits, the genes pre-training and
    fine-tuning share, and the `--pretrained` encoders.

    Returns:
        Warnings for the user (a test split too small to measure much).
    """
    from keras_ssrl.training import check_outside

    pretrain_dir, finetune_dir = setting_data(experiment, log=log)
    for flag, folder in (("--data", finetune_dir), ("--pretrain-data", pretrain_dir)):
        if not os.path.isdir(folder):
            raise ProtocolError(f"{flag} {folder}: no such folder")
        if out_dir is not None:
            check_outside(out_dir, folder, "evaluation folder", ProtocolError)
    finetune = Manifest.load(finetune_dir)
    warnings = check_labelled_splits(finetune)  # fewer than 2 classes: refused
    if any(m in SSL_METHODS for m in experiment.methods):
        pretrain = Manifest.load(pretrain_dir)
        if genes_digest(pretrain.genes) != genes_digest(finetune.genes):
            raise ProtocolError(
                f"--pretrain-data {pretrain_dir} and --data {finetune_dir} hold "
                f"different genes ({pretrain.n_genes} and {finetune.n_genes}); an "
                "encoder pre-trained on one cannot read the other: align them with "
                "tfrecords_tools/align.py"
            )
    load_finetune_data(os.path.abspath(finetune_dir))  # names damaged shards
    for method, run_dir in experiment.pretrained.items():
        if method in experiment.methods:
            load_encoder_weights(run_dir, finetune)
    return warnings


def pretrain_root(experiment: Experiment, out_dir: str) -> str:
    """The folder of the pre-training runs an experiment starts."""
    if experiment.pretrain_dir:
        return experiment.pretrain_dir
    return os.path.join(out_dir, "pretrain", experiment.setting)


def ensure_pretrained(
    spec: PretrainSpec, data_dir: str, root: str, log=print, verbose=0
) -> str:
    """The RUN_DIR of a pre-training run, training (or resuming) it when needed."""
    from keras_ssrl.config import EncoderConfig
    from keras_ssrl.training import SUMMARY_JSON, load_run_config, run_pretraining

    run_dir = os.path.join(root, spec.name)
    if os.path.exists(os.path.join(run_dir, SUMMARY_JSON)):
        return run_dir
    config = PretrainConfig(
        method=spec.method,
        epochs=spec.epochs,
        seed=spec.seed,
        pretrain_fraction=spec.q,
        encoder=EncoderConfig(layers=spec.layers, width=spec.width),
    )
    resume = load_run_config(run_dir) is not None
    log(f"pre-training {spec.name}" + (" (resuming)" if resume else ""))
    run_pretraining(config, data_dir, run_dir, resume=resume, verbose=verbose, log=log)
    return run_dir


# --------------------------------------------------------------------------- running


def logistic_regression(data: FinetuneData, subset: np.ndarray, seed: int) -> dict:
    """scikit-learn's logistic regression on the standardised genes (same subset).

    L2 penalty with C = 1 (scikit-learn's default) and lbfgs: the classical reference a
    user would otherwise pick. Genes are standardised with the pre-training statistics,
    as for the networks.
    """
    import warnings

    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        # At p = 0.02 there are about as many classes as samples; scikit-learn then
        # warns that `y` "could represent a regression problem". It does not.
        warnings.filterwarnings("ignore", "The number of unique classes")
        model.fit(data.train.x[subset], data.train.y[subset])
    predictions = model.predict(data.test.x)
    return classification_metrics(data.test.y, predictions, len(data.classes))


class Runner:
    """Runs units into a results table, reusing one `Finetuner` per architecture/mode."""

    def __init__(self, experiment: Experiment, out_dir: str, log=print, verbose=0):
        self.experiment, self.out_dir, self.log = experiment, out_dir, log
        self.verbose = verbose
        self.pretrain_data, self.finetune_data = setting_data(experiment, log=log)
        self.data = load_finetune_data(os.path.abspath(self.finetune_data))
        self._tuners: dict = {}
        self._weights: dict = {}

    def encoder_run(self, spec: PretrainSpec) -> str:
        e = self.experiment
        default = (spec.layers, spec.width, spec.q) == (e.depths[0], e.widths[0], 1.0)
        given = e.pretrained.get(spec.method)
        if given and default:
            return given
        if given and not default:
            raise ProtocolError(
                f"--pretrained {spec.method}=... is one encoder on the whole "
                f"pre-training set; this experiment needs {spec.name}: use --pretrain"
            )
        root = pretrain_root(self.experiment, self.out_dir)
        return ensure_pretrained(spec, self.pretrain_data, root, self.log, self.verbose)

    def _encoder_weights(self, run_dir: str):
        if run_dir not in self._weights:
            self._weights = {run_dir: load_encoder_weights(run_dir, self.data.manifest)}
        return self._weights[run_dir]

    def _tuner(self, layers: int, width: int, mode: str) -> Finetuner:
        key = (layers, width, mode)
        if key not in self._tuners:
            self._tuners[key] = Finetuner(
                self.data.n_genes,
                len(self.data.classes),
                EncoderConfig(layers=layers, width=width),
                mode,
                self.experiment.finetune,
            )
        return self._tuners[key]

    def run(self, spec: RunSpec, encoder_run: str | None) -> dict:
        e = self.experiment
        seed = subset_seed(e.seed, spec.p, spec.repeat)
        subset = stratified_subset(self.data.train.y, spec.p, seed)
        started = time.perf_counter()
        if spec.method == LOGREG:
            metrics, epochs, best = logistic_regression(self.data, subset, seed), 0, 0
        else:
            weights = self._encoder_weights(encoder_run) if encoder_run else None
            mode = "unfrozen" if spec.mode == NO_MODE else spec.mode
            result = self._tuner(spec.layers, spec.width, mode).run(
                self.data, subset, seed, weights, encoder_key=encoder_run
            )
            metrics, epochs, best = result.metrics, result.epochs, result.best_epoch
        return {
            "setting": spec.setting, "method": spec.method, "mode": spec.mode,
            "architecture": spec.architecture, "q": f"{spec.q:g}", "p": f"{spec.p:g}",
            "repeat": spec.repeat, "seed": seed, "n_train": len(subset),
            "accuracy": f"{metrics['accuracy']:.6f}",
            "balanced_accuracy": f"{metrics['balanced_accuracy']:.6f}",
            "macro_f1": f"{metrics['macro_f1']:.6f}", "epochs": epochs,
            "best_epoch": best, "seconds": f"{time.perf_counter() - started:.3f}",
        }  # fmt: skip


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


# A temporary `atomic_path` name (NAME.tmp-PID[.ext]): a writer killed mid-write
# leaves it behind.
TEMPORARY = r".+\.tmp-(?P<pid>\d+)(\.[A-Za-z]+)?"


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


def run_experiment(
    experiment: Experiment,
    out_dir: str,
    shard: tuple[int, int] | None = None,
    log: Callable[[str], None] = print,
    progress_stream=None,
) -> str:
    """Runs (or resumes) the experiment's runs of one shard; returns the results path.

    Rows already in the shard's table, or in a merged `results.csv`, are skipped.
    The caller holds `evaluation_lock(out_dir, shard)`.
    """
    check_out(experiment, out_dir)
    units = shard_units(build_units(experiment), shard)
    # Tables are read (and checked) before anything is written.
    table = ResultsTable(os.path.join(out_dir, results_name(shard)))
    merged = os.path.join(out_dir, results_name(None))
    done = set(table.keys)
    if shard is not None and os.path.exists(merged):
        done |= {row_key(r) for r in read_results(merged)}
    prepare_out(experiment, out_dir, log=log)
    todo = [(u, r) for u in units for r in u.runs if r.key not in done]
    total = sum(len(u.runs) for u in units)
    label = experiment.kind + (f" shard {shard[0]}/{shard[1]}" if shard else "")
    log(f"{label}: {total} runs, {total - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return table.path
    runner = Runner(experiment, out_dir, log=log)
    progress = Progress(len(todo), label, stream=progress_stream)
    encoders: dict[str, str] = {}
    for unit, spec in todo:
        encoder_run = None
        if unit.pretrain is not None:
            if unit.pretrain.name not in encoders:
                encoders[unit.pretrain.name] = runner.encoder_run(unit.pretrain)
            encoder_run = encoders[unit.pretrain.name]
        row = runner.run(spec, encoder_run)
        table.append(row)
        progress.update(f"{spec.method} {spec.mode} p={spec.p:g} acc {row['accuracy']}")
    return table.path


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


# ------------------------------------------------------------------------ summaries


def results_frame(path: str):
    import pandas as pd

    frame = pd.read_csv(path, dtype={"mode": str, "architecture": str})
    return frame


def accuracy_matrix(frame, fractions: Sequence[float], repeats: int) -> np.ndarray:
    """(P, R) accuracies of one method's rows; NaN where a run is missing."""
    out = np.full((len(fractions), repeats), np.nan)
    index = {round(p, 6): i for i, p in enumerate(fractions)}
    for p, r, a in zip(frame["p"], frame["repeat"], frame["accuracy"]):
        i = index.get(round(float(p), 6))
        if i is not None and int(r) < repeats:
            out[i, int(r)] = a
    return out


def gain_table(frame, experiment: Experiment, n_boot: int = 2000):
    """AUPC per (architecture, q, method, mode) and its gain over the baseline.

    The baseline of a pre-trained method is the non-pre-trained model of the same
    architecture; logistic regression is compared with the baseline of the default
    architecture.
    """
    import pandas as pd

    from keras_ssrl.evaluation.aupc import aupc, paired_bootstrap_gain

    low, high = AUPC_RANGE
    fractions = aupc_fractions(experiment)
    rows = []
    groups = frame.groupby(["architecture", "q", "method", "mode"], sort=True)
    base_arch = f"{experiment.depths[0]}x{experiment.widths[0]}"
    for (arch, q, method, mode), group in groups:
        acc = accuracy_matrix(group, fractions, experiment.repeats)
        if np.isnan(acc).any():
            continue  # incomplete: reported once every run is there
        row = {
            "architecture": arch, "q": q, "method": method, "mode": mode,
            "aupc": aupc(fractions, acc.mean(axis=1)),
            "aupc_normalised": aupc(fractions, acc.mean(axis=1)) / (high - low),
            "repeats": experiment.repeats,
        }  # fmt: skip
        base = frame[
            (frame["method"] == BASELINE)
            & (frame["architecture"] == (base_arch if method == LOGREG else arch))
        ]
        if method != BASELINE and len(base):
            base_acc = accuracy_matrix(base, fractions, experiment.repeats)
            if not np.isnan(base_acc).any():
                stats = paired_bootstrap_gain(fractions, acc, base_acc, n_boot=n_boot)
                row.update(
                    gain_vs_baseline=stats["gain"],
                    ci_low=stats["ci_low"],
                    ci_high=stats["ci_high"],
                )
        rows.append(row)
    columns = ["architecture", "q", "method", "mode", "aupc", "aupc_normalised",
               "gain_vs_baseline", "ci_low", "ci_high", "repeats"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def summarize(out_dir: str, log=print) -> list[str]:
    """Writes the experiment's tables and figures from `results.csv`; returns paths."""
    from keras_ssrl.evaluation import plots

    experiment = load_experiment(out_dir)
    frame = results_frame(os.path.join(out_dir, results_name(None)))
    written = []
    if experiment.kind in ("label-efficiency", "architectures"):
        gains = gain_table(frame, experiment)
        name = (
            "aupc.csv" if experiment.kind == "label-efficiency" else "architectures.csv"
        )
        write_csv_atomic(gains, os.path.join(out_dir, name))
        written.append(os.path.join(out_dir, name))
        if experiment.kind == "label-efficiency":
            path = os.path.join(out_dir, "label_efficiency.png")
            plots.label_efficiency(frame, path, title=experiment.setting)
        else:
            path = os.path.join(out_dir, "architectures.png")
            plots.architectures(gains, path, title=experiment.setting)
        written.append(path)
    elif experiment.kind == "pretrain-size":
        table = (
            frame.groupby(["method", "q", "p"])["accuracy"]
            .agg(["mean", "std", "count"])
            .reset_index()
            .rename(
                columns={"mean": "accuracy", "std": "accuracy_std", "count": "runs"}
            )
        )
        path = os.path.join(out_dir, "pretrain_size.csv")
        write_csv_atomic(table, path)
        figure = os.path.join(out_dir, "pretrain_size.png")
        plots.pretrain_size(table, figure, title=experiment.setting)
        written += [path, figure]
    for path in written:
        log(f"wrote {path}")
    return written


# ------------------------------------------------------------------------- collapse


def run_collapse(
    runs: dict[str, str],
    data_dir: str | None,
    out_dir: str,
    random_baseline: bool = True,
    log=print,
) -> list[str]:
    """Figure 4 (bottom): covariance spectra of encoders on the pre-training validation set.

    Args:
        runs: name -> pre-training RUN_DIR.
        data_dir: the dataset whose `pretrain_val` split is embedded (None: the first
            run's dataset).
        out_dir: receives `collapse.csv` (effective rank, collapsed dimensions, embedding
            std per run), `spectrum.csv` (every singular value) and `collapse.png`.
        random_baseline: also embed with a randomly initialised encoder of the first
            run's architecture (the reference without pre-training).
    """
    import keras

    from keras_ssrl.data import schema
    from keras_ssrl.data.reader import load_dataset
    from keras_ssrl.encoders import build_encoder
    from keras_ssrl.training import ENCODER_FILE, load_run_config

    if not runs:
        raise ProtocolError("collapse needs at least one pre-training run (--runs)")
    check_writable_folder(out_dir)
    encoders = {}
    for name, run_dir in runs.items():
        path = os.path.join(run_dir, ENCODER_FILE)
        if not os.path.exists(path):
            raise ProtocolError(
                f"{run_dir}: no {ENCODER_FILE}; not a finished pre-training run"
            )
        try:
            encoders[name] = keras.saving.load_model(path, compile=False)
        except Exception as error:  # noqa: BLE001 - Keras raises many kinds
            raise ProtocolError(
                f"{path}: cannot be loaded ({type(error).__name__}); resume or redo "
                "the pre-training run"
            ) from None
    if data_dir is None:
        data_dir = (
            (load_run_config(next(iter(runs.values()))) or {})
            .get("data", {})
            .get("dir")
        )
        if data_dir is None:
            raise ProtocolError("pass --data: the runs do not record their dataset")
    n_genes = Manifest.load(data_dir).n_genes
    for name, encoder in encoders.items():
        if encoder.input_shape[-1] != n_genes:
            raise ProtocolError(
                f"{name}: the encoder takes {encoder.input_shape[-1]} genes, "
                f"{data_dir} has {n_genes}"
            )
    first = next(iter(encoders.values()))
    if random_baseline:
        keras.utils.set_random_seed(0)
        encoders["random-init"] = build_encoder(
            first.input_shape[-1],
            layers=sum(isinstance(lay, keras.layers.Dense) for lay in first.layers),
            width=first.output_shape[-1],
        )
    xs = [
        x for x in load_dataset(data_dir, schema.PRETRAIN_VAL, 1024, with_labels=False)
    ]
    with evaluation_lock(out_dir):
        return _write_collapse(encoders, xs, out_dir, log)


def _write_collapse(encoders: dict, xs: list, out_dir: str, log) -> list[str]:
    import pandas as pd

    from keras_ssrl.evaluation.collapse import (
        COLLAPSE_THRESHOLD,
        collapse_metrics,
        covariance_spectrum,
    )

    rows, spectra, long_rows = [], {}, []
    for name, encoder in encoders.items():
        z = np.concatenate([encoder(x, training=False).numpy() for x in xs])
        values = covariance_spectrum(z)
        spectra[name] = values
        rows.append({"run": name, "samples": len(z), "dimensions": z.shape[1],
                     **collapse_metrics(z)})  # fmt: skip
        long_rows += [{"run": name, "rank": i + 1, "singular_value": v}
                      for i, v in enumerate(values)]  # fmt: skip
        log(f"{name}: effective rank {rows[-1]['effective_rank']:.1f}, collapsed "
            f"dimensions {int(rows[-1]['collapsed_dims'])}")  # fmt: skip
    from keras_ssrl.evaluation import plots

    table = os.path.join(out_dir, "collapse.csv")
    write_csv_atomic(pd.DataFrame(rows), table)
    values = os.path.join(out_dir, "spectrum.csv")
    write_csv_atomic(pd.DataFrame(long_rows), values)
    figure = os.path.join(out_dir, "collapse.png")
    plots.spectrum(spectra, figure, title=f"threshold {COLLAPSE_THRESHOLD:g} x max")
    for path in (table, values, figure):
        log(f"wrote {path}")
    return [table, values, figure]
