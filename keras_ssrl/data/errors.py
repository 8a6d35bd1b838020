"""Errors raised by the data layer.

Every error a user can cause with their input is a `DataError`: the command-line tools
print its message (which names the file, the row / sample or gene, and what to do) and
exit non-zero instead of showing a traceback: 2 for bad input, arguments or folders, 1
for a `DamagedDataError` (files that no longer match their manifest).
"""

from __future__ import annotations

# Formats item lists in the messages of the data layer (and above); defined with the
# generic file helpers so that modules below the data layer can use it too.
from keras_ssrl.files import preview  # noqa: F401


class DataError(ValueError):
    """Bad input data: the message says where and what to do about it."""


class DamagedDataError(DataError):
    """A converted dataset whose files do not match its manifest (truncated, corrupted,
    replaced): the message names the file and the checking tool to run."""


def report_error(error: Exception) -> int:
    """Prints `error: ...` for a command-line tool and returns its exit status.

    1 for damaged data, 2 for anything else the user can fix (bad arguments, input,
    folders; an `OSError` is an unreadable file or an unwritable place, not a bug).
    """
    import sys

    message = str(error)
    if isinstance(error, OSError) and error.filename and error.strerror:
        message = f"{error.filename}: {error.strerror}"
    print(f"error: {message}", file=sys.stderr)
    return 1 if isinstance(error, DamagedDataError) else 2
