"""Verification of an export: the SavedModel against the Keras model it came from.

`verify_export` loads a written SavedModel, runs every signature on deterministic
probe inputs (`probe_inputs`) and compares each output with the Keras model's on the
same raw values (`reference_outputs`: the converter's NumPy transform, the manifest
standardisation, the Keras call), element-wise within `tolerance_for(model)`
(`check_outputs`); predicted classes must agree except near-ties
(`class_disagreements`). An export that fails is not renamed into place.
"""

from __future__ import annotations

import numpy as np

from keras_ssrl.data import schema
from keras_ssrl.data.preprocessing import apply_transform
from keras_ssrl.serving.contract import (
    CLASSIFIER,
    CLASSIFY,
    CLASSIFY_INPUT,
    EXAMPLES_INPUT,
    INPUT,
    PREDICT_EXAMPLES,
    SERVING_DEFAULT,
    ExportError,
    as_text,
)
from keras_ssrl.serving.preprocessing import NON_NEGATIVE_VALUES, ServingData
from keras_ssrl.serving.signatures import serving_network

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
PROBE_ROWS = 8


def probe_inputs(data: ServingData, rows: int = PROBE_ROWS, seed: int = 0):
    """Deterministic raw inputs whose transformed values follow the dataset statistics."""
    rng = np.random.default_rng(seed)
    stored = data.mean + data.std * rng.standard_normal((rows, data.n_genes))
    if data.transform == "log2p1":
        raw = np.exp2(stored) - 1.0
    elif data.transform == "log1p":
        raw = np.expm1(stored)
    else:
        raw = stored
    if data.values in NON_NEGATIVE_VALUES:
        raw = np.maximum(raw, 0.0)
    return raw.astype(np.float32)


def reference_outputs(model, kind: str, data: ServingData, raw: np.ndarray) -> dict:
    """What the Keras model gives on raw values, through the converter's numpy path."""
    stored = apply_transform(np.asarray(raw, dtype=np.float32), data.transform)
    return _keras_outputs(model, kind, data, stored)


def _keras_outputs(model, kind, data, stored):
    x = (stored.astype(np.float32) - data.mean) * (np.float32(1.0) / data.std)
    net = serving_network(model, kind)
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
    if "probabilities" in reference:
        _check_classes(signature, served, reference, tol, class_names, bound)
    return differences


def _check_classes(signature, served, reference, tol, class_names, bound) -> None:
    """`check_outputs` for a classifier's class outputs (`bound`: for messages)."""
    probabilities = np.asarray(served["probabilities"])
    # Without a `class_id` output (`classify`), the class is the highest score.
    class_id = np.asarray(served.get("class_id", np.argmax(probabilities, axis=1)))
    rows = np.arange(len(class_id))
    # A maximum, not argmax: equal probabilities (a tie after rounding) are both right.
    if not np.all(probabilities[rows, class_id] >= probabilities.max(axis=1)):
        raise ExportError(f"{signature}: class_id is not the most probable class")
    if "class_name" in served and [as_text(c) for c in served["class_name"]] != [
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


def verify_export(path: str, model, kind: str, data: ServingData, class_names=None):
    """Loads the SavedModel at `path` and compares it with the Keras model.

    Every signature runs on `PROBE_ROWS` raw probe samples (as records for the
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
    got_ids = [as_text(s) for s in served[PREDICT_EXAMPLES]["sample_id"]]
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
