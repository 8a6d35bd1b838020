"""Configuration dataclasses and the protocol's defaults, in one place.

Every default of `docs/protocol.md` that the package implements lives here, and
every run writes the resolved values next to its outputs (`dataclasses.asdict`). Where the
protocol is silent, the choice made is documented on the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# TCGA in the paper: 9349 samples -> 7291 pre-training / 1029 fine-tuning / 1029 test.
# The default fractions reproduce that ratio (1029 / 9349 = 0.110).
TCGA_FINETUNE_FRACTION = 1029 / 9349
# ARCHS4: 50,997 / 1142 / 1142 (1142 / 53,281 = 0.0214); a preset for ARCHS4-like data.
ARCHS4_FINETUNE_FRACTION = 1142 / 53281
# One labelled cohort of 100-300 samples, pre-trained on elsewhere (docs/small-cohorts.md).
# The paper's ratio leaves such a cohort a handful of fine-tuning and test samples (158
# samples: 13 training, 4 validation, 17 test), where every method scores at chance and
# a test accuracy moves by 6% per sample. Pre-training on the cohort is not the point,
# so half goes to fine-tuning and 30% to test: 158 samples give 67 training, 12
# validation and 47 test samples. The last 20% (27 + 5 samples) stay as the pre-training
# split because the standardisation statistics are fitted there, on samples that are
# never scored, and 20-30 samples estimate a gene's mean and spread well enough.
COHORT_FINETUNE_FRACTION = 0.5
COHORT_TEST_FRACTION = 0.3
# The `--split-sizes` presets of tfrecords_tools/convert.py: `SplitConfig` fields by name.
SPLIT_PRESETS = {
    "tcga": {"finetune_size": TCGA_FINETUNE_FRACTION},
    "archs4": {"finetune_size": ARCHS4_FINETUNE_FRACTION},
    "cohort": {
        "finetune_size": COHORT_FINETUNE_FRACTION,
        "test_size": COHORT_TEST_FRACTION,
    },
}
# BYOL's target decay schedules (`keras_ssrl.losses.ema_decay`).
EMA_SCHEDULES = ("cosine", "constant")
# The pre-training methods (`keras_ssrl.methods` builds them by these names).
METHODS = ("scarf", "vime", "byol")
# Keras dtype policies a run may ask for (`auto`: see training.resolve_precision).
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
# Which encoder a pre-training run keeps: the last one, or the best validation loss.
KEEP = ("last", "best")


@dataclass
class SplitConfig:
    """How samples are split (docs/protocol.md, "Splits").

    Attributes:
        finetune_size: fraction (0 < f < 1) of the labelled samples, or a count (>= 1),
            that forms the labelled fine-tuning set (its training and validation parts).
        test_size: fraction or count for the test set; None means "the size of the
            fine-tuning set", as in the paper.
        val_fraction: fraction of both the pre-training and the fine-tuning set held out
            for validation (15%).
        min_class_size: classes with fewer samples cannot be stratified into test,
            fine-tuning training and fine-tuning validation (one each) plus pre-training
            (one each for training and validation); the converter refuses them unless
            `drop_small_classes` is set, in which case their samples are dropped and
            counted in the report.
        seed: int, the split seed. Splits are deterministic given the seed and are saved
            as `splits.csv`.
    """

    finetune_size: float = TCGA_FINETUNE_FRACTION
    test_size: float | None = None
    val_fraction: float = 0.15
    min_class_size: int = 5
    drop_small_classes: bool = False
    seed: int = 0


@dataclass
class ConversionConfig:
    """How a source is turned into TFRecords.

    Attributes:
        values: what the source holds: `counts`, `tpm` (both non-negative; the transform
            is applied) or `log2` (already log-transformed, e.g. UCSC Xena matrices:
            stored as they are so that log is never applied twice).
        transform: `log2p1` (`log2(x + 1)`, the protocol default), `log1p` (natural),
            `cpm_log2p1` (counts per million over all genes of the sample, then
            `log2(x + 1)`) or `none`. Ignored (forced to `none`) for `values="log2"`.
        record_dtype: `float16` (default: half the bytes, twice the read rate, error far
            below technical noise) or `float32` (exact).
        shards: number of shards for the largest split; smaller splits get
            proportionally fewer (at least one), so every shard holds a similar number
            of records.
        block_size: samples read from the source at a time; bounds memory. None
            picks about 64 MiB of float32 per block (1024 samples at 16k genes, 294
            at 57k).
        duplicate_genes: `error`, or how rows with the same gene id are merged: `sum`
            (counts of the same gene from several rows), `mean`, `first` or `unique`
            (renamed `ID`, `ID-2`, ...). Every merge is reported.
        strip_versions: strip Ensembl version suffixes (`ENSG00000000003.15` ->
            `ENSG00000000003`), so that sources on different GENCODE releases align.
        par_y: `drop` (default) or `keep` the GENCODE `_PAR_Y` rows (pseudo-autosomal
            copies on chromosome Y, duplicates of the X rows, all zero in GDC files).
        missing_values: `error` on any NaN / missing cell (default), `zero` (set to 0)
            or `drop-genes` (remove genes with any missing value); counts reported.
        missing_labels: when a labelled dataset has samples without a label: `error`
            (default), `unlabelled` (they join the pre-training split with label -1) or
            `drop` (removed); counts reported.
        min_variance: genes whose variance of the stored values on the pre-training split
            is at or below this are dropped (protocol: zero-variance genes), recorded in
            the manifest.
        align_min_overlap: when aligning to another dataset's gene list, refuse if fewer
            than this fraction of the target's genes are matched.
    """

    values: str = "counts"
    transform: str = "log2p1"
    record_dtype: str = "float16"
    shards: int = 8
    block_size: int | None = None
    duplicate_genes: str = "error"
    strip_versions: bool = True
    par_y: str = "drop"
    missing_values: str = "error"
    missing_labels: str = "error"
    min_variance: float = 0.0
    align_min_overlap: float = 0.5
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class EncoderConfig:
    """The MLP encoder shared by every method and the baseline (docs/protocol.md, "Encoder").

    Attributes:
        layers: number of [Dense -> BatchNorm -> ReLU] blocks (4).
        width: units of every block, and so the embedding size (256).
        dropout: dropout rate after each block (0: off).
    """

    layers: int = 4
    width: int = 256
    dropout: float = 0.0


@dataclass
class ScarfConfig:
    """SCARF (docs/protocol.md, "SCARF").

    Attributes:
        corruption_rate: fraction c of the features replaced in each example (0.3):
            each feature of each example is chosen with probability c, afresh at
            every step.
        temperature: InfoNCE temperature tau (1.0, as in SCARF).
        projector_hidden, projector_dim: the 2-layer ReLU projector (256, 256).
    """

    corruption_rate: float = 0.3
    temperature: float = 1.0
    projector_hidden: int = 256
    projector_dim: int = 256


@dataclass
class VimeConfig:
    """VIME self-supervised (docs/protocol.md, "VIME").

    Attributes:
        mask_rate: p_m, probability that a feature is masked, drawn afresh every step
            (0.3).
        alpha: weight of the feature-reconstruction loss, L = L_m + alpha * L_f (2.0).
    """

    mask_rate: float = 0.3
    alpha: float = 2.0


@dataclass
class ByolConfig:
    """BYOL (docs/protocol.md, "BYOL").

    Attributes:
        corruption_rate: p of the VIME-style corruption making the target's view (0.3).
        hidden: hidden units of projector and predictor, Dense -> BN -> ReLU -> Dense
            (4096).
        projection_dim: output of projector and predictor (256).
        ema_base: lambda_base of the EMA of the target (0.99).
        ema_schedule: `cosine` (lambda from ema_base to 1 over training, BYOL) or
            `constant`.
        symmetric: add the swapped term (online sees x~, target sees x), as in the BYOL
            paper.
    """

    corruption_rate: float = 0.3
    hidden: int = 4096
    projection_dim: int = 256
    ema_base: float = 0.99
    ema_schedule: str = "cosine"
    symmetric: bool = False


@dataclass
class PretrainConfig:
    """Pre-training defaults (docs/protocol.md, "Pre-training").

    Attributes:
        method: `scarf`, `vime` or `byol`.
        epochs: passes over the pre-training split. The default (20) is what fits a
            few minutes on 2 CPU cores with the built-in data; the paper's runs are
            longer, set it to your budget.
        batch_size: global batch size (256).
        learning_rate: Adam learning rate (1e-4, the authors' code).
        seed: seed of weights, corruption and data order.
        pretrain_fraction: q, the fraction of the pre-training split used (1.0); the
            subset is a deterministic function of the seed (Figure 5).
        precision: `auto` (mixed_float16 on a GPU with compute capability >= 7.0,
            float32 on CPU), `float32`, `mixed_float16` or `mixed_bfloat16`.
        keep: `last` or `best` (by validation pretext loss): the encoder kept.
    """

    method: str = "scarf"
    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 1e-4
    seed: int = 0
    pretrain_fraction: float = 1.0
    precision: str = "auto"
    keep: str = "last"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    scarf: ScarfConfig = field(default_factory=ScarfConfig)
    vime: VimeConfig = field(default_factory=VimeConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)


# Label-efficiency grids (docs/protocol.md, "Label efficiency and AUPC"): the paper's 99
# fractions with 5 repeats, and the reduced preset for quick runs.
FULL_FRACTIONS = tuple(round(0.01 * i, 2) for i in range(2, 101))
QUICK_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
FULL_REPEATS = 5
QUICK_REPEATS = 3
# AUPC integrates the mean accuracy curve over this interval of p (eq. 3).
AUPC_RANGE = (0.02, 0.3)
# Pre-training set sizes q of Figure 5: 0.01..0.05 step 0.01, then 0.05..1.00 step 0.05.
FULL_PRETRAIN_SIZES = tuple(round(0.01 * i, 2) for i in range(1, 5)) + tuple(
    round(0.05 * i, 2) for i in range(1, 21)
)
# Architecture sweep of Figure 4: depth 2..10 x width {256, 1024}.
FULL_DEPTHS = tuple(range(2, 11))
FULL_WIDTHS = (256, 1024)


@dataclass
class FinetuneConfig:
    """Fine-tuning (docs/protocol.md, "Fine-tuning").

    Attributes:
        mode: `unfrozen` (encoder and head trained) or `frozen` (encoder weights fixed,
            BatchNorm in inference mode, only the head trained). The non-pre-trained
            baseline is always trained end to end: a frozen random encoder is not the
            paper's baseline (its Figure 3 compares both modes with the same baseline).
        fraction: p, the fraction of the fine-tuning training split used; the subset is
            stratified and keeps at least one example per class.
        repeat: index of the repeat; with `seed` it fixes the subset and the
            initialisation, so the same (p, repeat) gives every method the same subset.
        learning_rate: Adam learning rate (1e-4).
        batch_size: 8.
        max_epochs: at most 100 epochs.
        patience: early stopping on the validation loss with this patience (30); the
            weights of the best epoch are restored.
        seed: base seed of subsets and initialisation.

    The validation split (`finetune_val`) is used whole for early stopping at every p:
    the protocol subsamples only the fine-tuning training set. The test split is read
    only to score the final model.
    """

    mode: str = "unfrozen"
    fraction: float = 1.0
    repeat: int = 0
    learning_rate: float = 1e-4
    batch_size: int = 8
    max_epochs: int = 100
    patience: int = 30
    seed: int = 0


def auto_block_size(n_genes: int, budget_bytes: int = 64 << 20) -> int:
    """Samples per block so that one float32 block takes about `budget_bytes`."""
    return int(min(1024, max(16, budget_bytes // (4 * max(n_genes, 1)))))


def to_dict(config) -> dict:
    """The resolved values of a config dataclass, for writing next to outputs."""
    return dataclasses.asdict(config)


# ------------------------------------------------- loading and validating configs


class ConfigError(ValueError):
    """A setting of the run is invalid; the message names it.

    `field` is the setting's config path (`scarf.corruption_rate`) when there is one,
    so that a command line can name its own flag.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def config_from_dict(data: dict) -> PretrainConfig:
    """Builds a `PretrainConfig` from a nested dict (a preset or a run's config.json).

    Missing keys keep their defaults; unknown keys are refused, so a typo in a preset
    never goes unnoticed. A run's `config.json` (with a top-level `config` entry) is
    accepted as it is.

    Args:
        data: dict, as written by `to_dict(config)`, possibly partial.

    Returns:
        A `PretrainConfig`.

    Example:

    ```python
    config = config_from_dict({"method": "byol", "byol": {"ema_base": 0.996}})
    ```
    """
    if "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    sections = {
        "encoder": EncoderConfig,
        "scarf": ScarfConfig,
        "vime": VimeConfig,
        "byol": ByolConfig,
    }

    def build(cls, values: dict, where: str):
        if not isinstance(values, dict):
            raise ConfigError(f"config entry {where or 'root'!r} must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                f"known: {', '.join(sorted(names))}"
            )
        defaults = cls()
        kwargs = {}
        for key, value in values.items():
            if where == "" and key in sections:
                value = build(sections[key], value, f"{key}.")
            else:
                value = _typed(value, getattr(defaults, key), where + key)
            kwargs[key] = value
        return cls(**kwargs)

    return build(PretrainConfig, dict(data), "")


