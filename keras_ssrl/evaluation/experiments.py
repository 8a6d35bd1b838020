"""Experiment specs: what a sweep runs, checked, and how its runs are sharded.

An experiment (label efficiency, architectures, pre-training size) is a list of
*units*; a unit is the runs that share one pre-trained encoder (or one run of the
baseline or of logistic regression) and is the unit of sharding: shard i/n takes its
share of the units (balanced by cost), so each run belongs to exactly one shard
(docs/protocol.md, "Label efficiency and AUPC", "Architecture sweep", "Pre-training
size").

Everything the protocol fixes (grids, AUPC interval, fine-tuning settings) comes from
`keras_ssrl.config`; `validate` checks a request before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from keras_ssrl.config import (
    AUPC_RANGE,
    FULL_REPEATS,
    GRID_PRESETS,
    PRESETS,
    FinetuneConfig,
    PretrainConfig,
)
from keras_ssrl.finetuning import BASELINE, encoder_config_of, validate_finetune_config

LOGREG = "logreg"
SSL_METHODS = ("scarf", "vime", "byol")
METHODS = (BASELINE, *SSL_METHODS, LOGREG)
NO_MODE = "none"  # the baseline and logistic regression have no frozen/unfrozen mode
KINDS = ("label-efficiency", "architectures", "pretrain-size")
SETTINGS = ("tcga", "archs4", "archs4_to_tcga", "custom")
# What each kind of sweep runs unless told otherwise: label efficiency compares every
# method in both modes; the other sweeps fine-tune the networks unfrozen.
DEFAULT_METHODS = {
    "label-efficiency": METHODS,
    "architectures": (BASELINE, *SSL_METHODS),
    "pretrain-size": (BASELINE, *SSL_METHODS),
}
DEFAULT_MODES = {
    "label-efficiency": ("frozen", "unfrozen"),
    "architectures": ("unfrozen",),
    "pretrain-size": ("unfrozen",),
}
GRID_FIELDS = ("methods", "modes", "fractions", "depths", "widths", "pretrain_sizes")


class ProtocolError(ValueError):
    """An invalid experiment request."""


@dataclasses.dataclass(frozen=True, kw_only=True)
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


@dataclasses.dataclass(frozen=True, kw_only=True)
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
    methods: tuple[str, ...] = METHODS
    modes: tuple[str, ...] = ("frozen", "unfrozen")
    fractions: tuple[float, ...] = ()
    repeats: int = 3
    depths: tuple[int, ...] = (4,)
    widths: tuple[int, ...] = (256,)
    pretrain_sizes: tuple[float, ...] = (1.0,)
    pretrained: dict[str, str] = dataclasses.field(default_factory=dict)
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

    def encoder_spec(self, method: str, q: float = 1.0) -> PretrainSpec:
        """The pre-training run of `method` at the default architecture."""
        return PretrainSpec(method=method, layers=self.depths[0], width=self.widths[0],
                            q=q, epochs=self.pretrain_epochs, seed=self.seed)  # fmt: skip


# ------------------------------------------------------------------------- grids


def grid_values(text: str, kind: str, field: str, flag: str) -> tuple[float, ...]:
    """A grid given on a command line: a preset grid's name or a comma list.

    Args:
        text: `full` (the paper's grid), `quick` (the reduced one) or `0.05,0.3`.
        kind: the sweep; the architecture sweep's fractions stop at the AUPC interval.
        field: `fractions` or `pretrain_sizes`.
        flag: the flag, for the error message.

    Ranges are checked later, by `validate`.
    """
    if text in GRID_PRESETS:
        preset = PRESETS[GRID_PRESETS[text]]
        if field == "fractions" and kind == "architectures":
            return preset.architecture_fractions
        return getattr(preset, field)
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ProtocolError(
            f"{flag}: expected full, quick or comma-separated numbers, got {text!r}"
        ) from None


def default_repeats(grid: str | None) -> int:
    """The repeats of a named grid (`quick`: 3); 5 for the paper's or a list."""
    return PRESETS[GRID_PRESETS[grid]].repeats if grid in GRID_PRESETS else FULL_REPEATS


def architecture_of_runs(runs: dict[str, str]) -> tuple[int, int]:
    """The (layers, width) shared by pre-training runs; an error if they differ."""
    found = {name: encoder_config_of(run) for name, run in runs.items()}
    shapes = {(c.layers, c.width) for c in found.values()}
    if len(shapes) > 1:
        listing = ", ".join(f"{n} {c.layers}x{c.width}" for n, c in found.items())
        raise ProtocolError(
            f"the --pretrained encoders differ in architecture ({listing}); a "
            "label-efficiency comparison needs one architecture"
        )
    return shapes.pop()


def with_encoders(experiment: Experiment, pretrain: bool) -> Experiment:
    """A label-efficiency experiment set on its encoders.

    Its architecture is the `pretrained` runs' when there are any; a pre-training
    method without an encoder is refused unless `pretrain` (train it here).
    """
    if experiment.pretrained:
        layers, width = architecture_of_runs(experiment.pretrained)
        experiment = dataclasses.replace(experiment, depths=(layers,), widths=(width,))
    missing = [
        m for m in experiment.methods
        if m in SSL_METHODS and m not in experiment.pretrained
    ]  # fmt: skip
    if missing and not pretrain:
        raise ProtocolError(
            f"no encoder for {', '.join(missing)}: pass --pretrained "
            f"{missing[0]}=RUN_DIR,... or --pretrain to pre-train them here"
        )
    return experiment


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


# -------------------------------------------------------------------- validation


def _in_unit_interval(name: str, values: Iterable[float]) -> None:
    for value in values:
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ProtocolError(f"{name}: {value} is not in (0, 1]")


def _at_least(name: str, values: Iterable[int], minimum: int) -> None:
    for value in values:
        if value < minimum:
            raise ProtocolError(f"{name} must be >= {minimum}, got {value}")


def _validate_names(e: Experiment) -> None:
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


def _validate_grids(e: Experiment) -> None:
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


def validate(experiment: Experiment) -> None:
    """Checks every setting of the experiment; raises an error naming one.

    Called before anything is written, so a refused request leaves no trace.

    Raises:
        ProtocolError: naming the setting (by its evaluate.py flag) and the value.
        FinetuneError: a fine-tuning setting (`validate_finetune_config`).
    """
    _validate_names(experiment)
    _validate_grids(experiment)
    validate_finetune_config(experiment.finetune)
    foreign = set(experiment.pretrained) - set(SSL_METHODS)
    if foreign:
        raise ProtocolError(
            f"--pretrained names {', '.join(sorted(foreign))}; pre-trained encoders "
            f"are for {', '.join(SSL_METHODS)}"
        )
    if experiment.kind in ("label-efficiency", "architectures"):
        # Summarised by AUPC: refuse a grid it cannot integrate.
        aupc_fractions(experiment)


# ------------------------------------------------------------------------- units


def _pretrained_units(e: Experiment, method: str, layers: int, width: int):
    """The units of a pre-training method at one architecture, one per q."""
    arch = f"{layers}x{width}"
    modes = e.modes if e.kind == "label-efficiency" else ("unfrozen",)
    for q in e.pretrain_sizes:
        pre = PretrainSpec(method=method, layers=layers, width=width, q=q,
                           epochs=e.pretrain_epochs, seed=e.seed)  # fmt: skip
        runs = [
            RunSpec(setting=e.setting, method=method, mode=mode, layers=layers,
                    width=width, q=q, p=p, repeat=r)
            for mode in modes
            for p in e.fractions
            for r in range(e.repeats)
        ]  # fmt: skip
        if e.kind == "label-efficiency":
            # Encoders are ready before the sweep: split finely.
            yield from (
                Unit(f"{arch}/{method}/{'/'.join(run.key)}", pre, [run]) for run in runs
            )
        else:
            yield Unit(f"{arch}/{method}/q{q:g}", pre, runs)


def _plain_units(e: Experiment, method: str, layers: int, width: int):
    """One unit per run of the baseline or of logistic regression."""
    for p in e.fractions:
        for r in range(e.repeats):
            run = RunSpec(setting=e.setting, method=method, mode=NO_MODE,
                          layers=layers, width=width, q=1.0, p=p, repeat=r)  # fmt: skip
            yield Unit(f"{layers}x{width}/{method}/{p:g}/{r}", None, [run])


def build_units(experiment: Experiment) -> list[Unit]:
    """The experiment's runs, grouped by the encoder they share."""
    validate(experiment)
    e = experiment
    units: list[Unit] = []
    for layers in e.depths:
        for width in e.widths:
            for method in e.methods:
                if method in SSL_METHODS:
                    units += _pretrained_units(e, method, layers, width)
                elif method != LOGREG or (layers, width) == (e.depths[0], e.widths[0]):
                    # Logistic regression has no encoder: one set of runs is enough.
                    units += _plain_units(e, method, layers, width)
    return units


# ----------------------------------------------------------------------- sharding


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
