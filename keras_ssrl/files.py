"""Generic guards for the folders keras_ssrl writes: exclusive locks, stale temporaries.

Two processes writing one run folder, evaluation folder or model base corrupt each
other's files (a resumed run deleting the checkpoint the other is writing, two sweeps
rewriting one results table). `FolderLock` makes every writer take an exclusive lock on
its output folder first; a second process is refused, naming the holder's PID.

The lock is an advisory `fcntl.flock` on a small file inside the folder. The kernel
releases it when the holding process ends, however it ends (kill -9 included), so a
lock left behind by a dead process is simply taken over: the file that remains only
records who held it last. This module needs nothing but the standard library.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import sys

LOCK_FILE = ".keras_ssrl.lock"


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
