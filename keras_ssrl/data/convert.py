"""Conversion of an expression source into sharded TFRecords with a manifest.

Two streaming passes over the source, so memory is bounded by the block size whatever the
number of samples:

1. validate every cell (numeric, finite, non-negative for counts / TPM), and accumulate
   per-gene statistics of the stored values on the pre-training split only;
2. drop zero-variance genes and write every sample to its split's shards, in a shuffled
   order (blocks in random order, samples permuted within a block) so that file order
   (often sorted by project or tissue) does not reach the training batches.

Every argument is checked before anything is written, and everything is written into a
temporary folder that is renamed into place at the end (`keras_ssrl.data.output`): a
refused or failed conversion leaves nothing behind, and `overwrite` only ever replaces
a dataset the converter wrote.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from keras_ssrl import __version__
from keras_ssrl.config import ConversionConfig, auto_block_size, to_dict
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.genes import DUPLICATE_POLICIES, GenePlan, align_genes, plan_genes
from keras_ssrl.data.labels import MISSING_LABEL_POLICIES, apply_missing_label_policy
from keras_ssrl.data.manifest import (
    FORMAT_NAME,
    MANIFEST,
    SPLITS_CSV,
    Manifest,
    sha256_file,
    write_json_atomic,
)
from keras_ssrl.data.output import OutputFolder
from keras_ssrl.data.preprocessing import (
    RunningMoments,
    apply_transform,
    resolve_transform,
)
from keras_ssrl.data.sources.base import ExpressionSource
from keras_ssrl.data.splits import assign_splits

MISSING_VALUE_POLICIES = ("error", "zero", "drop-genes")
# A test split smaller than this (or with fewer samples of some class) measures mostly
# noise: one sample is 3% of accuracy, and a class's recall moves in steps of 20% or
# more. The converter warns, naming the flags that size the split.
MIN_TEST_SAMPLES = 30
MIN_TEST_PER_CLASS = 5


def _finite(value) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _whole(value, minimum: int) -> bool:
    return _finite(value) and float(value).is_integer() and value >= minimum


def _require(ok: bool, flag: str, value, expected: str) -> None:
    if not ok:
        raise DataError(f"{flag} must be {expected}, got {value!r}")


def validate_config(config: ConversionConfig) -> None:
    """Refuses every setting that is invalid, before any input is read or written.

    Raises:
        DataError: naming the command-line flag, what it accepts and the value given.
    """
    resolve_transform(config.values, config.transform)
    choices = {
        "--record-dtype": (config.record_dtype, schema.RECORD_DTYPES),
        "--missing-values": (config.missing_values, MISSING_VALUE_POLICIES),
        "--missing-labels": (config.missing_labels, MISSING_LABEL_POLICIES),
        "--duplicate-genes": (config.duplicate_genes, DUPLICATE_POLICIES),
        "par_y": (config.par_y, ("drop", "keep")),
    }
    for flag, (value, allowed) in choices.items():
        _require(value in allowed, flag, value, f"one of {', '.join(allowed)}")
    _require(_whole(config.shards, 1), "--shards", config.shards, "a whole number >= 1")
    _require(
        config.block_size is None or _whole(config.block_size, 1),
        "--block-size",
        config.block_size,
        "a whole number >= 1",
    )
    _require(
        _finite(config.min_variance) and config.min_variance >= 0,
        "min_variance",
        config.min_variance,
        "a number >= 0",
    )
    _require(
        _finite(config.align_min_overlap) and 0 <= config.align_min_overlap <= 1,
        "--min-overlap",
        config.align_min_overlap,
        "a fraction between 0 and 1",
    )
    split = config.split
    for flag, size in (
        ("--finetune-size", split.finetune_size),
        ("--test-size", split.test_size),
    ):
        _require(
            size is None or (_finite(size) and (0 <= size < 1 or _whole(size, 1))),
            flag,
            size,
            "a fraction between 0 and 1 or a whole count",
        )
    _require(
        _finite(split.val_fraction) and 0 <= split.val_fraction < 1,
        "--val-fraction",
        split.val_fraction,
        "a fraction >= 0 and < 1",
    )
    _require(
        _whole(split.min_class_size, 1),
        "--min-class-size",
        split.min_class_size,
        "a whole number >= 1",
    )
    _require(_whole(split.seed, 0), "--seed", split.seed, "a whole number >= 0")


def small_split_warnings(
    split_of: np.ndarray, labels: Sequence[str | None] | None
) -> list[str]:
    """Warnings for a test split too small to measure anything.

    Args:
        split_of: the split name of every sample ("" for samples left out).
        labels: the label of every sample, or None for an unlabelled source.

    Returns:
        Messages naming the split, its size and the flags that enlarge it.
    """
    if labels is None:
        return []
    warnings = []
    classes = {labels[i] for i in np.flatnonzero(split_of != "")} - {None}
    if len(classes) < 2:
        warnings.append(
            f"the labelled samples hold {len(classes)} class: fine-tuning and "
            "evaluation need at least 2"
        )
    counts: dict[str, int] = {}
    for i in np.flatnonzero(split_of == schema.TEST):
        if labels[i] is not None:
            counts[labels[i]] = counts.get(labels[i], 0) + 1
    if not counts:
        return warnings
    total = sum(counts.values())
    smallest = min(sorted(counts), key=counts.get)
    if total < MIN_TEST_SAMPLES or counts[smallest] < MIN_TEST_PER_CLASS:
        warnings.append(
            f"the test split has {total} samples, {counts[smallest]} of class "
            f"{smallest!r} (fewer than {MIN_TEST_SAMPLES} samples or "
            f"{MIN_TEST_PER_CLASS} per class): accuracy measured on it is mostly "
            "noise; raise --test-size (by default the size of --finetune-size)"
        )
    return warnings


def shard_counts(split_sizes: dict[str, int], shards: int) -> dict[str, int]:
    """Shards per split: `shards` for the largest, proportionally fewer for others."""
    largest = max(split_sizes.values()) if split_sizes else 0
    return {
        split: max(1, min(n, int(np.ceil(shards * n / max(largest, 1)))))
        for split, n in split_sizes.items()
    }


class ShardWriters:
    """One TFRecord writer per (split, shard); records go round-robin over shards."""

    def __init__(self, directory: str, split_sizes: dict[str, int], shards: int):
        import tensorflow as tf

        self.counts = shard_counts(split_sizes, shards)
        self.files = {
            split: [schema.shard_name(split, i, n) for i in range(n)]
            for split, n in self.counts.items()
        }
        self.writers = {
            split: [tf.io.TFRecordWriter(os.path.join(directory, f)) for f in files]
            for split, files in self.files.items()
        }
        self.written = {split: [0] * n for split, n in self.counts.items()}
        self.next = dict.fromkeys(self.counts, 0)

    def write(self, split: str, record: bytes) -> None:
        shard = self.next[split]
        self.writers[split][shard].write(record)
        self.written[split][shard] += 1
        self.next[split] = (shard + 1) % self.counts[split]

    def close(self) -> None:
        for writers in self.writers.values():
            for writer in writers:
                writer.close()


def _check_block(
    source: ExpressionSource,
    indices: np.ndarray,
    values: np.ndarray,
    config: ConversionConfig,
    nan_columns: np.ndarray,
) -> int:
    """Validates one raw block; returns its number of missing cells."""
    finite = np.isfinite(values)
    if not finite.all():
        nan = np.isnan(values)
        infinite = ~finite & ~nan
        if infinite.any():
            row, col = np.argwhere(infinite)[0]
            raise DataError(
                f"{source.path}: {source.row_name(int(indices[row]))}, gene "
                f"{source.genes[col]!r}: value {values[row, col]} is infinite; fix the "
                "file (infinite values are never valid expression)"
            )
        if config.missing_values == "error":
            row, col = np.argwhere(nan)[0]
            raise DataError(
                f"{source.path}: {source.row_name(int(indices[row]))}, gene "
                f"{source.genes[col]!r}: value is missing (NaN/NA); {int(nan.sum())} "
                "missing cell(s) in this block. Fix the file, or pass "
                "--missing-values zero|drop-genes (counted in the report)."
            )
        nan_columns |= nan.any(axis=0)
        missing = int(nan.sum())
    else:
        missing = 0
    if config.values != "log2":
        negative = values < 0
        if negative.any():
            row, col = np.argwhere(negative)[0]
            raise DataError(
                f"{source.path}: {source.row_name(int(indices[row]))}, gene "
                f"{source.genes[col]!r}: value {values[row, col]} is negative, but "
                f"--values {config.values} must be >= 0. If the file is already "
                "log-transformed, pass --values log2."
            )
    return missing


def _transformed(
    values: np.ndarray,
    base_plan: GenePlan,
    plan: GenePlan,
    transform: str,
    record_dtype: str,
) -> np.ndarray:
    """Raw block -> the values a record stores, for the genes of `plan`."""
    # float32 arithmetic: 4x faster than float64 and exact far beyond float16 storage.
    values = values.astype(np.float32, copy=False)
    if np.isnan(values).any():  # only under --missing-values zero|drop-genes
        values = np.nan_to_num(values, nan=0.0)
    mapped = plan.apply(values)
    if transform == "cpm_log2p1":
        # Library size over every gene of the sample, not only the kept/aligned ones.
        totals = base_plan.apply(values).sum(axis=1, keepdims=True, dtype=np.float64)
        totals[totals == 0] = 1.0
        out = np.log2(mapped * (1e6 / totals).astype(np.float32) + 1.0)
    else:
        out = apply_transform(mapped, transform)
    # Statistics are computed on exactly what the reader will see.
    return out.astype(record_dtype, copy=False)


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
        config: a `ConversionConfig`; defaults follow protocol.md.
        align_to: optional target gene list: keep only genes also in it, in its order
            (the gene alignment of protocol.md), refusing too small an overlap.
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
    report: dict = dict(extra_report or {})

    # Samples: ids must be unique; labels joined and policies applied.
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
    keep = np.ones(len(ids), dtype=bool)
    labels = None if source.labels is None else list(source.labels)
    if labels is not None:
        labels, dropped, label_report = apply_missing_label_policy(
            labels, ids, config.missing_labels, source.path
        )
        keep[dropped] = False
        report.update(label_report)
        sizes: dict[str, int] = {}
        for i, lab in enumerate(labels):
            if lab is not None and keep[i]:
                sizes[lab] = sizes.get(lab, 0) + 1
        small = {c for c, n in sizes.items() if n < config.split.min_class_size}
        if small and config.split.drop_small_classes:
            for i, lab in enumerate(labels):
                if lab in small:
                    keep[i] = False
            report["small_classes_dropped"] = {c: sizes[c] for c in sorted(small)}
            log(
                f"dropped {len(small)} class(es) smaller than "
                f"{config.split.min_class_size} samples "
                f"({sum(sizes[c] for c in small)} samples): {preview(sorted(small))}"
            )
    report["n_samples_in_source"] = len(ids)
    report["n_samples_dropped"] = int((~keep).sum())
    kept_index = np.flatnonzero(keep)
    if len(kept_index) == 0:
        raise DataError(f"{source.path}: no samples left to convert")
    kept_labels = None if labels is None else [labels[i] for i in kept_index]
    split_of = np.full(len(ids), "", dtype=object)
    split_of[kept_index] = assign_splits(kept_labels, config.split, len(kept_index))
    classes = sorted({lab for lab in kept_labels or [] if lab is not None})
    warnings = small_split_warnings(split_of, labels)
    for warning in warnings:
        log(f"warning: {warning}")
    if warnings:
        report["warnings"] = warnings
    class_index = {c: k for k, c in enumerate(classes)}

    # Genes: normalise ids, merge duplicates, align to a target list if asked.
    base_plan = plan_genes(
        source.genes,
        source.path,
        config.strip_versions,
        config.par_y,
        config.duplicate_genes,
    )
    plan = base_plan
    alignment_report = None
    if align_to is not None:
        alignment = align_genes(
            base_plan.genes,
            list(align_to),
            config.align_min_overlap,
            source_name=str(source.path),
            target_name=align_name,
        )
        plan = base_plan.select(alignment.source_indices)
        alignment_report = {"target": align_name, **alignment.report()}
        log(
            f"aligned to {align_name}: {alignment.n_matched} of "
            f"{alignment.n_target} target genes matched "
            f"({alignment.n_matched / alignment.n_target:.1%})"
        )
    report["genes"] = base_plan.report
    if base_plan.report.get("n_duplicate_rows"):
        log(
            f"merged {base_plan.report['n_duplicate_rows']} duplicate gene row(s) into "
            f"{base_plan.report['n_duplicate_ids']} gene(s) ({config.duplicate_genes})"
        )

    with output as tmp:
        # Pass 1: validate every cell; statistics on the pre-training split only.
        is_pretrain = split_of == schema.PRETRAIN
        moments = RunningMoments()
        nan_columns = np.zeros(source.n_genes, dtype=bool)
        missing_cells = 0
        checked, last_log = 0, time.time()
        for block in source.iter_blocks(block_size):
            missing_cells += _check_block(
                source, block.indices, block.values, config, nan_columns
            )
            checked += len(block.indices)
            if time.time() - last_log > 10:
                last_log = time.time()
                log(f"  checked {checked} of {source.n_samples} samples (pass 1 of 2)")
            rows = is_pretrain[block.indices]
            if rows.any():
                stored = _transformed(
                    block.values[rows], base_plan, plan, transform, config.record_dtype
                )
                moments.update(stored)
        if moments.n < 2:
            raise DataError(
                f"{source.path}: the pre-training split has {moments.n} sample(s); "
                "statistics need at least 2"
            )
        report["n_missing_cells"] = missing_cells
        report["missing_values_policy"] = config.missing_values
        nan_genes = np.array(
            [nan_columns[plan.groups[g]].any() for g in range(plan.n_genes)], dtype=bool
        )
        zero_var = moments.variance <= config.min_variance
        drop_nan = (
            nan_genes
            if config.missing_values == "drop-genes"
            else np.zeros_like(nan_genes)
        )
        kept_genes = np.flatnonzero(~zero_var & ~drop_nan)
        dropped_genes = {
            "zero_variance": [plan.genes[g] for g in np.flatnonzero(zero_var)],
            "missing_values": [
                plan.genes[g] for g in np.flatnonzero(drop_nan & ~zero_var)
            ],
        }
        if len(kept_genes) == 0:
            raise DataError(f"{source.path}: no gene varies on the pre-training split")
        log(
            f"genes: {plan.n_genes} after id handling, {len(dropped_genes['zero_variance'])} "
            f"dropped for zero variance on the pre-training split, "
            f"{len(dropped_genes['missing_values'])} for missing values, "
            f"{len(kept_genes)} kept"
        )
        mean = moments.mean[kept_genes]
        std = moments.std[kept_genes]

        # Pass 2: write records, in shuffled order, round-robin over each split's shards.
        split_sizes = {s: int((split_of == s).sum()) for s in schema.SPLITS}
        split_sizes = {s: n for s, n in split_sizes.items() if n > 0}
        writers = ShardWriters(tmp, split_sizes, config.shards)
        rng = np.random.default_rng(config.split.seed + 1)
        order = rng.permutation(source.n_blocks(block_size))
        written = 0
        last_log = time.time()
        label_counts = {s: {} for s in split_sizes}
        num_labelled = dict.fromkeys(split_sizes, 0)
        try:
            for block in source.iter_blocks(block_size, order=order):
                stored = _transformed(
                    block.values, base_plan, plan, transform, config.record_dtype
                )[:, kept_genes]
                for row in rng.permutation(len(block.indices)):
                    index = int(block.indices[row])
                    split = split_of[index]
                    if not split:
                        continue
                    label = labels[index] if labels is not None else None
                    label_id = class_index[label] if label is not None else -1
                    writers.write(
                        split,
                        schema.serialize_example(
                            ids[index], stored[row], label_id, config.record_dtype
                        ),
                    )
                    if label is not None:
                        label_counts[split][label] = (
                            label_counts[split].get(label, 0) + 1
                        )
                        num_labelled[split] += 1
                    written += 1
                if time.time() - last_log > 10:
                    last_log = time.time()
                    log(f"  wrote {written} of {len(kept_index)} samples (pass 2 of 2)")
        finally:
            writers.close()

        splits = {}
        for split, files in writers.files.items():
            shards = []
            for shard, name in enumerate(files):
                path = os.path.join(tmp, name)
                shards.append(
                    {
                        "file": name,
                        "num_records": writers.written[split][shard],
                        "sha256": sha256_file(path),
                        "bytes": os.path.getsize(path),
                    }
                )
            splits[split] = {
                "num_records": sum(writers.written[split]),
                "num_labelled": num_labelled[split],
                "label_counts": dict(sorted(label_counts[split].items())),
                "shards": shards,
            }
        with open(os.path.join(tmp, SPLITS_CSV), "w", encoding="utf-8") as handle:
            handle.write("sample_id,split\n")
            for i in kept_index:
                sid = ids[i]
                if "," in sid or '"' in sid:
                    sid = '"' + sid.replace('"', '""') + '"'
                handle.write(f"{sid},{split_of[i]}\n")
        manifest = {
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
            "n_samples": written,
            "n_genes": int(len(kept_genes)),
            "genes": [plan.genes[g] for g in kept_genes],
            "labels": classes,
            "values": config.values,
            "transform": transform,
            "record_dtype": config.record_dtype,
            "statistics": {
                "fitted_on": schema.PRETRAIN,
                "num_samples": int(moments.n),
                "values": "stored (transformed) values, population variance",
                "mean": [float(v) for v in mean],
                "std": [float(v) for v in std],
            },
            "splits": splits,
            "dropped_genes": dropped_genes,
            "alignment": alignment_report,
            "config": to_dict(config),
            "report": report,
            "seconds": round(time.time() - started, 2),
        }
        write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
    log(
        f"wrote {written} samples x {len(kept_genes)} genes to {out_dir}: "
        + ", ".join(f"{s} {n}" for s, n in split_sizes.items())
        + f" ({time.time() - started:.1f} s)"
    )
    return Manifest.load(os.path.abspath(out_dir))
