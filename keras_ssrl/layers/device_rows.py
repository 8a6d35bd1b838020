"""A training split held on the accelerator, and batches gathered from it by index."""

from __future__ import annotations

import keras
from keras import ops


class DeviceRows(keras.layers.Layer):
    """The standardised rows of a split, resident on the device; called on indices.

    On a GPU the SSL step consumes hundreds of thousands of samples per second, far
    more than a host input pipeline delivers. With the split in device memory (as
    float16 or bfloat16, 2 bytes a value), a step's input is a vector of row indices:
    the batch is gathered on the device, with no host-to-device copy of expression
    values per step. The table is a non-trainable variable so that it enters the
    compiled JAX step as state (an argument, never a constant baked into the program)
    and follows `keras.distribution` layouts (replicated: every device gathers its own
    rows); it is never saved with the model or its checkpoints.

    Args:
        rows: array `(n_samples, n_genes)`, the standardised split.
        storage_dtype: `float16` or `bfloat16`.

    Call arguments:
        indices: int tensor `(batch,)` of row numbers.

    Returns:
        The rows, `(batch, n_genes)`, as float32: what the streaming pipeline gives,
        so that a method sees the same kind of input either way.
    """

    def __init__(self, rows, storage_dtype: str = "float16", **kwargs):
        super().__init__(dtype="float32", **kwargs)
        if storage_dtype not in ("float16", "bfloat16"):
            raise ValueError(
                f"storage_dtype must be float16 or bfloat16, got {storage_dtype!r}"
            )
        self.n_rows, self.n_genes = (int(d) for d in rows.shape)
        self.table = self.add_weight(
            shape=(self.n_rows, self.n_genes),
            initializer=lambda shape, dtype: ops.cast(rows, storage_dtype),
            dtype=storage_dtype,
            trainable=False,
            autocast=False,
            name="rows",
        )
        self.built = True

    def call(self, indices):
        rows = ops.take(self.table, ops.cast(indices, "int32"), axis=0)
        return ops.cast(rows, "float32")

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.n_genes * 2
