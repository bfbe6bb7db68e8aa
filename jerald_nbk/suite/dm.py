"""DM truth: ``1 + delta`` of the high-resolution particles on the output mesh.

Implements ``../shared/spec/reference-suite.md``, "Reference fields", DM (the paper's 8x
resolution gap that the DM layers learn), written down in ``docs/reference-suite.md``,
"DM target": a CIC paint of the ``(2N)^3`` high-resolution particles on the ``N^3`` mesh, unit
masses times ``Ncells / Nparticles``, so the mean is exactly 1.  The HI prescription
(:mod:`.hi`) starts from the same density on the ``(2N)^3`` mesh.
"""

from __future__ import annotations

import numpy as np

from .mesh import TargetMap, local_part, paint, target_attrs


def dm_density(ppm, pos, Ntot: int):
    """``1 + delta`` of particles: CIC paint of unit masses times ``Ncells / Nparticles``."""
    field_ = paint(ppm, pos)
    field_[...] *= np.prod(ppm.Nmesh) / Ntot
    return field_


def dm_target(ppm, pos, Ntot: int, z: float) -> TargetMap:
    """The DM truth map on ``ppm`` (the output mesh) from this rank's high-resolution particles.

    Parameters
    ----------
    ppm : pmesh.pm.ParticleMesh
        The ``N^3`` output mesh.
    pos : numpy.ndarray
        This rank's high-resolution positions (Mpc/h).
    Ntot : int
        Global number of high-resolution particles.
    z : float
        Redshift (recorded in the attributes).

    Returns
    -------
    TargetMap
        ``"dm"``: this rank's part of the mesh and its attributes.
    """
    array, slices, shape = local_part(dm_density(ppm, pos, Ntot))
    attrs = target_attrs(
        "dm", z, "1+delta (dimensionless)", {"window": "cic", "particles": int(Ntot)}
    )
    return TargetMap("dm", array, attrs, slices, shape)
