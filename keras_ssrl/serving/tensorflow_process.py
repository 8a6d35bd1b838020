"""The export under Keras's TensorFlow backend, for a process running another backend.

A SavedModel for TF Serving is a TensorFlow graph: `build_archive` traces the dataset's
preprocessing (TensorFlow ops) and the Keras model into one graph with
`keras.export.ExportArchive` under the TensorFlow backend. Under JAX, `ExportArchive`
converts each endpoint with jax2tf, which cannot trace TensorFlow ops, and its graph
would differ from a TensorFlow-backend export anyway. A `.keras` file, on the other
hand, is backend-neutral (standard layers, their configs and weights): a model trained
and saved under JAX loads under TensorFlow with the same weights and outputs.

Keras fixes its backend once per process, so a process running another backend
exports in a child process that runs the TensorFlow backend
(`export_in_tensorflow_process`): the same `export_run`, the same SavedModel, the same
checks and messages. `export/export_model.py` selects the TensorFlow backend itself
before importing Keras and never needs the child.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import keras_ssrl
from keras_ssrl.cli import QUIET_NATIVE_ENV
from keras_ssrl.data.errors import DamagedDataError, DataError
from keras_ssrl.files import LockedError
from keras_ssrl.serving.contract import ExportError

# The user errors of `export_run`, passed from the child to the caller by name; any
# other failure is a bug, whose traceback the child prints to the shared stderr.
_ERRORS = {
    cls.__name__: cls for cls in (ExportError, DamagedDataError, DataError, LockedError)
}
_CHILD = (
    "import sys; from keras_ssrl.serving.tensorflow_process import child_main; "
    "sys.exit(child_main(sys.argv[1]))"
)
# Seconds an interrupted child gets to remove its temporary folder before it is killed.
_INTERRUPT_GRACE = 30


def export_in_tensorflow_process(
    run_dir: str,
    model_base: str,
    *,
    version: int | None,
    data_dir: str | None,
    log,
) -> str:
    """Runs `export_run` in a child process under Keras's TensorFlow backend.

    The child inherits the environment (KERAS_BACKEND set to `tensorflow`), the working
    directory and stderr; its progress lines reach `log` as they come, through a pipe
    of their own. It sees no GPU: the parent (JAX preallocates most of a GPU's memory)
    may hold it, and the export does not need one (its verification runs on the CPU).

    Args:
        run_dir, model_base, version, data_dir, log: as `export_run`.

    Returns:
        The path of the written version folder.

    Raises:
        ExportError, DataError, LockedError, OSError: as `export_run` raises them, with
            the child's message.
        RuntimeError: the child failed otherwise (its traceback is on stderr).
    """
    package_root = os.path.dirname(
        os.path.dirname(os.path.abspath(keras_ssrl.__file__))
    )
    path = os.environ.get("PYTHONPATH")
    env = {
        **QUIET_NATIVE_ENV,
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "CUDA_VISIBLE_DEVICES": "-1",
        # The child imports the keras_ssrl this process runs, installed or not.
        "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
    }
    read_fd, write_fd = os.pipe()
    request = {
        "run_dir": os.fspath(run_dir),
        "model_base": os.fspath(model_base),
        "version": version,
        "data_dir": None if data_dir is None else os.fspath(data_dir),
        "channel": write_fd,
    }
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(request)],
            env=env,
            pass_fds=(write_fd,),
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds the write end: EOF when it exits
    outcome = {}
    try:
        with os.fdopen(read_fd, encoding="utf-8") as channel:
            for line in channel:
                message = json.loads(line)
                if "log" in message:
                    log(message["log"])
                else:
                    outcome = message
        status = child.wait()
    except BaseException:
        _stop(child)
        raise
    if "path" in outcome:
        return outcome["path"]
    if "error" in outcome:
        raise _rebuild(outcome)
    raise RuntimeError(
        f"the export in a TensorFlow-backend process failed (exit status {status}); "
        "its traceback is on stderr"
    )


def _stop(child: subprocess.Popen) -> None:
    """Interrupts the child so that it removes its temporary folder, then ends it."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=_INTERRUPT_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _describe(error: BaseException) -> dict:
    """An `export_run` error as a JSON message (`_rebuild` makes it again)."""
    if isinstance(error, OSError):
        return {
            "error": "OSError",
            "args": [error.errno, error.strerror, error.filename],
            "message": str(error),
        }
    return {
        "error": type(error).__name__,
        "message": str(error),
        "pid": getattr(error, "pid", None),
    }


def _rebuild(message: dict) -> BaseException:
    if message["error"] == "OSError":
        errno, strerror, filename = message["args"]
        if errno is None:
            return OSError(message["message"])
        return OSError(errno, strerror, filename)
    cls = _ERRORS.get(message["error"], ExportError)
    if cls is LockedError:
        return LockedError(message["message"], message.get("pid"))
    return cls(message["message"])


def child_main(request_json: str) -> int:
    """The child: `export_run` under the TensorFlow backend, reporting on the channel.

    Each line on the channel is a JSON object: `{"log": line}` for a progress line,
    then `{"path": ...}` or `{"error": name, "message": ...}`.
    """
    request = json.loads(request_json)
    with os.fdopen(request["channel"], "w", encoding="utf-8") as channel:

        def send(**message) -> None:
            channel.write(json.dumps(message) + "\n")
            channel.flush()

        import keras

        if keras.backend.backend() != "tensorflow":
            # KERAS_BACKEND was set by the parent; anything else would recurse.
            raise RuntimeError(
                f"the export process runs Keras's {keras.backend.backend()} backend, "
                "not tensorflow"
            )
        from keras_ssrl.serving.export import export_run

        try:
            path = export_run(
                request["run_dir"],
                request["model_base"],
                version=request["version"],
                data_dir=request["data_dir"],
                log=lambda line: send(log=str(line)),
            )
        except (ExportError, DataError, LockedError, OSError) as error:
            send(**_describe(error))
            return 2
        send(path=path)
    return 0
