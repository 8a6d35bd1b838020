"""Conversion of an expression source into sharded TFRecords with a manifest.

`convert` runs five named steps, passing small dataclasses of the conversion's state:

1. samples (`_samples`): unique sample ids, the label policies, the split of every
   sample (`keras_ssrl.data.splits`);
2. genes (`_genes`): id normalisation, duplicate merging and the optional alignment to a
   target gene list (`keras_ssrl.data.genes`);
3. statistics pass (`_statistics_pass`): stream the source once, validate every cell
   (numeric, finite, non-negative for counts / TPM) and accumulate per-gene statistics
   of the stored values on the pre-training split only; drop zero-variance genes;
4. write pass (`_write_pass`): stream the source again and write every sample to its
   split's shards, in a shuffled order (blocks in random order, samples permuted within
   a block) so that file order (often sorted by project or tissue) does not reach the
   training batches;
5. manifest (`_manifest`): `manifest.json` and `splits.csv` beside the shards.

Memory is bounded by the block size whatever the number of samples. Every argument is
checked before anything is written, and everything is written into a temporary folder
that is renamed into place at the end (`keras_ssrl.data.output`): a refused or failed
conversion leaves nothing behind, and `overwrite` only ever replaces a dataset the
converter wrote. The protocol behind the defaults: docs/protocol.md, "Splits" and
"Preprocessing".
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from keras_ssrl import __version__
from keras_ssrl.config import ConversionConfig, auto_block_size, to_dict
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.genes import GenePlan, align_genes, plan_genes
from keras_ssrl.data.labels import apply_missing_label_policy
from keras_ssrl.data.manifest import FORMAT_NAME, MANIFEST, SPLITS_CSV, Manifest
from keras_ssrl.data.output import OutputFolder
from keras_ssrl.data.preprocessing import (
    RunningMoments,
    apply_transform,
    resolve_transform,
)
from keras_ssrl.data.shards import ShardWriters
from keras_ssrl.data.sources.base import ExpressionSource
from keras_ssrl.data.splits import assign_splits, small_split_warnings
from keras_ssrl.data.validation import check_block, validate_config
from keras_ssrl.files import write_json_atomic

# Seconds between progress lines of a pass over the source.
_PROGRESS_EVERY = 10


# ------------------------------------------------------------ the conversion's state


@dataclass
class _Run:
    """One conversion's settings, and the report its steps fill in."""

    source: ExpressionSource
    config: ConversionConfig
    transform: str  # the transform applied (`none` for log-scale values)
    block_size: int
    report: dict
    log: Callable[[str], None]
    started: float


@dataclass
class _Samples:
    """Which samples are converted, into which split, with which label."""

    ids: list[str]
    labels: list[str | None] | None  # per source sample, after the label policy
    split_of: np.ndarray  # per source sample: its split, "" when left out
    kept: np.ndarray  # indices of the samples converted
    classes: list[str]  # the label vocabulary, sorted

    def split_sizes(self) -> dict[str, int]:
        """Samples per split, for the splits that receive any, in `schema.SPLITS` order."""
        sizes = {s: int((self.split_of == s).sum()) for s in schema.SPLITS}
        return {s: n for s, n in sizes.items() if n > 0}


@dataclass
class _Genes:
    """How source columns become the stored genes."""

    base: GenePlan  # every gene of the source (ids normalised, duplicates merged)
    plan: GenePlan  # the genes converted (`base` restricted to the alignment target)
    alignment: dict | None  # the alignment report, None without a target

    def stored(self, values: np.ndarray, transform: str, dtype: str) -> np.ndarray:
        """Raw block -> the values a record stores, for the genes of `plan`."""
        # float32 arithmetic: 4x faster than float64 and exact far beyond float16.
        values = values.astype(np.float32, copy=False)
        if np.isnan(values).any():  # only under --missing-values zero|drop-genes
            values = np.nan_to_num(values, nan=0.0)
        mapped = self.plan.apply(values)
        if transform == "cpm_log2p1":
            # Library size over every gene of the sample, not only the kept ones.
            totals = self.base.apply(values).sum(
                axis=1, keepdims=True, dtype=np.float64
            )
            totals[totals == 0] = 1.0
            out = np.log2(mapped * (1e6 / totals).astype(np.float32) + 1.0)
        else:
            out = apply_transform(mapped, transform)
        # Statistics are computed on exactly what the reader will see.
        return out.astype(dtype, copy=False)


@dataclass
class _Statistics:
    """Per-gene statistics of the pre-training split, and the genes kept."""

    moments: RunningMoments
    kept: np.ndarray  # indices into `_Genes.plan.genes` of the genes stored
    dropped: dict[str, list[str]]  # reason -> gene ids


