"""The one TFRecord schema shared by the writer, the reader and the export signature.

Each record is a `tf.train.Example` with three features:

- `sample_id` (bytes): the sample identifier from the source file.
- `expression` (bytes): the sample's transformed values (e.g. `log2(x + 1)`) for the
  dataset's genes, in manifest order, as little-endian `float16` or `float32` bytes.
- `label` (int64): index into the manifest's `labels`, or -1 when the sample has none.

Why raw bytes and not a `float_list`: parsing a 57k-gene record as a `float_list` goes
through a per-value proto decode; raw bytes decode with one `tf.io.decode_raw` per batch.
`float16` halves the bytes read and parsed; its relative precision (2**-11) on
log-scale values (|error| < 0.008 below 2**16 counts) is far below the technical noise of
RNA-seq, and `float32` is available where exact storage matters. The benchmark in
`benchmarks/input_pipeline.py` measures the three encodings.
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 1
RECORD_DTYPES = ("float16", "float32")
DEFAULT_RECORD_DTYPE = "float16"

SAMPLE_ID = "sample_id"
EXPRESSION = "expression"
LABEL = "label"
UNLABELLED = -1

# Split names, in the order they are written and reported.
PRETRAIN = "pretrain"
PRETRAIN_VAL = "pretrain_val"
FINETUNE = "finetune"
FINETUNE_VAL = "finetune_val"
TEST = "test"
SPLITS = (PRETRAIN, PRETRAIN_VAL, FINETUNE, FINETUNE_VAL, TEST)


def shard_name(split: str, index: int, count: int) -> str:
    """File name of shard `index` of `count` for `split` (`pretrain-00000-of-00008`)."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def encode_expression(values: np.ndarray, record_dtype: str) -> bytes:
    """Encodes one sample's values as the `expression` feature bytes."""
    return np.asarray(values, dtype=np.dtype(record_dtype).newbyteorder("<")).tobytes()


def serialize_example(
    sample_id: str, values: np.ndarray, label: int, record_dtype: str
) -> bytes:
    """Serialises one sample as a `tf.train.Example` in this schema.

    Built with the protobuf classes TensorFlow ships, without creating any TF op, so the
    converter stays fast and needs no graph.
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    feature = {
        SAMPLE_ID: feature_pb2.Feature(
            bytes_list=feature_pb2.BytesList(value=[sample_id.encode("utf-8")])
        ),
        EXPRESSION: feature_pb2.Feature(
            bytes_list=feature_pb2.BytesList(
                value=[encode_expression(values, record_dtype)]
            )
        ),
        LABEL: feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[label])),
    }
    example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
    return example.SerializeToString()


def feature_spec():
    """The `tf.io.parse_example` spec of the schema."""
    import tensorflow as tf

    return {
        SAMPLE_ID: tf.io.FixedLenFeature([], tf.string),
        EXPRESSION: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=UNLABELLED),
    }


def parse_batch(serialized, n_genes: int, record_dtype: str):
    """Parses a batch of serialised records in the graph (vectorised).

    Args:
        serialized: string tensor of shape `(batch,)`.
        n_genes: int, the number of genes each record must hold.
        record_dtype: str, `"float16"` or `"float32"`.

    Returns:
        A dict with `sample_id` (string, `(batch,)`), `expression` (`record_dtype`,
        `(batch, n_genes)`) and `label` (int64, `(batch,)`). A record of the wrong
        length fails with an error naming the expected number of values.
    """
    import tensorflow as tf

    parsed = tf.io.parse_example(serialized, feature_spec())
    width = n_genes * np.dtype(record_dtype).itemsize
    lengths = tf.strings.length(parsed[EXPRESSION])
    check = tf.debugging.assert_equal(
        lengths,
        tf.cast(width, lengths.dtype),
        message=(
            f"a record's expression does not hold {n_genes} {record_dtype} values: "
            "the shard is damaged or belongs to another dataset "
            "(run tfrecords_tools/verify.py on the folder)"
        ),
    )
    with tf.control_dependencies([check]):
        expression = tf.io.decode_raw(
            parsed[EXPRESSION], tf.dtypes.as_dtype(record_dtype), little_endian=True
        )
    expression = tf.ensure_shape(expression, [None, n_genes])
    return {
        SAMPLE_ID: parsed[SAMPLE_ID],
        EXPRESSION: expression,
        LABEL: parsed[LABEL],
    }
