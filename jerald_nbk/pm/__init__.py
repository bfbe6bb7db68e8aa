"""Particle-mesh operations behind one interface (see :mod:`jerald_nbk.pm.base`)."""

from .base import ParticleMesh
from .jax_backend import JaxEngine

__all__ = ["ParticleMesh", "JaxEngine", "PmeshEngine", "make_pm"]


#: names of the first release, kept importable (with a DeprecationWarning) for one release:
#: ``JaxPM`` collided with the JaxPM package's name
DEPRECATED = {"JaxPM": "JaxEngine", "PmeshPM": "PmeshEngine"}


def __getattr__(name):  # pmesh (and MPI) load only when the MPI engine is asked for
    if name in DEPRECATED:
        import warnings

        warnings.warn(
            f"jerald_nbk.pm.{name} is renamed {DEPRECATED[name]}; the old name goes in 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        name = DEPRECATED[name]
        if name == "JaxEngine":
            return JaxEngine
    if name == "PmeshEngine":
        from .pmesh_backend import PmeshEngine

        return PmeshEngine
    raise AttributeError(name)


def make_pm(Nmesh, BoxSize, dtype="f4", backend="jax", comm=None, **kw) -> ParticleMesh:
    """Create a particle-mesh engine by name: ``"jax"`` (one process) or ``"pmesh"`` (MPI)."""
    if backend == "jax":
        return JaxEngine(Nmesh, BoxSize, dtype=dtype, **kw)
    if backend == "pmesh":
        from .pmesh_backend import PmeshEngine

        return PmeshEngine(Nmesh, BoxSize, dtype=dtype, comm=comm, **kw)
    raise ValueError(f"backend must be 'jax' or 'pmesh', got {backend!r}")
