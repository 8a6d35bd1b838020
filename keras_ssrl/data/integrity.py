"""Full integrity check of a dataset folder (used by `tfrecords_tools/inspect.py`)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field

import numpy as np

from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError
from keras_ssrl.data.manifest import SPLITS_CSV, Manifest, join, open_file, sha256_file


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
        data = self.manifest.data
        lines = [
            f"dataset   {self.manifest.directory}",
            f"genes     {self.manifest.n_genes} ({data['transform']} of "
            f"{data['values']}, stored as {self.manifest.record_dtype})",
            f"classes   {len(self.manifest.labels)}: "
            + (", ".join(self.manifest.labels[:20]) or "(unlabelled)")
            + (" ..." if len(self.manifest.labels) > 20 else ""),
            f"stats     fitted on {data['statistics']['fitted_on']} "
            f"({data['statistics']['num_samples']} samples)",
        ]
        for split in self.manifest.split_names:
            info = self.manifest.split(split)
            lines.append(
                f"{split:<13} {info['num_records']:>8} records "
                f"({info['num_labelled']} labelled) in {len(info['shards'])} shard(s)"
            )
        dropped = data.get("dropped_genes", {})
        lines.append(
            "dropped   "
            + ", ".join(f"{len(v)} genes ({k})" for k, v in dropped.items())
        )
        if data.get("alignment"):
            a = data["alignment"]
            lines.append(
                f"aligned   to {a['target']}: {a['n_matched']} of "
                f"{a['n_target_genes']} target genes"
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
