"""Serving: SavedModel export for TF Serving, and a client that calls it.

The export (`export_run`) writes a pre-training run's encoder or a fine-tuning run's
classifier as `MODEL_BASE/<version>/` (SavedModel through `keras.export.ExportArchive`),
with the dataset's transform and standardisation inside the graph, a
`tf.train.Example` signature in the project's one TFRecord schema, the gene list, class
names, manifest digest and a model card as assets. The client (`run_client`) reads
samples (CSV / TSV / Parquet with gene columns, or a converted TFRecord folder), puts
the columns in the model's gene order and calls TF Serving over REST or gRPC, or the
SavedModel in-process.

- `contract`: kinds, signature and input names, `ExportError`;
- `preprocessing`: `ServingData` from the manifest, the in-graph transform and checks;
- `loading`: the run folder to export, its dataset and Keras model, checked;
- `signatures`: the served graph (`build_archive`) and its description;
- `verify`: the written SavedModel against the Keras model (`tolerance_for`);
- `export`: `export_run`: versions, the model base's lock, the model card;
- `tensorflow_process`: `export_run` from a process running another Keras backend;
- `assets`: the export's `assets/` files, written and read back (`ModelInfo`);
- `inputs`: samples read and put in the model's gene order (`Samples`);
- `transports`: `RestModel`, `GrpcModel`, `LocalModel`;
- `client`: `run_client`, the predictions CSV.

The command-line tools are `export/export_model.py` and `export/client.py`; the
signatures, the tolerance and the TF Serving set-up are described in `export/README.md`.
Importing this package imports neither TensorFlow nor Keras.
"""

from keras_ssrl.serving.assets import ModelInfo, version_dir
from keras_ssrl.serving.client import DEFAULT_BATCH, check_output, run_client
from keras_ssrl.serving.contract import (
    CLASSIFIER,
    CLASSIFY,
    ENCODER,
    PREDICT_EXAMPLES,
    SERVING_DEFAULT,
    ExportError,
)
from keras_ssrl.serving.export import export_run, next_version
from keras_ssrl.serving.inputs import (
    Samples,
    align_to_model,
    read_record_samples,
    read_table_samples,
)
from keras_ssrl.serving.loading import Run, load_model, load_run
from keras_ssrl.serving.preprocessing import ServingData
from keras_ssrl.serving.signatures import build_archive
from keras_ssrl.serving.transports import (
    REST_FORMS,
    GrpcModel,
    LocalModel,
    RestModel,
    ServingError,
)
from keras_ssrl.serving.verify import TOLERANCE, tolerance_for, verify_export

__all__ = [
    "CLASSIFIER",
    "CLASSIFY",
    "DEFAULT_BATCH",
    "ENCODER",
    "PREDICT_EXAMPLES",
    "REST_FORMS",
    "SERVING_DEFAULT",
    "TOLERANCE",
    "ExportError",
    "GrpcModel",
    "LocalModel",
    "ModelInfo",
    "RestModel",
    "Run",
    "Samples",
    "ServingData",
    "ServingError",
    "align_to_model",
    "build_archive",
    "check_output",
    "export_run",
    "load_model",
    "load_run",
    "next_version",
    "read_record_samples",
    "read_table_samples",
    "run_client",
    "tolerance_for",
    "verify_export",
    "version_dir",
]
