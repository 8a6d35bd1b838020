"""Client of the exported models: samples in, predictions CSV out.

Inputs are either a table (CSV / TSV / Parquet, samples as rows or genes as rows, read
by the converter's own table reader) whose gene columns are put in the model's gene
order (ids matched without Ensembl version suffix, as the converter matches them; a
missing model gene is an error naming it, genes the model does not use are ignored and
counted), or a converted TFRecord folder whose records go to the `predict_examples`
signature unchanged (its gene list must be the model's).

Three transports behind one `predict(signature, inputs, output_names)` method:

- `RestModel`: TF Serving's REST API, `POST /v1/models/<name>[/versions/<v>]:predict`
  with a JSON body in the row (`{"instances": [{"expression": [...]}, ...]}`) or the
  columnar (`{"inputs": {"expression": [[...], ...]}}`) form; strings are sent as
  `{"b64": ...}`. Standard library only (no TensorFlow import).
- `GrpcModel`: TF Serving's gRPC `PredictionService/Predict` with a `PredictRequest`
  from the `tensorflow-serving-api` package (the `serving` extra).
- `LocalModel`: the SavedModel loaded in-process with `tf.saved_model.load`, same
  inputs and outputs.

The gene list and class names come from the export's `assets/` (the version folder, or
a copy of it next to the client), since TF Serving serves tensors, not files.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.genes import plan_genes, strip_version
from keras_ssrl.data.manifest import write_csv_atomic
from keras_ssrl.serving.export import (
    ASSETS,
    CLASS_NAMES_TXT,
    CLASSIFIER,
    EXAMPLES_INPUT,
    GENES_TXT,
    INPUT,
    MODEL_CARD_JSON,
    PREDICT_EXAMPLES,
    SERVING_DEFAULT,
)

REST_FORMS = ("instances", "inputs")
DEFAULT_BATCH = 64
# gRPC messages: a batch of 64 samples x 57k genes is 15 MB, above gRPC's 4 MB default.
GRPC_MAX_MESSAGE = 1 << 30


class ServingError(RuntimeError):
    """The model server (or the in-process model) refused or failed a request."""


# --------------------------------------------------------------------- the model


def version_dir(path: str) -> str:
    """The SavedModel folder of `path`: itself, or the highest version inside it."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if os.path.isdir(path):
        versions = [
            int(n)
            for n in os.listdir(path)
            if n.isdigit() and os.path.isfile(os.path.join(path, n, "saved_model.pb"))
        ]
        if versions:
            return os.path.join(path, str(max(versions)))
    raise DataError(
        f"{path}: no saved_model.pb in it or in a version folder below it; pass an "
        "export written by export/export_model.py (MODEL_BASE or MODEL_BASE/<version>)"
    )


@dataclass
class ModelInfo:
    """What the client needs to know about an export: genes, classes, signatures."""

    directory: str
    genes: list[str]
    class_names: list[str] | None
    card: dict

    @classmethod
    def load(cls, path: str) -> ModelInfo:
        directory = version_dir(path)
        assets = os.path.join(directory, ASSETS)

        def lines(name):
            file = os.path.join(assets, name)
            if not os.path.isfile(file):
                return None
            with open(file, encoding="utf-8") as handle:
                return [line.rstrip("\n") for line in handle if line.strip()]

        genes = lines(GENES_TXT)
        if not genes:
            raise DataError(
                f"{directory}: no {ASSETS}/{GENES_TXT}; not an export of "
                "export/export_model.py"
            )
        try:
            with open(
                os.path.join(assets, MODEL_CARD_JSON), encoding="utf-8"
            ) as handle:
                card = json.load(handle)
        except (OSError, ValueError) as error:
            raise DataError(
                f"{directory}: unreadable {ASSETS}/{MODEL_CARD_JSON} ({error})"
            ) from None
        return cls(directory, genes, lines(CLASS_NAMES_TXT), card)

    @property
    def kind(self) -> str:
        return self.card["kind"]

    def output_names(self, signature: str) -> list[str]:
        return list(self.card["signatures"][signature]["outputs"])


# --------------------------------------------------------------------- inputs


