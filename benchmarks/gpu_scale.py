"""Pre-training on a GPU through Keras's JAX backend: samples/s, epochs, FLOP bound.

Usage (KERAS_BACKEND=jax; TensorFlow is not needed, and not imported):

    KERAS_BACKEND=jax python benchmarks/gpu_scale.py --out results/gpu      # ~8 min
    KERAS_BACKEND=jax python benchmarks/gpu_scale.py --tiny --out /tmp/x   # CPU smoke run
    bash benchmarks/gpu/run.sh      # on the GPU machine: wheels, environment, this script

Everything runs through the library's real models and Keras `fit`: `build_encoder`
(4 x 256) and `build_method` with the methods' default heads (SCARF projector
256-256; VIME mask and feature decoders 4 x 256 + genes; BYOL projector and predictor
4096-256 and an EMA target), compiled with Adam, as `scripts/pretrain.py` builds them.

What is measured, in one run (`gpu_scale.json` and `gpu_scale.md` in `--out`):

- **Pre-training samples/s** per method, gene count, batch size, precision
  (`float32`, `mixed_bfloat16`) and input:
  - `device`: the split held on the device as a `DeviceRows` table (float16, bfloat16
    under `mixed_bfloat16`, as `--cache device` stores it) and `fit` given int32 row
    indices, which the model gathers on the device;
  - `stream`: float32 batches sliced from a NumPy array in host memory and copied to
    the device by `fit` (one batch ahead), contiguous slices with no shuffling: the
    best case of streaming from host memory.
  Each case is compiled by a warm-up `fit`, then `fit` over N batches is timed
  whole, `--reps` times, and the median kept; N is chosen from a timed calibration
  `fit` so that a repetition lasts about `--seconds`. `fit` returns after a
  `jax.block_until_ready` on the trained weights (the last step has run). Some cases
  also time other ways of driving the same step:
  - `fit/batch` (the first case): one `fit` call per batch, what a loop of `fit`
    calls would cost;
  - `scan` (SCARF's device-resident cases at batch 2048): `--scan-steps` calls of
    `model.train_step` in one `jax.lax.scan` under `jax.jit`, one dispatch for many
    steps: the device's rate without Keras's per-step host work, so `fit / scan` is
    the share of it that `fit` reaches.
- **Epoch time** of a TCGA-sized split (7,291 x 20,000) and an ARCHS4-sized one
  (200,000 x 20,000, then 700,000 x 20,000 if time and memory allow), standardised-like
  synthetic values (N(0, 1)) generated on the device in chunks: one `fit` epoch over
  all rows, shuffled, the final partial batch included, after a warm-up epoch; the
  700,000-row figure is also projected from each smaller one (rows are independent
  steps: epoch time is linear in rows).
- **Matmul rate** in the same run, for the FLOP bound: a GEMM shaped like the
  encoder's first layer (`batch x genes x 256`) per batch size, gene count and dtype,
  and a square one (8192^3), in float32 (JAX's default matmul precision, TF32 tensor
  cores on Ampere and newer, as the model's float32 layers use) and bfloat16. Each is
  timed as 16 products in one compiled program, their operands passed through an
  `optimization_barrier` so that XLA cannot hoist or merge them.

FLOP model (training FLOPs per sample; a Dense layer `a -> b` is `2ab` forward):

- a trained Dense layer costs `2ab` forward, `2ab` for its weight gradient and `2ab`
  for its input gradient (3 x forward), except the encoder's first layer, whose input
  is data (or its corruption, which has no weights): JAX differentiates with respect
  to the weights only and never computes that input gradient, so `2 x forward`;
- a layer that is not trained (BYOL's target branch) costs its forward `2ab` only;
- SCARF's InfoNCE logits (`batch x d` by `d x batch`, d = 256) add `2 * batch * d`
  forward and twice that backward, per sample;
- BatchNorm, ReLU, the corruption, losses and Adam's update are not counted
  (element-wise work).

With E = 2g*256 + 3 * 2*256*256 (the encoder's forward) and g genes:

- SCARF (two views, each encoder + projector 256-256-256 with gradients):
  `2 * (3 * (E + 2 * 2*256*256) - 2g*256) + 6 * batch * 256`;
- VIME (encoder on the corrupted view; mask and feature decoders, each 4 x 256 then
  256 -> g, with gradients): `3E - 2g*256 + 2 * 3 * (4 * 2*256*256 + 2*256*g)`;
- BYOL (online encoder + projector 256-4096-256 + predictor 256-4096-256 with
  gradients; target encoder + projector forward only):
  `3 * (E + P + Q) - 2g*256 + E + P`, P = Q = 2*256*4096 + 2*4096*256.

The FLOP bound of a case is the first-layer GEMM's rate (same batch, genes, dtype) over
the FLOPs per sample. The JSON also has `flops_per_sample_3x`, the "3 x forward for
every trained layer" count of `benchmarks/pretrain_throughput.py`: at 20k genes and
batch 2048 it is 1.36x (SCARF), 1.12x (VIME) and 1.17x (BYOL) the count above, because
it includes the first layer's input gradient, which is never computed.

Targets, reported against, not asserted:

- SCARF, 20k genes, batch 2048, `mixed_bfloat16`, device-resident: >= 2,000,000 samples/s;
- `mixed_bfloat16` >= 1.5x `float32`, at 20k+ genes and batch 2048 (each method);
- an ARCHS4-sized epoch (700,000 x 20,000): < 1 s (measured, or projected).

The run is guarded: a total `--budget` (cases that would start too late are recorded as
skipped), a time limit per case, and any exception in a case recorded with the case and
the run continued. Both files are rewritten after every case, so a run that is stopped
still leaves everything measured so far. Cases run in priority order (the targets'
cases first); `--plan priority` runs only those.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    sys.exit("run with KERAS_BACKEND=jax (this script measures Keras's JAX backend)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_ssrl.config import PretrainConfig  # noqa: E402
from keras_ssrl.encoders import build_encoder  # noqa: E402
from keras_ssrl.layers import DeviceRows  # noqa: E402
from keras_ssrl.methods import build_method  # noqa: E402

try:
    from jax.lax import optimization_barrier  # noqa: E402
except ImportError:  # JAX < 0.4.31 has it under its private name only
    from jax._src.ad_checkpoint import _optimization_barrier as optimization_barrier

METHODS = ("scarf", "vime", "byol")
GEMM_DTYPES = {
    "float32": "float32",
    "mixed_float16": "float16",
    "mixed_bfloat16": "bfloat16",
}
# Targets (reported, never asserted).
SCARF_TARGET = 2_000_000
BF16_SPEEDUP_TARGET = 1.5
EPOCH_TARGET_S = 1.0
PROJECT_ROWS = 700_000
GEMM_REPEATS = 16


class CaseTimeout(Exception):
    """A case ran past its time limit."""


# ---------------------------------------------------------------------------- timing


def block(model) -> None:
    """Waits until the last step that wrote `model`'s weights has run."""
    jax.block_until_ready([v.value for v in model.trainable_variables])


