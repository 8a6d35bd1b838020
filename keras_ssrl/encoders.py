"""The MLP encoder shared by every method and by the non-pre-trained baseline.

Its architecture and defaults are those of docs/protocol.md, "Encoder".
"""

from __future__ import annotations

import keras


def build_encoder(
    n_genes: int,
    layers: int = 4,
    width: int = 256,
    dropout: float = 0.0,
    name: str = "encoder",
    synchronized_batchnorm: bool = False,
) -> keras.Model:
    """Builds the encoder: `layers` x [Dense(width) -> BatchNorm -> ReLU (-> Dropout)].

    A functional model of standard Keras layers, so a saved encoder (`.keras`) loads
    anywhere Keras is installed, without keras_ssrl. Every method takes it as `encoder=`
    and owns only its heads; fine-tuning attaches a classification head to it.

    Args:
        n_genes: int, number of input genes.
        layers: int, number of blocks (default 4).
        width: int, units per block and size of the embedding (default 256).
        dropout: float, dropout after each block (default 0, off).
        name: str, model name.
        synchronized_batchnorm: bool, BatchNorm statistics over the global batch under
            a `tf.distribute` strategy with several replicas (TensorFlow backend), so
            that training matches one device; no effect on one replica. Pre-training
            sets it under `--distribute mirrored`; saved encoders are rebuilt without it.

    Returns:
        A `keras.Model` mapping `(batch, n_genes)` to `(batch, width)`.

    Example:

    ```python
    encoder = build_encoder(5000)
    z = encoder(x)  # (batch, 256)
    ```
    """
    if layers < 1 or width < 1:
        raise ValueError(f"layers and width must be >= 1, got {layers} and {width}")
    inputs = keras.Input(shape=(n_genes,), name="expression")
    x = inputs
    for i in range(layers):
        x = keras.layers.Dense(width, name=f"dense_{i}")(x)
        x = keras.layers.BatchNormalization(
            synchronized=synchronized_batchnorm, name=f"batchnorm_{i}"
        )(x)
        x = keras.layers.ReLU(name=f"relu_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    return keras.Model(inputs, x, name=name)
