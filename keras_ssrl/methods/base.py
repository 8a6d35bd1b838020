"""The one training step shared by every self-supervised method."""

from __future__ import annotations

import copy

import keras
import tensorflow as tf

from keras_ssrl.distribute import replica_row_offset


def features(data):
    """The inputs of a batch: `x`, `(x,)`, or `(x, y)` whose labels are ignored."""
    if isinstance(data, (tuple, list)):
        return data[0]
    return data


def global_batch(tensor):
    """All replicas' rows of `tensor` and the offset of this replica's rows in it.

    Under `tf.distribute` strategies with several replicas, contrastive negatives must
    come from the global batch, or the loss would depend on the number of devices.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor, 0
    return context.all_gather(tensor, axis=0), replica_row_offset(tensor)


@keras.saving.register_keras_serializable(package="keras_ssrl")
class PretrainingModel(keras.Model):
    """Base of `Scarf`, `Vime` and `Byol`: one encoder, method heads, one train step.

    Subclasses build their heads in `__init__`, name their logged values in
    `loss_names` and implement `compute_losses(x, training) -> dict` (with a `"loss"`
    entry, the value minimised); `after_update()` runs after each optimizer step (BYOL's
    EMA). The training step is the Keras 3 TensorFlow form: loss scaled by the optimizer
    (mixed precision), gradients of the trainable variables only, `optimizer.apply`.

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

    @property
    def metrics(self):
        return list(self.trackers.values())

    def build(self, input_shape=None):
        # Encoder and heads are functional models, built when created.
        self.built = True

    def call(self, x, training=False):
        return self.encoder(x, training=training)

    def compute_losses(self, x, training: bool) -> dict:
        raise NotImplementedError

    def after_update(self) -> None:
        """Runs after each optimizer step."""

    def _report(self, losses: dict) -> dict:
        for name, tracker in self.trackers.items():
            tracker.update_state(losses[name])
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        x = features(data)
        with tf.GradientTape() as tape:
            losses = self.compute_losses(x, training=True)
            loss = losses["loss"]
            # Gradients are summed over replicas: scale so the update matches one device.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            if replicas > 1:
                loss = loss / replicas
            loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply(gradients, variables)
        self.after_update()
        return self._report(losses)

    def test_step(self, data):
        return self._report(self.compute_losses(features(data), training=False))

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
