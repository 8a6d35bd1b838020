"""The fine-tuning loop: one classifier architecture trained on many subsets.

Owns `Finetuner`, which trains a classifier on a labelled subset with Adam, batch 8,
early stopping on the validation loss, and restores the best epoch (docs/protocol.md,
"Fine-tuning"); `RunResult`, what one run produced; and `classification_metrics`, the
scores of the test split.

Why `Finetuner` has its own small loop rather than `Model.fit`: the label-efficiency
protocol is thousands of tiny runs (a few hundred samples, batch 8). `fit` traces new
graphs for every new model and pays a per-epoch cost (iterators, callbacks, a separate
validation pass) that dominates such runs. `Finetuner` builds its model and its graphs
once, and for each run only re-initialises the weights and the optimizer, then runs a
whole epoch (every step, plus the validation loss) in one graph call. In `frozen` mode
the encoder is a fixed function (weights untouched, BatchNorm in inference mode), so its
embeddings are computed once per encoder and only the head is trained on them: the same
model, without recomputing the encoder at every step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

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
        self.n_genes, self.n_classes = n_genes, n_classes
        self.encoder_config, self.mode, self.config = encoder_config, mode, config
        self._build_model()
        # Frozen without dropout: the encoder is a fixed function, so train the head on
        # embeddings computed once. With dropout the encoder is random in training, so
        # the whole classifier runs at every step (its encoder still frozen).
        self.precompute = mode == "frozen" and not encoder_config.dropout
        if mode == "frozen":
            self.encoder.trainable = False  # Keras 3: BatchNorm also runs in inference
        self.trainable = (
            self.head.trainable_variables
            if self.precompute
            else self.classifier.trainable_variables
        )
        self.optimizer = keras.optimizers.Adam(config.learning_rate)
        self.optimizer.build(self.trainable)
        self._fresh_optimizer = [v.numpy() for v in self.optimizer.variables]
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._build_graphs()
        self._features_of: tuple | None = None
        self._encoder_holds: str | None = None
        # What training can change, saved at the best epoch: in frozen mode the head
        # only; unfrozen, every variable (BatchNorm moving statistics included).
        self._mutable = (
            self.head.variables if mode == "frozen" else self.classifier.variables
        )

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

    def _build_graphs(self) -> None:
        """The graph functions, with fixed signatures so that each is traced once."""
        import tensorflow as tf

        width = self.encoder_config.width if self.precompute else self.n_genes
        spec = tf.TensorSpec([None, width], tf.float32)
        index = tf.TensorSpec([None], tf.int32)
        # One XLA cluster per step: at batch 8 the step's cost is Adam's passes over the
        # first layer's weights (genes x width), which XLA fuses into one (3-4x faster
        # on CPU). Shapes are static per batch size, so at most `batch_size` compiles.
        self._step = tf.function(self._train_step, jit_compile=True)
        self._epoch = tf.function(
            self._train_epoch, input_signature=[spec, index, index, spec, index]
        )
        self._logits = tf.function(self._forward_infer, input_signature=[spec])
        self._embed = tf.function(
            lambda x: self.encoder(x, training=False),
            input_signature=[tf.TensorSpec([None, self.n_genes], tf.float32)],
        )

    # Graph functions: traced once per Finetuner.
    def _forward(self, x, training):
        if self.precompute:
            return self.head(x)
        return self.classifier(x, training=training)

    def _forward_infer(self, x):
        return self._forward(x, False)

    def _train_epoch(self, x, y, order, x_val, y_val):
        import tensorflow as tf

        batch = self.config.batch_size
        n = tf.shape(order)[0]
        steps = (n + batch - 1) // batch
        total = tf.constant(0.0)
        for i in tf.range(steps):
            idx = order[i * batch : (i + 1) * batch]
            loss = self._step(tf.gather(x, idx), tf.gather(y, idx))
            total += loss * tf.cast(tf.shape(idx)[0], tf.float32)
        val_loss = self._loss(y_val, self._forward(x_val, False))
        return total / tf.cast(n, tf.float32), val_loss

    def _train_step(self, x, y):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = self._loss(y, self._forward(x, True))
        grads = tape.gradient(loss, self.trainable)
        self.optimizer.apply(grads, self.trainable)
        return loss

    def _chunked(self, fn, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            raise DataError("nothing to evaluate: the split is empty")
        return np.concatenate(
            [fn(x[i : i + _CHUNK]).numpy() for i in range(0, len(x), _CHUNK)]
        )

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of standardised values (or of embeddings in precomputed frozen mode)."""
        return self._chunked(self._logits, x)

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self._chunked(self._embed, x)

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
        import keras

        rng = np.random.default_rng(seed)
        keras.utils.set_random_seed(seed)  # dropout and anything else drawn later
        _reinitialize(self.head, rng)
        if encoder_weights is None:
            _reinitialize(self.encoder, rng)
            self._encoder_holds = None
        elif encoder_key is None or self._encoder_holds != encoder_key:
            self.encoder.set_weights(encoder_weights)
            # Frozen training never changes the encoder: no reload while it holds them.
            self._encoder_holds = encoder_key if self.mode == "frozen" else None
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
        """
        import tensorflow as tf

        if self.mode == "frozen" and encoder_weights is None:
            raise FinetuneError("frozen fine-tuning needs a pre-trained encoder")
        started = time.perf_counter()
        self.reset(seed, encoder_weights, encoder_key)
        key = encoder_key if encoder_key is not None else object()
        x_train, x_val, x_test = self._features(data, key)
        subset = np.asarray(subset, dtype=np.int32)
        history, best_epoch = self._fit(
            (tf.constant(x_train), tf.constant(data.train.y)),
            (tf.constant(x_val), tf.constant(data.val.y)),
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

        Returns:
            The history (one row per epoch run) and the best epoch.
        """
        import tensorflow as tf

        best, best_epoch, best_weights, history = np.inf, 0, None, []
        for epoch in range(1, self.config.max_epochs + 1):
            order = tf.constant(rng.permutation(subset))
            loss, val_loss = self._epoch(*train, order, *val)
            loss, val_loss = float(loss), float(val_loss)
            history.append({"epoch": epoch, "loss": loss, "val_loss": val_loss})
            if log is not None:
                log(f"epoch {epoch}: loss {loss:.4f}, val_loss {val_loss:.4f}")
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"fine-tuning loss became {loss} at epoch {epoch}; lower the "
                    "learning rate"
                )
            if val_loss < best:
                best, best_epoch = val_loss, epoch
                best_weights = [v.numpy() for v in self._mutable]
            elif epoch - best_epoch >= self.config.patience:
                break
        for variable, value in zip(self._mutable, best_weights):
            variable.assign(value)
        return history, best_epoch


def _reinitialize(model, rng: np.random.Generator) -> None:
    """Re-draws every variable of `model`'s layers from the layer's own initialisers.

    Each initialiser is rebuilt with a seed drawn from `rng` (Keras initialisers fix
    their seed when constructed, so calling the layer's own would repeat its values).
    """
    import keras

    def fresh(initializer, variable):
        config = initializer.get_config()
        if "seed" in config:
            config["seed"] = int(rng.integers(2**31 - 1))
        value = type(initializer).from_config(config)(variable.shape, variable.dtype)
        variable.assign(value)

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