class _Progress:
    """A progress line at most every `_PROGRESS_EVERY` seconds of a pass."""

    def __init__(self, log: Callable[[str], None], verb: str, total: int, phase: str):
        self.log, self.verb, self.total, self.phase = log, verb, total, phase
        self.done, self.last = 0, time.time()

    def advance(self, count: int) -> None:
        self.done += count
        if time.time() - self.last > _PROGRESS_EVERY:
            self.last = time.time()
            self.log(
                f"  {self.verb} {self.done} of {self.total} samples ({self.phase})"
            )


# ------------------------------------------------------------------------ the steps


def convert(
    source: ExpressionSource,
    out_dir: str,
    config: ConversionConfig | None = None,
    *,
    align_to: Sequence[str] | None = None,
    align_name: str = "target",
    extra_report: dict | None = None,
    command: Sequence[str] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | None] = (),
    log: Callable[[str], None] = print,
) -> Manifest:
    """Converts a source into a TFRecord dataset folder.

    Args:
        source: an `ExpressionSource` (see `keras_ssrl.data.sources`).
        out_dir: str, the output folder (must not exist or be empty, unless
            `overwrite`).
        config: a `ConversionConfig`; the defaults follow docs/protocol.md.
        align_to: optional target gene list: keep only genes also in it, in its order
            (docs/protocol.md, "Preprocessing": datasets are combined only through an
            explicit alignment), refusing too small an overlap.
        align_name: how messages and the manifest name the alignment target.
        extra_report: facts from earlier steps (label files, rules) for the manifest.
        command: the command line, recorded in the manifest.
        overwrite: bool, replace an existing dataset folder written by the converter
            (only once the new one is complete; a folder holding anything else is
            refused).
        inputs: the files and folders the source was read from (label files, rules,
            the alignment target; `source.path` is added): `out_dir` may not be,
            contain or lie inside any of them.
        log: callable receiving progress lines.

    Returns:
        The `Manifest` of the written dataset.

    Raises:
        DataError: for any problem with the arguments, the input or `out_dir`; checked
            before anything is written, and nothing is left behind.

    Example:

    ```python
    from keras_ssrl.data import sources, convert
    source = sources.open_table("expression.csv", label_column="cancer_type")
    manifest = convert(source, "data/my_dataset")
    ```
    """
    config = config or ConversionConfig()
    started = time.time()
    validate_config(config)
    transform = resolve_transform(config.values, config.transform)
    block_size = config.block_size or auto_block_size(source.n_genes)
    output = OutputFolder(out_dir, overwrite, [str(source.path), *inputs], log)
    if source.n_samples == 0:
        raise DataError(f"{source.path}: no samples")
    if source.n_genes == 0:
        raise DataError(f"{source.path}: no genes")
    run = _Run(
        source, config, transform, block_size, dict(extra_report or {}), log, started
    )
    samples = _samples(run)
    genes = _genes(run, align_to, align_name)
    with output as tmp:
        statistics = _statistics_pass(run, samples, genes)
        writers = _write_pass(run, samples, genes, statistics, tmp)
        _write_splits_csv(tmp, samples)
        manifest = _manifest(run, samples, genes, statistics, writers, command)
        write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
    log(
        f"wrote {manifest['n_samples']} samples x {manifest['n_genes']} genes to "
        f"{out_dir}: "
        + ", ".join(f"{s} {n}" for s, n in samples.split_sizes().items())
        + f" ({time.time() - started:.1f} s)"
    )
    return Manifest.load(os.path.abspath(out_dir))


def _samples(run: _Run) -> _Samples:
    """Step 1: unique ids, the label policies and the split of every sample."""
    source, config, report = run.source, run.config, run.report
    ids = _unique_ids(source)
    keep = np.ones(len(ids), dtype=bool)
    labels = None if source.labels is None else list(source.labels)
    if labels is not None:
        labels, dropped, label_report = apply_missing_label_policy(
            labels, ids, config.missing_labels, source.path
        )
        keep[dropped] = False
        report.update(label_report)
        _drop_small_classes(run, labels, keep)
    report["n_samples_in_source"] = len(ids)
    report["n_samples_dropped"] = int((~keep).sum())
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        raise DataError(f"{source.path}: no samples left to convert")
    kept_labels = None if labels is None else [labels[i] for i in kept]
    split_of = np.full(len(ids), "", dtype=object)
    split_of[kept] = assign_splits(kept_labels, config.split, len(kept))
    warnings = small_split_warnings(split_of, labels)
    for warning in warnings:
        run.log(f"warning: {warning}")
    if warnings:
        report["warnings"] = warnings
    classes = sorted({lab for lab in kept_labels or [] if lab is not None})
    return _Samples(ids, labels, split_of, kept, classes)


