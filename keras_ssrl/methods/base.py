"""The one training step shared by every self-supervised method, on every backend."""

from __future__ import annotations

import copy

import keras

from keras_ssrl.distribute import global_batch, replicas_in_sync

__all__ = ["PretrainingModel", "features", "global_batch"]


def features(data):
    """The inputs of a batch: `x`, `(x,)`, or `(x, y)` whose labels are ignored."""
    if isinstance(data, (tuple, list)):
        return data[0]
    return data


def _values_after(scope, variables, values):
    """The values `scope` assigned to `variables`, or their values going in."""
    out = []
    for variable, value in zip(variables, values):
        new = scope.get_current_value(variable)
        out.append(value if new is None else new)
    return out


@keras.saving.register_keras_serializable(package="keras_ssrl")
class PretrainingModel(keras.Model):
    """Base of `Scarf`, `Vime` and `Byol`: one encoder, method heads, one train step.

    Subclasses build their heads in `__init__`, name their logged values in
    `loss_names` and implement `compute_losses(x, training) -> dict` (with a `"loss"`
    entry, the value minimised); `after_update()` runs after each optimizer step (BYOL's
    EMA) and `state_logs()` adds logged state (BYOL's decay), read after the update.

    `train_step` has the Keras 3 form of the running backend, around the same
    `compute_losses`:

    - TensorFlow: a `GradientTape`, the loss scaled by the optimizer (a
      `LossScaleOptimizer` under `mixed_float16`), `optimizer.apply`, then
      `after_update()`;
    - JAX: a pure function of the state. `compute_losses` runs in a
      `keras.StatelessScope` over the state's values, `jax.value_and_grad` of the
      scaled loss, `optimizer.stateless_apply` (which unscales, and skips non-finite
      float16 steps), then `after_update()` in another stateless scope, so that BYOL's
      EMA (target weights and BatchNorm statistics) is part of the compiled step.

    Args:
        encoder: a `keras.Model` from `keras_ssrl.encoders.build_encoder` (or any model
            mapping `(batch, genes)` to `(batch, width)`).
        seed: int, seed of the method's random corruption.
    """

    loss_names: tuple[str, ...] = ("loss",)

    def __init__(self, encoder: keras.Model, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.seed = seed
        self.n_genes = int(encoder.input_shape[-1])
        self.width = int(encoder.output_shape[-1])
        self.trackers = {
            name: keras.metrics.Mean(name=name) for name in self.loss_names
        }
        self.rows = None

    def use_device_rows(self, rows) -> None:
        """Trains on `rows` (a `DeviceRows`): training batches are then row indices.

        Call it before the first step (the model's state is fixed once built).
        Validation batches stay rows of values.
        """
        self.rows = rows

    def _inputs(self, data):
        x = features(data)
        if self.rows is not None and "int" in str(x.dtype):
            # Indices into the device-resident split (`--cache device`).
            return self.rows(x)
        return x

    @property
    def metrics(self):
        return list(self.trackers.values())

    def build(self, input_shape=None):
        # Encoder and heads are functional models, built when created.
        self.built = True

    def call(self, x, training=False):
        # Keras may trace `call` on a training batch: indices with `--cache device`.
        return self.encoder(self._inputs(x), training=training)

    def compute_losses(self, x, training: bool) -> dict:
        raise NotImplementedError

    def after_update(self) -> None:
        """Runs after each optimizer step."""

    def state_logs(self) -> dict:
        """Logged values that are model state rather than losses (read after updates)."""
        return {}

    def _report(self, losses: dict) -> dict:
        values = {**losses, **self.state_logs()}
        for name, tracker in self.trackers.items():
            tracker.update_state(values[name])
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, *args):
        """One optimizer step: `(data)` under TensorFlow, `(state, data)` under JAX."""
        if keras.backend.backend() == "jax":
            return self._jax_train_step(*args)
        return self._tensorflow_train_step(*args)

    def test_step(self, *args):
        if keras.backend.backend() == "jax":
            return self._jax_test_step(*args)
        (data,) = args
        return self._report(self.compute_losses(features(data), training=False))

    def _tensorflow_train_step(self, data):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            losses = self.compute_losses(self._inputs(data), training=True)
            loss = losses["loss"]
            # Gradients are summed over replicas: scale so the update matches one device.
            replicas = replicas_in_sync()
            if replicas > 1:
                loss = loss / replicas
            loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply(gradients, variables)
        self.after_update()
        return self._report(losses)

    def _jax_train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_values, metric_values = state
        optimizer_mapping = list(zip(self.optimizer.variables, optimizer_values))

        def scaled_loss(trainable_values):
            mapping = [
                *zip(self.trainable_variables, trainable_values),
                *zip(self.non_trainable_variables, non_trainable),
                *optimizer_mapping,
            ]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                # Inside the scope: device-resident rows are read from the state.
                losses = self.compute_losses(self._inputs(data), training=True)
                loss = self.optimizer.scale_loss(losses["loss"])
            updated = _values_after(scope, self.non_trainable_variables, non_trainable)
            return loss, (losses, updated)

        (_, (losses, non_trainable)), gradients = jax.value_and_grad(
            scaled_loss, has_aux=True
        )(trainable)
        trainable, optimizer_values = self.optimizer.stateless_apply(
            optimizer_values, gradients, trainable
        )
        # After the update, in the compiled step: BYOL's EMA of the new online weights.
        mapping = [
            *zip(self.trainable_variables, trainable),
            *zip(self.non_trainable_variables, non_trainable),
            *zip(self.optimizer.variables, optimizer_values),
        ]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.after_update()
        non_trainable = _values_after(
            scope, self.non_trainable_variables, non_trainable
        )
        logs, metric_values = self._jax_report(losses, non_trainable, metric_values)
        return logs, (trainable, non_trainable, optimizer_values, metric_values)

    def _jax_test_step(self, state, data):
        trainable, non_trainable, metric_values = state
        mapping = [
            *zip(self.trainable_variables, trainable),
            *zip(self.non_trainable_variables, non_trainable),
        ]
        with keras.StatelessScope(state_mapping=mapping):
            losses = self.compute_losses(features(data), training=False)
        logs, metric_values = self._jax_report(losses, non_trainable, metric_values)
        return logs, (trainable, non_trainable, metric_values)

    def _jax_report(self, losses, non_trainable, metric_values):
        """`_report` as a pure function of the metric (and non-trainable) values."""
        mapping = [
            *zip(self.non_trainable_variables, non_trainable),
            *zip(self.metrics_variables, metric_values),
        ]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            logs = self._report(losses)
        return logs, _values_after(scope, self.metrics_variables, metric_values)

    def get_config(self):
        return {
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "seed": self.seed,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        # Deserialising consumes nested dicts: work on a copy of the caller's config.
        config = copy.deepcopy(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)
