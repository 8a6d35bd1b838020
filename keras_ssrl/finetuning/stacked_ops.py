"""The stacked model's building blocks: pure `keras.ops` functions with a run axis.

Owns the functions of `StackedClassifier` (`keras_ssrl.finetuning.stacked_model`) that
know nothing of fine-tuning: the stacked layers (`dense`, `masked_moments`, `normalize`),
the loss and the correct predictions (`cross_entropy`, `hits`), the per-run selection
that leaves stopped runs untouched (`per_run`, `select`), and the two places where the
backends differ (`compile_fn`, `value_and_grad`). Every array carries the runs on axis 0.

They are kept apart so that the stacked model's maths can be read (and checked against
Keras's layers) without the bookkeeping of the runs, and so that TensorFlow is imported
only inside `compile_fn` and `value_and_grad`, under the TensorFlow backend.
"""

from __future__ import annotations


def compile_fn(fn, donate_first: bool = False):
    """`fn` compiled once per input shapes: `jax.jit`, or an XLA `tf.function`.

    `donate_first`: under JAX, `fn` may reuse the buffers of its first argument (the
    state it replaces), which spares copying every stacked weight at each call.
    """
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn, donate_argnums=(0,) if donate_first else ())
    import tensorflow as tf

    return tf.function(fn, jit_compile=True)


def value_and_grad(fn):
    """`params -> ((value, aux), grads)` of `fn(params) -> (value, aux)`, any backend."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.value_and_grad(fn, has_aux=True)
    import tensorflow as tf

    def taped(params):
        with tf.GradientTape() as tape:
            tape.watch(params)
            value, aux = fn(params)
        return (value, aux), tuple(tape.gradient(value, params))

    return taped


def dense(x, kernel, bias):
    """A stacked Dense layer: `x` is `[runs, rows, in]`, or `[rows, in]` for all runs."""
    from keras import ops

    if len(x.shape) == 2:
        # A batched matmul over a broadcast copy: XLA on CPU runs `bi,rio->rbo` (no
        # batch dimension) 2-3 times slower than `rbi,rio->rbo`.
        x = ops.broadcast_to(x, (kernel.shape[0], *x.shape))
    return ops.einsum("rbi,rio->rbo", x, kernel) + ops.expand_dims(bias, 1)


def masked_moments(h, mask):
    """Per run, the mean and (biased) variance of `h` over the rows where `mask` is 1."""
    from keras import ops

    weights = ops.expand_dims(mask, -1)
    # A run without rows gets moments of 0 (it is not updated; this avoids 0 / 0).
    count = ops.expand_dims(ops.maximum(ops.sum(mask, axis=1), 1.0), -1)
    mean = ops.sum(h * weights, axis=1) / count
    centred = h - ops.expand_dims(mean, 1)
    variance = ops.sum(ops.square(centred) * weights, axis=1) / count
    return mean, variance


def normalize(h, mean, variance, gamma, beta, epsilon):
    """Keras's `ops.batch_normalization`, with per-run `[runs, units]` parameters."""
    from keras import ops

    inv = ops.rsqrt(variance + epsilon) * gamma
    return h * ops.expand_dims(inv, 1) + ops.expand_dims(beta - mean * inv, 1)


def cross_entropy(y, logits, n_classes: int):
    """Sparse categorical cross-entropy from logits, per row: `[runs, rows]`."""
    from keras import ops

    log_probs = ops.log_softmax(logits, axis=-1)
    return -ops.sum(ops.one_hot(y, n_classes) * log_probs, axis=-1)


def hits(y, logits, mask=None):
    """Per run, the correct predictions of `logits` `[runs, rows, classes]` (float32),
    among the rows where `mask` is 1 (all rows without one)."""
    from keras import ops

    predicted = ops.argmax(logits, axis=-1)
    correct = ops.cast(ops.equal(predicted, ops.cast(y, predicted.dtype)), "float32")
    if mask is not None:
        correct = correct * mask
    return ops.sum(correct, axis=-1)


def per_run(values, like):
    """`[runs]` values shaped to broadcast against `like` (runs on axis 0)."""
    from keras import ops

    return ops.reshape(values, (-1,) + (1,) * (len(like.shape) - 1))


def select(condition, new, old) -> tuple:
    """Per run, `new` where `condition` holds, else `old` (the same bits)."""
    from keras import ops

    return tuple(ops.where(per_run(condition, n), n, o) for n, o in zip(new, old))
