"""Errors raised by the data layer.

Every error a user can cause with their input is a `DataError`: the command-line tools
print its message (which names the file, the row / sample or gene, and what to do) and
exit non-zero instead of showing a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message says where and what to do about it."""


def preview(items, limit: int = 5) -> str:
    """Formats the first `limit` items of a sequence for an error message."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items)} in all)"
    return shown
