"""The output folder of the converter and of alignment: checked first, swapped in whole.

A dataset is written into a temporary folder beside `--out` (`.NAME.tmp-PID`) and
renamed into place only once complete, so a failed or killed run never leaves half a
dataset. Before anything is written, `check_output` refuses every folder this tool must
not touch: `--overwrite` replaces only a dataset the converter wrote (a manifest of ours
and nothing else inside), never a folder holding anything foreign, and never one that
is, contains, or lies inside an input of the command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence

from keras_ssrl.data import schema
from keras_ssrl.data.errors import DataError, preview
from keras_ssrl.data.manifest import FORMAT_NAME, MANIFEST, SPLITS_CSV
from keras_ssrl.files import LOCK_FILE, pid_alive, remove_stale_temporaries

# What a folder written by the converter may hold besides the shards its manifest names.
_OWN_FILES = frozenset({MANIFEST, SPLITS_CSV, LOCK_FILE})
_SHARD_NAME = re.compile(rf"(?:{'|'.join(schema.SPLITS)})-\d{{5}}-of-\d{{5}}\.tfrecord")


def _temporary_pattern(out_dir: str) -> str:
    """The names of this output's temporaries: `.NAME.tmp-PID` and its `.old` twin."""
    base = re.escape(os.path.basename(out_dir))
    return rf"\.{base}\.tmp-(?P<pid>\d+)(?P<old>\.old)?"


def _local_inputs(inputs: Sequence[str | None]) -> list[str]:
    """The inputs that are local files or folders, as resolved absolute paths."""
    paths = []
    for path in inputs:
        if path and "://" not in str(path) and os.path.exists(path):
            paths.append(os.path.realpath(path))
    return paths


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _foreign_entries(out_dir: str, names: list[str]) -> list[str] | None:
    """The entries of `out_dir` the converter did not write (None: no manifest of ours).

    Ours are `manifest.json` (format `keras_ssrl.tfrecord`), `splits.csv`, the lock
    file, and the shards the manifest names under the converter's own shard names,
    each a plain file (a link could stand for anything).
    """
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("format") != FORMAT_NAME:
            return None
        shards = {
            shard.get("file")
            for split in data.get("splits", {}).values()
            for shard in split.get("shards", [])
        }
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    ours = _OWN_FILES | {
        name for name in shards if isinstance(name, str) and _SHARD_NAME.fullmatch(name)
    }

    def is_ours(name: str) -> bool:
        path = os.path.join(out_dir, name)
        return name in ours and os.path.isfile(path) and not os.path.islink(path)

    return sorted(name for name in names if not is_ours(name))


def check_output(
    out_dir: str, overwrite: bool = False, inputs: Sequence[str | None] = ()
) -> str:
    """Refuses an output folder this command must not write or replace; writes nothing.

    Args:
        out_dir: str, the `--out` folder.
        overwrite: bool, whether an existing dataset may be replaced.
        inputs: the command's input files and folders (expression file, label files,
            the alignment target, ...); remote URLs and names that are not local paths
            are ignored.

    Returns:
        The absolute, link-resolved path of the output folder.

    Raises:
        DataError: naming the folder and what is wrong with it.
    """
    if "://" in str(out_dir):
        raise DataError(
            f"{out_dir}: the converter writes to a local folder; copy the result to "
            "remote storage afterwards (the reader reads gs:// and s3:// paths)"
        )
    # Through a link to a folder: the folder itself is replaced, the link kept.
    out = os.path.realpath(out_dir)
    for path in _local_inputs(inputs):
        if path == out or _inside(path, out):
            raise DataError(
                f"{out_dir}: --out holds the input {path}; write the dataset to a new "
                "folder (a conversion never replaces or deletes its own input)"
            )
        if os.path.isdir(path) and _inside(out, path):
            raise DataError(
                f"{out_dir}: --out lies inside the input folder {path}; choose a "
                "folder outside it"
            )
    _check_writable(out_dir, out)
    if not os.path.isdir(out):
        return out
    names = [n for n in os.listdir(out) if n != LOCK_FILE]
    if not names:
        return out  # an empty folder: nothing to lose
    foreign = _foreign_entries(out, names)
    if foreign is None:
        raise DataError(
            f"{out_dir} already exists and is not a dataset written by this tool (it "
            f"holds {preview(sorted(names))}); choose another --out (--overwrite only "
            "replaces a dataset folder the converter wrote)"
        )
    if foreign:
        raise DataError(
            f"{out_dir} holds files the converter did not write: {preview(foreign)}; "
            "move them out or choose another --out (--overwrite only replaces a "
            "dataset folder with nothing else in it)"
        )
    if not overwrite:
        raise DataError(
            f"{out_dir} already holds a dataset; choose another --out or pass "
            "--overwrite to replace it"
        )
    return out


