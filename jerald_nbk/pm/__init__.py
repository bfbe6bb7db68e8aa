"""Particle-mesh operations behind one interface (see :mod:`jerald_nbk.pm.base`)."""

from .base import ParticleMesh
from .jax_backend import JaxPM

__all__ = ["ParticleMesh", "JaxPM", "PmeshPM", "make_pm"]


def __getattr__(name):  # pmesh (and MPI) load only when the MPI engine is asked for
    if name == "PmeshPM":
        from .pmesh_backend import PmeshPM

        return PmeshPM
    raise AttributeError(name)


def make_pm(Nmesh, BoxSize, dtype="f4", backend="jax", comm=None, **kw) -> ParticleMesh:
    """Create a particle-mesh engine by name: ``"jax"`` (one process) or ``"pmesh"`` (MPI)."""
    if backend == "jax":
        return JaxPM(Nmesh, BoxSize, dtype=dtype, **kw)
    if backend == "pmesh":
        from .pmesh_backend import PmeshPM

        return PmeshPM(Nmesh, BoxSize, dtype=dtype, comm=comm, **kw)
    raise ValueError(f"backend must be 'jax' or 'pmesh', got {backend!r}")
