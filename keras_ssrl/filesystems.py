"""Optional remote filesystems (`s3://`, `hdfs://`, ...) through tensorflow-io.

TensorFlow itself reads local paths and `gs://`; importing `tensorflow_io` registers
its further filesystem plug-ins. The import is optional so that the package works, for
local data, where tensorflow-io is absent or does not load.
"""

from __future__ import annotations

_registered: bool | None = None


def register() -> bool:
    """Imports tensorflow-io once; returns whether its filesystems are available."""
    global _registered
    if _registered is None:
        try:
            import tensorflow_io  # noqa: F401

            _registered = True
        except Exception:  # ImportError, or undefined symbols on a mismatched TF.
            _registered = False
    return _registered
