"""Halos and stellar mass: FOF halos of the high-resolution run and the Moster et al. (2013) SHMR.

Implements ``../shared/spec/reference-suite.md``, "Reference fields", Stellar mass, written down
step by step in ``docs/reference-suite.md``, "Stellar-mass target":

1. friends-of-friends halos (nbodykit ``FOF``, linking length 0.2 of the mean inter-particle
   separation, at least :data:`FOF_NMIN` particles), centre of mass, mass = ``Length x`` particle
   mass; virial radius and temperature from the Bryan & Norman (1998) overdensity (used by the
   hot gas of the HI target, :mod:`.hi`);
2. stellar mass from the stellar-to-halo-mass relation of Moster, Naab & White (2013, MNRAS 428,
   3121; eqs 2 and 11-14, best-fit parameters of their Table 1) with a log-normal scatter;
3. CIC-painted at the halo centres of mass on the output mesh, in units of ``1e10 Msun/h``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import wrap_positions
from .constants import G_NEWTON_KMS, K_BOLTZMANN, M_PROTON, MU_IONISED, RHO_CRIT_MSUNH
from .mesh import TargetMap, local_part, paint, target_attrs

# --- stellar-to-halo-mass relation: Moster, Naab & White 2013, Table 1 ---------------------------
MOSTER13 = {
    "M10": 11.590,  # log10(M1 / Msun) at z = 0
    "M11": 1.195,
    "N10": 0.0351,  # normalisation of m*/M at z = 0
    "N11": -0.0247,
    "beta10": 1.376,  # low-mass slope
    "beta11": -0.826,
    "gamma10": 0.608,  # high-mass slope
    "gamma11": 0.329,
}
#: Log-normal scatter of stellar mass at fixed halo mass (Moster et al. 2013, sec. 3: 0.15 dex).
SHMR_SCATTER_DEX = 0.15

# --- halo finding ---------------------------------------------------------------------------------
FOF_LINKING_LENGTH = 0.2  # in units of the mean inter-particle separation
FOF_NMIN = 20  # minimum particles per halo


@dataclass
class Halos:
    """FOF halos of the high-resolution run (identical on every rank)."""

    Position: np.ndarray  # Mpc/h, centre of mass
    Mass: np.ndarray  # Msun/h (Length * particle mass)
    Length: np.ndarray  # particles
    Radius: np.ndarray  # comoving virial radius, Mpc/h
    Tvir: np.ndarray  # K
    StellarMass: np.ndarray  # 1e10 Msun/h
    particle_mass: float  # Msun/h


# ------------------------------------------------------------------------------------------------
# stellar-to-halo-mass relation
# ------------------------------------------------------------------------------------------------
def moster13_stellar_mass(Mhalo, z):
    """Mean stellar mass of a halo, Moster, Naab & White (2013), eqs 2 and 11-14.

    ``m(M, z) = 2 N(z) M [ (M/M1)^-beta + (M/M1)^gamma ]^-1`` with
    ``log10 M1 = M10 + M11 z/(z+1)``, ``N = N10 + N11 z/(z+1)``, ``beta = beta10 + beta11 z/(z+1)``,
    ``gamma = gamma10 + gamma11 z/(z+1)`` (best-fit values of their Table 1, :data:`MOSTER13`).

    Parameters
    ----------
    Mhalo : array_like
        Halo mass in Msun (no h; Moster et al. use M200c).
    z : float
        Redshift.

    Returns
    -------
    numpy.ndarray
        Stellar mass in Msun.
    """
    p = MOSTER13
    s = z / (z + 1.0)
    M1 = 10.0 ** (p["M10"] + p["M11"] * s)
    norm = p["N10"] + p["N11"] * s
    beta = p["beta10"] + p["beta11"] * s
    gamma = p["gamma10"] + p["gamma11"] * s
    x = np.asarray(Mhalo, dtype="f8") / M1
    return 2.0 * norm * np.asarray(Mhalo, dtype="f8") / (x**-beta + x**gamma)


def stellar_mass_h(Mhalo_h, z, h, scatter_dex=0.0, rng=None):
    """Stellar mass in 1e10 Msun/h of halos of mass ``Mhalo_h`` in Msun/h.

    Converts to the h-free masses of Moster et al. (``M = M_h / h``), applies
    :func:`moster13_stellar_mass`, converts back (``m_h = m h``) and applies a log-normal scatter of
    ``scatter_dex`` (drawn from ``rng``).  We use the FOF mass (b = 0.2, close to the virial mass)
    in place of M200c, an approximation of ~10-20 % in mass.
    """
    ms = moster13_stellar_mass(np.asarray(Mhalo_h, dtype="f8") / h, z) * h / 1e10
    if scatter_dex > 0 and len(ms):
        if rng is None:
            raise ValueError("scatter needs an rng")
        ms = ms * 10.0 ** (scatter_dex * rng.standard_normal(len(ms)))
    return ms


# ------------------------------------------------------------------------------------------------
# virial radius and temperature
# ------------------------------------------------------------------------------------------------
def virial_overdensity(z: float, Omega_m: float) -> float:
    """Bryan & Norman (1998) virial overdensity relative to the critical density (flat LCDM)."""
    Ez2 = Omega_m * (1 + z) ** 3 + (1 - Omega_m)
    x = Omega_m * (1 + z) ** 3 / Ez2 - 1.0
    return 18 * np.pi**2 + 82 * x - 39 * x**2


def virial_radius_temperature(Mhalo_h, z: float, Omega_m: float):
    """Comoving virial radius [Mpc/h] and virial temperature [K] of halos of mass [Msun/h].

    ``R = (1+z) [3 M / (4 pi Delta_c rho_c(z))]^(1/3)``, ``T_vir = mu m_p V_c^2 / (2 k_B)``,
    ``V_c^2 = G M / R_phys`` (Barkana & Loeb 2001, eq. 26 up to the Delta_c convention).
    """
    M = np.asarray(Mhalo_h, dtype="f8")
    Ez2 = Omega_m * (1 + z) ** 3 + (1 - Omega_m)
    rho_c = RHO_CRIT_MSUNH * Ez2  # (Msun/h) / (Mpc/h)^3, physical
    R_phys = (3 * M / (4 * np.pi * virial_overdensity(z, Omega_m) * rho_c)) ** (1.0 / 3.0)
    vc2 = G_NEWTON_KMS * M / R_phys  # (km/s)^2; h cancels
    Tvir = MU_IONISED * M_PROTON * vc2 * 1e10 / (2 * K_BOLTZMANN)
    return R_phys * (1 + z), Tvir


# ------------------------------------------------------------------------------------------------
# halo finding and the stellar-mass map
# ------------------------------------------------------------------------------------------------
def find_halos(pos, vel, BoxSize, Ntot, z, cosmo, seed, comm, scatter_dex=SHMR_SCATTER_DEX):
    """FOF halos (nbodykit, b = 0.2, nmin = :data:`FOF_NMIN`) with stellar masses and virial data.

    Halos are gathered on every rank and sorted (by particle count, then position) so that the SHMR
    scatter drawn from ``seed`` does not depend on the number of ranks.
    """
    from nbodykit.algorithms.fof import FOF
    from nbodykit.lab import ArrayCatalog

    Omega_m = float(cosmo.Om0)
    particle_mass = Omega_m * RHO_CRIT_MSUNH * BoxSize**3 / Ntot
    cat = ArrayCatalog({"Position": pos, "Velocity": vel}, BoxSize=[BoxSize] * 3, comm=comm)
    fof = FOF(cat, linking_length=FOF_LINKING_LENGTH, nmin=FOF_NMIN)
    # find_features rather than to_halos: the HaloCatalog of to_halos hides Length and needs
    # halotools for radii; entry 0 (label 0 = particles in no halo) has Length 0.
    feat = fof.find_features()
    hlen = np.asarray(feat["Length"].compute(), dtype="i8")
    hpos = np.asarray(feat["CMPosition"].compute(), dtype="f8").reshape(-1, 3)[hlen > 0]
    hlen = hlen[hlen > 0]
    if comm is not None and comm.size > 1:
        hpos = np.concatenate(comm.allgather(hpos)).reshape(-1, 3)
        hlen = np.concatenate(comm.allgather(hlen))
    hpos = wrap_positions(hpos, BoxSize, "the suite's box")
    order = np.lexsort((hpos[:, 2], hpos[:, 1], hpos[:, 0], -hlen))
    hpos, hlen = hpos[order], hlen[order]
    mass = hlen * particle_mass
    R, Tvir = virial_radius_temperature(mass, z, Omega_m)
    rng = np.random.default_rng([int(seed), int(round(1000 * z)), 2013])
    mstar = stellar_mass_h(mass, z, float(cosmo.h), scatter_dex=scatter_dex, rng=rng)
    return Halos(
        Position=hpos,
        Mass=mass,
        Length=hlen,
        Radius=R,
        Tvir=Tvir,
        StellarMass=mstar,
        particle_mass=float(particle_mass),
    )


def stellar_target(ppm, halos: Halos, z: float, scatter_dex: float) -> TargetMap:
    """The stellar-mass truth map on ``ppm`` (the output mesh): halos' stellar masses, CIC-painted.

    Parameters
    ----------
    ppm : pmesh.pm.ParticleMesh
        The ``N^3`` output mesh; each rank paints every ``comm.size``-th halo.
    halos : Halos
        From :func:`find_halos` (identical on every rank).
    z : float
        Redshift.
    scatter_dex : float
        The SHMR scatter the halos were drawn with (recorded in the attributes).

    Returns
    -------
    TargetMap
        ``"stellar"`` in ``1e10 Msun/h`` per cell: this rank's part of the mesh.
    """
    mine = slice(ppm.comm.rank, None, ppm.comm.size)
    array, slices, shape = local_part(paint(ppm, halos.Position[mine], halos.StellarMass[mine]))
    constants = {
        "shmr": "Moster, Naab & White 2013, MNRAS 428, 3121, eqs 2, 11-14 (Table 1)",
        **{f"moster13_{k}": v for k, v in MOSTER13.items()},
        "shmr_scatter_dex": float(scatter_dex),
        "halo_mass": "FOF mass (Length x particle_mass) used for M200c",
        "fof_linking_length": FOF_LINKING_LENGTH,
        "fof_nmin": FOF_NMIN,
        "particle_mass_Msun_h": halos.particle_mass,
        "n_halos": len(halos.Mass),
        "total_stellar_mass_1e10Msun_h": float(halos.StellarMass.sum()),
        "window": "cic",
        "centre": "FOF centre of mass",
    }
    attrs = target_attrs("stellar", z, "stellar mass per cell [1e10 Msun/h]", constants)
    return TargetMap("stellar", array, attrs, slices, shape)
