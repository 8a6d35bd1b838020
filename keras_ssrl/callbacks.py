"""Keras callbacks of the pre-training driver: monitors, best weights, fault tolerance.

- `CollapseMonitor`: label-free collapse monitors on a fixed validation subset, added
  to the epoch logs (so `CSVLogger` and `TensorBoard` record them).
- `NonFiniteLossGuard`: stops training when the loss turns NaN or inf, naming the step.
- `BestEncoderWeights`: a copy of the encoder weights at the best validation loss.
- `TrainingCheckpoint`: decides when to checkpoint the whole training state (every N
  steps, at each epoch end, on request such as a SIGTERM); the writing itself is
  `keras_ssrl.training.checkpoints.CheckpointStore`'s.

`keras_ssrl.training.run_pretraining` wires them together; each also works alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import numpy as np

from keras_ssrl.metrics import collapse_metrics

if TYPE_CHECKING:  # the store is only called: no import of the training package
    from keras_ssrl.training.checkpoints import CheckpointStore


class CollapseMonitor(keras.callbacks.Callback):
    """Adds label-free collapse monitors of the encoder to the logs at each epoch end.

    The encoder embeds `data` (inference mode) and the callback adds
    `{prefix}embedding_std`, `{prefix}effective_rank` and `{prefix}collapsed_dims`
    (see `keras_ssrl.metrics` and docs/protocol.md, "Dimensional collapse") to the
    epoch logs. Callbacks after it in the list (`CSVLogger`, `TensorBoard`, the
    progress bar) record them; with the default `val_` prefix TensorBoard shows them in
    the validation run.

    Args:
        encoder: the `keras.Model` to monitor (genes -> embedding).
        data: a `tf.data.Dataset` of input batches (no labels), the same rows every
            epoch, e.g. up to 2048 rows of the pre-training validation split.
        prefix: str, prepended to the log names.

    Example:

    ```python
    monitor = CollapseMonitor(model.encoder, val_subset)
    model.fit(train, validation_data=val, callbacks=[monitor, CSVLogger(...)])
    ```
    """

    def __init__(self, encoder: keras.Model, data, prefix: str = "val_"):
        super().__init__()
        self.encoder = encoder
        self.data = data
        self.prefix = prefix
        self.last: dict[str, float] = {}

    def on_epoch_end(self, epoch, logs=None):
        if keras.backend.backend() == "jax":
            # `predict` under `keras.distribution.DataParallel` fails in Keras 3.15
            # (it aliases donated, sharded buffers of the wrong size); a direct call
            # on the few monitor batches works on one device and on many.
            embeddings = np.concatenate(
                [np.asarray(self.encoder(x, training=False)) for x in self.data]
            )
        else:
            embeddings = self.encoder.predict(self.data, verbose=0)
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if not np.all(np.isfinite(embeddings)):
            # A diverged encoder: the guard reports the loss; keep the logs numeric.
            self.last = {
                f"{self.prefix}{k}": math.nan
                for k in ("embedding_std", "effective_rank", "collapsed_dims")
            }
        else:
            self.last = {
                f"{self.prefix}{name}": value
                for name, value in collapse_metrics(embeddings).items()
            }
        if logs is not None:
            logs.update(self.last)


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops training as soon as the reported loss is NaN or inf, naming the step.

    Unlike `keras.callbacks.TerminateOnNaN`, it counts global optimizer steps across
    `fit` calls and resumes (`initial_step`) and keeps the step for the caller
    (`stopped_at`). Under `mixed_float16` the `LossScaleOptimizer` already skips steps
    whose gradients overflow; only a non-finite *loss* (which no loss scale can fix)
    stops training.

    Args:
        initial_step: int, steps taken before this callback's first batch.
        monitor: str, the log entry to check (`loss`).
        log: callable receiving the message.
    """

    def __init__(
        self,
        initial_step: int = 0,
        monitor: str = "loss",
        log: Callable[[str], None] = print,
    ):
        super().__init__()
        self.step = int(initial_step)
        self.monitor = monitor
        self.log = log
        self.stopped_at: int | None = None
        self.value: float | None = None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        value = (logs or {}).get(self.monitor)
        if value is None or self.stopped_at is not None:
            return
        value = float(value)
        if not math.isfinite(value):
            self.stopped_at = self.step
            self.value = value
            self.log(f"{self.monitor} became {value} at step {self.step}: stopping")
            self.model.stop_training = True


class HistoryCSV(keras.callbacks.CSVLogger):
    """Keras' `CSVLogger`, numbering epochs from 1.

    Fine-tuning's `history.csv`, `summary.json`'s best epoch and Keras' own progress
    ("Epoch 1/20") count from 1; `CSVLogger` writes Keras' 0-based epoch index.
    """

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


