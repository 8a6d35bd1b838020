"""The stacked classifier: N runs' weights with a leading run axis, and its pure steps.

Owns `StackedState`, the state of N runs (weights, BatchNorm statistics, Adam moments
and steps, each run's best epoch so far), and `StackedClassifier`, the forward pass, the
Adam step and the epoch of `build_encoder`'s [Dense -> BatchNorm -> ReLU] blocks and the
head, as pure functions of that state: `StackedFinetuner`
(`keras_ssrl.finetuning.stacked`) compiles `StackedClassifier.train_epoch` once and calls
it for every epoch of every run.

Each run computes what `Finetuner` computes for it alone (docs/protocol.md,
"Fine-tuning"): Keras's BatchNormalization in training mode with moments over the run's
real rows, the mean sparse cross-entropy over those rows, and Keras's Adam with the
run's own step count. A run with no row in a batch (its epoch is over, or it stopped)
keeps its state: it is selected, not stepped with a zero gradient, which Adam's momentum
would still turn into a step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from keras_ssrl.finetuning.stacked_ops import (
    cross_entropy,
    dense,
    hits,
    masked_moments,
    normalize,
    per_run,
    select,
    value_and_grad,
)


class StackedState(NamedTuple):
    """The state of N runs: each field holds arrays with the runs on axis 0.

    A pytree (JAX) and a nested structure (TensorFlow), so one compiled epoch takes it
    and returns the next.

    Attributes:
        params: the trained weights: per encoder block (unfrozen mode only) the Dense
            kernel and bias and the BatchNorm gamma and beta, then the head's kernel and
            bias.
        stats: per encoder block (unfrozen mode only) the BatchNorm moving mean and
            moving variance.
        momentums, velocities: Adam's moments, shaped as `params`.
        steps: int32 `[runs]`, the Adam steps each run has taken.
        best_params, best_stats: `params` and `stats` at each run's best epoch so far.
        best_loss: float32 `[runs]`, each run's lowest validation loss so far.
    """

    params: tuple
    stats: tuple
    momentums: tuple
    velocities: tuple
    steps: object
    best_params: tuple
    best_stats: tuple
    best_loss: object


@dataclasses.dataclass(frozen=True)
class StackedClassifier:
    """The stacked classifier's structure and hyperparameters; pure functions of state.

    Holds no arrays, so its methods are functions of their arguments only: `jax.jit`
    and `tf.function` compile them without capturing any variable.

    Attributes:
        blocks: the encoder blocks that are trained (0 in frozen mode: the head alone,
            on embeddings).
        n_classes: the head's outputs.
        bn_epsilon, bn_momentum: the BatchNormalization layers' `epsilon` and
            `momentum`.
        adam: Adam's `(learning_rate, beta_1, beta_2, epsilon)`.
    """

    blocks: int
    n_classes: int
    bn_epsilon: float
    bn_momentum: float
    adam: tuple[float, float, float, float]

    def forward(self, params, stats, x, mask=None):
        """Logits `[runs, rows, classes]` of `x`, and the batch moments in training.

        Args:
            params, stats: as in `StackedState`.
            x: `[runs, rows, features]`, or `[rows, features]` shared by every run.
            mask: None for inference (BatchNorm uses the moving statistics), or float
                `[runs, rows]`, 1 for a run's real rows: BatchNorm in training mode,
                with moments over those rows only.

        Returns:
            The logits and, in training mode, each block's batch `(mean, variance)`.
        """
        from keras import ops

        h, moments = x, []
        for i in range(self.blocks):
            kernel, bias, gamma, beta = params[4 * i : 4 * i + 4]
            h = dense(h, kernel, bias)
            if mask is None:
                mean, variance = stats[2 * i], stats[2 * i + 1]
            else:
                mean, variance = masked_moments(h, mask)
                moments.append((mean, variance))
            h = ops.relu(normalize(h, mean, variance, gamma, beta, self.bn_epsilon))
        return dense(h, params[-2], params[-1]), moments

    def inference_logits(self, params, stats, x):
        """The logits of `x` `[runs, rows, classes]`, BatchNorm in inference mode."""
        return self.forward(params, stats, x)[0]

    def train_step(self, state: StackedState, x, y, mask):
        """One Adam step of every run on its batch; runs without rows stay untouched.

        Args:
            state: the `StackedState` before the step.
            x, y: `[runs, batch, features]` inputs and `[runs, batch]` labels.
            mask: float `[runs, batch]`, 1 for real rows.

        Returns:
            The next state, and per run: the mean loss over its real rows, its correct
            predictions among them (training mode, before the step) and their count.
        """
        from keras import ops

        rows = ops.sum(mask, axis=1)
        stepped = rows > 0

        def loss_fn(params):
            logits, moments = self.forward(params, state.stats, x, mask)
            per_row = cross_entropy(y, logits, self.n_classes) * mask
            # Each run's mean over its real rows: summed over runs, the gradient of a
            # run's weights is that of its own loss.
            run_loss = ops.sum(per_row, axis=1) / ops.maximum(rows, 1.0)
            return ops.sum(run_loss), (run_loss, moments, hits(y, logits, mask))

        (_, (loss, moments, correct)), grads = value_and_grad(loss_fn)(state.params)
        params, momentums, velocities = self.adam_step(state, grads, stepped)
        # Keras's BatchNormalization: moving = moving * momentum + batch * (1 - m).
        momentum, stats = self.bn_momentum, []
        for moving, batch in zip(
            state.stats, [value for pair in moments for value in pair]
        ):
            stats.append(moving * momentum + batch * (1.0 - momentum))
        state = state._replace(
            params=params,
            stats=select(stepped, stats, state.stats),
            momentums=momentums,
            velocities=velocities,
            steps=state.steps + ops.cast(stepped, "int32"),
        )
        return state, loss, correct, rows

    def adam_step(self, state: StackedState, grads, stepped):
        """Keras's Adam update, each run with its own step count, where it stepped."""
        from keras import ops

        lr, beta_1, beta_2, epsilon = self.adam
        step = ops.cast(state.steps + 1, "float32")
        beta_1_power = ops.power(ops.cast(beta_1, "float32"), step)
        beta_2_power = ops.power(ops.cast(beta_2, "float32"), step)
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        params, momentums, velocities = [], [], []
        for p, g, m, v in zip(state.params, grads, state.momentums, state.velocities):
            a = per_run(alpha, p)
            m = m + (g - m) * (1 - beta_1)
            v = v + (ops.square(g) - v) * (1 - beta_2)
            params.append(p - (m * a) / (ops.sqrt(v) + epsilon))
            momentums.append(m)
            velocities.append(v)
        return (
            select(stepped, params, state.params),
            select(stepped, momentums, state.momentums),
            select(stepped, velocities, state.velocities),
        )

    def train_epoch(self, state: StackedState, data, orders, mask, active, steps):
        """One epoch of every run, then each run's validation loss and best state.

        Args:
            state: the `StackedState` before the epoch.
            data: `(x, y, x_val, y_val)`: the batches take rows of `x` and `y` by
                `orders`; `x_val` is `[rows, features]` shared by every run or
                `[runs, rows, features]`.
            orders: int32 `[max_steps, runs, batch]` row indices, the run's shuffled
                subset then padding.
            mask: float `[max_steps, runs, batch]`, 1 for real rows.
            active: bool `[runs]`, the runs that train this epoch.
            steps: int32 scalar, the steps this epoch (its longest run's batches).

        Returns:
            The next state and, per run: its training loss summed over its rows, its
            correct training predictions, its validation loss and accuracy, and
            whether the validation loss improved on its best (for active runs).
        """
        from keras import ops

        x, y, x_val, y_val = data

        def body(i, carry):
            state, total, correct = carry
            rows = orders[i]
            state, loss, batch_correct, count = self.train_step(
                state, ops.take(x, rows, axis=0), ops.take(y, rows, axis=0), mask[i]
            )
            return state, total + loss * count, correct + batch_correct

        zero = ops.zeros_like(state.best_loss)
        state, total, correct = ops.fori_loop(0, steps, body, (state, zero, zero))
        logits = self.forward(state.params, state.stats, x_val)[0]
        val_loss = ops.mean(cross_entropy(y_val, logits, self.n_classes), axis=1)
        val_accuracy = hits(y_val, logits) / ops.cast(ops.shape(y_val)[0], "float32")
        improved = ops.logical_and(active, val_loss < state.best_loss)
        state = state._replace(
            best_params=select(improved, state.params, state.best_params),
            best_stats=select(improved, state.stats, state.best_stats),
            best_loss=ops.where(improved, val_loss, state.best_loss),
        )
        return state, total, correct, val_loss, val_accuracy, improved
