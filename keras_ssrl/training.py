"""The pre-training driver: data, precision, model, callbacks, checkpoints, outputs.

`run_pretraining` is everything `scripts/pretrain.py` does. A run folder (`RUN_DIR`)
holds:

- `encoder.keras`: the kept encoder (last or best by validation loss), saved in
  float32 whatever the training precision, loadable with plain Keras;
- `config.json`: the resolved configuration, the data (folder, manifest digest, gene
  count and gene-list digest, subset size), the resolved precision and the run layout;
- `history.csv`: one row per epoch (losses, their components, collapse monitors);
- `logs/`: TensorBoard (`train`, `validation`, and `embeddings` for the projector);
- `checkpoints/`: the two newest training checkpoints (see below);
- `summary.json`: final losses, steps, epochs, time, samples/s, the encoder kept.

Fault tolerance. A checkpoint (`tf.train.Checkpoint`, written atomically by
`keras_ssrl.callbacks.CheckpointStore`) holds the model (BYOL's target network
included), the optimizer (moments, iteration count, and the loss scale under
`mixed_float16`), every `SeedGenerator` state of the model (corruption, dropout), the
best-encoder copy, and the step. The data order is a pure function of the seed and the
epoch (epoch `e` is shuffled with a seed derived from `(seed, e)`), so a resumed run
re-creates the input of its current epoch and skips the batches already done: it ends
at the same step as an uninterrupted run, with the same batches, corruption and weights.
A SIGTERM writes a checkpoint at the end of the current step and stops
(`TrainingInterrupted`); `scripts/pretrain.py --resume` continues. A SIGTERM that
arrives once training has finished (while the encoder and summary are written) lets the
run complete.

One process per run folder: the driver validates every setting, the data and the
folder first (a refused run leaves nothing behind), then holds an exclusive lock on
RUN_DIR (`keras_ssrl.files.FolderLock`) for the whole run; a second process is refused,
naming the holder's PID.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import math
import numbers
import os
import re
import signal
import threading
import time
from collections.abc import Callable

import numpy as np

from keras_ssrl import __version__
from keras_ssrl.config import (
    EMA_SCHEDULES,
    ByolConfig,
    EncoderConfig,
    PretrainConfig,
    ScarfConfig,
    VimeConfig,
    to_dict,
)
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DamagedDataError, DataError, preview
from keras_ssrl.data.manifest import (
    SPLITS_CSV,
    Manifest,
    atomic_path,
    genes_digest,
    join,
    open_file,
    write_json_atomic,
)
from keras_ssrl.files import (
    LOCK_FILE,
    FolderLock,
    LockedError,
    remove_stale_temporaries,
)

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTE = ("none", "mirrored")
KEEP = ("last", "best")
DEFAULT_BUILTIN = "synthetic-tcga"
# Checkpoint period in steps: about a minute of training at 57k genes on a CPU, and
# a negligible cost on small data (epoch ends are always checkpointed as well).
DEFAULT_CHECKPOINT_EVERY = 200
# Rows of the pre-training validation split embedded for the collapse monitors:
# enough for the rank of a 256-wide embedding to be measurable, cheap every epoch.
COLLAPSE_ROWS = 2048
# Rows written to the TensorBoard embedding projector (it handles this many well).
PROJECTOR_ROWS = 10000
# Records held by the shuffle buffers (the reader's default).
SHUFFLE_BUFFER = 2048
# A pre-training subset (pretrain_fraction < 1) is decoded once and kept in memory
# below this size; above it, it is re-read (and filtered) every epoch.
SUBSET_CACHE_BYTES = 2 << 30

CONFIG_JSON = "config.json"
SUMMARY_JSON = "summary.json"
HISTORY_CSV = "history.csv"
ENCODER_FILE = "encoder.keras"
LOGS_DIR = "logs"
CHECKPOINTS_DIR = "checkpoints"
PROJECTOR_DIR = "embeddings"


class ConfigError(ValueError):
    """A setting of the run is invalid; the message names it.

    `field` is the setting's config path (`scarf.corruption_rate`) when there is one,
    so that a command line can name its own flag.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class RunDirError(ValueError):
    """RUN_DIR cannot be used: it holds another run, or a different one to resume."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; `step` is the global step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(RuntimeError):
    """Training stopped on request (SIGTERM) after writing a checkpoint."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------- config


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
    from keras_ssrl.methods import METHODS

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


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy for `precision`.

    `auto` is `mixed_float16` when every visible GPU has compute capability >= 7.0
    (tensor cores), else `float32` (CPUs gain nothing from float16).

    Args:
        precision: `auto`, `float32`, `mixed_float16` or `mixed_bfloat16`.

    Returns:
        A policy name other than `auto`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "float32"
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        if tuple(details.get("compute_capability") or (0, 0)) < (7, 0):
            return "float32"
    return "mixed_float16"


# ----------------------------------------------------------------------------- data


def _read_split_ids(data_dir: str, split: str) -> list[str]:
    path = join(data_dir, SPLITS_CSV)
    try:
        with open_file(path, "rb") as handle:
            lines = handle.read().decode("utf-8").splitlines()
        return [
            row["sample_id"] for row in csv.DictReader(lines) if row["split"] == split
        ]
    except (OSError, UnicodeDecodeError, KeyError) as error:
        raise DataError(
            f"{path}: unreadable ({type(error).__name__}: {error}); re-run the "
            "conversion or check the folder with python tfrecords_tools/inspect.py"
        ) from None


