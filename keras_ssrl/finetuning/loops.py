"""The epochs of one fine-tuning run, one loop per Keras backend.

Owns `TensorFlowLoop` and `JaxLoop`, which `Finetuner` drives epoch by epoch, `LoopParts`,
what a loop is built from, and `TrainState`, the state of a run under JAX. The
early stopping, the history and the scoring stay in `Finetuner`; a loop only trains one
epoch at a time, snapshots the state of the best epoch and restores it.

Both loops have the same interface, so that `Finetuner` does not depend on the backend:

- `start(train, val)`: a run's splits, as NumPy `(x, y)` pairs;
- `epoch(order)`: one epoch in batches of `order`, returning the training loss and
  accuracy and the validation loss and accuracy;
- `snapshot()` / `finish(best)`: the state worth keeping at the best epoch, and its
  restoration into the Keras variables when the run ends;
- `logits(x)` / `embed(x)`: the trained model and the encoder in inference mode.

Where the state lives:

- TensorFlow: the Keras variables hold the state; an epoch is one `tf.function` call,
  each step one XLA cluster.
- JAX: an epoch is one `jax.jit` call of a pure function of (state, data): the full
  batches in a `jax.lax.fori_loop` whose trip count is traced (subsets of any size share
  one compilation), then the last partial batch at its exact shape, then the validation
  loss. The state (`TrainState`) stays in JAX arrays between epochs; the Keras variables
  receive the best epoch's values when the run ends. Nothing imports TensorFlow.

This module reads the Keras objects it is given and nothing else of the package, so the
trainer imports it, never the reverse.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoopParts:
    """What a loop trains, and how.

    Attributes:
        model: the model a training step calls: the classifier, or in precomputed
            frozen mode the head alone (on embeddings).
        encoder: the encoder, for `embed`.
        optimizer: the built Keras optimizer of `model`'s trainable variables.
        loss: the loss of `(labels, logits)`.
        batch_size: rows per training step.
        takes_training: whether `model`'s `call` takes a `training` argument (the
            classifier does, the head layer does not).
        mutable: the variables training can change, saved at the best epoch under
            TensorFlow.
        input_width: the width of `model`'s input (genes, or the embedding width).
        n_genes: the width of the encoder's input.
    """

    model: object
    encoder: object
    optimizer: object
    loss: object
    batch_size: int
    takes_training: bool
    mutable: list
    input_width: int
    n_genes: int


class TensorFlowLoop:
    """The epochs of a run under TensorFlow: the Keras variables hold the state.

    An epoch is one `tf.function` call (every step, then the validation loss). The
    graph functions have fixed signatures, so each is traced once per loop (one per
    `Finetuner`).
    """

    def __init__(self, parts: LoopParts):
        import tensorflow as tf

        self.model, self.encoder = parts.model, parts.encoder
        self.optimizer, self.loss = parts.optimizer, parts.loss
        self.batch = parts.batch_size
        self.trainable = self.model.trainable_variables
        self._takes_training = parts.takes_training
        self.mutable = parts.mutable
        spec = tf.TensorSpec([None, parts.input_width], tf.float32)
        index = tf.TensorSpec([None], tf.int32)
        # One XLA cluster per step: at batch 8 the step's cost is Adam's passes over the
        # first layer's weights (genes x width), which XLA fuses into one (3-4x faster
        # on CPU). Shapes are static per batch size, so at most `batch_size` compiles.
        self._step = tf.function(self._train_step, jit_compile=True)
        self._epoch = tf.function(
            self._train_epoch, input_signature=[spec, index, index, spec, index]
        )
        self.logits = tf.function(
            lambda x: self._forward(x, False), input_signature=[spec]
        )
        self.embed = tf.function(
            lambda x: self.encoder(x, training=False),
            input_signature=[tf.TensorSpec([None, parts.n_genes], tf.float32)],
        )
        self._data: tuple | None = None

    def start(self, train, val) -> None:
        """Holds a run's splits as tensors (NumPy `(x, y)` pairs)."""
        import tensorflow as tf

        self._data = tuple(tf.constant(a) for a in (*train, *val))

    def epoch(self, order: np.ndarray) -> tuple[float, float, float, float]:
        """Trains one epoch in batches of `order`.

        Returns:
            Training loss and accuracy (over the epoch's batches, in training mode)
            and validation loss and accuracy (after the epoch).
        """
        import tensorflow as tf

        x, y, x_val, y_val = self._data
        out = self._epoch(x, y, tf.constant(order), x_val, y_val)
        return tuple(float(v) for v in out)

    def snapshot(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.mutable]

    def finish(self, best: list[np.ndarray]) -> None:
        """Assigns the best epoch's values; releases the run's tensors."""
        for variable, value in zip(self.mutable, best):
            variable.assign(value)
        self._data = None

    # Graph functions: traced once per loop.
    def _forward(self, x, training):
        if self._takes_training:
            return self.model(x, training=training)
        return self.model(x)

    def _train_epoch(self, x, y, order, x_val, y_val):
        import tensorflow as tf

        batch = self.batch
        n = tf.shape(order)[0]
        steps = (n + batch - 1) // batch
        total, correct = tf.constant(0.0), tf.constant(0.0)
        for i in tf.range(steps):
            idx = order[i * batch : (i + 1) * batch]
            loss, hits = self._step(tf.gather(x, idx), tf.gather(y, idx))
            total += loss * tf.cast(tf.shape(idx)[0], tf.float32)
            correct += hits
        logits = self._forward(x_val, False)
        rows = tf.cast(n, tf.float32)
        val_rows = tf.cast(tf.shape(y_val)[0], tf.float32)
        return (
            total / rows,
            correct / rows,
            self.loss(y_val, logits),
            _hits(logits, y_val) / val_rows,
        )

    def _train_step(self, x, y):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = self._forward(x, True)
            loss = self.loss(y, logits)
        grads = tape.gradient(loss, self.trainable)
        self.optimizer.apply(grads, self.trainable)
        return loss, _hits(logits, y)


