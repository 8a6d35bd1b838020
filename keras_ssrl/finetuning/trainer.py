"""The fine-tuning loop: one classifier architecture trained on many subsets.

Owns `Finetuner`, which trains a classifier on a labelled subset with Adam, batch 8,
early stopping on the validation loss, and restores the best epoch (docs/protocol.md,
"Fine-tuning"); `RunResult`, what one run produced; and `classification_metrics`, the
scores of the test split. The epochs themselves run in a per-backend loop
(`keras_ssrl.finetuning.loops`, whose `TrainState` is re-exported here), and the initial
weights come from `keras_ssrl.finetuning.initialization`.

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
batch order comes from the same NumPy generator, whatever the backend. Under JAX nothing
imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from keras_ssrl.config import EncoderConfig, FinetuneConfig
from keras_ssrl.data.errors import DataError
from keras_ssrl.finetuning.data import FinetuneData, check_subset
from keras_ssrl.finetuning.initialization import reinitialize, reseed
from keras_ssrl.finetuning.loops import JaxLoop, LoopParts, TensorFlowLoop, TrainState
from keras_ssrl.finetuning.model import build_classifier
from keras_ssrl.finetuning.settings import FinetuneError, check_tuner_setup

# `TrainState` is defined with the JAX loop; re-exported, as callers import it from here.
__all__ = ["Finetuner", "RunResult", "TrainState", "classification_metrics"]

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

        check_tuner_setup(mode, config)
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
        tensorflow = keras.backend.backend() == "tensorflow"
        loop = TensorFlowLoop if tensorflow else JaxLoop
        self._loop = loop(self._loop_parts())
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

    def _loop_parts(self) -> LoopParts:
        """What the epoch loop trains: `self.model`, its optimizer and loss."""
        return LoopParts(
            model=self.model,
            encoder=self.encoder,
            optimizer=self.optimizer,
            loss=self._loss,
            batch_size=self.config.batch_size,
            # The head's `call` takes no `training` argument.
            takes_training=not self.precompute,
            # What training can change, saved at the best epoch: in frozen mode the
            # head only; unfrozen, every variable (BatchNorm moving statistics
            # included).
            mutable=(
                self.head.variables
                if self.mode == "frozen"
                else self.classifier.variables
            ),
            input_width=self.encoder_config.width if self.precompute else self.n_genes,
            n_genes=self.n_genes,
        )

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
        reinitialize(self.head, rng)
        if encoder_weights is None:
            reinitialize(self.encoder, rng)
            self._encoder_holds = None
        elif encoder_key is None or self._encoder_holds != encoder_key:
            self.encoder.set_weights(encoder_weights)
            # Frozen training never changes the encoder: no reload while it holds them.
            self._encoder_holds = encoder_key if self.mode == "frozen" else None
        # Dropout masks come from each layer's own generator, which a global seed does
        # not restart: restart it here, so that a run depends on its seed only.
        reseed(self.encoder, rng)
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
        subset = check_subset(subset, len(data.train.y))
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
