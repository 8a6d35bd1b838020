"""Figure 4 (bottom): covariance spectra of pre-trained encoders, and their tables.

The label-free metrics (effective rank, collapsed dimensions, embedding std) live in
`keras_ssrl.metrics`, below training, which logs them during pre-training; this module
embeds a dataset's `pretrain_val` split with finished encoders and writes what they
measure (docs/protocol.md, "Dimensional collapse").
"""

from __future__ import annotations

import os

import numpy as np

from keras_ssrl.data.manifest import Manifest
from keras_ssrl.evaluation.experiments import ProtocolError
from keras_ssrl.evaluation.results import check_writable_folder, evaluation_lock
from keras_ssrl.files import write_csv_atomic
from keras_ssrl.runs import ENCODER_FILE, load_run_config

RANDOM_INIT = "random-init"  # the reference encoder, randomly initialised


def finished_runs(folder: str) -> list[tuple[str, str]]:
    """(name, RUN_DIR) of the finished pre-training runs under `folder` (any depth)."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs.sort()
        if ENCODER_FILE in files:
            found.append((os.path.basename(here), here))
            dirs[:] = []  # a run's own sub-folders hold no other runs
    return found


def runs_with_found(runs: dict[str, str], folder: str | None) -> dict[str, str]:
    """`runs` and the finished runs under `folder` (`--from`), named runs first."""
    runs = dict(runs)
    if folder:
        if not os.path.isdir(folder):
            raise ProtocolError(f"--from {folder}: no such folder")
        runs.update(
            (name, path) for name, path in finished_runs(folder) if name not in runs
        )
    return runs


def _load_encoders(runs: dict[str, str]) -> dict:
    """name -> the encoder of each finished pre-training run; an error naming one."""
    import keras

    encoders = {}
    for name, run_dir in runs.items():
        path = os.path.join(run_dir, ENCODER_FILE)
        if not os.path.exists(path):
            raise ProtocolError(
                f"{run_dir}: no {ENCODER_FILE}; not a finished pre-training run"
            )
        try:
            encoders[name] = keras.saving.load_model(path, compile=False)
        except Exception as error:  # noqa: BLE001 - Keras raises many kinds
            raise ProtocolError(
                f"{path}: cannot be loaded ({type(error).__name__}); resume or redo "
                "the pre-training run"
            ) from None
    return encoders


def _layers_width(encoder) -> tuple[int, int]:
    """(dense layers, output width) of an MLP encoder."""
    import keras

    layers = sum(isinstance(lay, keras.layers.Dense) for lay in encoder.layers)
    return layers, encoder.output_shape[-1]


def _random_encoder(like):
    """A randomly initialised encoder of `like`'s architecture (seed 0)."""
    import keras

    from keras_ssrl.encoders import build_encoder

    keras.utils.set_random_seed(0)
    layers, width = _layers_width(like)
    return build_encoder(like.input_shape[-1], layers=layers, width=width)


def spectrum_title(encoders: dict, setting: str) -> str:
    """The figure's title: the setting, the architectures and one run per curve."""
    archs = sorted({"{}x{}".format(*_layers_width(e)) for e in encoders.values()})
    kind = "encoder" if len(archs) == 1 else "encoders"
    return f"{setting}, {kind} {', '.join(archs)}, 1 run each"


def _data_of(runs: dict[str, str], data_dir: str | None) -> str:
    """The dataset to embed: `data_dir`, else the one the first run recorded."""
    if data_dir is not None:
        return data_dir
    config = load_run_config(next(iter(runs.values()))) or {}
    data_dir = config.get("data", {}).get("dir")
    if data_dir is None:
        raise ProtocolError("pass --data: the runs do not record their dataset")
    return data_dir


def run_collapse(
    runs: dict[str, str],
    data_dir: str | None,
    out_dir: str,
    random_baseline: bool = True,
    log=print,
    setting: str | None = None,
) -> list[str]:
    """Figure 4 (bottom): covariance spectra of encoders on the pre-training validation set.

    Args:
        runs: name -> pre-training RUN_DIR.
        data_dir: the dataset whose `pretrain_val` split is embedded (None: the first
            run's dataset).
        out_dir: receives `collapse.csv` (effective rank, collapsed dimensions, embedding
            std per run), `spectrum.csv` (every singular value) and `collapse.png`.
        random_baseline: also embed with a randomly initialised encoder of the first
            run's architecture (the reference without pre-training).
        setting: what the figure's title calls the data (None: the dataset folder's
            name).

    Everything is checked before `out_dir` is created.
    """
    from keras_ssrl.data import schema
    from keras_ssrl.data.reader import load_dataset

    if not runs:
        raise ProtocolError("collapse needs at least one pre-training run (--runs)")
    check_writable_folder(out_dir)
    encoders = _load_encoders(runs)
    data_dir = _data_of(runs, data_dir)
    n_genes = Manifest.load(data_dir).n_genes
    for name, encoder in encoders.items():
        if encoder.input_shape[-1] != n_genes:
            raise ProtocolError(
                f"{name}: the encoder takes {encoder.input_shape[-1]} genes, "
                f"{data_dir} has {n_genes}"
            )
    if random_baseline:
        encoders[RANDOM_INIT] = _random_encoder(next(iter(encoders.values())))
    xs = list(load_dataset(data_dir, schema.PRETRAIN_VAL, 1024, with_labels=False))
    title = spectrum_title(encoders, setting or os.path.basename(data_dir.rstrip("/")))
    with evaluation_lock(out_dir):
        return _write_collapse(encoders, xs, out_dir, log, title)


def _write_collapse(
    encoders: dict, xs: list, out_dir: str, log, title: str
) -> list[str]:
    import pandas as pd

    from keras_ssrl.evaluation import plots
    from keras_ssrl.metrics import (
        COLLAPSE_THRESHOLD,
        collapse_metrics,
        covariance_spectrum,
    )

    rows, spectra, long_rows = [], {}, []
    for name, encoder in encoders.items():
        z = np.concatenate([encoder(x, training=False).numpy() for x in xs])
        values = covariance_spectrum(z)
        spectra[name] = values
        rows.append({"run": name, "samples": len(z), "dimensions": z.shape[1],
                     **collapse_metrics(z)})  # fmt: skip
        long_rows += [{"run": name, "rank": i + 1, "singular_value": v}
                      for i, v in enumerate(values)]  # fmt: skip
        log(f"{name}: effective rank {rows[-1]['effective_rank']:.1f}, collapsed "
            f"dimensions {int(rows[-1]['collapsed_dims'])}")  # fmt: skip
    table = os.path.join(out_dir, "collapse.csv")
    write_csv_atomic(pd.DataFrame(rows), table)
    values = os.path.join(out_dir, "spectrum.csv")
    write_csv_atomic(pd.DataFrame(long_rows), values)
    figure = os.path.join(out_dir, "collapse.png")
    plots.spectrum(spectra, figure, title=title, reference=RANDOM_INIT,
                   threshold=COLLAPSE_THRESHOLD)  # fmt: skip
    for path in (table, values, figure):
        log(f"wrote {path}")
    return [table, values, figure]
