"""Initial weights drawn with NumPy, the same on every Keras backend.

Owns `reinitialize`, which re-draws every variable of a model from its layers' own
initialisers, and `reseed`, which restarts the layers' dropout generators. Both take a
NumPy generator, so a run's initial weights and dropout masks depend on its seed only.

Why NumPy rather than calling the initialisers: Keras draws random initialisers from the
backend's generator, so one seed would give TensorFlow and JAX different weights, and a
Keras initialiser fixes its seed when constructed, so calling a layer's own twice would
repeat its values. `Finetuner` and `StackedFinetuner` draw their runs' weights here, which
is what makes a stacked run start where the same run alone would.
"""

from __future__ import annotations

import math

import numpy as np

from keras_ssrl.finetuning.settings import FinetuneError


def reinitialize(model, rng: np.random.Generator) -> None:
    """Re-draws every variable of `model`'s layers from the layer's own initialisers.

    Random initialisers are sampled with NumPy from `rng` (`_initial_value`): Keras
    would draw them from the backend's generator, which gives TensorFlow and JAX
    different weights for one seed. Variables are assigned in place, which keeps the
    model, its variables and any graph traced over them.

    Args:
        model: a Keras model of Dense and BatchNormalization layers (and layers without
            weights), or one such layer.
        rng: the NumPy generator the random values are drawn from.

    Raises:
        FinetuneError: a layer with weights of another kind.
    """
    import keras

    def fresh(initializer, variable):
        shape, dtype = tuple(variable.shape), variable.dtype
        variable.assign(_initial_value(initializer, shape, dtype, rng))

    for layer in model.layers if hasattr(model, "layers") else [model]:
        if isinstance(layer, keras.layers.Dense):
            fresh(layer.kernel_initializer, layer.kernel)
            if layer.use_bias:
                fresh(layer.bias_initializer, layer.bias)
        elif isinstance(layer, keras.layers.BatchNormalization):
            for name in ("gamma", "beta", "moving_mean", "moving_variance"):
                variable = getattr(layer, name, None)
                if variable is not None:
                    fresh(getattr(layer, f"{name}_initializer"), variable)
        elif layer.weights:
            raise FinetuneError(
                f"cannot re-initialise layer {layer.name!r} ({type(layer).__name__})"
            )


def _initial_value(initializer, shape: tuple, dtype, rng: np.random.Generator):
    """A value of `initializer` for `shape`, drawn from `rng` with NumPy if random.

    Covers Keras's random initialisers (`VarianceScaling`, hence Glorot, He and LeCun;
    `RandomNormal`, `RandomUniform`, `TruncatedNormal`) with their Keras definitions;
    deterministic ones (zeros, ones) are called as they are. Any other random one is
    rebuilt with a seed drawn from `rng` (Keras initialisers fix their seed when
    constructed, so calling the layer's own would repeat its values); its values then
    depend on the backend.
    """
    import keras

    init = keras.initializers
    if isinstance(initializer, init.VarianceScaling) and not (
        getattr(initializer, "input_axes", None)
        or getattr(initializer, "output_axes", None)
    ):
        fan_in, fan_out = _fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out}.get(
            initializer.mode, (fan_in + fan_out) / 2.0
        )
        scale = initializer.scale / max(1.0, fan)
        if initializer.distribution == "uniform":
            limit = math.sqrt(3.0 * scale)
            value = rng.uniform(-limit, limit, shape)
        elif initializer.distribution == "truncated_normal":
            # Keras's constant: the std of a unit normal truncated at +-2.
            value = _truncated_normal(
                rng, shape, math.sqrt(scale) / 0.87962566103423978
            )
        else:
            value = rng.normal(0.0, math.sqrt(scale), shape)
    elif isinstance(initializer, init.TruncatedNormal):
        value = initializer.mean + _truncated_normal(rng, shape, initializer.stddev)
    elif isinstance(initializer, init.RandomNormal):
        value = rng.normal(initializer.mean, initializer.stddev, shape)
    elif isinstance(initializer, init.RandomUniform):
        value = rng.uniform(initializer.minval, initializer.maxval, shape)
    else:
        config = initializer.get_config()
        if "seed" in config:
            config["seed"] = int(rng.integers(2**31 - 1))
            initializer = type(initializer).from_config(config)
        return initializer(shape, dtype)
    return np.asarray(value, dtype=dtype)


def _fans(shape: tuple) -> tuple[int, int]:
    """Input and output units of a weight shape, as Keras counts them."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _truncated_normal(rng: np.random.Generator, shape: tuple, stddev: float):
    """Normal values with `stddev`, redrawn until within two standard deviations."""
    value = rng.standard_normal(shape)
    outside = np.abs(value) > 2.0
    while outside.any():
        value[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(value) > 2.0
    return value * stddev


def reseed(model, rng: np.random.Generator) -> None:
    """Restarts the random generator of each of `model`'s layers (dropout) from `rng`.

    A layer's `SeedGenerator` is not restarted by a global seed, so without this a
    run's dropout masks would depend on the runs before it.

    Args:
        model: a Keras model.
        rng: the NumPy generator the new seeds are drawn from.
    """
    import keras

    for layer in model.layers:
        generator = getattr(layer, "seed_generator", None)
        if isinstance(generator, keras.random.SeedGenerator):
            state = generator.state
            seed = int(rng.integers(2**31 - 1))
            state.assign(np.array([seed, 0], dtype=state.dtype))