def pretrain_subset(data_dir: str, fraction: float, seed: int) -> list[str] | None:
    """The sample ids of the pre-training subset for `pretrain_fraction`.

    `round(fraction * n)` samples (at least one) of the `pretrain` split, the first of
    a permutation drawn from `seed`: deterministic, and nested (for one seed, the
    subset of a smaller fraction is part of that of a larger one), as the
    pre-training-size experiment (Figure 5) wants.

    Args:
        data_dir: str, a converted dataset folder (its `splits.csv` is read).
        fraction: float in (0, 1].
        seed: int.

    Returns:
        The ids in file order, or None for `fraction == 1` (the whole split).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"pretrain_fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return None
    manifest = Manifest.load(data_dir)
    ids = _read_split_ids(data_dir, schema.PRETRAIN)
    if len(ids) != manifest.num_records(schema.PRETRAIN):
        raise DataError(
            f"{data_dir}: {SPLITS_CSV} lists {len(ids)} pre-training samples, the "
            f"manifest {manifest.num_records(schema.PRETRAIN)}; re-run the conversion"
        )
    n = max(1, int(round(fraction * len(ids))))
    # A generator of its own: the subset must not depend on what else uses the seed.
    rng = np.random.default_rng([int(seed), 0x5B5E7])
    chosen = np.sort(rng.permutation(len(ids))[:n])
    return [ids[i] for i in chosen]


def steps_per_epoch(n_samples: int, batch_size: int, min_rows: int = 2) -> int:
    """`ceil(n / batch_size)`, less a final batch of fewer than `min_rows` samples.

    A final batch of one sample gives BatchNorm a zero variance and a contrastive loss
    no negatives (and, over several replicas, leaves some empty): it is dropped.
    """
    full, rest = divmod(int(n_samples), int(batch_size))
    steps = full + (1 if rest >= min_rows else 0)
    if steps < 1:
        raise DataError(
            f"the pre-training set has {n_samples} sample(s), fewer than {min_rows} "
            "needed for one batch; use a larger pretrain_fraction or dataset"
        )
    return steps


_DATA_GLOBAL_SEED = 0x5EED


def _epoch_seed(seed, epoch):
    # Distinct, reproducible shuffle seeds per (seed, epoch); works on tensors too.
    return seed * 1_000_003 + epoch + 1


def _min_rows_filter(min_rows: int):
    import tensorflow as tf

    return lambda x: tf.shape(x)[0] >= min_rows


def make_train_data(
    data_dir: str,
    batch_size: int,
    seed: int,
    subset: list[str] | None = None,
    min_rows: int = 2,
    n_genes: int | None = None,
):
    """A function `(first_epoch, end_epoch) -> tf.data.Dataset` of training batches.

    Epoch `e` holds the pre-training split (or `subset`) shuffled with a seed derived
    from `(seed, e)`, in `ceil(n / batch_size)` batches (a final batch smaller than
    `min_rows` is dropped, see `steps_per_epoch`); epochs follow one another without
    mixing. The order of any epoch is thus known without replaying earlier ones, which
    is what lets a resumed run see exactly the batches an uninterrupted run would.
    Labels are never read. Sets TensorFlow's global seed (to a constant).

    Args:
        data_dir: str, a converted dataset folder.
        batch_size: int, the global batch size.
        seed: int.
        subset: optional list of pre-training sample ids to keep.
        min_rows: int, the smallest batch kept.
        n_genes: int, for the in-memory cache estimate of a subset.

    Returns:
        A callable `(first_epoch, end_epoch) -> tf.data.Dataset`.
    """
    import tensorflow as tf

    from keras_ssrl.data.reader import load_dataset

    # The per-epoch shuffle seeds are tensors; TensorFlow pairs them with its global
    # seed and compares the pair with (0, 0) in Python, which fails on a tensor when
    # the global seed is 0 (e.g. after `keras.utils.set_random_seed(0)`). A fixed,
    # non-zero global seed also makes the order independent of the caller's seeding.
    tf.random.set_seed(_DATA_GLOBAL_SEED)
    keep_batch = _min_rows_filter(min_rows)
    if subset is None:

        def one_epoch(epoch):
            return load_dataset(
                data_dir,
                schema.PRETRAIN,
                batch_size,
                shuffle=True,
                seed=_epoch_seed(tf.constant(seed, tf.int64), epoch),
                shuffle_buffer=SHUFFLE_BUFFER,
                with_labels=False,
            ).filter(keep_batch)

    else:
        keys = tf.constant(subset, dtype=tf.string)
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, tf.bool)),
            default_value=False,
        )
        rows = load_dataset(
            data_dir,
            schema.PRETRAIN,
            256,
            with_labels=False,
            with_sample_ids=True,
        )
        rows = rows.map(lambda x, ids: tf.boolean_mask(x, table.lookup(ids))).unbatch()
        if len(subset) * 4 * int(n_genes or 0) <= SUBSET_CACHE_BYTES:
            # Read and decode the subset once: later epochs cost a shuffle in memory.
            rows = rows.cache()
        buffer = min(len(subset), SHUFFLE_BUFFER)

        def one_epoch(epoch):
            shuffled = rows.shuffle(
                buffer, seed=_epoch_seed(tf.constant(seed, tf.int64), epoch)
            )
            return shuffled.batch(batch_size).filter(keep_batch)

    def epochs(first: int, end: int):
        ds = tf.data.Dataset.range(first, end).flat_map(one_epoch)
        return ds.prefetch(tf.data.AUTOTUNE)

    return epochs


# ------------------------------------------------------------------------- run dir


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}{key}.", item, out)
    else:
        out[prefix[:-1]] = value
    return out


def _check_same_run(saved: dict, current: dict, run_dir: str) -> None:
    """Raises `RunDirError` naming every difference that forbids a resume."""
    problems = []
    old_cfg = _flatten("", saved.get("config", {}), {})
    new_cfg = _flatten("", current["config"], {})
    if old_cfg.get("method") != new_cfg.get("method"):
        problems.append(
            f"method: the run used {old_cfg.get('method')!r}, now "
            f"{new_cfg.get('method')!r}"
        )
    old_data, new_data = saved.get("data", {}), current["data"]
    if old_data.get("genes_sha256") != new_data["genes_sha256"]:
        problems.append(
            f"gene list: the run used {old_data.get('n_genes')} genes (digest "
            f"{str(old_data.get('genes_sha256'))[:12]}), the data now has "
            f"{new_data['n_genes']} (digest {new_data['genes_sha256'][:12]})"
        )
    elif old_data.get("manifest_sha256") != new_data["manifest_sha256"]:
        problems.append(
            "dataset: same genes but another manifest (digest "
            f"{str(old_data.get('manifest_sha256'))[:12]} vs "
            f"{new_data['manifest_sha256'][:12]}): other samples or statistics"
        )
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key == "method":
            continue
        if old_cfg.get(key) != new_cfg.get(key):
            problems.append(
                f"config {key}: the run used {old_cfg.get(key)!r}, now "
                f"{new_cfg.get(key)!r}"
            )
    if saved.get("precision") != current["precision"]:
        problems.append(
            f"precision: the run used {saved.get('precision')!r}, now "
            f"{current['precision']!r}"
        )
    if problems:
        raise RunDirError(
            f"cannot resume {run_dir}: it is a different run:\n  - "
            + "\n  - ".join(problems)
            + "\nResume with the run's own settings (by default --resume reuses them) "
            "or choose another RUN_DIR."
        )


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def load_run_config(run_dir: str) -> dict | None:
    """The `config.json` of a run folder, or None when there is none.

    Raises:
        RunDirError: the file exists but is not a JSON object (damaged or foreign).
    """
    path = os.path.join(run_dir, CONFIG_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunDirError(f"{path}: unreadable ({error})") from None
    if not isinstance(record, dict):
        raise RunDirError(f"{path}: not a run's config.json (not a JSON object)")
    return record


def stale_temporaries_pattern(names) -> str:
    """A regex for the temporaries `atomic_path` leaves for `names` when killed.

    Only those of the run's own files: a user's file is never matched.
    """
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"(?:{alternatives})\.tmp-(?P<pid>\d+)(?:\.keras)?"


def check_output_folder(
    path: str,
    own: tuple[str, ...],
    what: str,
    error: type = RunDirError,
    own_files: bool = False,
) -> None:
    """Refuses a path that is not a folder, or a folder holding anything foreign.

    A new run may go into a missing or empty folder, or one holding only what an
    earlier, interrupted attempt of this tool leaves (its lock file, the temporaries
    of `own`, and with `own_files` the files `own` themselves): writing a run among a
    user's files could overwrite them.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise error(
            f"{path} exists and is not a folder; choose a folder for the {what}"
        )
    if not os.path.isdir(path):
        return
    temporary = re.compile(stale_temporaries_pattern(own))
    allowed = {LOCK_FILE, *(own if own_files else ())}
    foreign = sorted(
        name
        for name in os.listdir(path)
        if name not in allowed and not temporary.fullmatch(name)
    )
    if foreign:
        raise error(
            f"{path} already holds files that are not a {what} ({preview(foreign, 3)}); "
            "choose a new or empty folder"
        )


