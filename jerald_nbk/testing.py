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

    Returns
    -------
    (nside^3, 3) array of positions in [0, boxsize).
    """
    rng = np.random.default_rng(seed)
    h = boxsize / nside
    kf = 2 * np.pi * np.fft.fftfreq(nside, d=h)
    kz = 2 * np.pi * np.fft.rfftfreq(nside, d=h)
    kx, ky, kzz = np.meshgrid(kf, kf, kz, indexing="ij")
    k2 = kx**2 + ky**2 + kzz**2
    k2[0, 0, 0] = 1.0
    delta_k = np.fft.rfftn(rng.normal(size=(nside,) * 3)) * k2 ** (slope / 4)
    delta_k[0, 0, 0] = 0
    # psi_k = i k delta_k / k^2  (so that delta = -div psi)
    disp = np.stack(
        [
            np.fft.irfftn(1j * kk * delta_k / k2, s=(nside,) * 3, axes=(0, 1, 2))
            for kk in (kx, ky, kzz)
        ],
        -1,
    )
    disp *= rms_disp * h / disp.std()
    q = (np.stack(np.meshgrid(*[np.arange(nside)] * 3, indexing="ij"), -1) + 0.5) * h
    return np.mod(q + disp, boxsize).reshape(-1, 3).astype(dtype)
