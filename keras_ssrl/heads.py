"""Method heads: SCARF's projector, BYOL's projector and predictor, VIME's decoders.

Each head is a small functional model; methods own their heads, never the encoder.
"""

from __future__ import annotations

import keras


def mlp_head(
    input_dim: int,
    hidden: int,
    output_dim: int,
    batchnorm: bool = False,
    output_activation: str | None = None,
    name: str = "head",
) -> keras.Model:
    """Dense(hidden) -> [BatchNorm] -> ReLU -> Dense(output_dim).

    SCARF's projector is the ReLU MLP without BatchNorm (hidden 256, output 256); BYOL's
    projector and predictor use BatchNorm with hidden 4096 and output 256.
    """
    inputs = keras.Input(shape=(input_dim,))
    x = keras.layers.Dense(hidden, name="hidden")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(name="batchnorm")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Dense(output_dim, name="output")(x)
    if output_activation:
        # Activations in float32: a sigmoid in float16 saturates early.
        x = keras.layers.Activation(output_activation, dtype="float32", name="act")(x)
    return keras.Model(inputs, x, name=name)


def decoder(
    input_dim: int,
    n_genes: int,
    layers: int,
    width: int,
    output_activation: str | None = None,
    name: str = "decoder",
) -> keras.Model:
    """VIME decoder: the encoder's architecture, then Dense(n_genes).

    The feature decoder is linear (inputs are standardised, not in [0, 1]); the mask
    decoder ends in a sigmoid (docs/protocol.md, "VIME").
    """
    inputs = keras.Input(shape=(input_dim,))
    x = inputs
    for i in range(layers):
        x = keras.layers.Dense(width, name=f"dense_{i}")(x)
        x = keras.layers.BatchNormalization(name=f"batchnorm_{i}")(x)
        x = keras.layers.ReLU(name=f"relu_{i}")(x)
    x = keras.layers.Dense(n_genes, name="output")(x)
    if output_activation:
        x = keras.layers.Activation(output_activation, dtype="float32", name="act")(x)
    return keras.Model(inputs, x, name=name)
