"""BYOL: bootstrap your own latent, with a VIME-style corrupted view."""

from __future__ import annotations

import keras
from keras import ops

from keras_ssrl.heads import mlp_head
from keras_ssrl.layers.corruption import MarginalCorruption
from keras_ssrl.losses import byol_loss, ema_decay
from keras_ssrl.methods.base import PretrainingModel


def _frozen_copy(model: keras.Model, name: str) -> keras.Model:
    """An exact copy of `model` that no gradient trains.

    Its BatchNorm layers get momentum 1: the target normalises with batch statistics,
    as in BYOL, but its moving statistics change only through the EMA of the online
    network's, so the whole target is exactly an EMA of the online branch.
    """
    copy = keras.models.clone_model(model)
    copy.name = name
    copy.set_weights(model.get_weights())
    for layer in copy.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 1.0
    copy.trainable = False
    return copy


@keras.saving.register_keras_serializable(package="keras_ssrl")
class Byol(PretrainingModel):
    """BYOL pre-training (docs/protocol.md, "BYOL").

    The online branch (encoder, projector, predictor) sees x; the target branch (copies
    of encoder and projector, weights xi) sees a corrupted view x~. The loss is
    `2 - 2 cos(q(z), z~)`; after every optimizer step the target moves towards the
    online weights, moving statistics included: `xi <- lambda xi + (1 - lambda) theta`,
    with lambda rising from `ema_base` to 1 on a cosine schedule over `total_steps`.

    Args:
        encoder: the encoder; only it is kept after pre-training.
        corruption_rate: float, p of the target view's corruption (0.3).
        hidden, projection_dim: projector and predictor, Dense(hidden) -> BN -> ReLU ->
            Dense(projection_dim) (4096, 256).
        ema_base: float, lambda_base (0.99).
        ema_schedule: `cosine` or `constant`.
        total_steps: int, the length of training for the cosine schedule.
        symmetric: bool, add the swapped term (online on x~, target on x).
        seed: int, corruption seed.

    Reference:
        Grill et al., Bootstrap Your Own Latent, NeurIPS 2020.
    """

    loss_names = ("loss", "ema_decay")

    def __init__(
        self,
        encoder: keras.Model,
        *,
        corruption_rate: float = 0.3,
        hidden: int = 4096,
        projection_dim: int = 256,
        ema_base: float = 0.99,
        ema_schedule: str = "cosine",
        total_steps: int = 1000,
        symmetric: bool = False,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(encoder, seed=seed, **kwargs)
        ema_decay(0, total_steps, ema_base, ema_schedule)  # validates the schedule
        self.corruption_rate = corruption_rate
        self.hidden = hidden
        self.projection_dim = projection_dim
        self.ema_base = ema_base
        self.ema_schedule = ema_schedule
        self.total_steps = int(total_steps)
        self.symmetric = symmetric
        self.corruption = MarginalCorruption(corruption_rate, seed=seed)
        self.projector = mlp_head(
            self.width, hidden, projection_dim, batchnorm=True, name="projector"
        )
        self.predictor = mlp_head(
            projection_dim, hidden, projection_dim, batchnorm=True, name="predictor"
        )
        self.target_encoder = _frozen_copy(encoder, "target_encoder")
        self.target_projector = _frozen_copy(self.projector, "target_projector")
        self.decay = keras.Variable(
            ema_base, trainable=False, dtype="float32", name="ema_decay"
        )

    def _online(self, x, training):
        z = self.projector(self.encoder(x, training=training), training=training)
        return self.predictor(z, training=training)

    def _target(self, x, training):
        z = self.target_projector(
            self.target_encoder(x, training=training), training=training
        )
        return ops.stop_gradient(z)

    def compute_losses(self, x, training: bool) -> dict:
        x_tilde = self.corruption(x)
        loss = byol_loss(self._online(x, training), self._target(x_tilde, training))
        if self.symmetric:
            loss = loss + byol_loss(
                self._online(x_tilde, training), self._target(x, training)
            )
        return {"loss": loss}

    def state_logs(self) -> dict:
        return {"ema_decay": self.decay}

    def after_update(self) -> None:
        # optimizer.iterations was just incremented: the step taken is iterations - 1.
        decay = ema_decay(
            self.optimizer.iterations - 1,
            self.total_steps,
            self.ema_base,
            self.ema_schedule,
        )
        self.decay.assign(decay)
        online = self.encoder.weights + self.projector.weights
        target = self.target_encoder.weights + self.target_projector.weights
        for xi, theta in zip(target, online):
            xi.assign(decay * xi + (1.0 - decay) * ops.cast(theta, xi.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            corruption_rate=self.corruption_rate,
            hidden=self.hidden,
            projection_dim=self.projection_dim,
            ema_base=self.ema_base,
            ema_schedule=self.ema_schedule,
            total_steps=self.total_steps,
            symmetric=self.symmetric,
        )
        return config
