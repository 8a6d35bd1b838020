"""VIME self-supervised: mask estimation and feature reconstruction."""

from __future__ import annotations

import keras

from keras_ssrl.heads import decoder
from keras_ssrl.layers.corruption import MarginalCorruption
from keras_ssrl.losses import vime_losses
from keras_ssrl.methods.base import PretrainingModel


@keras.saving.register_keras_serializable(package="keras_ssrl")
class Vime(PretrainingModel):
    """VIME pre-training (docs/protocol.md, "VIME").

    A mask m ~ Bernoulli(p_m), drawn afresh at every step, selects features replaced
    from their empirical marginals: x~ = m * x_bar + (1 - m) * x. From the encoding of x~
    a mask decoder (sigmoid) estimates m and a feature decoder (linear: inputs are
    standardised) reconstructs x; L = BCE(m, m^) + alpha * MSE(x, x^).

    Args:
        encoder: the encoder.
        mask_rate: float, p_m (0.3).
        alpha: float, weight of the reconstruction loss (2.0).
        decoder_layers, decoder_width: the decoders' architecture; None copies the
            encoder's (its number of Dense layers and its width), as docs/protocol.md
            asks ("VIME").
        seed: int, corruption seed.

    Reference:
        Yoon et al., VIME: Extending the Success of Self- and Semi-supervised Learning to
        Tabular Domain, NeurIPS 2020.
    """

    loss_names = ("loss", "mask_loss", "feature_loss")

    def __init__(
        self,
        encoder: keras.Model,
        *,
        mask_rate: float = 0.3,
        alpha: float = 2.0,
        decoder_layers: int | None = None,
        decoder_width: int | None = None,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(encoder, seed=seed, **kwargs)
        self.mask_rate = mask_rate
        self.alpha = alpha
        self.decoder_layers = decoder_layers or sum(
            isinstance(layer, keras.layers.Dense) for layer in encoder.layers
        )
        self.decoder_width = decoder_width or self.width
        self.corruption = MarginalCorruption(mask_rate, seed=seed, return_mask=True)
        self.mask_decoder = decoder(
            self.width,
            self.n_genes,
            self.decoder_layers,
            self.decoder_width,
            output_activation="sigmoid",
            name="mask_decoder",
        )
        self.feature_decoder = decoder(
            self.width,
            self.n_genes,
            self.decoder_layers,
            self.decoder_width,
            name="feature_decoder",
        )

    def compute_losses(self, x, training: bool) -> dict:
        x_tilde, mask = self.corruption(x)
        z = self.encoder(x_tilde, training=training)
        total, mask_loss, feature_loss = vime_losses(
            mask,
            self.mask_decoder(z, training=training),
            x,
            self.feature_decoder(z, training=training),
            self.alpha,
        )
        return {"loss": total, "mask_loss": mask_loss, "feature_loss": feature_loss}

    def get_config(self):
        config = super().get_config()
        config.update(
            mask_rate=self.mask_rate,
            alpha=self.alpha,
            decoder_layers=self.decoder_layers,
            decoder_width=self.decoder_width,
        )
        return config
