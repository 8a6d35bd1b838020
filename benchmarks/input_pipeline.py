"""Input pipeline benchmark: `load_dataset` against in-memory `tf.data`, same run.

Usage:

    python benchmarks/input_pipeline.py                       # 20,000 and 57,000 genes
    python benchmarks/input_pipeline.py --genes 20000 --samples 2048 --seconds 5
    python benchmarks/input_pipeline.py --bounded-memory 50000 --genes 20000

For each gene count it:

1. writes an ARCHS4-layout HDF5 file of `--samples` synthetic count profiles and converts
   it with `tfrecords_tools/convert.py` in a child process, reporting samples/s and the
   child's peak resident memory next to the size of the matrix as float32;
2. measures the parse rate of the three candidate record encodings (raw float32 bytes,
   raw float16 bytes, `float_list`) on the same values;
3. measures examples/s of `load_dataset(..., shuffle=True, repeat=True)` uncached and
   cached, against `tf.data.Dataset.from_tensor_slices(array)` with the same batch size,
   shuffle buffer (2048, the reader's default) and prefetch (the reference), and
   against the examples/s a SCARF-like training step consumes (4 x 256 MLP encoder +
   projector on two views, float32);
4. prints a table of absolute rates and ratios to the reference measured in this run.

`--bounded-memory N` converts an N-sample file (e.g. 50,000 x 20,000) and reports the
child's peak memory against the matrix size, to show the matrix is never held whole.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_counts(n_samples: int, n_genes: int, seed: int = 0) -> np.ndarray:
    """Cheap negative-binomial-like counts: realistic sparsity and range, fast to make."""
    rng = np.random.default_rng(seed)
    gene_mean = np.exp(rng.normal(1.5, 2.0, n_genes)).astype(np.float32)
    library = np.exp(rng.normal(0.0, 0.3, (n_samples, 1))).astype(np.float32)
    return rng.poisson(gene_mean * library).astype(np.int32)


def write_h5(path: str, counts: np.ndarray, block: int = 2048) -> None:
    from keras_ssrl.data.layouts import write_archs4

    n, g = counts.shape
    write_archs4(
        path,
        counts,
        [f"GSM{i:07d}" for i in range(n)],
        [f"ENSG{g_:011d}" for g_ in range(g)],
    )


def write_h5_streaming(path: str, n_samples: int, n_genes: int, block: int = 1000):
    """An ARCHS4 v2-layout file written block by block (for files larger than RAM)."""
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_dataset(
            "data/expression",
            (n_genes, n_samples),
            dtype="int32",
            chunks=(min(n_genes, 2000), 100),
            compression="gzip",
            compression_opts=1,
        )
        for start in range(0, n_samples, block):
            stop = min(start + block, n_samples)
            data[:, start:stop] = synthetic_counts(stop - start, n_genes, start).T
        f["meta/genes/ensembl_gene"] = np.array(
            [f"ENSG{g:011d}".encode() for g in range(n_genes)]
        )
        f["meta/genes/symbol"] = np.array([f"G{g}".encode() for g in range(n_genes)])
        f["meta/samples/geo_accession"] = np.array(
            [f"GSM{i:07d}".encode() for i in range(n_samples)]
        )


# Runs a script and reports its own peak resident memory (VmHWM of the process after
# exec): getrusage's ru_maxrss would include the parent's pages shared at fork time.
_PEAK_WRAPPER = """
import atexit, runpy, sys
def _report():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            sys.stderr.write('PEAK_KB ' + line.split()[1] + '\\n')
atexit.register(_report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def convert_child(h5: str, out: str) -> tuple[float, float]:
    """Runs the converter in a child process: (seconds, its peak RSS in MiB)."""
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEAK_WRAPPER,
            os.path.join(ROOT, "tfrecords_tools", "convert.py"),
            "--input",
            h5,
            "--out",
            out,
            "--overwrite",
            "--shards",
            "8",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seconds = time.perf_counter() - start
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_KB")]
    return seconds, int(peak[-1].split()[1]) / 1024


def rate(ds, seconds: float, batch: int) -> float:
    """Examples/s over `seconds` after a warm-up (the first batches fill buffers)."""
    iterator = iter(ds)
    for _ in range(5):
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += batch
    return count / (time.perf_counter() - start)


def encoding_rates(values: np.ndarray, seconds: float) -> dict[str, float]:
    """Parse rate (examples/s) of each record encoding, batch 256, same values."""
    import tensorflow as tf

    from keras_ssrl.data import schema

    n_genes = values.shape[1]
    rows = values[:512]
    out = {}
    for name in ("float32", "float16"):
        records = [
            schema.serialize_example(f"s{i}", r, 0, name) for i, r in enumerate(rows)
        ]
        ds = (
            tf.data.Dataset.from_tensor_slices(records)
            .repeat()
            .batch(256)
            .map(
                lambda s, name=name: schema.parse_batch(s, n_genes, name)[
                    schema.EXPRESSION
                ]
            )
            .prefetch(4)
        )
        out[f"raw {name} bytes"] = rate(ds, seconds, 256)
    spec = {"x": tf.io.FixedLenFeature([n_genes], tf.float32)}
    records = [
        tf.train.Example(
            features=tf.train.Features(
                feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=r))}
            )
        ).SerializeToString()
        for r in rows
    ]
    ds = (
        tf.data.Dataset.from_tensor_slices(records)
        .repeat()
        .batch(256)
        .map(lambda s: tf.io.parse_example(s, spec)["x"])
        .prefetch(4)
    )
    out["float_list"] = rate(ds, seconds, 256)
    return out


