"""Checks on training and evaluation inputs, with errors that name what is wrong and where."""

from __future__ import annotations

import numpy as np


def check_particles(pos, pm, where: str = "particles") -> None:
    """Positions must be a non-empty, finite (N, 3) array (local part on MPI engines)."""
    shape = tuple(np.shape(pos))
    if len(shape) != 2 or shape[1] != 3:
        raise ValueError(f"{where}: Position has shape {shape}, expected (N, 3)")
    if pm.count(pos) == 0:
        raise ValueError(f"{where}: the particle set is empty (0 particles)")
    a = np.asarray(pos)
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
    if pm.comm is not None:
        bad = pm.comm.allreduce(bad)
    if bad:
        raise ValueError(f"{where}: Position has {bad} non-finite (NaN or inf) values")


def check_target(target, pm, kind: str, where: str = "target") -> None:
    """A target map must match the engine's local mesh, be finite, and be >= 0 for mass-like maps.

    ``kind``: "dm" (1 + delta, must be >= 0), "stellar" (stellar mass >= 0), "hi" (n_HI >= 0).
    """
    local = _local_real_shape(pm)
    shape = tuple(np.shape(target))
    if shape != local:
        raise ValueError(
            f"{where}: map has shape {shape}, expected the mesh's {local} (Nmesh {pm.Nmesh})"
        )
    a = np.asarray(target)
    nonfinite = int(a.size - np.count_nonzero(np.isfinite(a)))
    negative = int(np.count_nonzero(a < 0))
    if pm.comm is not None:
        nonfinite, negative = pm.comm.allreduce(nonfinite), pm.comm.allreduce(negative)
    if nonfinite:
        raise ValueError(f"{where}: map has {nonfinite} non-finite (NaN or inf) cells")
    if negative:
        raise ValueError(f"{where}: {kind} map has {negative} negative cells; it must be >= 0")


def check_same_box(
    a_attrs: dict, a_name: str, b_attrs: dict, b_name: str, rtol: float = 1e-6
) -> None:
    """BoxSize (and Nmesh where both have it) of two inputs must agree."""
    for key in ("BoxSize", "Nmesh"):
        if key in a_attrs and key in b_attrs:
            va = np.broadcast_to(np.asarray(a_attrs[key], dtype=float), (3,))
            vb = np.broadcast_to(np.asarray(b_attrs[key], dtype=float), (3,))
            if not np.allclose(va, vb, rtol=rtol):
                raise ValueError(f"{b_name} {key} {_fmt(vb)} != {a_name} {key} {_fmt(va)}")


def _fmt(v) -> str:
    v = np.asarray(v)
    return f"{v[0]:g}" if np.all(v == v[0]) else "(" + ", ".join(f"{x:g}" for x in v) + ")"


def _local_real_shape(pm) -> tuple:
    i, j, l = pm.mesh_index()
    return tuple(np.broadcast_shapes(np.shape(i), np.shape(j), np.shape(l)))
