"""Figures of merit of a predicted map against its reference (paper sec. IV B-C).

* ``k_10pct`` / ``k_30pct``: the largest k up to which ``|P_pred / P_ref - 1| <= 0.1`` (0.3);
* ``k_r09`` / ``k_r07``: the largest k up to which ``r(k) >= 0.9`` (0.7), with
  ``r = P_x / sqrt(P_pred P_ref)`` (eq 17);
* relative-difference maps: both maps clipped below ``0.5 x mean(reference)``, smoothed with a
  Gaussian of 200 kpc/h, then ``(pred - ref) / ref``.

All spectra come from :mod:`.power` (nbodykit ``FFTPower`` conventions, whole box).
"""

from __future__ import annotations

import numpy as np

from ..geometry import box_vector
from ..pm import fourier
from .power import cross_correlation

__all__ = ["k_within", "k_above", "figures_of_merit", "relative_difference_map", "smooth_field"]


def _first_failure_scan(k, ok, valid) -> float:
    """k of the last valid bin before the first valid bin that fails; 0.0 if the first fails."""
    last = 0.0
    for k_i, ok_i, valid_i in zip(k, ok, valid, strict=True):
        if not valid_i:
            continue
        if not ok_i:
            return last
        last = float(k_i)
    return last


def _prepare(k, values, name):
    k = np.asarray(k, dtype=float)
    values = np.asarray(values, dtype=float)
    if k.shape != values.shape or k.ndim != 1:
        raise ValueError(
            f"k and {name} must be 1D arrays of the same length, got {k.shape} and {values.shape}"
        )
    if np.any(np.diff(k[np.isfinite(k)]) < 0):
        raise ValueError("k must increase from bin to bin")
    # bins without information: empty (NaN k) or the k = 0 bin, whose only mode (the mean) is
    # set to zero in both spectra so that its ratio is 0/0
    valid = np.isfinite(k) & (k > 0) & ~np.isnan(values)
    return k, values, valid


def k_within(k, ratio, tol: float) -> float:
    """Largest k up to which ``|ratio - 1| <= tol`` holds continuously from the lowest k bin.

    Bins are scanned in order of increasing k; bins carrying no information are skipped (NaN
    ``k`` or ``ratio``, i.e. empty bins, and ``k <= 0``, the bin holding only the zeroed mean).
    The result is the ``k`` of the last bin that passes before the first bin that fails; the
    ``k`` of the last bin if none fails; 0.0 if the first informative bin already fails (or
    there is none). An infinite ratio fails.

    Parameters
    ----------
    k : array_like
        Bin centres (mean |k|), increasing, h/Mpc.
    ratio : array_like
        ``P_pred / P_ref`` per bin.
    tol : float
        Tolerance, e.g. 0.1 for the paper's 10 per cent.

    Returns
    -------
    float, h/Mpc.
    """
    k, ratio, valid = _prepare(k, ratio, "ratio")
    ok = np.abs(ratio - 1.0) <= tol
    return _first_failure_scan(k, ok, valid)


def k_above(k, r, threshold: float) -> float:
    """Largest k up to which ``r >= threshold`` holds continuously from the lowest k bin.

    Same scan as :func:`k_within`: skip bins without information (NaN, ``k <= 0``), return the
    ``k`` of the last passing bin before the first failing one (the last bin if none fails, 0.0
    if the first informative bin fails).

    Parameters
    ----------
    k : array_like
        Bin centres, increasing, h/Mpc.
    r : array_like
        Cross-correlation coefficient per bin.
    threshold : float
        E.g. 0.9 or 0.7.

    Returns
    -------
    float, h/Mpc.
    """
    k, r, valid = _prepare(k, r, "r")
    return _first_failure_scan(k, r >= threshold, valid)


