"""Deterministic, stratified splits (docs/protocol.md, "Splits").

Each labelled dataset is split, stratified by class, into an unlabelled pre-training set,
a labelled fine-tuning set and a test set the size of the fine-tuning set; 15% of the
pre-training and of the fine-tuning set are held out for validation. Every class keeps at
least one sample in the test set and in the fine-tuning training and validation sets, so
that the label-fraction protocol can keep one example per class. `small_split_warnings`
flags a test split too small to measure anything (`MIN_TEST_SAMPLES`,
`MIN_TEST_PER_CLASS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keras_ssrl.config import SplitConfig
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError

# A test split smaller than this (or with fewer samples of some class) measures mostly
# noise: one sample is 3% of accuracy, and a class's recall moves in steps of 20% or
# more. The converter warns, naming the flags that size the split.
MIN_TEST_SAMPLES = 30
MIN_TEST_PER_CLASS = 5


def resolve_size(size: float | None, total: int, name: str) -> int:
    """A fraction (0 < f < 1) of `total`, or a count (an integer >= 1)."""
    if size is None or size == 0:
        return 0
    if 0 < size < 1:
        return int(round(size * total))
    if size >= 1 and float(size).is_integer():
        if size > total:
            raise DataError(
                f"--{name} {int(size)} exceeds the {total} samples available"
            )
        return int(size)
    raise DataError(
        f"--{name} must be a fraction between 0 and 1 or a whole count, got {size}"
    )


def allocate(counts: np.ndarray, total: int, minimum: int = 0) -> np.ndarray:
    """Splits `total` over groups proportionally to `counts` (largest remainder).

    Each group gets at least `minimum` (and never more than it has); the result sums to
    `total` whenever that is possible.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() == 0:
        return np.zeros_like(counts)
    quota = counts * (total / counts.sum())
    result = np.minimum(np.maximum(np.floor(quota).astype(np.int64), minimum), counts)
    # What each group still lacks of its quota: a group raised to `minimum` already
    # holds more than its share and is served last.
    remainder = quota - result
    # Hand out the missing units by largest remainder, then take surplus units back from
    # the groups furthest above their quota; stable orders keep this deterministic.
    for _ in range(int(abs(total - result.sum())) + len(counts)):
        diff = total - int(result.sum())
        if diff == 0:
            break
        if diff > 0:
            room = result < counts
            if not room.any():
                break
            candidates = np.flatnonzero(room)
            best = candidates[np.argsort(-remainder[candidates], kind="stable")]
            result[best[: min(diff, len(best))]] += 1
            remainder[best[: min(diff, len(best))]] = -1
        else:
            room = result > minimum
            if not room.any():
                break
            candidates = np.flatnonzero(room)
            excess = (result - quota)[candidates]
            best = candidates[np.argsort(-excess, kind="stable")]
            result[best[: min(-diff, len(best))]] -= 1
    return result


def assign_splits(
    labels: Sequence[str | None] | None,
    config: SplitConfig,
    n_samples: int | None = None,
) -> np.ndarray:
    """Assigns every sample to one split.

    Args:
        labels: one class name per sample (None for samples without a label, which go
            to the pre-training split), or None for an unlabelled dataset (then every
            sample is pre-training data unless sizes ask otherwise).
        config: a `SplitConfig`.
        n_samples: number of samples, needed when `labels` is None.

    Returns:
        A string array of split names (see `schema.SPLITS`), one per sample.

    Raises:
        DataError: a class with fewer than `config.min_class_size` samples, or sizes that
            leave no pre-training data.
    """
    rng = np.random.default_rng(config.seed)
    if labels is None:
        n = int(n_samples)
        split = np.full(n, schema.PRETRAIN, dtype=object)
        order = rng.permutation(n)
        n_val = int(round(config.val_fraction * n))
        split[order[:n_val]] = schema.PRETRAIN_VAL
        return split.astype(str)

    labels = list(labels)
    classes, members = _classes(labels, config)
    sizes = np.array([len(members[c]) for c in classes])
    n_finetune, n_test = _labelled_sizes(
        sum(lab is not None for lab in labels), len(classes), config
    )
    test_per_class = allocate(sizes, n_test, minimum=1 if n_test else 0)
    finetune_per_class = allocate(
        sizes - test_per_class, n_finetune, minimum=2 if n_finetune else 0
    )
    n_finetune_val = int(round(config.val_fraction * n_finetune))
    finetune_val_per_class = allocate(
        finetune_per_class, n_finetune_val, minimum=1 if n_finetune else 0
    )
    split = np.full(len(labels), schema.PRETRAIN, dtype=object)
    for k, c in enumerate(classes):
        index = rng.permutation(members[c])
        t, f, fv = test_per_class[k], finetune_per_class[k], finetune_val_per_class[k]
        split[index[:t]] = schema.TEST
        split[index[t : t + fv]] = schema.FINETUNE_VAL
        split[index[t + fv : t + f]] = schema.FINETUNE
    _hold_out_pretrain_val(split, labels, config.val_fraction, rng)
    return split.astype(str)


def _classes(
    labels: list[str | None], config: SplitConfig
) -> tuple[list[str], dict[str, np.ndarray]]:
    """The sorted classes and the samples of each; refuses classes too small to split."""
    classes = sorted({lab for lab in labels if lab is not None})
    if not classes:
        raise DataError("no sample has a label")
    members = {c: np.flatnonzero([lab == c for lab in labels]) for c in classes}
    small = [
        (c, len(members[c])) for c in classes if len(members[c]) < config.min_class_size
    ]
    if small:
        raise DataError(
            f"{len(small)} class(es) are too small to stratify (need at least "
            f"{config.min_class_size} samples: one each for test, fine-tuning training "
            "and validation, pre-training training and validation): "
            + ", ".join(f"{c!r} has {s}" for c, s in small[:10])
            + ". Merge them into other classes, or pass --drop-small-classes to leave "
            "their samples out (they are counted in the report)."
        )
    return classes, members


def _labelled_sizes(
    n_labelled: int, n_classes: int, config: SplitConfig
) -> tuple[int, int]:
    """(fine-tuning, test) sample counts, raised so that every class fits in each."""
    n_finetune = resolve_size(config.finetune_size, n_labelled, "finetune-size")
    test_size = config.finetune_size if config.test_size is None else config.test_size
    n_test = resolve_size(test_size, n_labelled, "test-size")
    if n_finetune and n_finetune < 2 * n_classes:
        n_finetune = 2 * n_classes
    if n_test and n_test < n_classes:
        n_test = n_classes
    if n_finetune + n_test >= n_labelled:
        raise DataError(
            f"fine-tuning ({n_finetune}) and test ({n_test}) sizes leave no "
            f"pre-training data out of {n_labelled} labelled samples; lower "
            "--finetune-size / --test-size"
        )
    return n_finetune, n_test


def _hold_out_pretrain_val(
    split: np.ndarray,
    labels: list[str | None],
    val_fraction: float,
    rng: np.random.Generator,
) -> None:
    """Moves a stratified `val_fraction` of the pre-training samples to validation.

    Strata are the classes and the unlabelled samples; `split` is changed in place.
    """
    pool = np.flatnonzero(split == schema.PRETRAIN)
    keys = np.array([labels[i] if labels[i] is not None else "" for i in pool])
    groups = sorted(set(keys))
    group_sizes = np.array([(keys == g).sum() for g in groups])
    val_per_group = allocate(group_sizes, int(round(val_fraction * len(pool))))
    for g, n_val in zip(groups, val_per_group):
        index = rng.permutation(pool[keys == g])
        split[index[:n_val]] = schema.PRETRAIN_VAL


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
