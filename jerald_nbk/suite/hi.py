"""HI truth: the fluctuating Gunn-Peterson approximation on the high-resolution gas density.

Implements ``../shared/spec/reference-suite.md``, "Reference fields", HI (intergalactic medium,
no self-shielding, like Sherwood-Relics), written down step by step in ``docs/reference-suite.md``,
"HI target":

1. gas density: the high-resolution matter density on the ``(2N)^3`` mesh smoothed at the
   Jeans-like filtering scale of Hui & Gnedin (1997);
2. the power-law temperature-density relation of the IGM, ``T = T0 (1+delta)^(gamma_T - 1)``;
3. optically thin photoionisation equilibrium with collisional ionisation (Cen 1992);
4. collisionally ionised gas at the virial temperature inside FOF halos (:mod:`.halos`);
5. a multiplicative depletion around galaxies proportional to their stellar mass;
6. division by a redshift-dependent constant (:func:`hi_normalisation`), then a volume average
   onto the ``N^3`` output mesh.
"""

from __future__ import annotations

import numpy as np

from .constants import (
    GAMMA_ADIABATIC,
    K_BOLTZMANN,
    M_PROTON,
    MU_IONISED,
    RHO_CRIT_CGS_H2,
    X_H,
    Y_HE,
)
from .dm import dm_density
from .halos import Halos
from .mesh import TargetMap, downsample_array, paint, target_attrs

# --- IGM thermal state and UV background ----------------------------------------------------------
#: Anchor redshifts for T0 [K], gamma_T and Gamma_HI [1/s]; linear interpolation in z for T0 and
#: gamma_T, in log10 for Gamma_HI, clamped outside [0, 6].  Values are typical of measured IGM
#: thermal histories and of the UV background models such runs are calibrated to:
#: T0 / gamma: Becker et al. 2011, Walther et al. 2019 (peak of T0 near z ~ 3 after HeII
#: reionisation, adiabatic cooling to ~5e3 K at z = 0, gamma -> 1.6 asymptotically);
#: Gamma_HI: Becker & Bolton 2013 (z = 2-5), D'Aloisio et al. 2018 (z = 5-6), Shull et al. 2015 and
#: Gaikwad et al. 2017 (z ~ 0).
THERMAL_TABLE = {
    "z": (0.0, 2.0, 3.0, 5.0, 6.0),
    "T0": (5.0e3, 1.2e4, 1.5e4, 1.0e4, 8.0e3),
    "gamma_T": (1.6, 1.5, 1.4, 1.3, 1.2),
    "Gamma_HI": (5.0e-14, 1.0e-12, 0.9e-12, 0.5e-12, 0.2e-12),
}
#: HeII reionisation redshift: below it helium is doubly ionised (electron fraction).
Z_HEII_REION = 3.0

#: Case-A recombination coefficient alpha_A(T) = ALPHA_A0 (T / 1e4 K)^ALPHA_A_SLOPE cm^3/s
#: (the standard FGPA power law, e.g. Hui & Gnedin 1997; Weinberg et al. 1997).
ALPHA_A0 = 4.2e-13
ALPHA_A_SLOPE = -0.7
#: Collisional ionisation of HI by electrons (Cen 1992, ApJS 78, 341):
#: Gamma_e(T) = 5.85e-11 T^0.5 exp(-157809.1 / T) / (1 + (T / 1e5)^0.5) cm^3/s.
CEN92_COEFF = 5.85e-11
CEN92_TION = 157809.1

#: Gas hotter than this is "hot" (shock-heated, collisionally ionised) - documentation threshold and
#: the lower bound of the temperature given to virialised gas.
T_HOT = 1.0e5

#: Depletion of HI around galaxies: S = exp(-M*_w / M0), M*_w the stellar mass within a Gaussian
#: "wind" kernel of comoving radius R_WIND.  M0 in 1e10 Msun/h, R_WIND in Mpc/h (comoving; ~100-150
#: physical kpc at z ~ 2, the extent of galactic outflows, e.g. Steidel et al. 2010).
WIND_M0 = 1.0
WIND_RADIUS = 0.3

#: Floor on the smoothed gas density (1 + delta_g) before the power laws (FFT ringing, voids).
GAS_FLOOR = 1e-3


