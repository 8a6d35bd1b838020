"""Source for child interpreters that stand for machines without some packages.

A module of its own, importing nothing: test modules whose code also runs in those
children (with TensorFlow blocked) import it without pulling in `conftest`'s data
fixtures.
"""

from __future__ import annotations


def import_blocker(*names: str) -> str:
    """Python source that makes importing `names` (and their submodules) fail.

    Tests put it first in the code of a child interpreter to stand for a machine
    without those packages (a JAX-only GPU image has no TensorFlow).
    """
    return f"""
import importlib.abc as _abc
import sys as _sys


class _Blocked(_abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ImportError(f"No module named {{name!r}} (blocked by the test)")
        return None


_sys.meta_path.insert(0, _Blocked())
"""