def check_outside(path: str, data_dir: str, what: str, error: type = RunDirError):
    """Refuses an output folder inside (or equal to) the dataset folder it reads."""
    if "://" in str(data_dir):
        return
    data = os.path.realpath(data_dir)
    out = os.path.realpath(path)
    if os.path.commonpath([out, data]) == data:
        raise error(
            f"{path}: the {what} would be inside the dataset folder {data_dir}, adding "
            "files to the dataset; choose a folder outside it"
        )


@contextlib.contextmanager
def locked_folder(path: str, what: str, error: type = RunDirError):
    """Holds an exclusive `FolderLock` on `path` for the block: one process per folder.

    A second process gets `error` naming the holder's PID (a lock left by a dead
    process is taken over: the kernel released it). When the lock created the folder
    and the block fails while the folder holds nothing but the lock file (a run
    refused or failed before writing anything), the folder is removed again: no trace.

    Yields:
        The `FolderLock`.
    """
    lock = FolderLock(path, what)
    try:
        lock.acquire()
    except LockedError as locked:  # its message names the holder's PID
        raise error(str(locked)) from locked
    except OSError as failure:
        raise error(
            f"{path}: cannot create or lock the {what} ({failure.strerror or failure})"
        ) from None
    try:
        yield lock
    except BaseException:
        # Still holding the lock: no other process can be starting in the folder.
        if lock.created and os.listdir(lock.directory) == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                os.remove(lock.path)
                os.rmdir(lock.directory)
        raise
    finally:
        lock.release()


