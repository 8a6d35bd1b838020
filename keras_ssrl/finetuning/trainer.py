"""The fine-tuning loop: one classifier architecture trained on many subsets.

Owns `Finetuner`, which trains a classifier on a labelled subset with Adam, batch 8,
early stopping on the validation loss, and restores the best epoch (docs/protocol.md,
"Fine-tuning"); `RunResult`, what one run produced; `TrainState`, the state of a run
under JAX; and `classification_metrics`, the scores of the test split.

Why `Finetuner` has its own small loop rather than `Model.fit`: the label-efficiency
protocol is thousands of tiny runs (a few hundred samples, batch 8). `fit` traces new
graphs for every new model and pays a per-epoch cost (iterators, callbacks, a separate
validation pass) that dominates such runs. `Finetuner` builds its model and its graphs
once, and for each run only re-initialises the weights and the optimizer, then runs a
whole epoch (every step, plus the validation loss) in one graph call. In `frozen` mode
the encoder is a fixed function (weights untouched, BatchNorm in inference mode), so its
embeddings are computed once per encoder and only the head is trained on them: the same
model, without recomputing the encoder at every step.

The loop runs on the TensorFlow and the JAX backends of Keras (`KERAS_BACKEND`), with the
same results up to floating-point order: initial weights are drawn with NumPy and the
batch order comes from the same NumPy generator, whatever the backend.

- TensorFlow: the Keras variables hold the state; an epoch is one `tf.function` call,
  each step one XLA cluster.
- JAX: an epoch is one `jax.jit` call of a pure function of (state, data): the full
  batches in a `jax.lax.fori_loop` whose trip count is traced (subsets of any size share
  one compilation), then the last partial batch at its exact shape, then the validation
  loss. The state (`TrainState`) stays in JAX arrays between epochs; the Keras variables
  receive the best epoch's values when the run ends. Nothing imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from keras_ssrl.config import EncoderConfig, FinetuneConfig
from keras_ssrl.data.errors import DataError
from keras_ssrl.finetuning.data import FinetuneData
from keras_ssrl.finetuning.model import build_classifier
from keras_ssrl.finetuning.settings import (
    MODES,
    FinetuneError,
    validate_finetune_config,
)

# Rows per graph call when embedding or scoring a whole split.
_CHUNK = 2048
# The Keras backends `Finetuner` has a training loop for.
_BACKENDS = ("tensorflow", "jax")


def classification_metrics(y_true, y_pred, n_classes: int) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and the confusion matrix.

    Balanced accuracy and macro-F1 average over the classes present in `y_true` (and, for
    F1, predicted), as scikit-learn does.
    """
    from sklearn import metrics

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    return {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
        ),
        "confusion_matrix": metrics.confusion_matrix(
            y_true, y_pred, labels=np.arange(n_classes)
        ).tolist(),
    }


@dataclasses.dataclass
class RunResult:
    """What one fine-tuning run produced."""

    metrics: dict
    history: list[dict]
    epochs: int
    best_epoch: int
    n_train: int
    seconds: float