# ------------------------------------------------------------------------------------------------
# IGM physics
# ------------------------------------------------------------------------------------------------
def thermal_state(z: float) -> dict:
    """T0 [K], gamma_T and Gamma_HI [1/s] at redshift ``z`` from :data:`THERMAL_TABLE`."""
    t = THERMAL_TABLE
    zz = np.asarray(t["z"])
    z = float(np.clip(z, zz[0], zz[-1]))
    return {
        "T0": float(np.interp(z, zz, t["T0"])),
        "gamma_T": float(np.interp(z, zz, t["gamma_T"])),
        "Gamma_HI": float(10 ** np.interp(z, zz, np.log10(t["Gamma_HI"]))),
    }


def electrons_per_hydrogen(z: float) -> float:
    """n_e / n_H of ionised primordial gas: H II plus He II (z >= 3) or He III (z < 3)."""
    nhe_nh = Y_HE / (4.0 * X_H)
    return 1.0 + (2.0 if z < Z_HEII_REION else 1.0) * nhe_nh


def mean_hydrogen_density(z: float, Omega_b: float, h: float) -> float:
    """Mean proper hydrogen number density in cm^-3 at redshift ``z``."""
    return X_H * Omega_b * RHO_CRIT_CGS_H2 * h**2 * (1.0 + z) ** 3 / M_PROTON


def recombination_alpha_A(T):
    """Case-A recombination coefficient in cm^3/s (power-law fit, :data:`ALPHA_A0`)."""
    return ALPHA_A0 * (np.asarray(T) / 1e4) ** ALPHA_A_SLOPE


def collisional_rate(T):
    """Collisional ionisation rate coefficient of HI in cm^3/s (Cen 1992)."""
    T = np.asarray(T, dtype="f8")
    return CEN92_COEFF * np.sqrt(T) * np.exp(-CEN92_TION / T) / (1.0 + np.sqrt(T / 1e5))


def n_hi_equilibrium(nH, T, Gamma_HI, ne_per_nH):
    """Optically thin ionisation equilibrium, highly ionised limit (x_HI << 1).

    ``n_HI = alpha_A(T) n_e n_H / (Gamma_HI + Gamma_e(T) n_e)`` (proper cm^-3).  Without the
    collisional term this is the FGPA ``n_HI ~ (1+delta)^2 T^-0.7``.
    """
    ne = ne_per_nH * nH
    return recombination_alpha_A(T) * ne * nH / (Gamma_HI + collisional_rate(T) * ne)


def jeans_filter_scale(z: float, T0: float, Omega_m: float) -> float:
    """Comoving Jeans-like filtering length in Mpc/h (Hui & Gnedin 1997, eq. 2; Bi & Davidsen 1997).

    ``x_J = H0^-1 [2 gamma k_B T0 / (3 mu m_p Omega_m (1+z))]^(1/2)``; the gas density is the matter
    density filtered with ``1 / (1 + x_J^2 k^2)`` (~0.1-0.2 Mpc/h for T0 ~ 1e4 K).
    """
    v2 = (
        2.0 * GAMMA_ADIABATIC * K_BOLTZMANN * T0 / (3.0 * MU_IONISED * M_PROTON * Omega_m * (1 + z))
    )
    v_kms = np.sqrt(v2) / 1e5
    return float(v_kms / 100.0)  # H0 = 100 h km/s/Mpc


def hi_normalisation(z: float, Omega_b: float, h: float) -> float:
    """The redshift-dependent division constant of the HI target, in cm^-3.

    The equilibrium n_HI of gas at the mean density and temperature T0(z) (no halos, no winds),
    rounded to two significant digits: the stored target ``n_HI / hi_norm`` is then 1 at the mean
    density (the JERALD paper divides its HI targets by such a constant to make them O(1)).
    """
    th = thermal_state(z)
    nH = mean_hydrogen_density(z, Omega_b, h)
    v = float(n_hi_equilibrium(nH, th["T0"], th["Gamma_HI"], electrons_per_hydrogen(z)))
    return float(f"{v:.2g}")


