"""The pre-training run folder: may this run use it, and what `config.json` records.

Built on `keras_ssrl.runs` (file names, folder guards, locks): a new run needs a missing
or empty folder; `--resume` needs a run to continue, and the same one (method,
configuration, gene list, dataset, precision), or `RunDirError` names every difference.
"""

from __future__ import annotations

import dataclasses
import datetime

from keras_ssrl import __version__
from keras_ssrl.config import to_dict
from keras_ssrl.data import schema
from keras_ssrl.data.manifest import genes_digest
from keras_ssrl.runs import (
    CONFIG_JSON,
    ENCODER_FILE,
    HISTORY_CSV,
    SUMMARY_JSON,
    RunDirError,
    check_output_folder,
    load_run_config,
)
from keras_ssrl.training.context import RunContext

# The files of a run folder that `atomic_path` writes (their temporaries are ours).
RUN_FILES = (CONFIG_JSON, SUMMARY_JSON, HISTORY_CSV, ENCODER_FILE)


def existing_run(run_dir: str, resume: bool) -> dict | None:
    """The `config.json` of the run in `run_dir`, refusing folders this run cannot use.

    A new run needs a missing or empty folder (or one left by an attempt killed
    before writing `config.json`); `resume` needs a run to continue.
    """
    saved = load_run_config(run_dir)
    if saved is None:
        if resume:
            raise RunDirError(
                f"{run_dir}: no run to resume (no {CONFIG_JSON}); start it without "
                "--resume (resume=False)"
            )
        check_output_folder(run_dir, RUN_FILES, "pre-training run")
        return None
    if saved.get("kind") not in (None, "pretrain"):
        raise RunDirError(
            f"{run_dir} holds a {saved['kind']} run, not a pre-training run; choose "
            "another RUN_DIR"
        )
    if not resume:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume (resume=True) to continue "
            "it, or choose another RUN_DIR"
        )
    return saved


def run_record(run: RunContext) -> dict:
    """The content of `config.json`: settings, data, sizes, versions, command."""
    import keras

    manifest, plan, options = run.manifest, run.plan, run.options
    return {
        "config": to_dict(run.config),
        "method": run.config.method,
        "precision": run.precision,
        "data": {
            "dir": str(run.data_dir),
            "builtin": run.builtin,
            "manifest_sha256": manifest.digest(),
            "n_genes": manifest.n_genes,
            "genes_sha256": genes_digest(manifest.genes),
            "n_pretrain": manifest.num_records(schema.PRETRAIN),
            "n_train": plan.n_train,
            "n_val": manifest.num_records(schema.PRETRAIN_VAL),
        },
        "training": {
            **dataclasses.asdict(plan),
            "total_steps": plan.total_steps,
            "checkpoint_every": options.checkpoint_every,
            "distribute": options.distribute,
            "replicas": run.replicas,
            "input": "device" if run.input.on_device else "stream",
        },
        "versions": {
            "keras_ssrl": __version__,
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            **_backend_versions(),
        },
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": list(options.command) if options.command is not None else None,
    }


def _backend_versions() -> dict:
    """Versions of the installed array libraries (TensorFlow is the data layer's)."""
    import importlib.metadata

    versions = {}
    for package in ("tensorflow", "jax", "jaxlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}{key}.", item, out)
    else:
        out[prefix[:-1]] = value
    return out


def _data_difference(old: dict, new: dict) -> list[str]:
    if old.get("genes_sha256") != new["genes_sha256"]:
        return [
            f"gene list: the run used {old.get('n_genes')} genes (digest "
            f"{str(old.get('genes_sha256'))[:12]}), the data now has "
            f"{new['n_genes']} (digest {new['genes_sha256'][:12]})"
        ]
    if old.get("manifest_sha256") != new["manifest_sha256"]:
        return [
            "dataset: same genes but another manifest (digest "
            f"{str(old.get('manifest_sha256'))[:12]} vs "
            f"{new['manifest_sha256'][:12]}): other samples or statistics"
        ]
    return []


def check_same_run(saved: dict, current: dict, run_dir: str) -> None:
    """Raises `RunDirError` naming every difference that forbids a resume.

    Args:
        saved: the run folder's `config.json`.
        current: the `run_record` of the run asking to resume.
        run_dir: the folder, for the message.
    """
    problems = []
    old_cfg = _flatten("", saved.get("config", {}), {})
    new_cfg = _flatten("", current["config"], {})
    if old_cfg.get("method") != new_cfg.get("method"):
        problems.append(
            f"method: the run used {old_cfg.get('method')!r}, now "
            f"{new_cfg.get('method')!r}"
        )
    problems += _data_difference(saved.get("data", {}), current["data"])
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key != "method" and old_cfg.get(key) != new_cfg.get(key):
            problems.append(
                f"config {key}: the run used {old_cfg.get(key)!r}, now "
                f"{new_cfg.get(key)!r}"
            )
    if saved.get("precision") != current["precision"]:
        problems.append(
            f"precision: the run used {saved.get('precision')!r}, now "
            f"{current['precision']!r}"
        )
    if problems:
        raise RunDirError(
            f"cannot resume {run_dir}: it is a different run:\n  - "
            + "\n  - ".join(problems)
            + "\nResume with the run's own settings (by default --resume reuses them) "
            "or choose another RUN_DIR."
        )
