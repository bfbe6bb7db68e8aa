"""Geometry of the periodic box: the one place that reads a BoxSize, an Nmesh, or wraps positions.

Every layer takes a box size as "one number or one per axis" (Mpc/h) and a mesh as "one whole
number or one per axis"; this module turns either into a vector and refuses anything else with an
error that says where the value came from (an argument, a file, a catalog's attrs)::

    >>> box_vector(80.0, "catalog run/z0")
    array([80., 80., 80.])
    >>> box_vector(-1.0, "the BoxSize argument")
    Traceback (most recent call last):
    ...
    ValueError: the BoxSize argument: BoxSize must be positive and finite, got [-1.0, -1.0, -1.0]

It imports numpy only, so every subpackage (``pm`` up to ``cli``) may import it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BOX_RTOL", "box_vector", "mesh_vector", "wrap_positions"]

#: Relative tolerance when two records of one box size (an argument, a parameter file, a catalog)
#: are compared: the values pass through float32 attrs and text.
BOX_RTOL = 1e-6


def _per_axis(value, name: str, expected: str, where: str, ndim: int) -> np.ndarray:
    """``value`` broadcast to ``ndim`` floats (a new array), or an error naming ``where``."""
    try:
        return np.broadcast_to(np.asarray(value, dtype=float), (ndim,)).copy()
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: {name} must be {expected.format(ndim=ndim)}, got {value!r}"
        ) from None


def box_vector(BoxSize, where: str, ndim: int = 3) -> np.ndarray:
    """``BoxSize`` as ``ndim`` positive, finite floats (a new array).

    Parameters
    ----------
    BoxSize : float or sequence of ``ndim`` floats
        Box size per axis (Mpc/h); one number is a cubic box.
    where : str
        Where the value came from, for the error ("catalog run/z0", "power_spectrum", ...).
    ndim : int
        Number of axes.

    Returns
    -------
    numpy.ndarray, shape (ndim,), float64

    Raises
    ------
    ValueError
        Naming ``where``, when the value is not one number or ``ndim`` numbers, or when an entry is
        zero, negative, NaN or infinite.
    """
    box = _per_axis(BoxSize, "BoxSize", "a number or {ndim} numbers", where, ndim)
    if not np.all(np.isfinite(box)) or np.any(box <= 0):
        raise ValueError(f"{where}: BoxSize must be positive and finite, got {box.tolist()}")
    return box


def mesh_vector(Nmesh, where: str, ndim: int = 3) -> np.ndarray:
    """``Nmesh`` as ``ndim`` whole numbers >= 1 (a new int64 array).

    Parameters
    ----------
    Nmesh : int or sequence of ``ndim`` ints
        Cells per axis; one number is a cubic mesh. Whole-valued floats (``64.0``, as some files
        store it) are accepted.
    where : str
        Where the value came from, for the error.
    ndim : int
        Number of axes.

    Returns
    -------
    numpy.ndarray, shape (ndim,), int64; a ValueError naming ``where`` for anything but one or
    ``ndim`` whole numbers >= 1.
    """
    vals = _per_axis(Nmesh, "Nmesh", "a whole number or {ndim} whole numbers", where, ndim)
    if not np.all(np.isfinite(vals)) or np.any(vals != np.round(vals)) or np.any(vals < 1):
        raise ValueError(f"{where}: Nmesh must be whole numbers >= 1, got {vals.tolist()}")
    return vals.astype(np.int64)


def wrap_positions(pos, BoxSize, where: str = "positions") -> np.ndarray:
    """Positions wrapped into ``[0, BoxSize)`` per axis, in their own float precision (a new array).

    ``x mod L`` rounds to ``L`` itself for a tiny negative ``x``; such coordinates are set to 0,
    the same point of the periodic box, so that every result lies strictly below ``L``.

    Parameters
    ----------
    pos : array_like, shape (N, ndim)
        Positions (Mpc/h); float32 stays float32, anything not floating becomes float64.
    BoxSize : float or sequence of ``ndim`` floats
        See :func:`box_vector`.
    where : str
        Where the box size came from, for the error.

    Returns
    -------
    numpy.ndarray, the shape of ``pos``.
    """
    pos = np.asarray(pos)
    if pos.dtype.kind != "f":
        pos = pos.astype(np.float64)
    if pos.ndim != 2:
        raise ValueError(f"{where}: positions must have shape (N, ndim), got {pos.shape}")
    box = box_vector(BoxSize, where, ndim=pos.shape[1]).astype(pos.dtype)
    out = np.mod(pos, box)
    out[out >= box] = 0.0
    return out
