"""Run folders: the files a pre-training or fine-tuning run writes, and their guards.

One place owns the names (`encoder.keras`, `classifier.keras`, `config.json`,
`metrics.json`, ...) that training, fine-tuning, the evaluation protocol, export and the
scripts read and write, `load_run_config`, and the checks every run folder goes through
before anything is written into it: not a file, nothing foreign inside, not inside the
dataset it reads, and one process at a time (`locked_folder`).

A pre-training run folder:

    config.json      every resolved setting, the dataset's digest, versions, command
    encoder.keras    the kept encoder (float32, loadable with plain Keras)
    history.csv      one row per epoch
    summary.json     final losses, steps, time, samples/s
    checkpoints/     numbered, atomic training checkpoints
    logs/            TensorBoard (scalars, embeddings projector)

A fine-tuning run folder: config.json, classifier.keras, history.csv, metrics.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from keras_ssrl.files import LOCK_FILE, FolderLock, LockedError, preview

# Every run folder (pre-training and fine-tuning) holds its resolved settings here.
CONFIG_JSON = "config.json"
SUMMARY_JSON = "summary.json"
HISTORY_CSV = "history.csv"
ENCODER_FILE = "encoder.keras"
LOGS_DIR = "logs"
CHECKPOINTS_DIR = "checkpoints"
PROJECTOR_DIR = "embeddings"
CLASSIFIER_FILE = "classifier.keras"
METRICS_JSON = "metrics.json"


class RunDirError(ValueError):
    """RUN_DIR cannot be used: it holds another run, or a different one to resume."""


def load_run_config(run_dir: str) -> dict | None:
    """The `config.json` of a run folder, or None when there is none.

    Raises:
        RunDirError: the file exists but is not a JSON object (damaged or foreign).
    """
    path = os.path.join(run_dir, CONFIG_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunDirError(f"{path}: unreadable ({error})") from None
    if not isinstance(record, dict):
        raise RunDirError(f"{path}: not a run's config.json (not a JSON object)")
    return record


def stale_temporaries_pattern(names) -> str:
    """A regex for the temporaries `atomic_path` leaves for `names` when killed.

    Only those of the run's own files: a user's file is never matched.
    """
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"(?:{alternatives})\.tmp-(?P<pid>\d+)(?:\.keras)?"


def check_output_folder(
    path: str,
    own: tuple[str, ...],
    what: str,
    error: type = RunDirError,
    own_files: bool = False,
) -> None:
    """Refuses a path that is not a folder, or a folder holding anything foreign.

    A new run may go into a missing or empty folder, or one holding only what an
    earlier, interrupted attempt of this tool leaves (its lock file, the temporaries
    of `own`, and with `own_files` the files `own` themselves): writing a run among a
    user's files could overwrite them.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise error(
            f"{path} exists and is not a folder; choose a folder for the {what}"
        )
    if not os.path.isdir(path):
        return
    temporary = re.compile(stale_temporaries_pattern(own))
    allowed = {LOCK_FILE, *(own if own_files else ())}
    foreign = sorted(
        name
        for name in os.listdir(path)
        if name not in allowed and not temporary.fullmatch(name)
    )
    if foreign:
        raise error(
            f"{path} already holds files that are not a {what} ({preview(foreign, 3)}); "
            "choose a new or empty folder"
        )


def check_outside(path: str, data_dir: str, what: str, error: type = RunDirError):
    """Refuses an output folder inside (or equal to) the dataset folder it reads."""
    if "://" in str(data_dir):
        return
    data = os.path.realpath(data_dir)
    out = os.path.realpath(path)
    if os.path.commonpath([out, data]) == data:
        raise error(
            f"{path}: the {what} would be inside the dataset folder {data_dir}, adding "
            "files to the dataset; choose a folder outside it"
        )


@contextlib.contextmanager
def locked_folder(path: str, what: str, error: type = RunDirError):
    """Holds an exclusive `FolderLock` on `path` for the block: one process per folder.

    A second process gets `error` naming the holder's PID (a lock left by a dead
    process is taken over: the kernel released it). When the lock created the folder
    and the block fails while the folder holds nothing but the lock file (a run
    refused or failed before writing anything), the folder is removed again: no trace.

    Yields:
        The `FolderLock`.
    """
    lock = FolderLock(path, what)
    try:
        lock.acquire()
    except LockedError as locked:  # its message names the holder's PID
        raise error(str(locked)) from locked
    except OSError as failure:
        raise error(
            f"{path}: cannot create or lock the {what} ({failure.strerror or failure})"
        ) from None
    try:
        yield lock
    except BaseException:
        # Still holding the lock: no other process can be starting in the folder.
        if lock.created and os.listdir(lock.directory) == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                os.remove(lock.path)
                os.rmdir(lock.directory)
        raise
    finally:
        lock.release()


def free_run_dir(base: str) -> str:
    """`base`, or else the first of `base-2`, `base-3`, ... that is missing or empty.

    The command lines' default run folders (`runs/scarf`) are stable names that a
    README or a next command can name; a second run with the same defaults goes
    beside the first instead of being refused.
    """
    candidate, number = base, 1
    while os.path.lexists(candidate) and not (
        os.path.isdir(candidate) and not os.listdir(candidate)
    ):
        number += 1
        candidate = f"{base}-{number}"
    return candidate
