"""Re-writing a converted dataset onto another dataset's gene list.

The `archs4_to_tcga` setting pre-trains on one source and fine-tunes on another, on the
genes they share (docs/protocol.md, "Preprocessing": ARCHS4 -> TCGA used 55,747 common
genes). Both datasets must then hold the same genes in the same order. `rewrite_onto`
keeps the genes of a dataset that are also in a target list, in the target's order, and
writes a new folder with the same splits, shard layout and statistics (per-gene
statistics of the kept genes are unchanged, so nothing is refitted and nothing leaks).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Sequence

from keras_ssrl.config import ConversionConfig
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DamagedDataError, DataError
from keras_ssrl.data.genes import Alignment, align_genes
from keras_ssrl.data.integrity import clean_tf_error
from keras_ssrl.data.manifest import MANIFEST, SPLITS_CSV, Manifest, shard_path
from keras_ssrl.data.output import OutputFolder
from keras_ssrl.files import join, open_file, sha256_file, write_json_atomic


def target_genes(target: str) -> tuple[list[str], str]:
    """A gene list from a dataset folder (its manifest) or a text file (one per line)."""
    if os.path.isdir(target) or "://" in target:
        manifest = Manifest.load(target)
        return manifest.genes, os.path.basename(os.path.normpath(target))
    try:
        with open(target, encoding="utf-8") as handle:
            genes = [line.strip() for line in handle if line.strip()]
    except OSError as error:
        raise DataError(f"{target}: cannot read the gene list ({error})") from None
    if not genes:
        raise DataError(f"{target}: the gene list is empty")
    return genes, os.path.basename(target)


def _read_batches(manifest: Manifest, path: str):
    """Parsed batches of one shard as NumPy; a damaged shard is named, not a traceback."""
    import tensorflow as tf

    batches = (
        tf.data.TFRecordDataset(path)
        .batch(512)
        .map(lambda s: schema.parse_batch(s, manifest.n_genes, manifest.record_dtype))
        .as_numpy_iterator()
    )
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except tf.errors.OpError as error:
            raise DamagedDataError(
                f"{path}: unreadable record ({clean_tf_error(error)}); run "
                "tfrecords_tools/verify.py on the dataset, then re-copy or re-convert it"
            ) from None


def _rewrite_shard(manifest: Manifest, path: str, out_path: str, columns) -> int:
    """Copies one shard keeping only `columns` of every record; returns its count."""
    import tensorflow as tf

    count = 0
    with tf.io.TFRecordWriter(out_path) as writer:
        for batch in _read_batches(manifest, path):
            values = batch[schema.EXPRESSION][:, columns]
            for sid, row, label in zip(
                batch[schema.SAMPLE_ID], values, batch[schema.LABEL]
            ):
                writer.write(
                    schema.serialize_example(
                        sid.decode("utf-8"), row, int(label), manifest.record_dtype
                    )
                )
                count += 1
    return count


def rewrite_onto(
    data_dir: str,
    genes: Sequence[str],
    out_dir: str,
    *,
    target_name: str = "target",
    min_overlap: float = ConversionConfig.align_min_overlap,
    overwrite: bool = False,
    inputs: Sequence[str | None] = (),
    command: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Writes `data_dir` restricted to `genes` (in their order) into `out_dir`.

    Args:
        data_dir: str, a converted dataset folder.
        genes: the target gene list.
        out_dir: str, the new folder.
        target_name: how the manifest and messages name the target.
        min_overlap: float, refuse when fewer than this fraction of the target genes is
            found in the dataset.
        overwrite: bool, replace an existing dataset folder written by the converter
            (never a folder holding anything else).
        inputs: further inputs (the target's dataset folder or gene file): `out_dir`
            may not be, contain or lie inside them, nor `data_dir`.
        command: the command line, recorded in the manifest.
        log: callable receiving progress lines.

    Returns:
        The `Manifest` of the new dataset.

    Raises:
        DataError: a bad argument, input or output folder (checked before anything is
            written; nothing is left behind).
    """
    manifest = Manifest.load(data_dir)
    alignment = align_genes(
        manifest.genes,
        list(genes),
        min_overlap,
        source_name=str(data_dir),
        target_name=target_name,
    )
    output = OutputFolder(out_dir, overwrite, [str(data_dir), *inputs], log)
    log(
        f"{alignment.n_matched} of {alignment.n_target} genes of {target_name} found in "
        f"{data_dir} ({manifest.n_genes} genes); writing them in {target_name}'s order"
    )
    with output as tmp:
        data = copy.deepcopy(manifest.data)
        _rewrite_shards(manifest, data, tmp, alignment.source_indices)
        with (
            open_file(join(str(data_dir), SPLITS_CSV), "rb") as src,
            open(os.path.join(tmp, SPLITS_CSV), "wb") as dst,
        ):
            dst.write(src.read())
        _restrict_manifest(data, alignment, target_name, str(data_dir))
        data["command"] = list(command) if command is not None else list(sys.argv)
        write_json_atomic(os.path.join(tmp, MANIFEST), data)
    if alignment.n_matched < alignment.n_target:
        log(
            f"note: {alignment.n_target - alignment.n_matched} genes of {target_name} "
            f"are not in {data_dir}; re-write {target_name} onto {out_dir} as well so "
            "that both hold the same genes"
        )
    return Manifest.load(os.path.abspath(out_dir))


def _rewrite_shards(manifest: Manifest, data: dict, folder: str, columns) -> None:
    """Every shard of `manifest` into `folder`, keeping `columns`; updates `data`."""
    for split in manifest.split_names:
        for shard, path in zip(
            data["splits"][split]["shards"], manifest.shard_paths(split)
        ):
            out_path = shard_path(folder, shard["file"])
            shard.update(
                num_records=_rewrite_shard(manifest, path, out_path, columns),
                sha256=sha256_file(out_path),
                bytes=os.path.getsize(out_path),
            )


def _restrict_manifest(
    data: dict, alignment: Alignment, target_name: str, data_dir: str
) -> None:
    """Genes, statistics and the alignment record of the rewritten manifest `data`.

    Per-gene statistics are those of the kept genes, unchanged: nothing is refitted.
    """
    columns = alignment.source_indices
    stats = data["statistics"]
    stats["mean"] = [stats["mean"][c] for c in columns]
    stats["std"] = [stats["std"][c] for c in columns]
    data["genes"] = list(alignment.genes)
    data["n_genes"] = alignment.n_matched
    data["alignment"] = {
        "target": target_name,
        "rewritten_from": data_dir,
        **alignment.report(),
    }