def scarf_like_rate(n_genes: int, seconds: float, batch: int = 256) -> float:
    """Examples/s of a SCARF-like step: 4 x 256 MLP + projector on two views."""
    import keras
    import tensorflow as tf

    def mlp(widths, name):
        layers = [keras.Input((widths[0],))]
        x = layers[0]
        for w in widths[1:]:
            x = keras.layers.Dense(w)(x)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
        return keras.Model(layers[0], x, name=name)

    model = mlp([n_genes, 256, 256, 256, 256, 256, 256], "scarf_like")
    optimizer = keras.optimizers.Adam(1e-4)
    x = tf.random.normal((batch, n_genes))

    @tf.function(jit_compile=False)
    def step(x):
        corrupted = tf.where(
            tf.random.uniform(tf.shape(x)) < 0.3, tf.roll(x, 1, axis=0), x
        )
        with tf.GradientTape() as tape:
            a = tf.math.l2_normalize(model(x, training=True), axis=1)
            b = tf.math.l2_normalize(model(corrupted, training=True), axis=1)
            logits = tf.matmul(a, b, transpose_b=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(tf.range(batch), logits)
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    step(x)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(x).numpy()
        count += batch
    return count / (time.perf_counter() - start)


def bench_genes(n_genes: int, n_samples: int, seconds: float, batch: int) -> dict:
    import tensorflow as tf

    from keras_ssrl.data import Manifest, load_dataset

    result = {"genes": n_genes, "samples": n_samples}
    with tempfile.TemporaryDirectory() as tmp:
        counts = synthetic_counts(n_samples, n_genes)
        h5 = os.path.join(tmp, "matrix.h5")
        write_h5(h5, counts)
        out = os.path.join(tmp, "tfrecords")
        secs, peak = convert_child(h5, out)
        result["convert samples/s"] = n_samples / secs
        result["convert peak MiB"] = peak
        result["matrix float32 MiB"] = counts.nbytes / 2**20
        manifest = Manifest.load(out)
        values = np.log2(counts[:, : manifest.n_genes].astype(np.float32) + 1)
        result.update(
            {f"parse {k}": v for k, v in encoding_rates(values, seconds).items()}
        )
        del counts

        standardized = (values - values.mean(0)) / (values.std(0) + 1e-6)
        pipelines = {
            "in-memory tf.data /s": tf.data.Dataset.from_tensor_slices(standardized)
            .shuffle(4096)
            .repeat()
            .batch(batch)
            .prefetch(tf.data.AUTOTUNE),
            "load_dataset /s": load_dataset(
                out, "pretrain", batch, shuffle=True, repeat=True, with_labels=False
            ),
            "load_dataset cached /s": load_dataset(
                out,
                "pretrain",
                batch,
                shuffle=True,
                repeat=True,
                cache=True,
                with_labels=False,
            ),
        }
        # Fill the cache with one pass before timing.
        for _ in pipelines["load_dataset cached /s"].take(
            manifest.num_records("pretrain") // batch + 1
        ):
            pass
        # Alternate the pipelines over rounds and keep the median: large batches make
        # rates sensitive to the allocator's state, which drifts during a run.
        rounds = {name: [] for name in pipelines}
        for _ in range(3):
            for name, ds in pipelines.items():
                rounds[name].append(rate(ds, seconds / 3, batch))
        result.update({name: float(np.median(r)) for name, r in rounds.items()})
        result["SCARF-like step /s"] = scarf_like_rate(manifest.n_genes, seconds, batch)
    result["uncached / SCARF-like"] = (
        result["load_dataset /s"] / result["SCARF-like step /s"]
    )
    result["cached / in-memory"] = (
        result["load_dataset cached /s"] / result["in-memory tf.data /s"]
    )
    result["uncached / in-memory"] = (
        result["load_dataset /s"] / result["in-memory tf.data /s"]
    )
    return result


def bounded_memory(n_samples: int, n_genes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        h5 = os.path.join(tmp, "big.h5")
        start = time.perf_counter()
        write_h5_streaming(h5, n_samples, n_genes)
        print(
            f"wrote {n_samples} x {n_genes} ARCHS4-layout file in "
            f"{time.perf_counter() - start:.0f} s "
            f"({os.path.getsize(h5) / 2**30:.2f} GiB on disk)"
        )
        secs, peak = convert_child(h5, os.path.join(tmp, "out"))
        matrix = n_samples * n_genes * 4 / 2**20
        print(
            f"converted in {secs:.0f} s ({n_samples / secs:.0f} samples/s); peak RSS "
            f"{peak:.0f} MiB vs {matrix:.0f} MiB for the matrix as float32 "
            f"({peak / matrix:.2f}x)"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, nargs="+", default=[20000, 57000])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="timing window per measurement"
    )
    parser.add_argument(
        "--bounded-memory",
        type=int,
        metavar="N",
        help="convert an N-sample file and report peak memory",
    )
    args = parser.parse_args(argv)
    if args.bounded_memory:
        for genes in args.genes:
            bounded_memory(args.bounded_memory, genes)
        return 0
    print(f"cores: {os.cpu_count()}, batch {args.batch_size}, samples {args.samples}")
    rows = [
        bench_genes(g, args.samples, args.seconds, args.batch_size) for g in args.genes
    ]
    keys = list(rows[0])
    print(f"\n{'':<28}" + "".join(f"{r['genes']:>14,}" for r in rows))
    for key in keys[1:]:
        cells = "".join(
            f"{r[key]:>14.2f}" if "/ " in key else f"{r[key]:>14,.0f}" for r in rows
        )
        print(f"{key:<28}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