class TrainState(NamedTuple):
    """The state of one run under JAX: values of the variables, as JAX arrays.

    Each field is a tuple in the order of the trained model's `trainable_variables`
    and `non_trainable_variables` (BatchNorm statistics, dropout seeds) and of the
    optimizer's `variables`. A JAX pytree, so it can be stacked over runs.
    """

    trainable: tuple
    non_trainable: tuple
    optimizer: tuple


class JaxLoop:
    """The epochs of a run under JAX: pure functions of (state, data), jitted.

    `train_step` and `train_epoch` map a `TrainState` and data to the next state;
    `validation` reads one. They use the Keras model and optimizer for their
    structure only (`stateless_call`, `stateless_apply`), never their variables, so they
    compose with `jax.vmap`. The variables are read when a run starts and assigned when
    it ends.
    """

    def __init__(self, parts: LoopParts):
        import jax

        self.model, self.encoder = parts.model, parts.encoder
        self.optimizer, self.loss = parts.optimizer, parts.loss
        self.batch = parts.batch_size
        self._takes_training = parts.takes_training
        # `rest`, the rows of the last partial batch, fixes a shape: at most
        # `batch_size` compilations, whatever the subset sizes.
        self._epoch = jax.jit(self.train_epoch, static_argnames="rest")
        self._logits = jax.jit(
            lambda values, x: self.forward(*values, x, training=False)[0]
        )
        self._embed = jax.jit(
            lambda values, x: self.encoder.stateless_call(*values, x, training=False)[0]
        )
        self._state: TrainState | None = None
        self._data: tuple | None = None
        self._rows = 0

    # Pure functions of the state.
    def forward(self, trainable, non_trainable, x, training):
        """Logits and the updated non-trainable values."""
        kwargs = {"training": training} if self._takes_training else {}
        return self.model.stateless_call(trainable, non_trainable, x, **kwargs)

    def batch_loss(self, trainable, non_trainable, x, y):
        logits, non_trainable = self.forward(trainable, non_trainable, x, True)
        return self.loss(y, logits), (tuple(non_trainable), _hits(logits, y))

    def train_step(self, state: TrainState, x, y):
        """One Adam step on the batch `(x, y)`.

        Returns:
            The next state, the batch loss and its number of correct predictions.
        """
        import jax

        grad = jax.value_and_grad(self.batch_loss, has_aux=True)
        (loss, (non_trainable, hits)), grads = grad(
            state.trainable, state.non_trainable, x, y
        )
        trainable, optimizer = self.optimizer.stateless_apply(
            state.optimizer, grads, state.trainable
        )
        return TrainState(tuple(trainable), non_trainable, tuple(optimizer)), loss, hits

    def validation(self, state: TrainState, x, y):
        """Validation loss and accuracy (inference mode)."""
        logits, _ = self.forward(state.trainable, state.non_trainable, x, False)
        return self.loss(y, logits), _hits(logits, y) / y.shape[0]

    def train_epoch(self, state: TrainState, data, order, steps, *, rest: int):
        """One epoch: `steps` full batches, the last `rest` rows, the validation loss.

        Args:
            state: the `TrainState` before the epoch.
            data: `(x, y, x_val, y_val)`; the batches take rows of `x`, `y` by `order`.
            order: int32 row indices, shuffled, then padded to a length that does not
                depend on the subset (at least `steps * batch_size + rest`).
            steps: the number of full batches, a traced int32 scalar.
            rest: the rows of the last partial batch (0 to `batch_size - 1`), static.

        Returns:
            The state after the epoch, the mean training loss and accuracy over its
            rows, and the validation loss and accuracy.
        """
        import jax
        import jax.numpy as jnp

        x, y, x_val, y_val = data
        batch = self.batch

        def step(state, start, size):
            idx = jax.lax.dynamic_slice(order, (start,), (size,))
            return self.train_step(state, x[idx], y[idx])

        def body(i, carry):
            state, total, correct = carry
            state, loss, hits = step(state, i * batch, batch)
            return state, total + loss * batch, correct + hits

        zero = jnp.zeros((), jnp.float32)
        state, total, correct = jax.lax.fori_loop(0, steps, body, (state, zero, zero))
        if rest:
            # At its own shape: padding rows would change BatchNorm's batch statistics.
            state, loss, hits = step(state, steps * batch, rest)
            total, correct = total + loss * rest, correct + hits
        rows = (steps * batch + rest).astype(jnp.float32)
        return (
            state,
            total / rows,
            correct / rows,
            *self.validation(state, x_val, y_val),
        )

    # The run, around the pure functions.
    def start(self, train, val) -> None:
        """Reads the state from the Keras variables; puts the splits on the device."""
        import jax.numpy as jnp

        self._rows = len(train[0])
        self._data = tuple(jnp.asarray(a) for a in (*train, *val))
        self._state = TrainState(
            _values(self.model.trainable_variables),
            _values(self.model.non_trainable_variables),
            _values(self.optimizer.variables),
        )

    def epoch(self, order: np.ndarray) -> tuple[float, float, float, float]:
        """Trains one epoch in batches of `order` (returns as `TensorFlowLoop.epoch`)."""
        steps, rest = divmod(len(order), self.batch)
        padded = np.zeros(max(self._rows, len(order)), np.int32)
        padded[: len(order)] = order
        self._state, *values = self._epoch(
            self._state, self._data, padded, np.int32(steps), rest=rest
        )
        return tuple(float(v) for v in values)

    def snapshot(self) -> TrainState:
        # JAX arrays are immutable and the epoch does not donate its input: no copy.
        return self._state

    def finish(self, best: TrainState) -> None:
        """Assigns the best epoch's values (and the optimizer's last) to the Keras
        variables, so that `logits`, `embed` and saving see them."""
        assignments = (
            (self.model.trainable_variables, best.trainable),
            (self.model.non_trainable_variables, best.non_trainable),
            (self.optimizer.variables, self._state.optimizer),
        )
        for variables, values in assignments:
            for variable, value in zip(variables, values):
                variable.assign(value)
        self._state = self._data = None

    def logits(self, x):
        model = self.model
        values = (
            _values(model.trainable_variables),
            _values(model.non_trainable_variables),
        )
        return self._logits(values, x)

    def embed(self, x):
        encoder = self.encoder
        values = (
            _values(encoder.trainable_variables),
            _values(encoder.non_trainable_variables),
        )
        return self._embed(values, x)


def _hits(logits, y):
    """Correct predictions in a batch, as a float32 count (either backend)."""
    from keras import ops

    predicted = ops.argmax(logits, axis=-1)
    return ops.sum(
        ops.cast(ops.equal(predicted, ops.cast(y, predicted.dtype)), "float32")
    )


def _values(variables) -> tuple:
    """The current values of Keras variables (JAX arrays under JAX)."""
    return tuple(v.value for v in variables)
