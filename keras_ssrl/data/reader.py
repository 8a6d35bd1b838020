"""`load_dataset`: a TFRecord split as a `tf.data.Dataset` of standardised batches."""

from __future__ import annotations

import os

from keras_ssrl.data import schema
from keras_ssrl.data.errors import DamagedDataError, DataError
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.data.preprocessing import standardizer
from keras_ssrl.files import sha256_file

VERIFY_MODES = ("none", "size", "checksum")
# Records batched per parse when caching decoded values: large enough to amortise
# the per-call cost of parse_example, small enough to keep memory flat.
_PARSE_BATCH = 256
# Read-ahead per shard: records are 10-200 KB, so the 256 KB default would issue a read
# per record or two.
_READ_BUFFER = 8 << 20


def verify_shards(manifest: Manifest, split: str, mode: str = "size") -> None:
    """Checks that the shards of a split are present and intact before reading.

    `size` compares every shard's byte size with the manifest (cheap: catches missing
    and truncated shards); `checksum` also compares sha256 (reads every byte).

    Raises:
        DamagedDataError: naming the damaged shard and what to do.
    """
    import tensorflow as tf

    if mode not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {mode!r}")
    if mode == "none":
        return
    for shard, path in zip(
        manifest.split(split)["shards"], manifest.shard_paths(split)
    ):
        try:
            size = tf.io.gfile.stat(path).length
        except tf.errors.NotFoundError:
            raise DamagedDataError(
                f"{path}: shard listed in the manifest is missing; re-copy the dataset "
                "folder or re-run the conversion"
            ) from None
        if size != shard["bytes"]:
            raise DamagedDataError(
                f"{path}: shard is damaged ({size} bytes, the manifest says "
                f"{shard['bytes']}; truncated or overwritten). Re-copy it or re-run the "
                "conversion; tfrecords_tools/verify.py checks a whole folder."
            )
        if mode == "checksum" and sha256_file(path) != shard["sha256"]:
            raise DamagedDataError(
                f"{path}: shard is damaged (sha256 differs from the manifest). Re-copy "
                "it or re-run the conversion."
            )


def load_dataset(
    data_dir: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = False,
    repeat: bool = False,
    seed: int | None = None,
    shuffle_buffer: int = 2048,
    cache: bool | str = False,
    standardize: bool = True,
    with_labels: bool = True,
    with_sample_ids: bool = False,
    drop_remainder: bool = False,
    num_workers: int = 1,
    worker_index: int = 0,
    input_context=None,
    verify: str = "size",
    deterministic: bool | None = None,
):
    """Reads one split of a converted dataset as a `tf.data.Dataset`.

    The pipeline interleaves the split's shards in parallel, shuffles serialised
    records, batches, then parses and decodes a whole batch at once (vectorised), casts to
    float32 and standardises with the manifest's statistics (fitted on the pre-training
    split only) in the graph, and prefetches.

    Args:
        data_dir: str, a folder written by `tfrecords_tools/convert.py`; local, `gs://`,
            or `s3://` (through tensorflow-io) paths.
        split: str, one of `pretrain`, `pretrain_val`, `finetune`, `finetune_val`,
            `test`.
        batch_size: int, the global batch size (per input pipeline when
            `input_context` is given, Keras' distribution convention).
        shuffle: bool, shuffle shard order and records (each epoch anew).
        repeat: bool, repeat indefinitely.
        seed: optional int for a reproducible order.
        shuffle_buffer: int, records held by the shuffle buffer.
        cache: False, True (cache the decoded, standardised float32 values in memory
            during the first epoch) or a file path prefix (cache on disk). The cache
            holds 4 bytes per gene and sample, as an in-memory array would.
        standardize: bool, z-score every gene with the manifest statistics (True for
            training; False gives the stored transformed values).
        with_labels: bool, yield `(x, y)`; False yields `x` only (pre-training never
            reads labels). `y` is the class index, or -1 for unlabelled samples.
        with_sample_ids: bool, also yield the sample ids (`(x, y, ids)` or `(x, ids)`).
        drop_remainder: bool, drop the last incomplete batch.
        num_workers, worker_index: file-based sharding for multi-worker input: worker
            `i` reads shards `i, i + n, ...`.
        input_context: optional `tf.distribute.InputContext`; overrides the two above
            and divides `batch_size` into the per-pipeline batch.
        verify: `size` (default), `checksum` or `none`: shard checks before reading.
        deterministic: element order of the parallel interleave; default: deterministic
            unless shuffling without a seed.

    Returns:
        A `tf.data.Dataset`.

    Example:

    ```python
    ds = load_dataset("data/synthetic-tcga", "finetune", batch_size=8, shuffle=True)
    x, y = next(iter(ds))  # x: (8, n_genes) float32, y: (8,) int64
    ```
    """
    import tensorflow as tf

    manifest = Manifest.load(data_dir)
    problem = manifest.inconsistency()
    if problem:
        raise DamagedDataError(problem)
    files = manifest.shard_paths(split)
    verify_shards(manifest, split, verify)
    if input_context is not None:
        num_workers = input_context.num_input_pipelines
        worker_index = input_context.input_pipeline_id
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    files = _worker_files(files, data_dir, split, num_workers, worker_index)
    if deterministic is None:
        deterministic = seed is not None or not shuffle
    decode = _batch_decoder(
        manifest,
        standardize=standardize,
        with_labels=with_labels,
        with_sample_ids=with_sample_ids,
    )
    options = tf.data.Options()
    options.deterministic = deterministic
    ds = _records(files, shuffle=shuffle, seed=seed, deterministic=deterministic)
    if cache is not False:
        # Decode and standardise once, in large batches, and cache the float32 rows:
        # later epochs then cost what an in-memory array does (shuffle and batch).
        ds = ds.batch(_PARSE_BATCH).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.unbatch().cache("" if cache is True else str(cache))
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(
        batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE
    )
    if cache is False:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _worker_files(
    files: list[str], data_dir: str, split: str, num_workers: int, worker_index: int
) -> list[str]:
    """The shards of `split` that input worker `worker_index` of `num_workers` reads."""
    if num_workers <= 1:
        return files
    if len(files) < num_workers:
        raise DataError(
            f"{data_dir}: split {split!r} has {len(files)} shard(s), fewer "
            f"than the {num_workers} input workers; re-convert with --shards "
            f"{num_workers} or more"
        )
    return files[worker_index::num_workers]


def _records(files: list[str], *, shuffle: bool, seed: int | None, deterministic: bool):
    """The serialised records of `files`, read in parallel (shard order shuffled)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER),
        cycle_length=min(len(files), max(2, os.cpu_count() or 2)),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )


def _batch_decoder(
    manifest: Manifest, *, standardize: bool, with_labels: bool, with_sample_ids: bool
):
    """A graph function: a batch of serialised records -> the tuple `load_dataset`
    yields (float32 values, standardised if asked, then labels and ids if asked)."""
    import tensorflow as tf

    n_genes = manifest.n_genes
    record_dtype = manifest.record_dtype
    z_score = standardizer(manifest.mean, manifest.std)

    def decode(serialized):
        parsed = schema.parse_batch(serialized, n_genes, record_dtype)
        x = tf.cast(parsed[schema.EXPRESSION], tf.float32)
        if standardize:
            x = z_score(x)
        # Only what the caller asked for travels down the pipeline (and into a cache).
        rest = ()
        if with_labels:
            rest += (parsed[schema.LABEL],)
        if with_sample_ids:
            rest += (parsed[schema.SAMPLE_ID],)
        return (x, *rest) if rest else x

    return decode
