"""The dataset manifest: what a TFRecord folder holds and how to read it.

`manifest.json` sits beside the shards and is the single description of a dataset:
ordered gene list, label vocabulary, value transform, record encoding, per-gene
statistics fitted on the pre-training split, shards with record counts and sha256, the
split configuration and the command line that produced it. The reader, the integrity
check, alignment and model export read it; nothing is inferred from file names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError
from keras_ssrl.files import is_remote, join, open_file

MANIFEST = "manifest.json"
SPLITS_CSV = "splits.csv"
FORMAT_NAME = "keras_ssrl.tfrecord"


def shard_path(directory: str, entry) -> str:
    """The path of a shard named by a manifest entry, refusing anything outside the folder.

    A manifest is input like any other: a shard `file` of `../../x.tfrecord` or
    `/home/me/x.tfrecord` would make the reader train on, the integrity check vouch for,
    and alignment write over someone else's file. Every place that turns a manifest
    entry into a path goes through here. Accepted: a plain file name (no separator, not
    `.`/`..`, not absolute) that, after resolving links, is still inside `directory`.

    Args:
        directory: str, the dataset folder (local, or a `gs://` / `s3://` URL).
        entry: the shard's `file` value from `manifest.json`.

    Returns:
        The joined path.

    Raises:
        DataError: naming the entry; the manifest must be repaired or re-created.
    """
    problem = None
    if not isinstance(entry, str) or not entry:
        problem = "is not a file name"
    elif os.path.isabs(entry) or re.match(r"^[A-Za-z]:", entry) or "://" in entry:
        problem = "is an absolute path"
    elif "/" in entry or "\\" in entry or "\x00" in entry:
        problem = "contains a path separator"
    elif entry in (".", ".."):
        problem = "points outside the dataset folder"
    if problem is None and not is_remote(directory):
        folder = os.path.realpath(directory)
        resolved = os.path.realpath(os.path.join(directory, entry))
        if os.path.dirname(resolved) != folder:
            problem = f"resolves (through a link) to {resolved}, outside the folder"
    if problem is not None:
        raise DataError(
            f"{join(str(directory), MANIFEST)}: shard entry {entry!r} {problem}; a "
            "manifest may only name files inside its own dataset folder. Re-run the "
            "conversion (or restore the manifest) instead of editing shard names."
        )
    return join(str(directory), entry)


def genes_digest(genes: list[str]) -> str:
    """sha256 of an ordered gene list: what runs record to recognise their genes."""
    return hashlib.sha256("\n".join(genes).encode("utf-8")).hexdigest()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split_inconsistency(name: str, split, labels: list) -> list[str]:
    """The contradictions within one split's entry of a manifest."""
    try:
        shards = split["shards"]
        counts = [shard["num_records"] for shard in shards]
        sizes = [shard["bytes"] for shard in shards]
        classes = dict(split.get("label_counts") or {})
    except (KeyError, TypeError, ValueError):
        return [f"split {name!r} is malformed"]
    facts = []
    if not shards or not all(_is_int(n) and n >= 0 for n in counts + sizes):
        facts.append(f"split {name!r} lists no shards or impossible record counts")
    elif split.get("num_records") != sum(counts):
        facts.append(
            f"split {name!r} says {split.get('num_records')!r} records, its shards "
            f"{sum(counts)}"
        )
    unknown = sorted(set(classes) - set(labels))
    if unknown:
        facts.append(
            f"split {name!r} counts classes missing from labels: "
            + ", ".join(map(repr, unknown[:3]))
        )
    return facts