def align_to_model(
    genes: Sequence[str],
    values: np.ndarray,
    model_genes: Sequence[str],
    path: str = "input",
    duplicate_genes: str = "error",
) -> tuple[np.ndarray, int]:
    """Puts a `(samples, genes)` block in the model's gene order.

    Gene ids are matched without Ensembl version suffix (`strip_version`, as the
    converter does), and columns of one id are merged by `duplicate_genes` (`sum`,
    `mean` or `first`, the converter's `plan_genes` policies) or refused (`error`,
    the default). Only the model's genes matter: duplicates among the genes it
    ignores are ignored too.

    Returns:
        `(float32 array (samples, len(model_genes)), number of genes ignored)`.

    Raises:
        DataError: model genes missing from the input (named), or duplicate ids of
            model genes under `error` (named, with the client's `--duplicate-genes`).
    """
    refuse = duplicate_genes == "error"
    plan = plan_genes(
        list(genes), path, strip_versions=True, par_y="keep",
        duplicate_genes="first" if refuse else duplicate_genes,
    )  # fmt: skip
    position = {g: i for i, g in enumerate(plan.genes)}
    wanted = [strip_version(g) for g in model_genes]
    if refuse:
        used = [position[w] for w in wanted if w in position]
        _refuse_duplicate_genes(plan, used, path)
    missing = [g for g, w in zip(model_genes, wanted) if w not in position]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of the model's {len(model_genes)} genes are "
            f"missing: {preview(missing, 10)}. Every gene of the model's "
            f"{ASSETS}/{GENES_TXT} needs a column (ids are matched without version "
            "suffix); a gene not measured cannot be imputed here."
        )
    merged = plan.apply(np.asarray(values))
    columns = np.array([position[w] for w in wanted], dtype=np.int64)
    return np.ascontiguousarray(
        merged[:, columns], dtype=np.float32
    ), plan.n_genes - len(columns)


def _refuse_duplicate_genes(plan, used: Sequence[int], path: str) -> None:
    """Raises `DataError` naming the model genes that have several input columns."""
    groups = [(plan.genes[i], plan.groups[i]) for i in used]
    duplicated = [
        f"{gene} (input genes {', '.join(str(c + 1) for c in columns[:4])})"
        for gene, columns in groups
        if len(columns) > 1
    ]
    if duplicated:
        raise DataError(
            f"{path}: {len(duplicated)} of the model's gene id(s) occur more than once "
            f"(ids compared without version suffix), e.g. {preview(duplicated, 5)}. "
            "Choose how to merge them with --duplicate-genes sum|mean|first (sum adds "
            "the counts of the columns)."
        )


def _refuse_duplicate_samples(sample_ids: Sequence[str], path: str, row_name) -> None:
    """Raises `DataError` naming sample ids that occur more than once.

    Each row of the predictions CSV is keyed by its sample id: two samples with one id
    would give two predictions nobody can tell apart.
    """
    seen: dict[str, int] = {}
    duplicated: dict[str, list[int]] = {}
    for i, sid in enumerate(sample_ids):
        sid = str(sid)
        if sid in seen:
            duplicated.setdefault(sid, [seen[sid]]).append(i)
        else:
            seen[sid] = i
    if duplicated:
        rows = next(iter(duplicated.values()))[:2]
        raise DataError(
            f"{path}: {len(duplicated)} sample id(s) occur more than once: "
            f"{preview(duplicated, 5)}; e.g. {' and '.join(map(row_name, rows))}. "
            "Predictions are keyed by sample id, so ids must be unique: rename or drop "
            "the duplicates."
        )


def check_finite(x: np.ndarray, sample_ids: Sequence[str], genes: Sequence[str], path):
    """Raises `DataError` naming the first sample and gene with a NaN or inf value."""
    bad = ~np.isfinite(x)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise DataError(
            f"{path}: {int(bad.sum())} missing or infinite value(s) in the model's genes "
            f"({len(set(rows.tolist()))} sample(s)), e.g. sample {sample_ids[rows[0]]!r}, "
            f"gene {genes[cols[0]]!r}: the model cannot be served NaN; impute or drop "
            "them first"
        )


@dataclass
class Samples:
    """Model inputs ready to send: raw values, or serialized records."""

    sample_ids: list[str]
    signature: str
    input_name: str
    values: np.ndarray  # float32 (n, genes), or object array of bytes (n,)
    labels: list | None = None
    ignored_genes: int = 0


