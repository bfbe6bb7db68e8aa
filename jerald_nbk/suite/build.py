"""Build the reference suite on disk: FastPM catalogs, truth meshes, halo catalogs, a manifest.

Per redshift, :func:`make_targets` puts the three prescriptions together (:mod:`.dm`,
:mod:`.halos` for halos and stellar mass, :mod:`.hi`) and :func:`build_suite` writes them; the
runs themselves are :mod:`.runs`.  See ``docs/reference-suite.md`` ("Outputs", "Manifest") and
``../shared/spec/reference-suite.md`` ("Sizes").

Layout of ``outdir`` (redshift tags are ``f"{z:g}"``: ``z5``, ``z2``, ``z0``, ``z0.5``):

* ``fastpm_z{z}/``: bigfile catalog, FastPM layout (dataset ``1``: ``Position`` [Mpc/h],
  ``Velocity`` [km/s]; ``Header`` attrs ``BoxSize``, ``Nmesh``, ``redshift``, ``seed``,
  ``cosmology`` ...) - the low-resolution input JERALD improves;
* ``truth_{dm,stellar,hi}_z{z}/``: bigfile meshes (dataset ``Field``; attrs ``Nmesh``,
  ``BoxSize``, ``ndarray.shape``, ``units``, ``constants`` ...) on the ``N^3`` output mesh;
* ``halos_z{z}/``: bigfile catalog of the high-resolution FOF halos (``Position``, ``Mass``,
  ``Length``, ``Radius``, ``Tvir``, ``StellarMass``);
* ``suite.json``: the manifest (paths, size, seed, redshifts, configuration, every constant,
  timings, library versions), written last.

Each output is written atomically by :mod:`jerald_nbk.io`; the manifest is removed before anything
is rewritten and written (atomically) only once every output exists, so an interrupted build is
simply rebuilt by the next call, and a complete one is returned from the cache.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..geometry import wrap_positions
from .dm import dm_target
from .halos import SHMR_SCATTER_DEX, Halos, find_halos, stellar_target
from .hi import hi_target
from .mesh import TargetMap, particle_mesh

#: Bump when outputs change for the same (size, seed, redshifts): invalidates cached suites.
GENERATOR_VERSION = "1.0"

MANIFEST = "suite.json"

#: Suite sizes.  ``Nmesh`` = N (low-res particles per side = output mesh), Mpc/h box; the high-res
#: run has (2N)^3 particles, ``highres_steps`` FastPM steps and a force mesh of
#: ``highres_force_factor * 2N`` per side.  Step counts / force factors are chosen to fit the
#: time budget on 2 cores (smoke < 1 min, demo < 4 min; see docs/reference-suite.md).
SIZES = {
    "smoke": {"Nmesh": 32, "BoxSize": 25.0, "highres_steps": 30, "highres_force_factor": 2},
    "demo": {"Nmesh": 64, "BoxSize": 40.0, "highres_steps": 30, "highres_force_factor": 1},
    "bench": {"Nmesh": 128, "BoxSize": 80.0, "highres_steps": 30, "highres_force_factor": 1},
    "paper": {"Nmesh": 512, "BoxSize": 80.0, "highres_steps": 40, "highres_force_factor": 2},
}


def ztag(z) -> str:
    """Redshift tag used in file names: ``5`` for 5.0, ``0.5`` for 0.5."""
    return f"{float(z):g}"


def output_names(redshifts) -> list[str]:
    """Names (relative paths) of every output of a suite, manifest excluded."""
    names = []
    for z in redshifts:
        t = ztag(z)
        names += [f"fastpm_z{t}", f"truth_dm_z{t}", f"truth_stellar_z{t}", f"truth_hi_z{t}"]
        names += [f"halos_z{t}"]
    return names


def _f4_positions(pos, BoxSize) -> np.ndarray:
    """float32 positions still in ``[0, BoxSize)``: rounding to float32 can land on ``BoxSize``."""
    return wrap_positions(np.asarray(pos, dtype="f4"), BoxSize, "the suite's box")


@dataclass
class Targets:
    """The three targets at one redshift plus diagnostics used by the tests and the docs."""

    redshift: float
    dm: TargetMap
    stellar: TargetMap
    hi: TargetMap
    halos: Halos
    diagnostics: dict = field(default_factory=dict)


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

    The DM map is :func:`.dm.dm_target`, the halos and the stellar map :func:`.halos.find_halos`
    and :func:`.halos.stellar_target`, the HI map :func:`.hi.hi_target` (on the ``(2N)^3`` mesh).

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
        Maps as this rank's part of each mesh (the whole mesh on one rank) and their attrs.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    ppm = particle_mesh(int(Nmesh), BoxSize, comm)
    pm_fine = particle_mesh(2 * int(Nmesh), BoxSize, comm)
    dm = dm_target(ppm, highres_pos, Ntot, z)
    halos = find_halos(highres_pos, highres_vel, BoxSize, Ntot, z, cosmo, seed, comm, scatter_dex)
    stellar = stellar_target(ppm, halos, z, scatter_dex)
    hi, diagnostics = hi_target(ppm, pm_fine, highres_pos, Ntot, halos, z, cosmo)
    return Targets(
        redshift=float(z), dm=dm, stellar=stellar, hi=hi, halos=halos, diagnostics=diagnostics
    )


def _norm_redshifts(redshifts) -> list[float]:
    zs = [float(z) for z in redshifts]
    if len(set(zs)) != len(zs):
        raise ValueError(f"duplicate redshifts in {redshifts!r}")
    if any(z < 0 for z in zs):
        raise ValueError("redshifts must be >= 0")
    return zs


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for pkg in ("fastpm", "pmesh", "nbodykit", "bigfile", "classylss"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:  # pragma: no cover
            out[pkg] = None
    return out


def _cached(outdir: Path, size: str, seed: int, redshifts: list[float]):
    """The manifest if ``outdir`` holds a complete suite for these arguments, else None."""
    path = outdir / MANIFEST
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        man.get("generator_version") == GENERATOR_VERSION
        and man.get("size") == size
        and man.get("seed") == seed
        and [float(z) for z in man.get("redshifts", [])] == redshifts
        and man.get("config", {}).get("Nmesh") == SIZES[size]["Nmesh"]
    )
    if not ok:
        return None
    if not all((outdir / rel).exists() for rel in man.get("paths", {}).values()):
        return None
    return man


def _paths(outdir: Path, man: dict) -> dict:
    paths = {name: outdir / rel for name, rel in man["paths"].items()}
    paths["manifest"] = outdir / MANIFEST
    return paths


def build_suite(
    outdir,
    size: str = "smoke",
    seed: int = 42,
    redshifts=(5, 2, 0),
    comm=None,
    progress: bool = True,
    force: bool = False,
    save_highres: bool = False,
) -> dict:
    """Build (or return the cached) reference suite in ``outdir``.

    Parameters
    ----------
    outdir : str or Path
        Output directory (created).
    size : {"smoke", "demo", "bench", "paper"}
        Suite size, see :data:`SIZES`.
    seed : int
        Seed of the initial phases (and of the SHMR scatter).
    redshifts : sequence of float
        Output redshifts (<= 9).
    comm : MPI communicator, optional
        Distributes the runs over ranks (pmesh); ``None`` uses COMM_WORLD, serial when not under
        ``mpiexec``.  Every rank must call.
    progress : bool
        tqdm progress bars (rank 0).
    force : bool
        Rebuild even if a matching suite exists.
    save_highres : bool
        Also write the high-resolution particles as ``highres_z{z}`` catalogs (same layout as
        ``fastpm_z{z}``; 8x the particles).  A cached suite without them is rebuilt.

    Returns
    -------
    dict
        ``name -> Path`` for every output (``fastpm_z0``, ``truth_dm_z0``, ``truth_stellar_z0``,
        ``truth_hi_z0``, ``halos_z0``, ... ) and ``manifest``.  The same dict is returned from the
        cache when ``suite.json`` matches (size, seed, redshifts, generator version) and every
        listed output exists.
    """
    from ..io import write_catalog, write_mesh_slab
    from ..utils import atomic_write
    from .runs import RunConfig, cosmology_attrs, run_pair

    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    seed = int(seed)
    zs = _norm_redshifts(redshifts)
    outdir = Path(outdir)
    root = comm.rank == 0

    man = None
    if root and not force:
        man = _cached(outdir, size, seed, zs)
        if man is not None and save_highres and not man.get("save_highres", False):
            man = None
    man = comm.bcast(man, root=0)
    if man is not None:
        return _paths(outdir, man)

    t_start = time.perf_counter()
    if root:
        outdir.mkdir(parents=True, exist_ok=True)
        # an old manifest must not vouch for outputs that are about to be replaced
        (outdir / MANIFEST).unlink(missing_ok=True)
    comm.barrier()

    spec = SIZES[size]
    config = RunConfig(
        Nmesh=spec["Nmesh"],
        BoxSize=spec["BoxSize"],
        seed=seed,
        redshifts=tuple(zs),
        highres_steps=spec["highres_steps"],
        highres_force_factor=spec["highres_force_factor"],
    )
    pair = run_pair(config, comm=comm, progress=progress and root)
    cosmo_attrs = cosmology_attrs(pair.cosmology)
    N, L = config.Nmesh, config.BoxSize
    timings = {f"{k}_s": round(v, 3) for k, v in pair.seconds.items()}
    paths: dict[str, str] = {}
    constants: dict[str, dict] = {}
    n_halos: dict[str, int] = {}

    common = {
        "seed": seed,
        "cosmology": cosmo_attrs,
        "generator": "jerald_nbk.suite",
        "generator_version": GENERATOR_VERSION,
        "size": size,
    }

    bar = None
    if progress and root:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(zs), desc="targets", unit="z", leave=False)
    for z in zs:
        t0 = time.perf_counter()
        t = ztag(z)
        low = pair.lowres.snapshots[z]
        name = f"fastpm_z{t}"
        write_catalog(
            outdir / name,
            {"Position": _f4_positions(low.Position, L), "Velocity": low.Velocity.astype("f4")},
            {
                "BoxSize": [L] * 3,
                "Nmesh": [N] * 3,
                "redshift": z,
                "Time": low.a,
                "Om0": cosmo_attrs["Omega_m"],
                "Nparticles": low.Nparticles,
                "nsteps": pair.lowres.nsteps,
                "force_Nmesh": pair.lowres.force_Nmesh,
                "z_start": config.as_dict()["z_start"],
                "units": {"Position": "Mpc/h (comoving)", "Velocity": "km/s (peculiar)"},
                "run": "FastPM low-resolution input",
                **common,
            },
            comm=comm,
        )
        paths[name] = name

        high = pair.highres.snapshots[z]
        if save_highres:
            name = f"highres_z{t}"
            write_catalog(
                outdir / name,
                {"Position": high.Position, "Velocity": high.Velocity.astype("f4")},
                {
                    "BoxSize": [L] * 3,
                    "Nmesh": [2 * N] * 3,
                    "redshift": z,
                    "Time": high.a,
                    "Om0": cosmo_attrs["Omega_m"],
                    "Nparticles": high.Nparticles,
                    "nsteps": pair.highres.nsteps,
                    "force_Nmesh": pair.highres.force_Nmesh,
                    "units": {"Position": "Mpc/h (comoving)", "Velocity": "km/s (peculiar)"},
                    "run": "FastPM high-resolution truth run",
                    **common,
                },
                comm=comm,
            )
            paths[name] = name
        tg = make_targets(
            high.Position, high.Velocity, high.Nparticles, N, L, z, pair.cosmology, seed, comm=comm
        )
        constants[t] = {}
        for m in (tg.dm, tg.stellar, tg.hi):
            name = f"truth_{m.name}_z{t}"
            attrs = {
                **m.attrs,
                **common,
                "highres_Nparticles": high.Nparticles,
                "highres_nsteps": pair.highres.nsteps,
                "highres_force_Nmesh": pair.highres.force_Nmesh,
            }
            write_mesh_slab(
                outdir / name, m.array.astype("f4"), m.slices, m.shape, L, attrs=attrs, comm=comm
            )
            paths[name] = name
            constants[t][m.name] = m.attrs["constants"]

        hal = tg.halos
        name = f"halos_z{t}"
        mine = slice(comm.rank, None, comm.size)  # halos are identical on every rank
        write_catalog(
            outdir / name,
            {
                "Position": hal.Position[mine],
                "Mass": hal.Mass[mine],
                "Length": hal.Length[mine],
                "Radius": hal.Radius[mine],
                "Tvir": hal.Tvir[mine],
                "StellarMass": hal.StellarMass[mine],
            },
            {
                "BoxSize": [L] * 3,
                "redshift": z,
                "particle_mass": hal.particle_mass,
                "units": {
                    "Position": "Mpc/h",
                    "Mass": "Msun/h",
                    "Radius": "Mpc/h comoving (Bryan & Norman 1998 virial)",
                    "Tvir": "K",
                    "StellarMass": "1e10 Msun/h",
                },
                "constants": tg.stellar.attrs["constants"],
                **common,
            },
            comm=comm,
        )
        paths[name] = name
        n_halos[t] = int(len(hal.Mass))
        timings[f"targets_z{t}_s"] = round(time.perf_counter() - t0, 3)
        del tg, high, low
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    manifest = {
        "generator": "jerald_nbk.suite",
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "redshifts": zs,
        "config": config.as_dict(),
        "save_highres": bool(save_highres),
        "cosmology": cosmo_attrs,
        "paths": paths,
        "constants": constants,
        "n_halos": n_halos,
        "timings": timings,
        "environment": {
            **_versions(),
            "mpi_ranks": int(comm.size),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if root:
        with atomic_write(outdir / MANIFEST) as fh:
            json.dump(manifest, fh, indent=1, sort_keys=False)
    comm.barrier()
    return _paths(outdir, manifest)
