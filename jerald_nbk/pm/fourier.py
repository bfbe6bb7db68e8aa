"""Fourier conventions of jerald_nbk: the one FFT normalisation, k-grids, gradient kernels, filters.

Every module that transforms a mesh imports its conventions from here.

Normalisation (the pmesh convention, paper and reference codes alike):

* ``r2c``: forward real-to-complex transform **divided by the number of cells**, so the k = 0 mode
  holds the mean of the field;
* ``c2r``: inverse transform **not** divided, so ``c2r(r2c(f)) == f``.

k-vectors are angular wavenumbers in h/Mpc: ``k_i = 2 pi n_i / BoxSize_i`` with ``n_i`` the signed
FFT frequency index. The complex (rfft) layout keeps the last axis' non-negative half.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: value that replaces |k| = 0 in :func:`knorm` (for plots and diagnostics). The model's Fourier
#: factors never evaluate a power of this floor: they go through :func:`fourier_factor`.
K_FLOOR = 1e-8

#: The one k = 0 policy: what every Fourier-space factor of the model is at k = 0, and why.
#:
#: * ``"green"`` (eqs 6, 7: ``exp(-kh/k)...k^nu`` and ``exp(-(kh/k)^2)...k^nu``): **0**. It is the
#:   limit for ``kh > 0`` (the large-scale cut-off), and it does not matter anyway: a Green's
#:   function is only ever multiplied by a gradient kernel, which vanishes at k = 0.
#: * ``"depletion"`` (eq 15, the ``exp(-kIh/k) exp(-k/kIl) k^nuI`` part of ``O_I``; the constant
#:   ``xi`` is added after): **0**, its limit for ``kIh > 0``, so ``O_I(0) = xi``. Evaluating it at a
#:   floored k instead gives ``(1e-8)^nuI``, which overflows for ``kIh -> 0`` and ``nuI < 0``; the
#:   mean it would weight is a constant that ``eta`` absorbs.
#: * ``"smoothing"`` (eq 11, ``O_s = 1 + k^-n``): **1**. The mean of the residual is weighted like
#:   any unsmoothed mode (the reference code tests ``k == 0`` after flooring it and weights the mean
#:   by ``1e8^n``).
#: * ``"lowpass"`` (Gaussian smoothing of maps for figures of merit): **1**, its limit.
K0_VALUES = {"green": 0.0, "depletion": 0.0, "smoothing": 1.0, "lowpass": 1.0}

#: orders of the Fourier-space gradient: 4th and 6th order finite differences, and the exact ik.
GRADIENT_ORDERS = (4, 6, "exact")

#: central finite-difference weights ``c_n`` of the gradient orders 4 and 6:
#: ``f'(x) = sum_n c_n (f(x + nH) - f(x - nH)) / H``. In Fourier space this is the factor
#: ``1j sum_n 2 c_n sin(n k H) / H`` of :func:`gradient_kernel`; in real space, :func:`fd_derivative`.
FD_WEIGHTS = {4: (8 / 12, -1 / 12), 6: (45 / 60, -9 / 60, 1 / 60)}


def r2c_scale(ncells: int) -> float:
    """Factor applied to an unnormalised forward FFT to follow the convention (``1 / ncells``)."""
    return 1.0 / ncells


def c2r_scale(ncells: int) -> float:
    """Factor applied to an inverse FFT that divides by N (numpy/JAX ``irfftn``): ``ncells``."""
    return float(ncells)


def fftfreq_k(n: int, boxsize: float) -> np.ndarray:
    """Angular wavenumbers (h/Mpc) of a full FFT axis of ``n`` cells in a box of ``boxsize`` Mpc/h."""
    return 2 * np.pi * np.fft.fftfreq(n, d=boxsize / n)


def rfftfreq_k(n: int, boxsize: float) -> np.ndarray:
    """Angular wavenumbers (h/Mpc) of the halved last axis of an rfft."""
    return 2 * np.pi * np.fft.rfftfreq(n, d=boxsize / n)


def kvectors(nmesh: Sequence[int], boxsize: Sequence[float], dtype=np.float64):
    """The three k-vector components of the rfft layout, each broadcastable to (Nx, Ny, Nz//2+1).

    Parameters
    ----------
    nmesh, boxsize : sequences of 3
        Mesh cells and box size (Mpc/h) per axis.
    dtype : numpy dtype
        Real dtype of the returned arrays.

    Returns
    -------
    tuple of 3 numpy arrays with shapes (Nx,1,1), (1,Ny,1), (1,1,Nz//2+1), in h/Mpc.
    """
    nx, ny, nz = (int(n) for n in nmesh)
    lx, ly, lz = (float(b) for b in boxsize)
    return (
        fftfreq_k(nx, lx).astype(dtype).reshape(-1, 1, 1),
        fftfreq_k(ny, ly).astype(dtype).reshape(1, -1, 1),
        rfftfreq_k(nz, lz).astype(dtype).reshape(1, 1, -1),
    )


def knorm(kvec, xp=np, floor: float = K_FLOOR):
    """|k| with the k = 0 mode replaced by ``floor`` (so k**nu and kh/k stay finite)."""
    k2 = kvec[0] ** 2 + kvec[1] ** 2 + kvec[2] ** 2
    k = xp.sqrt(k2)
    return xp.where(k2 > 0, k, floor)


def fourier_factor(kvec, kind: str, fn, xp=np):
    """A Fourier-space factor ``fn(|k|)``, with its k = 0 value from :data:`K0_VALUES`.

    Parameters
    ----------
    kvec : tuple of 3 arrays
        k-vector components (h/Mpc), broadcastable to the (local) complex mesh.
    kind : str
        A key of :data:`K0_VALUES` saying which factor this is.
    fn : callable
        ``fn(k)`` for ``k > 0``; it is evaluated at ``k = 1`` on the k = 0 mode and the result is
        masked, so no power of a tiny k is ever formed (finite values *and* gradients: ``where``
        only masks a gradient that is finite on both branches).
    xp : module
        ``numpy`` or ``jax.numpy``.

    Returns
    -------
    array broadcast over the complex mesh.
    """
    if kind not in K0_VALUES:
        raise ValueError(f"unknown Fourier factor kind {kind!r}; one of {sorted(K0_VALUES)}")
    k2 = kvec[0] ** 2 + kvec[1] ** 2 + kvec[2] ** 2
    nonzero = k2 > 0
    k = xp.sqrt(xp.where(nonzero, k2, 1.0))
    return xp.where(nonzero, fn(k), K0_VALUES[kind])


def gradient_kernel(k_i, cell: float, order=6, nyquist_k: float | None = None, xp=np):
    """Fourier-space derivative along one axis: a purely imaginary factor ``1j * D(k_i)``.

    Parameters
    ----------
    k_i : array
        Wavenumbers (h/Mpc) along the axis.
    cell : float
        Cell size ``H = BoxSize / Nmesh`` of that axis (Mpc/h).
    order : {4, 6, "exact"}
        4: ``(8 sin w - sin 2w) / (6H)`` (LDL); 6: ``(45 sin w - 9 sin 2w + sin 3w) / (30H)``
        (JERALD); "exact": ``k_i`` with the Nyquist mode set to zero (its derivative is not real).
        ``w = k_i H``. All three tend to ``k_i`` as ``w -> 0``.
    nyquist_k : float, optional
        Nyquist wavenumber ``pi / H`` of the axis, for ``order="exact"`` (computed when omitted).

    Returns
    -------
    array of the complex dtype matching ``k_i``: ``1j * D(k_i)``.
    """
    w = k_i * cell
    if order in FD_WEIGHTS:
        d = sum(2 * c * xp.sin(n * w) for n, c in enumerate(FD_WEIGHTS[order], 1)) / cell
    elif order == "exact":
        nyq = np.pi / cell if nyquist_k is None else nyquist_k
        d = xp.where(xp.abs(xp.abs(k_i) - nyq) < 1e-6 * nyq, 0.0 * k_i, k_i)
    else:
        raise ValueError(f"gradient order must be one of {GRADIENT_ORDERS}, got {order!r}")
    return 1j * d


def fd_derivative(f, axis: int, cell: float, order=6, xp=np):
    """Central finite-difference derivative of a periodic real mesh along ``axis``, in real space.

    ``sum_n c_n (f(x + nH) - f(x - nH)) / H`` with the weights of :data:`FD_WEIGHTS`: the same
    derivative as ``c2r(r2c(f) * gradient_kernel(k_axis, H, order))``, without the transforms.
    Its adjoint is its negative (the stencil is antisymmetric).

    Parameters
    ----------
    f : array
        Real mesh, periodic along ``axis``.
    axis : int
        Non-negative axis index.
    cell : float
        Cell size ``H`` along ``axis`` (Mpc/h).
    order : {4, 6}
    xp : module
        ``numpy`` or ``jax.numpy``.

    Returns
    -------
    array like ``f``.
    """
    if order not in FD_WEIGHTS:
        raise ValueError(f"real-space gradient orders are {sorted(FD_WEIGHTS)}, got {order!r}")
    weights = FD_WEIGHTS[order]
    m, n_ax = len(weights), f.shape[axis]
    if axis == f.ndim - 1:
        # slices of one periodically padded copy: XLA on a CPU turned each roll along the last
        # axis into its own copy of the mesh (along the others it fuses the rolls)
        padded = xp.concatenate([f[..., n_ax - m :], f, f[..., :m]], axis=-1)
        shifted = lambda n: padded[..., m + n : m + n + n_ax]  # noqa: E731  f(x + nH)
    else:
        shifted = lambda n: xp.roll(f, -n, axis)  # noqa: E731
    out = 0
    for n, c in enumerate(weights, 1):
        out = out + (c / float(cell)) * (shifted(n) - shifted(-n))
    return out


def fd_gradient(f, cells: Sequence[float], order=6, xp=np):
    """The three derivatives of :func:`fd_derivative` of a real 3-D mesh, stacked: (..., 3).

    Parameters
    ----------
    f : array (Nx, Ny, Nz)
        Real mesh, periodic.
    cells : sequence of 3 floats
        Cell sizes ``H_i`` (Mpc/h).
    order : {4, 6}
    xp : module
        ``numpy`` or ``jax.numpy``.

    Returns
    -------
    array (Nx, Ny, Nz, 3), of ``f``'s dtype.
    """
    comps = [fd_derivative(f, axis, h, order, xp) for axis, h in enumerate(cells)]
    return xp.stack(comps, axis=-1).astype(f.dtype)


def gaussian_filter(k, radius: float, xp=np):
    """Gaussian smoothing ``exp(-k^2 R^2 / 2)`` with radius ``R`` in Mpc/h."""
    return xp.exp(-0.5 * (k * radius) ** 2)


def cic_window(kvec, cells: Sequence[float], xp=np):
    """Fourier window of CIC assignment, ``prod_i sinc(k_i H_i / 2)^2`` (divide by it to compensate)."""
    out = 1.0
    for k_i, h in zip(kvec, cells, strict=True):
        out = out * xp.sinc(k_i * h / (2 * np.pi)) ** 2
    return out
