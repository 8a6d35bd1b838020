"""Where a replica's rows sit in the global batch under `tf.distribute`."""

from __future__ import annotations

import tensorflow as tf


def replica_row_offset(tensor):
    """The index of this replica's first row in the global batch, 0 on one device.

    Under a strategy with several replicas each one holds an equal slice of the global
    batch, in replica order; `tensor` is this replica's slice (rows first).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0
    return context.replica_id_in_sync_group * tf.shape(tensor)[0]