def timed(run) -> float:
    """Seconds `run()` takes; `run` must wait for its device work to finish."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def repetitions(run, reps: int) -> list[float]:
    """`timed(run)`, `reps` times."""
    return [timed(run) for _ in range(reps)]


def units_for(seconds_per_unit: float, seconds: float, low: int, high: int) -> int:
    """How many units (steps, calls) make a repetition of about `seconds`."""
    wanted = math.ceil(seconds / max(seconds_per_unit, 1e-9))
    return int(min(max(wanted, low), high))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises `CaseTimeout` in the main thread once `seconds` have passed.

    A running XLA compilation is not interrupted: the exception comes when it returns.
    """

    def expire(signum, frame):
        raise CaseTimeout(f"stopped at its time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------ FLOP model


def dense_flops(sizes) -> int:
    """Forward FLOPs per sample of a chain of Dense layers with these widths."""
    return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:]))


def training_flops(
    method: str, n_genes: int, batch: int, config: PretrainConfig
) -> dict[str, int]:
    """Training FLOPs per sample, by the model of the module docstring.

    Returns:
        `{"exact": ..., "3x": ...}`: the model above, and 3 x forward for every trained
        layer (the count of `benchmarks/pretrain_throughput.py`).
    """
    w, layers = config.encoder.width, config.encoder.layers
    encoder = dense_flops([n_genes] + [w] * layers)
    no_input_gradient = 2 * n_genes * w  # the first layer's, on data
    if method == "scarf":
        c = config.scarf
        projector = dense_flops([w, c.projector_hidden, c.projector_dim])
        logits = 2 * batch * c.projector_dim
        exact = 2 * (3 * (encoder + projector) - no_input_gradient) + 3 * logits
        return {"exact": exact, "3x": 3 * 2 * (encoder + projector)}
    if method == "vime":
        decoder = dense_flops([w] * (layers + 1) + [n_genes])
        trained = 3 * (encoder + 2 * decoder)
        return {"exact": trained - no_input_gradient, "3x": trained}
    if method == "byol":
        c = config.byol
        projector = dense_flops([w, c.hidden, c.projection_dim])
        predictor = dense_flops([c.projection_dim, c.hidden, c.projection_dim])
        online = 3 * (encoder + projector + predictor)
        target = encoder + projector
        if c.symmetric:
            online, target = 2 * online, 2 * target
            no_input_gradient *= 2
        return {"exact": online - no_input_gradient + target, "3x": online + target}
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- data


