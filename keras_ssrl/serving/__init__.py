"""Serving: SavedModel export for TF Serving, and a client that calls it.

- `keras_ssrl.serving.export`: `export_run` writes a pre-training run's encoder or a
  fine-tuning run's classifier as `MODEL_BASE/<version>/` (SavedModel through
  `keras.export.ExportArchive`), with the dataset's transform and standardisation inside
  the graph, a `tf.train.Example` signature in the project's one TFRecord schema, the
  gene list, class names, manifest digest and a model card as assets.
- `keras_ssrl.serving.client`: reads samples (CSV / TSV / Parquet with gene columns, or
  a converted TFRecord folder), puts the columns in the model's gene order and calls
  TF Serving over REST or gRPC, or the SavedModel in-process.

The command-line tools are `export/export_model.py` and `export/client.py`; the
signatures, the tolerance and the TF Serving set-up are described in `export/README.md`.
Importing this package imports neither TensorFlow nor Keras.
"""
