"""Mixed precision on a GPU that has JAX but no TensorFlow build: the same network.

Usage (on a machine with a CUDA build of JAX):

    KERAS_BACKEND=jax python benchmarks/precision_jax.py
    KERAS_BACKEND=jax python benchmarks/precision_jax.py --genes 57000 --batch-size 256 1024

keras_ssrl trains with TensorFlow (`benchmarks/pretrain_throughput.py --precision
mixed_float16 --xla` is the real figure). Where a GPU machine offers only JAX, this
script answers the hardware question behind `--precision auto` with the library's own
parts: `build_encoder`, `mlp_head`/`decoder`, `MarginalCorruption` and the loss
functions are backend-neutral Keras code, so they run unchanged on Keras's JAX backend.
Only the training step differs: the Keras 3 JAX form (`stateless_call`,
`jax.value_and_grad`, `optimizer.stateless_apply`, loss scaling from the optimizer's own
state under float16) instead of `PretrainingModel.train_step`. JAX compiles every step
with XLA, so this measures the XLA step; BYOL (an EMA target) is left out.

For each gene count and batch size it prints samples/s for float32, mixed_float16 and
mixed_bfloat16 (`--precisions`) and their ratio to the first of them measured in the
same run, and the loss after the timed steps (finite, or the precision failed).
`JAX_DEFAULT_MATMUL_PRECISION=highest` makes float32 matmuls strict float32 instead of
the GPU default (TF32 tensor cores on Ampere and newer, as TensorFlow also does).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    sys.exit("run with KERAS_BACKEND=jax (this script measures Keras's JAX backend)")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_ssrl.encoders import build_encoder  # noqa: E402
from keras_ssrl.heads import decoder, mlp_head  # noqa: E402
from keras_ssrl.layers.corruption import MarginalCorruption  # noqa: E402
from keras_ssrl.losses import info_nce, vime_losses  # noqa: E402

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


class Pretext(keras.Model):
    """SCARF's or VIME's pretext loss as the model's output (docs/protocol.md defaults)."""

    def __init__(self, method: str, n_genes: int, rate: float = 0.3):
        super().__init__()
        layers, width = 4, 256
        self.method = method
        self.encoder = build_encoder(n_genes, layers, width)
        if method == "scarf":
            self.corruption = MarginalCorruption(rate, seed=0)
            self.projector = mlp_head(width, 256, 256, name="projector")
        else:
            self.corruption = MarginalCorruption(rate, seed=0, return_mask=True)
            self.mask_decoder = decoder(
                width, n_genes, layers, width, output_activation="sigmoid"
            )
            self.feature_decoder = decoder(width, n_genes, layers, width)

    def call(self, x, training=True):
        if self.method == "scarf":
            x_tilde = self.corruption(x)
            q = self.projector(self.encoder(x, training=training), training=training)
            q_tilde = self.projector(
                self.encoder(x_tilde, training=training), training=training
            )
            return info_nce(q, q_tilde, 1.0)
        x_tilde, mask = self.corruption(x)
        z = self.encoder(x_tilde, training=training)
        total, _, _ = vime_losses(
            mask,
            self.mask_decoder(z, training=training),
            x,
            self.feature_decoder(z, training=training),
            2.0,
        )
        return total


def make_step(model, optimizer):
    """One jitted training step on device-resident state (the Keras 3 JAX pattern)."""
    scale_index = None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        paths = [v.path for v in optimizer.variables]
        scale_index = paths.index(optimizer.dynamic_scale.path)

    def scaled_loss(trainable, non_trainable, opt_vars, x):
        loss, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        loss = ops.cast(loss, "float32")
        scaled = loss if scale_index is None else loss * opt_vars[scale_index]
        return scaled, (loss, non_trainable)

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

    def step(state, x):
        trainable, non_trainable, opt_vars = state
        (_, (loss, non_trainable)), grads = grad_fn(
            trainable, non_trainable, opt_vars, x
        )
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return (trainable, non_trainable, opt_vars), loss

    return jax.jit(step, donate_argnums=0)


def measure(method, n_genes, batch, precision, seconds, rate) -> tuple[float, float]:
    keras.mixed_precision.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    model = Pretext(method, n_genes, rate)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, n_genes)).astype("float32")
    model(x[:2])  # builds the model and the corruption's seed state
    optimizer = keras.optimizers.Adam(1e-4)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    x = jax.device_put(x)
    step = make_step(model, optimizer)
    for _ in range(3):  # compile, warm up
        state, loss = step(state, x)
    loss.block_until_ready()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 5:
        state, loss = step(state, x)
        steps += 1
    loss.block_until_ready()
    elapsed = time.perf_counter() - start
    return batch * steps / elapsed, float(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[5000, 20000, 57000])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256])
    parser.add_argument("--methods", default="scarf,vime")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument(
        "--corruption-rate",
        type=float,
        default=0.3,
        help="0: the step without corruption (an upper bound of its share: the two "
        "views are then identical and XLA may compute them once)",
    )
    args = parser.parse_args(argv)
    devices = jax.devices()
    print(
        f"jax {jax.__version__}, keras {keras.__version__}, devices "
        f"{[d.device_kind for d in devices]}, float32 matmul precision "
        f"{jax.config.jax_default_matmul_precision or 'default'}, corruption rate "
        f"{args.corruption_rate}"
    )
    for n_genes in args.genes:
        for batch in args.batch_size:
            for method in args.methods.split(","):
                rates = {}
                for precision in args.precisions.split(","):
                    rates[precision], loss = measure(
                        method,
                        n_genes,
                        batch,
                        precision,
                        args.seconds,
                        args.corruption_rate,
                    )
                    ratio = rates[precision] / next(iter(rates.values()))
                    print(
                        f"{n_genes:>6,} genes  batch {batch:>5}  {method:<5} "
                        f"{precision:<15} {rates[precision]:>11,.0f} samples/s  "
                        f"{ratio:5.2f}x first  loss {loss:.4f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