def device_table(n_rows: int, n_genes: int, dtype: str, seed: int = 0):
    """An `(n_rows, n_genes)` array of N(0, 1) values made on the device, in chunks.

    Chunks of ~2**27 values are written into a donated buffer, so the device holds the
    table and one chunk, never a float32 copy of the whole; nothing crosses from the
    host.
    """
    chunk = max(1, min(n_rows, 2**27 // n_genes))

    def fill(table, key, start):
        block_ = jax.random.normal(key, (chunk, n_genes), dtype)
        return jax.lax.dynamic_update_slice(table, block_, (start, 0))

    fill = jax.jit(fill, donate_argnums=0)
    key = jax.random.key(seed)
    table = jnp.zeros((n_rows, n_genes), dtype)
    for i, start in enumerate(range(0, n_rows, chunk)):
        # The last chunk ends at the last row (it may overlap the one before): one
        # compiled shape for every chunk, and every value still N(0, 1).
        table = fill(table, jax.random.fold_in(key, i), min(start, n_rows - chunk))
    return jax.block_until_ready(table)


def host_rows(n_rows: int, n_genes: int, seed: int = 0) -> np.ndarray:
    """Float32 rows in host memory for the streaming cases (a random block, repeated)."""
    rng = np.random.default_rng(seed)
    block_rows = min(n_rows, 1024)
    pattern = rng.standard_normal((block_rows, n_genes), dtype=np.float32)
    rows = np.empty((n_rows, n_genes), np.float32)
    for start in range(0, n_rows, block_rows):
        stop = min(n_rows, start + block_rows)
        rows[start:stop] = pattern[: stop - start]
    return rows


def table_rows(batch: int, n_genes: int, max_bytes: int) -> int:
    """Rows of the device table of a throughput case.

    32 batches: far larger than any cache (at 20k genes and batch 256, 328 MB against
    the H200's 50 MB L2), so every step gathers from device memory, as it would from
    a whole split, while the table is quick to make.
    """
    return int(max(batch, min(32 * batch, max_bytes // (2 * n_genes))))


# --------------------------------------------------------------------------- models


def storage_dtype(precision: str) -> str:
    """The `DeviceRows` dtype `--cache device` uses under `precision`."""
    return "bfloat16" if precision == "mixed_bfloat16" else "float16"


def build_model(
    method: str,
    n_genes: int,
    precision: str,
    rows=None,
    corruption_rate: float | None = None,
    total_steps: int = 1000,
    layers: int | None = None,
    width: int | None = None,
):
    """The method's model as `scripts/pretrain.py` builds it, compiled with Adam.

    Args:
        method: `scarf`, `vime` or `byol`.
        n_genes: int, input width.
        precision: a Keras dtype policy name.
        rows: a device array of the split, or None (batches of values are fed).
        corruption_rate: float, overrides the method's corruption / mask rate.
        total_steps: int, BYOL's EMA schedule length.
        layers, width: the encoder's architecture (default: the protocol's 4 x 256).

    Returns:
        `(model, config)`.
    """
    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    config = PretrainConfig(method=method)
    config.encoder.layers = layers or config.encoder.layers
    config.encoder.width = width or config.encoder.width
    if corruption_rate is not None:
        config.scarf.corruption_rate = corruption_rate
        config.vime.mask_rate = corruption_rate
        config.byol.corruption_rate = corruption_rate
    encoder = build_encoder(n_genes, config.encoder.layers, config.encoder.width)
    model = build_method(method, encoder, n_genes, config, total_steps=total_steps)
    if rows is not None:
        model.use_device_rows(DeviceRows(rows, storage_dtype(precision)))
    # Through compile, so that Keras wraps Adam in a LossScaleOptimizer under float16.
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    return model, config


def release() -> None:
    """Resets Keras's global state and collects what a finished case left (device
    memory held in reference cycles: a model and its variables)."""
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
    gc.collect()


def fit_steps(model, x, batch: int) -> float:
    """One `fit` over `x` in batches of `batch`, synced; returns the last loss."""
    history = model.fit(x, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    block(model)
    return float(history.history["loss"][-1])


def scan_rate(model, indices: np.ndarray, batch: int, seconds, reps) -> float:
    """Samples/s of `model.train_step` run by `jax.lax.scan` in one compiled call.

    The model's variables are donated to the compiled call: the model cannot be used
    afterwards.
    """
    steps = len(indices) // batch
    batches = jnp.asarray(indices[: steps * batch].reshape(steps, batch))
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )

    def many_steps(state, batches):
        def one(state, x):
            logs, state = model.train_step(state, x)
            return state, logs["loss"]

        return jax.lax.scan(one, state, batches)

    run = jax.jit(many_steps, donate_argnums=0)
    holder = {"state": state}

    def call():
        holder["state"], losses = run(holder["state"], batches)
        jax.block_until_ready(losses)

    call()  # compiles
    calls = units_for(timed(call), seconds, 1, 1000)
    times = repetitions(lambda: [call() for _ in range(calls)], reps)
    return calls * steps * batch / statistics.median(times)


def measure_pretraining(
    method: str,
    n_genes: int,
    batch: int,
    precision: str,
    source: str = "device",
    *,
    seconds: float,
    reps: int,
    drivers=("fit",),
    steps: int | None = None,
    max_steps: int = 2000,
    stream_bytes: int = 3 * 2**30,
    table_bytes: int = 4 * 2**30,
    scan_steps: int = 16,
    corruption_rate: float | None = None,
    layers: int | None = None,
    width: int | None = None,
) -> dict:
    """Samples/s of the method's training step driven by `fit`, after a warm-up.

    Args:
        method, n_genes, batch, precision: the case.
        source: `device` (a `DeviceRows` table and index batches) or `stream` (float32
            batches from host memory).
        seconds: float, the length of one timed repetition (`steps` overrides).
        reps: int, timed repetitions; the median is kept.
        drivers: `fit` (always first), and any of `fit/batch`, `scan`.
        steps: int, fixed number of steps per repetition (else calibrated).
        max_steps: int, at most this many steps per repetition.
        stream_bytes: int, the host array of a streaming case is at most this large.
        table_bytes: int, the device table of a `device` case is at most this large.
        scan_steps: int, steps per compiled call of the `scan` driver.
        corruption_rate: float, overrides the method's rate.
        layers, width: the encoder's architecture (default 4 x 256).

    Returns:
        A dict of the measurements (see the JSON written by `main`).
    """
    record = {}
    rows = None
    if source == "device":
        # A table per model: it becomes the model's variable (no copy), which `fit`
        # donates to the compiled step.
        n_rows = table_rows(batch, n_genes, table_bytes)
        rows = device_table(n_rows, n_genes, storage_dtype(precision))
    model, config = build_model(
        method, n_genes, precision, rows, corruption_rate, layers=layers, width=width
    )
    rng = np.random.default_rng(0)
    if source == "device":
        order = rng.permutation(int(rows.shape[0])).astype(np.int32)

        def data(n_steps):
            return np.resize(order, n_steps * batch)
    else:
        affordable = max(2, stream_bytes // (batch * n_genes * 4))
        max_steps = min(max_steps, affordable)
        host = host_rows(max_steps * batch, n_genes)

        def data(n_steps):
            return host[: n_steps * batch]  # a view: fit slices it batch by batch

    # Warm-up: compiles the step (and runs two).
    record["compile_s"] = timed(lambda: fit_steps(model, data(2), batch))
    if steps is None:
        probe = min(max_steps, 10)
        per_step = timed(lambda: fit_steps(model, data(probe), batch)) / probe
        steps = units_for(per_step, seconds, 2, max_steps)
    steps = min(steps, max_steps)
    losses = []
    times = repetitions(
        lambda: losses.append(fit_steps(model, data(steps), batch)), reps
    )
    median = statistics.median(times)
    record.update(
        steps_per_rep=steps,
        reps_s=times,
        samples_per_s=steps * batch / median,
        step_ms=1000 * median / steps,
        loss=losses[-1],
        finite=bool(np.isfinite(losses).all()),
    )
    flops = training_flops(method, n_genes, batch, config)
    record.update(flops_per_sample=flops["exact"], flops_per_sample_3x=flops["3x"])
    if "fit/batch" in drivers:
        x = data(min(steps, 50))
        n = len(x) // batch

        def per_batch():
            for i in range(n):
                batch_x = x[i * batch : (i + 1) * batch]
                model.fit(batch_x, batch_size=batch, shuffle=False, verbose=0)
            block(model)

        record["fit_per_batch_samples_per_s"] = (
            n * batch / statistics.median(repetitions(per_batch, reps))
        )
    if "scan" in drivers and source == "device":
        record["scan_samples_per_s"] = scan_rate(
            model, data(scan_steps), batch, seconds, reps
        )
        record["fit_over_scan"] = record["samples_per_s"] / record["scan_samples_per_s"]
    model = rows = None  # the closures above hold these names: drop the values
    release()
    return record


def measure_epoch(
    n_rows: int,
    n_genes: int,
    batch: int,
    method: str,
    precision: str,
    *,
    reps: int,
    layers: int | None = None,
    width: int | None = None,
) -> dict:
    """Seconds per `fit` epoch over an `n_rows` x `n_genes` split held on the device.

    Each epoch is a fresh permutation of the rows (`shuffle=True` on the index array),
    cut into batches of `batch`, the final partial batch included; the first epoch
    (compilation of both batch shapes) is reported apart.
    """
    record = {}
    dtype = storage_dtype(precision)
    start = time.perf_counter()
    table = device_table(n_rows, n_genes, dtype, seed=1)
    record["table_s"] = time.perf_counter() - start
    record["table_gib"] = n_rows * n_genes * 2 / 2**30
    model, _ = build_model(
        method, n_genes, precision, table, layers=layers, width=width
    )
    del table  # the model's variable is this buffer now; `fit` donates it
    rows = np.arange(n_rows, dtype=np.int32)
    losses = []

    def epoch():
        history = model.fit(rows, batch_size=batch, epochs=1, shuffle=True, verbose=0)
        block(model)
        losses.append(float(history.history["loss"][-1]))

    record["compile_s"] = timed(epoch)
    times = repetitions(epoch, reps)
    median = statistics.median(times)
    record.update(
        reps_s=times,
        epoch_s=median,
        samples_per_s=n_rows / median,
        steps=math.ceil(n_rows / batch),
        projected_700k_s=median * PROJECT_ROWS / n_rows,
        loss=losses[-1],
        finite=bool(np.isfinite(losses).all()),
    )
    model = None  # `epoch` holds the name: drop the value
    release()
    return record


def measure_gemm(m: int, k: int, n: int, dtype: str, *, seconds, reps) -> dict:
    """TFLOP/s of `(m, k) @ (k, n)` products in `dtype`, 16 per compiled call."""
    keys = jax.random.split(jax.random.key(2), 2)
    a = jax.random.normal(keys[0], (m, k), dtype)
    b = jax.random.normal(keys[1], (k, n), dtype)

    def products(a, b):
        out = jnp.zeros((m, n), dtype)
        for _ in range(GEMM_REPEATS):
            # Opaque to XLA: each product is computed, none hoisted or merged.
            a, b = optimization_barrier((a, b))
            out = out + a @ b
        return out

    run = jax.jit(products)
    jax.block_until_ready(run(a, b))  # compiles

    def call():
        jax.block_until_ready(run(a, b))

    calls = units_for(timed(call), seconds, 1, 10_000)
    times = repetitions(lambda: [call() for _ in range(calls)], reps)
    flops = 2.0 * m * k * n * GEMM_REPEATS * calls
    return {"tflops": flops / statistics.median(times) / 1e12, "reps_s": times}


# ----------------------------------------------------------------------------- plan


def make_plan(args) -> list[dict]:
    """Cases in priority order: the targets' cases first, then the rest of the product."""
    big = max(args.batch_sizes)
    wide = sorted(g for g in args.genes if g >= 20_000) or [max(args.genes)]
    key = wide[0]
    bf16, f32 = "mixed_bfloat16", "float32"
    precisions = [p for p in (bf16, f32) if p in args.precisions] + [
        p for p in args.precisions if p not in (bf16, f32)
    ]
    methods = [m for m in METHODS if m in args.methods]
    plan, seen = [], set()

    def pretrain(method, genes, batch, precision, source, drivers=("fit",)):
        case = ("pretrain", method, genes, batch, precision, source)
        if (
            case in seen
            or method not in methods
            or precision not in precisions
            or source not in args.inputs
        ):
            return
        seen.add(case)
        plan.append(
            dict(
                kind="pretrain",
                method=method,
                genes=genes,
                batch=batch,
                precision=precision,
                input=source,
                drivers=list(drivers),
            )
        )

    def epoch(name, rows):
        plan.append(
            dict(
                kind="epoch",
                name=name,
                rows=rows,
                genes=args.epoch_genes,
                batch=args.epoch_batch,
                method=args.epoch_method,
                precision=args.epoch_precision,
            )
        )

    pretrain("scarf", key, big, bf16, "device", ("fit", "fit/batch", "scan"))
    pretrain("scarf", key, big, f32, "device", ("fit", "scan"))
    pretrain("scarf", key, big, bf16, "stream")
    if args.tcga_rows:
        epoch("tcga", args.tcga_rows)
    if args.archs4_rows:
        epoch("archs4", args.archs4_rows[0])
    for genes in wide:
        for method in methods:
            # `scan` (the device's rate without `fit`'s host work) where steps are
            # shortest, so that host work would show: SCARF's.
            drivers = ("fit", "scan") if method == "scarf" else ("fit",)
            for precision in (bf16, f32):
                pretrain(method, genes, big, precision, "device", drivers)
    for rows in args.archs4_rows[1:]:
        epoch("archs4", rows)
    if args.plan == "full":
        for source in ("device", "stream"):
            for batch in sorted(args.batch_sizes, reverse=True):
                for genes in args.genes:
                    for method in methods:
                        for precision in precisions:
                            pretrain(method, genes, batch, precision, source)
    return plan


# -------------------------------------------------------------------------- report


def gemm_key(m, k, n, dtype) -> str:
    return f"{m}x{k}x{n} {dtype}"


def targets(results: dict) -> list[dict]:
    """The targets of the module docstring, against what this run measured."""
    rows = [r for r in results["pretrain"] if r.get("status") == "ok"]
    out = []
    for r in rows:
        if (r["method"], r["genes"], r["batch"], r["precision"], r["input"]) == (
            "scarf",
            20_000,
            2048,
            "mixed_bfloat16",
            "device",
        ):
            out.append(
                dict(
                    target="SCARF 20k genes, batch 2048, bf16, device: samples/s",
                    wanted=f">= {SCARF_TARGET:,}",
                    value=round(r["samples_per_s"]),
                    met=r["samples_per_s"] >= SCARF_TARGET,
                )
            )
    for ratio in speedups(rows):
        if (
            ratio["input"] == "device"
            and ratio["genes"] >= 20_000
            and ratio["batch"] >= 2048
        ):
            out.append(
                dict(
                    target=f"{ratio['method']} {ratio['genes']:,} genes, batch "
                    f"{ratio['batch']}: bf16 / float32 samples/s",
                    wanted=f">= {BF16_SPEEDUP_TARGET}",
                    value=round(ratio["bf16_over_float32"], 3),
                    met=ratio["bf16_over_float32"] >= BF16_SPEEDUP_TARGET,
                )
            )
    epochs = [e for e in results["epochs"] if e.get("status") == "ok"]
    archs4 = [e for e in epochs if e["name"] == "archs4"]
    if archs4:
        best = max(archs4, key=lambda e: e["rows"])  # the least extrapolated
        how = "measured" if best["rows"] >= PROJECT_ROWS else f"from {best['rows']:,}"
        out.append(
            dict(
                target=f"ARCHS4-sized epoch, {PROJECT_ROWS:,} x {best['genes']:,} "
                f"({how}): seconds",
                wanted=f"< {EPOCH_TARGET_S}",
                value=round(best["projected_700k_s"], 3),
                met=best["projected_700k_s"] < EPOCH_TARGET_S,
            )
        )
    return out


def speedups(rows) -> list[dict]:
    """bf16 / float32 samples/s for each case measured in both precisions."""
    by_case = {
        (r["method"], r["genes"], r["batch"], r["input"], r["precision"]): r
        for r in rows
    }
    out = []
    for (method, genes, batch, source, precision), r in by_case.items():
        reference = by_case.get((method, genes, batch, source, "float32"))
        if precision == "mixed_bfloat16" and reference is not None:
            out.append(
                dict(
                    method=method,
                    genes=genes,
                    batch=batch,
                    input=source,
                    bf16_over_float32=r["samples_per_s"] / reference["samples_per_s"],
                )
            )
    return out


def _num(value, digits=0) -> str:
    if value is None:
        return "--"
    return f"{value:,.{digits}f}"


def markdown(results: dict) -> str:
    """The run as Markdown tables."""
    meta = results["meta"]
    lines = [
        "# GPU and scale (JAX backend)",
        "",
        f"{meta['devices']}; jax {meta['jax']}, keras {meta['keras']}, numpy "
        f"{meta['numpy']}, Python {meta['python']}; float32 matmul precision "
        f"{meta['matmul_precision']}; {meta['elapsed_s']:.0f} s"
        + (" (tiny smoke run: not performance)" if meta["tiny"] else ""),
        "",
        "## Targets",
        "",
        "| target | wanted | this run | met |",
        "|---|---|---:|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['target']} | {t['wanted']} | {t['value']:,} | "
            f"{'yes' if t['met'] else '**no**'} |"
        )
    lines += [
        "",
        "## Pre-training samples/s (`fit`, median of repetitions)",
        "",
        "| method | genes | batch | precision | input | samples/s | step ms | "
        "fit/batch | scan | fit/scan | FLOPs/sample | fraction of bound | loss |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["pretrain"]:
        if r.get("status") != "ok":
            continue
        lines.append(
            f"| {r['method']} | {r['genes']:,} | {r['batch']} | {r['precision']} | "
            f"{r['input']} | {_num(r['samples_per_s'])} | {r['step_ms']:.3f} | "
            f"{_num(r.get('fit_per_batch_samples_per_s'))} | "
            f"{_num(r.get('scan_samples_per_s'))} | "
            f"{_num(r.get('fit_over_scan'), 2)} | "
            f"{r['flops_per_sample'] / 1e6:.1f}M | "
            f"{_num(r.get('fraction_of_bound'), 3)} | {r['loss']:.4f} |"
        )
    ok = [r for r in results["pretrain"] if r.get("status") == "ok"]
    lines += [
        "",
        "## bf16 / float32",
        "",
        "| method | genes | batch | input | bf16 / float32 |",
        "|---|---:|---:|---|---:|",
    ]
    for s in speedups(ok):
        lines.append(
            f"| {s['method']} | {s['genes']:,} | {s['batch']} | {s['input']} | "
            f"{s['bf16_over_float32']:.2f} |"
        )
    lines += [
        "",
        "## Device-resident / streaming",
        "",
        "| method | genes | batch | precision | device samples/s | stream samples/s "
        "| device / stream |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    by_case = {
        (r["method"], r["genes"], r["batch"], r["precision"], r["input"]): r for r in ok
    }
    for (method, genes, batch, precision, source), r in by_case.items():
        device = by_case.get((method, genes, batch, precision, "device"))
        if source == "stream" and device is not None:
            lines.append(
                f"| {method} | {genes:,} | {batch} | {precision} | "
                f"{_num(device['samples_per_s'])} | {_num(r['samples_per_s'])} | "
                f"{device['samples_per_s'] / r['samples_per_s']:.2f} |"
            )
    lines += [
        "",
        "## Epochs (split on the device, one `fit` epoch, shuffled)",
        "",
        "| split | rows | genes | batch | method | precision | table GiB | first "
        "epoch s | epoch s | samples/s | 700k x genes, s |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in results["epochs"]:
        if e.get("status") != "ok":
            continue
        lines.append(
            f"| {e['name']} | {e['rows']:,} | {e['genes']:,} | {e['batch']} | "
            f"{e['method']} | {e['precision']} | {e['table_gib']:.2f} | "
            f"{e['compile_s']:.2f} | {e['epoch_s']:.3f} | {_num(e['samples_per_s'])} "
            f"| {e['projected_700k_s']:.3f} |"
        )
    lines += [
        "",
        "## Matmul rate",
        "",
        "| m x k x n | dtype | TFLOP/s |",
        "|---|---|---:|",
    ]
    for g in results["matmul"]:
        if g.get("status") == "ok":
            lines.append(
                f"| {g['m']} x {g['k']} x {g['n']} | {g['dtype']} | {g['tflops']:.1f} |"
            )
    failed = [
        r
        for part in ("pretrain", "epochs", "matmul")
        for r in results[part]
        if r.get("status") != "ok"
    ]
    if failed:
        lines += ["", "## Not measured", ""]
        for r in failed:
            what = {k: r[k] for k in r if k not in ("status", "error", "drivers")}
            reason = r.get("error", "").splitlines()[0][:200] if r.get("error") else ""
            lines.append(f"- {r['status']}: {what} {reason}".rstrip())
    return "\n".join(lines) + "\n"


def write(results: dict, out: str) -> None:
    """Writes `gpu_scale.json` and `gpu_scale.md` into `out`, each atomically."""
    results["targets"] = targets(results)
    for name, text in (
        ("gpu_scale.json", json.dumps(results, indent=1)),
        ("gpu_scale.md", markdown(results)),
    ):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and Markdown")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a CPU smoke run: 200 genes, batch 64, a 1 x 32 encoder, small splits, "
        "--plan priority",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--genes", type=int, nargs="+", default=[5000, 20000, 57000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2048, 256])
    parser.add_argument("--precisions", default="mixed_bfloat16,float32")
    parser.add_argument("--inputs", default="device,stream")
    parser.add_argument("--plan", choices=("priority", "full"), default="full")
    parser.add_argument("--seconds", type=float, default=0.5, help="per repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=470.0, help="whole run, s")
    parser.add_argument("--case-limit", type=float, default=90.0, help="one case, s")
    parser.add_argument(
        "--min-case", type=float, default=15.0, help="start no case with less left, s"
    )
    parser.add_argument("--tcga-rows", type=int, default=7291)
    parser.add_argument(
        "--archs4-rows", type=int, nargs="*", default=[200_000, 700_000]
    )
    parser.add_argument("--epoch-genes", type=int, default=20_000)
    parser.add_argument("--epoch-batch", type=int, default=2048)
    parser.add_argument("--epoch-method", default="scarf", choices=METHODS)
    parser.add_argument("--epoch-precision", default="mixed_bfloat16")
    parser.add_argument("--scan-steps", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4, help="encoder blocks")
    parser.add_argument("--width", type=int, default=256, help="encoder width")
    parser.add_argument("--square", type=int, default=8192, help="square GEMM size")
    parser.add_argument(
        "--table-gib", type=float, default=4.0, help="device table of throughput cases"
    )
    parser.add_argument(
        "--stream-gib", type=float, default=3.0, help="host array of streaming cases"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.genes, args.batch_sizes = [200], [64]
        args.tcga_rows, args.archs4_rows = 729, [4096]
        args.epoch_genes, args.epoch_batch = 200, 64
        args.seconds, args.reps, args.scan_steps = 0.05, 2, 2
        args.square, args.plan = 256, "priority"
        # XLA's compilation, not the steps, is what a CPU smoke run waits for.
        args.layers, args.width = 1, 32
        args.min_case = 0.0
    args.methods = [m for m in args.methods.split(",") if m]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.inputs = [s for s in args.inputs.split(",") if s]
    for name, values, allowed in (
        ("--methods", args.methods, METHODS),
        ("--precisions", args.precisions, tuple(GEMM_DTYPES)),
        ("--inputs", args.inputs, ("device", "stream")),
        ("--epoch-precision", [args.epoch_precision], tuple(GEMM_DTYPES)),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            parser.error(
                f"{name}: {unknown or 'none'}; choose from {', '.join(allowed)}"
            )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.budget
    devices = jax.devices()
    results = {
        "meta": {
            "jax": jax.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "backend": keras.backend.backend(),
            "devices": ", ".join(sorted({d.device_kind for d in devices}))
            + f" x {len(devices)}",
            "platform": devices[0].platform,
            "matmul_precision": jax.config.jax_default_matmul_precision or "default",
            "tiny": args.tiny,
            "args": {k: v for k, v in vars(args).items()},
            "elapsed_s": 0.0,
        },
        "matmul": [],
        "pretrain": [],
        "epochs": [],
        "targets": [],
    }
    gemms = {}

    def run_case(record: dict, measure) -> None:
        """Runs one case under the budget; records its outcome, whatever it is."""
        left = deadline - time.monotonic()
        if left < args.min_case:
            record.update(status="skipped", error="the run's time budget was spent")
        else:
            start = time.monotonic()
            try:
                with time_limit(min(args.case_limit, left)):
                    record.update(measure())
                record["status"] = "ok"
            except Exception as error:  # noqa: BLE001 -- any failure is a result
                message = f"{type(error).__name__}: {error}".strip()
                record.update(status="error", error=message[:1000])
                traceback.print_exc()
            # Out of the handler, whose traceback kept the failed case's arrays alive.
            release()
            record["wall_s"] = time.monotonic() - start
        results["meta"]["elapsed_s"] = time.monotonic() - started
        results["meta"]["tensorflow_imported"] = "tensorflow" in sys.modules
        write(results, args.out)
        shown = {k: record[k] for k in record if k not in ("reps_s", "drivers")}
        print(json.dumps(shown, default=str), flush=True)

    def gemm(m, k, n, dtype) -> dict:
        key = gemm_key(m, k, n, dtype)
        if key not in gemms:
            record = dict(kind="matmul", m=m, k=k, n=n, dtype=dtype)
            results["matmul"].append(record)
            run_case(
                record,
                lambda: measure_gemm(
                    m, k, n, dtype, seconds=args.seconds, reps=args.reps
                ),
            )
            gemms[key] = record
        return gemms[key]

    def pretraining_case(case: dict, bound: dict) -> dict:
        """`measure_pretraining` of a planned case, and its fraction of the FLOP bound."""
        record = measure_pretraining(
            case["method"],
            case["genes"],
            case["batch"],
            case["precision"],
            case["input"],
            seconds=args.seconds,
            reps=args.reps,
            table_bytes=int(args.table_gib * 2**30),
            drivers=case["drivers"],
            stream_bytes=int(args.stream_gib * 2**30),
            scan_steps=args.scan_steps,
            layers=args.layers,
            width=args.width,
        )
        if bound.get("status") == "ok":
            limit = bound["tflops"] * 1e12 / record["flops_per_sample"]
            record.update(gemm_tflops=bound["tflops"], bound_samples_per_s=limit)
            record["fraction_of_bound"] = record["samples_per_s"] / limit
            if "scan_samples_per_s" in record:
                record["scan_fraction_of_bound"] = record["scan_samples_per_s"] / limit
        return record

    for precision in args.precisions:
        s = args.square
        gemm(s, s, s, GEMM_DTYPES[precision])
    for case in make_plan(args):
        if case["kind"] == "epoch":
            record = dict(case)
            results["epochs"].append(record)
            run_case(
                record,
                lambda c=case: measure_epoch(
                    c["rows"],
                    c["genes"],
                    c["batch"],
                    c["method"],
                    c["precision"],
                    reps=args.reps,
                    layers=args.layers,
                    width=args.width,
                ),
            )
            continue
        dtype = GEMM_DTYPES[case["precision"]]
        bound = gemm(case["batch"], case["genes"], args.width, dtype)
        record = dict(case)
        results["pretrain"].append(record)
        run_case(record, lambda c=case, b=bound: pretraining_case(c, b))

    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 -- some platforms report nothing
        stats = {}
    results["meta"]["peak_device_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    results["meta"]["elapsed_s"] = time.monotonic() - started
    results["meta"]["tensorflow_imported"] = "tensorflow" in sys.modules
    write(results, args.out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
