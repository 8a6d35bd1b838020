"""SCARF: contrastive learning with random feature corruption."""

from __future__ import annotations

import keras

from keras_ssrl.heads import mlp_head
from keras_ssrl.layers.corruption import MarginalCorruption
from keras_ssrl.losses import info_nce
from keras_ssrl.methods.base import PretrainingModel, global_batch


@keras.saving.register_keras_serializable(package="keras_ssrl")
class Scarf(PretrainingModel):
    """SCARF pre-training (docs/protocol.md, "SCARF").

    Each example x gets a corrupted view x~ (a fraction `corruption_rate` of its features
    replaced from their empirical marginals); encoder and projector map both, and the
    InfoNCE loss pulls q(x) to q(x~) and away from the other examples' q(x~). Under data
    parallelism the negatives are the corrupted views of the global batch.

    Args:
        encoder: the encoder (`keras_ssrl.encoders.build_encoder`).
        corruption_rate: float, c (0.3).
        temperature: float, tau (1.0).
        projector_hidden, projector_dim: int, the 2-layer ReLU projector (256, 256).
        seed: int, corruption seed.

    Example:

    ```python
    model = Scarf(build_encoder(n_genes))
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    model.fit(load_dataset(data, "pretrain", 256, with_labels=False, shuffle=True))
    ```

    Reference:
        Bahri et al., SCARF, ICLR 2022.
    """

    loss_names = ("loss",)

    def __init__(
        self,
        encoder: keras.Model,
        *,
        corruption_rate: float = 0.3,
        temperature: float = 1.0,
        projector_hidden: int = 256,
        projector_dim: int = 256,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(encoder, seed=seed, **kwargs)
        self.corruption_rate = corruption_rate
        self.temperature = temperature
        self.projector_hidden = projector_hidden
        self.projector_dim = projector_dim
        self.corruption = MarginalCorruption(corruption_rate, seed=seed)
        self.projector = mlp_head(
            self.width, projector_hidden, projector_dim, name="projector"
        )

    def compute_losses(self, x, training: bool) -> dict:
        x_tilde = self.corruption(x)
        q = self.projector(self.encoder(x, training=training), training=training)
        q_tilde = self.projector(
            self.encoder(x_tilde, training=training), training=training
        )
        candidates, offset = global_batch(q_tilde)
        return {"loss": info_nce(q, candidates, self.temperature, offset)}

    def get_config(self):
        config = super().get_config()
        config.update(
            corruption_rate=self.corruption_rate,
            temperature=self.temperature,
            projector_hidden=self.projector_hidden,
            projector_dim=self.projector_dim,
        )
        return config
