"""keras_ssrl: self-supervised representation learning on bulk gene expression.

Import is light on purpose: TensorFlow and Keras are loaded by the sub-packages that need
them, so `keras_ssrl.data` tools that only convert files stay quick to start.
"""

__version__ = "0.1.0"
