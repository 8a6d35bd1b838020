"""`--cache device`: the pre-training split held on the accelerator.

On a GPU the training step outruns any host input pipeline (a SCARF step at 20k genes
consumes hundreds of thousands of samples per second; `load_dataset` delivers about
4,000 per 2 CPU cores at 57k genes). When the split fits, it is read once, standardised,
stored on the device as float16 (bfloat16 under `mixed_bfloat16`) in a `DeviceRows`
layer, and each step receives only a vector of row indices: the batch is gathered on the
device. The epoch order is a full permutation drawn from `(seed, epoch)`, so any epoch's
batches are known without replaying earlier ones (what resuming needs), as in the
streaming path; the two paths order samples differently, so a run keeps its choice on
resume.

When the split does not fit (estimated as rows x genes x 2 bytes against the free device
memory), training streams from the host as before, and says so; the JAX backend then
copies each batch to the device one step ahead.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from keras_ssrl.data import schema
from keras_ssrl.training.input import TrainingPlan, final_batch_rows

CACHE_MODES = ("auto", "device", "none")
# The split may take this share of the free device memory: the rest is for the model,
# its optimizer state, activations of large batches and XLA's workspace.
DEVICE_SHARE = 0.5
_READ_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class InputChoice:
    """Where training batches come from, and why.

    Attributes:
        on_device: the split is held on the device (`DeviceRows`).
        storage_dtype: `float16` or `bfloat16` (the device copy's dtype).
        needed, free: bytes the copy takes, and free device memory (None: unknown).
        message: one line for the log.
    """

    on_device: bool
    storage_dtype: str
    needed: int
    free: int | None
    message: str


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def free_device_memory() -> tuple[int | None, bool]:
    """Free bytes of the first device, and whether it is an accelerator.

    JAX reports its allocator's limit and use; on a CPU (and under TensorFlow, which
    reports no limit) the host's available memory is used.
    """
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.local_devices()[0]
        if device.platform != "cpu":
            stats = device.memory_stats() or {}
            if "bytes_limit" in stats:
                return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), True
            return None, True
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = None
    return pages, False


def choose_input(mode: str, n_rows: int, n_genes: int, precision: str) -> InputChoice:
    """Resolves `--cache` for a split of `n_rows` x `n_genes`.

    `auto` holds the split on the device when the backend is JAX with an accelerator
    and it fits; `device` holds it whenever it fits (on a CPU too); `none` streams.
    """
    import keras

    storage = "bfloat16" if precision == "mixed_bfloat16" else "float16"
    needed = int(n_rows) * int(n_genes) * 2
    if mode == "none":
        return InputChoice(
            False, storage, needed, None, "input: streaming (--cache none)"
        )
    free, accelerator = free_device_memory()
    fits = free is None or needed <= DEVICE_SHARE * free
    where = "device" if accelerator else "host (no accelerator)"
    if mode == "auto" and not (accelerator and keras.backend.backend() == "jax"):
        return InputChoice(
            False,
            storage,
            needed,
            free,
            "input: streaming (--cache auto keeps the split on an accelerator under "
            "KERAS_BACKEND=jax; --cache device forces it)",
        )
    if not fits:
        return InputChoice(
            False,
            storage,
            needed,
            free,
            f"input: streaming; the split ({n_rows} x {n_genes}, {_gib(needed)} as "
            f"{storage}) does not fit in half the free {where} memory ({_gib(free)})",
        )
    return InputChoice(
        True,
        storage,
        needed,
        free,
        f"input: the split on the {where}, {n_rows} x {n_genes} as {storage} "
        f"({_gib(needed)} of {_gib(free)} free); batches gathered there by index",
    )


def load_rows(
    data_dir: str,
    n_rows: int,
    n_genes: int,
    storage_dtype: str,
    subset: list[str] | None = None,
) -> np.ndarray:
    """The standardised pre-training split (or `subset`) as one host array.

    Rows are in the order the shards list them; the array is `storage_dtype`, so the
    host holds the split once at 2 bytes a value while it is read.
    """
    import ml_dtypes

    from keras_ssrl.data.reader import load_dataset

    dtype = ml_dtypes.bfloat16 if storage_dtype == "bfloat16" else np.float16
    rows = np.empty((n_rows, n_genes), dtype=dtype)
    keep = set(subset) if subset is not None else None
    filled = 0
    data = load_dataset(
        data_dir,
        schema.PRETRAIN,
        _READ_BATCH,
        with_labels=False,
        with_sample_ids=keep is not None,
    )
    for batch in data:
        if keep is not None:
            x, ids = batch
            mask = np.array([i.decode("utf-8") in keep for i in ids.numpy()], bool)
            x = x.numpy()[mask]
        else:
            x = batch.numpy()
        rows[filled : filled + len(x)] = x.astype(dtype)
        filled += len(x)
    if filled != n_rows:
        raise RuntimeError(
            f"{data_dir}: read {filled} pre-training rows, expected {n_rows}"
        )
    return rows


def index_batches(plan: TrainingPlan, seed: int):
    """A function `(first_epoch, end_epoch) -> tf.data.Dataset` of row-index batches.

    Epoch `e` is a permutation of the rows drawn from `(seed, e)`, cut into
    `plan.batch_size` batches; the final batch follows `final_batch_rows`, as in the
    streaming path.
    """
    import tensorflow as tf

    n, bs = plan.n_train, plan.batch_size
    last = final_batch_rows(n, bs, plan.min_rows, plan.row_multiple)
    processes, index = plan.processes, plan.process_index

    def own(batch):  # a multi-host run: this process's slice of the global batch
        part = len(batch) // processes
        return batch[index * part : (index + 1) * part]

    def batches(first, end):
        for epoch in range(int(first), int(end)):
            order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
            for start in range(0, (n // bs) * bs, bs):
                yield own(order[start : start + bs])
            if last:
                yield own(order[(n // bs) * bs : (n // bs) * bs + last])

    def epochs(first: int, end: int):
        ds = tf.data.Dataset.from_generator(
            batches,
            args=(first, end),
            output_signature=tf.TensorSpec([None], tf.int32),
        )
        return ds.prefetch(tf.data.AUTOTUNE)

    return epochs
