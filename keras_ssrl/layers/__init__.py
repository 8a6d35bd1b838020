"""Keras layers of keras_ssrl."""

from keras_ssrl.layers.corruption import MarginalCorruption

__all__ = ["MarginalCorruption"]
