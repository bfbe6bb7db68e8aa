"""Build the C++ CIC kernels (src_cpp/) as the extension ``jerald_nbk._cic``.

Everything else about the package lives in setup.cfg. The kernels are XLA FFI handlers, so the
build needs JAX's FFI headers (``jax.ffi.include_dir()``) and pybind11.
"""

import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _jax_ffi_include() -> str:
    try:
        import jax.ffi
    except ImportError as err:  # pragma: no cover - build-time message
        raise SystemExit(
            "building jerald_nbk._cic needs JAX's XLA FFI headers: install jax first "
            "(make install does this), then build without build isolation"
        ) from err
    return jax.ffi.include_dir()


openmp = os.environ.get("JERALD_NO_OPENMP", "") == ""
ext = Pybind11Extension(
    "jerald_nbk._cic",
    ["src_cpp/cic.cpp"],
    include_dirs=[_jax_ffi_include()],
    cxx_std=17,
    extra_compile_args=["-O3"] + (["-fopenmp"] if openmp else []),
    extra_link_args=["-fopenmp"] if openmp else [],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