class BestEncoderWeights(keras.callbacks.Callback):
    """Keeps a copy of the encoder weights from the epoch with the lowest `monitor`.

    The copy lives in non-trainable variables (`variables`), so it can go into the
    training checkpoint and survive a resume. Create the callback under the
    distribution strategy's scope, like the model. Epochs cut short by
    `model.stop_training` (preemption, divergence) are not candidates.

    Args:
        encoder: the `keras.Model` whose weights are copied.
        monitor: str, the epoch log to minimise (`val_loss`).
        copy_weights: bool, keep the weight copy (False: only track the best value).
    """

    def __init__(
        self,
        encoder: keras.Model,
        monitor: str = "val_loss",
        copy_weights: bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.monitor = monitor
        self.best = math.inf
        self.best_epoch: int | None = None
        self.variables = (
            [
                keras.Variable(w, trainable=False, name=f"best_{i}")
                for i, w in enumerate(encoder.get_weights())
            ]
            if copy_weights
            else []
        )

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or self.model.stop_training:
            return
        value = float(value)
        if math.isfinite(value) and value < self.best:
            self.best, self.best_epoch = value, int(epoch)
            for variable, weight in zip(self.variables, self.encoder.weights):
                variable.assign(weight)

    def state(self) -> dict:
        """The best value and epoch (0-based), for the checkpoint's JSON state."""
        best = self.best if math.isfinite(self.best) else None
        return {"monitor": self.monitor, "value": best, "epoch": self.best_epoch}

    def load_state(self, state: dict) -> None:
        value = state.get("value")
        self.best = math.inf if value is None else float(value)
        self.best_epoch = state.get("epoch")

    def restore_best(self) -> bool:
        """Sets the encoder to the best weights; False if there is no best yet."""
        if self.best_epoch is None or not self.variables:
            return False
        self.encoder.set_weights([v.numpy() for v in self.variables])
        return True


class TrainingCheckpoint(keras.callbacks.Callback):
    """Checkpoints every `every_n_steps` steps, at each epoch end, and on request.

    Counts global steps from `initial_step`. A step that ends an epoch is saved at the
    epoch end instead (after validation, so the state includes that epoch's best
    weights). `request_stop()` (e.g. from a SIGTERM handler) makes the callback write a
    checkpoint at the next step end and stop training; `preempted` tells the caller.
    After another callback stopped training (a non-finite loss), nothing more is saved,
    so the last checkpoint holds finite weights. The running sums of the model's metrics
    are saved too (`state["metrics"]`): given back as `initial_metrics`, they make the
    epoch a resume starts in report the mean over the whole epoch, as without a stop.

    Args:
        store: a `CheckpointStore`.
        checkpoint: the `VariablesCheckpoint` to write (model, optimizer, ...).
        steps_per_epoch: int, steps in a full epoch.
        every_n_steps: int, save period in steps (0: only at epoch ends).
        initial_step: int, steps already taken (when resuming).
        state_fn: optional callable `step -> dict` adding JSON state to each save.
        initial_metrics: optional `state["metrics"]` of the checkpoint resumed
            mid-epoch, restored at the start of the first epoch.
        log: callable receiving progress lines.
    """

    def __init__(
        self,
        store: CheckpointStore,
        checkpoint,
        steps_per_epoch: int,
        *,
        every_n_steps: int = 0,
        initial_step: int = 0,
        state_fn: Callable[[int], dict] | None = None,
        initial_metrics: list[list[float]] | None = None,
        log: Callable[[str], None] = print,
    ):
        super().__init__()
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.store = store
        self.checkpoint = checkpoint
        self.steps_per_epoch = int(steps_per_epoch)
        self.every_n_steps = int(every_n_steps or 0)
        self.step = int(initial_step)
        self.state_fn = state_fn
        self.initial_metrics = initial_metrics
        self.log = log
        self.stop_requested = False
        self.preempted = False
        self.halted = False
        self.last_saved: int | None = None

    def request_stop(self) -> None:
        """Asks for a checkpoint and a stop at the next step end (signal-safe)."""
        self.stop_requested = True

    def on_epoch_begin(self, epoch, logs=None):
        # Keras has just reset the metrics; a mid-epoch resume puts back their sums.
        if self.initial_metrics:
            for metric, values in zip(self.model.metrics, self.initial_metrics):
                for variable, value in zip(metric.variables, values):
                    variable.assign(value)
        self.initial_metrics = None

    def save(self) -> str:
        # Under JAX, `fit` keeps the training state outside the variables between
        # epochs: write it back first.
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        state = {
            "epoch": epoch,
            "batch": batch,
            "metrics": [
                [np.asarray(v).tolist() for v in metric.variables]
                for metric in self.model.metrics
            ],
        }
        if self.state_fn is not None:
            state.update(self.state_fn(self.step))
        folder = self.store.save(self.checkpoint, self.step, state)
        self.last_saved = self.step
        return folder

    def _at_epoch_end(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.halted or self.model.stop_training:
            # Another callback (the non-finite loss guard) stopped training during
            # this step: its weights are not worth a checkpoint.
            self.halted = True
            return
        if self._at_epoch_end():
            return  # saved by on_epoch_end, after validation
        if self.stop_requested:
            folder = self.save()
            self.log(f"stop requested: checkpoint at step {self.step} in {folder}")
            self.preempted = True
            self.model.stop_training = True
        elif self.every_n_steps and self.step % self.every_n_steps == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if self.halted or self.preempted:
            return  # the epoch was cut short and is not a complete state
        if self.last_saved != self.step:
            self.save()
        if self.stop_requested:
            self.log(f"stop requested: checkpoint at step {self.step} (epoch end)")
            self.preempted = True
            self.model.stop_training = True
