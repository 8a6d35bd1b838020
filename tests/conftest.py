"""Shared fixtures: small generated expression data, files and converted datasets."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from keras_ssrl.config import ConversionConfig  # noqa: E402
from keras_ssrl.data.convert import convert  # noqa: E402
from keras_ssrl.data.sources.memory import ArraySource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative: str):
    """Imports a command-line script (e.g. `tfrecords_tools/convert.py`) as a module."""
    path = os.path.join(ROOT, relative)
    name = "script_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_digest(path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative name.

    Hardening tests take it before and after a refused command to show that nothing
    outside the folders the command names was touched.
    """
    import hashlib

    path = str(path)
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            return {".": hashlib.sha256(handle.read()).hexdigest()}
    digest = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as handle:
                digest[os.path.relpath(full, path)] = hashlib.sha256(
                    handle.read()
                ).hexdigest()
    return digest


def small_matrix(n_samples=120, n_genes=24, n_classes=3, seed=0):
    """Counts with a class signal, a constant gene and versioned Ensembl ids."""
    rng = np.random.default_rng(seed)
    labels = np.array([f"class_{i % n_classes}" for i in range(n_samples)])
    rng.shuffle(labels)
    base = rng.gamma(2.0, 20.0, size=n_genes)
    effect = np.ones((n_classes, n_genes))
    for c in range(n_classes):
        effect[c, rng.choice(n_genes, 3, replace=False)] = 6.0
    class_id = np.array([int(lab.split("_")[1]) for lab in labels])
    counts = rng.poisson(base * effect[class_id]).astype(np.float64)
    counts[:, 5] = 7.0  # a gene without variance: dropped and recorded
    genes = [f"ENSG{1000 + g:011d}.{g % 4 + 1}" for g in range(n_genes)]
    samples = [f"S{i:04d}" for i in range(n_samples)]
    return counts, samples, genes, list(labels)


def array_source(counts, samples, genes, labels=None):
    return ArraySource(
        path="memory", sample_ids=samples, genes=genes, labels=labels, values=counts
    )


def write_samples_as_rows(path, counts, samples, genes, labels=None, sep=","):
    frame = pd.DataFrame(counts, columns=genes)
    frame.insert(0, "sample_id", samples)
    if labels is not None:
        frame["cancer_type"] = labels
    if str(path).endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, sep=sep, index=False)
    return path


@pytest.fixture(scope="session")
def matrix():
    return small_matrix()


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, matrix):
    """A converted dataset (float32 records, so values compare exactly)."""
    counts, samples, genes, labels = matrix
    out = tmp_path_factory.mktemp("ds") / "data"
    config = ConversionConfig(record_dtype="float32", shards=4)
    convert(
        array_source(counts, samples, genes, labels),
        str(out),
        config,
        log=lambda _: None,
    )
    return str(out)


def quiet(_):
    pass


def converted_builtin(folder, n_samples: int, n_genes: int, name="synthetic-tcga"):
    """A small built-in dataset converted into `folder/data` (2 shards per split)."""
    from keras_ssrl.data.builtin import builtin_source

    out = str(folder / "data")
    source = builtin_source(name, n_samples=n_samples, n_genes=n_genes)
    convert(source, out, ConversionConfig(shards=2), log=quiet)
    return out


@pytest.fixture(scope="session")
def labelled_dir(tmp_path_factory):
    """synthetic-tcga, 600 samples x 120 genes: 19 classes, ~56 fine-tuning samples."""
    return converted_builtin(tmp_path_factory.mktemp("labelled"), 600, 120)


def tiny_pretrain_config(method: str = "scarf", epochs: int = 1):
    from keras_ssrl.config import config_from_dict

    return config_from_dict(
        {
            "method": method,
            "epochs": epochs,
            "batch_size": 64,
            "encoder": {"layers": 2, "width": 16},
            "scarf": {"projector_hidden": 16, "projector_dim": 16},
            "byol": {"hidden": 32, "projection_dim": 16},
        }
    )


@pytest.fixture(scope="session")
def tiny_scarf_run(labelled_dir, tmp_path_factory):
    """A finished 2 x 16 SCARF pre-training run on `labelled_dir`."""
    from keras_ssrl.training import run_pretraining

    run_dir = str(tmp_path_factory.mktemp("pretrained") / "scarf")
    run_pretraining(tiny_pretrain_config(), labelled_dir, run_dir, verbose=0, log=quiet)
    return run_dir
