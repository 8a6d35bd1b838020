"""Fine-tuning: one routine for the non-pre-trained baseline, frozen and unfrozen encoders.

A classifier is the shared MLP encoder plus one `Dense(n_classes)` head producing logits
(the softmax lives in the loss: protocol.md forbids a softmax before a cross-entropy).
`Finetuner` trains it on a labelled subset with Adam, batch 8, early stopping on the
validation loss and restores the best epoch (protocol.md, "Fine-tuning").

Why `Finetuner` has its own small loop rather than `Model.fit`: the label-efficiency
protocol is thousands of tiny runs (a few hundred samples, batch 8). `fit` traces new
graphs for every new model and pays a per-epoch cost (iterators, callbacks, a separate
validation pass) that dominates such runs. `Finetuner` builds its model and its graphs
once, and for each run only re-initialises the weights and the optimizer, then runs a
whole epoch (every step, plus the validation loss) in one graph call. In `frozen` mode
the encoder is a fixed function (weights untouched, BatchNorm in inference mode), so its
embeddings are computed once per encoder and only the head is trained on them: the same
model, without recomputing the encoder at every step.

Run folder written by `finetune` (`scripts/finetune.py`):

- `classifier.keras`: float32 functional model, input `expression` (standardised values,
  in the dataset's gene order) -> logits; `get_layer("encoder")` is the encoder and the
  head is the `Dense` layer `head`.
- `config.json`: kind, method, mode, labels (in logit order), data, encoder run, settings.
- `history.csv` (epoch, loss, val_loss), `metrics.json` (test accuracy, balanced
  accuracy, macro-F1, confusion matrix, epochs, best epoch, seconds).

`finetune` checks every setting, the encoder run, the dataset (at least 2 classes,
`check_labelled_splits`) and the output folder before it trains; nothing is written
before then. It holds an exclusive lock on the output folder while it trains and writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import time
import zipfile
from collections.abc import Callable

import numpy as np

from keras_ssrl import __version__
from keras_ssrl.config import EncoderConfig, FinetuneConfig, PretrainConfig, to_dict
from keras_ssrl.data import schema
from keras_ssrl.data.convert import MIN_TEST_PER_CLASS, MIN_TEST_SAMPLES
from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.manifest import (
    Manifest,
    atomic_path,
    genes_digest,
    write_json_atomic,
)
from keras_ssrl.data.splits import allocate
from keras_ssrl.files import remove_stale_temporaries
from keras_ssrl.training import (
    ConfigError,
    check_output_folder,
    check_outside,
    locked_folder,
    naming_damaged_shards,
    stale_temporaries_pattern,
    validate_config,
)

CLASSIFIER_FILE = "classifier.keras"
CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
HISTORY_CSV = "history.csv"
MODES = ("frozen", "unfrozen")
# The splits fine-tuning reads, in `FinetuneData`'s order.
FINETUNE_SPLITS = (schema.FINETUNE, schema.FINETUNE_VAL, schema.TEST)
BASELINE = "baseline"
# Rows per graph call when embedding or scoring a whole split.
_CHUNK = 2048


class FinetuneError(ValueError):
    """An invalid fine-tuning request (settings, encoder run or output folder)."""


def validate_finetune_config(config: FinetuneConfig) -> None:
    """Checks every fine-tuning setting; raises `FinetuneError` naming it.

    Called before any data is read or anything written. NaN fails every comparison
    below, so it is refused like any other value out of range.
    """
    if config.mode not in MODES:
        raise FinetuneError(
            f"mode must be one of {', '.join(MODES)}, got {config.mode!r}"
        )
    if not 0.0 < config.fraction <= 1.0:
        raise FinetuneError(f"fraction must be in (0, 1], got {config.fraction}")
    for name in ("repeat", "seed"):
        if not getattr(config, name) >= 0:
            raise FinetuneError(f"{name} must be >= 0, got {getattr(config, name)}")
    for name in ("batch_size", "max_epochs", "patience"):
        if not getattr(config, name) >= 1:
            raise FinetuneError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not 0 < config.learning_rate < math.inf:
        raise FinetuneError(
            f"learning_rate must be a finite number > 0, got {config.learning_rate}"
        )


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


# ----------------------------------------------------------------------------- data


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

    Different repeats get unrelated seeds (protocol.md: the authors' code reused one
    split seed for every repeat; we do not).
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


# --------------------------------------------------------------------------- metrics


def classification_metrics(y_true, y_pred, n_classes: int) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and the confusion matrix.

    Balanced accuracy and macro-F1 average over the classes present in `y_true` (and, for
    F1, predicted), as scikit-learn does.
    """
    from sklearn import metrics

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    return {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
        ),
        "confusion_matrix": metrics.confusion_matrix(
            y_true, y_pred, labels=np.arange(n_classes)
        ).tolist(),
    }


