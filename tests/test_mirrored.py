"""Data parallelism: SCARF's loss and the corruption masks under MirroredStrategy equal
the one-device ones.

The CPU is split into two logical devices in a fresh process (device configuration must
precede TensorFlow's initialisation, which the rest of the suite has already done).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    from keras_ssrl.encoders import build_encoder
    from keras_ssrl.methods import Scarf

    x = np.random.default_rng(0).normal(size=(16, 20)).astype("float32")

    def make():
        keras.utils.set_random_seed(1)
        encoder = build_encoder(20, layers=2, width=12, synchronized_batchnorm=True)
        # Corruption off: each replica draws donors from its own rows, so corrupted
        # views differ from one device's; what is compared here is the loss over the
        # global batch (negatives gathered). The masks are compared below.
        return Scarf(encoder, corruption_rate=0.0, temperature=0.5,
                     projector_hidden=12, projector_dim=6)

    single = make()
    expected = float(single.compute_losses(x, training=True)["loss"])

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = make()
        model.set_weights(single.get_weights())
    assert strategy.num_replicas_in_sync == 2
    halves = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[ctx.replica_id_in_sync_group * 8:][:8]
    )

    @tf.function
    def step(inputs):
        return model.compute_losses(inputs, training=True)["loss"]

    per_replica = strategy.run(step, args=(halves,))
    mirrored = float(strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, None))
    local = [float(v) for v in strategy.experimental_local_results(per_replica)]
    print("single", expected, "mirrored", mirrored, "replicas", local)
    assert abs(mirrored - expected) < 1e-5 * max(1.0, abs(expected)), (mirrored, expected)

    # Corruption: replicas share the layer's seed state, yet each draws the numbers of
    # its own rows of the global batch, so the masks are those of one device.
    from keras_ssrl.layers import MarginalCorruption

    wide = np.random.default_rng(1).normal(size=(16, 300)).astype("float32")
    one_device = MarginalCorruption(0.3, seed=4, return_mask=True)(wide)[1].numpy()
    with strategy.scope():
        layer = MarginalCorruption(0.3, seed=4, return_mask=True)
    wide_halves = strategy.experimental_distribute_values_from_function(
        lambda ctx: wide[ctx.replica_id_in_sync_group * 8:][:8]
    )
    masks = strategy.run(tf.function(lambda v: layer(v)[1]), args=(wide_halves,))
    masks = np.concatenate([m.numpy() for m in strategy.experimental_local_results(masks)])
    assert not np.array_equal(masks[:8], masks[8:])
    np.testing.assert_array_equal(masks, one_device)
    print("OK")
    """
)


def test_mirrored_scarf_loss_equals_single_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "OK" in done.stdout
