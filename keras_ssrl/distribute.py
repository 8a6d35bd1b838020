"""Where a replica's rows sit in the global batch, on every backend.

Under TensorFlow's `tf.distribute`, each replica runs the training step on its own slice
of the global batch, so a contrastive loss must gather the other replicas' rows and a
per-cell random generator must know where its rows start. Under JAX (with or without
`keras.distribution.DataParallel`) the step is one program over the global batch, which
XLA partitions: every row already sees the whole batch and its own global index, so both
helpers are the identity there. TensorFlow is imported only on its own backend.
"""

from __future__ import annotations

import keras


def _replica_context():
    """The `tf.distribute` replica context when there are several replicas, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def replica_row_offset(tensor):
    """The index of this replica's first row in the global batch, 0 on one device.

    Under a strategy with several replicas each one holds an equal slice of the global
    batch, in replica order; `tensor` is this replica's slice (rows first).
    """
    context = _replica_context()
    if context is None:
        return 0
    import tensorflow as tf

    return context.replica_id_in_sync_group * tf.shape(tensor)[0]


def global_batch(tensor):
    """All replicas' rows of `tensor` and the offset of this replica's rows in it.

    Contrastive negatives must come from the global batch, or the loss would depend on
    the number of devices.
    """
    context = _replica_context()
    if context is None:
        return tensor, 0
    return context.all_gather(tensor, axis=0), replica_row_offset(tensor)


def replicas_in_sync() -> int:
    """Replicas summing gradients in the current `tf.distribute` context (1 elsewhere)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync
