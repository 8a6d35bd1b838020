"""SavedModel export of trained encoders and classifiers for TF Serving.

`export_run(run_dir, model_base)` writes `MODEL_BASE/<version>/` (`saved_model.pb`,
`variables/`, `assets/`) from a pre-training run (its `encoder.keras`) or a fine-tuning
run (its `classifier.keras`), through `keras.export.ExportArchive`. The served graph
takes what a user has, not what the network was trained on:

- `serving_default` takes **raw** expression values (input `expression`, float32,
  `[batch, n_genes]`, genes in the order of `assets/genes.txt`) and applies the dataset's
  transform (`log2p1`, `log1p` or `none`, as the converter did) and the per-gene
  standardisation of the manifest (the same `standardizer` the reader uses) in the graph.
  Classifier outputs: `probabilities` `[batch, n_classes]`, `class_id` `[batch]` (int64),
  `class_name` `[batch]` (string) and `embedding`; encoder output: `embedding`.
- `predict_examples` takes serialized `tf.train.Example` records (input `examples`,
  string `[batch]`) in the project's one TFRecord schema (`keras_ssrl.data.schema`):
  the records the converter writes, i.e. **already transformed** values in the dataset's
  record dtype, so only the standardisation is applied. Outputs: those of
  `serving_default` plus `sample_id`.
- classifiers also get `classify` (input `inputs`: serialized examples as above;
  outputs `classes` `[batch, n_classes]` string and `scores` `[batch, n_classes]`
  float32), the shape TF Serving's Classify API (`:classify`) requires.

Inputs are checked in the graph: a wrong number of genes, NaN / infinite values and
(for count or TPM data) negative values fail the request with a message saying so.
Every output is float32 whatever the training precision. The version folder is written
to a temporary folder in MODEL_BASE, loaded back and compared with the Keras model
(`TOLERANCE`), then renamed: TF Serving never sees a half-written or unverified version,
and a failed export leaves nothing behind.

`cpm_log2p1` datasets are refused: that transform divides each sample by its total over
every gene of the source file, including genes the converter dropped, so a model fed the
kept genes cannot reproduce it.
"""

from __future__ import annotations

import datetime
import json
import operator
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from keras_ssrl import __version__
from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError
from keras_ssrl.data.manifest import (
    MANIFEST,
    Manifest,
    genes_digest,
    write_json_atomic,
)
from keras_ssrl.data.preprocessing import apply_transform, standardizer
from keras_ssrl.files import FolderLock, remove_stale_temporaries

ENCODER = "encoder"
CLASSIFIER = "classifier"
MODEL_FILES = {ENCODER: "encoder.keras", CLASSIFIER: "classifier.keras"}
CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
SUMMARY_JSON = "summary.json"

INPUT = schema.EXPRESSION  # "expression": raw values
EXAMPLES_INPUT = "examples"  # serialized tf.train.Example records
CLASSIFY_INPUT = "inputs"  # the input key TF Serving's Classify API requires
SERVING_DEFAULT = "serving_default"
PREDICT_EXAMPLES = "predict_examples"
CLASSIFY = "classify"

ASSETS = "assets"
GENES_TXT = "genes.txt"
CLASS_NAMES_TXT = "class_names.txt"
MANIFEST_DIGEST_TXT = "manifest_sha256.txt"
MODEL_CARD_JSON = "model_card.json"
# A version being written is `MODEL_BASE/.tmp-<version>-<pid>` (TF Serving loads only
# integer-named folders); one whose process is gone was left by a killed export.
STALE_TEMPORARY = r"\.tmp-\d+-(?P<pid>\d+)"

SERVABLE_TRANSFORMS = ("log2p1", "log1p", "none")
# Values whose source had to be non-negative (the converter rejects negative ones).
_NON_NEGATIVE_VALUES = ("counts", "tpm")

# Served outputs vs the Keras model on the same raw input (numpy transform of the
# converter, manifest standardisation, Keras call): |served - keras| <= atol + rtol *
# |keras| element-wise. The graph computes log2(x + 1) as log1p(x) / ln 2, within a few
# float32 ulps of numpy's log2; float32 models agree to about 1e-5.
TOLERANCE = {"float32": {"atol": 1e-5, "rtol": 1e-4}}
# Models computing in 16 bits (mixed_float16 / mixed_bfloat16 policies, or plain
# float16) get a bound from their machine epsilon instead. The Keras call and the
# served graph run the same layers with different kernels (eager vs graph, oneDNN vs
# Eigen, other accumulation orders), and every layer rounds its output to the compute
# dtype: two implementations, each within half an ulp, differ by up to one ulp (eps
# relative) per layer, and these differences add up over the layers (first order). A
# layer can also amplify its input's error (BatchNorm divides by a standard deviation,
# a matmul sums many terms), hence a factor of 2 of headroom: rtol = 2 * eps * layers.
# Outputs near zero come from cancellations of terms of the outputs' own scale (~1:
# BatchNorm-normalised embeddings, probabilities), so atol = rtol. For the 6 layers of
# a 2-block encoder in float16 (eps 2^-10 ~ 9.8e-4): 1.2e-2; observed on an Intel
# AVX-512 CPU: 3.9e-3 (one float16 ulp at 4). bfloat16's eps is 2^-7 ~ 7.8e-3, so its
# bound is 8x wider. Predicted classes are checked as well (`class_disagreements`).
EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
LOW_PRECISION_HEADROOM = 2.0
_PROBE_ROWS = 8


class ExportError(ValueError):
    """A run that cannot be exported: the message says why and what to do."""


# --------------------------------------------------------------------- the run folder


@dataclass
class ServingData:
    """What the served graph needs from the dataset a model was trained on."""

    genes: list[str]
    transform: str
    values: str
    record_dtype: str
    mean: np.ndarray
    std: np.ndarray
    manifest_sha256: str
    info: dict = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ServingData:
        data = manifest.data
        transform = data["transform"]
        if transform == "cpm_log2p1":
            raise ExportError(
                f"{manifest.directory}: the dataset was converted with --transform "
                "cpm_log2p1, which divides each sample by its total over every gene of "
                "the source file (genes dropped by the converter included); a served "
                "model fed the kept genes cannot reproduce that total, so it is not "
                "exported. Convert with --transform log2p1 (or log1p) and train on "
                "that dataset to serve a model."
            )
        if transform not in SERVABLE_TRANSFORMS:
            raise ExportError(f"{manifest.directory}: unknown transform {transform!r}")
        stats = data["statistics"]
        return cls(
            genes=manifest.genes,
            transform=transform,
            values=data.get("values", "counts"),
            record_dtype=manifest.record_dtype,
            mean=manifest.mean,
            std=manifest.std,
            manifest_sha256=manifest.digest(),
            info={
                "name": os.path.basename(os.path.normpath(manifest.directory)),
                "n_samples": data.get("n_samples"),
                "labels": manifest.labels,
                "statistics_fitted_on": stats.get("fitted_on"),
                "statistics_samples": stats.get("num_samples"),
                "source_format": (data.get("source") or {}).get("format"),
                "keras_ssrl_version": data.get("keras_ssrl_version"),
            },
        )


@dataclass
class Run:
    """A run folder to export: its kind, model file, records and dataset."""

    directory: str
    kind: str
    model_path: str
    record: dict
    data: ServingData
    class_names: list[str] | None
    metrics: dict | None


