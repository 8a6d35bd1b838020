"""Feature corruption from the empirical marginal, on the device."""

from __future__ import annotations

import keras
from keras import ops

# Constants of MurmurHash3's 32-bit finaliser (Appleby), a bijection on uint32 whose
# output bits each depend on every input bit.
_FMIX_SHIFTS = (16, 13, 16)
_FMIX_MULTIPLIERS = (0x85EBCA6B, 0xC2B2AE35)


def _fmix32(h):
    """MurmurHash3's finaliser on a uint32 tensor (multiplication wraps modulo 2**32)."""
    h = ops.bitwise_xor(h, ops.right_shift(h, _FMIX_SHIFTS[0]))
    h = h * ops.convert_to_tensor(_FMIX_MULTIPLIERS[0], "uint32")
    h = ops.bitwise_xor(h, ops.right_shift(h, _FMIX_SHIFTS[1]))
    h = h * ops.convert_to_tensor(_FMIX_MULTIPLIERS[1], "uint32")
    return ops.bitwise_xor(h, ops.right_shift(h, _FMIX_SHIFTS[2]))


def cell_uniforms(key, batch, features, row_offset=0):
    """Uniform numbers on [0, 1) for every cell of a `(batch, features)` tensor.

    A counter-based generator: cell `(i, j)` gets a keyed hash of its index `(i +
    row_offset) * features + j` (`row_offset`: where these rows start in the global
    batch, so data-parallel replicas draw different numbers), two rounds of
    MurmurHash3's finaliser with the two 32-bit words of `key` (drawn from
    `keras.random` once per call) mixed in between. This is Philox's
    design (a keyed bijection of a counter) with a cheaper round function: in XLA it
    fuses into the corruption itself and costs a few integer operations per cell, where
    TensorFlow's Philox kernel took ~0.15 s for the 14.6M cells of a 256 x 57k batch,
    21% of a SCARF step on 2 CPU cores. Its statistics are tested in
    `tests/test_methods.py` (rates, uniform donors, no correlation between neighbouring
    cells or successive keys). The top 24 bits make the float, as float32 uniforms do.
    """
    if isinstance(batch, int) and isinstance(features, int):
        if batch * features > 2**32:
            # Counters would wrap and repeat their draws within the batch.
            raise ValueError(
                f"a batch of {batch} x {features} has more than 2**32 cells; "
                "use a smaller batch for corruption"
            )
    rows = ops.cast(ops.arange(batch) + row_offset, "uint32")[:, None]
    cols = ops.cast(ops.arange(features), "uint32")[None, :]
    counter = rows * ops.cast(features, "uint32") + cols
    bits = _fmix32(_fmix32(ops.bitwise_xor(counter, key[0])) + key[1])
    return ops.cast(ops.right_shift(bits, 8), "float32") * (2.0**-24)


def _replace_cells(x, key, rate: float, row_offset=0):
    """Replaces the cells with `u < rate` by the same feature of a random row."""
    batch, features = ops.shape(x)[0], ops.shape(x)[1]
    u = cell_uniforms(key, batch, features, row_offset)
    mask = u < rate
    n_rows = ops.cast(batch, "float32")
    # Given u < rate, u / rate is uniform on [0, 1) and picks the donor row. Clip in
    # floating point before the cast: unmasked cells have u / rate >= 1.
    donors = ops.cast(ops.minimum(u * (n_rows / rate), n_rows - 1.0), "int32")
    # An unmasked cell "gathers" from its own row: the same value, read from the cache
    # line the step reads anyway, so only the masked 30% of reads go to random rows
    # (a quarter less gather time than random rows everywhere, at 57k genes on CPU).
    rows = ops.where(mask, donors, ops.arange(batch, dtype="int32")[:, None])
    return ops.take_along_axis(x, rows, axis=0), ops.cast(mask, x.dtype)


_xla_replace_cells = None


def _replace(x, key, rate: float):
    """`_replace_cells`, compiled with XLA on the TensorFlow backend.

    TensorFlow's own per-cell gather (`GatherNd`) is latency-bound on CPU: ~0.45 s for
    256 x 57k cells, more than the first layer's matmul; XLA fuses the hash, the mask
    and the gather into one loop. A nested `jit_compile` function is an XLA cluster
    inside the (non-XLA) training step, so the rest of the model is unaffected.
    Under JAX the whole step is compiled with XLA already, over the global batch.
    """
    global _xla_replace_cells
    if keras.backend.backend() != "tensorflow":
        return _replace_cells(x, key, rate)
    import tensorflow as tf

    from keras_ssrl.distribute import replica_row_offset

    if _xla_replace_cells is None:
        _xla_replace_cells = tf.function(
            _replace_cells, jit_compile=True, reduce_retracing=True
        )
    # Replicas of a `tf.distribute` strategy share the layer's seed state: without
    # their row offset, example i of every replica would get the same mask.
    offset = tf.cast(replica_row_offset(x), "int32")
    return _xla_replace_cells(x, key, rate, offset)


@keras.saving.register_keras_serializable(package="keras_ssrl")
class MarginalCorruption(keras.layers.Layer):
    """Replaces a random fraction of features with draws from their empirical marginal.

    Each feature of each example is chosen with probability `rate` (a fresh mask at
    every call, never one mask for the whole training); a chosen value is replaced by
    the value the same feature takes in another example drawn uniformly from the batch,
    which is a draw from that feature's empirical marginal (SCARF, section 2.2.1; VIME's
    x~ = m * x_bar + (1 - m) * x). The replacement row is drawn from the current batch,
    as docs/protocol.md ("SCARF") allows; never Uniform(min, max). Per-feature Bernoulli
    masks corrupt a fraction `rate` on average (within +-0.2% at 57k genes) without a
    per-row sort.

    Randomness comes from `keras.random` with the layer's `SeedGenerator` (a fresh key
    per call, expanded to one uniform per cell by a counter-based hash, see
    `cell_uniforms`), so corruption runs in the training graph on the device and is
    reproducible from `seed`.

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
        # Two random words per call key the per-cell generator (`cell_uniforms`).
        key = keras.random.randint((2,), 0, 2**31 - 1, "int32", self.seed_generator)
        corrupted, mask = _replace(x, ops.cast(key, "uint32"), self.rate)
        return (corrupted, mask) if self.return_mask else corrupted

    def compute_output_shape(self, input_shape):
        if self.return_mask:
            return input_shape, input_shape
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed, return_mask=self.return_mask)
        return config
