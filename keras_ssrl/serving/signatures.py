"""The served graph: the `keras.export.ExportArchive` endpoints of an export.

The served graph takes what a user has, not what the network was trained on:

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

Inputs are checked in the graph (`keras_ssrl.serving.preprocessing`): a wrong number of
genes, NaN / infinite values and (for count or TPM data) negative values fail the
request with a message saying so. Every output is float32 whatever the training
precision. `signature_docs` is this contract as the model card writes it.
"""

from __future__ import annotations

from keras_ssrl.serving.assets import CLASS_NAMES_TXT, GENES_TXT
from keras_ssrl.serving.contract import (
    CLASSIFIER,
    CLASSIFY,
    CLASSIFY_INPUT,
    ENCODER,
    EXAMPLES_INPUT,
    INPUT,
    PREDICT_EXAMPLES,
    SERVING_DEFAULT,
    ExportError,
)
from keras_ssrl.serving.preprocessing import ServingData, make_preprocessing


def serving_network(model, kind: str):
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

    net = serving_network(model, kind)
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