def _read_json(path: str, what: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: unreadable {what} ({error})") from None
    if not isinstance(payload, dict):
        raise ExportError(f"{path}: unreadable {what} (not a JSON object)")
    return payload


def load_run(run_dir: str, data_dir: str | None = None) -> Run:
    """Reads a run folder and its dataset's manifest, and checks they belong together.

    Args:
        run_dir: a pre-training run (`encoder.keras`) or a fine-tuning run
            (`classifier.keras`, `config.json` with `kind: "finetune"`).
        data_dir: the converted dataset, when it moved since training (default: the
            folder recorded in the run's `config.json`).

    Raises:
        ExportError: not a run folder, no model in it, no dataset, or a dataset other
            than the one the model was trained on (manifest digest or gene list).
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ExportError(f"{run_dir}: no such run folder")
    record = _read_json(os.path.join(run_dir, CONFIG_JSON), "run configuration")
    if record is None:
        raise ExportError(
            f"{run_dir}: no {CONFIG_JSON}; is this a run folder written by "
            "scripts/pretrain.py or scripts/finetune.py (a fine-tuning run writes it "
            "last, when it has finished)?"
        )
    kind = CLASSIFIER if record.get("kind") == "finetune" else ENCODER
    model_path = os.path.join(run_dir, MODEL_FILES[kind])
    if not os.path.isfile(model_path):
        what = "fine-tuning" if kind == CLASSIFIER else "pre-training"
        raise ExportError(
            f"{run_dir}: no {MODEL_FILES[kind]}, so no model to export; the "
            f"{what} run has not finished (or the file was removed). Finish it (the "
            "training scripts' --resume) or export another run."
        )
    recorded = record.get("data") or {}
    if not isinstance(recorded, dict):
        raise ExportError(f"{run_dir}/{CONFIG_JSON}: `data` is not a JSON object")
    data_dir = data_dir or recorded.get("dir")
    if not data_dir:
        raise ExportError(
            f"{run_dir}/{CONFIG_JSON} names no dataset; pass --data DIR (the converted "
            "dataset the model was trained on)"
        )
    manifest = _load_manifest(str(data_dir))
    try:
        data = ServingData.from_manifest(manifest)
    except ExportError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(
            f"{manifest.directory}/{MANIFEST} is incomplete or malformed "
            f"({type(error).__name__}: {_first_line(error)}); re-run the conversion"
        ) from None
    expected = recorded.get("manifest_sha256")
    digest = manifest.digest()
    if expected and digest != expected:
        genes_sha = recorded.get("genes_sha256")
        if genes_sha and genes_sha != genes_digest(manifest.genes):
            detail = (
                f"another gene list ({data.n_genes} genes; the model was trained "
                f"on {recorded.get('n_genes')})"
            )
        else:
            detail = (
                "the same genes but another manifest (other samples or statistics, "
                "so the standardisation would differ)"
            )
        raise ExportError(
            f"{data_dir} is not the dataset {run_dir} was trained on: it has "
            f"{detail}; manifest digest {digest[:12]}, the run recorded "
            f"{expected[:12]}. Pass --data with the dataset the run used."
        )
    class_names = None
    metrics = None
    if kind == CLASSIFIER:
        labels = record.get("labels")
        class_names = [str(c) for c in labels] if isinstance(labels, list) else []
        if not class_names:
            raise ExportError(
                f"{run_dir}/{CONFIG_JSON} has no `labels` (class names in logit order)"
            )
        metrics = _read_json(os.path.join(run_dir, METRICS_JSON), "metrics")
    else:
        metrics = _read_json(os.path.join(run_dir, SUMMARY_JSON), "summary")
    return Run(run_dir, kind, model_path, record, data, class_names, metrics)


def _load_manifest(data_dir: str) -> Manifest:
    """The dataset's manifest, consistent with itself.

    A missing folder gets the hint that it may have moved; a manifest that contradicts
    itself (gene count vs gene list vs statistics, edited by hand) is named as such.
    """
    try:
        manifest = Manifest.load(data_dir)
    except DataError as error:
        if "://" in data_dir or os.path.isfile(os.path.join(data_dir, MANIFEST)):
            # There, but damaged or unsafe (e.g. a shard entry outside the folder).
            raise ExportError(f"cannot use the run's dataset: {error}") from None
        raise ExportError(
            f"cannot read the run's dataset ({error}). The export needs its "
            f"{MANIFEST} (gene list, transform, statistics); pass --data DIR if "
            "the folder moved."
        ) from None
    problem = manifest.inconsistency()
    if problem:
        raise ExportError(problem)
    return manifest


def load_model(run: Run):
    """Loads the run's Keras model and checks it against the dataset and class names."""
    import keras

    try:
        model = keras.saving.load_model(run.model_path, compile=False)
    except Exception as error:  # noqa: BLE001 - any load failure is the same to a user
        raise ExportError(
            f"{run.model_path}: cannot load the model ({_first_line(error)}); the "
            "file is damaged or was not written by keras_ssrl's training scripts"
        ) from None
    check_model(model, run.kind, run.data.n_genes, run.class_names, run.model_path)
    return model


def _first_line(error: BaseException, limit: int = 300) -> str:
    """An exception's first line, short enough for a one-line message."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_model(model, kind: str, n_genes: int, class_names, where: str) -> None:
    """Raises `ExportError` unless `model` is a one-input model of `n_genes` genes."""
    if len(model.inputs) != 1:
        raise ExportError(
            f"{where}: expected one input, the model has {len(model.inputs)}"
        )
    width = model.inputs[0].shape[-1]
    if len(model.inputs[0].shape) != 2 or width != n_genes:
        raise ExportError(
            f"{where}: the model takes inputs of shape {tuple(model.inputs[0].shape)}, "
            f"the dataset has {n_genes} genes: gene list mismatch between the model "
            "and the dataset"
        )
    if kind == CLASSIFIER:
        names = {layer.name for layer in model.layers}
        if "encoder" not in names or "head" not in names:
            raise ExportError(
                f"{where}: a classifier must contain the sub-model `encoder` and the "
                f"layer `head`; it has {', '.join(sorted(names))}"
            )
        n_classes = model.outputs[0].shape[-1]
        if n_classes != len(class_names):
            raise ExportError(
                f"{where}: the model has {n_classes} outputs but the run names "
                f"{len(class_names)} classes"
            )
    for weight in model.weights:
        if not np.all(np.isfinite(np.asarray(weight))):
            raise ExportError(
                f"{where}: weight {weight.path} holds NaN or infinite values (training "
                "diverged); nothing to export"
            )


# --------------------------------------------------------------------- the graph


_INV_LN2 = 1.0 / np.log(2.0)


def graph_transform(x, transform: str):
    """The converter's value transform (`apply_transform`) as TensorFlow ops.

    `log2(x + 1)` is computed as `log1p(x) / ln 2`: one transcendental pass, within a
    few float32 ulps of NumPy's `log2(x + 1)` (closer to the exact value for x << 1).
    """
    import tensorflow as tf

    if transform == "none":
        return x
    if transform == "log2p1":
        return tf.math.log1p(x) * tf.constant(_INV_LN2, x.dtype)
    if transform == "log1p":
        return tf.math.log1p(x)
    raise ExportError(f"transform {transform!r} cannot be served")


def make_preprocessing(data: ServingData):
    """The in-graph preprocessing of the two kinds of served input.

    Returns:
        `(raw, records)`: `raw(expression)` checks a float32 `[batch, n_genes]` tensor of
        raw values and returns the standardised model input; `records(serialized)`
        parses schema records (transformed values) and returns `(model input,
        sample ids)`.

    The checks cost two reductions over the batch: a NaN or infinite value makes its
    row's sum non-finite (so would a row summing above 3.4e38, far beyond any
    expression value), and a negative value makes its row's minimum negative. Failing
    rows are named (0-based) in the error.
    """
    import tensorflow as tf

    n = data.n_genes
    z_score = standardizer(data.mean, data.std)
    non_negative = data.values in _NON_NEGATIVE_VALUES

    def finite(x, what):
        ok = tf.math.is_finite(tf.reduce_sum(x, axis=1))
        return tf.debugging.Assert(
            tf.reduce_all(ok),
            [
                f"{what} holds NaN or infinite values; missing values cannot be "
                "served: impute or drop them before sending. Rows:",
                tf.where(~ok)[:, 0],
            ],
            summarize=10,
        )

    def raw(expression):
        width = tf.debugging.assert_equal(
            tf.shape(expression)[1],
            n,
            message=(
                f"expression must have {n} columns, the genes of assets/{GENES_TXT} in "
                "that order"
            ),
        )
        with tf.control_dependencies([width]):
            x = tf.identity(expression)
        checks = [finite(x, "expression")]
        if non_negative:
            ok = tf.reduce_min(x, axis=1) >= 0
            checks.append(
                tf.debugging.Assert(
                    tf.reduce_all(ok),
                    [
                        f"expression holds negative values, but the model was trained "
                        f"on {data.values} (>= 0) transformed with {data.transform}. "
                        "Rows:",
                        tf.where(~ok)[:, 0],
                    ],
                    summarize=10,
                )
            )
        with tf.control_dependencies(checks):
            x = tf.identity(x)
        return z_score(graph_transform(x, data.transform))

    def records(serialized):
        parsed = schema.parse_batch(serialized, n, data.record_dtype)
        x = tf.cast(parsed[schema.EXPRESSION], tf.float32)
        with tf.control_dependencies([finite(x, "a record's expression")]):
            x = tf.identity(x)
        return z_score(x), parsed[schema.SAMPLE_ID]

    return raw, records


def _serving_network(model, kind: str):
    """A Keras model sharing `model`'s layers, with named outputs.

    For a classifier, `{"logits", "embedding"}` from one pass: the embedding is the
    output of the nested `encoder` in the classifier's own graph.
    """
    import keras

    if kind == ENCODER:
        return keras.Model(model.input, {"embedding": model.output}, name="served")
    try:
        encoder, head = model.get_layer("encoder"), model.get_layer("head")
    except ValueError:
        raise ExportError(
            "a classifier must hold the layers `encoder` and `head` (as "
            "keras_ssrl.finetuning.build_classifier builds it)"
        ) from None
    # The classifier is head(encoder(x)): the same two layers (same weights) called
    # here give the logits and the embedding in one pass.
    inputs = keras.Input(shape=model.input_shape[1:], name="expression")
    embedding = encoder(inputs)
    return keras.Model(
        inputs, {"logits": head(embedding), "embedding": embedding}, name="served"
    )


def build_archive(model, kind: str, data: ServingData, class_names=None):
    """The `keras.export.ExportArchive` with the serving signatures (module docstring)."""
    import keras
    import tensorflow as tf

    net = _serving_network(model, kind)
    raw, records = make_preprocessing(data)
    names = None if class_names is None else tf.constant(list(class_names))

    def outputs(x):
        out = net(x, training=False)
        embedding = tf.cast(out["embedding"], tf.float32)
        if kind == ENCODER:
            return {"embedding": embedding}
        logits = tf.cast(out["logits"], tf.float32)
        class_id = tf.argmax(logits, axis=-1, output_type=tf.int64)
        return {
            "probabilities": tf.nn.softmax(logits, axis=-1),
            "class_id": class_id,
            "class_name": tf.gather(names, class_id),
            "embedding": embedding,
        }

    def serving_default(expression):
        return outputs(raw(expression))

    def predict_examples(examples):
        x, sample_id = records(examples)
        return {**outputs(x), "sample_id": sample_id}

    def classify(inputs):
        x, _ = records(inputs)
        scores = outputs(x)["probabilities"]
        classes = tf.tile(names[tf.newaxis, :], [tf.shape(scores)[0], 1])
        return {"classes": classes, "scores": scores}

    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(
        SERVING_DEFAULT,
        serving_default,
        input_signature=[tf.TensorSpec([None, data.n_genes], tf.float32, name=INPUT)],
    )
    archive.add_endpoint(
        PREDICT_EXAMPLES,
        predict_examples,
        input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)],
    )
    if kind == CLASSIFIER:
        archive.add_endpoint(
            CLASSIFY,
            classify,
            input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT)],
        )
    return archive


def signature_docs(kind: str, data: ServingData, n_classes: int | None, width: int):
    """The signatures' inputs and outputs, as written in the model card."""
    n = data.n_genes
    head = {
        "probabilities": f"float32 [batch, {n_classes}]: softmax, classes in the order "
        f"of assets/{CLASS_NAMES_TXT}",
        "class_id": "int64 [batch]: index of the most probable class",
        "class_name": "string [batch]: its name",
    }
    served = {
        **(head if kind == CLASSIFIER else {}),
        "embedding": f"float32 [batch, {width}]",
    }
    docs = {
        SERVING_DEFAULT: {
            "inputs": {
                INPUT: f"float32 [batch, {n}]: raw values ({data.values}), genes in the "
                f"order of assets/{GENES_TXT}; {data.transform} and the per-gene "
                "standardisation are applied in the graph"
            },
            "outputs": served,
        },
        PREDICT_EXAMPLES: {
            "inputs": {
                EXAMPLES_INPUT: "string [batch]: serialized tf.train.Example records in "
                "the keras_ssrl TFRecord schema (sample_id bytes, expression = "
                f"{data.transform}-transformed values as little-endian "
                f"{data.record_dtype} bytes, label int64), as the converter writes them; "
                "only the standardisation is applied"
            },
            "outputs": {**served, "sample_id": "string [batch]"},
        },
    }
    if kind == CLASSIFIER:
        docs[CLASSIFY] = {
            "inputs": {CLASSIFY_INPUT: f"as {EXAMPLES_INPUT} of {PREDICT_EXAMPLES}"},
            "outputs": {
                "classes": f"string [batch, {n_classes}]: the class names",
                "scores": f"float32 [batch, {n_classes}]: their probabilities",
            },
        }
    return docs


