"""Synthetic inputs for tests and benchmarks: FastPM-like particles without running FastPM.

A Zel'dovich-displaced lattice from a Gaussian random field with a power-law spectrum gives the
filaments and voids that displacement layers act on, in milliseconds, from a seed.
"""

from __future__ import annotations

import numpy as np


def zeldovich_particles(
    nside: int,
    boxsize: float,
    seed: int = 0,
    rms_disp: float = 0.3,
    slope: float = -2.0,
    dtype=np.float32,
    xp=np,
) -> np.ndarray:
    """``nside^3`` particles displaced from a cell-centred lattice by a Zel'dovich field.

    Parameters
    ----------
    nside : int
        Particles per side.
    boxsize : float
        Box size, Mpc/h.
    seed : int
        Random seed of the Gaussian field.
    rms_disp : float
        RMS displacement in units of the lattice spacing (0.3-1 looks like z = 2-0 FastPM output).
    slope : float
        Power-law index of the density power spectrum, P(k) ~ k^slope.
    dtype : numpy dtype
        Of the returned positions.
    xp : module
        Array module of the FFTs and the result: ``numpy`` (default) or ``jax.numpy`` (on a GPU,
        seconds instead of a minute at 512^3; the same field up to the FFT's precision, since the
        Gaussian draws come from numpy either way).

    Returns
    -------
    (nside^3, 3) array of positions in [0, boxsize).
    """
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(nside,) * 3)
    fft = xp.fft
    h = boxsize / nside
    kf = 2 * np.pi * np.fft.fftfreq(nside, d=h)
    kz = 2 * np.pi * np.fft.rfftfreq(nside, d=h)
    kk = (xp.asarray(kf[:, None, None]), xp.asarray(kf[None, :, None]), xp.asarray(kz[None, None]))
    k2 = kk[0] ** 2 + kk[1] ** 2 + kk[2] ** 2
    zero = k2 == 0
    k2 = xp.where(zero, 1.0, k2)
    delta_k = xp.where(zero, 0, fft.rfftn(xp.asarray(noise)) * k2 ** (slope / 4))
    # psi_k = i k delta_k / k^2  (so that delta = -div psi)
    disp = xp.stack(
        [fft.irfftn(1j * k * delta_k / k2, s=(nside,) * 3, axes=(0, 1, 2)) for k in kk], -1
    )
    disp = disp * (rms_disp * h / disp.std())
    axes = [xp.arange(nside).reshape(s) for s in ((-1, 1, 1), (1, -1, 1), (1, 1, -1))]
    q = (xp.stack(xp.broadcast_arrays(*axes), -1) + 0.5) * h
    return xp.mod(q + disp, boxsize).reshape(-1, 3).astype(dtype)