def read_table_samples(
    path: str,
    info: ModelInfo,
    *,
    fmt: str = "auto",
    sample_column: str | None = None,
    label_column: str | None = None,
    genes_as_rows: bool | None = None,
    duplicate_genes: str = "error",
) -> Samples:
    """Reads a CSV / TSV / Parquet expression table into model inputs."""
    from keras_ssrl.data.sources.tables import open_table

    source = open_table(
        path, fmt=fmt, sample_column=sample_column, label_column=label_column,
        genes_as_rows=genes_as_rows,
    )  # fmt: skip
    _refuse_duplicate_samples(source.sample_ids, path, source.row_name)
    x, ignored = align_to_model(
        source.genes, source.values, info.genes, path, duplicate_genes
    )
    check_finite(x, source.sample_ids, info.genes, path)
    return Samples(
        list(source.sample_ids), SERVING_DEFAULT, INPUT, x, source.labels, ignored
    )


def read_record_samples(data_dir: str, split: str, info: ModelInfo) -> Samples:
    """Reads a converted TFRecord split as serialized records, for `predict_examples`.

    Raises:
        DataError: a manifest naming files outside its folder, another gene list,
            transform or record dtype than the model's; `DamagedDataError` for a shard
            that is missing or differs from its manifest checksum.
    """
    import tensorflow as tf

    from keras_ssrl.data.manifest import Manifest
    from keras_ssrl.data.reader import verify_shards

    manifest = Manifest.load(data_dir)
    data = info.card["data"]
    if manifest.genes != info.genes:
        first = next(
            (i for i, (a, b) in enumerate(zip(manifest.genes, info.genes)) if a != b),
            min(manifest.n_genes, len(info.genes)),
        )
        raise DataError(
            f"{data_dir}: its {manifest.n_genes} genes are not the model's "
            f"{len(info.genes)} in the same order (first difference at position "
            f"{first + 1}); records must hold the model's genes. Re-write them with "
            "tfrecords_tools/align.py --to the model's dataset, or send a table with "
            "--input."
        )
    for key, have in (
        ("transform", manifest.data["transform"]),
        ("record_dtype", manifest.record_dtype),
    ):
        if have != data[key]:
            raise DataError(
                f"{data_dir}: records are {key} {have!r}, the model expects "
                f"{data[key]!r}; re-convert with the model's settings"
            )
    # Every byte is sent anyway: check them all first, so a damaged shard is named
    # (DamagedDataError) rather than failing mid-way as "corrupted record at N".
    verify_shards(manifest, split, "checksum")
    records = [r.numpy() for r in tf.data.TFRecordDataset(manifest.shard_paths(split))]
    if not records:
        raise DataError(f"{data_dir}: split {split!r} holds no records")
    values = np.empty(len(records), dtype=object)
    values[:] = records
    # Sample ids come back from the model (output sample_id).
    return Samples([], PREDICT_EXAMPLES, EXAMPLES_INPUT, values)


# --------------------------------------------------------------------- transports


def _clean_tf_message(text: str) -> str:
    """The message of a TensorFlow error without its graph-location decorations."""
    keep = []
    for line in str(text).splitlines():
        line = line.strip()
        if not line or line.startswith(
            ("Detected at node", "<stack", "[[", "Graph ex")
        ):
            continue
        keep.append(re.sub(r"\s*\[\[\{\{.*$|\s*\[Op:.*$", "", line))
    return " ".join(keep) or str(text)


def _json_value(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.ndarray):
        return (
            [_json_value(v) for v in value] if value.dtype == object else value.tolist()
        )
    if isinstance(value, np.generic):
        return value.item()
    return value


def rest_request(inputs: dict, signature: str, form: str = "instances") -> dict:
    """The JSON body of a TF Serving REST predict request.

    Args:
        inputs: input name -> array with the batch on the first axis.
        signature: the signature name.
        form: `instances` (row form: one object per sample, keyed by input name) or
            `inputs` (columnar form: one entry per input holding the whole batch).
    """
    if form not in REST_FORMS:
        raise ValueError(f"form must be one of {REST_FORMS}, got {form!r}")
    body = {"signature_name": signature}
    if form == "inputs":
        body["inputs"] = {
            name: _json_value(np.asarray(v)) for name, v in inputs.items()
        }
    else:
        n = len(next(iter(inputs.values())))
        body["instances"] = [
            {name: _json_value(v[i]) for name, v in inputs.items()} for i in range(n)
        ]
    return body


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _array(values) -> np.ndarray:
    values = _from_json(values)
    flat = values
    while isinstance(flat, list) and flat:
        flat = flat[0]
    if isinstance(flat, (str, bytes)):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values)


