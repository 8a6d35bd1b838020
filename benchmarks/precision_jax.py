"""Mixed precision through Keras's JAX backend: the real models, trained by `fit`.

Usage (on a machine with JAX; TensorFlow is not needed):

    KERAS_BACKEND=jax python benchmarks/precision_jax.py
    KERAS_BACKEND=jax python benchmarks/precision_jax.py --genes 57000 --batch-size 256 2048
    KERAS_BACKEND=jax python benchmarks/precision_jax.py --genes 2000 --steps 5  # on a CPU

For each gene count, batch size and method it prints the samples/s of pre-training in
float32, mixed_float16 and mixed_bfloat16 (`--precisions`), their ratio to the first
precision measured in the same run, and the loss after the timed steps (finite, or the
precision failed). The models are the library's own (`build_encoder` and `build_method`,
the methods' default heads) compiled with Adam and trained by Keras `fit`, whose JAX
step is `PretrainingModel.train_step` (under mixed_float16 Keras wraps Adam in a
`LossScaleOptimizer`). By default the split is held on the device (`DeviceRows`, as
`--cache device`) and `fit` is given row indices, so the figures are the step's, not
the host's input; `--input stream` feeds float32 batches from host memory instead.

Timing is `benchmarks/gpu_scale.py`'s (`measure_pretraining`): a warm-up `fit` that
compiles, then `fit` over N steps timed whole, `--reps` times, median kept, each
repetition ending with `jax.block_until_ready` on the weights. N makes a repetition last
about `--seconds`, or is `--steps`.

`JAX_DEFAULT_MATMUL_PRECISION=highest` makes float32 matmuls strict float32 instead of
the GPU default (TF32 tensor cores on Ampere and newer, as TensorFlow also does).
"""

from __future__ import annotations

import argparse
import os
import sys

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    sys.exit("run with KERAS_BACKEND=jax (this script measures Keras's JAX backend)")

import jax  # noqa: E402
import keras  # noqa: E402

# The sibling script's timing and models (`python benchmarks/...` puts its folder on
# the path; importing it from elsewhere needs that folder on the path too).
from gpu_scale import METHODS, measure_pretraining  # noqa: E402

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[5000, 20000, 57000])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--seconds", type=float, default=1.5, help="per repetition")
    parser.add_argument("--steps", type=int, help="steps per repetition (else timed)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--input", choices=("device", "stream"), default="device")
    parser.add_argument("--layers", type=int, default=4, help="encoder blocks")
    parser.add_argument("--width", type=int, default=256, help="encoder width")
    parser.add_argument(
        "--corruption-rate",
        type=float,
        help="overrides the methods' corruption / mask rate (0.3); 0: the step "
        "without corruption (an upper bound of its share: SCARF's two views are then "
        "identical and XLA may compute them once)",
    )
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    precisions = [p for p in args.precisions.split(",") if p]
    for name, values, allowed in (
        ("--methods", methods, METHODS),
        ("--precisions", precisions, PRECISIONS),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            parser.error(
                f"{name}: {unknown or 'none'}; choose from {', '.join(allowed)}"
            )
    devices = jax.devices()
    print(
        f"jax {jax.__version__}, keras {keras.__version__}, devices "
        f"{[d.device_kind for d in devices]}, float32 matmul precision "
        f"{jax.config.jax_default_matmul_precision or 'default'}, input {args.input}, "
        f"corruption rate {args.corruption_rate or 'default'}",
        flush=True,
    )
    for n_genes in args.genes:
        for batch in args.batch_size:
            for method in methods:
                rates = {}
                for precision in precisions:
                    record = measure_pretraining(
                        method,
                        n_genes,
                        batch,
                        precision,
                        args.input,
                        seconds=args.seconds,
                        reps=args.reps,
                        steps=args.steps,
                        corruption_rate=args.corruption_rate,
                        layers=args.layers,
                        width=args.width,
                    )
                    rates[precision] = record["samples_per_s"]
                    ratio = rates[precision] / next(iter(rates.values()))
                    print(
                        f"{n_genes:>6,} genes  batch {batch:>5}  {method:<5} "
                        f"{precision:<15} {rates[precision]:>11,.0f} samples/s  "
                        f"{ratio:5.2f}x first  loss {record['loss']:.4f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
