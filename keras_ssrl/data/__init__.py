"""The data layer: expression files -> sharded TFRecords + manifest -> `tf.data`.

- `convert` turns an `ExpressionSource` (see `keras_ssrl.data.sources`) into a dataset
  folder; `load_dataset` reads a split of it as standardised `(x, y)` batches.
- `Manifest` describes a folder; `inspect_dataset` checks it record by record.
- `make_synthetic` generates the built-in data (`synthetic-tcga`, `synthetic-archs4`).
"""

from keras_ssrl.data.convert import convert
from keras_ssrl.data.errors import DamagedDataError, DataError
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.data.reader import load_dataset

__all__ = ["DamagedDataError", "DataError", "Manifest", "convert", "load_dataset"]