def rest_outputs(reply: dict, output_names: Sequence[str]) -> dict:
    """Output name -> array from a TF Serving REST predict response (either form)."""
    single = output_names[0] if len(output_names) == 1 else None
    if "predictions" in reply:
        rows = reply["predictions"]
        if rows and isinstance(rows[0], dict):
            return {k: _array([row[k] for row in rows]) for k in rows[0]}
        return {single: _array(rows)}
    if "outputs" in reply:
        outputs = reply["outputs"]
        if isinstance(outputs, dict):
            return {k: _array(v) for k, v in outputs.items()}
        return {single: _array(outputs)}
    raise ServingError(f"unexpected response (keys {sorted(reply)})")


class RestModel:
    """A model served by TF Serving's REST API (`--rest_api_port`, 8501 by default)."""

    def __init__(
        self,
        url: str,
        model_name: str,
        version: int | None = None,
        form: str = "instances",
        timeout: float = 120.0,
    ):
        if form not in REST_FORMS:
            raise ValueError(f"form must be one of {REST_FORMS}, got {form!r}")
        if "://" not in url:
            url = f"http://{url}"
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.version = version
        self.form = form
        self.timeout = timeout

    @property
    def endpoint(self) -> str:
        path = f"{self.url}/v1/models/{self.model_name}"
        if self.version is not None:
            path += f"/versions/{self.version}"
        return path + ":predict"

    def predict(self, signature: str, inputs: dict, output_names: Sequence[str]):
        body = json.dumps(rest_request(inputs, signature, self.form), allow_nan=False)
        request = urllib.request.Request(
            self.endpoint,
            data=body.encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            try:
                text = json.loads(text).get("error", text)
            except ValueError:
                pass
            raise ServingError(
                f"{self.endpoint}: HTTP {error.code}: {_clean_tf_message(text)}"
            ) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServingError(
                f"{self.endpoint}: cannot reach the server ({reason}); is TF Serving "
                "running with its REST port published (-p 8501:8501)?"
            ) from None
        return rest_outputs(reply, output_names)


def predict_request(model_name, signature, inputs, version=None):
    """A TF Serving gRPC `PredictRequest` (needs `tensorflow-serving-api`)."""
    import tensorflow as tf

    predict_pb2 = _serving_apis()[0]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def _serving_apis():
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError:
        raise ServingError(
            "gRPC needs the tensorflow-serving-api package (pip install -e "
            '".[serving]"); or call the REST API with --rest'
        ) from None
    return predict_pb2, prediction_service_pb2_grpc


class GrpcModel:
    """A model served by TF Serving's gRPC API (`--port`, 8500 by default)."""

    def __init__(
        self,
        target: str,
        model_name: str,
        version: int | None = None,
        timeout: float = 120.0,
    ):
        import grpc

        grpc_stub = _serving_apis()[1]
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self._grpc = grpc
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ],
        )
        self._stub = grpc_stub.PredictionServiceStub(self._channel)

    def predict(self, signature: str, inputs: dict, output_names=None):
        import tensorflow as tf

        request = predict_request(self.model_name, signature, inputs, self.version)
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as error:
            raise ServingError(
                f"{self.target}: {error.code().name}: "
                f"{_clean_tf_message(error.details())}"
            ) from None
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def close(self):
        self._channel.close()


class LocalModel:
    """The SavedModel called in-process, with TF Serving's inputs and outputs."""

    def __init__(self, model_dir: str):
        import tensorflow as tf

        self.directory = version_dir(model_dir)
        self._tf = tf
        self._loaded = tf.saved_model.load(self.directory)

    def predict(self, signature: str, inputs: dict, output_names=None):
        tf = self._tf
        if signature not in self._loaded.signatures:
            raise ServingError(
                f"{self.directory}: no signature {signature!r} (it has "
                f"{', '.join(self._loaded.signatures)})"
            )
        function = self._loaded.signatures[signature]
        try:
            out = function(**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, TypeError, ValueError) as error:
            text = getattr(error, "message", None) or str(error)
            raise ServingError(f"{self.directory}: {_clean_tf_message(text)}") from None
        return {k: v.numpy() for k, v in out.items()}


