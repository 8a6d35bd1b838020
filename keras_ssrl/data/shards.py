"""The shards a conversion writes: how many per split, round-robin writers, their entries.

`ShardWriters` holds one `tf.io.TFRecordWriter` per (split, shard), sends a split's
records round-robin over its shards, counts records and labels as they are written,
and describes the result as the `splits` entry of `manifest.json` (files, record
counts, sha256 and sizes).
"""

from __future__ import annotations

import os

import numpy as np

from keras_ssrl.data import schema
from keras_ssrl.files import sha256_file


def shard_counts(split_sizes: dict[str, int], shards: int) -> dict[str, int]:
    """Shards per split: `shards` for the largest, proportionally fewer for others."""
    largest = max(split_sizes.values()) if split_sizes else 0
    return {
        split: max(1, min(n, int(np.ceil(shards * n / max(largest, 1)))))
        for split, n in split_sizes.items()
    }


class ShardWriters:
    """One TFRecord writer per (split, shard); records go round-robin over shards.

    Args:
        directory: str, the folder the shards are written into.
        split_sizes: records per split (splits without records are left out).
        shards: int, the number of shards of the largest split.
    """

    def __init__(self, directory: str, split_sizes: dict[str, int], shards: int):
        import tensorflow as tf

        self.directory = directory
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
        self.label_counts: dict[str, dict[str, int]] = {s: {} for s in self.counts}
        self.num_labelled = dict.fromkeys(self.counts, 0)

    def write(self, split: str, record: bytes, label: str | None = None) -> None:
        """Writes one serialised record to the next shard of `split`."""
        shard = self.next[split]
        self.writers[split][shard].write(record)
        self.written[split][shard] += 1
        self.next[split] = (shard + 1) % self.counts[split]
        if label is not None:
            counts = self.label_counts[split]
            counts[label] = counts.get(label, 0) + 1
            self.num_labelled[split] += 1

    def close(self) -> None:
        for writers in self.writers.values():
            for writer in writers:
                writer.close()

    def manifest_entry(self) -> dict:
        """The `splits` entry of the manifest, once the writers are closed."""
        splits = {}
        for split, files in self.files.items():
            shards = []
            for shard, name in enumerate(files):
                path = os.path.join(self.directory, name)
                shards.append(
                    {
                        "file": name,
                        "num_records": self.written[split][shard],
                        "sha256": sha256_file(path),
                        "bytes": os.path.getsize(path),
                    }
                )
            splits[split] = {
                "num_records": sum(self.written[split]),
                "num_labelled": self.num_labelled[split],
                "label_counts": dict(sorted(self.label_counts[split].items())),
                "shards": shards,
            }
        return splits
