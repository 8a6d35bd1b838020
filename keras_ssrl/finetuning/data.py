"""The labelled splits fine-tuning reads, and the subsets it trains on.

Owns `check_labelled_splits` (refuses a dataset with fewer than 2 classes, warns about a
tiny test split, from the manifest alone), `load_finetune_data` (the `finetune`,
`finetune_val` and `test` splits in memory, standardised, cached per folder), and the
stratified subsets of the label-efficiency protocol (`subset_seed`, `stratified_subset`:
the same (p, repeat) gives every method the same subset; docs/protocol.md, "Label
efficiency and AUPC"), and `check_subset`, which both trainers use to refuse a subset
that does not index the training split.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.manifest import Manifest
from keras_ssrl.data.splits import MIN_TEST_PER_CLASS, MIN_TEST_SAMPLES, allocate
from keras_ssrl.finetuning.settings import FinetuneError
from keras_ssrl.training import naming_damaged_shards

# The splits fine-tuning reads, in `FinetuneData`'s order.
FINETUNE_SPLITS = (schema.FINETUNE, schema.FINETUNE_VAL, schema.TEST)


def _label_counts(manifest: Manifest, split: str) -> dict[str, int] | None:
    """Samples per class of a split, as the converter recorded them (None: unknown)."""
    counts = manifest.split(split).get("label_counts")
    return None if counts is None else {k: int(v) for k, v in counts.items()}


def check_labelled_splits(manifest: Manifest, log=None) -> list[str]:
    """Refuses a dataset fine-tuning cannot learn from; warns when its test is tiny.

    Reads only the manifest, so it runs before any data is read. With one class an
    accuracy of 1.0 says nothing about the model; with a test split of fewer than
    `MIN_TEST_SAMPLES` samples, or fewer than `MIN_TEST_PER_CLASS` of a class, one
    sample moves the accuracy (or a class's recall) by several points.

    Args:
        manifest: the dataset's `Manifest`.
        log: optional callable receiving each warning (prefixed `warning: `).

    Returns:
        The warnings (empty when the test split is large enough).

    Raises:
        FinetuneError: the dataset, or its fine-tuning split, has fewer than 2
            classes (the message names the dataset and the class count).
    """
    where, labels = manifest.directory, manifest.labels
    if len(labels) < 2:
        raise FinetuneError(
            f"{where}: the dataset has {len(labels)} class"
            f"{'' if len(labels) == 1 else 'es'} ({', '.join(labels) or 'no labels'}); "
            "fine-tuning and evaluation need at least 2 classes to measure anything. "
            "Convert a dataset with a label column (or label file) of 2 or more classes."
        )
    trained = _label_counts(manifest, schema.FINETUNE)
    present = labels if trained is None else [c for c in labels if trained.get(c, 0)]
    if len(present) < 2:
        raise FinetuneError(
            f"{where}: the fine-tuning split has {len(present)} class"
            f"{'' if len(present) == 1 else 'es'} ({', '.join(present) or 'none'}); "
            "fine-tuning needs at least 2. Re-convert with a larger --finetune-size "
            "(tfrecords_tools/convert.py)."
        )
    size = manifest.num_records(schema.TEST)
    tested = _label_counts(manifest, schema.TEST)
    few = (
        []
        if tested is None
        else [c for c in present if tested.get(c, 0) < MIN_TEST_PER_CLASS]
    )
    if size >= MIN_TEST_SAMPLES and not few:
        return []
    detail = f"{size} samples" + (
        f"; {len(few)} of {len(present)} classes have fewer than {MIN_TEST_PER_CLASS}, "
        f"e.g. {preview([f'{c} ({tested.get(c, 0)})' for c in few], 2)}"
        if few
        else ""
    )
    warnings = [
        f"{where}: the test split is too small to measure much ({detail}); re-convert "
        "with a larger --test-size (or --finetune-size) of tfrecords_tools/convert.py"
    ]
    for warning in warnings if log is not None else ():
        log(f"warning: {warning}")
    return warnings


@dataclasses.dataclass
class LabelledSplit:
    """One labelled split in memory: standardised values, class indices, sample ids."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str]


@dataclasses.dataclass
class FinetuneData:
    """The splits fine-tuning reads, in memory (they are small: a few thousand rows)."""

    data_dir: str
    manifest: Manifest
    train: LabelledSplit
    val: LabelledSplit
    test: LabelledSplit

    @property
    def classes(self) -> list[str]:
        return self.manifest.labels

    @property
    def n_genes(self) -> int:
        return self.manifest.n_genes


def _read_split(data_dir: str, split: str) -> LabelledSplit:
    from keras_ssrl.data.reader import load_dataset

    xs, ys, ids = [], [], []
    ds = load_dataset(data_dir, split, 1024, with_labels=True, with_sample_ids=True)
    for x, y, sid in ds.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
        ids.extend(s.decode("utf-8") for s in sid)
    if not xs:
        raise DataError(f"{data_dir}: split {split!r} is empty; fine-tuning needs it")
    y = np.concatenate(ys).astype(np.int32)
    unlabelled = int((y < 0).sum())
    if unlabelled:
        raise DataError(
            f"{data_dir}: split {split!r} has {unlabelled} unlabelled sample(s) (e.g. "
            f"{ids[int(np.flatnonzero(y < 0)[0])]}); fine-tuning splits must be "
            "labelled. Re-convert with a label for every sample outside pre-training."
        )
    return LabelledSplit(np.concatenate(xs).astype(np.float32), y, ids)


@functools.lru_cache(maxsize=4)
def load_finetune_data(data_dir: str) -> FinetuneData:
    """Reads `finetune`, `finetune_val` and `test` of a converted, labelled dataset.

    Values are standardised with the manifest statistics (fitted on the pre-training
    split only). Cached per folder: a sweep reads each dataset once.

    Raises:
        FinetuneError: fewer than 2 classes (`check_labelled_splits`).
        DataError: unreadable or unlabelled splits; `DamagedDataError` names a shard
            whose records cannot be read.
    """
    manifest = Manifest.load(data_dir)
    check_labelled_splits(manifest)
    with naming_damaged_shards(data_dir, FINETUNE_SPLITS):
        return FinetuneData(
            data_dir, manifest, *(_read_split(data_dir, s) for s in FINETUNE_SPLITS)
        )


def subset_seed(seed: int, fraction: float, repeat: int) -> int:
    """The seed of the (p, repeat) subset and initialisation: shared by every method.

    Different repeats get unrelated seeds (docs/protocol.md, "Label efficiency and
    AUPC": the authors' code reused one split seed for every repeat; we do not).
    """
    state = np.random.SeedSequence([int(seed), int(repeat), round(fraction * 10_000)])
    return int(state.generate_state(1)[0] & 0x7FFFFFFF)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified fraction of `labels`, at least one per class present.

    Class sizes follow the class frequencies (largest remainder), so the subset keeps
    the class balance; the indices are returned sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise FinetuneError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(
        labels, return_inverse=True, return_counts=True
    )
    total = max(int(round(fraction * len(labels))), len(classes))
    per_class = allocate(counts, total, minimum=1)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(inverse == c), size=int(n), replace=False)
        for c, n in enumerate(per_class)
    ]
    return np.sort(np.concatenate(chosen))


def check_subset(subset, n_train: int) -> np.ndarray:
    """`subset` as int32 indices, refused unless it picks rows of the training split.

    Args:
        subset: indices into the training split (e.g. from `stratified_subset`).
        n_train: the number of samples in the training split.

    Returns:
        The indices as a 1-D int32 array.

    Raises:
        FinetuneError: a subset that is empty, not 1-D, not integer, or indexes
            outside `[0, n_train)`.
    """
    subset = np.asarray(subset)
    if subset.ndim != 1 or not len(subset) or subset.dtype.kind not in "iu":
        raise FinetuneError(
            f"subset must be a non-empty 1-D array of integer indices into the "
            f"training split, got shape {subset.shape} and dtype {subset.dtype}; "
            "draw it with stratified_subset(data.train.y, fraction, seed)"
        )
    outside = subset[(subset < 0) | (subset >= n_train)]
    if len(outside):
        raise FinetuneError(
            f"subset index {int(outside[0])} is outside the training split "
            f"({n_train} samples): indices must be in [0, {n_train})"
        )
    return subset.astype(np.int32)
