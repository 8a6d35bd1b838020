"""Serving latency and throughput: the exported signature vs the Keras model.

Usage:

    python benchmarks/serving.py                         # 20k and 57k genes, ~2 min
    python benchmarks/serving.py --genes 5000 --seconds 1 --rounds 1

For each gene count it builds a classifier as fine-tuning does (the protocol's 4 x 256
MLP encoder, a Dense head of 33 classes, random weights and BatchNorm statistics),
exports it with `keras_ssrl.serving.build_archive` (the same graph as
`export/export_model.py`: log2(x + 1), standardisation and input checks inside), loads it
back with `tf.saved_model.load` and times, in the same process and in alternating rounds
(the median round is kept):

- the `serving_default` signature on **raw** counts (preprocessing included; outputs:
  probabilities, class id, class name, embedding);
- `model.predict_on_batch` of the Keras classifier on **standardised** values;
- the direct call `model(x, training=False)` on standardised values;
- `predict_on_batch` on the **same raw counts**, with the preprocessing a Python caller
  of the Keras model has to do first (the converter's NumPy `apply_transform`, then the
  z-score), timed.

The first two Keras rows get their preprocessing for free: that comparison is
conservative for the signature, which transforms, checks (NaN / inf, negative values,
width) and standardises every request in the graph. Latency: p50 / p99 of single-sample
requests; throughput: samples/s at batch 256. Ratios are Keras / signature for latency
and signature / Keras for throughput: above 1 the signature is faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ssrl.data.preprocessing import apply_transform  # noqa: E402
from keras_ssrl.encoders import build_encoder  # noqa: E402
from keras_ssrl.serving import (  # noqa: E402
    CLASSIFIER,
    ServingData,
    build_archive,
    verify_export,
)

N_CLASSES = 33  # TCGA cancer types


def classifier(n_genes: int, seed: int = 0):
    encoder = build_encoder(n_genes, layers=4, width=256)
    inputs = keras.Input((n_genes,), name="expression")
    logits = keras.layers.Dense(N_CLASSES, name="head")(encoder(inputs))
    model = keras.Model(inputs, logits, name="classifier")
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            rng.uniform(0.5, 1.5, w.shape).astype(w.dtype)
            if w.ndim == 1
            else (rng.standard_normal(w.shape) / np.sqrt(w.shape[0])).astype(w.dtype)
            for w in model.get_weights()
        ]
    )
    return model


def serving_data(n_genes: int, seed: int = 0) -> ServingData:
    rng = np.random.default_rng(seed)
    return ServingData(
        genes=[f"ENSG{i:011d}" for i in range(n_genes)],
        transform="log2p1",
        values="counts",
        record_dtype="float16",
        mean=rng.uniform(1.0, 10.0, n_genes).astype(np.float32),
        std=rng.uniform(0.5, 3.0, n_genes).astype(np.float32),
        manifest_sha256="0" * 64,
    )


def timings(fn, seconds: float) -> list[float]:
    """Seconds of each call of `fn` (results fetched) over a window of `seconds`."""
    fn()
    fn()
    out, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(out) < 5:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure(n_genes: int, seconds: float, rounds: int, log) -> dict:
    model = classifier(n_genes)
    data = serving_data(n_genes)
    names = [f"type_{i}" for i in range(N_CLASSES)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "1")
        started = time.perf_counter()
        build_archive(model, CLASSIFIER, data, names).write_out(path, verbose=False)
        report = verify_export(path, model, CLASSIFIER, data, names)
        export_s = time.perf_counter() - started
        signature = tf.saved_model.load(path).signatures["serving_default"]

    rng = np.random.default_rng(1)
    raw = {b: rng.poisson(60.0, (b, n_genes)).astype(np.float32) for b in (1, 256)}
    std = {
        b: ((np.log2(x + 1) - data.mean) / data.std).astype(np.float32)
        for b, x in raw.items()
    }
    raw_t = {b: tf.constant(x) for b, x in raw.items()}
    std_t = {b: tf.constant(x) for b, x in std.items()}

    def served(b):
        return lambda: signature(expression=raw_t[b])["probabilities"].numpy()

    def predict_on_batch(b):
        return lambda: np.asarray(model.predict_on_batch(std[b]))

    def direct(b):
        return lambda: np.asarray(model(std_t[b], training=False))

    inv_std = np.float32(1.0) / data.std

    def numpy_then_keras(b):
        def run():
            x = (apply_transform(raw[b], "log2p1") - data.mean) * inv_std
            return np.asarray(model.predict_on_batch(x))

        return run

    ways = {
        "signature": served,
        "predict_on_batch": predict_on_batch,
        "direct_call": direct,
        "numpy_predict_on_batch": numpy_then_keras,
    }
    per_round = {name: {"p50": [], "p99": [], "throughput": []} for name in ways}
    for r in range(rounds):
        for name, make in ways.items():
            lat = np.array(timings(make(1), seconds)) * 1e3
            per_round[name]["p50"].append(float(np.percentile(lat, 50)))
            per_round[name]["p99"].append(float(np.percentile(lat, 99)))
            big = timings(make(256), seconds)
            per_round[name]["throughput"].append(256 * len(big) / sum(big))
        log(f"  {n_genes} genes: round {r + 1}/{rounds} done")
    result = {
        name: {k: statistics.median(v) for k, v in values.items()}
        for name, values in per_round.items()
    }
    result["export_seconds"] = export_s
    result["max_abs_difference"] = max(report["max_abs_difference"].values())
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--genes", default="20000,57000", help="comma-separated gene counts")
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement window")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    args = p.parse_args(argv)
    genes = [int(g) for g in args.genes.split(",")]
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, "
        f"GPUs: {len(tf.config.list_physical_devices('GPU'))}"
    )
    results = {}
    for n in genes:
        results[n] = measure(n, args.seconds, args.rounds, print)
    header = "| | " + " | ".join(f"{n:,} genes" for n in genes) + " |"
    print("\n" + header)
    print("|---|" + "---:|" * len(genes))

    def row(label, fn):
        print(f"| {label} | " + " | ".join(fn(results[n]) for n in genes) + " |")

    labels = {
        "signature": "signature, raw counts in",
        "predict_on_batch": "Keras `predict_on_batch`, standardised in",
        "direct_call": "Keras direct call, standardised in",
        "numpy_predict_on_batch": "NumPy preprocessing + `predict_on_batch`, raw in",
    }
    for name, label in labels.items():
        row(f"{label}: batch 1 p50 / p99, ms", lambda r, k=name: (
            f"{r[k]['p50']:.2f} / {r[k]['p99']:.2f}"
        ))  # fmt: skip
    for name, label in labels.items():
        row(f"{label}: batch 256, samples/s", lambda r, k=name: (
            f"{r[k]['throughput']:,.0f}"
        ))  # fmt: skip
    for ref in ("predict_on_batch", "direct_call", "numpy_predict_on_batch"):
        row(f"**{ref} / signature, p50 latency** (target >= 1)", lambda r, k=ref: (
            f"**{r[k]['p50'] / r['signature']['p50']:.2f}**"
        ))  # fmt: skip
        row(f"**signature / {ref}, throughput** (target >= 1)", lambda r, k=ref: (
            f"**{r['signature']['throughput'] / r[k]['throughput']:.2f}**"
        ))  # fmt: skip
    row("export + verification, s", lambda r: f"{r['export_seconds']:.1f}")
    row("largest |signature - Keras| on the probe", lambda r: (
        f"{r['max_abs_difference']:.1e}"
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
