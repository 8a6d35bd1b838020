"""Self-supervised pre-training methods, each a `keras.Model` over one encoder.

`Scarf`, `Vime` and `Byol` (docs/protocol.md, "SCARF", "VIME", "BYOL") share the
training step of `PretrainingModel`; `build_method` builds one from a `PretrainConfig`.
"""

from __future__ import annotations

import keras

from keras_ssrl.config import METHODS, PretrainConfig
from keras_ssrl.methods.base import PretrainingModel
from keras_ssrl.methods.byol import Byol
from keras_ssrl.methods.scarf import Scarf
from keras_ssrl.methods.vime import Vime


def build_method(
    name: str,
    encoder: keras.Model,
    n_genes: int | None = None,
    config: PretrainConfig | None = None,
    *,
    total_steps: int | None = None,
    seed: int | None = None,
) -> PretrainingModel:
    """Builds the pre-training model of method `name` around `encoder`.

    Args:
        name: `scarf`, `vime` or `byol`.
        encoder: the encoder to pre-train.
        n_genes: int, checked against the encoder's input width when given.
        config: a `PretrainConfig` (its method section is used); defaults otherwise.
        total_steps: int, length of training (BYOL's EMA schedule).
        seed: int, corruption seed (default: `config.seed`).

    Returns:
        A `Scarf`, `Vime` or `Byol` model, ready for `compile` and `fit`.
    """
    config = config or PretrainConfig(method=name)
    seed = config.seed if seed is None else seed
    if n_genes is not None and int(encoder.input_shape[-1]) != n_genes:
        raise ValueError(
            f"the encoder takes {encoder.input_shape[-1]} genes, the data has {n_genes}"
        )
    if name == "scarf":
        c = config.scarf
        return Scarf(
            encoder,
            corruption_rate=c.corruption_rate,
            temperature=c.temperature,
            projector_hidden=c.projector_hidden,
            projector_dim=c.projector_dim,
            seed=seed,
        )
    if name == "vime":
        c = config.vime
        return Vime(encoder, mask_rate=c.mask_rate, alpha=c.alpha, seed=seed)
    if name == "byol":
        c = config.byol
        return Byol(
            encoder,
            corruption_rate=c.corruption_rate,
            hidden=c.hidden,
            projection_dim=c.projection_dim,
            ema_base=c.ema_base,
            ema_schedule=c.ema_schedule,
            total_steps=total_steps or 1000,
            symmetric=c.symmetric,
            seed=seed,
        )
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")


__all__ = ["METHODS", "Byol", "PretrainingModel", "Scarf", "Vime", "build_method"]