def figures_of_merit(pred, ref, BoxSize, **power_kwargs) -> dict:
    """Headline figures of merit of ``pred`` against ``ref`` over the whole box.

    Parameters
    ----------
    pred, ref : array_like, shape (Nx, Ny, Nz)
        Predicted and reference meshes.
    BoxSize : float or sequence of 3 floats
        Mpc/h.
    **power_kwargs
        ``dk``, ``kmin``, ``kmax``, ``compensate`` for :func:`.power.cross_correlation`.

    Returns
    -------
    dict
        ``k_10pct``, ``k_30pct``, ``k_r09``, ``k_r07`` (floats, h/Mpc, see :func:`k_within` and
        :func:`k_above`) and the arrays ``k``, ``modes``, ``power_pred``, ``power_ref``,
        ``power_cross``, ``ratio`` (``P_pred / P_ref``) and ``r``.
    """
    res = cross_correlation(pred, ref, BoxSize, **power_kwargs)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = res.power_a / res.power_b
    return {
        "k_10pct": k_within(res.k, ratio, 0.1),
        "k_30pct": k_within(res.k, ratio, 0.3),
        "k_r09": k_above(res.k, res.r, 0.9),
        "k_r07": k_above(res.k, res.r, 0.7),
        "k": res.k,
        "modes": res.modes,
        "power_pred": res.power_a,
        "power_ref": res.power_b,
        "power_cross": res.power_ab,
        "ratio": ratio,
        "r": res.r,
    }


def smooth_field(field, BoxSize, radius: float, comm=None) -> np.ndarray:
    """Gaussian smoothing of a periodic mesh with :func:`jerald_nbk.pm.fourier.gaussian_filter`.

    Parameters
    ----------
    field : array_like, shape (Nx, Ny, Nz)
    BoxSize : float or sequence of 3 floats
        Mpc/h.
    radius : float
        Gaussian radius R in Mpc/h (the filter is ``exp(-k^2 R^2 / 2)``); 0 returns a copy.
    comm : MPI communicator, optional
        With more than one rank, ``field`` is this rank's x slab
        (:func:`jerald_nbk.analysis.power.slab_slices`) and so is the result (pmesh's FFTs).

    Returns
    -------
    numpy.ndarray (float64); its mean equals the input's (the k = 0 mode is untouched).
    """
    from .power import _global_shape, _part, _slab_pm

    arr = np.asarray(field, dtype=np.float64)
    if radius <= 0:
        return arr.copy()
    box = box_vector(BoxSize, "smooth_field")
    shape = _global_shape(arr, comm)

    def factor(where):
        kvec = _part(fourier.kvectors(shape, box), where)
        return fourier.fourier_factor(kvec, "lowpass", lambda k: fourier.gaussian_filter(k, radius))

    if comm is not None and comm.size > 1:
        real = _slab_pm(shape, box, comm).create(type="real")
        real[...] = arr
        c = real.r2c()
        c[...] *= factor(tuple(slice(int(w.start), int(w.stop)) for w in c.slices))
        return np.array(c.c2r().value)
    import scipy.fft

    workers = -1
    c = scipy.fft.rfftn(arr, workers=workers)
    c *= factor(tuple(slice(0, n) for n in c.shape))
    # the convention's r2c/c2r factors cancel in a filter round trip; irfftn's 1/N is the c2r one
    return scipy.fft.irfftn(c, s=arr.shape, workers=workers)


def relative_difference_map(
    pred, ref, BoxSize, clip: float = 0.5, smooth: float = 0.2, comm=None
) -> np.ndarray:
    """``(pred - ref) / ref`` after clipping and smoothing both maps (paper's maps, sec. IV C).

    Parameters
    ----------
    pred, ref : array_like, shape (Nx, Ny, Nz)
        Predicted and reference meshes.
    BoxSize : float or sequence of 3 floats
        Mpc/h.
    clip : float
        Both maps are raised to at least ``clip * mean(ref)`` first, so that empty regions (voids
        in stellar mass, HI-free gas around galaxies) do not produce infinite relative errors.
    smooth : float
        Gaussian smoothing radius in Mpc/h (0.2 = the paper's 200 kpc/h); 0 disables it.
    comm : MPI communicator, optional
        With more than one rank, ``pred``, ``ref`` and the result are this rank's x slabs.

    Returns
    -------
    numpy.ndarray (float64) of the mesh shape (of the slab with ``comm``).
    """
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 3:
        raise ValueError(f"pred and ref must be 3D meshes of one shape, got {p.shape}, {r.shape}")
    mean = r.mean()
    if comm is not None and comm.size > 1:
        mean = comm.allreduce(float(r.sum())) / comm.allreduce(r.size)
    floor = clip * mean
    if not floor > 0:
        raise ValueError(
            f"clip * mean(ref) = {floor} must be positive for a relative difference "
            f"(mean(ref) = {mean})"
        )
    ps = smooth_field(np.maximum(p, floor), BoxSize, smooth, comm)
    rs = smooth_field(np.maximum(r, floor), BoxSize, smooth, comm)
    return (ps - rs) / rs
