"""Pre-training throughput: samples/s of one training step per method vs the FLOP bound.

Usage:

    python benchmarks/pretrain_throughput.py                    # 5k, 20k, 57k genes
    python benchmarks/pretrain_throughput.py --genes 20000 --methods scarf --seconds 5
    python benchmarks/pretrain_throughput.py --precision mixed_float16 --xla   # on a GPU

In the same run it measures the machine's dense matmul rate (a `256 x genes x 256`
float32 matmul, the encoder's first layer) and, for each method and gene count:

- samples/s of the compiled training step (`tf.function(model.train_step)` on a fixed
  batch, so input reading is excluded: `benchmarks/input_pipeline.py` measures that);
- the FLOP bound: matmul rate / (training FLOPs per sample of the method's dense
  layers, forward + backward = 3 x forward, the target branch of BYOL forward only);
- the share of corruption and loss in the step, two ways: the same ops on tensors of the
  same shapes timed alone ("alone"), and the step time saved by the same model with
  corruption rate 0 ("in step": inside the step, corruption overlaps other work).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ssrl.config import PretrainConfig  # noqa: E402
from keras_ssrl.encoders import build_encoder  # noqa: E402
from keras_ssrl.layers import MarginalCorruption  # noqa: E402
from keras_ssrl.losses import byol_loss, info_nce, vime_losses  # noqa: E402
from keras_ssrl.methods import build_method  # noqa: E402


def timed(fn, seconds: float, warm_up: bool = True) -> float:
    """Seconds per call of `fn` over a window of `seconds` (after tracing it)."""
    if warm_up:
        fn()  # trace / warm up
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        result = fn()
        calls += 1
    # Synchronise with the device before reading the clock.
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)
    return (time.perf_counter() - start) / calls


def best_of(fn, seconds: float, rounds: int) -> float:
    """The fastest of `rounds` windows: a neighbour's load only ever adds time."""
    timed(fn, 0.0)
    return min(timed(fn, seconds / rounds, warm_up=False) for _ in range(rounds))


def matmul_rate(n_genes: int, batch: int, seconds: float, rounds: int) -> float:
    a = tf.random.normal((batch, n_genes))
    b = tf.random.normal((n_genes, 256))
    step = tf.function(lambda: tf.matmul(a, b), autograph=False)
    return 2 * batch * n_genes * 256 / best_of(step, seconds, rounds)


def dense_flops(sizes) -> int:
    """Forward FLOPs per sample of a chain of Dense layers with these widths."""
    return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))


def training_flops(method: str, n_genes: int, config: PretrainConfig) -> int:
    """Training FLOPs per sample (forward + backward = 3 x forward for trained parts)."""
    w, layers = config.encoder.width, config.encoder.layers
    encoder = dense_flops([n_genes] + [w] * layers)
    if method == "scarf":
        c = config.scarf
        projector = dense_flops([w, c.projector_hidden, c.projector_dim])
        return 3 * 2 * (encoder + projector)
    if method == "vime":
        decoder = dense_flops([w] * (layers + 1) + [n_genes])
        return 3 * (encoder + 2 * decoder)
    c = config.byol
    projector = dense_flops([w, c.hidden, c.projection_dim])
    predictor = dense_flops([c.projection_dim, c.hidden, c.projection_dim])
    return 3 * (encoder + projector + predictor) + encoder + projector


def corruption_and_loss(method: str, x, config: PretrainConfig):
    """The method's non-network work on tensors of the real shapes."""
    batch = x.shape[0]
    if method == "scarf":
        layer = MarginalCorruption(config.scarf.corruption_rate, seed=0)
        z = tf.random.normal((batch, config.scarf.projector_dim))

        def work():
            return layer(x), info_nce(z, z * 1.1, config.scarf.temperature)
    elif method == "vime":
        layer = MarginalCorruption(config.vime.mask_rate, seed=0, return_mask=True)
        probabilities = tf.random.uniform(x.shape, 0.01, 0.99)

        def work():
            corrupted, mask = layer(x)
            return vime_losses(mask, probabilities, x, corrupted, config.vime.alpha)
    else:
        layer = MarginalCorruption(config.byol.corruption_rate, seed=0)
        z = tf.random.normal((batch, config.byol.projection_dim))

        def work():
            return layer(x), byol_loss(z, z * 1.1)

    return tf.function(work, autograph=False)


def train_step_of(method, config, x, xla):
    n_genes = x.shape[1]
    model = build_method(
        method, build_encoder(n_genes), n_genes, config, total_steps=10_000
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=xla
    )
    return tf.function(lambda: model.train_step(x), jit_compile=xla, autograph=False)


def bench(method, n_genes, batch, seconds, rate, xla, rounds):
    config = PretrainConfig(method=method)
    x = tf.random.normal((batch, n_genes))
    uncorrupted = PretrainConfig(method=method)
    uncorrupted.scarf.corruption_rate = 0.0
    uncorrupted.vime.mask_rate = 0.0
    uncorrupted.byol.corruption_rate = 0.0
    work = {
        "step": train_step_of(method, config, x, xla),
        "uncorrupted": train_step_of(method, uncorrupted, x, xla),
        "alone": corruption_and_loss(method, x, config),
    }
    # The three are timed in turn, `rounds` times, and each keeps its fastest window
    # (see `best_of`): interleaving keeps a slow spell from landing on one alone.
    best = dict.fromkeys(work, float("inf"))
    for fn in work.values():
        timed(fn, 0.0)
    for _ in range(rounds):
        for name, fn in work.items():
            best[name] = min(best[name], timed(fn, seconds / rounds, warm_up=False))
    flops = training_flops(method, n_genes, config)
    bound = rate / flops
    samples = batch / best["step"]
    return {
        "method": method,
        "genes": n_genes,
        "samples/s": samples,
        "FLOP bound /s": bound,
        "fraction of bound": samples / bound,
        "corruption+loss share": best["alone"] / best["step"],
        "corruption in-step share": max(0.0, 1.0 - best["uncorrupted"] / best["step"]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[5000, 20000, 57000])
    parser.add_argument("--methods", default="scarf,vime,byol")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "mixed_float16", "mixed_bfloat16"),
    )
    parser.add_argument("--xla", action="store_true", help="jit_compile the step")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved timing rounds (best kept)"
    )
    args = parser.parse_args(argv)
    keras.mixed_precision.set_dtype_policy(args.precision)
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(
        f"devices {devices}, cores {os.cpu_count()}, precision {args.precision}, "
        f"xla {args.xla}, batch {args.batch_size}"
    )
    rows = []
    for n_genes in args.genes:
        rate = matmul_rate(n_genes, args.batch_size, args.seconds / 2, args.rounds)
        print(
            f"\n{n_genes:,} genes: float32 matmul {args.batch_size} x {n_genes} x 256 "
            f"= {rate / 1e9:.0f} GFLOP/s"
        )
        for method in args.methods.split(","):
            row = bench(
                method,
                n_genes,
                args.batch_size,
                args.seconds,
                rate,
                args.xla,
                args.rounds,
            )
            rows.append(row)
            print(
                f"  {method:<6} {row['samples/s']:>9,.0f} samples/s   bound "
                f"{row['FLOP bound /s']:>9,.0f}/s   {row['fraction of bound']:>6.1%} "
                f"of bound   corruption+loss alone {row['corruption+loss share']:>6.1%}"
                f", corruption in step {row['corruption in-step share']:>6.1%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
