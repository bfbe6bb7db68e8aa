"""FastPM runs of the reference suite: the cheap input and the high-resolution "truth" run.

Both runs start from the SAME Gaussian initial phases (one white-noise field drawn on a
``(2N)^3`` mesh), in the Sherwood-Relics fiducial cosmology (Bolton et al. 2017; Puchwein et
al. 2023; the JERALD paper, sec. IV A):

* the **low-resolution input** (what JERALD improves, paper sec. IV A): the linear field is
  Fourier-truncated to ``N^3`` modes, ``N^3`` particles on an ``N^3`` force mesh, 2LPT to
  ``z = 9``, then 10 FastPM steps to ``z = 0``;
* the **high-resolution run** (the stand-in for the hydro simulation's dark matter, 8x the
  particles): the full ``(2N)^3`` linear field, ``(2N)^3`` particles, a force mesh
  ``force_factor x 2N`` per side and more time steps.

Time stepping: stages are approximately linear in ``a`` between ``a(z=9) = 0.1`` and ``a = 1``
with the output scale factors inserted as knots (:func:`fastpm.core.autostages`), so that the
state is *synchronised* (positions, momenta and forces at the same ``a``) exactly at every
requested output; the outputs are captured by a monitor callback at those moments.

Linear power: CLASS through nbodykit/classylss (``transfer="CLASS"``; ~1 s), Eisenstein & Hu
(1998) as an option.  ``sigma_8`` is matched with :meth:`nbodykit.cosmology.Cosmology.match`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..geometry import wrap_positions

# Sherwood-Relics fiducial parameters (JERALD paper sec. IV A; Puchwein et al. 2023).
SHERWOOD_PARAMS = {
    "Omega_m": 0.308,
    "Omega_b": 0.0482,
    "Omega_L": 0.692,
    "h": 0.678,
    "sigma8": 0.829,
    "n_s": 0.961,
}

#: Starting redshift of the FastPM runs: 2LPT initial conditions at z = 9 (paper sec. IV A).
Z_START = 9.0


def sherwood_cosmology():
    """The Sherwood-Relics fiducial cosmology as an nbodykit ``Cosmology``.

    Massless neutrinos (``m_ncdm=[]``; nbodykit's default would add a 0.06 eV species that
    Sherwood does not have), ``Omega_cdm = Omega_m - Omega_b``, amplitude rescaled with
    ``match(sigma8=0.829)``.  ``Omega_Lambda`` comes out as 0.6919 (flat, with radiation).

    Returns
    -------
    nbodykit.cosmology.Cosmology
    """
    from nbodykit import cosmology

    p = SHERWOOD_PARAMS
    c = cosmology.Cosmology(
        h=p["h"],
        Omega0_b=p["Omega_b"],
        Omega0_cdm=p["Omega_m"] - p["Omega_b"],
        n_s=p["n_s"],
        m_ncdm=[],
    )
    return c.match(sigma8=p["sigma8"])


def cosmology_attrs(cosmo=None) -> dict:
    """Plain-JSON description of the cosmology, for file attributes and the manifest."""
    if cosmo is None:
        return dict(SHERWOOD_PARAMS)
    return {
        "Omega_m": float(cosmo.Om0),
        "Omega_b": float(cosmo.Ob0),
        "Omega_L": float(cosmo.Ode0),
        "h": float(cosmo.h),
        "sigma8": float(cosmo.sigma8),
        "n_s": float(cosmo.n_s),
    }


@dataclass(frozen=True)
class RunConfig:
    """Configuration of one low-res / high-res pair of FastPM runs.

    Parameters
    ----------
    Nmesh : int
        ``N``: particles per side of the low-resolution run and the output mesh of the targets.
    BoxSize : float
        Comoving box side in Mpc/h.
    seed : int
        White-noise seed (phases shared by both runs).
    redshifts : tuple of float
        Output redshifts (any values below ``Z_START``).
    lowres_steps : int
        FastPM steps of the input run from z = 9 to z = 0 (paper: 10).
    highres_steps : int
        FastPM steps of the high-resolution run.
    highres_force_factor : int
        Force mesh of the high-resolution run is ``highres_force_factor * 2N`` per side.
    transfer : {"CLASS", "EisensteinHu"}
        Linear transfer function.
    """

    Nmesh: int
    BoxSize: float
    seed: int = 42
    redshifts: tuple = (5.0, 2.0, 0.0)
    lowres_steps: int = 10
    highres_steps: int = 30
    highres_force_factor: int = 1
    transfer: str = "CLASS"

    def as_dict(self) -> dict:
        return {
            "Nmesh": int(self.Nmesh),
            "BoxSize": float(self.BoxSize),
            "seed": int(self.seed),
            "redshifts": [float(z) for z in self.redshifts],
            "lowres_steps": int(self.lowres_steps),
            "highres_steps": int(self.highres_steps),
            "highres_force_factor": int(self.highres_force_factor),
            "highres_Nparticles": int(2 * self.Nmesh),
            "highres_force_Nmesh": int(2 * self.Nmesh * self.highres_force_factor),
            "lowres_force_Nmesh": int(self.Nmesh),
            "z_start": Z_START,
            "ic": "2LPT",
            "transfer": self.transfer,
            "linear_mesh": int(2 * self.Nmesh),
        }


@dataclass
class Snapshot:
    """Local particles of one run at one redshift (positions wrapped into ``[0, BoxSize)``).

    ``Position`` in comoving Mpc/h, ``Velocity`` the peculiar velocity in km/s (fastpm's
    ``state.V``).  Under MPI each rank holds its own particles.
    """

    redshift: float
    a: float
    Position: np.ndarray
    Velocity: np.ndarray
    Nparticles: int  # global count


@dataclass
class RunResult:
    """Snapshots of one run keyed by redshift, plus metadata."""

    name: str
    Nparticles_side: int
    force_Nmesh: int
    nsteps: int
    stages: np.ndarray
    snapshots: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SuitePair:
    """The two runs of one suite realisation."""

    config: RunConfig
    cosmology: object
    lowres: RunResult
    highres: RunResult
    seconds: dict = field(default_factory=dict)


def linear_power(cosmo, transfer: str = "CLASS"):
    """Linear matter power spectrum at z = 0 (``P(k)`` in (Mpc/h)^3, k in h/Mpc)."""
    from nbodykit.cosmology import LinearPower

    if transfer not in ("CLASS", "EisensteinHu"):
        raise ValueError(f"transfer must be 'CLASS' or 'EisensteinHu', got {transfer!r}")
    return LinearPower(cosmo, redshift=0.0, transfer=transfer)


def linear_field(Nmesh: int, BoxSize: float, seed: int, Plin, comm=None):
    """Gaussian linear density field at z = 0 on an ``Nmesh^3`` mesh (a pmesh ComplexField).

    The white noise is pmesh's Gadget-compatible generator (mode amplitudes are independent of the
    mesh size, so truncating the modes of a larger mesh gives the same field on a smaller one).
    """
    from pmesh.pm import ParticleMesh

    ppm = ParticleMesh(Nmesh=[Nmesh] * 3, BoxSize=BoxSize, dtype="f8", comm=comm)
    wn = ppm.generate_whitenoise(seed, type="complex", unitary=False)
    volume = float(np.prod(ppm.BoxSize))

    def tf(k, v):
        kk = sum(ki**2 for ki in k) ** 0.5
        pk = np.where(kk > 0, Plin(np.where(kk > 0, kk, 1.0)), 0.0)
        return v * (pk / volume) ** 0.5

    return wn.apply(tf)


def truncate_field(linear, Nmesh: int):
    """Fourier-truncate a linear ComplexField to ``Nmesh^3`` (same phases, modes ``|k_i| < k_Ny``).

    pmesh's ``resample`` copies the common modes and zeroes the Nyquist planes of the output.
    """
    from pmesh.pm import ParticleMesh

    ppm = ParticleMesh(
        Nmesh=[Nmesh] * 3, BoxSize=linear.pm.BoxSize, dtype=linear.pm.dtype, comm=linear.pm.comm
    )
    out = ppm.create(type="complex")
    linear.resample(out)
    return out


def stages_for(nsteps: int, redshifts, z_start: float = Z_START) -> np.ndarray:
    """Scale factors of the force stages: ``nsteps`` steps from ``z_start`` to the lowest output.

    Approximately linear in ``a`` with every output ``a`` inserted as a knot (fastpm's
    ``autostages``), so the outputs are hit exactly.  The run ends at the lowest requested redshift
    (z = 0 for the default outputs).
    """
    from fastpm.core import autostages

    a_start = 1.0 / (1.0 + z_start)
    a_out = sorted({1.0 / (1.0 + float(z)) for z in redshifts})
    if a_out[0] < a_start:
        raise ValueError(f"output redshifts must be <= z_start = {z_start}")
    knots = sorted({a_start, *a_out})
    if nsteps < len(knots) - 1:
        raise ValueError(f"need at least {len(knots) - 1} steps to hit every output")
    return np.asarray(autostages(knots, N=nsteps + 1))


def run_fastpm(
    linear,
    cosmo,
    redshifts,
    nsteps: int,
    force_factor: int = 1,
    name: str = "run",
    progress: bool = False,
) -> RunResult:
    """2LPT to z = 9 then FastPM kick-drift-kick steps; capture synchronised states at the outputs.

    Parameters
    ----------
    linear : pmesh ComplexField
        Linear field at z = 0 on the particle mesh (one particle per cell, grid positions).
    cosmo : nbodykit Cosmology
    redshifts : sequence of float
    nsteps : int
        Number of FastPM steps from z = 9 to the lowest output redshift.
    force_factor : int
        Force mesh / particle mesh (fastpm's ``B``).
    name : str
        Label for the progress bar.
    progress : bool
        Show a tqdm bar over the steps (rank 0 only).

    Returns
    -------
    RunResult
    """
    from fastpm.core import Solver, leapfrog

    t0 = time.perf_counter()
    ppm = linear.pm
    comm = ppm.comm
    BoxSize = float(ppm.BoxSize[0])
    solver = Solver(ppm, cosmo, B=int(force_factor))
    Q = ppm.generate_uniform_particle_grid(shift=0)
    stages = stages_for(nsteps, redshifts)
    a_start = stages[0]
    state = solver.lpt(linear, Q, a=a_start, order=2)

    wanted = {1.0 / (1.0 + float(z)): float(z) for z in redshifts}
    result = RunResult(
        name=name,
        Nparticles_side=int(ppm.Nmesh[0]),
        force_Nmesh=int(ppm.Nmesh[0] * force_factor),
        nsteps=int(nsteps),
        stages=stages,
    )
    ntot = int(np.prod(ppm.Nmesh))

    bar = None
    if progress and (comm is None or comm.rank == 0):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(stages), desc=f"FastPM {name}", unit="force", leave=False)

    def monitor(action, ai, ac, af, state, event):
        if action == "F" and bar is not None:
            bar.update(1)
        if not state.synchronized:
            return
        a = state.a["S"]
        for aw, z in wanted.items():
            if z not in result.snapshots and np.isclose(a, aw, rtol=1e-10, atol=0):
                result.snapshots[z] = Snapshot(
                    redshift=z,
                    a=float(a),
                    # fastpm does not wrap its particles into the box
                    Position=wrap_positions(np.array(state.X, dtype="f8"), BoxSize),
                    Velocity=np.array(state.V, dtype="f8"),
                    Nparticles=ntot,
                )

    # leapfrog() starts with a force evaluation at a_start, at which the state is synchronised:
    # an output at z = 9 itself is captured there.
    solver.nbody(state, leapfrog(stages), monitor=monitor)
    if bar is not None:
        bar.close()
    missing = set(wanted.values()) - set(result.snapshots)
    if missing:  # pragma: no cover - stages always include the knots
        raise RuntimeError(f"outputs not reached: {sorted(missing)}")
    result.seconds = time.perf_counter() - t0
    return result


def run_pair(config: RunConfig, comm=None, progress: bool = False) -> SuitePair:
    """Run the low-res input and the high-res truth from the same phases.

    Parameters
    ----------
    config : RunConfig
    comm : MPI communicator or None
        pmesh distributes particles and meshes over it; ``None`` uses COMM_WORLD (pmesh default),
        which is serial when not launched under ``mpiexec``.
    progress : bool

    Returns
    -------
    SuitePair
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    t = {}
    t0 = time.perf_counter()
    cosmo = sherwood_cosmology()
    Plin = linear_power(cosmo, config.transfer)
    N = int(config.Nmesh)
    lin_hi = linear_field(2 * N, config.BoxSize, config.seed, Plin, comm=comm)
    lin_lo = truncate_field(lin_hi, N)
    t["linear"] = time.perf_counter() - t0

    low = run_fastpm(
        lin_lo, cosmo, config.redshifts, config.lowres_steps, 1, name="low-res", progress=progress
    )
    t["lowres"] = low.seconds
    high = run_fastpm(
        lin_hi,
        cosmo,
        config.redshifts,
        config.highres_steps,
        config.highres_force_factor,
        name="high-res",
        progress=progress,
    )
    t["highres"] = high.seconds
    return SuitePair(config=config, cosmology=cosmo, lowres=low, highres=high, seconds=t)
