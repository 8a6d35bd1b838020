"""Generic file helpers: paths local or remote, atomic writers, folder locks, temporaries.

Everything that writes a file (tables, figures, reports, run folders, datasets) goes
through the atomic writers here: a temporary name, then a rename, so that readers and a
rerun after a crash never see half a file. This module sits below every other one (it
imports nothing of keras_ssrl but the optional remote filesystems).

Locks. Two processes writing one run folder, evaluation folder or model base corrupt each
other's files (a resumed run deleting the checkpoint the other is writing, two sweeps
rewriting one results table). `FolderLock` makes every writer take an exclusive lock on
its output folder first; a second process is refused, naming the holder's PID.

The lock is an advisory `fcntl.flock` on a small file inside the folder. The kernel
releases it when the holding process ends, however it ends (kill -9 included), so a
lock left behind by a dead process is simply taken over: the file that remains only
records who held it last.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import sys

import numpy as np

LOCK_FILE = ".keras_ssrl.lock"


def preview(items, limit: int = 5) -> str:
    """Formats the first `limit` items of a sequence for an error message."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items)} in all)"
    return shown


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (`gs://`, `s3://`, ...) rather than a local path."""
    return "://" in str(path)


def join(directory: str, name: str) -> str:
    """Joins paths for local folders and `gs://` / `s3://` URLs alike."""
    if is_remote(directory):
        return posixpath.join(str(directory), name)
    return os.path.join(directory, name)


def open_file(path: str, mode: str = "rb"):
    """Opens local files directly and remote ones through TensorFlow's filesystems."""
    if is_remote(path):
        import tensorflow as tf

        from keras_ssrl import filesystems

        filesystems.register()
        return tf.io.gfile.GFile(path, mode)
    return open(path, mode)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open_file(path, "rb") as handle:
        while True:
            data = handle.read(chunk)
            if not data:
                break
            digest.update(data)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary name next to `path`, renamed onto `path` on success.

    Readers (and a rerun after a crash) never see half a file: on any error the
    temporary file is removed and `path` keeps its previous content. `suffix` ends the
    temporary name, for writers that check it (Keras saves only to `.keras`).
    """
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, payload: dict) -> None:
    """Writes JSON to a temporary name, then renames: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, allow_nan=False, default=_json_default)
        handle.write("\n")


def write_csv_atomic(frame, path: str, float_format: str = "%.7g") -> None:
    """Writes a pandas DataFrame as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)


def _json_default(value):
    """NumPy scalars (metrics, counts) as plain JSON numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class LockedError(RuntimeError):
    """Another live process holds the lock of a folder."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


def _read_holder(path: str) -> dict:
    """What the lock file says about its last holder (empty when unreadable)."""
    holder = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                if key:
                    holder[key] = value
    except OSError:
        pass
    return holder


class FolderLock:
    """An exclusive, process-wide lock on a local folder.

    Use it as a context manager around everything that writes into the folder, and
    take it after every argument has been validated: a refused command then leaves no
    trace. The folder is created if needed (`created` says whether this lock did).

    Args:
        directory: str, the folder to lock.
        what: str, how messages name the folder ("run folder", "model base", ...).
        name: str, the lock file's name; folders that hold several independent
            writers (the shards of one sweep) give each writer its own name.

    Raises:
        LockedError: on entry, when another live process holds the lock.

    Example:

    ```python
    with FolderLock("runs/scarf", "run folder"):
        ...  # write config.json, checkpoints, ...
    ```
    """

    def __init__(self, directory: str, what: str = "folder", name: str = LOCK_FILE):
        self.directory = os.path.abspath(str(directory))
        self.what = what
        self.path = os.path.join(self.directory, name)
        self.created = False
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        if self._fd is not None:
            return self
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, exist_ok=True)
            self.created = True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_holder(self.path)
            pid = int(holder["pid"]) if holder.get("pid", "").isdigit() else None
            who = f"process {pid}" if pid is not None else "another process"
            if holder.get("host") and holder["host"] != socket.gethostname():
                who += f" on {holder['host']}"
            raise LockedError(
                f"{self.directory}: this {self.what} is in use by {who}"
                + (f" ({holder['command']})" if holder.get("command") else "")
                + "; wait for it to finish or stop it, then run again",
                pid,
            ) from None
        # Ours now: record who holds it, for the message a second process prints.
        os.ftruncate(fd, 0)
        command = " ".join(sys.argv)[:300].replace("\n", " ")
        os.write(
            fd,
            f"pid={os.getpid()}\nhost={socket.gethostname()}\ncommand={command}\n".encode(),
        )
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays (removing it would race with a process opening it to lock);
        # the kernel lock is what counts, and it goes with the descriptor.
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(
    directory: str, pattern: str, log=None
) -> list[str]:
    """Removes temporaries in `directory` whose writer process is gone.

    Writers name their temporaries with their PID (a converter's `.NAME.tmp-PID`, an
    export's `.tmp-VERSION-PID`); a kill -9 leaves them behind. An entry is removed
    only when `pattern` (a regular expression with a group named `pid`) matches its
    whole name and no process with that PID is alive; a live writer's temporary is
    never touched.

    Returns:
        The names removed.
    """
    regex = re.compile(pattern)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = regex.fullmatch(name)
        if not match or match.group("pid") == str(os.getpid()):
            continue
        if pid_alive(int(match.group("pid"))):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                continue
        removed.append(name)
        if log is not None:
            log(f"removed {path}, left by process {match.group('pid')} (no longer running)")
    return removed