# ---------------------------------------------------------------------------- models


def build_classifier(encoder, n_classes: int, name: str = "classifier"):
    """Encoder + `Dense(n_classes)` head producing logits (float32)."""
    import keras

    inputs = keras.Input(shape=encoder.input_shape[1:], name="expression")
    head = keras.layers.Dense(n_classes, name="head", dtype="float32")
    return keras.Model(inputs, head(encoder(inputs)), name=name)


def pretraining_record(run_dir: str) -> dict:
    """The `config.json` of a pre-training run, refusing anything else.

    Raises:
        FinetuneError: no such folder, no or an unreadable `config.json`, or the record
            of something else (a fine-tuning run, a dataset).
    """
    from keras_ssrl.training import RunDirError, load_run_config

    hint = "pass the RUN_DIR given to scripts/pretrain.py --out"
    try:
        record = load_run_config(run_dir)
    except RunDirError as error:
        raise FinetuneError(f"{error}; {hint}") from None
    if record is None:
        raise FinetuneError(
            f"{run_dir}: not a pre-training run folder (no config.json); {hint}"
        )
    encoder = (record.get("config") or {}).get("encoder")
    if (
        record.get("kind") not in (None, "pretrain")
        or not isinstance(record.get("method"), str)
        or not isinstance(encoder, dict)
        or not {"layers", "width", "dropout"} <= set(encoder)
    ):
        raise FinetuneError(
            f"{run_dir}: not a pre-training run folder (its config.json records "
            f"{record.get('kind') or 'no encoder'}); {hint}"
        )
    return record


def encoder_config_of(run_dir: str) -> EncoderConfig:
    """The encoder architecture recorded by a pre-training run."""
    values = pretraining_record(run_dir)["config"]["encoder"]
    return EncoderConfig(**{k: values[k] for k in ("layers", "width", "dropout")})


def load_encoder_weights(run_dir: str, manifest: Manifest) -> list[np.ndarray]:
    """Weights of a pre-training run's encoder, checked against the dataset's genes."""
    import keras

    from keras_ssrl.training import ENCODER_FILE, load_run_config

    path = os.path.join(run_dir, ENCODER_FILE)
    if not os.path.exists(path):
        raise FinetuneError(
            f"{run_dir}: no {ENCODER_FILE}; the pre-training run did not finish "
            "(resume it with scripts/pretrain.py --resume)"
        )
    record = load_run_config(run_dir) or {}
    digest = record.get("data", {}).get("genes_sha256")
    if digest is not None and digest != genes_digest(manifest.genes):
        raise FinetuneError(
            f"{run_dir}: the encoder was pre-trained on another gene list than "
            f"{manifest.directory} ({record['data'].get('n_genes')} vs "
            f"{manifest.n_genes} genes); align the datasets with tfrecords_tools/align.py"
        )
    try:
        # Keras reports a file that is not a zip archive as "File not found".
        if not zipfile.is_zipfile(path):
            raise ValueError("not a .keras archive")
        encoder = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - whatever is wrong, the file is bad
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FinetuneError(
            f"{path}: cannot load the encoder ({reason[:200]}); the file is damaged: "
            "re-copy the run folder or re-run the pre-training"
        ) from None
    if encoder.input_shape[-1] != manifest.n_genes:
        raise FinetuneError(
            f"{path}: the encoder takes {encoder.input_shape[-1]} genes, the dataset "
            f"has {manifest.n_genes}"
        )
    return encoder.get_weights()


@dataclasses.dataclass
class RunResult:
    """What one fine-tuning run produced."""

    metrics: dict
    history: list[dict]
    epochs: int
    best_epoch: int
    n_train: int
    seconds: float


