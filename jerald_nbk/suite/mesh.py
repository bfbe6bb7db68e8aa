"""The truth maps' meshes: pmesh painting, volume averaging and the map record (MPI-aware).

Shared by the three prescriptions (:mod:`.dm`, :mod:`.halos`, :mod:`.hi`).  pmesh's convention
holds throughout: mesh value ``i`` sits at position ``i * BoxSize / Nmesh``.  Maps leave this
module as each rank's part of the ``N^3`` output mesh (the low-resolution run's mesh), with the
slices that place it (no rank holds a whole mesh; on one rank the part is the whole mesh); see
``docs/reference-suite.md`` ("HI target", step ``downsample``) and ``../shared/spec/reference-suite.md``
("Reference fields").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TargetMap:
    """One target map: this rank's part of the mesh, where it lies, and the attributes.

    ``array`` is ``mesh[slices]`` of the whole ``shape`` mesh; on one rank it is the whole mesh.
    """

    name: str
    array: np.ndarray
    attrs: dict
    slices: tuple
    shape: tuple


def local_part(field) -> tuple[np.ndarray, tuple, tuple]:
    """A pmesh RealField as (this rank's values, their slices, the whole mesh's shape)."""
    shape = tuple(int(n) for n in field.pm.Nmesh)
    return np.asarray(field.value), tuple(field.slices), shape


def target_attrs(name: str, z: float, units: str, constants: dict, extra=None) -> dict:
    """The attributes of a truth map (``Nmesh``, ``BoxSize`` and the shape are the writer's)."""
    # Nmesh, BoxSize and ndarray.shape are added by the mesh writer (jerald_nbk.io.write_mesh)
    attrs = {
        "target": name,
        "redshift": float(z),
        "units": units,
        "constants": constants,
    }
    if extra:
        attrs.update(extra)
    return attrs


def particle_mesh(Nmesh: int, BoxSize: float, comm):
    """A float64 pmesh ``ParticleMesh`` of ``Nmesh^3`` cells over ``comm``."""
    from pmesh.pm import ParticleMesh

    return ParticleMesh(Nmesh=[int(Nmesh)] * 3, BoxSize=float(BoxSize), dtype="f8", comm=comm)


def paint(ppm, pos, mass=1.0, resampler="cic"):
    """Paint this rank's particles onto ``ppm``: a RealField holding the mass per cell."""
    pos = np.ascontiguousarray(pos, dtype="f8").reshape(-1, 3)
    if not np.isscalar(mass):
        mass = np.ascontiguousarray(mass, dtype="f8")
    layout = ppm.decompose(pos, smoothing=resampler)
    return ppm.paint(pos, mass=mass, resampler=resampler, layout=layout)


def downsample(fine, pm_out, chunk: int = 1 << 22):
    """Volume-average a RealField onto a coarser mesh (integer ratio) conserving the mean.

    Each fine mesh point is CIC-painted onto ``pm_out`` with weight ``Ncoarse / Nfine``: for a
    2x ratio this is the ``[1/2, 1, 1/2] / 2`` stencil per axis, consistent with pmesh's
    convention that mesh value ``i`` represents the region around ``i * H``.  The points are
    painted in chunks of ``chunk`` (the same number of collective rounds on every rank), so the
    fine mesh is never held as a particle array (24 bytes per point).
    """
    from mpi4py import MPI

    comm = pm_out.comm
    vals = fine.value
    flat = vals.ravel()
    n = flat.size
    H = fine.pm.BoxSize / fine.pm.Nmesh
    ratio = np.prod(pm_out.Nmesh) / np.prod(fine.pm.Nmesh)
    nchunks = comm.allreduce(max(1, -(-n // chunk)), op=MPI.MAX)
    out = pm_out.create(type="real", value=0.0)
    start = np.asarray(fine.start)
    for c in range(nchunks):
        idx = np.arange(min(n, c * chunk), min(n, (c + 1) * chunk))
        ijk = np.stack(np.unravel_index(idx, vals.shape), axis=-1) + start
        pos = np.ascontiguousarray(ijk * H, dtype="f8")
        w = np.ascontiguousarray(flat[idx] * ratio, dtype="f8")
        layout = pm_out.decompose(pos, smoothing="cic")
        pm_out.paint(pos, mass=w, resampler="cic", layout=layout, hold=True, out=out)
    return out


def downsample_array(values, pm_fine, pm_out) -> np.ndarray:
    """:func:`downsample` of this rank's part ``values`` of ``pm_fine``: this rank's part of
    ``pm_out`` (its slices are ``pm_out.create(type="real").slices``)."""
    field = pm_fine.create(type="real")
    field[...] = values
    return np.asarray(downsample(field, pm_out).value)
