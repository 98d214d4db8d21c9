"""Build hook: compiles the proxy's request path with Cython when it can.

The modules listed in ``proxy_core.COMPILED`` are ordinary Python (their ``.pxd`` files only
add C types to classes and methods; annotations are not read as C types), so raymesh runs the
same with or without this step.  Compiled, the per-request Python of the node proxy costs
about half as much; without a C compiler, or with ``RAYMESH_PURE_PYTHON=1``, the build warns
and installs the pure-Python modules instead.
"""
from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy_core import COMPILED  # noqa: E402  (the one list of compiled modules)


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, never a failed install: the Python modules work on their own."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers
            print(f"warning: proxy_core not compiled ({exc}); using the pure-Python modules", file=sys.stderr)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"warning: {ext.name} not compiled ({exc}); using its Python module", file=sys.stderr)


def extensions() -> list:
    if os.environ.get("RAYMESH_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("warning: Cython is not available; proxy_core stays pure Python", file=sys.stderr)
        return []
    extensions = cythonize([f"proxy_core/{name}.py" for name in COMPILED], quiet=True,
                           compiler_directives={"language_level": 3, "binding": False, "embedsignature": True,
                                                "annotation_typing": False})
    for ext in extensions:
        # GCC 12 misreads Cython's use of the None singleton as an out-of-bounds access.
        ext.extra_compile_args.append("-Wno-array-bounds")
    return extensions


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
