"""raymesh's data plane: the node proxy (pure asyncio on uvloop; no Ray, no control-plane imports).

The modules of the request path, ``COMPILED``, are plain Python that setup.py also compiles
with Cython (their ``.pxd`` files give the hot classes C types).  The compiled extension
takes precedence over the ``.py`` on import; ``make build`` recompiles what changed, and a
compiled module older than its source is reported at import so an edit is never silently
ignored.  ``RAYMESH_PURE_PYTHON=1`` in the environment imports the ``.py`` files even where
extensions are built (how the tests check that both behave the same).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings

COMPILED = ("http1", "server", "upstream", "router", "lb", "policy", "accesslog", "stats", "telemetry", "coalesce")

_HERE = os.path.dirname(os.path.abspath(__file__))


def _extension(name: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, name + suffix)
        if os.path.exists(path):
            return path
    return None


def compiled_modules() -> list[str]:
    """The request-path modules that import from a compiled extension."""
    if os.environ.get("RAYMESH_PURE_PYTHON"):
        return []
    return [name for name in COMPILED if _extension(name) is not None]


def stale_modules() -> list[str]:
    """Compiled modules whose ``.py`` or ``.pxd`` changed after they were built."""
    stale = []
    for name in COMPILED:
        ext = _extension(name)
        if ext is None:
            continue
        built = os.path.getmtime(ext)
        sources = [os.path.join(_HERE, name + s) for s in (".py", ".pxd")]
        if any(os.path.exists(src) and os.path.getmtime(src) > built for src in sources):
            stale.append(name)
    return stale


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the request-path modules as Python source, ahead of their compiled extensions."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(_HERE, name + ".py"))


if os.environ.get("RAYMESH_PURE_PYTHON"):
    sys.meta_path.insert(0, _SourceFirst())
elif _stale := stale_modules():
    warnings.warn(f"proxy_core: compiled {', '.join(_stale)} older than the source; "
                  "run `make build` (python setup.py build_ext --inplace)", RuntimeWarning, stacklevel=1)
