"""Write the built-in synthetic data in the layouts users download, to try the converter.

Usage:

    python scripts/make_example_files.py --out examples/
    python scripts/make_example_files.py --source synthetic-archs4 --formats archs4 \
        --n-samples 2000 --out examples/

Writes, for the chosen source, a samples-as-rows CSV with a label column, a Parquet
file, a UCSC Xena genes x samples matrix with a phenotype file, a GDC STAR-count folder
with its sample sheet, and an ARCHS4 v2 HDF5 file with sample metadata; then prints the
`tfrecords_tools/convert.py` command for each. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

from keras_ssrl.cli import add_console_flags, run_main, setup_logging
from keras_ssrl.data import layouts
from keras_ssrl.data.builtin import BUILTIN
from keras_ssrl.data.synthetic import SyntheticExpression, make_synthetic

TOOL = "python tfrecords_tools/convert.py"


def _write_table(data: SyntheticExpression, stem: str, ext: str) -> str:
    """A samples-as-rows table with a `tissue` label column; returns its command."""
    path = layouts.write_table(
        f"{stem}.{ext}",
        data.counts,
        data.sample_ids,
        data.genes,
        labels=data.labels,
        label_column="tissue",
    )
    return f"{TOOL} --input {path} --label-column tissue --out {stem}_{ext}"


def write_csv(data: SyntheticExpression, stem: str, seed: int) -> str:
    """A samples-as-rows CSV with a `tissue` label column; returns its command."""
    return _write_table(data, stem, "csv")


def write_parquet(data: SyntheticExpression, stem: str, seed: int) -> str:
    """The same table as Parquet (the authors' format)."""
    return _write_table(data, stem, "parquet")


def write_xena(data: SyntheticExpression, stem: str, seed: int) -> str:
    """A UCSC Xena log2(x + 1) genes x samples matrix and its phenotype file."""
    path = layouts.write_xena(
        f"{stem}_xena.tsv.gz", np.log2(data.counts + 1.0), data.sample_ids, data.genes
    )
    pheno = f"{stem}_phenotype.tsv"
    pd.DataFrame({"sample": data.sample_ids, "_primary_disease": data.labels}).to_csv(
        pheno, sep="\t", index=False
    )
    return (
        f"{TOOL} --input {path} --format xena --values log2 --labels {pheno} "
        f"--label-column _primary_disease --out {stem}_from_xena"
    )


def write_gdc(data: SyntheticExpression, stem: str, seed: int) -> str:
    """A GDC STAR-count folder with its sample sheet."""
    folder = f"{stem}_gdc"
    layouts.write_gdc(
        folder,
        data.counts,
        data.sample_ids,
        data.genes,
        data.labels,
        symbols=data.symbols,
        seed=seed,
    )
    return f"{TOOL} --input {folder} --out {stem}_from_gdc"


def write_archs4(data: SyntheticExpression, stem: str, seed: int) -> str:
    """An ARCHS4 v2 HDF5 file whose `source_name_ch1` names the tissue."""
    path = layouts.write_archs4(
        f"{stem}.h5",
        data.counts,
        data.sample_ids,
        data.genes,
        symbols=data.symbols,
        sample_meta={"source_name_ch1": [f"{lab} tissue" for lab in data.labels]},
    )
    return f"{TOOL} --input {path} --label-column source_name_ch1 --out {stem}_from_h5"


WRITERS = {
    "csv": write_csv,
    "parquet": write_parquet,
    "xena": write_xena,
    "gdc": write_gdc,
    "archs4": write_archs4,
}
FORMATS = tuple(WRITERS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--source",
        choices=BUILTIN,
        default="synthetic-tcga",
        help="which built-in data to write (default: %(default)s)",
    )
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help="comma-separated subset of the layouts (default: %(default)s)",
    )
    p.add_argument(
        "--n-samples",
        type=int,
        default=600,
        help="samples to draw, at least 5 per class (default: %(default)s)",
    )
    p.add_argument(
        "--n-genes",
        type=int,
        default=None,
        help="genes; when not given, the built-in data's own gene list, so that a "
        "model trained on the built-in data accepts the files",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="draws the samples; the genes do not depend on it (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="folder to write the files into")
    return add_console_flags(p)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    log = setup_logging(args)
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        p.error(f"unknown format(s) {unknown}; choose from {FORMATS}")
    try:
        data = make_synthetic(
            args.source, n_samples=args.n_samples, n_genes=args.n_genes, seed=args.seed
        )
    except ValueError as error:  # sizes out of range: a usage error, not a crash
        p.error(
            str(error)
            .replace("n_samples", "--n-samples")
            .replace("n_genes", "--n-genes")
        )
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.source.replace("-", "_"))
    commands = [
        WRITERS[name](data, stem, args.seed) for name in FORMATS if name in formats
    ]
    log.info(
        f"wrote {len(commands)} file(s) of {args.source} "
        f"({data.counts.shape[0]} samples x {data.counts.shape[1]} genes). Convert with:"
    )
    for command in commands:
        log.info(f"  {command}")
    return 0


if __name__ == "__main__":
    run_main(main)
