"""Feature corruption from the empirical marginal, on the device."""

from __future__ import annotations

import keras
from keras import ops


def _replace_cells(x, u, rate: float):
    """Replaces the cells with `u < rate` by the same feature of a random row."""
    mask = u < rate
    batch = ops.cast(ops.shape(x)[0], u.dtype)
    # Given u < rate, u / rate is uniform on [0, 1) and picks the donor row. Clip in
    # floating point before the cast: unmasked cells have u / rate >= 1.
    rows = ops.cast(ops.minimum(u * (batch / rate), batch - 1.0), "int32")
    marginal = ops.take_along_axis(x, rows, axis=0)
    return ops.where(mask, marginal, x), ops.cast(mask, x.dtype)


_xla_replace_cells = None


def _replace(x, u, rate: float):
    """`_replace_cells`, compiled with XLA on the TensorFlow backend.

    TensorFlow's own per-cell gather (`GatherNd`) is latency-bound on CPU: ~0.45 s for
    256 x 57k cells, more than the first layer's matmul. The same gather fused by XLA
    takes a tenth of that (`benchmarks/pretrain_throughput.py`). The uniform draw stays
    outside: TensorFlow's Philox kernel is faster than XLA's on CPU. A nested
    `jit_compile` function is an XLA cluster inside the (non-XLA) training step, so
    the rest of the model is unaffected.
    """
    global _xla_replace_cells
    if keras.backend.backend() != "tensorflow":
        return _replace_cells(x, u, rate)
    if _xla_replace_cells is None:
        import tensorflow as tf

        _xla_replace_cells = tf.function(
            _replace_cells, jit_compile=True, reduce_retracing=True
        )
    return _xla_replace_cells(x, u, rate)


@keras.saving.register_keras_serializable(package="keras_ssrl")
class MarginalCorruption(keras.layers.Layer):
    """Replaces a random fraction of features with draws from their empirical marginal.

    Each feature of each example is chosen with probability `rate` (a fresh mask at
    every call, never one mask for the whole training); a chosen value is replaced by
    the value the same feature takes in another example drawn uniformly from the batch,
    which is a draw from that feature's empirical marginal (SCARF, section 2.2.1; VIME's
    x~ = m * x_bar + (1 - m) * x). The replacement row is drawn from the current batch,
    as protocol.md allows; never Uniform(min, max). Per-feature Bernoulli masks corrupt a
    fraction `rate` on average (within +-0.2% at 57k genes) without a per-row sort.

    Randomness comes from `keras.random` with the layer's `SeedGenerator`, so corruption
    runs in the training graph on the device and is reproducible from `seed`.

    Args:
        rate: float in [0, 1], the corruption rate (c for SCARF, p_m for VIME).
        seed: int, seed of the layer's generator.
        return_mask: bool, also return the mask (VIME predicts it).

    Call arguments:
        x: tensor `(batch, features)`.

    Returns:
        The corrupted tensor, or `(corrupted, mask)` with a float mask of 0/1.

    Example:

    ```python
    corrupt = MarginalCorruption(0.3, seed=1)
    x_tilde = corrupt(x)
    ```
    """

    def __init__(
        self, rate: float, seed: int | None = None, return_mask: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.rate = float(rate)
        self.seed = seed
        self.return_mask = return_mask
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x):
        if self.rate == 0.0:
            # Nothing to replace: no random numbers, no division by the rate below.
            return (x, ops.zeros_like(x)) if self.return_mask else x
        # One uniform draw per cell serves both choices (see `_replace_cells`): random
        # numbers are a costly part of corruption at 57k genes; this halves them.
        u = keras.random.uniform(ops.shape(x), seed=self.seed_generator)
        corrupted, mask = _replace(x, u, self.rate)
        return (corrupted, mask) if self.return_mask else corrupted

    def compute_output_shape(self, input_shape):
        if self.return_mask:
            return input_shape, input_shape
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed, return_mask=self.return_mask)
        return config