def _truncate_history(path: str, first_epoch: int) -> None:
    """Drops rows of epochs >= `first_epoch` (written before a kill, redone now)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [r for r in body if r and r[0].isdigit() and int(r[0]) < first_epoch]
    with (
        atomic_path(path) as tmp,
        open(tmp, "w", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(kept)


def _last_history_row(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    out = {}
    for key, value in rows[-1].items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


class _Sigterm:
    """What a SIGTERM does at each stage of a run.

    During training (`during_training` set, by `_train`) it asks for a checkpoint and
    a stop at the end of the current step. Once training is over the encoder, the
    projector files and the summary are being written: stopping then would lose a
    finished run (and report it as interrupted), so the signal is only noted and the
    run completes. The handler only sets flags: it runs between two bytecodes of the
    main thread, possibly in the middle of a write.
    """

    def __init__(self):
        self.received = False
        self.during_training: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.received = True
        if self.during_training is not None:
            self.during_training()


@contextlib.contextmanager
def _on_sigterm(handler: Callable[[], None]):
    """Calls `handler` on SIGTERM while inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handler())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _mirrored_strategy():
    """`MirroredStrategy` over the GPUs, or else over every logical CPU device.

    Without GPUs, TensorFlow's default is one CPU device; several logical CPU devices
    exist only when configured on purpose (`tf.config.set_logical_device_configuration`,
    as tests do to check that the loss does not depend on the number of replicas).
    """
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=cpus)


def _seed_states(model) -> list:
    # tf.train.Checkpoint does not reach the state of Keras SeedGenerators through
    # the layers (verified: they are not saved), so they are tracked explicitly.
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


# ----------------------------------------------------------------------- the driver


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """The run's sizes, derived from the config and the data (so equal on resume).

    Attributes:
        n_train: int, pre-training samples used (after `pretrain_fraction`).
        batch_size: int, the global batch.
        min_rows: int, the smallest batch kept (2 per replica).
        steps_per_epoch: int, see `steps_per_epoch`.
        epochs: int.
        samples_per_epoch: int, `n_train` less a dropped final batch.
    """

    n_train: int
    batch_size: int
    min_rows: int
    steps_per_epoch: int
    epochs: int
    samples_per_epoch: int

    @classmethod
    def create(cls, n_train: int, batch_size: int, epochs: int, replicas: int = 1):
        min_rows = 2 * replicas
        if batch_size < min_rows:
            raise ConfigError(
                f"batch_size {batch_size} is too small for {replicas} replica(s); "
                f"use at least {min_rows}"
            )
        rest = n_train % batch_size
        return cls(
            n_train=n_train,
            batch_size=batch_size,
            min_rows=min_rows,
            steps_per_epoch=steps_per_epoch(n_train, batch_size, min_rows),
            epochs=epochs,
            samples_per_epoch=n_train - (rest if 0 < rest < min_rows else 0),
        )

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def samples_at(self, step: int) -> int:
        """Training samples seen after `step` steps."""
        epochs_done, within = divmod(step, self.steps_per_epoch)
        return epochs_done * self.samples_per_epoch + min(
            within * self.batch_size, self.samples_per_epoch
        )

    def phases(self, start_step: int) -> list[tuple[int, int, int]]:
        """The `fit` calls that take a run from `start_step` to the end.

        Each is `(first_epoch, end_epoch, skip)`: a resume in the middle of an epoch
        first finishes that epoch (skipping the `skip` batches done), then runs the
        whole epochs left in a second call.
        """
        if start_step >= self.total_steps:
            return []
        epoch, done = divmod(start_step, self.steps_per_epoch)
        phases = []
        if done:
            phases.append((epoch, epoch + 1, done))
            epoch += 1
        if epoch < self.epochs:
            phases.append((epoch, self.epochs, 0))
        return phases


