"""Target ("truth") maps of the reference suite, built from the high-resolution FastPM run.

No hydrodynamical simulation is available, so the targets JERALD learns are physically motivated
post-processing of the high-resolution dark matter (see ``docs/reference-suite.md``).  Every
prescription below is deliberately *not* JERALD's own functional form (displacement layers
followed by ``ReLU(w (1+delta)^mu - ...)``), so fitting the targets is not trivial.

All maps are whole-mesh numpy arrays on the ``N^3`` output mesh (the low-resolution run's mesh);
pmesh's convention is used throughout: mesh value ``i`` sits at position ``i * BoxSize / Nmesh``.

* **DM**: CIC paint of the ``(2N)^3`` high-resolution particles, as ``1 + delta``.
* **Stellar mass**: friends-of-friends halos (linking length 0.2 of the mean separation) of the
  high-resolution run; stellar mass from the stellar-to-halo-mass relation of Moster, Naab &
  White (2013, MNRAS 428, 3121; eqs 2 and 11-14, best-fit parameters of their Table 1) with a
  log-normal scatter; CIC-painted at the halo centres of mass, in units of ``1e10 Msun/h``.
* **HI**: the fluctuating Gunn-Peterson approximation (photoionisation equilibrium, optically
  thin, no self-shielding, like Sherwood-Relics) on the gas density (the high-resolution matter
  density smoothed at the Jeans-like filtering scale of Hui & Gnedin 1997), the power-law
  temperature-density relation of the IGM, collisionally ionised virial-temperature gas inside FOF
  halos, and a multiplicative depletion around galaxies proportional to their stellar mass.  The
  HI map is computed on the ``(2N)^3`` mesh and volume-averaged onto the output mesh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# --- physical constants (cgs unless stated) ------------------------------------------------------
#: Critical density today in (Msun/h) / (Mpc/h)^3 = 2.775e11 h^2 Msun / Mpc^3.
RHO_CRIT_MSUNH = 2.77536627e11
#: Critical density today in g / cm^3, divided by h^2.
RHO_CRIT_CGS_H2 = 1.87847e-29
M_PROTON = 1.67262192e-24  # g
K_BOLTZMANN = 1.380649e-16  # erg / K
G_NEWTON_KMS = 4.30091e-9  # Mpc (km/s)^2 / Msun

#: Hydrogen / helium mass fractions (primordial).
X_H = 0.76
Y_HE = 0.24
#: Mean molecular weight of fully ionised primordial gas (virial temperature).
MU_IONISED = 0.59
#: Adiabatic index of a monatomic gas (Jeans-like filtering scale).
GAMMA_ADIABATIC = 5.0 / 3.0

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


@dataclass
class TargetMap:
    """One target map (whole-mesh numpy array) and the attributes written with it."""

    name: str
    array: np.ndarray
    attrs: dict


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


@dataclass
class Targets:
    """The three targets at one redshift plus diagnostics used by the tests and the docs."""

    redshift: float
    dm: TargetMap
    stellar: TargetMap
    hi: TargetMap
    halos: Halos
    diagnostics: dict = field(default_factory=dict)


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
# painting helpers (pmesh, MPI-aware)
# ------------------------------------------------------------------------------------------------
def _pm(Nmesh: int, BoxSize: float, comm):
    from pmesh.pm import ParticleMesh

    return ParticleMesh(Nmesh=[int(Nmesh)] * 3, BoxSize=float(BoxSize), dtype="f8", comm=comm)


def paint(pm, pos, mass=1.0, resampler="cic"):
    """Paint this rank's particles onto ``pm``: a RealField holding the mass per cell."""
    pos = np.ascontiguousarray(pos, dtype="f8").reshape(-1, 3)
    if not np.isscalar(mass):
        mass = np.ascontiguousarray(mass, dtype="f8")
    layout = pm.decompose(pos, smoothing=resampler)
    return pm.paint(pos, mass=mass, resampler=resampler, layout=layout)


def _global_sum(x, comm):
    return comm.allreduce(float(np.sum(x))) if comm is not None else float(np.sum(x))


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


def dm_density(pm, pos, Ntot: int):
    """``1 + delta`` of particles: CIC paint of unit masses times ``Ncells / Nparticles``."""
    field_ = paint(pm, pos)
    field_[...] *= np.prod(pm.Nmesh) / Ntot
    return field_


# ------------------------------------------------------------------------------------------------
# halos
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
    hpos = np.mod(hpos, BoxSize)
    hpos[hpos >= BoxSize] = 0.0
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
# the targets
# ------------------------------------------------------------------------------------------------
def _mesh_attrs(name, Nmesh, BoxSize, z, units, constants, extra=None):
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


