"""`load_dataset`: shapes, standardisation, caching, shuffling, sharding, damage."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from keras_ssrl.data import DataError, Manifest, load_dataset
from keras_ssrl.data.integrity import find_damaged_shards, inspect_dataset


def collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_batches_are_standardised_float32(dataset_dir):
    manifest = Manifest.load(dataset_dir)
    ds = load_dataset(dataset_dir, "pretrain", 16)
    x, y = next(iter(ds))
    assert x.dtype == tf.float32 and x.shape == (16, manifest.n_genes)
    assert y.dtype == tf.int64
    x, _ = collect(load_dataset(dataset_dir, "pretrain", 32))
    # Statistics come from the pre-training split: there, mean 0 and std 1 per gene.
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-3)
    raw, _ = collect(load_dataset(dataset_dir, "pretrain", 32, standardize=False))
    np.testing.assert_allclose((raw - manifest.mean) / manifest.std, x, atol=1e-5)


def test_labels_only_when_asked(dataset_dir):
    ds = load_dataset(dataset_dir, "pretrain", 8, with_labels=False)
    x = next(iter(ds))
    assert isinstance(x, tf.Tensor) and x.shape[0] == 8


def test_cache_gives_the_same_data(dataset_dir):
    plain = collect(load_dataset(dataset_dir, "finetune", 7))
    cached_ds = load_dataset(dataset_dir, "finetune", 7, cache=True)
    for _ in range(2):  # first epoch fills the cache, second reads it
        cached = collect(cached_ds)
        np.testing.assert_array_equal(plain[0], cached[0])
        np.testing.assert_array_equal(plain[1], cached[1])


def test_shuffle_repeat_and_seed(dataset_dir):
    n = Manifest.load(dataset_dir).num_records("pretrain")
    a = collect(load_dataset(dataset_dir, "pretrain", 10, shuffle=True, seed=1))
    b = collect(load_dataset(dataset_dir, "pretrain", 10, shuffle=True, seed=1))
    c = collect(load_dataset(dataset_dir, "pretrain", 10, shuffle=True, seed=2))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert len(a[0]) == n
    ds = load_dataset(
        dataset_dir, "pretrain", 10, shuffle=True, repeat=True, drop_remainder=True
    )
    batches = list(ds.take(3 * n // 10))
    assert all(x.shape[0] == 10 for x, _ in batches)


def test_worker_sharding_partitions_records(dataset_dir):
    everything = collect(load_dataset(dataset_dir, "pretrain", 50))[0]
    parts = [
        collect(
            load_dataset(dataset_dir, "pretrain", 50, num_workers=2, worker_index=i)
        )[0]
        for i in range(2)
    ]
    assert sum(len(p) for p in parts) == len(everything)
    joined = np.concatenate(parts)
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(joined), key(everything))
    with pytest.raises(DataError, match="fewer than the 9 input workers"):
        load_dataset(dataset_dir, "pretrain", 8, num_workers=9)


def test_input_context_sets_per_replica_batch(dataset_dir):
    context = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2
    )
    x, _ = next(iter(load_dataset(dataset_dir, "pretrain", 16, input_context=context)))
    assert x.shape[0] == 8


def test_unknown_split_and_folder(dataset_dir, tmp_path):
    with pytest.raises(DataError, match="no split 'train'"):
        load_dataset(dataset_dir, "train", 8)
    with pytest.raises(DataError, match="no manifest.json"):
        load_dataset(str(tmp_path), "pretrain", 8)


@pytest.fixture
def damaged(dataset_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    return copy


def test_truncated_shard_is_named_before_reading(damaged):
    shard = damaged / "pretrain-00001-of-00004.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(
        DataError, match="pretrain-00001-of-00004.tfrecord: shard is damaged"
    ):
        load_dataset(str(damaged), "pretrain", 8)
    os.remove(damaged / "pretrain-00002-of-00004.tfrecord")
    with pytest.raises(DataError, match="pretrain-00001.*damaged|00002.*missing"):
        load_dataset(str(damaged), "pretrain", 8)


def test_corrupted_shard_detected_at_read_time(damaged):
    shard = damaged / "finetune-00000-of-00001.tfrecord"
    if not shard.exists():
        shard = sorted(damaged.glob("finetune-*.tfrecord"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the record CRC can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        load_dataset(str(damaged), "finetune", 8, verify="checksum")
    with pytest.raises(tf.errors.DataLossError):
        collect(load_dataset(str(damaged), "finetune", 8))
    damaged_shards = find_damaged_shards(str(damaged), "finetune")
    assert len(damaged_shards) == 1 and shard.name in damaged_shards[0]
    report = inspect_dataset(str(damaged))
    assert not report.ok and all(shard.name in p for p in report.problems)


def test_inspect_passes_on_a_good_dataset(dataset_dir):
    report = inspect_dataset(dataset_dir)
    assert report.ok, report.problems
    assert report.records_checked == Manifest.load(dataset_dir).data["n_samples"]
    assert "pretrain" in report.summary()


def test_reads_through_tensorflow_filesystems(dataset_dir):
    """Non-local paths go through tf.io.gfile (TensorFlow's in-memory `ram://`
    filesystem stands in for gs:// and s3://, which need a network)."""
    remote = "ram://keras_ssrl_test/data"
    tf.io.gfile.makedirs(remote)
    for name in os.listdir(dataset_dir):
        tf.io.gfile.copy(
            os.path.join(dataset_dir, name), f"{remote}/{name}", overwrite=True
        )
    local = collect(load_dataset(dataset_dir, "test", 16))
    from_ram = collect(load_dataset(remote, "test", 16, verify="checksum"))
    np.testing.assert_array_equal(local[0], from_ram[0])
    assert inspect_dataset(remote).ok


def test_works_without_tensorflow_io(monkeypatch):
    import sys

    from keras_ssrl import filesystems

    monkeypatch.setitem(sys.modules, "tensorflow_io", None)  # import fails
    monkeypatch.setattr(filesystems, "_registered", None)
    assert filesystems.register() is False