def run_pretraining(
    config: PretrainConfig,
    data_dir: str | None,
    run_dir: str,
    *,
    resume: bool = False,
    distribute: str = "none",
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
    command: list[str] | None = None,
) -> dict:
    """Pre-trains an encoder with SCARF, VIME or BYOL and writes a run folder.

    Args:
        config: a `PretrainConfig` (method, schedule, encoder, method settings).
        data_dir: str, a converted dataset folder, or None for the built-in
            `synthetic-tcga` data (converted once into the cache folder).
        run_dir: str, the local run folder (see the module docstring for its files).
        resume: bool, continue the run in `run_dir` from its newest complete
            checkpoint. It must be the same run: same method, configuration, gene
            list, dataset and precision, or `RunDirError` names the differences. With
            no checkpoint yet, training starts from the beginning; a folder without a
            run (no `config.json`) is refused. Without `resume`, `run_dir` must be
            missing or empty.
        distribute: `none` or `mirrored` (`tf.distribute.MirroredStrategy` over the
            GPUs, or the logical CPU devices; `config.batch_size` is the global batch).
        checkpoint_every: int, checkpoint period in steps (0: epoch ends only).
        verbose: Keras `fit` verbosity (`"auto"`, 0, 1, 2).
        log: callable receiving progress lines.
        command: the command line, recorded in `config.json`.

    Returns:
        The summary written to `summary.json`.

    Raises:
        ConfigError: an invalid setting (`field` names it).
        DataError: unreadable or unsuitable data; `DamagedDataError` when a shard
            cannot be read during training (the shard is named).
        RunDirError: `run_dir` holds another run (or a different one to resume),
            foreign files, or is in use by another process (its PID is named).
        NonFiniteLossError: the loss became NaN or inf (the step is named); the
            checkpoints keep the last finite state.
        TrainingInterrupted: SIGTERM received; a checkpoint of the current step was
            written, `resume=True` continues.

    Example:

    ```python
    from keras_ssrl.config import PretrainConfig
    summary = run_pretraining(PretrainConfig(method="scarf", epochs=5), None, "runs/s")
    encoder = keras.saving.load_model("runs/s/encoder.keras")
    ```
    """
    validate_config(config)
    if distribute not in DISTRIBUTE:
        raise ConfigError(f"distribute must be one of {DISTRIBUTE}, got {distribute!r}")
    if (
        not isinstance(checkpoint_every, numbers.Integral)
        or isinstance(checkpoint_every, bool)
        or checkpoint_every < 0
    ):
        raise ConfigError(
            f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}",
            "checkpoint_every",
        )
    if "://" in str(run_dir):
        raise RunDirError(
            f"{run_dir}: the run folder must be local (checkpoints are renamed "
            "atomically); copy it to remote storage afterwards"
        )
    run_dir = os.path.abspath(run_dir)
    # Every refusal the folder allows, before the (slow) data checks and any write.
    saved = _existing_run(run_dir, resume)
    import keras
    import tensorflow as tf

    from keras_ssrl.data.builtin import ensure_builtin

    builtin = None
    if data_dir is None:
        builtin = DEFAULT_BUILTIN
        data_dir = ensure_builtin(DEFAULT_BUILTIN, log=log)
    manifest = Manifest.load(data_dir)
    for split in (schema.PRETRAIN, schema.PRETRAIN_VAL):
        if manifest.num_records(split) < 1:
            raise DataError(f"{data_dir}: split {split!r} is empty")
    check_outside(run_dir, data_dir, "run folder")
    precision = resolve_precision(config.precision)
    subset = pretrain_subset(data_dir, config.pretrain_fraction, config.seed)
    n_train = len(subset) if subset is not None else manifest.num_records("pretrain")
    strategy = (
        _mirrored_strategy()
        if distribute == "mirrored"
        else tf.distribute.get_strategy()
    )
    plan = TrainingPlan.create(
        n_train, int(config.batch_size), config.epochs, strategy.num_replicas_in_sync
    )
    record = {
        "config": to_dict(config),
        "method": config.method,
        "precision": precision,
        "data": {
            "dir": str(data_dir),
            "builtin": builtin,
            "manifest_sha256": manifest.digest(),
            "n_genes": manifest.n_genes,
            "genes_sha256": genes_digest(manifest.genes),
            "n_pretrain": manifest.num_records(schema.PRETRAIN),
            "n_train": n_train,
            "n_val": manifest.num_records(schema.PRETRAIN_VAL),
        },
        "training": {
            **dataclasses.asdict(plan),
            "total_steps": plan.total_steps,
            "checkpoint_every": checkpoint_every,
            "distribute": distribute,
            "replicas": strategy.num_replicas_in_sync,
        },
        "versions": {
            "keras_ssrl": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": list(command) if command is not None else None,
    }
    if saved is not None:
        _check_same_run(saved, record, run_dir)

    with locked_folder(run_dir, "run folder"):
        # Again under the lock: another process may have started a run meanwhile.
        saved = _existing_run(run_dir, resume)
        if saved is not None:
            _check_same_run(saved, record, run_dir)
        remove_stale_temporaries(run_dir, stale_temporaries_pattern(RUN_FILES), log)
        previous_policy = keras.config.dtype_policy()
        # Before any layer exists: layers take the global policy when built.
        keras.config.set_dtype_policy(precision)
        try:
            keras.utils.set_random_seed(config.seed)
            with strategy.scope():
                parts = _build(config, manifest.n_genes, plan)
            if saved is None:
                # Written once the model is built: a refused run leaves no config.json.
                write_json_atomic(os.path.join(run_dir, CONFIG_JSON), record)
            log(
                f"{config.method}: {n_train} training samples x {manifest.n_genes} "
                f"genes, {plan.steps_per_epoch} steps/epoch x {plan.epochs} epochs, "
                f"precision {precision}, {strategy.num_replicas_in_sync} replica(s); "
                f"run folder {run_dir}"
            )
            start_step, state = 0, {}
            if resume:
                with strategy.scope():
                    start_step, state = _restore(parts, run_dir, plan, log)
            sigterm = _Sigterm()
            with _on_sigterm(sigterm), naming_damaged_shards(data_dir):
                seconds = _train(
                    parts, config, data_dir, subset, manifest, plan, run_dir,
                    start_step, state, checkpoint_every, verbose, log, sigterm,
                )  # fmt: skip
                sigterm.during_training = None
                summary = _finish(
                    parts, config, data_dir, manifest, plan, run_dir, precision,
                    start_step, state, seconds, log,
                )  # fmt: skip
            if sigterm.received:
                log("SIGTERM received once training had finished: the run completed")
            return summary
        finally:
            keras.config.set_dtype_policy(previous_policy)


# The files of a run folder that `atomic_path` writes (their temporaries are ours).
RUN_FILES = (CONFIG_JSON, SUMMARY_JSON, HISTORY_CSV, ENCODER_FILE)


def _existing_run(run_dir: str, resume: bool) -> dict | None:
    """The `config.json` of the run in `run_dir`, refusing folders this run cannot use.

    A new run needs a missing or empty folder (or one left by an attempt killed
    before writing `config.json`); `resume` needs a run to continue.
    """
    saved = load_run_config(run_dir)
    if saved is None:
        if resume:
            raise RunDirError(
                f"{run_dir}: no run to resume (no {CONFIG_JSON}); start it without "
                "--resume (resume=False)"
            )
        check_output_folder(run_dir, RUN_FILES, "pre-training run")
        return None
    if saved.get("kind") not in (None, "pretrain"):
        raise RunDirError(
            f"{run_dir} holds a {saved['kind']} run, not a pre-training run; choose "
            "another RUN_DIR"
        )
    if not resume:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume (resume=True) to continue "
            "it, or choose another RUN_DIR"
        )
    return saved


