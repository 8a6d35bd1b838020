"""Training checkpoints: atomic, numbered folders holding the whole training state.

`CheckpointStore` writes and finds them; `VariablesCheckpoint` is what they hold: the
values of named groups of variables (model, optimizer, best weights), in a format that
is the same on every Keras backend. The Keras callback that decides *when* to save
(`keras_ssrl.callbacks.TrainingCheckpoint`) uses a store; the store itself is plain file
handling, usable without Keras' `fit`, with any object that has `write(prefix)` and
`read(prefix)` (a `tf.train.Checkpoint` works too).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import numpy as np

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"
_TMP_PREFIX = ".tmp-"
_CKPT_NAME = "ckpt"


class CheckpointMismatch(AssertionError):
    """The saved variables are not those of the model being restored."""


class _Restored:
    """What `VariablesCheckpoint.read` returns (as `tf.train.Checkpoint.read` does)."""

    def assert_consumed(self) -> None:
        # `read` already checked that every saved value found its variable.
        return None


class VariablesCheckpoint:
    """The values of named groups of Keras variables, saved as one `.npz` archive.

    Why not `tf.train.Checkpoint`: it exists only on the TensorFlow backend, and it
    does not reach the layers' `SeedGenerator` states (verified: they were not saved).
    `model.variables` holds weights, BatchNorm statistics and seed states alike, on
    every backend, so a checkpoint of `model.variables + optimizer.variables` restores
    a run exactly, and a run started under one backend resumes under the other.

    Variables are matched by group and position, and checked by shape and dtype:
    their paths carry layer-name suffixes that depend on what else the process built.

    Args:
        **groups: name -> list of variables (`model=model.variables`, ...).

    Example:

    ```python
    checkpoint = VariablesCheckpoint(model=model.variables,
                                     optimizer=model.optimizer.variables)
    CheckpointStore("run/checkpoints").save(checkpoint, step=200, state={})
    ```
    """

    def __init__(self, **groups):
        self.groups = {name: list(variables) for name, variables in groups.items()}

    def _items(self):
        for group, variables in self.groups.items():
            for i, variable in enumerate(variables):
                yield f"{group}/{i}", variable

    def write(self, prefix: str) -> str:
        """Writes `prefix.npz`; returns its path."""
        arrays, index = {}, []
        for key, variable in self._items():
            value = np.asarray(variable.numpy())
            arrays[key] = value
            index.append([key, variable.path, list(value.shape), str(value.dtype)])
        path = f"{prefix}.npz"
        with open(path, "wb") as handle:
            np.savez(handle, __index__=np.array(json.dumps(index)), **arrays)
        return path

    def read(self, prefix: str) -> _Restored:
        """Assigns the values saved in `prefix.npz`.

        Raises:
            CheckpointMismatch: a variable has no saved value, a saved value has no
                variable, or shapes or dtypes differ (nothing is assigned then).
        """
        with np.load(f"{prefix}.npz", allow_pickle=False) as archive:
            saved = {key: archive[key] for key in archive.files if key != "__index__"}
        pairs, problems = [], []
        for key, variable in self._items():
            value = saved.pop(key, None)
            if value is None:
                problems.append(f"{key} ({variable.path}) was not saved")
            elif tuple(value.shape) != tuple(variable.shape):
                problems.append(
                    f"{key} ({variable.path}) has shape {tuple(variable.shape)}, "
                    f"saved {tuple(value.shape)}"
                )
            else:
                pairs.append((variable, value))
        problems += [f"{key} was saved but has no variable" for key in sorted(saved)]
        if problems:
            raise CheckpointMismatch(
                f"{len(problems)} differences, e.g. {'; '.join(problems[:3])}"
            )
        for variable, value in pairs:
            variable.assign(value.astype(variable.dtype, copy=False))
        return _Restored()


def _fsync_tree(folder: str) -> None:
    """Flushes every file of `folder` and the folder itself to disk."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointStore:
    """Atomic, numbered training checkpoints in a local folder.

    Each checkpoint is a folder `step-000001200/` holding the checkpoint object's files
    (`ckpt.npz` for a `VariablesCheckpoint`) and `state.json` (step, epoch and whatever the
    caller adds). It is written into a hidden temporary folder, flushed to disk and
    renamed into place, so a folder named `step-*` is always complete: a kill during a
    write leaves only a `.tmp-*` folder, which is never loaded and is removed by the
    next write. The newest `keep` checkpoints are kept.

    Args:
        directory: str, a local folder (created when needed).
        keep: int, checkpoints kept (2: the newest may be unreadable after disk
            damage, the previous one is then used).
        log: callable receiving warnings.

    Example:

    ```python
    store = CheckpointStore("run/checkpoints")
    ckpt = VariablesCheckpoint(model=model.variables,
                               optimizer=model.optimizer.variables)
    store.save(ckpt, step=200, state={"epoch": 1})
    path, state = store.latest()
    store.restore(ckpt, path)
    ```
    """

    def __init__(
        self, directory: str, keep: int = 2, log: Callable[[str], None] = print
    ):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = str(directory)
        self.keep = keep
        self.log = log

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"{CHECKPOINT_PREFIX}{int(step):09d}")

    def checkpoints(self) -> list[tuple[int, str]]:
        """Complete checkpoints as `(step, folder)`, newest first."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            if not name.startswith(CHECKPOINT_PREFIX):
                continue
            try:
                step = int(name[len(CHECKPOINT_PREFIX) :])
            except ValueError:
                continue
            folder = os.path.join(self.directory, name)
            if os.path.isfile(os.path.join(folder, STATE_FILE)):
                found.append((step, folder))
        return sorted(found, reverse=True)

    def save(self, checkpoint, step: int, state: dict) -> str:
        """Writes `checkpoint` and `state` as the checkpoint of `step`; returns its folder."""
        os.makedirs(self.directory, exist_ok=True)
        self._remove_temporaries()
        tmp = os.path.join(
            self.directory, f"{_TMP_PREFIX}{int(step):09d}-{os.getpid()}"
        )
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        checkpoint.write(os.path.join(tmp, _CKPT_NAME))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump({**state, "step": int(step)}, handle, indent=1, allow_nan=False)
            handle.write("\n")
        _fsync_tree(tmp)
        final = self.path(step)
        if os.path.exists(final):
            # Only after a fall-back to an older checkpoint: the newer one is replaced.
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        for _, old in self.checkpoints()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _remove_temporaries(self) -> None:
        for name in os.listdir(self.directory):
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    @staticmethod
    def read_state(folder: str) -> dict:
        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as handle:
            return json.load(handle)

    def latest(self) -> tuple[str, dict] | None:
        """The newest complete checkpoint as `(folder, state)`, or None."""
        for _, folder in self.checkpoints():
            try:
                return folder, self.read_state(folder)
            except (OSError, ValueError) as error:
                self.log(f"warning: skipping unreadable checkpoint {folder} ({error})")
        return None

    def restore(self, checkpoint, folder: str) -> dict:
        """Restores `checkpoint` from `folder` and returns its state.

        Every value saved must match an object of `checkpoint`, and every object must
        receive a value: a model that differs from the one saved fails loudly instead
        of training half-restored.
        """
        status = checkpoint.read(os.path.join(folder, _CKPT_NAME))
        status.assert_consumed()
        return self.read_state(folder)

    def restore_latest(self, checkpoint) -> tuple[str, dict] | None:
        """Restores the newest checkpoint that reads; falls back to older ones."""
        for _, folder in self.checkpoints():
            try:
                return folder, self.restore(checkpoint, folder)
            except AssertionError:
                raise
            except Exception as error:  # damaged files: try the previous checkpoint
                self.log(
                    f"warning: cannot read checkpoint {folder} ({error}); trying "
                    "the previous one"
                )
        return None
