"""Fine-tuning sweep throughput: runs per minute and the projected paper grid.

Usage:

    python benchmarks/finetune_sweep.py                 # built-in synthetic-tcga
    python benchmarks/finetune_sweep.py --data data/tcga --repeats 2

Measures, on one process, the wall time of single fine-tuning runs at each label
fraction p of the quick grid, for the three kinds of run the protocol has:

- `unfrozen`: encoder + head trained (the baseline and the pre-trained methods);
- `frozen`: head only, on embeddings computed once per encoder;
- `logreg`: scikit-learn logistic regression.

It reports runs per minute of the quick preset of `scripts/evaluate.py label-efficiency`
(4 networks x 2 modes: baseline, SCARF, VIME and BYOL, frozen and unfrozen, plus logistic
regression; 7 fractions x 3 repeats), and projects the wall time of the paper's full grid
(99 fractions x 5 repeats per setting) by interpolating the measured time per run over p.
With `--jobs-compare`, it also times the same runs as 2 single-threaded processes against
1 process with 2 threads, in the same run (a ratio).

Early stopping makes the time of a run depend on the data; frozen runs use a randomly
initialised encoder as a stand-in for a pre-trained one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from keras_ssrl.config import (  # noqa: E402
    FULL_FRACTIONS,
    FULL_REPEATS,
    QUICK_FRACTIONS,
    QUICK_REPEATS,
    EncoderConfig,
    FinetuneConfig,
)


def time_runs(data_dir: str, fractions, repeats: int) -> dict[str, np.ndarray]:
    """Seconds per run, (kind -> array over fractions), averaged over repeats."""
    import keras

    from keras_ssrl.encoders import build_encoder
    from keras_ssrl.evaluation.runner import logistic_regression
    from keras_ssrl.finetuning import (
        Finetuner,
        load_finetune_data,
        stratified_subset,
        subset_seed,
    )

    data = load_finetune_data(os.path.abspath(data_dir))
    config, encoder = FinetuneConfig(), EncoderConfig()
    keras.utils.set_random_seed(0)
    stand_in = build_encoder(data.n_genes).get_weights()
    tuners = {
        mode: Finetuner(data.n_genes, len(data.classes), encoder, mode, config)
        for mode in ("unfrozen", "frozen")
    }
    times = {
        kind: np.zeros(len(fractions)) for kind in ("unfrozen", "frozen", "logreg")
    }
    # Warm-up: graph tracing and XLA compilation happen once per sweep, not per run.
    warm = stratified_subset(data.train.y, fractions[0], 0)
    for tuner in tuners.values():
        tuner.run(data, warm, 0, stand_in, encoder_key="stand-in")
    for i, p in enumerate(fractions):
        for repeat in range(repeats):
            seed = subset_seed(0, p, repeat)
            subset = stratified_subset(data.train.y, p, seed)
            for mode, tuner in tuners.items():
                result = tuner.run(data, subset, seed, stand_in, encoder_key="stand-in")
                times[mode][i] += result.seconds / repeats
            started = time.perf_counter()
            logistic_regression(data, subset, seed)
            times["logreg"][i] += (time.perf_counter() - started) / repeats
        print(
            f"  p={p:<5g} n_train={len(subset):>5}  unfrozen {times['unfrozen'][i]:6.1f} s"
            f"  frozen {times['frozen'][i]:5.2f} s  logreg {times['logreg'][i]:5.2f} s",
            flush=True,
        )
    return times


def grid_seconds(times, measured, grid, repeats: int, networks: int = 4) -> float:
    """Wall time of a label-efficiency grid, one process: `networks` unfrozen runs
    (baseline + 3 methods), 3 frozen runs and logistic regression per (p, repeat)."""
    total = 0.0
    for p in grid:
        unfrozen = np.interp(p, measured, times["unfrozen"])
        frozen = np.interp(p, measured, times["frozen"])
        logreg = np.interp(p, measured, times["logreg"])
        total += repeats * (networks * unfrozen + (networks - 1) * frozen + logreg)
    return total


def compare_jobs(data_dir: str, out_root: str) -> None:
    """Same baseline runs: 1 process x 2 threads vs 2 processes x 1 thread."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "evaluate.py")
    common = [sys.executable, script, "label-efficiency", "--data", data_dir,
              "--methods", "baseline", "--fractions", "0.1,0.2", "--repeats", "4"]  # fmt: skip
    walls = {}
    for label, extra in (("1 process x 2 threads", ["--threads", "2"]),
                         ("2 processes x 1 thread", ["--jobs", "2"])):  # fmt: skip
        out = os.path.join(out_root, label.replace(" ", "_"))
        started = time.perf_counter()
        subprocess.run([*common, *extra, "--out", out], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        walls[label] = time.perf_counter() - started
        print(f"  {label}: 8 runs in {walls[label]:.1f} s", flush=True)
    one, two = walls.values()
    print(f"  speed-up of 2 processes: {one / two:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", help="a converted, labelled dataset (default: built-in)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per p")
    parser.add_argument(
        "--jobs-compare",
        action="store_true",
        help="also time 2 processes x 1 thread against 1 process x 2 threads",
    )
    parser.add_argument(
        "--out",
        default=os.path.join("runs", "benchmark-sweep"),
        help="folder of the --jobs-compare sweeps",
    )
    args = parser.parse_args(argv)
    data_dir = args.data
    if data_dir is None:
        from keras_ssrl.data.builtin import ensure_builtin

        data_dir = ensure_builtin("synthetic-tcga")
    print(f"devices: {os.cpu_count()} CPU cores; data {data_dir}")
    fractions = list(QUICK_FRACTIONS)
    times = time_runs(data_dir, fractions, args.repeats)
    quick = grid_seconds(times, fractions, QUICK_FRACTIONS, QUICK_REPEATS)
    full = grid_seconds(times, fractions, FULL_FRACTIONS, FULL_REPEATS)
    runs_quick = len(QUICK_FRACTIONS) * QUICK_REPEATS * 8
    runs_full = len(FULL_FRACTIONS) * FULL_REPEATS * 8
    print(
        f"\nquick preset (4 networks x 2 modes + logreg, {runs_quick} runs): "
        f"{quick / 60:.1f} min, {runs_quick / (quick / 60):.1f} runs/min (one process)"
    )
    print(
        f"paper grid per setting ({runs_full} runs): {full / 3600:.1f} h in one process; "
        f"x3 settings: {3 * full / 3600:.1f} h"
    )
    if args.jobs_compare:
        compare_jobs(data_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