def _unique_ids(source: ExpressionSource) -> list[str]:
    """The sample ids as strings; a repeated id is an error naming both rows."""
    ids = [str(s) for s in source.sample_ids]
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in seen:
            raise DataError(
                f"{source.path}: sample id {sid!r} occurs more than once "
                f"({source.row_name(seen[sid])} and {source.row_name(i)}); sample ids "
                "must be unique"
            )
        seen[sid] = i
    return ids


def _drop_small_classes(run: _Run, labels: list, keep: np.ndarray) -> None:
    """Leaves out classes too small to stratify, when the split settings ask for it.

    Without `drop_small_classes` they stay, and `assign_splits` refuses them.
    """
    split = run.config.split
    sizes: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab is not None and keep[i]:
            sizes[lab] = sizes.get(lab, 0) + 1
    small = {c for c, n in sizes.items() if n < split.min_class_size}
    if not (small and split.drop_small_classes):
        return
    for i, lab in enumerate(labels):
        if lab in small:
            keep[i] = False
    run.report["small_classes_dropped"] = {c: sizes[c] for c in sorted(small)}
    run.log(
        f"dropped {len(small)} class(es) smaller than {split.min_class_size} samples "
        f"({sum(sizes[c] for c in small)} samples): {preview(sorted(small))}"
    )


def _genes(run: _Run, align_to: Sequence[str] | None, align_name: str) -> _Genes:
    """Step 2: normalise ids, merge duplicates, align to a target list if asked."""
    source, config = run.source, run.config
    base = plan_genes(
        source.genes,
        source.path,
        config.strip_versions,
        config.par_y,
        config.duplicate_genes,
    )
    plan, alignment_report = base, None
    if align_to is not None:
        alignment = align_genes(
            base.genes,
            list(align_to),
            config.align_min_overlap,
            source_name=str(source.path),
            target_name=align_name,
        )
        plan = base.select(alignment.source_indices)
        alignment_report = {"target": align_name, **alignment.report()}
    run.report["genes"] = base.report
    _log_gene_changes(run, base.report, alignment_report)
    return _Genes(base, plan, alignment_report)


def _log_gene_changes(run: _Run, report: dict, alignment: dict | None) -> None:
    """Says on the console what id handling and the alignment did to the genes, and
    why: the manifest's report holds the same counts, but few users open it."""
    log = run.log
    if report.get("n_versions_stripped"):
        log(
            f"genes: Ensembl version suffixes stripped from {report['n_versions_stripped']}"
            " ids (ENSG00000000003.15 -> ENSG00000000003; --keep-gene-versions keeps "
            "them)"
        )
    if report.get("n_par_y_dropped"):
        log(
            f"genes: {report['n_par_y_dropped']} _PAR_Y rows dropped (GENCODE's copies "
            "of pseudo-autosomal genes on chromosome Y, duplicating their X rows; "
            "--keep-par-y keeps them)"
        )
    if report.get("n_duplicate_rows"):
        log(
            f"genes: {report['n_duplicate_rows']} duplicate gene row(s) merged into "
            f"{report['n_duplicate_ids']} gene(s) (--duplicate-genes "
            f"{report['duplicate_policy']})"
        )
    if alignment is not None:
        log(
            f"aligned to {alignment['target']}: {alignment['n_matched']} of "
            f"{alignment['n_target_genes']} target genes matched "
            f"({alignment['fraction_of_target']:.1%}); "
            f"{alignment['n_source_genes'] - alignment['n_matched']} genes not in the "
            "target dropped"
        )


def _statistics_pass(run: _Run, samples: _Samples, genes: _Genes) -> _Statistics:
    """Step 3: validate every cell; statistics on the pre-training split only."""
    source, config = run.source, run.config
    is_pretrain = samples.split_of == schema.PRETRAIN
    moments = RunningMoments()
    nan_columns = np.zeros(source.n_genes, dtype=bool)
    missing_cells = 0
    progress = _Progress(run.log, "checked", source.n_samples, "pass 1 of 2")
    for block in source.iter_blocks(run.block_size):
        missing_cells += check_block(
            source, block.indices, block.values, config, nan_columns
        )
        progress.advance(len(block.indices))
        rows = is_pretrain[block.indices]
        if rows.any():
            moments.update(
                genes.stored(block.values[rows], run.transform, config.record_dtype)
            )
    if moments.n < 2:
        raise DataError(
            f"{source.path}: the pre-training split has {moments.n} sample(s); "
            "statistics need at least 2"
        )
    run.report["n_missing_cells"] = missing_cells
    run.report["missing_values_policy"] = config.missing_values
    return _select_genes(run, genes.plan, moments, nan_columns)