@contextlib.contextmanager
def naming_damaged_shards(data_dir: str, splits=(schema.PRETRAIN, schema.PRETRAIN_VAL)):
    """Turns TensorFlow's "corrupted record at N" into a `DamagedDataError`.

    The reader's error gives a byte offset but no file: the splits read are scanned
    to name the damaged shard(s).
    """
    import tensorflow as tf

    try:
        yield
    except tf.errors.DataLossError as error:
        raise damaged_data_error(data_dir, splits, error) from error


def damaged_data_error(data_dir: str, splits, error: Exception) -> DamagedDataError:
    """A `DamagedDataError` naming the unreadable shards of `splits` (found by a scan)."""
    from keras_ssrl.data.integrity import clean_tf_error, find_damaged_shards

    damaged = []
    for split in splits:
        damaged += find_damaged_shards(data_dir, split)
    found = (
        f"damaged shard {preview(damaged, 2)}"
        if damaged
        else f"a shard is damaged ({clean_tf_error(error)})"
    )
    return DamagedDataError(
        f"{found}\ncheck the dataset with: python tfrecords_tools/inspect.py "
        f"{data_dir} (then re-copy the shard or re-run the conversion)"
    )


@dataclasses.dataclass
class _Parts:
    """What the driver builds under the strategy scope."""

    encoder: object
    model: object
    best: object  # BestEncoderWeights
    checkpoint: object  # tf.train.Checkpoint of everything that changes in training


def _build(config: PretrainConfig, n_genes: int, plan: TrainingPlan) -> _Parts:
    import keras
    import tensorflow as tf

    from keras_ssrl.callbacks import BestEncoderWeights
    from keras_ssrl.encoders import build_encoder
    from keras_ssrl.methods import build_method

    encoder = build_encoder(
        n_genes,
        config.encoder.layers,
        config.encoder.width,
        config.encoder.dropout,
        # Several replicas: normalise with global-batch statistics, as one device does.
        synchronized_batchnorm=tf.distribute.get_strategy().num_replicas_in_sync > 1,
    )
    try:
        model = build_method(
            config.method,
            encoder,
            n_genes,
            config,
            total_steps=plan.total_steps,
            seed=config.seed,
        )
    except ValueError as error:  # a method setting out of range
        raise ConfigError(f"{config.method}: {error}") from error
    # Through compile, so that Keras wraps it in a LossScaleOptimizer under float16.
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    best = BestEncoderWeights(encoder, copy_weights=config.keep == "best")
    checkpoint = tf.train.Checkpoint(
        model=model,
        optimizer=model.optimizer,
        seed_states=_seed_states(model),
        best_encoder=best.variables,
    )
    return _Parts(encoder, model, best, checkpoint)


def _restore(parts: _Parts, run_dir: str, plan: TrainingPlan, log) -> tuple[int, dict]:
    """Restores the newest checkpoint of `run_dir`; returns `(step, state)`."""
    from keras_ssrl.callbacks import CheckpointStore

    # Optimizer slots are created lazily: create them so that they are restored.
    parts.model.optimizer.build(parts.model.trainable_variables)
    store = CheckpointStore(os.path.join(run_dir, CHECKPOINTS_DIR), log=log)
    try:
        found = store.restore_latest(parts.checkpoint)
    except AssertionError as error:  # the saved objects differ from those built
        raise RunDirError(
            f"cannot resume {run_dir}: its checkpoint does not match the model built "
            f"from its config ({str(error).splitlines()[0]})"
        ) from error
    if found is None:
        log("no checkpoint to resume from: starting from step 0")
        return 0, {}
    folder, state = found
    if state.get("steps_per_epoch") != plan.steps_per_epoch:
        raise RunDirError(
            f"cannot resume {run_dir}: its checkpoint has "
            f"{state.get('steps_per_epoch')} steps per epoch, this setup "
            f"{plan.steps_per_epoch}"
        )
    parts.best.load_state(state.get("best", {}))
    log(f"resuming from step {state['step']} ({folder})")
    return int(state["step"]), state