@dataclass
class Manifest:
    """A parsed `manifest.json`, with the folder it came from."""

    directory: str
    data: dict

    @classmethod
    def load(cls, directory: str) -> Manifest:
        directory = str(directory)
        path = join(directory, MANIFEST)
        try:
            with open_file(path, "rb") as handle:
                data = json.loads(handle.read().decode("utf-8"))
        except FileNotFoundError:
            raise DataError(
                f"{directory}: no {MANIFEST}; is this a folder written by "
                "tfrecords_tools/convert.py?"
            ) from None
        except (OSError, ValueError) as error:
            if "NotFound" in type(error).__name__:
                raise DataError(f"{directory}: no {MANIFEST}") from None
            raise DataError(f"{path}: unreadable manifest ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise DataError(f"{path}: not a keras_ssrl dataset manifest")
        version = data.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            raise DataError(
                f"{path}: schema version {version} is not supported by this keras_ssrl "
                f"(expects {schema.SCHEMA_VERSION}); re-run the conversion"
            )
        manifest = cls(directory, data)
        # Refuse a manifest that names files outside its folder before anyone reads,
        # checks or (in alignment) writes them.
        splits = data.get("splits")
        for split in splits.values() if isinstance(splits, dict) else []:
            shards = split.get("shards") if isinstance(split, dict) else None
            for shard in shards or []:
                shard_path(
                    directory, shard.get("file") if isinstance(shard, dict) else shard
                )
        return manifest

    def inconsistency(self) -> str | None:
        """What the manifest contradicts within itself, or None when nothing does.

        An edited or damaged manifest (an `n_genes` that disagrees with its gene list,
        statistics of another length, a class missing from `labels`) makes every
        shard look damaged; naming the manifest points at the real problem.
        """
        data = self.data
        facts = []
        n_genes = data.get("n_genes")
        if not _is_int(n_genes) or n_genes < 1:
            facts.append(f"n_genes is {n_genes!r}, not a positive whole number")
        genes = data.get("genes")
        stats = data.get("statistics")
        stats = stats if isinstance(stats, dict) else {}
        lengths = {
            "genes lists": genes,
            "statistics.mean has": stats.get("mean"),
            "statistics.std has": stats.get("std"),
        }
        counted = {
            what: len(v) if isinstance(v, list) else None for what, v in lengths.items()
        }
        if any(n != n_genes for n in counted.values()):
            facts.append(
                f"n_genes says {n_genes!r}, "
                + ", ".join(
                    f"{what} {n if n is not None else 'nothing'}"
                    for what, n in counted.items()
                )
            )
        elif isinstance(stats.get("std"), list) and not all(
            isinstance(v, (int, float)) and np.isfinite(v) and v > 0
            for v in stats["std"]
        ):
            facts.append("statistics.std holds values that are not positive numbers")
        if data.get("record_dtype") not in schema.RECORD_DTYPES:
            facts.append(f"record_dtype {data.get('record_dtype')!r} is not supported")
        labels = data.get("labels") or []
        splits = data.get("splits")
        if not isinstance(splits, dict) or not isinstance(labels, list):
            facts.append("splits or labels are malformed")
            splits = {}
        for name, split in splits.items():
            facts.extend(_split_inconsistency(name, split, labels))
        if not facts:
            return None
        return (
            f"{self.directory}: {MANIFEST} is inconsistent: "
            + "; ".join(facts[:3])
            + (f" (and {len(facts) - 3} more)" if len(facts) > 3 else "")
            + ". It was edited or damaged: restore it from the original folder or "
            "re-run the conversion"
        )

    @property
    def n_genes(self) -> int:
        return int(self.data["n_genes"])

    @property
    def genes(self) -> list[str]:
        return list(self.data["genes"])

    @property
    def labels(self) -> list[str]:
        return list(self.data.get("labels") or [])

    @property
    def record_dtype(self) -> str:
        return self.data["record_dtype"]

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.data["statistics"]["mean"], dtype=np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(self.data["statistics"]["std"], dtype=np.float32)

    @property
    def split_names(self) -> list[str]:
        splits = self.data.get("splits")
        return [s for s in schema.SPLITS if isinstance(splits, dict) and s in splits]

    def split(self, name: str) -> dict:
        splits = self.data["splits"]
        if name not in splits:
            raise DataError(
                f"{self.directory}: no split {name!r}; it has "
                f"{', '.join(self.split_names)}"
            )
        return splits[name]

    def num_records(self, split: str) -> int:
        return int(self.split(split)["num_records"])

    def shard_paths(self, split: str) -> list[str]:
        return [
            shard_path(self.directory, s["file"]) for s in self.split(split)["shards"]
        ]

    def digest(self) -> str:
        """sha256 of the manifest content: identifies the dataset a model saw."""
        text = json.dumps(self.data, sort_keys=True).encode("utf-8")
        return hashlib.sha256(text).hexdigest()