def make_targets(
    highres_pos,
    highres_vel,
    Ntot: int,
    Nmesh: int,
    BoxSize: float,
    z: float,
    cosmo,
    seed: int,
    comm=None,
    scatter_dex: float = SHMR_SCATTER_DEX,
) -> Targets:
    """DM, stellar-mass and HI target maps at one redshift from the high-resolution particles.

    Parameters
    ----------
    highres_pos, highres_vel : numpy.ndarray
        This rank's high-resolution particles (Mpc/h, km/s), positions in ``[0, BoxSize)``.
    Ntot : int
        Global number of high-resolution particles, ``(2N)^3``.
    Nmesh : int
        ``N``, the output mesh per side.
    BoxSize : float
        Mpc/h.
    z : float
        Redshift.
    cosmo : nbodykit Cosmology
    seed : int
        Seed of the realisation (the SHMR scatter is drawn from it).
    comm : MPI communicator or None
    scatter_dex : float
        SHMR log-normal scatter (0 for the mean relation).

    Returns
    -------
    Targets
        Maps as whole-mesh numpy arrays (identical on every rank) and their attrs.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    Omega_m, Omega_b, h = float(cosmo.Om0), float(cosmo.Ob0), float(cosmo.h)
    N, Nf = int(Nmesh), 2 * int(Nmesh)
    pm = _pm(N, BoxSize, comm)
    pmf = _pm(Nf, BoxSize, comm)
    H_f = BoxSize / Nf

    # ---- DM: 1 + delta of the high-res particles on the output mesh ---------------------------
    dm = dm_density(pm, highres_pos, Ntot)
    dm_arr = dm.preview()
    dm_attrs = _mesh_attrs(
        "dm",
        N,
        BoxSize,
        z,
        "1+delta (dimensionless)",
        {"window": "cic", "particles": int(Ntot)},
    )

    # ---- halos and stellar mass --------------------------------------------------------------
    halos = find_halos(highres_pos, highres_vel, BoxSize, Ntot, z, cosmo, seed, comm, scatter_dex)
    mine = slice(comm.rank, None, comm.size)
    star = paint(pm, halos.Position[mine], halos.StellarMass[mine])
    star_arr = star.preview()
    star_const = {
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
    star_attrs = _mesh_attrs(
        "stellar", N, BoxSize, z, "stellar mass per cell [1e10 Msun/h]", star_const
    )

    # ---- HI -----------------------------------------------------------------------------------
    th = thermal_state(z)
    T0, gT, Gamma = th["T0"], th["gamma_T"], th["Gamma_HI"]
    xJ = jeans_filter_scale(z, T0, Omega_m)
    # gas density: matter density on the fine mesh, filtered at the Jeans-like scale
    rho = dm_density(pmf, highres_pos, Ntot)
    gas = rho.r2c().apply(lambda k, v: v / (1.0 + xJ**2 * sum(ki**2 for ki in k))).c2r()
    gas[...] = np.maximum(gas.value, GAS_FLOOR)

    # hot gas: virial spheres of the FOF halos (nearest-grid-point stamps on the fine mesh)
    spos, sw, sT = hot_gas_stamps(halos, Nf, BoxSize, comm.rank, comm.size)
    frac = paint(pmf, spos, sw, resampler="nnb")
    tsum = paint(pmf, spos, sw * sT, resampler="nnb")
    f_hot = np.minimum(frac.value, 1.0)
    T_hot = np.where(frac.value > 0, tsum.value / np.where(frac.value > 0, frac.value, 1.0), T_HOT)

    # winds: stellar mass within a Gaussian kernel of radius R_w around each point
    mstar_f = paint(pmf, halos.Position[mine], halos.StellarMass[mine])
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
    nhi_field = pmf.create(type="real")
    nhi_field[...] = nhi / norm
    hi_arr = downsample(nhi_field, pm).preview()

    hi_const = {
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
    hi_attrs = _mesh_attrs(
        "hi",
        N,
        BoxSize,
        z,
        "n_HI / hi_norm (dimensionless); n_HI proper number density in cm^-3",
        hi_const,
        {"hi_norm": norm},
    )

    # diagnostics on the output mesh (tests, docs): gas density and hot fraction
    diag = {}
    tmp = pmf.create(type="real")
    tmp[...] = gas.value
    diag["gas"] = downsample(tmp, pm).preview()
    tmp[...] = f_hot
    diag["hot_fraction"] = downsample(tmp, pm).preview()
    tmp[...] = suppression
    diag["wind_suppression"] = downsample(tmp, pm).preview()

    return Targets(
        redshift=float(z),
        dm=TargetMap("dm", dm_arr, dm_attrs),
        stellar=TargetMap("stellar", star_arr, star_attrs),
        hi=TargetMap("hi", hi_arr, hi_attrs),
        halos=halos,
        diagnostics=diag,
    )
