"""Training checkpoints: atomic, numbered folders holding the whole training state.

`CheckpointStore` writes and finds them; `seed_states` lists the variables a
`tf.train.Checkpoint` must track besides the model and the optimizer. The Keras
callback that decides *when* to save (`keras_ssrl.callbacks.TrainingCheckpoint`) uses
a store; the store itself is plain file handling, usable without Keras' `fit`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"
_TMP_PREFIX = ".tmp-"
_CKPT_NAME = "ckpt"


def seed_states(model) -> list:
    """The `SeedGenerator` states of `model` (corruption, dropout), for a checkpoint.

    `tf.train.Checkpoint` does not reach them through the layers (verified: they are
    not saved), so a checkpoint must track them explicitly.
    """
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


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

    Each checkpoint is a folder `step-000001200/` holding a `tf.train.Checkpoint`
    (`ckpt.index`, `ckpt.data-*`) and `state.json` (step, epoch and whatever the
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
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
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
