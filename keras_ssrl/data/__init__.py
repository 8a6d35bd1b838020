"""The data layer: expression files -> sharded TFRecords + manifest -> `tf.data`.

- `convert` turns an `ExpressionSource` (see `keras_ssrl.data.sources`) into a dataset
  folder; `load_dataset` reads a split of it as standardised `(x, y)` batches.
- `Manifest` describes a folder; `inspect_dataset` (`integrity`) checks it record by
  record.
- `make_synthetic` (`synthetic`) generates the built-in data (`synthetic-tcga`,
  `synthetic-archs4`), converted once into a cache by `builtin`.

Modules: `sources` (readers), `genes` and `labels` (ids, duplicates, alignment, label
files and rules), `splits`, `preprocessing` (transforms, statistics, the z-score),
`validation` (what the converter refuses), `shards` (writers), `convert`, `schema`,
`manifest`, `output` (the output folder), `reader`, `integrity`, `align`, `layouts`
(writers of download layouts), `synthetic`, `builtin`, `errors`. The protocol choices
behind splits and preprocessing: docs/protocol.md. From the rest of the package the
data layer imports only `keras_ssrl.config`, `keras_ssrl.files` and the version.
"""

from keras_ssrl.data.convert import convert
from keras_ssrl.data.errors import DamagedDataError, DataError
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.data.reader import load_dataset

__all__ = ["DamagedDataError", "DataError", "Manifest", "convert", "load_dataset"]