# --------------------------------------------------------------------- verification


def probe_inputs(data: ServingData, rows: int = _PROBE_ROWS, seed: int = 0):
    """Deterministic raw inputs whose transformed values follow the dataset statistics."""
    rng = np.random.default_rng(seed)
    stored = data.mean + data.std * rng.standard_normal((rows, data.n_genes))
    if data.transform == "log2p1":
        raw = np.exp2(stored) - 1.0
    elif data.transform == "log1p":
        raw = np.expm1(stored)
    else:
        raw = stored
    if data.values in _NON_NEGATIVE_VALUES:
        raw = np.maximum(raw, 0.0)
    return raw.astype(np.float32)


def reference_outputs(model, kind: str, data: ServingData, raw: np.ndarray) -> dict:
    """What the Keras model gives on raw values, through the converter's numpy path."""
    stored = apply_transform(np.asarray(raw, dtype=np.float32), data.transform)
    return _keras_outputs(model, kind, data, stored)


def _keras_outputs(model, kind, data, stored):
    x = (stored.astype(np.float32) - data.mean) * (np.float32(1.0) / data.std)
    net = _serving_network(model, kind)
    out = net(x.astype(np.float32), training=False)
    result = {"embedding": np.asarray(out["embedding"], dtype=np.float32)}
    if kind == CLASSIFIER:
        logits = np.asarray(out["logits"], dtype=np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        result["probabilities"] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return result


def _leaf_layers(layer):
    """The layers that compute, nested models (a classifier's `encoder`) unrolled."""
    children = getattr(layer, "layers", None)
    if not children:
        yield layer
        return
    for child in children:
        yield from _leaf_layers(child)


def tolerance_for(model) -> dict:
    """The verification bound for `model`, from its lowest compute precision.

    Returns:
        `{"compute_dtype", "layers", "atol", "rtol"}`: float32 models get
        `TOLERANCE["float32"]`; 16-bit ones `atol = rtol = 2 * eps * layers`, where
        `layers` counts the layers computing in that dtype (nested models included:
        a mixed-precision classifier's float32 head sits on a 16-bit encoder).
    """
    import keras

    low = [
        layer.compute_dtype
        for layer in _leaf_layers(model)
        if getattr(layer, "compute_dtype", "float32") in EPSILON
        and not isinstance(layer, keras.layers.InputLayer)
    ]
    if not low:
        return {"compute_dtype": "float32", "layers": 0, **TOLERANCE["float32"]}
    # The coarser dtype decides when a model mixes float16 and bfloat16 layers.
    dtype = max(set(low), key=EPSILON.get)
    bound = LOW_PRECISION_HEADROOM * EPSILON[dtype] * len(low)
    return {"compute_dtype": dtype, "layers": len(low), "atol": bound, "rtol": bound}


def max_violation(served: np.ndarray, reference: np.ndarray, atol: float, rtol: float):
    """Largest |served - reference| - (atol + rtol |reference|); <= 0 is within bounds."""
    diff = np.abs(np.asarray(served, np.float64) - np.asarray(reference, np.float64))
    return float(np.max(diff - (atol + rtol * np.abs(reference)))), float(diff.max())


def class_disagreements(class_id, reference: np.ndarray, tol: dict) -> np.ndarray:
    """Rows whose served class is not the Keras model's, beyond a near-tie.

    The served class may differ from the Keras model's most probable class only where
    the Keras model's probability of the served class is within the tolerance of its
    top probability (`top - p[served] <= atol + rtol * top`): a near-tie, which
    rounding decides either way. Any other difference is a wrong prediction.

    Returns:
        The indices of the offending rows (empty when the classes agree).
    """
    reference = np.asarray(reference, np.float64)
    top = reference.max(axis=1)
    chosen = reference[np.arange(len(reference)), np.asarray(class_id)]
    return np.flatnonzero(top - chosen > tol["atol"] + tol["rtol"] * top)


def check_outputs(
    signature: str, served: dict, reference: dict, tol: dict, class_names=None
) -> dict:
    """Compares one signature's outputs (numpy) with the Keras model's.

    Args:
        signature: the signature name, for messages.
        served: output name -> numpy array, as the SavedModel returned them.
        reference: output name -> what the Keras model gives (`_keras_outputs`);
            `probabilities` (classifiers) also checks `class_id` and `class_name`.
        tol: `tolerance_for(model)`.
        class_names: the class names, for classifiers.

    Returns:
        `"signature/output"` -> largest absolute difference.

    Raises:
        ExportError: an output not float32 or outside the tolerance, or a class
            other than the Keras model's (`class_disagreements`).
    """
    differences = {}
    bound = (
        f"tolerance atol {tol['atol']:.3g}, rtol {tol['rtol']:.3g} for "
        f"{tol.get('compute_dtype', 'float32')} compute"
    )
    for name, ref in reference.items():
        got = np.asarray(served[name])
        if got.dtype != np.float32:
            raise ExportError(f"{signature}/{name} is {got.dtype}, not float32")
        excess, diff = max_violation(got, ref, tol["atol"], tol["rtol"])
        differences[f"{signature}/{name}"] = diff
        if excess > 0:
            raise ExportError(
                f"the exported {signature} signature differs from the Keras model "
                f"on {name} by up to {diff:.3g} ({bound}); not exported"
            )
    if "probabilities" not in reference:
        return differences
    probabilities = np.asarray(served["probabilities"])
    # Without a `class_id` output (`classify`), the class is the highest score.
    class_id = np.asarray(served.get("class_id", np.argmax(probabilities, axis=1)))
    rows = np.arange(len(class_id))
    # A maximum, not argmax: equal probabilities (a tie after rounding) are both right.
    if not np.all(probabilities[rows, class_id] >= probabilities.max(axis=1)):
        raise ExportError(f"{signature}: class_id is not the most probable class")
    if "class_name" in served and [_text(c) for c in served["class_name"]] != [
        class_names[i] for i in class_id
    ]:
        raise ExportError(f"{signature}: class_name does not match class_id")
    wrong = class_disagreements(class_id, reference["probabilities"], tol)
    if wrong.size:
        raise ExportError(
            f"the exported {signature} signature predicts another class than the "
            f"Keras model for probe row(s) {', '.join(map(str, wrong[:10]))}, where "
            f"the Keras model's classes are not a near-tie ({bound}); not exported"
        )
    return differences


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def verify_export(path: str, model, kind: str, data: ServingData, class_names=None):
    """Loads the SavedModel at `path` and compares it with the Keras model.

    Every signature runs on `_PROBE_ROWS` raw probe samples (as records for the
    example signatures) and its outputs go through `check_outputs`, within
    `tolerance_for(model)`. Both sides run on the CPU: on a GPU, TensorFlow runs
    float32 matmuls on TF32 tensor cores (10-bit mantissa), a rounding of the
    hardware, not of the export, that the float32 bound is too tight for.

    Returns:
        A report (largest differences per output and signature, the tolerance).

    Raises:
        ExportError: an output outside the tolerance, not float32, or another class.
    """
    import tensorflow as tf

    with tf.device("/CPU:0"):
        return _verify(tf.saved_model.load(path), model, kind, data, class_names)


def _verify(loaded, model, kind, data, class_names):
    import tensorflow as tf

    tol = tolerance_for(model)
    raw = probe_inputs(data)
    stored = apply_transform(raw, data.transform).astype(data.record_dtype)
    expected = {
        SERVING_DEFAULT: reference_outputs(model, kind, data, raw),
        PREDICT_EXAMPLES: _keras_outputs(model, kind, data, stored),
    }
    ids = [f"probe-{i}" for i in range(len(raw))]
    serialized = tf.constant(
        [
            schema.serialize_example(i, row, schema.UNLABELLED, data.record_dtype)
            for i, row in zip(ids, stored)
        ]
    )

    def run(signature, **inputs):
        out = loaded.signatures[signature](**inputs)
        return {name: value.numpy() for name, value in out.items()}

    served = {
        SERVING_DEFAULT: run(SERVING_DEFAULT, **{INPUT: tf.constant(raw)}),
        PREDICT_EXAMPLES: run(PREDICT_EXAMPLES, **{EXAMPLES_INPUT: serialized}),
    }
    report = {"probe_rows": len(raw), "tolerance": tol, "max_abs_difference": {}}
    for signature, reference in expected.items():
        report["max_abs_difference"].update(
            check_outputs(signature, served[signature], reference, tol, class_names)
        )
    got_ids = [_text(s) for s in served[PREDICT_EXAMPLES]["sample_id"]]
    if got_ids != ids:
        raise ExportError(f"{PREDICT_EXAMPLES}: sample_id does not echo the records")
    if kind == CLASSIFIER:
        out = run(CLASSIFY, **{CLASSIFY_INPUT: serialized})
        # `classify` is `predict_examples` in TF Serving's Classify shape.
        check_outputs(
            CLASSIFY,
            {"probabilities": out["scores"]},
            {"probabilities": expected[PREDICT_EXAMPLES]["probabilities"]},
            tol,
        )
        if out["classes"].shape != (len(raw), len(class_names)):
            raise ExportError(f"{CLASSIFY}: classes are not one row of class names")
    return report


# --------------------------------------------------------------------- writing


def next_version(model_base: str) -> int:
    """1 + the largest integer-named folder in `model_base` (1 when there is none)."""
    versions = [
        int(name)
        for name in (os.listdir(model_base) if os.path.isdir(model_base) else [])
        if name.isdigit() and os.path.isdir(os.path.join(model_base, name))
    ]
    return max(versions, default=0) + 1


def model_card(run: Run, model, report: dict, version: int) -> dict:
    """The small model card written to `assets/model_card.json`."""
    import keras
    import tensorflow as tf

    record = run.record
    width = (
        int(model.get_layer("encoder").output.shape[-1])
        if run.kind == CLASSIFIER
        else int(model.output.shape[-1])
    )
    encoder_run = record.get("encoder_run")
    data = run.data
    return {
        "name": os.path.basename(os.path.normpath(run.directory)),
        "kind": run.kind,
        "version": version,
        "method": record.get("method") or (record.get("config") or {}).get("method"),
        "mode": record.get("mode"),
        "encoder_run": os.path.basename(os.path.normpath(encoder_run))
        if encoder_run
        else None,
        "precision": record.get("precision"),
        "config": record.get("config"),
        "classes": run.class_names,
        "test_metrics"
        if run.kind == CLASSIFIER
        else "pretraining_summary": run.metrics,
        "data": {
            **data.info,
            "manifest_sha256": data.manifest_sha256,
            "n_genes": data.n_genes,
            "genes_sha256": genes_digest(data.genes),
            "values": data.values,
            "transform": data.transform,
            "record_dtype": data.record_dtype,
        },
        "preprocessing": (
            f"serving_default: x -> {data.transform}(x) -> (x - mean) / std per gene "
            "(manifest statistics of the pre-training split), in float32. The records "
            f"the model was trained on were rounded to {data.record_dtype} after the "
            "transform; the raw signature does not round, a difference below that "
            f"dtype's precision. {PREDICT_EXAMPLES}: records as the converter writes "
            "them (transformed), standardisation only."
        ),
        "signatures": signature_docs(
            run.kind, data, len(run.class_names or []) or None, width
        ),
        "verification": report,
        "exported": {
            "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "keras_ssrl": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        },
    }


def write_assets(path: str, run: Run, card: dict) -> None:
    """Gene list, class names, manifest digest and model card into `path/assets/`."""
    assets = os.path.join(path, ASSETS)
    os.makedirs(assets, exist_ok=True)

    def lines(name, items):
        with open(os.path.join(assets, name), "w", encoding="utf-8") as handle:
            handle.write("".join(f"{item}\n" for item in items))

    lines(GENES_TXT, run.data.genes)
    if run.class_names is not None:
        lines(CLASS_NAMES_TXT, run.class_names)
    lines(MANIFEST_DIGEST_TXT, [run.data.manifest_sha256])
    write_json_atomic(os.path.join(assets, MODEL_CARD_JSON), card)


def export_run(
    run_dir: str,
    model_base: str,
    *,
    version: int | None = None,
    data_dir: str | None = None,
    log=print,
) -> str:
    """Exports a run's model as `model_base/<version>/` for TF Serving.

    Everything is checked before anything is written: the arguments, the run, its
    dataset and its model. Then the model base is locked (`FolderLock`: one export at
    a time per base; a lock left by a dead process is taken over), temporaries left
    there by a killed export are removed, and the version is written to a temporary
    folder, verified and renamed into place. Nothing in `model_base` is ever replaced
    or deleted, except those dead exports' temporaries.

    Args:
        run_dir: a pre-training run (exports the encoder) or a fine-tuning run
            (exports the classifier).
        model_base: the model's base folder, as TF Serving's `--model_base_path`.
        version: int >= 1; default: the next integer after the largest version there.
        data_dir: the converted dataset when it moved (default: the run's record).
        log: callable receiving progress lines.

    Returns:
        The path of the written version folder.

    Raises:
        ExportError: a run without a model, another dataset, a gene-list mismatch, a
            model with non-finite weights, an existing version, or a SavedModel that
            does not reproduce the Keras model. Nothing is left in `model_base` (and
            no `model_base` when the export would have created it).
        LockedError: another live process is exporting into `model_base`.

    Example:

    ```python
    path = export_run("runs/finetune-scarf", "models/ssrl")  # models/ssrl/1
    ```
    """
    model_base = os.fspath(model_base)
    if "://" in model_base:
        raise ExportError(
            f"{model_base}: MODEL_BASE must be a local folder (versions are renamed "
            "into place atomically); export locally, then copy the version folder"
        )
    if os.path.exists(model_base) and not os.path.isdir(model_base):
        raise ExportError(f"{model_base}: exists and is not a folder")
    if version is not None:
        version = _check_version(version)
        _refuse_existing(model_base, version)
    run = load_run(run_dir, data_dir)
    model = load_model(run)
    lock = _lock_model_base(model_base)
    try:
        remove_stale_temporaries(model_base, STALE_TEMPORARY, log)
        version = version or next_version(model_base)
        _refuse_existing(model_base, version)  # written by an export since the check
        final, report = _write_version(run, model, model_base, version, log)
    except BaseException:
        if lock.created:
            # The export made the base: take it away again, lock file included.
            _remove_quietly(lock.path)
            lock.release()
            _remove_quietly(model_base, folder=True)
        raise
    finally:
        lock.release()
    worst = max(report["max_abs_difference"].values())
    log(
        f"wrote {final}: signatures {', '.join(signature_docs(run.kind, run.data, 1, 1))}; "
        f"largest difference from the Keras model {worst:.2g}"
    )
    return final


def _check_version(version) -> int:
    try:
        number = None if isinstance(version, bool) else operator.index(version)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ExportError(f"--version must be an integer >= 1, got {version!r}")
    return number


def _refuse_existing(model_base: str, version: int) -> None:
    final = os.path.join(model_base, str(version))
    if os.path.exists(final):
        raise ExportError(
            f"{final} exists: versions are never overwritten (TF Serving may be serving "
            "it); choose another --version or leave it out for the next one"
        )


def _lock_model_base(model_base: str) -> FolderLock:
    try:
        return FolderLock(model_base, "model base").acquire()
    except OSError as error:
        raise ExportError(
            f"{model_base}: cannot create or lock the model base "
            f"({error.strerror or error}); choose a writable --out"
        ) from None


def _remove_quietly(path: str, folder: bool = False) -> None:
    try:
        (os.rmdir if folder else os.remove)(path)
    except OSError:  # not empty (another writer arrived) or already gone: leave it
        pass


def _write_version(run: Run, model, model_base: str, version: int, log):
    """Writes, verifies and renames `model_base/<version>`; returns (path, report)."""
    final = os.path.join(model_base, str(version))
    tmp = os.path.join(model_base, f".tmp-{version}-{os.getpid()}")
    try:
        log(
            f"exporting the {run.kind} of {run.directory} ({run.data.n_genes} genes"
            + (f", {len(run.class_names)} classes" if run.class_names else "")
            + f") as version {version} of {model_base}"
        )
        archive = build_archive(model, run.kind, run.data, run.class_names)
        archive.write_out(tmp, verbose=False)
        report = verify_export(tmp, model, run.kind, run.data, run.class_names)
        write_assets(tmp, run, model_card(run, model, report, version))
        # os.replace would swap an empty folder for ours: refuse anything there.
        if os.path.exists(final):
            raise ExportError(f"{final} appeared during the export; not replaced")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, report