def _select_genes(
    run: _Run, plan: GenePlan, moments: RunningMoments, nan_columns: np.ndarray
) -> _Statistics:
    """The genes stored: those that vary on the pre-training split (and, under
    `--missing-values drop-genes`, have no missing value)."""
    config = run.config
    nan_genes = np.array(
        [nan_columns[plan.groups[g]].any() for g in range(plan.n_genes)], dtype=bool
    )
    zero_var = moments.variance <= config.min_variance
    drop_nan = (
        nan_genes if config.missing_values == "drop-genes" else np.zeros_like(nan_genes)
    )
    kept = np.flatnonzero(~zero_var & ~drop_nan)
    dropped = {
        "zero_variance": [plan.genes[g] for g in np.flatnonzero(zero_var)],
        "missing_values": [plan.genes[g] for g in np.flatnonzero(drop_nan & ~zero_var)],
    }
    if len(kept) == 0:
        raise DataError(f"{run.source.path}: no gene varies on the pre-training split")
    run.log(
        f"genes: {plan.n_genes} after id handling, {len(dropped['zero_variance'])} "
        f"dropped for zero variance on the pre-training split, "
        f"{len(dropped['missing_values'])} for missing values, "
        f"{len(kept)} kept"
    )
    for reason, what in (
        ("zero_variance", "constant on the pre-training split (nothing to learn)"),
        ("missing_values", "with missing values (--missing-values drop-genes)"),
    ):
        if dropped[reason]:
            run.log(f"  dropped {what}: {preview(dropped[reason])}")
    return _Statistics(moments, kept, dropped)


def _write_pass(
    run: _Run, samples: _Samples, genes: _Genes, statistics: _Statistics, folder: str
) -> ShardWriters:
    """Step 4: write records, in shuffled order, round-robin over each split's shards."""
    source, config = run.source, run.config
    class_index = {c: k for k, c in enumerate(samples.classes)}
    writers = ShardWriters(folder, samples.split_sizes(), config.shards)
    rng = np.random.default_rng(config.split.seed + 1)
    order = rng.permutation(source.n_blocks(run.block_size))
    progress = _Progress(run.log, "wrote", len(samples.kept), "pass 2 of 2")
    try:
        for block in source.iter_blocks(run.block_size, order=order):
            stored = genes.stored(block.values, run.transform, config.record_dtype)
            stored = stored[:, statistics.kept]
            written = 0
            for row in rng.permutation(len(block.indices)):
                index = int(block.indices[row])
                split = samples.split_of[index]
                if not split:
                    continue
                label = samples.labels[index] if samples.labels is not None else None
                label_id = class_index[label] if label is not None else -1
                record = schema.serialize_example(
                    samples.ids[index], stored[row], label_id, config.record_dtype
                )
                writers.write(split, record, label)
                written += 1
            progress.advance(written)
    finally:
        writers.close()
    return writers


def _write_splits_csv(folder: str, samples: _Samples) -> None:
    """`splits.csv`: the split of every converted sample, in source order."""
    with open(os.path.join(folder, SPLITS_CSV), "w", encoding="utf-8") as handle:
        handle.write("sample_id,split\n")
        for i in samples.kept:
            sid = samples.ids[i]
            if "," in sid or '"' in sid:
                sid = '"' + sid.replace('"', '""') + '"'
            handle.write(f"{sid},{samples.split_of[i]}\n")


def _manifest(
    run: _Run,
    samples: _Samples,
    genes: _Genes,
    statistics: _Statistics,
    writers: ShardWriters,
    command: Sequence[str] | None,
) -> dict:
    """Step 5: the content of `manifest.json` (see `keras_ssrl.data.manifest`)."""
    source, config, kept = run.source, run.config, statistics.kept
    return {
        "format": FORMAT_NAME,
        "schema_version": schema.SCHEMA_VERSION,
        "keras_ssrl_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": list(command) if command is not None else list(sys.argv),
        "source": {
            "path": str(source.path),
            "n_samples": source.n_samples,
            "n_genes": source.n_genes,
            **source.info,
        },
        "n_samples": sum(sum(counts) for counts in writers.written.values()),
        "n_genes": int(len(kept)),
        "genes": [genes.plan.genes[g] for g in kept],
        "labels": samples.classes,
        "values": config.values,
        "transform": run.transform,
        "record_dtype": config.record_dtype,
        "statistics": {
            "fitted_on": schema.PRETRAIN,
            "num_samples": int(statistics.moments.n),
            "values": "stored (transformed) values, population variance",
            "mean": [float(v) for v in statistics.moments.mean[kept]],
            "std": [float(v) for v in statistics.moments.std[kept]],
        },
        "splits": writers.manifest_entry(),
        "dropped_genes": statistics.dropped,
        "alignment": genes.alignment,
        "config": to_dict(config),
        "report": run.report,
        "seconds": round(time.time() - run.started, 2),
    }
