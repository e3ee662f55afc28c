"""Build of the optional native kernels (everything else is in pyproject.toml).

The C extension ``quipsharp._qskernels`` is optional: without a C compiler (or when compilation
fails) the package still installs and ``QuantizedLinear`` uses the pure-torch reference path.
OpenMP is used when the compiler supports it, otherwise the kernels run single-threaded.
"""

from __future__ import annotations

import logging
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPT_FLAGS = ["-O3", "-std=c11", "-fvisibility=hidden"]
OPENMP_FLAG = "-fopenmp"
#: The oldest Python the stable-ABI build serves (pyproject's requires-python).
LIMITED_API_HEX = "0x030A0000"
LIMITED_API_TAG = "cp310"


class OptionalBuildExt(build_ext):
    """Try with OpenMP, then without; never fail the install."""

    def build_extension(self, ext: Extension) -> None:
        base_compile, base_link = list(ext.extra_compile_args), list(ext.extra_link_args)
        for flags in ([OPENMP_FLAG], []):
            ext.extra_compile_args = base_compile + flags
            ext.extra_link_args = base_link + flags
            try:
                super().build_extension(ext)
                return
            except Exception as err:  # compiler missing or flags unsupported
                logging.warning("building %s with %s failed: %s", ext.name, flags or "no OpenMP", err)
        message = ("quipsharp: native kernels NOT built (no working C compiler?); QuantizedLinear will use the "
                   "much slower pure-torch reference path. Install gcc/clang and reinstall to get them.")
        logging.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=1)


setup(
    ext_modules=[
        Extension(
            "quipsharp._qskernels",
            sources=["src/quipsharp/csrc/qs_kernels.c"],
            extra_compile_args=OPT_FLAGS,
            # The library is called through ctypes; its only Python code is a stub module init, so it is
            # built against the stable ABI: one file (``_qskernels.abi3.so``) for every Python >= 3.10.
            define_macros=[("Py_LIMITED_API", LIMITED_API_HEX)],
            py_limited_api=True,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}},
)