def _typed(value, default, name: str):
    """`value` checked against the type of the field's default (ints pass as floats)."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"config {name} must be {kind.__name__}, got {value!r}")
    return value


def _at_least_one(value) -> bool:
    return value >= 1


def _rate(value) -> bool:
    return 0 <= value <= 1


def _positive(value) -> bool:
    return 0 < value < math.inf


# The accepted range of every numeric setting: (config path, test, what the message
# says). NaN fails every comparison, so the tests refuse it too. Corruption and mask
# rates take what `MarginalCorruption` takes: 0 (no corruption) to 1 (every cell).
_RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("epochs", _at_least_one, "at least 1"),
    ("batch_size", _at_least_one, "at least 1"),
    ("learning_rate", _positive, "a finite number > 0"),
    # keras.utils.set_random_seed seeds NumPy's legacy generator: 32 bits.
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("pretrain_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("encoder.layers", _at_least_one, "at least 1"),
    ("encoder.width", _at_least_one, "at least 1"),
    ("encoder.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("scarf.corruption_rate", _rate, "in [0, 1]"),
    ("scarf.temperature", _positive, "a finite number > 0"),
    ("scarf.projector_hidden", _at_least_one, "at least 1"),
    ("scarf.projector_dim", _at_least_one, "at least 1"),
    ("vime.mask_rate", _rate, "in [0, 1]"),
    ("vime.alpha", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    ("byol.corruption_rate", _rate, "in [0, 1]"),
    ("byol.hidden", _at_least_one, "at least 1"),
    ("byol.projection_dim", _at_least_one, "at least 1"),
    ("byol.ema_base", _rate, "in [0, 1]"),
)


def _choices() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (
        ("method", METHODS),
        ("precision", PRECISIONS),
        ("keep", KEEP),
        ("byol.ema_schedule", EMA_SCHEDULES),
    )


def _leaves(config, prefix: str = ""):
    """`(path, value, default)` of every setting of a config dataclass, nested ones too."""
    defaults = type(config)()
    for f in dataclasses.fields(config):
        value, default = getattr(config, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, default


def _check_type(path: str, value, default) -> None:
    # NumPy integers and floats pass (a sweep may build configs from arrays).
    if isinstance(default, bool):
        ok = isinstance(value, (bool, np.bool_))
    elif isinstance(default, int):
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"config {path} must be {type(default).__name__}, got {value!r}", path
        )


def validate_config(config: PretrainConfig) -> None:
    """Checks every setting, of every method; raises `ConfigError` naming the field.

    Runs before anything is written: a setting the model would refuse later must not
    leave a run folder (and its `config.json`) behind. Method sections other than
    `config.method`'s are checked too: they are recorded in `config.json`, and a
    preset is either valid or refused.
    """
    if not isinstance(config, PretrainConfig):
        raise ConfigError(f"expected a PretrainConfig, got {type(config).__name__}")
    values = {}
    for path, value, default in _leaves(config):
        _check_type(path, value, default)
        values[path] = value
    for path, allowed in _choices():
        if values[path] not in allowed:
            raise ConfigError(
                f"{path} must be one of {', '.join(allowed)}, got {values[path]!r}",
                path,
            )
    for path, accepted, expected in _RANGES:
        if not accepted(values[path]):
            raise ConfigError(f"{path} must be {expected}, got {values[path]!r}", path)


# --------------------------------------------------------------------------- presets

# Label fractions of the architecture sweep: its gains are AUPCs, integrated over
# AUPC_RANGE only, so the paper's grid stops at p = 0.3 (step 0.01).
FULL_ARCHITECTURE_FRACTIONS = tuple(round(0.01 * i, 2) for i in range(2, 31))
# p of the pre-training-size sweep (Figure 5 fine-tunes unfrozen at p = 0.1).
PRETRAIN_SIZE_FRACTION = 0.1


@dataclass(frozen=True)
class Preset:
    """The grids of the paper's experiments at one scale (docs/protocol.md).

    Attributes:
        name: the key of `PRESETS`.
        fractions: label fractions p of the label-efficiency sweep.
        architecture_fractions: p of the architecture sweep (inside `AUPC_RANGE`).
        pretrain_sizes: pre-training fractions q of the pre-training-size sweep.
        repeats: repeats per (method, p).
        depths, widths: the encoders of the architecture sweep.
        layers, width: the encoder of the label-efficiency and pre-training-size
            sweeps.
    """

    name: str
    fractions: tuple[float, ...]
    architecture_fractions: tuple[float, ...]
    pretrain_sizes: tuple[float, ...]
    repeats: int
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    layers: int = EncoderConfig.layers
    width: int = EncoderConfig.width


PRESETS = {
    # The reduced grids: 7 fractions (5 inside the AUPC interval), 3 repeats, depths
    # 2, 4, 6 at width 256, q in {0.05, 0.2, 1}.
    "quick": Preset(
        name="quick",
        fractions=QUICK_FRACTIONS,
        architecture_fractions=tuple(p for p in QUICK_FRACTIONS if p <= AUPC_RANGE[1]),
        pretrain_sizes=(0.05, 0.2, 1.0),
        repeats=QUICK_REPEATS,
        depths=(2, 4, 6),
        widths=(256,),
    ),
    # The paper's grids: 99 fractions x 5 repeats, depth 2..10 x width 256/1024,
    # Figure 5's 24 values of q.
    "paper": Preset(
        name="paper",
        fractions=FULL_FRACTIONS,
        architecture_fractions=FULL_ARCHITECTURE_FRACTIONS,
        pretrain_sizes=FULL_PRETRAIN_SIZES,
        repeats=FULL_REPEATS,
        depths=FULL_DEPTHS,
        widths=FULL_WIDTHS,
    ),
    # A minutes-long check that the whole pipeline runs on a dataset before a long
    # run: tiny encoders (2 x 16), two fractions, one repeat. Not a result.
    "smoke": Preset(
        name="smoke",
        fractions=(0.05, 0.3),
        architecture_fractions=(0.05, 0.3),
        pretrain_sizes=(0.5, 1.0),
        repeats=1,
        depths=(1, 2),
        widths=(16,),
        layers=2,
        width=16,
    ),
}
# The grid names a command line accepts (`--fractions full`) and their presets.
GRID_PRESETS = {"full": "paper", "quick": "quick"}


@dataclass(frozen=True)
class Sweep:
    """One experiment of a reproduction, with its grids (`reproduction_plan`).

    Attributes:
        kind: `label-efficiency`, `architectures` or `pretrain-size`.
        folder: its sub-folder of the reproduction folder.
        fractions: label fractions p.
        repeats: repeats per (method, p).
        depths, widths: encoder architectures.
        pretrain_sizes: pre-training fractions q.
    """

    kind: str
    folder: str
    fractions: tuple[float, ...]
    repeats: int
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    pretrain_sizes: tuple[float, ...] = (1.0,)


# Sub-folders of a reproduction: the pre-training runs every sweep shares, and the
# covariance spectra of the label-efficiency encoders (Figure 4, bottom).
REPRODUCTION_PRETRAIN = "pretrain"
REPRODUCTION_COLLAPSE = "collapse"


def reproduction_plan(preset: str) -> tuple[Sweep, ...]:
    """The sweeps `scripts/reproduce.py` runs, in order, for a preset of `PRESETS`.

    Figure 3 (label efficiency) comes first: its encoders (the preset's `layers` x
    `width`, q = 1) are reused by the other sweeps and embedded for Figure 4's
    collapse spectra.
    """
    grids = PRESETS[preset]
    encoder = {"depths": (grids.layers,), "widths": (grids.width,)}
    return (
        Sweep("label-efficiency", "label-efficiency", grids.fractions, grids.repeats,
              **encoder),
        Sweep("architectures", "architectures", grids.architecture_fractions,
              grids.repeats, grids.depths, grids.widths),
        Sweep("pretrain-size", "pretrain-size", (PRETRAIN_SIZE_FRACTION,),
              grids.repeats, pretrain_sizes=grids.pretrain_sizes, **encoder),
    )  # fmt: skip
