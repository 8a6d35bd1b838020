"""The data of a pre-training run: subset, sizes, training and validation datasets.

- `pretrain_subset`: the nested, seeded subset of the pre-training split that
  `pretrain_fraction` asks for (docs/protocol.md, "Pre-training size");
- `steps_per_epoch` and `TrainingPlan`: the run's sizes, derived from the config and the
  data only, so that a resume finds them equal;
- `make_train_data`: epoch `e` is a pure function of `(seed, e)`, which is what lets a
  resumed run see exactly the batches an uninterrupted one would;
- `validation_data`: the validation batches and the fixed rows of the collapse monitors;
- `naming_damaged_shards`: TensorFlow's "corrupted record" turned into an error naming
  the shard.

Labels are never read here.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math

import numpy as np

from keras_ssrl.config import ConfigError
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DamagedDataError, DataError, preview
from keras_ssrl.data.manifest import SPLITS_CSV, Manifest
from keras_ssrl.files import join, open_file

# Rows of the pre-training validation split embedded for the collapse monitors:
# enough for the rank of a 256-wide embedding to be measurable, cheap every epoch.
COLLAPSE_ROWS = 2048
# Records held by the shuffle buffers (the reader's default).
SHUFFLE_BUFFER = 2048
# A pre-training subset (pretrain_fraction < 1) is decoded once and kept in memory
# below this size; above it, it is re-read (and filtered) every epoch.
SUBSET_CACHE_BYTES = 2 << 30
# TensorFlow's global seed while the training data exist (see `make_train_data`).
_DATA_GLOBAL_SEED = 0x5EED
# The command that checks a dataset folder, named in every damaged-data message.
VERIFY_COMMAND = "python tfrecords_tools/verify.py"


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
            f"conversion or check the folder with {VERIFY_COMMAND}"
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


def final_batch_rows(
    n_samples: int, batch_size: int, min_rows: int = 2, row_multiple: int = 1
) -> int:
    """Rows of the last, partial batch of an epoch as trained on (0: none or dropped).

    A final batch of one sample gives BatchNorm a zero variance and a contrastive loss
    no negatives (and, over several replicas, leaves some empty): one of fewer than
    `min_rows` rows is dropped. Under JAX data parallelism every batch is split evenly
    over the devices, so the final batch is cut to a multiple of `row_multiple` (the
    device count) first.
    """
    rest = int(n_samples) % int(batch_size)
    rest -= rest % int(row_multiple)
    return rest if rest >= min_rows else 0


def steps_per_epoch(
    n_samples: int, batch_size: int, min_rows: int = 2, row_multiple: int = 1
) -> int:
    """`ceil(n / batch_size)`, less a dropped final batch (see `final_batch_rows`)."""
    full = int(n_samples) // int(batch_size)
    steps = full + (
        1 if final_batch_rows(n_samples, batch_size, min_rows, row_multiple) else 0
    )
    if steps < 1:
        raise DataError(
            f"the pre-training set has {n_samples} sample(s), fewer than {min_rows} "
            "needed for one batch; use a larger pretrain_fraction or dataset"
        )
    return steps


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """The run's sizes, derived from the config and the data (so equal on resume).

    Attributes:
        n_train: int, pre-training samples used (after `pretrain_fraction`).
        batch_size: int, the global batch.
        min_rows: int, the smallest batch kept (2 per replica).
        steps_per_epoch: int, see `steps_per_epoch`.
        epochs: int.
        samples_per_epoch: int, `n_train` less the rows of the final batch not
            trained on (see `final_batch_rows`).
        row_multiple: int, every batch is a multiple of it (the device count under
            JAX data parallelism, else 1).
        processes, process_index: a multi-host JAX run's processes and this one's
            index: each process feeds its slice of every global batch.
    """

    n_train: int
    batch_size: int
    min_rows: int
    steps_per_epoch: int
    epochs: int
    samples_per_epoch: int
    row_multiple: int = 1
    processes: int = 1
    process_index: int = 0

    @classmethod
    def create(
        cls,
        n_train: int,
        batch_size: int,
        epochs: int,
        replicas: int = 1,
        row_multiple: int = 1,
        processes: int = 1,
        process_index: int = 0,
    ):
        min_rows = 2 * replicas
        if batch_size < min_rows:
            raise ConfigError(
                f"batch_size {batch_size} is too small for {replicas} replica(s); "
                f"use at least {min_rows}",
                "batch_size",
            )
        if batch_size % row_multiple:
            raise ConfigError(
                f"batch_size {batch_size} does not split evenly over {row_multiple} "
                f"devices; use a multiple of {row_multiple}",
                "batch_size",
            )
        full = n_train // batch_size
        final = final_batch_rows(n_train, batch_size, min_rows, row_multiple)
        return cls(
            n_train=n_train,
            batch_size=batch_size,
            min_rows=min_rows,
            steps_per_epoch=steps_per_epoch(
                n_train, batch_size, min_rows, row_multiple
            ),
            epochs=epochs,
            samples_per_epoch=full * batch_size + final,
            row_multiple=row_multiple,
            processes=processes,
            process_index=process_index,
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


def _epoch_seed(seed, epoch):
    # Distinct, reproducible shuffle seeds per (seed, epoch); works on tensors too.
    return seed * 1_000_003 + epoch + 1


def _kept_batches(min_rows: int, row_multiple: int = 1, processes: int = 1, index=0):
    """A `tf.data` transformation applying `final_batch_rows` to every batch.

    In a multi-host run every process reads the same global batches (same files, same
    seeded order) and keeps its own slice of each: the global batch, the corruption
    draws and the negatives are those of one device, and every process takes the same
    number of steps. (`row_multiple` is the global device count, a multiple of
    `processes`.)
    """
    import tensorflow as tf

    def trim(x):
        rows = tf.shape(x)[0]
        return x[: rows - rows % row_multiple]

    def own_slice(x):
        part = tf.shape(x)[0] // processes
        return x[index * part : (index + 1) * part]

    def apply(ds):
        if row_multiple > 1:
            ds = ds.map(trim)
        ds = ds.filter(lambda x: tf.shape(x)[0] >= min_rows)
        if processes > 1:
            ds = ds.map(own_slice)
        return ds

    return apply


def plan_batches(plan: TrainingPlan):
    """`_kept_batches` for `plan`."""
    return _kept_batches(
        plan.min_rows, plan.row_multiple, plan.processes, plan.process_index
    )


def _subset_rows(data_dir: str, subset: list[str], n_genes: int | None):
    """The rows of `subset` (unbatched), cached in memory when they fit."""
    import tensorflow as tf

    from keras_ssrl.data.reader import load_dataset

    keys = tf.constant(subset, dtype=tf.string)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, tf.bool)),
        default_value=False,
    )
    rows = load_dataset(
        data_dir, schema.PRETRAIN, 256, with_labels=False, with_sample_ids=True
    )
    rows = rows.map(lambda x, ids: tf.boolean_mask(x, table.lookup(ids))).unbatch()
    if len(subset) * 4 * int(n_genes or 0) <= SUBSET_CACHE_BYTES:
        # Read and decode the subset once: later epochs cost a shuffle in memory.
        rows = rows.cache()
    return rows


def make_train_data(
    data_dir: str,
    batch_size: int,
    seed: int,
    *,
    subset: list[str] | None = None,
    min_rows: int = 2,
    row_multiple: int = 1,
    n_genes: int | None = None,
    processes: int = 1,
    process_index: int = 0,
):
    """A function `(first_epoch, end_epoch) -> tf.data.Dataset` of training batches.

    Epoch `e` holds the pre-training split (or `subset`) shuffled with a seed derived
    from `(seed, e)`, in `ceil(n / batch_size)` batches (a final batch smaller than
    `min_rows` is dropped and, with `row_multiple`, the final batch is cut to a
    multiple of it: see `final_batch_rows`); epochs follow one another without
    mixing. The order of any epoch is thus known without replaying earlier ones, which
    is what lets a resumed run see exactly the batches an uninterrupted run would.
    Labels are never read. Sets TensorFlow's global seed (to a constant).

    Args:
        data_dir: str, a converted dataset folder.
        batch_size: int, the global batch size.
        seed: int.
        subset: optional list of pre-training sample ids to keep.
        min_rows: int, the smallest batch kept.
        row_multiple: int, every batch is cut to a multiple of it.
        processes, process_index: in a multi-host run, the slice of each global
            batch this process feeds (see `_kept_batches`).
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
    keep_batches = _kept_batches(min_rows, row_multiple, processes, process_index)
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
            ).apply(keep_batches)

    else:
        rows = _subset_rows(data_dir, subset, n_genes)
        buffer = min(len(subset), SHUFFLE_BUFFER)

        def one_epoch(epoch):
            shuffled = rows.shuffle(
                buffer, seed=_epoch_seed(tf.constant(seed, tf.int64), epoch)
            )
            return shuffled.batch(batch_size).apply(keep_batches)

    def epochs(first: int, end: int):
        ds = tf.data.Dataset.range(first, end).flat_map(one_epoch)
        return ds.prefetch(tf.data.AUTOTUNE)

    return epochs


def validation_data(data_dir: str, plan: TrainingPlan, n_val: int):
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
        .apply(plan_batches(plan))
        .apply(
            cardinality(steps_per_epoch(n_val, bs, plan.min_rows, plan.row_multiple))
        )
    )
    rows = min(n_val, COLLAPSE_ROWS)
    monitor = (
        read().unbatch().take(rows).batch(bs).apply(cardinality(math.ceil(rows / bs)))
    )
    return val, monitor


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
        f"{found}\ncheck the dataset with: {VERIFY_COMMAND} "
        f"{data_dir} (then re-copy the shard or re-run the conversion)"
    )