class Finetuner:
    """Fine-tunes one classifier architecture on many subsets, reusing its graphs.

    Args:
        n_genes, n_classes: the dataset's shape.
        encoder_config: the encoder architecture (of the pre-trained run, or the
            baseline's).
        mode: `unfrozen` or `frozen`.
        config: a `FinetuneConfig` (learning rate, batch size, epochs, patience).

    Example:

    ```python
    tuner = Finetuner(data.n_genes, len(data.classes), EncoderConfig(), "unfrozen",
                      FinetuneConfig())
    result = tuner.run(data, subset, seed=1, encoder_weights=weights)
    ```
    """

    def __init__(
        self,
        n_genes: int,
        n_classes: int,
        encoder_config: EncoderConfig,
        mode: str,
        config: FinetuneConfig,
    ):
        import keras
        import tensorflow as tf

        from keras_ssrl.encoders import build_encoder

        if mode not in MODES:
            raise FinetuneError(f"mode must be one of {MODES}, got {mode!r}")
        validate_finetune_config(config)
        self.n_genes, self.n_classes = n_genes, n_classes
        self.encoder_config, self.mode, self.config = encoder_config, mode, config
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("float32")
        try:
            self.encoder = build_encoder(
                n_genes,
                encoder_config.layers,
                encoder_config.width,
                encoder_config.dropout,
            )
            self.classifier = build_classifier(self.encoder, n_classes)
        finally:
            keras.config.set_dtype_policy(previous)
        self.head = self.classifier.get_layer("head")
        # Frozen without dropout: the encoder is a fixed function, so train the head on
        # embeddings computed once. With dropout the encoder is random in training, so
        # the whole classifier runs at every step (its encoder still frozen).
        self.precompute = mode == "frozen" and not encoder_config.dropout
        if mode == "frozen":
            self.encoder.trainable = False  # Keras 3: BatchNorm also runs in inference
        self.trainable = (
            self.head.trainable_variables
            if self.precompute
            else self.classifier.trainable_variables
        )
        self.optimizer = keras.optimizers.Adam(config.learning_rate)
        self.optimizer.build(self.trainable)
        self._fresh_optimizer = [v.numpy() for v in self.optimizer.variables]
        self._loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        width = encoder_config.width if self.precompute else n_genes
        spec = tf.TensorSpec([None, width], tf.float32)
        index = tf.TensorSpec([None], tf.int32)
        # One XLA cluster per step: at batch 8 the step's cost is Adam's passes over the
        # first layer's weights (genes x width), which XLA fuses into one (3-4x faster
        # on CPU). Shapes are static per batch size, so at most `batch_size` compiles.
        self._step = tf.function(self._train_step, jit_compile=True)
        self._epoch = tf.function(
            self._train_epoch, input_signature=[spec, index, index, spec, index]
        )
        self._logits = tf.function(self._forward_infer, input_signature=[spec])
        self._embed = tf.function(
            lambda x: self.encoder(x, training=False),
            input_signature=[tf.TensorSpec([None, n_genes], tf.float32)],
        )
        self._features_of: tuple | None = None
        self._encoder_holds: str | None = None
        # What training can change, saved at the best epoch: in frozen mode the head
        # only; unfrozen, every variable (BatchNorm moving statistics included).
        self._mutable = (
            self.head.variables if mode == "frozen" else self.classifier.variables
        )

    # Graph functions: traced once per Finetuner.
    def _forward(self, x, training):
        if self.precompute:
            return self.head(x)
        return self.classifier(x, training=training)

    def _forward_infer(self, x):
        return self._forward(x, False)

    def _train_epoch(self, x, y, order, x_val, y_val):
        import tensorflow as tf

        batch = self.config.batch_size
        n = tf.shape(order)[0]
        steps = (n + batch - 1) // batch
        total = tf.constant(0.0)
        for i in tf.range(steps):
            idx = order[i * batch : (i + 1) * batch]
            loss = self._step(tf.gather(x, idx), tf.gather(y, idx))
            total += loss * tf.cast(tf.shape(idx)[0], tf.float32)
        val_loss = self._loss(y_val, self._forward(x_val, False))
        return total / tf.cast(n, tf.float32), val_loss

    def _train_step(self, x, y):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = self._loss(y, self._forward(x, True))
        grads = tape.gradient(loss, self.trainable)
        self.optimizer.apply(grads, self.trainable)
        return loss

    def _chunked(self, fn, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            raise DataError("nothing to evaluate: the split is empty")
        return np.concatenate(
            [fn(x[i : i + _CHUNK]).numpy() for i in range(0, len(x), _CHUNK)]
        )

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits of standardised values (or of embeddings in precomputed frozen mode)."""
        return self._chunked(self._logits, x)

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self._chunked(self._embed, x)

    def reset(
        self,
        seed: int,
        encoder_weights: list[np.ndarray] | None,
        encoder_key: str | None = None,
    ) -> None:
        """Fresh head (and baseline encoder) from `seed`; optimizer state cleared.

        Variables are re-drawn from their layers' initialisers and assigned in place,
        which keeps this model, its variables and its traced graphs.
        """
        import keras

        rng = np.random.default_rng(seed)
        keras.utils.set_random_seed(seed)  # dropout and anything else drawn later
        _reinitialize(self.head, rng)
        if encoder_weights is None:
            _reinitialize(self.encoder, rng)
            self._encoder_holds = None
        elif encoder_key is None or self._encoder_holds != encoder_key:
            self.encoder.set_weights(encoder_weights)
            # Frozen training never changes the encoder: no reload while it holds them.
            self._encoder_holds = encoder_key if self.mode == "frozen" else None
        for variable, value in zip(self.optimizer.variables, self._fresh_optimizer):
            variable.assign(value)

    def _features(self, data: FinetuneData, key) -> tuple[np.ndarray, ...]:
        splits = (data.train.x, data.val.x, data.test.x)
        if not self.precompute:
            return splits
        # Embeddings depend only on the (fixed) encoder weights: reuse them across the
        # subsets and repeats of one encoder.
        if self._features_of is None or self._features_of[0] != key:
            self._features_of = (key, tuple(self.embed(x) for x in splits))
        return self._features_of[1]

    def run(
        self,
        data: FinetuneData,
        subset: np.ndarray,
        seed: int,
        encoder_weights: list[np.ndarray] | None,
        encoder_key: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> RunResult:
        """Trains on `data.train[subset]` with early stopping; scores on the test split.

        Args:
            data: the dataset's fine-tuning splits.
            subset: indices into the training split.
            seed: seed of the head (and baseline encoder) initialisation and of the
                batch order.
            encoder_weights: pre-trained encoder weights, or None for the baseline.
            encoder_key: identifies `encoder_weights` (frozen embeddings are reused
                while it is unchanged); None disables the reuse.
            log: optional callable receiving one line per epoch.
        """
        import tensorflow as tf

        if self.mode == "frozen" and encoder_weights is None:
            raise FinetuneError("frozen fine-tuning needs a pre-trained encoder")
        started = time.perf_counter()
        self.reset(seed, encoder_weights, encoder_key)
        key = encoder_key if encoder_key is not None else object()
        x_train, x_val, x_test = self._features(data, key)
        x_train = tf.constant(x_train)
        y_train = tf.constant(data.train.y)
        x_val_t, y_val = tf.constant(x_val), tf.constant(data.val.y)
        rng = np.random.default_rng(seed)
        subset = np.asarray(subset, dtype=np.int32)
        best, best_epoch, best_weights, history = np.inf, 0, None, []
        cfg = self.config
        epoch = 0
        for epoch in range(1, cfg.max_epochs + 1):
            order = tf.constant(rng.permutation(subset))
            loss, val_loss = self._epoch(x_train, y_train, order, x_val_t, y_val)
            loss, val_loss = float(loss), float(val_loss)
            history.append({"epoch": epoch, "loss": loss, "val_loss": val_loss})
            if log is not None:
                log(f"epoch {epoch}: loss {loss:.4f}, val_loss {val_loss:.4f}")
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"fine-tuning loss became {loss} at epoch {epoch}; lower the "
                    "learning rate"
                )
            if val_loss < best:
                best, best_epoch = val_loss, epoch
                best_weights = [v.numpy() for v in self._mutable]
            elif epoch - best_epoch >= cfg.patience:
                break
        for variable, value in zip(self._mutable, best_weights):
            variable.assign(value)
        predictions = self.logits(x_test).argmax(axis=1)
        metrics = classification_metrics(data.test.y, predictions, self.n_classes)
        return RunResult(
            metrics=metrics,
            history=history,
            epochs=epoch,
            best_epoch=best_epoch,
            n_train=int(len(subset)),
            seconds=time.perf_counter() - started,
        )


def _reinitialize(model, rng: np.random.Generator) -> None:
    """Re-draws every variable of `model`'s layers from the layer's own initialisers.

    Each initialiser is rebuilt with a seed drawn from `rng` (Keras initialisers fix
    their seed when constructed, so calling the layer's own would repeat its values).
    """
    import keras

    def fresh(initializer, variable):
        config = initializer.get_config()
        if "seed" in config:
            config["seed"] = int(rng.integers(2**31 - 1))
        value = type(initializer).from_config(config)(variable.shape, variable.dtype)
        variable.assign(value)

    for layer in model.layers if hasattr(model, "layers") else [model]:
        if isinstance(layer, keras.layers.Dense):
            fresh(layer.kernel_initializer, layer.kernel)
            if layer.use_bias:
                fresh(layer.bias_initializer, layer.bias)
        elif isinstance(layer, keras.layers.BatchNormalization):
            for name in ("gamma", "beta", "moving_mean", "moving_variance"):
                variable = getattr(layer, name, None)
                if variable is not None:
                    fresh(getattr(layer, f"{name}_initializer"), variable)
        elif layer.weights:
            raise FinetuneError(
                f"cannot re-initialise layer {layer.name!r} ({type(layer).__name__})"
            )


# -------------------------------------------------------------------- one run, on disk


def finetune(
    data_dir: str | None,
    out_dir: str,
    *,
    encoder_run: str | None = None,
    config: FinetuneConfig | None = None,
    encoder_config: EncoderConfig | None = None,
    log: Callable[[str], None] = print,
    command: list[str] | None = None,
) -> dict:
    """Fine-tunes a pre-trained encoder (or the baseline) and writes a run folder.

    Args:
        data_dir: a converted, labelled dataset, or None: the pre-training run's
            dataset when `encoder_run` is given, else the built-in `synthetic-tcga`.
        out_dir: the output folder: missing, empty, or left by a failed attempt
            (holding only fine-tuning's own files); never a finished run or a folder
            of other files. Locked while the run trains and writes.
        encoder_run: a pre-training RUN_DIR, or None for the non-pre-trained baseline.
        config: a `FinetuneConfig`; `mode` must be `unfrozen` for the baseline.
        encoder_config: the baseline's architecture (default: protocol's 4 x 256);
            ignored with `encoder_run` (the run's architecture is used).
        log: callable receiving progress lines.
        command: the command line, recorded in `config.json`.

    Returns:
        The test metrics written to `metrics.json`.

    Raises:
        FinetuneError: a setting, the encoder run (missing, unloadable, another gene
            list), fewer than 2 classes, or the output folder (a run, foreign files,
            in use by another process: its PID is named).
        DataError: unreadable data; `DamagedDataError` names a damaged shard.
        FloatingPointError: the loss became NaN or inf.
    """
    config = config or FinetuneConfig()
    validate_finetune_config(config)
    if encoder_run is None and config.mode == "frozen":
        raise FinetuneError(
            "the baseline is trained end to end; --mode frozen needs --encoder RUN_DIR"
        )
    if encoder_run is None and encoder_config is not None:
        try:
            validate_config(PretrainConfig(encoder=encoder_config))
        except (
            ConfigError
        ) as error:  # only the baseline's encoder differs from defaults
            raise FinetuneError(f"baseline {error}") from None
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir)
    record = pretraining_record(encoder_run) if encoder_run is not None else None
    if data_dir is None:
        data_dir = (record or {}).get("data", {}).get("dir")
        if data_dir is None:
            from keras_ssrl.data.builtin import ensure_builtin
            from keras_ssrl.training import DEFAULT_BUILTIN

            data_dir = ensure_builtin(DEFAULT_BUILTIN, log=log)
    data_dir = os.path.abspath(data_dir)
    check_outside(out_dir, data_dir, "fine-tuning folder", FinetuneError)
    check_labelled_splits(Manifest.load(data_dir), log)
    data = load_finetune_data(data_dir)
    weights, method = None, BASELINE
    if encoder_run is not None:
        encoder_config = encoder_config_of(encoder_run)
        weights = load_encoder_weights(encoder_run, data.manifest)
        method = record["method"]
    encoder_config = encoder_config or EncoderConfig()
    seed = subset_seed(config.seed, config.fraction, config.repeat)
    subset = stratified_subset(data.train.y, config.fraction, seed)
    tuner = Finetuner(
        data.n_genes, len(data.classes), encoder_config, config.mode, config
    )
    if weights is not None and [w.shape for w in weights] != [
        tuple(v.shape) for v in tuner.encoder.weights
    ]:
        raise FinetuneError(
            f"{os.path.join(encoder_run, 'encoder.keras')}: its weights do not match "
            f"the architecture its config.json records ({encoder_config})"
        )
    with locked_folder(out_dir, "fine-tuning folder", FinetuneError):
        _check_out_dir(out_dir)  # again: another process may have finished meanwhile
        remove_stale_temporaries(
            out_dir, stale_temporaries_pattern(FINETUNE_FILES), log
        )
        log(
            f"fine-tuning {method} ({config.mode}) on {len(subset)} of "
            f"{len(data.train.y)} training samples, {len(data.classes)} classes"
        )
        result = tuner.run(data, subset, seed, weights, log=log)
        metrics = _write_run(
            out_dir, tuner, result, data, config, encoder_config, method, encoder_run,
            seed, command,
        )  # fmt: skip
    log(
        f"test accuracy {metrics['accuracy']:.4f}, balanced accuracy "
        f"{metrics['balanced_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"(best epoch {result.best_epoch} of {result.epochs}); wrote {out_dir}"
    )
    return metrics


# The files of a fine-tuning folder (`atomic_path` writes each; its temporaries are ours).
FINETUNE_FILES = (CLASSIFIER_FILE, CONFIG_JSON, METRICS_JSON, HISTORY_CSV)


def _check_out_dir(out_dir: str) -> None:
    """Refuses an output folder holding a run, or files fine-tuning did not write."""
    if os.path.exists(os.path.join(out_dir, CONFIG_JSON)):
        raise FinetuneError(
            f"{out_dir} already holds a fine-tuning run; choose another"
        )
    # A folder left by a failed attempt holds only fine-tuning's own files.
    check_output_folder(
        out_dir, FINETUNE_FILES, "fine-tuning run", FinetuneError, own_files=True
    )


def _write_run(
    out_dir, tuner, result, data, config, encoder_config, method, encoder_run, seed,
    command,
) -> dict:  # fmt: skip
    """Writes the classifier, history, metrics and (last) `config.json`."""
    import keras

    record = {
        "kind": "finetune",
        "method": method,
        "mode": config.mode,
        "labels": data.classes,
        "data": {
            "dir": data.data_dir,
            "manifest_sha256": data.manifest.digest(),
            "n_genes": data.n_genes,
            "genes_sha256": genes_digest(data.manifest.genes),
            "n_train": result.n_train,
            "n_val": len(data.val.y),
            "n_test": len(data.test.y),
        },
        "encoder_run": os.path.abspath(encoder_run) if encoder_run else None,
        "encoder": to_dict(encoder_config),
        "config": to_dict(config),
        "seed": seed,
        "versions": {"keras_ssrl": __version__, "keras": keras.__version__},
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": list(command) if command is not None else None,
    }
    with atomic_path(os.path.join(out_dir, CLASSIFIER_FILE), ".keras") as tmp:
        tuner.classifier.save(tmp)
    _write_history(os.path.join(out_dir, HISTORY_CSV), result.history)
    metrics = {
        **result.metrics,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "n_train": result.n_train,
        "seconds": round(result.seconds, 3),
    }
    write_json_atomic(os.path.join(out_dir, METRICS_JSON), metrics)
    # config.json last: its presence marks a complete run folder.
    write_json_atomic(os.path.join(out_dir, CONFIG_JSON), record)
    return metrics


def _write_history(path: str, history: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write("epoch,loss,val_loss\n")
        for row in history:
            handle.write(f"{row['epoch']},{row['loss']:.6g},{row['val_loss']:.6g}\n")