# --------------------------------------------------------------------- the run


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_predictions_csv(path: str) -> bool:
    """Whether `path` starts like a CSV this client wrote (`predictions_frame`)."""
    try:
        with open(path, encoding="utf-8") as handle:
            header = handle.readline().rstrip("\r\n").split(",")
    except (OSError, UnicodeDecodeError):
        return False
    return header[0] == "sample_id" and (
        "class_name" in header or "embedding_0" in header
    )


def check_output(out: str, inputs: Sequence[str | None]) -> None:
    """Refuses an `--out` that would replace something other than earlier predictions.

    The predictions CSV is written atomically over `out`, so `out` may only be a new
    file or a predictions CSV of this client: never an input (the samples table, a
    file in the records folder or in the model folder) or any other existing file.

    Raises:
        DataError: naming `out` and why, before any input is read.
    """
    out = os.fspath(out)
    if os.path.isdir(out):
        raise DataError(f"--out {out}: is a folder; name the predictions CSV file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise DataError(f"--out {out}: no folder {parent}; create it first")
    for source in filter(None, inputs):
        if _inside(out, source):
            where = (
                "an input file"
                if os.path.isfile(source)
                else f"inside the input folder {source}"
            )
            raise DataError(
                f"--out {out} is {where}; the predictions would replace it. Choose "
                "another --out."
            )
    if os.path.lexists(out) and not _is_predictions_csv(out):
        raise DataError(
            f"--out {out} exists and is not a predictions CSV of export/client.py; it "
            "is never replaced. Choose another --out, or remove it yourself."
        )


def predict(
    model, samples: Samples, output_names, batch_size: int = DEFAULT_BATCH
) -> dict:
    """Sends `samples` in batches; returns output name -> concatenated array."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts: dict[str, list] = {}
    for start in range(0, len(samples.values), batch_size):
        batch = {samples.input_name: samples.values[start : start + batch_size]}
        for name, value in model.predict(
            samples.signature, batch, output_names
        ).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def predictions_frame(
    samples: Samples, outputs: dict, info: ModelInfo, embedding: bool
):
    """The predictions as a `pandas.DataFrame`, one row per sample."""
    import pandas as pd

    ids = samples.sample_ids or [_text(s) for s in outputs["sample_id"]]
    columns = {"sample_id": ids}
    if samples.labels is not None:
        columns["label"] = ["" if v is None else v for v in samples.labels]
    if info.kind == CLASSIFIER:
        columns["class_name"] = [_text(s) for s in outputs["class_name"]]
        columns["class_id"] = np.asarray(outputs["class_id"], dtype=np.int64)
        probabilities = np.asarray(outputs["probabilities"], dtype=np.float32)
        names = info.class_names or [str(i) for i in range(probabilities.shape[1])]
        for i, name in enumerate(names):
            columns[f"p_{name}"] = probabilities[:, i]
    if embedding or info.kind != CLASSIFIER:
        emb = np.asarray(outputs["embedding"], dtype=np.float32)
        for i in range(emb.shape[1]):
            columns[f"embedding_{i}"] = emb[:, i]
    return pd.DataFrame(columns)


def run_client(
    model,
    info: ModelInfo,
    samples: Samples,
    out: str,
    *,
    batch_size: int = DEFAULT_BATCH,
    embedding: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Predicts every sample through `model` and writes the predictions CSV to `out`.

    Returns:
        A summary: samples, genes ignored, output path.
    """
    outputs = predict(model, samples, info.output_names(samples.signature), batch_size)
    frame = predictions_frame(samples, outputs, info, embedding)
    write_csv_atomic(frame, out)
    summary = {
        "samples": len(frame),
        "ignored_genes": samples.ignored_genes,
        "signature": samples.signature,
        "out": out,
    }
    log(
        f"wrote {len(frame)} predictions to {out} (signature {samples.signature}"
        + (
            f"; {samples.ignored_genes} input genes not used by the model ignored"
            if samples.ignored_genes
            else ""
        )
        + ")"
    )
    return summary