class Finetuner:
    """Fine-tunes one classifier architecture on many subsets, reusing its graphs.

    Runs on the TensorFlow and the JAX backends of Keras; the module docstring says how.

    Args:
        n_genes, n_classes: the dataset's shape.
        encoder_config: the encoder architecture (of the pre-trained run, or the
            baseline's).
        mode: `unfrozen` or `frozen`.
        config: a `FinetuneConfig` (learning rate, batch size, epochs, patience).

    Example:

    ```python
    tuner = Finetuner(data.n_genes, len(data.classes), EncoderConfig(), "unfrozen",
                      FinetuneConfig())
    result = tuner.run(data, subset, seed=1, encoder_weights=weights)
    ```
    """

    def __init__(
        self,
        n_genes: int,
        n_classes: int,
        encoder_config: EncoderConfig,
        mode: str,
        config: FinetuneConfig,
    ):
        import keras

        if mode not in MODES:
            raise FinetuneError(f"mode must be one of {MODES}, got {mode!r}")
        validate_finetune_config(config)
        backend = keras.backend.backend()
        if backend not in _BACKENDS:
            raise FinetuneError(
                f"fine-tuning runs on the {' and '.join(_BACKENDS)} backends of Keras, "
                f"not {backend!r}; set KERAS_BACKEND to one of them"
            )
        self.n_genes, self.n_classes = n_genes, n_classes
        self.encoder_config, self.mode, self.config = encoder_config, mode, config
        self._build_model()
        # Frozen without dropout: the encoder is a fixed function, so train the head on
        # embeddings computed once. With dropout the encoder is random in training, so
        # the whole classifier runs at every step (its encoder still frozen).
        self.precompute = mode == "frozen" and not encoder_config.dropout
        if mode == "frozen":
            self.encoder.trainable = False  # Keras 3: BatchNorm also runs in inference
        # The model a training step calls: the head alone on precomputed embeddings.
        self.model = self.head if self.precompute else self.classifier
        self.optimizer = keras.optimizers.Adam(config.learning_rate)
        self.optimizer.build(self.model.trainable_variables)
        self._fresh_optimizer = [v.numpy() for v in self.optimizer.variables]
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        loop = _TensorFlowLoop if backend == "tensorflow" else _JaxLoop
        self._loop = loop(self)
        self._features_of: tuple | None = None
        self._encoder_holds: str | None = None

    def _build_model(self) -> None:
        """The encoder, the classifier and its head, in float32 whatever the policy."""
        import keras

        from keras_ssrl.encoders import build_encoder

        encoder_config = self.encoder_config
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")
        try:
            self.encoder = build_encoder(
                self.n_genes,
                encoder_config.layers,
                encoder_config.width,
                encoder_config.dropout,
            )
            self.classifier = build_classifier(self.encoder, self.n_classes)
        finally:
            keras.config.set_dtype_policy(previous)
        self.head = self.classifier.get_layer("head")

    def _chunked(self, fn, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            raise DataError("nothing to evaluate: the split is empty")
        x = np.asarray(x, dtype=np.float32)
        return np.concatenate(
            [np.asarray(fn(x[i : i + _CHUNK])) for i in range(0, len(x), _CHUNK)]
        )

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of standardised values (or of embeddings in precomputed frozen mode)."""
        return self._chunked(self._loop.logits, x)

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Embeddings of standardised values by the encoder (inference mode)."""
        return self._chunked(self._loop.embed, x)

    def reset(
        self,
        seed: int,
        encoder_weights: list[np.ndarray] | None,
        encoder_key: str | None = None,
    ) -> None:
        """Fresh head (and baseline encoder) from `seed`; optimizer state cleared.

        Variables are re-drawn from their layers' initialisers and assigned in place,
        which keeps this model, its variables and its traced graphs.
        """
        # Everything a run draws comes from `rng`, not from the global seeds (which
        # `keras.utils.set_random_seed` would set by importing TensorFlow, even under
        # JAX): the weights, the dropout generators, and (in `run`) the batch order.
        rng = np.random.default_rng(seed)
        _reinitialize(self.head, rng)
        if encoder_weights is None:
            _reinitialize(self.encoder, rng)
            self._encoder_holds = None
        elif encoder_key is None or self._encoder_holds != encoder_key:
            self.encoder.set_weights(encoder_weights)
            # Frozen training never changes the encoder: no reload while it holds them.
            self._encoder_holds = encoder_key if self.mode == "frozen" else None
        # Dropout masks come from each layer's own generator, which a global seed does
        # not restart: restart it here, so that a run depends on its seed only.
        _reseed(self.encoder, rng)
        for variable, value in zip(self.optimizer.variables, self._fresh_optimizer):
            variable.assign(value)

    def _features(self, data: FinetuneData, key) -> tuple[np.ndarray, ...]:
        splits = (data.train.x, data.val.x, data.test.x)
        if not self.precompute:
            return splits
        # Embeddings depend only on the (fixed) encoder weights: reuse them across the
        # subsets and repeats of one encoder.
        if self._features_of is None or self._features_of[0] != key:
            self._features_of = (key, tuple(self.embed(x) for x in splits))
        return self._features_of[1]

    def run(
        self,
        data: FinetuneData,
        subset: np.ndarray,
        seed: int,
        encoder_weights: list[np.ndarray] | None,
        *,
        encoder_key: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> RunResult:
        """Trains on `data.train[subset]` with early stopping; scores on the test split.

        Args:
            data: the dataset's fine-tuning splits.
            subset: indices into the training split.
            seed: seed of the head (and baseline encoder) initialisation and of the
                batch order.
            encoder_weights: pre-trained encoder weights, or None for the baseline.
            encoder_key: identifies `encoder_weights` (frozen embeddings are reused
                while it is unchanged); None disables the reuse.
            log: optional callable receiving one line per epoch.

        Returns:
            A `RunResult`: test metrics, history, epochs run and the best epoch.

        Raises:
            FinetuneError: frozen mode without pre-trained weights, or a subset that is
                empty or indexes outside the training split.
            FloatingPointError: the training or validation loss diverged.
        """
        if self.mode == "frozen" and encoder_weights is None:
            raise FinetuneError("frozen fine-tuning needs a pre-trained encoder")
        subset = _checked_subset(subset, len(data.train.y))
        started = time.perf_counter()
        self.reset(seed, encoder_weights, encoder_key)
        key = encoder_key if encoder_key is not None else object()
        x_train, x_val, x_test = self._features(data, key)
        history, best_epoch = self._fit(
            (x_train, data.train.y),
            (x_val, data.val.y),
            subset,
            np.random.default_rng(seed),
            log,
        )
        predictions = self.logits(x_test).argmax(axis=1)
        metrics = classification_metrics(data.test.y, predictions, self.n_classes)
        return RunResult(
            metrics=metrics,
            history=history,
            epochs=len(history),
            best_epoch=best_epoch,
            n_train=int(len(subset)),
            seconds=time.perf_counter() - started,
        )

    def _fit(self, train, val, subset, rng, log) -> tuple[list[dict], int]:
        """The epochs of one run; leaves the best epoch's weights in the model.

        Args:
            train, val: `(x, y)` NumPy arrays of the training split (all of it: the
                batches pick rows of `subset`) and of the validation split.
            subset: int32 indices of the training rows of this run.
            rng: the NumPy generator of the batch order.
            log: optional callable receiving one line per epoch.

        Returns:
            The history (one row per epoch run) and the best epoch.
        """
        loop = self._loop
        loop.start(train, val)
        best, best_epoch, best_state, history = np.inf, 0, None, []
        for epoch in range(1, self.config.max_epochs + 1):
            loss, accuracy, val_loss, val_accuracy = loop.epoch(rng.permutation(subset))
            history.append(
                {
                    "epoch": epoch,
                    "loss": loss,
                    "accuracy": accuracy,
                    "val_loss": val_loss,
                    "val_accuracy": val_accuracy,
                }
            )
            if log is not None:
                log(f"epoch {epoch}: loss {loss:.4f}, val_loss {val_loss:.4f}")
            if not (np.isfinite(loss) and np.isfinite(val_loss)):
                raise FloatingPointError(
                    f"fine-tuning diverged at epoch {epoch} (loss {loss}, val_loss "
                    f"{val_loss}); lower the learning rate"
                )
            if val_loss < best:
                best, best_epoch = val_loss, epoch
                best_state = loop.snapshot()
            elif epoch - best_epoch >= self.config.patience:
                break
        loop.finish(best_state)
        return history, best_epoch


def _checked_subset(subset, n_train: int) -> np.ndarray:
    """`subset` as int32 indices, refused unless it picks rows of the training split."""
    subset = np.asarray(subset)
    if subset.ndim != 1 or not len(subset) or subset.dtype.kind not in "iu":
        raise FinetuneError(
            f"subset must be a non-empty 1-D array of integer indices into the "
            f"training split, got shape {subset.shape} and dtype {subset.dtype}; "
            "draw it with stratified_subset(data.train.y, fraction, seed)"
        )
    outside = subset[(subset < 0) | (subset >= n_train)]
    if len(outside):
        raise FinetuneError(
            f"subset index {int(outside[0])} is outside the training split "
            f"({n_train} samples): indices must be in [0, {n_train})"
        )
    return subset.astype(np.int32)


class _TensorFlowLoop:
    """The epochs of a run under TensorFlow: the Keras variables hold the state.

    An epoch is one `tf.function` call (every step, then the validation loss). The
    graph functions have fixed signatures, so each is traced once per `Finetuner`.
    """

    def __init__(self, tuner: Finetuner):
        import tensorflow as tf

        self.model, self.encoder = tuner.model, tuner.encoder
        self.optimizer, self.loss = tuner.optimizer, tuner._loss
        self.batch = tuner.config.batch_size
        self.trainable = self.model.trainable_variables
        # The head's `call` takes no `training` argument.
        self._takes_training = not tuner.precompute
        # What training can change, saved at the best epoch: in frozen mode the head
        # only; unfrozen, every variable (BatchNorm moving statistics included).
        self.mutable = (
            tuner.head.variables
            if tuner.mode == "frozen"
            else tuner.classifier.variables
        )
        width = tuner.encoder_config.width if tuner.precompute else tuner.n_genes
        spec = tf.TensorSpec([None, width], tf.float32)
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
            input_signature=[tf.TensorSpec([None, tuner.n_genes], tf.float32)],
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

    # Graph functions: traced once per Finetuner.
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


class _JaxLoop:
    """The epochs of a run under JAX: pure functions of (state, data), jitted.

    `train_step` and `train_epoch` map a `TrainState` and data to the next state;
    `validation` reads one. They use the Keras model and optimizer for their
    structure only (`stateless_call`, `stateless_apply`), never their variables, so they
    compose with `jax.vmap`. The variables are read when a run starts and assigned when
    it ends.
    """

    def __init__(self, tuner: Finetuner):
        import jax

        self.model, self.encoder = tuner.model, tuner.encoder
        self.optimizer, self.loss = tuner.optimizer, tuner._loss
        self.batch = tuner.config.batch_size
        # The head's `call` takes no `training` argument (`stateless_call` calls it).
        self._takes_training = not tuner.precompute
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
        """Trains one epoch in batches of `order` (returns as `_TensorFlowLoop.epoch`)."""
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


def _reinitialize(model, rng: np.random.Generator) -> None:
    """Re-draws every variable of `model`'s layers from the layer's own initialisers.

    Random initialisers are sampled with NumPy from `rng` (`_initial_value`): Keras
    would draw them from the backend's generator, which gives TensorFlow and JAX
    different weights for one seed.
    """
    import keras

    def fresh(initializer, variable):
        shape, dtype = tuple(variable.shape), variable.dtype
        variable.assign(_initial_value(initializer, shape, dtype, rng))

    for layer in model.layers if hasattr(model, "layers") else [model]:
        if isinstance(layer, keras.layers.Dense):
            fresh(layer.kernel_initializer, layer.kernel)
            if layer.use_bias:
                fresh(layer.bias_initializer, layer.bias)
        elif isinstance(layer, keras.layers.BatchNormalization):
            for name in ("gamma", "beta", "moving_mean", "moving_variance"):
                variable = getattr(layer, name, None)
                if variable is not None:
                    fresh(getattr(layer, f"{name}_initializer"), variable)
        elif layer.weights:
            raise FinetuneError(
                f"cannot re-initialise layer {layer.name!r} ({type(layer).__name__})"
            )


def _initial_value(initializer, shape: tuple, dtype, rng: np.random.Generator):
    """A value of `initializer` for `shape`, drawn from `rng` with NumPy if random.

    Covers Keras's random initialisers (`VarianceScaling`, hence Glorot, He and LeCun;
    `RandomNormal`, `RandomUniform`, `TruncatedNormal`) with their Keras definitions;
    deterministic ones (zeros, ones) are called as they are. Any other random one is
    rebuilt with a seed drawn from `rng` (Keras initialisers fix their seed when
    constructed, so calling the layer's own would repeat its values); its values then
    depend on the backend.
    """
    import keras

    init = keras.initializers
    if isinstance(initializer, init.VarianceScaling) and not (
        getattr(initializer, "input_axes", None)
        or getattr(initializer, "output_axes", None)
    ):
        fan_in, fan_out = _fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out}.get(
            initializer.mode, (fan_in + fan_out) / 2.0
        )
        scale = initializer.scale / max(1.0, fan)
        if initializer.distribution == "uniform":
            limit = math.sqrt(3.0 * scale)
            value = rng.uniform(-limit, limit, shape)
        elif initializer.distribution == "truncated_normal":
            # Keras's constant: the std of a unit normal truncated at +-2.
            value = _truncated_normal(
                rng, shape, math.sqrt(scale) / 0.87962566103423978
            )
        else:
            value = rng.normal(0.0, math.sqrt(scale), shape)
    elif isinstance(initializer, init.TruncatedNormal):
        value = initializer.mean + _truncated_normal(rng, shape, initializer.stddev)
    elif isinstance(initializer, init.RandomNormal):
        value = rng.normal(initializer.mean, initializer.stddev, shape)
    elif isinstance(initializer, init.RandomUniform):
        value = rng.uniform(initializer.minval, initializer.maxval, shape)
    else:
        config = initializer.get_config()
        if "seed" in config:
            config["seed"] = int(rng.integers(2**31 - 1))
            initializer = type(initializer).from_config(config)
        return initializer(shape, dtype)
    return np.asarray(value, dtype=dtype)


def _fans(shape: tuple) -> tuple[int, int]:
    """Input and output units of a weight shape, as Keras counts them."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _truncated_normal(rng: np.random.Generator, shape: tuple, stddev: float):
    """Normal values with `stddev`, redrawn until within two standard deviations."""
    value = rng.standard_normal(shape)
    outside = np.abs(value) > 2.0
    while outside.any():
        value[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(value) > 2.0
    return value * stddev


def _reseed(model, rng: np.random.Generator) -> None:
    """Restarts the random generator of each of `model`'s layers (dropout) from `rng`."""
    import keras

    for layer in model.layers:
        generator = getattr(layer, "seed_generator", None)
        if isinstance(generator, keras.random.SeedGenerator):
            state = generator.state
            seed = int(rng.integers(2**31 - 1))
            state.assign(np.array([seed, 0], dtype=state.dtype))