def _validation_data(data_dir: str, plan: TrainingPlan, n_val: int):
    """The validation batches, and a fixed subset of them for the collapse monitors."""
    import tensorflow as tf

    from keras_ssrl.data.reader import load_dataset

    # Known cardinalities: Keras then neither guesses nor warns at the end.
    cardinality = tf.data.experimental.assert_cardinality
    bs = plan.batch_size

    def read():
        return load_dataset(data_dir, schema.PRETRAIN_VAL, bs, with_labels=False)

    val = (
        read()
        .filter(_min_rows_filter(plan.min_rows))
        .apply(cardinality(steps_per_epoch(n_val, bs, plan.min_rows)))
    )
    rows = min(n_val, COLLAPSE_ROWS)
    monitor = (
        read().unbatch().take(rows).batch(bs).apply(cardinality(math.ceil(rows / bs)))
    )
    return val, monitor


def _train(
    parts: _Parts,
    config: PretrainConfig,
    data_dir: str,
    subset: list[str] | None,
    manifest: Manifest,
    plan: TrainingPlan,
    run_dir: str,
    start_step: int,
    state: dict,
    checkpoint_every: int,
    verbose,
    log,
    sigterm: _Sigterm,
) -> float:
    """Runs `fit` from `start_step` to the end; returns the seconds it took.

    A SIGTERM (`sigterm`) during training writes a checkpoint at the end of the
    current step and raises `TrainingInterrupted`.
    """
    import keras

    from keras_ssrl.callbacks import (
        CheckpointStore,
        CollapseMonitor,
        NonFiniteLossGuard,
        TrainingCheckpoint,
    )

    spe = plan.steps_per_epoch
    train_data = make_train_data(
        data_dir,
        plan.batch_size,
        config.seed,
        subset=subset,
        min_rows=plan.min_rows,
        n_genes=manifest.n_genes,
    )
    val_data, monitor_data = _validation_data(
        data_dir, plan, manifest.num_records(schema.PRETRAIN_VAL)
    )
    history_path = os.path.join(run_dir, HISTORY_CSV)
    # Rows of epochs written before a stop and redone now.
    _truncate_history(history_path, start_step // spe)
    store = CheckpointStore(os.path.join(run_dir, CHECKPOINTS_DIR), log=log)
    prior_seconds = float(state.get("seconds", 0.0))
    start = time.perf_counter()

    def checkpoint_state(step: int) -> dict:
        return {
            "steps_per_epoch": spe,
            "total_steps": plan.total_steps,
            "best": parts.best.state(),
            "seconds": prior_seconds + time.perf_counter() - start,
            "samples": plan.samples_at(step),
        }

    guard = NonFiniteLossGuard(initial_step=start_step, log=log)
    saver = TrainingCheckpoint(
        store,
        parts.checkpoint,
        steps_per_epoch=spe,
        every_n_steps=checkpoint_every,
        initial_step=start_step,
        state_fn=checkpoint_state,
        initial_metrics=state.get("metrics") if start_step % spe else None,
        log=log,
    )
    # Order matters: the guard first (a non-finite step is never saved); the monitor
    # adds its values to the logs before the loggers; the saver last, so that an
    # epoch-end checkpoint covers everything written for that epoch.
    callbacks = [
        guard,
        CollapseMonitor(parts.encoder, monitor_data),
        parts.best,
        keras.callbacks.CSVLogger(history_path, append=True),
        keras.callbacks.TensorBoard(
            log_dir=os.path.join(run_dir, LOGS_DIR),
            write_graph=False,
            update_freq="epoch",
            profile_batch=0,
        ),
        saver,
    ]
    sigterm.during_training = saver.request_stop
    if sigterm.received:  # while the input pipeline was built: stop at once
        saver.request_stop()
    for first, end, skip in plan.phases(start_step):
        parts.model.fit(
            train_data(first, end).skip(skip),
            validation_data=val_data,
            epochs=end,
            initial_epoch=first,
            steps_per_epoch=spe - skip,
            shuffle=False,  # shuffled per epoch by make_train_data, reproducibly
            callbacks=callbacks,
            verbose=verbose,
        )
        if guard.stopped_at is not None or saver.preempted:
            break
    seconds = time.perf_counter() - start

    if guard.stopped_at is not None:
        epoch, batch = divmod(guard.stopped_at - 1, spe)
        last = store.latest()
        raise NonFiniteLossError(
            f"the loss became {guard.value} at step {guard.stopped_at} (epoch "
            f"{epoch + 1}, batch {batch + 1}); training stopped. The last finite "
            f"state is in {last[0] if last else 'no checkpoint'}; lower the "
            "learning rate or check the data",
            guard.stopped_at,
        )
    if saver.preempted and saver.step < plan.total_steps:
        last = store.latest()
        folder = last[0] if last else None
        raise TrainingInterrupted(
            f"stopped by SIGTERM at step {saver.step} of {plan.total_steps}; "
            f"checkpoint {folder}; continue with --resume",
            saver.step,
            folder,
        )
    return seconds


def _finish(
    parts: _Parts,
    config: PretrainConfig,
    data_dir: str,
    manifest: Manifest,
    plan: TrainingPlan,
    run_dir: str,
    precision: str,
    start_step: int,
    state: dict,
    seconds: float,
    log,
) -> dict:
    """Writes the kept encoder, the projector files and `summary.json`."""
    kept = "last"
    if config.keep == "best":
        if parts.best.restore_best():
            kept = "best"
        else:
            log("keep=best: no validation loss recorded, keeping the last encoder")
    saved = _save_encoder(parts.encoder, config, manifest.n_genes, run_dir)
    rows = _write_projector(saved, data_dir, manifest, run_dir, plan.batch_size, log)
    final = _last_history_row(os.path.join(run_dir, HISTORY_CSV))
    samples = plan.samples_at(plan.total_steps) - plan.samples_at(start_step)
    best = parts.best.state()
    summary = {
        "status": "complete",
        "method": config.method,
        "precision": precision,
        "steps": plan.total_steps,
        "total_steps": plan.total_steps,
        "epochs": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "batch_size": plan.batch_size,
        "n_train": plan.n_train,
        "final_loss": _finite_or_none(final.get("loss")),
        "final_val_loss": _finite_or_none(final.get("val_loss")),
        "final": {
            k: _finite_or_none(v) if isinstance(v, float) else v
            for k, v in final.items()
            if k != "epoch"
        },
        # Wall time of training, validation and monitors, over every session.
        "seconds": round(float(state.get("seconds", 0.0)) + seconds, 3),
        # This session's training samples over its time (None if it had nothing to do).
        "samples_per_second": round(samples / seconds, 2) if samples else None,
        "kept_encoder": kept,
        "best": {
            "val_loss": best["value"],
            "epoch": None if best["epoch"] is None else best["epoch"] + 1,
        },
        "resumed_from_step": start_step if state else None,
        "encoder_file": ENCODER_FILE,
        "encoder_dtype_policy": "float32",
        "projector_rows": rows,
    }
    write_json_atomic(os.path.join(run_dir, SUMMARY_JSON), summary)
    log(
        f"done: {summary['steps']} steps, loss {summary['final_loss']}, val_loss "
        f"{summary['final_val_loss']}; kept the {kept} encoder in "
        f"{os.path.join(run_dir, ENCODER_FILE)}"
    )
    return summary


def _save_encoder(encoder, config: PretrainConfig, n_genes: int, run_dir: str):
    """Saves a float32 copy of `encoder` as `encoder.keras` (atomically); returns it.

    Under mixed precision the layers carry a `mixed_*` policy that a saved model would
    impose on every later use; the variables are float32 either way, so a float32
    encoder with the same weights is saved instead.
    """
    import keras

    from keras_ssrl.encoders import build_encoder

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = build_encoder(
            n_genes,
            config.encoder.layers,
            config.encoder.width,
            config.encoder.dropout,
            name=encoder.name,
        )
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(encoder.get_weights())
    path = os.path.join(run_dir, ENCODER_FILE)
    with atomic_path(path, ".keras") as tmp:
        copy.save(tmp)
    return copy


def _write_projector(encoder, data_dir, manifest, run_dir, batch_size, log) -> int:
    """Writes validation embeddings (and labels, if any) for TensorBoard's projector.

    Labels are read here, after training, only to colour the points.
    """
    import tensorflow as tf
    from tensorboard.plugins import projector

    from keras_ssrl.data.reader import load_dataset

    folder = os.path.join(run_dir, LOGS_DIR, PROJECTOR_DIR)
    os.makedirs(folder, exist_ok=True)
    data = (
        load_dataset(
            data_dir,
            schema.PRETRAIN_VAL,
            batch_size,
            with_labels=True,
            with_sample_ids=True,
        )
        .unbatch()
        .take(PROJECTOR_ROWS)
        .batch(batch_size)
    )
    embeddings, labels, ids = [], [], []
    for x, y, sample_ids in data:
        embeddings.append(np.asarray(encoder(x, training=False), dtype=np.float32))
        labels.extend(int(v) for v in y.numpy())
        ids.extend(s.decode("utf-8") for s in sample_ids.numpy())
    if not embeddings:
        return 0
    z = np.concatenate(embeddings)
    names = manifest.labels
    labelled = bool(names) and any(v >= 0 for v in labels)

    def clean(text: str) -> str:
        return text.replace("\t", " ").replace("\n", " ")

    with open(os.path.join(folder, "metadata.tsv"), "w", encoding="utf-8") as f:
        if labelled:
            f.write("label\tsample_id\n")
            for v, sid in zip(labels, ids):
                name = names[v] if 0 <= v < len(names) else "unlabelled"
                f.write(f"{clean(name)}\t{clean(sid)}\n")
        else:  # one column: the projector reads it without a header
            for sid in ids:
                f.write(f"{clean(sid)}\n")
    variable = tf.Variable(z, name="embedding")
    tf.train.Checkpoint(embedding=variable).save(os.path.join(folder, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    embedding.metadata_path = "metadata.tsv"
    projector.visualize_embeddings(folder, config)
    # An event file makes the folder a TensorBoard run, where the projector looks.
    writer = tf.summary.create_file_writer(folder)
    with writer.as_default():
        tf.summary.text(
            "embeddings",
            f"{len(z)} pre-training validation samples embedded by the kept encoder"
            + (
                ", coloured by label (labels never used in training)"
                if labelled
                else ""
            ),
            step=0,
        )
    writer.close()
    log(f"projector: {len(z)} validation embeddings in {folder}")
    return int(len(z))
