"""The built-in datasets: synthetic data converted once into a cache folder.

No data is downloaded at run time. `synthetic-tcga` and `synthetic-archs4` are generated
by `keras_ssrl.data.synthetic` and converted with the same pipeline as user files; the
result is cached under `$KERAS_SSRL_CACHE` (default `~/.cache/keras_ssrl`) and reused by
`scripts/pretrain.py` and the evaluation scripts.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from keras_ssrl.config import ConversionConfig
from keras_ssrl.data.errors import DataError
from keras_ssrl.data.manifest import MANIFEST, Manifest
from keras_ssrl.data.sources.memory import ArraySource

BUILTIN = ("synthetic-tcga", "synthetic-archs4")


def cache_root() -> str:
    return os.environ.get(
        "KERAS_SSRL_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "keras_ssrl"),
    )


def builtin_source(
    name: str,
    n_samples: int | None = None,
    n_genes: int | None = None,
    seed: int = 0,
) -> ArraySource:
    """The built-in synthetic data as a source for `convert`."""
    from keras_ssrl.data.synthetic import make_synthetic

    if name not in BUILTIN:
        raise DataError(f"unknown built-in dataset {name!r}; choose one of {BUILTIN}")
    try:
        data = make_synthetic(name, n_samples=n_samples, n_genes=n_genes, seed=seed)
    except ValueError as error:  # sizes or seed out of range: the message names them
        raise DataError(f"--builtin {name}: {error}") from None
    return ArraySource(
        path=f"builtin:{name}",
        sample_ids=list(data.sample_ids),
        genes=list(data.genes),
        labels=list(data.labels),
        info={"format": "builtin", "generator": name, "seed": seed},
        values=data.counts,
    )


def ensure_builtin(
    name: str,
    seed: int = 0,
    root: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Returns the folder of a converted built-in dataset, converting it on first use."""
    from keras_ssrl.data.convert import convert

    folder = os.path.join(root or cache_root(), f"{name}-seed{seed}")
    if os.path.exists(os.path.join(folder, MANIFEST)):
        Manifest.load(folder)
        return folder
    log(f"converting built-in {name} into {folder} (once)")
    config = ConversionConfig()
    config.split.seed = seed
    convert(
        builtin_source(name, seed=seed),
        folder,
        config,
        command=["builtin", name, f"seed={seed}"],
        log=log,
        overwrite=True,
    )
    return folder
