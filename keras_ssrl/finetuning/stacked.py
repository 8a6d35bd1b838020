"""Many fine-tuning runs of one architecture at once: one model, weights stacked by run.

Owns `StackedFinetuner`, which trains N runs of `Finetuner` (docs/protocol.md,
"Fine-tuning") together and returns what each would have returned alone; `Job`, what one
run trains on; and `StackedRuns`, the runs of one call, epoch by epoch.

Why: the label-efficiency grid is thousands of tiny runs (batch 8, up to 100 epochs).
One such run leaves a GPU idle between kernel launches and a CPU paying per-call
overhead. Here every weight, BatchNorm statistic and Adam moment carries a leading run
axis, the layers are batched matmuls (`keras.ops.einsum`), and one compiled call trains
one epoch of every run (a loop over steps inside, then each run's validation loss).

Each run stays the run `Finetuner.run` would train alone, up to floating-point order:

- the same initial weights (drawn as `Finetuner.reset` draws them, from the job's seed)
  and the same batch order (`rng.permutation(subset)` per epoch, from its own generator);
- its own Adam state and step count (Keras's formula, bias correction by its own step);
- batches of fixed shape (runs x `batch_size` rows) with a validity mask: a run whose
  epoch has no batch left, or which has stopped, keeps its weights, moving statistics
  and optimizer state untouched (selected, not updated with a zero gradient, which
  Adam's momentum would still turn into a step). A last partial batch has its own size:
  BatchNorm's batch moments and the loss use the run's real rows only;
- early stopping on its own validation loss, and its best epoch restored.

`frozen` mode trains the stacked heads on embeddings computed once per distinct encoder.
Dropout is not supported: each run would need its own dropout masks; such jobs run one
at a time (`parallel_runs=1`).

Backends: the same `keras.ops` code runs under TensorFlow (`tf.function(jit_compile=True)`,
TensorFlow imported only there) and JAX (`jax.jit`, pure functions of explicit state).

The maths of the stacked model, pure functions of the state, lives in
`keras_ssrl.finetuning.stacked_model` (`StackedState`, re-exported here, and
`StackedClassifier`), built from the stacked layers of `keras_ssrl.finetuning.stacked_ops`.
This module owns the runs around it: the jobs, their initial weights, the frozen
embeddings, the batch orders, early stopping and the scores.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from keras_ssrl.config import EncoderConfig, FinetuneConfig
from keras_ssrl.finetuning.data import FinetuneData, check_subset
from keras_ssrl.finetuning.initialization import reinitialize
from keras_ssrl.finetuning.model import build_classifier
from keras_ssrl.finetuning.settings import FinetuneError, check_tuner_setup
from keras_ssrl.finetuning.stacked_model import StackedClassifier, StackedState
from keras_ssrl.finetuning.stacked_ops import compile_fn
from keras_ssrl.finetuning.trainer import RunResult, classification_metrics

# `StackedState` is defined with the stacked model; re-exported, as callers import it
# from here.
__all__ = ["Job", "StackedFinetuner", "StackedRuns", "StackedState"]

# Rows per call when embedding a split with a frozen encoder.
_CHUNK = 2048


@dataclasses.dataclass
class Job:
    """One fine-tuning run of a `StackedFinetuner.run_many` call.

    Attributes:
        subset: indices into the training split, as for `Finetuner.run`.
        seed: seed of the head (and baseline encoder) initialisation and of the batch
            order.
        encoder_weights: pre-trained encoder weights, or None for the baseline.
        encoder_key: identifies `encoder_weights` in frozen mode: jobs with the same key
            share one set of embeddings. None: jobs share them when they pass the same
            list object.
    """

    subset: np.ndarray
    seed: int
    encoder_weights: list[np.ndarray] | None
    encoder_key: str | None = None


class StackedFinetuner:
    """Fine-tunes N runs of one classifier architecture together, as one stacked model.

    `run_many(data, jobs)` returns, for each job, the `RunResult` of
    `Finetuner(...).run(data, job.subset, job.seed, job.encoder_weights)` (the module
    docstring says what is shared and what stays per run).

    Args:
        n_genes, n_classes: the dataset's shape.
        encoder_config: the encoder architecture; its dropout must be 0.
        mode: `unfrozen` or `frozen`.
        config: a `FinetuneConfig` (learning rate, batch size, epochs, patience).

    Unfrozen, the Dense bias before each BatchNorm has a gradient of zero up to
    rounding, which Adam turns into steps of up to the learning rate: those biases (and
    with them the moving means) follow the rounding of the code path, here as between
    `Finetuner`'s two backends. At the protocol's learning rate the runs agree with
    `Finetuner`'s to about 1e-5 in their losses; larger rates drift further apart.

    Every step computes every run (padded ones included): the work of an epoch is that
    of its longest run times the number of runs, so jobs of similar sizes stack best.
    Stacking saves per-call and per-launch overhead, not arithmetic: on a CPU an
    unfrozen encoder over thousands of genes gains nothing (its steps are bound by
    memory traffic, and the stacked weights no longer fit in cache), while frozen heads
    and small encoders gain several times.

    Raises:
        FinetuneError: an unknown mode, an invalid config, a backend other than
            TensorFlow or JAX, or an encoder with dropout.

    Example:

    ```python
    tuner = StackedFinetuner(data.n_genes, len(data.classes), EncoderConfig(),
                             "unfrozen", FinetuneConfig())
    jobs = [Job(stratified_subset(data.train.y, p, seed), seed, weights)
            for p, seed in grid]
    results = tuner.run_many(data, jobs)
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
        check_tuner_setup(mode, config, "stacked fine-tuning")
        if encoder_config.dropout:
            raise FinetuneError(
                f"stacked fine-tuning does not support dropout (the encoder has "
                f"dropout {encoder_config.dropout}): each run would need its own "
                "dropout masks; train these runs one at a time with parallel_runs=1"
            )
        self.n_genes, self.n_classes = n_genes, n_classes
        self.encoder_config, self.mode, self.config = encoder_config, mode, config
        self._build_template()
        self._epoch = compile_fn(self._stacked.train_epoch, donate_first=True)
        self._logits = compile_fn(self._stacked.inference_logits)

    def _build_template(self) -> None:
        """The Keras classifier the runs' initial weights are drawn from (float32), and
        the stacked model that trains them.

        The classifier is the model `Finetuner` builds; its variables are re-drawn for
        each job and read, never trained.
        """
        import keras

        from keras_ssrl.encoders import build_encoder

        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")
        try:
            self.encoder = build_encoder(
                self.n_genes, self.encoder_config.layers, self.encoder_config.width
            )
            self.classifier = build_classifier(self.encoder, self.n_classes)
        finally:
            keras.config.set_dtype_policy(previous)
        self.head = self.classifier.get_layer("head")
        dense = [x for x in self.encoder.layers if isinstance(x, keras.layers.Dense)]
        norms = [
            x
            for x in self.encoder.layers
            if isinstance(x, keras.layers.BatchNormalization)
        ]
        # The stacked forward pass hard-codes build_encoder's blocks.
        if len(dense) != len(norms) or len(dense) != self.encoder_config.layers:
            raise FinetuneError(
                "stacked fine-tuning expects build_encoder's [Dense -> BatchNorm -> "
                "ReLU] blocks; use parallel_runs=1 for another encoder"
            )
        # What a run trains and what it reads back, in `StackedState`'s order.
        self._param_variables, self._stat_variables = [], []
        if self.mode == "unfrozen":
            for layer, norm in zip(dense, norms):
                self._param_variables.extend(
                    (layer.kernel, layer.bias, norm.gamma, norm.beta)
                )
                self._stat_variables.extend((norm.moving_mean, norm.moving_variance))
        self._param_variables += [self.head.kernel, self.head.bias]
        adam = keras.optimizers.Adam(self.config.learning_rate)
        # Keras's own constants, so that each run computes what `Finetuner`'s layers and
        # optimizer compute.
        self._stacked = StackedClassifier(
            blocks=len(dense) if self.mode == "unfrozen" else 0,
            n_classes=self.n_classes,
            bn_epsilon=float(norms[0].epsilon),
            bn_momentum=float(norms[0].momentum),
            adam=(
                float(self.config.learning_rate),
                float(adam.beta_1),
                float(adam.beta_2),
                float(adam.epsilon),
            ),
        )

    # ------------------------------------------------------------------ the runs

    def run_many(
        self,
        data: FinetuneData,
        jobs: Sequence[Job],
        *,
        log: Callable[[str], None] | None = None,
    ) -> list[RunResult]:
        """Trains every job to its early stop; scores each on the test split.

        Args:
            data: the dataset's fine-tuning splits.
            jobs: the runs, as `Job`s.
            log: optional callable receiving one line per epoch.

        Returns:
            One `RunResult` per job, in the jobs' order; `seconds` is each run's share
            of the call's wall time.

        Raises:
            FinetuneError: no jobs, frozen mode without pre-trained weights, or a subset
                that is empty or indexes outside the training split.
            FloatingPointError: a run's training or validation loss diverged.
        """
        runs = self.start(data, jobs, log=log)
        while runs.epoch():
            pass
        return runs.results()

    def start(
        self,
        data: FinetuneData,
        jobs: Sequence[Job],
        *,
        log: Callable[[str], None] | None = None,
    ) -> StackedRuns:
        """The runs of `jobs` at their initial weights, to train epoch by epoch.

        `run_many` is `start`, then `epoch()` until it returns False, then `results()`.

        Raises:
            FinetuneError: as `run_many`.
        """
        return StackedRuns(self, data, list(jobs), log)

    # The initial state, on the host.
    def _initial_values(self, job: Job) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """A job's initial params and stats, drawn as `Finetuner.reset` draws them."""
        rng = np.random.default_rng(job.seed)
        reinitialize(self.head, rng)
        if self.mode == "unfrozen":
            if job.encoder_weights is None:
                reinitialize(self.encoder, rng)
            else:
                self.encoder.set_weights(job.encoder_weights)
        return (
            [np.asarray(v.numpy()) for v in self._param_variables],
            [np.asarray(v.numpy()) for v in self._stat_variables],
        )

    def _embed(self, weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        """Embeddings of `x` by the encoder with `weights` (BatchNorm in inference)."""
        import keras

        self.encoder.set_weights(weights)
        return np.concatenate(
            [
                keras.ops.convert_to_numpy(
                    self.encoder(x[i : i + _CHUNK], training=False)
                )
                for i in range(0, len(x), _CHUNK)
            ]
        ).astype(np.float32)


class StackedRuns:
    """The runs of one `StackedFinetuner` call: their state and their histories.

    Built by `StackedFinetuner.start`. `epoch()` trains one epoch of every run still
    training and applies early stopping; `results()` scores each run's best epoch.
    `state(i)` and `best_weights(i)` read one run's values.

    Attributes:
        jobs: the runs' `Job`s.
        active: bool `[runs]`, the runs still training.
        histories: per run, one row per epoch it ran, as in `Finetuner`'s history
            (`epoch`, `loss`, `accuracy`, `val_loss`, `val_accuracy`).
        best_epochs: per run, its best epoch so far (0 before the first).
        epochs_run: the epochs trained so far (by the longest run).
    """

    def __init__(
        self,
        tuner: StackedFinetuner,
        data: FinetuneData,
        jobs: list[Job],
        log: Callable[[str], None] | None,
    ):
        from keras import ops

        if not jobs:
            raise FinetuneError("no jobs to run: pass at least one Job")
        self._started = time.perf_counter()
        self.tuner, self.jobs, self._log = tuner, jobs, log
        n_train = len(data.train.y)
        frozen = tuner.mode == "frozen"
        if frozen and any(job.encoder_weights is None for job in jobs):
            raise FinetuneError("frozen fine-tuning needs a pre-trained encoder")
        self._subsets = [check_subset(job.subset, n_train) for job in jobs]
        splits = (data.train.x, data.val.x, data.test.x)
        if frozen:
            # The encoder is a fixed function: embed each split once per encoder.
            keys = [_encoder_identity(job) for job in jobs]
            groups: dict = {}
            tables = []
            for job, key in zip(jobs, keys):
                if key not in groups:
                    groups[key] = len(tables)
                    tables.append(
                        [tuner._embed(job.encoder_weights, x) for x in splits]
                    )
            group = np.array([groups[key] for key in keys], np.int64)
            x_train = np.concatenate([t[0] for t in tables])
            y_train = np.tile(data.train.y, len(tables))
            x_val, x_test = (_per_group([t[k] for t in tables], group) for k in (1, 2))
        else:
            group = np.zeros(len(jobs), np.int64)
            x_train, x_val, x_test = (np.asarray(x, np.float32) for x in splits)
            y_train = data.train.y
        # A run's rows of the (stacked) training table.
        self._offsets = group * n_train
        self._data = tuple(
            ops.convert_to_tensor(a)
            for a in (
                x_train,
                np.asarray(y_train, np.int32),
                x_val,
                np.asarray(data.val.y, np.int32),
            )
        )
        self._x_test, self._y_test = ops.convert_to_tensor(x_test), data.test.y
        batch = tuner.config.batch_size
        # Fixed over the call, so that every epoch reuses one compiled function.
        self._max_steps = math.ceil(
            max(n_train, *(len(s) for s in self._subsets)) / batch
        )
        self._state = self._initial_state()
        self._rngs = [np.random.default_rng(job.seed) for job in jobs]
        self.active = np.ones(len(jobs), bool)
        self.histories: list[list[dict]] = [[] for _ in jobs]
        self.best_epochs = [0] * len(jobs)
        self.epochs_run = 0

    def _initial_state(self) -> StackedState:
        from keras import ops

        values = [self.tuner._initial_values(job) for job in self.jobs]

        def stacked(which):
            columns = zip(*(v[which] for v in values))
            return tuple(ops.convert_to_tensor(np.stack(c)) for c in columns)

        params, stats = stacked(0), stacked(1)
        runs = len(self.jobs)
        return StackedState(
            params=params,
            stats=stats,
            momentums=tuple(ops.zeros_like(p) for p in params),
            velocities=tuple(ops.zeros_like(p) for p in params),
            steps=ops.zeros((runs,), "int32"),
            # Buffers of their own: the epoch takes over (donates) the state's.
            best_params=tuple(ops.copy(p) for p in params),
            best_stats=tuple(ops.copy(s) for s in stats),
            best_loss=ops.convert_to_tensor(np.full(runs, np.inf, np.float32)),
        )

    def epoch(self) -> bool:
        """Trains one epoch of every active run; stops runs by early stopping.

        Returns:
            Whether any run is still training.

        Raises:
            FloatingPointError: a run's training or validation loss diverged.
        """
        from keras import ops

        if not self.active.any():
            return False
        config = self.tuner.config
        self.epochs_run += 1
        epoch = self.epochs_run
        orders, mask, steps = self._batches()
        self._state, *out = self.tuner._epoch(
            self._state,
            self._data,
            ops.convert_to_tensor(orders),
            ops.convert_to_tensor(mask),
            ops.convert_to_tensor(self.active),
            ops.convert_to_tensor(np.int32(steps)),
        )
        total, correct, val_loss, val_accuracy, improved = (
            ops.convert_to_numpy(a) for a in out
        )
        trained = np.flatnonzero(self.active)
        for r in trained:
            n = np.float32(len(self._subsets[r]))
            loss, val = float(total[r] / n), float(val_loss[r])
            # The rows of `Finetuner`'s history.
            self.histories[r].append(
                {
                    "epoch": epoch,
                    "loss": loss,
                    "accuracy": float(correct[r] / n),
                    "val_loss": val,
                    "val_accuracy": float(val_accuracy[r]),
                }
            )
            if not (np.isfinite(loss) and np.isfinite(val)):
                raise FloatingPointError(
                    f"fine-tuning run {r} (seed {self.jobs[r].seed}) diverged at epoch "
                    f"{epoch} (loss {loss}, val_loss {val}); lower the learning rate"
                )
            if improved[r]:
                self.best_epochs[r] = epoch
            elif epoch - self.best_epochs[r] >= config.patience:
                self.active[r] = False
        if epoch >= config.max_epochs:
            self.active[:] = False
        if self._log is not None:
            self._log(
                f"epoch {epoch}: {len(trained)} runs trained, val_loss "
                f"{val_loss[trained].min():.4f} to {val_loss[trained].max():.4f}; "
                f"{int(self.active.sum())} still training"
            )
        return bool(self.active.any())

    def _batches(self) -> tuple[np.ndarray, np.ndarray, int]:
        """This epoch's batches of every active run, drawn from each run's generator.

        Returns:
            int32 `[max_steps, runs, batch]` rows of the training table (each run's
            shuffled subset, then padding), the float32 mask of its real rows, shaped
            alike, and the number of steps of the longest run.
        """
        batch, runs = self.tuner.config.batch_size, len(self.jobs)
        length = self._max_steps * batch
        orders = np.zeros((self._max_steps, runs, batch), np.int32)
        mask = np.zeros((self._max_steps, runs, batch), np.float32)
        steps = 0
        for r in np.flatnonzero(self.active):
            # The batch order `Finetuner._fit` draws: one permutation per epoch run.
            order = self._rngs[r].permutation(self._subsets[r])
            n = len(order)
            # Padding rows point at the run's first row: finite, masked out.
            rows = np.full(length, self._offsets[r], np.int32)
            rows[:n] = order + self._offsets[r]
            real = np.zeros(length, np.float32)
            real[:n] = 1.0
            orders[:, r] = rows.reshape(-1, batch)
            mask[:, r] = real.reshape(-1, batch)
            steps = max(steps, math.ceil(n / batch))
        return orders, mask, steps

    def results(self) -> list[RunResult]:
        """Each run's test metrics at its best epoch, with its history."""
        from keras import ops

        state = self._state
        logits = self.tuner._logits(state.best_params, state.best_stats, self._x_test)
        predictions = ops.convert_to_numpy(logits).argmax(axis=-1)
        seconds = (time.perf_counter() - self._started) / len(self.jobs)
        return [
            RunResult(
                metrics=classification_metrics(
                    self._y_test, predictions[r], self.tuner.n_classes
                ),
                history=self.histories[r],
                epochs=len(self.histories[r]),
                best_epoch=self.best_epochs[r],
                n_train=int(len(self._subsets[r])),
                seconds=seconds,
            )
            for r in range(len(self.jobs))
        ]

    def state(self, run: int) -> dict[str, list[np.ndarray] | np.ndarray]:
        """One run's current values, as NumPy: every field of `StackedState`."""
        from keras import ops

        def values(field):
            if isinstance(field, tuple):
                return [ops.convert_to_numpy(a[run]) for a in field]
            return ops.convert_to_numpy(field[run])

        return {name: values(f) for name, f in self._state._asdict().items()}

    def best_weights(self, run: int) -> list[np.ndarray]:
        """One run's weights at its best epoch, in `classifier.get_weights()` order.

        Loads into the classifier `build_classifier` builds (`set_weights`), e.g. to
        save a run's model.
        """
        state = self.state(run)
        params, stats = state["best_params"], state["best_stats"]
        if self.tuner.mode == "frozen":
            encoder = [np.asarray(w) for w in self.jobs[run].encoder_weights]
        else:
            encoder = []
            for i in range(self.tuner._stacked.blocks):
                encoder += params[4 * i : 4 * i + 4] + stats[2 * i : 2 * i + 2]
        return encoder + params[-2:]


def _encoder_identity(job: Job) -> tuple:
    """What makes two frozen jobs share embeddings: their key, else the same list."""
    if job.encoder_key is not None:
        return ("key", job.encoder_key)
    return ("object", id(job.encoder_weights))


def _per_group(tables: list[np.ndarray], group: np.ndarray) -> np.ndarray:
    """One encoder's embeddings shared by every run, or each run's `[runs, rows, w]`."""
    if len(tables) == 1:
        return tables[0]
    return np.stack([tables[g] for g in group])
