"""Keras layers of keras_ssrl."""

from keras_ssrl.layers.corruption import MarginalCorruption
from keras_ssrl.layers.device_rows import DeviceRows

__all__ = ["DeviceRows", "MarginalCorruption"]
