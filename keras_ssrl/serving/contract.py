"""The served contract's names, shared by the export and the client.

What a model is exported as (`ENCODER`, `CLASSIFIER`), its signatures and their input
keys: the export writes them into the SavedModel, the client sends to them. The
signatures themselves are described in `keras_ssrl.serving.signatures`; the files of
the export's `assets/` folder in `keras_ssrl.serving.assets`.
"""

from __future__ import annotations

from keras_ssrl.data import schema

# What is exported: a pre-training run's encoder or a fine-tuning run's classifier.
ENCODER = "encoder"
CLASSIFIER = "classifier"

# Signatures, and the name of each one's single input.
SERVING_DEFAULT = "serving_default"
PREDICT_EXAMPLES = "predict_examples"
CLASSIFY = "classify"
INPUT = schema.EXPRESSION  # "expression": raw values, input of `serving_default`
EXAMPLES_INPUT = "examples"  # serialized tf.train.Example records
CLASSIFY_INPUT = "inputs"  # the input key TF Serving's Classify API requires


class ExportError(ValueError):
    """A run that cannot be exported: the message says why and what to do."""


def as_text(value) -> str:
    """A served string (TensorFlow returns `bytes`) as `str`."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
