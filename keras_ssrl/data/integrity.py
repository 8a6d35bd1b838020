"""Full integrity check of a dataset folder (used by `tfrecords_tools/verify.py`)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field

import numpy as np

from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError
from keras_ssrl.data.manifest import MANIFEST, SPLITS_CSV, Manifest
from keras_ssrl.files import join, open_file, sha256_file


@dataclass
class InspectionReport:
    """What `inspect_dataset` found: a summary and the list of problems."""

    manifest: Manifest
    problems: list[str] = field(default_factory=list)
    records_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """What the dataset holds, as far as its manifest says (tolerating a damaged
        one: the problems list says what is wrong with it)."""
        data = self.manifest.data
        stats = (
            data.get("statistics") if isinstance(data.get("statistics"), dict) else {}
        )
        labels = data.get("labels") if isinstance(data.get("labels"), list) else []
        lines = [
            f"dataset   {self.manifest.directory}",
            f"genes     {data.get('n_genes')} ({data.get('transform')} of "
            f"{data.get('values')}, stored as {data.get('record_dtype')})",
            f"classes   {len(labels)}: "
            + (", ".join(map(str, labels[:20])) or "(unlabelled)")
            + (" ..." if len(labels) > 20 else ""),
            f"stats     fitted on {stats.get('fitted_on')} "
            f"({stats.get('num_samples')} samples)",
        ]
        splits = data.get("splits") if isinstance(data.get("splits"), dict) else {}
        for split in self.manifest.split_names:
            info = splits[split] if isinstance(splits[split], dict) else {}
            lines.append(
                f"{split:<13} {info.get('num_records')!s:>8} records "
                f"({info.get('num_labelled')} labelled) in "
                f"{len(info.get('shards') or [])} shard(s)"
            )
        dropped = data.get("dropped_genes")
        if isinstance(dropped, dict):
            lines.append(
                "dropped   "
                + ", ".join(f"{len(v)} genes ({k})" for k, v in dropped.items())
            )
        a = data.get("alignment")
        if isinstance(a, dict):
            lines.append(
                f"aligned   to {a.get('target')}: {a.get('n_matched')} of "
                f"{a.get('n_target_genes')} target genes"
            )
        return "\n".join(lines)


def clean_tf_error(error: Exception) -> str:
    """The useful part of a TensorFlow op error ("corrupted record at 363")."""
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:[^\]]*\].*$", "", message, flags=re.S)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def find_damaged_shards(directory: str, split: str) -> list[str]:
    """Scans the shards of one split and names those that cannot be read.

    Call it when training stops on a `tf.errors.DataLossError`, whose message gives a
    byte offset but not the file: the result says which shard to re-copy.
    """
    manifest = Manifest.load(directory)
    damaged = []
    for shard, path in zip(
        manifest.split(split)["shards"], manifest.shard_paths(split)
    ):
        try:
            count, _ = _check_records(manifest, path, shard["num_records"])
        except Exception as error:  # noqa: BLE001 - any failure marks the shard
            damaged.append(f"{path}: {clean_tf_error(error)}")
            continue
        if count != shard["num_records"]:
            damaged.append(
                f"{path}: {count} records, manifest says {shard['num_records']}"
            )
    return damaged


def _check_records(manifest: Manifest, path: str, expected: int) -> tuple[int, list]:
    """Parses every record of one shard; returns (count, sample ids)."""
    import tensorflow as tf

    n_classes = len(manifest.labels)
    ds = (
        tf.data.TFRecordDataset(path)
        .batch(512)
        .map(lambda s: schema.parse_batch(s, manifest.n_genes, manifest.record_dtype))
    )
    count, ids = 0, []
    for batch in ds:
        labels = batch[schema.LABEL].numpy()
        bad = (labels < -1) | (labels >= n_classes)
        if bad.any():
            raise ValueError(
                f"record {count + int(np.argmax(bad))} has label {labels[bad][0]}, "
                f"outside the manifest's {n_classes} classes"
            )
        values = batch[schema.EXPRESSION].numpy()
        if not np.isfinite(values).all():
            raise ValueError(f"a record after record {count} holds non-finite values")
        ids.extend(s.decode("utf-8") for s in batch[schema.SAMPLE_ID].numpy())
        count += len(labels)
    return count, ids


def _record_width(path: str) -> int | None:
    """Bytes of expression in the first record of a shard (None: unreadable, empty)."""
    import tensorflow as tf

    try:
        for record in tf.data.TFRecordDataset(path).take(1):
            parsed = tf.io.parse_single_example(record, schema.feature_spec())
            return len(parsed[schema.EXPRESSION].numpy())
    except (tf.errors.OpError, ValueError):
        pass
    return None


def _width_mismatch(manifest: Manifest) -> str | None:
    """A manifest whose `n_genes` / `record_dtype` disagree with every shard's records.

    When the first record of every shard (two at least) holds the same number of bytes
    and that is not what the manifest expects, the manifest is what is wrong.
    """
    widths = {
        _record_width(path)
        for split in manifest.split_names
        for path in manifest.shard_paths(split)
    }
    shards = sum(len(manifest.split(s)["shards"]) for s in manifest.split_names)
    expected = manifest.n_genes * np.dtype(manifest.record_dtype).itemsize
    if shards < 2 or len(widths) != 1 or widths == {expected}:
        return None
    (width,) = widths
    if width is None:
        return None
    return (
        f"{manifest.directory}: {MANIFEST} is inconsistent with its "
        f"records: n_genes says {manifest.n_genes} ({expected} bytes of "
        f"{manifest.record_dtype}), every shard's records hold {width} bytes. It was "
        "edited or belongs to another dataset: restore it or re-run the conversion"
    )


def inspect_dataset(directory: str, checksums: bool = True) -> InspectionReport:
    """Checks every shard of a dataset: presence, size, sha256, and every record.

    Args:
        directory: str, the dataset folder.
        checksums: bool, compare sha256 of every shard with the manifest.

    Returns:
        An `InspectionReport`; `report.problems` names each damaged shard.
    """
    import tensorflow as tf

    manifest = Manifest.load(directory)
    report = InspectionReport(manifest)
    # A manifest that contradicts itself or its records would make every shard look
    # damaged: report that one problem instead.
    problem = manifest.inconsistency() or _width_mismatch(manifest)
    if problem:
        report.problems.append(problem)
        return report
    seen: dict[str, str] = {}
    for split in manifest.split_names:
        for shard, path in zip(
            manifest.split(split)["shards"], manifest.shard_paths(split)
        ):
            if not tf.io.gfile.exists(path):
                report.problems.append(f"{path}: missing")
                continue
            size = tf.io.gfile.stat(path).length
            if size != shard["bytes"]:
                report.problems.append(
                    f"{path}: {size} bytes, manifest says {shard['bytes']} (truncated "
                    "or overwritten)"
                )
            elif checksums and sha256_file(path) != shard["sha256"]:
                report.problems.append(f"{path}: sha256 differs from the manifest")
            try:
                count, ids = _check_records(manifest, path, shard["num_records"])
            except (tf.errors.OpError, ValueError) as error:
                report.problems.append(
                    f"{path}: unreadable record ({clean_tf_error(error)})"
                )
                continue
            report.records_checked += count
            if count != shard["num_records"]:
                report.problems.append(
                    f"{path}: {count} records, manifest says {shard['num_records']}"
                )
            for sid in ids:
                if sid in seen:
                    report.problems.append(
                        f"{path}: sample {sid!r} also appears in {seen[sid]}"
                    )
                    break
                seen[sid] = path
    splits_path = join(directory, SPLITS_CSV)
    try:
        with open_file(splits_path, "rb") as handle:
            rows = list(csv.DictReader(handle.read().decode("utf-8").splitlines()))
        if len(rows) != sum(manifest.num_records(s) for s in manifest.split_names):
            report.problems.append(
                f"{splits_path}: {len(rows)} rows, the shards hold a different count"
            )
    except (OSError, DataError) as error:
        report.problems.append(f"{splits_path}: unreadable ({error})")
    return report
