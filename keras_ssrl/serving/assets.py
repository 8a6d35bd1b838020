"""The `assets/` folder of an export: its file names, writing and reading it back.

TF Serving serves tensors, not files: the gene list, the class names, the manifest
digest and the model card travel in the version folder's `assets/`, written by the
export (`write_assets`) and read by the client (`ModelInfo`, from the version folder or
a copy of it next to the client).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from keras_ssrl.data.errors import DataError
from keras_ssrl.files import write_json_atomic

ASSETS = "assets"
GENES_TXT = "genes.txt"
CLASS_NAMES_TXT = "class_names.txt"
MANIFEST_DIGEST_TXT = "manifest_sha256.txt"
MODEL_CARD_JSON = "model_card.json"
SAVED_MODEL_PB = "saved_model.pb"


def write_assets(
    path: str,
    card: dict,
    *,
    genes: Sequence[str],
    class_names: Sequence[str] | None,
    manifest_sha256: str,
) -> None:
    """Gene list, class names, manifest digest and model card into `path/assets/`."""
    assets = os.path.join(path, ASSETS)
    os.makedirs(assets, exist_ok=True)

    def lines(name, items):
        with open(os.path.join(assets, name), "w", encoding="utf-8") as handle:
            handle.write("".join(f"{item}\n" for item in items))

    lines(GENES_TXT, genes)
    if class_names is not None:
        lines(CLASS_NAMES_TXT, class_names)
    lines(MANIFEST_DIGEST_TXT, [manifest_sha256])
    write_json_atomic(os.path.join(assets, MODEL_CARD_JSON), card)


def version_dir(path: str) -> str:
    """The SavedModel folder of `path`: itself, or the highest version inside it."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, SAVED_MODEL_PB)):
        return path
    if os.path.isdir(path):
        versions = [
            int(n)
            for n in os.listdir(path)
            if n.isdigit() and os.path.isfile(os.path.join(path, n, SAVED_MODEL_PB))
        ]
        if versions:
            return os.path.join(path, str(max(versions)))
    raise DataError(
        f"{path}: no {SAVED_MODEL_PB} in it or in a version folder below it; pass an "
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