def _check_writable(out_dir: str, out: str) -> None:
    """Refuses a location where the output (or its temporary twin) cannot be made."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise DataError(f"{out_dir} is a file, not a folder; choose another --out")
    existing = os.path.dirname(out)
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            raise DataError(
                f"{out_dir}: cannot create the output folder, {existing} is a file"
            )
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(
            f"{out_dir}: cannot write there ({existing} is not writable); choose "
            "another --out"
        )


class OutputFolder:
    """Writes a dataset into a temporary folder, moved onto `out_dir` when complete.

    Constructing it checks the folder (`check_output`) and writes nothing, except to
    put back a dataset that a killed replacement had moved aside. Entering removes the
    temporaries of dead earlier runs and creates the temporary folder (and any missing
    parent); a clean exit moves the result into place, replacing an older dataset only
    then; an error removes everything this run created.

    Args:
        out_dir: str, the output folder.
        overwrite: bool, replace an existing dataset written by the converter.
        inputs: the command's input files and folders, never replaced or written into.
        log: callable receiving progress lines.

    Example:

    ```python
    output = OutputFolder("data/mine", overwrite=True, inputs=["expr.csv"])
    ...  # validate everything else
    with output as tmp:
        ...  # write shards and manifest.json into tmp
    ```
    """

    def __init__(
        self,
        out_dir: str,
        overwrite: bool = False,
        inputs: Sequence[str | None] = (),
        log: Callable[[str], None] = print,
    ):
        self.name = str(out_dir)
        self.overwrite = overwrite
        self.log = log
        restore_interrupted(out_dir, log)
        self.path = check_output(out_dir, overwrite, inputs)
        parent, base = os.path.split(self.path)
        self.tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
        self._created: list[str] = []

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        missing = []
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        try:
            for folder in reversed(missing):
                os.mkdir(folder)
                self._created.append(folder)
            remove_stale_temporaries(
                os.path.dirname(self.path), _temporary_pattern(self.path), self.log
            )
            shutil.rmtree(self.tmp, ignore_errors=True)  # an earlier call of ours
            os.mkdir(self.tmp)
        except OSError as error:
            self._discard()
            raise DataError(
                f"{self.name}: cannot create the output folder ({error.strerror})"
            ) from None
        return self.tmp

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            try:
                self._swap_in()
                return
            except BaseException:
                self._discard()
                raise
        self._discard()

    def _swap_in(self) -> None:
        """Renames the finished folder in; an older dataset is removed only after."""
        try:
            if not os.path.isdir(self.path):
                os.replace(self.tmp, self.path)
                return
            # Checked again: another process may have written there meanwhile.
            check_output(self.name, self.overwrite)
            old = f"{self.tmp}.old"
            os.replace(self.path, old)
            try:
                os.replace(self.tmp, self.path)
            except OSError:
                os.replace(old, self.path)
                raise
        except OSError as error:
            raise DataError(
                f"{self.name}: cannot move the new dataset into place "
                f"({error.strerror})"
            ) from None
        shutil.rmtree(old, ignore_errors=True)

    def _discard(self) -> None:
        """Removes the temporary folder and the parents this run created."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._created = []


def restore_interrupted(out_dir: str, log: Callable[[str], None] = print) -> bool:
    """Puts back a dataset that a killed replacement had moved aside.

    Between the two renames of a replacement the old dataset lives in
    `.NAME.tmp-PID.old`; a kill -9 in that instant leaves no `out_dir`. The next run
    puts it back instead of removing it as a stale temporary.

    Returns:
        Whether a dataset was restored.
    """
    if "://" in str(out_dir):
        return False
    out = os.path.realpath(out_dir)
    parent, base = os.path.split(out)
    if os.path.lexists(out) or not os.path.isdir(parent):
        return False
    pattern = re.compile(_temporary_pattern(out))
    for name in sorted(os.listdir(parent)):
        match = pattern.fullmatch(name)
        if match and match.group("old") and not pid_alive(int(match.group("pid"))):
            os.replace(os.path.join(parent, name), out)
            log(f"restored {out} from {name}, left by an interrupted replacement")
            return True
    return False