# ------------------------------------------------------------------------------------------------
# hot gas in halos
# ------------------------------------------------------------------------------------------------
def hot_gas_stamps(halos: Halos, Nmesh: int, BoxSize: float, rank: int = 0, size: int = 1):
    """Mesh points inside the virial spheres of halos, with volume weights and virial temperatures.

    A mesh point within ``R_vir`` of a halo centre gets weight 1.  A halo whose sphere contains no
    mesh point (``R_vir`` below the mesh spacing) puts its volume fraction ``(4/3 pi R^3) / H^3`` on
    the nearest mesh point, so every halo heats some gas.  Returns positions (exactly on mesh
    points, to be painted with the nearest-grid-point window), weights and temperatures for this
    rank's share of the halos.
    """
    H = BoxSize / Nmesh
    sel = slice(rank, None, size)
    centre, R = halos.Position[sel], halos.Radius[sel]
    T = np.maximum(halos.Tvir[sel], T_HOT)
    out_pos, out_w, out_T = [], [], []
    if len(R) == 0:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    nhalf = np.ceil(R / H).astype(int)
    groups = []
    for n in np.unique(nhalf):
        r1 = np.arange(-n, n + 1)
        off = np.stack(np.meshgrid(r1, r1, r1, indexing="ij"), -1).reshape(-1, 3)
        members = np.nonzero(nhalf == n)[0]
        per = max(1, (1 << 21) // len(off))  # bound the (halos x stamp points) work arrays
        groups += [(members[i : i + per], off) for i in range(0, len(members), per)]
    for idx, off in groups:
        base = np.rint(centre[idx] / H).astype(int)  # nearest mesh point
        pts = base[:, None, :] + off[None, :, :]  # (nh, npts, 3) integer mesh points
        d = pts * H - centre[idx][:, None, :]
        d -= BoxSize * np.rint(d / BoxSize)
        inside = (d**2).sum(-1) < R[idx, None] ** 2
        empty = ~inside.any(axis=1)
        w = inside.astype("f8")
        if empty.any():
            # nearest mesh point: the centre offset (0, 0, 0) is index len(off) // 2
            c = len(off) // 2
            w[empty, c] = np.minimum(1.0, 4.0 / 3.0 * np.pi * R[idx[empty]] ** 3 / H**3)
        keep = w > 0
        pts = np.mod(pts, Nmesh)
        out_pos.append(pts[keep] * H)
        out_w.append(w[keep])
        out_T.append(np.broadcast_to(T[idx, None], w.shape)[keep])
    return np.concatenate(out_pos), np.concatenate(out_w), np.concatenate(out_T)


# ------------------------------------------------------------------------------------------------
# the HI map
# ------------------------------------------------------------------------------------------------
def hi_target(ppm, pm_fine, pos, Ntot: int, halos: Halos, z: float, cosmo):
    """The HI truth map on ``ppm``, computed on ``pm_fine`` (twice as fine) and volume-averaged.

    Parameters
    ----------
    ppm, pm_fine : pmesh.pm.ParticleMesh
        The ``N^3`` output mesh and the ``(2N)^3`` mesh the prescription is evaluated on.
    pos : numpy.ndarray
        This rank's high-resolution positions (Mpc/h).
    Ntot : int
        Global number of high-resolution particles.
    halos : Halos
        FOF halos with stellar masses (:func:`.halos.find_halos`, identical on every rank).
    z : float
        Redshift.
    cosmo : nbodykit Cosmology
        ``Om0``, ``Ob0`` and ``h`` are used.

    Returns
    -------
    hi : TargetMap
        ``"hi"``, ``n_HI / hi_norm``: this rank's part of the mesh.
    diagnostics : dict
        This rank's part of the output mesh (the slices of ``hi``): ``gas`` (smoothed
        ``1 + delta``), ``hot_fraction`` and ``wind_suppression`` (used by the tests and the docs).
    """
    comm = ppm.comm
    Omega_m, Omega_b, h = float(cosmo.Om0), float(cosmo.Ob0), float(cosmo.h)
    Nf = int(pm_fine.Nmesh[0])
    BoxSize = float(pm_fine.BoxSize[0])
    H_f = BoxSize / Nf
    mine = slice(comm.rank, None, comm.size)

    th = thermal_state(z)
    T0, gT, Gamma = th["T0"], th["gamma_T"], th["Gamma_HI"]
    xJ = jeans_filter_scale(z, T0, Omega_m)
    # gas density: matter density on the fine mesh, filtered at the Jeans-like scale
    rho = dm_density(pm_fine, pos, Ntot)
    gas = rho.r2c().apply(lambda k, v: v / (1.0 + xJ**2 * sum(ki**2 for ki in k))).c2r()
    gas[...] = np.maximum(gas.value, GAS_FLOOR)

    # hot gas: virial spheres of the FOF halos (nearest-grid-point stamps on the fine mesh)
    spos, sw, sT = hot_gas_stamps(halos, Nf, BoxSize, comm.rank, comm.size)
    frac = paint(pm_fine, spos, sw, resampler="nnb")
    tsum = paint(pm_fine, spos, sw * sT, resampler="nnb")
    f_hot = np.minimum(frac.value, 1.0)
    T_hot = np.where(frac.value > 0, tsum.value / np.where(frac.value > 0, frac.value, 1.0), T_HOT)

    # winds: stellar mass within a Gaussian kernel of radius R_w around each point
    mstar_f = paint(pm_fine, halos.Position[mine], halos.StellarMass[mine])
    smooth = mstar_f.r2c().apply(
        lambda k, v: v * np.exp(-0.5 * WIND_RADIUS**2 * sum(ki**2 for ki in k))
    )
    mstar_w = smooth.c2r().value * ((2 * np.pi) ** 1.5 * WIND_RADIUS**3 / H_f**3)
    suppression = np.exp(-np.maximum(mstar_w, 0.0) / WIND_M0)

    nH0 = mean_hydrogen_density(z, Omega_b, h)
    ne_nH = electrons_per_hydrogen(z)
    nH = nH0 * gas.value
    T_igm = T0 * gas.value ** (gT - 1.0)
    nhi_cold = n_hi_equilibrium(nH, T_igm, Gamma, ne_nH)
    nhi_hot = n_hi_equilibrium(nH, np.maximum(T_hot, T_igm), Gamma, ne_nH)
    nhi = ((1.0 - f_hot) * nhi_cold + f_hot * nhi_hot) * suppression

    norm = hi_normalisation(z, Omega_b, h)
    array = downsample_array(nhi / norm, pm_fine, ppm)

    constants = {
        "model": "fluctuating Gunn-Peterson approximation, optically thin, no self-shielding",
        "hi_norm_cm3": norm,
        "T0_K": T0,
        "gamma_T": gT,
        "Gamma_HI_s": Gamma,
        "alpha_A0_cm3_s": ALPHA_A0,
        "alpha_A_slope": ALPHA_A_SLOPE,
        "collisional_ionisation": "Cen 1992: 5.85e-11 T^0.5 exp(-157809.1/T)/(1+(T/1e5)^0.5)",
        "X_H": X_H,
        "Y_He": Y_HE,
        "ne_per_nH": ne_nH,
        "nH_mean_cm3": nH0,
        "jeans_filter": "1/(1+x_J^2 k^2) (Hui & Gnedin 1997)",
        "x_J_Mpc_h": xJ,
        "gas_floor": GAS_FLOOR,
        "T_hot_K": T_HOT,
        "hot_gas": "T = max(T_vir, T_hot) inside FOF virial radii (Bryan & Norman 1998)",
        "mu_ionised": MU_IONISED,
        "wind_M0_1e10Msun_h": WIND_M0,
        "wind_radius_Mpc_h": WIND_RADIUS,
        "wind": "n_HI *= exp(-M*_w/M0), M*_w stellar mass in a Gaussian kernel of radius R_w",
        "computed_on_Nmesh": Nf,
        "downsample": "CIC of the fine mesh points (volume average)",
    }
    attrs = target_attrs(
        "hi",
        z,
        "n_HI / hi_norm (dimensionless); n_HI proper number density in cm^-3",
        constants,
        {"hi_norm": norm},
    )
    diagnostics = {
        "gas": downsample_array(gas.value, pm_fine, ppm),
        "hot_fraction": downsample_array(f_hot, pm_fine, ppm),
        "wind_suppression": downsample_array(suppression, pm_fine, ppm),
    }
    slices = tuple(ppm.create(type="real").slices)
    shape = tuple(int(n) for n in ppm.Nmesh)
    return TargetMap("hi", array, attrs, slices, shape), diagnostics
