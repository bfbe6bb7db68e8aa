"""``jerald-ldl``: the LDL.py command line (Dai & Seljak's Lagrangian Deep Learning) on jerald-nbk.

It accepts LDL.py's options and file conventions and drives the same engine as ``jerald``
(:mod:`jerald_nbk.workflow`): JAX on one process, pmesh under ``mpiexec``. Facts below are read
from LDL's code (biweidai/LDL, commit f62f3a6: ``LDL.py``, ``model.py``, ``readTNG.py``).

Model (``shared/spec/model.md``, "Original LDL differences"):

* every target uses the eq-6 Green's function and the 4th-order Fourier gradient; LDL's split
  (test ``[0, 0.44)^3``, validation ``x >= 0.44, y < 0.56, z < 0.56``, train the rest);
* ``dm`` is our DM stage (``F = 1 + delta``, L2 loss); every other target is the stellar form,
  ``ReLU(b1 (1+delta)^mu + b0)`` = our eq 8 with ``w = b1``, ``b = -b0`` (L1 loss);
* LDL's bounds (:data:`jerald_nbk.model.params.LDL_BOUNDS`), not ours: parameter files are read
  against them and both optimisers stay inside them;
* the optimiser is L-BFGS-B inside those bounds, as LDL's (:func:`jerald_nbk.train.lbfgs.
  fit_lbfgsb`), keeping the evaluated point with the lowest validation loss and rewriting
  ``..._bestparam.txt`` each time it improves; ``--optimizer adam`` trains with the paper's Adam.

Inputs. ``--FastPMpath`` (a bigfile catalog) is the input; without it the TNG-Dark particles of
``--TNGDarkpath`` are (``PartType1/Coordinates``, kpc/h -> Mpc/h, as LDL's ``load_TNG_data``).
``--TNGpath`` / ``--TNGDarkpath`` are TNG simulation directories (``snapdir_XXX/snap_XXX.N.hdf5``,
``XXX`` = ``--snapNum``; a snapshot directory itself also works) from which the target is painted
as LDL's ``load_TNG_map`` paints it (CIC, the whole snapshot; LDL's own cached map
``snapdir_XXX/{field}map_Nmesh{N}`` is read instead when it exists), or our mesh files (bigfile
``Field`` or ``.npy``):

=======  ==========  ===================================================================
field    particles   painted weight per particle (then per cell)
=======  ==========  ===================================================================
dm       PartType1   1, times ``Ncells / Nparticles`` (``1 + delta``)
Mstar    PartType4   ``Masses`` (1e10 Msun/h; all of PartType4, wind particles included)
ne       PartType0   ``X m x_e / m_p`` per physical cell volume (cm^-3); ``x_e`` =
                     ``ElectronAbundance``, ``m`` = ``Masses`` in g, ``X = 0.76``
nT       PartType0   ``ne`` weight times ``T = 2/3 u mu m_p / k_B``, ``mu = 4/(1+3X+4X x_e)``,
                     ``u`` = ``InternalEnergy`` (km/s)^2: the electron-density-weighted
                     ``n_e T`` (K cm^-3)
nHI      PartType0   as ``ne`` with ``x_e`` -> ``NeutralHydrogenAbundance``
=======  ==========  ===================================================================

The physical cell volume is ``(a BoxSize / Nmesh Mpc / h)^3`` with ``a = 1 / (1 + Redshift)`` of
the header. The temperature ``T`` of the tSZ / X-ray targets is ``nT / ne`` (0 where ``ne = 0``):
the electron-density-weighted temperature, as LDL's.

Outputs are checked before anything is computed: a map path holding something we did not write,
or a directory where a file goes, is an error naming it (``--overwrite`` replaces it); the
parameter file is rewritten as LDL.py rewrites it. Maps carry BoxSize, Nmesh, the input's
redshift (and scale factor, cosmology), units, the model, the parameter file and the command.
TNG particles are checked as ``jerald make-target`` checks them (masses and abundances >= 0,
positions more than one box length outside warned about, more than ten refused) before they are
wrapped into the box.

Targets. The tSZ / X-ray targets compose LDL's output ``F`` with a second field
(:class:`jerald_nbk.model.composed.ComposedModel`, LDL's ``smoothed_residue``), and fit the
composed map to the observable:

==========  ==========================  ==========================================
target      fitted map (model)          compared with (target)
==========  ==========================  ==========================================
kSZ         ``F = n_e``                 ``n_e``
tSZ_ne      ``F * T``                   ``n_e T``  (``F`` is ``n_e``)
Xray_ne     ``F^2 * T^0.5``             ``n_e^2 T^0.5``
tSZ_T       ``F * n_e,LDL``             ``n_e T``  (``F`` is ``T``)
Xray_T      ``F^0.5 * n_e,LDL^2``       ``n_e^2 T^0.5``
==========  ==========================  ==========================================

``n_e`` is multiplied by ``--ne-scale`` (LDL: 1e5) and ``T`` by ``--T-scale`` (LDL: 1e-5) so
that values are O(1); ``n_e,LDL`` is the frozen electron-density model of ``--restore_ne`` (a
``tSZ_ne`` / ``Xray_ne`` fit). Maps written (the scalings undone): ``kSZ`` writes the ``n_e`` map
``ne_snap..._map`` and the kSZ map ``kSZ_snap..._map`` = ``n_e v_z`` (``v_z`` the mean z velocity
of the unimproved input particles per cell: FastPM's ``Velocity``, or TNG-Dark's ``Velocities``
times ``a^0.5``), ``tSZ_T`` writes ``tSZ_snap..._map`` = ``n_e T``, ``Xray_T`` writes
``Xray_snap..._map`` = ``n_e^2 T^0.5``; ``tSZ_ne`` / ``Xray_ne`` write the predicted ``n_e``
(LDL writes no map for them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .common import (
    UsageError,
    add_engine_options,
    check_option_values,
    check_outputs,
    fmt_losses,
    load_plain_or_json,
    map_path,
    mesh_of,
    read_positions,
    read_target,
    region_losses,
    run_command,
    say,
    train_config,
    write_map,
)

PROG = "jerald-ldl"
TARGETS = ("dm", "Mstar", "nHI", "kSZ", "tSZ_ne", "tSZ_T", "Xray_ne", "Xray_T")
#: (exponent of the model output, second field) of the composed targets (module docstring)
COMPOSED = {
    "tSZ_ne": (1.0, "T"),
    "Xray_ne": (2.0, "T^0.5"),
    "tSZ_T": (1.0, "ne_model"),
    "Xray_T": (0.5, "ne_model^2"),
}
#: LDL's default mesh (``--Nmesh 625``) and L-BFGS-B iterations (``options={'maxiter': 2000}``)
LDL_NMESH = 625
LDL_MAXITER = 2000
ADAM_STEPS = 500
#: the maps a target writes (``{name}_snap..._map``), when not the target's own name
MAP_NAMES = {"kSZ": ("ne", "kSZ"), "tSZ_T": ("tSZ",), "Xray_T": ("Xray",)}
#: the Adam-only options (dest names) and their flags
ADAM_ONLY = {
    "eta0": "--eta0",
    "eta_final": "--eta-final",
    "tau": "--tau",
    "checkpoint_every": "--checkpoint-every",
}


# --------------------------------------------------------------------------------------------
# LDL's TNG inputs
# --------------------------------------------------------------------------------------------

#: LDL's fields painted from a TNG snapshot: (particle type, datasets, units of the map)
LDL_FIELDS = {
    "dm": (1, ("Coordinates",), "1+delta"),
    "Mstar": (4, ("Coordinates", "Masses"), "1e10 Msun/h per cell"),
    "ne": (0, ("Coordinates", "Masses", "ElectronAbundance"), "cm^-3 (physical)"),
    "nT": (
        0,
        ("Coordinates", "Masses", "ElectronAbundance", "InternalEnergy"),
        "K cm^-3 (n_e-weighted n_e T, physical)",
    ),
    "nHI": (0, ("Coordinates", "Masses", "NeutralHydrogenAbundance"), "cm^-3 (physical)"),
}


def tng_snapshot(path, snap: int) -> list[Path] | None:
    """The HDF5 files of snapshot ``snap`` under ``path``, or None when ``path`` is no snapshot.

    Parameters
    ----------
    path : path-like
        A TNG simulation directory (LDL's ``TNG_basepath``: ``snapdir_XXX/snap_XXX.N.hdf5``) or
        the snapshot directory itself (``snap_XXX.N.hdf5`` or ``snap_XXX.hdf5`` in it).
    snap : int
        LDL's ``--snapNum``.

    Returns
    -------
    list of Path (chunk order) or None
        None when ``path`` holds no HDF5 snapshot at all (a mesh file, say).

    Raises
    ------
    ValueError
        ``path`` holds snapshots, but not snapshot ``snap`` (naming those it holds).
    """
    from ..io.snapshots import snapshot_files

    p = Path(path)
    if not p.is_dir():
        return None
    for d in (p / f"snapdir_{snap:03d}", p):
        found = sorted(d.glob(f"snap_{snap:03d}.hdf5")) + sorted(d.glob(f"snap_{snap:03d}.*.hdf5"))
        if found:
            return snapshot_files(found)
    others = sorted(x.name for x in p.glob("snapdir_*")) + sorted(x.name for x in p.glob("*.hdf5"))
    if others:
        raise ValueError(
            f"{p}: no snapshot {snap:03d} (expected snapdir_{snap:03d}/snap_{snap:03d}.N.hdf5 "
            f"or snap_{snap:03d}.hdf5; found {', '.join(others[:5])}): check --snapNum"
        )
    return None


def _comm(pm):
    if pm.comm is not None:
        return pm.comm
    from mpi4py import MPI

    return MPI.COMM_SELF


def _snapshot_rows(files, pm, ptype: int, datasets) -> tuple[dict, dict, float]:
    """This rank's rows of ``datasets`` of ``PartType{ptype}``; (columns, header, Mpc/h factor).

    Coordinates come back in Mpc/h, wrapped into the box; the snapshot's BoxSize must equal the
    model's.
    """
    from ..geometry import box_vector, wrap_positions
    from ..io.snapshots import (
        _check_rows,
        _collective,
        _length_factor,
        _my_rows,
        _read_rows,
        read_headers,
    )
    from ..train.validate import check_same_box

    comm = _comm(pm)
    heads = read_headers(files)
    h0 = heads[0]
    length, _ = _length_factor(h0, "auto")
    box = box_vector(h0["BoxSize"], f"snapshot {files[0]}: Header/BoxSize") * length
    try:
        check_same_box(
            {"BoxSize": pm.BoxSize}, "the model", {"BoxSize": box}, f"snapshot {files[0]}"
        )
    except ValueError as err:
        raise ValueError(f"{err} (set the box size with --BoxSize)") from None
    counts = np.array([int(h["NumPart_ThisFile"][ptype]) for h in heads], dtype=np.int64)
    shares = _my_rows(counts, comm.rank, comm.size)
    cols = _collective(comm, _read_rows, files, heads, ptype, tuple(datasets), shares)
    pos = cols["Coordinates"].reshape(-1, 3) * length
    # masses and abundances >= 0, positions at most ten box lengths out, before wrapping
    signed = {k: v for k, v in cols.items() if k not in ("Coordinates", "Velocities")}
    _check_rows(pos, signed.pop("Masses", np.zeros(0)), signed, box, files, ptype, comm)
    cols["Coordinates"] = wrap_positions(
        np.asarray(pos, dtype=np.float64), box, f"snapshot {files[0]}"
    )
    return cols, h0, length


def tng_particles(files, pm, velocity: bool = False):
    """TNG-Dark particles as LDL's input: this rank's ``PartType1`` positions (and ``v_z``).

    Parameters
    ----------
    files : list of Path
        The snapshot (:func:`tng_snapshot`).
    pm : ParticleMesh
    velocity : bool
        Also return ``Velocities[:, 2] * a^0.5`` (km/s, peculiar; LDL's kSZ velocity).

    Returns
    -------
    pos : (N, 3) JAX array (Mpc/h, in the engine's dtype)
    vz : numpy array or None
    redshift : float
    """
    import jax.numpy as jnp

    from ..train.validate import check_particles

    names = ("Coordinates", "Velocities") if velocity else ("Coordinates",)
    cols, h0, _ = _snapshot_rows(files, pm, 1, names)
    pos = jnp.asarray(cols["Coordinates"].astype(pm.dtype))
    check_particles(pos, pm, f"snapshot {files[0]}: PartType1/Coordinates")
    z = float(h0["Redshift"])
    vz = None
    if velocity:
        vz = (cols["Velocities"].reshape(-1, 3)[:, 2] * (1.0 / (1.0 + z)) ** 0.5).astype(pm.dtype)
    return pos, vz, z


def tng_map(files, field: str, pm, X: float = 0.76):
    """LDL's target field painted from a TNG snapshot, on the engine's local mesh.

    LDL's own cached map ``{field}map_Nmesh{N}`` next to the snapshot files (bigfile, dataset
    ``Field``, as its ``load_TNG_map`` saves it) is read instead when it exists.

    Parameters
    ----------
    files : list of Path
        The snapshot (:func:`tng_snapshot`).
    field : {"dm", "Mstar", "ne", "nT", "nHI"}
        See the module docstring (:data:`LDL_FIELDS`).
    pm : ParticleMesh
    X : float
        Hydrogen mass fraction (LDL: 0.76).

    Returns
    -------
    real mesh (this rank's part, in the engine's dtype)
    """
    import jax.numpy as jnp

    from ..io.snapshots import GADGET_UNITS, MPC_CM, PROTON_MASS_G, paint_slab, temperature
    from ..train.validate import check_target

    cache = files[0].parent / f"{field}map_Nmesh{pm.Nmesh[0]}"
    if (cache / "Field").exists():
        local, _ = read_target(cache, pm, field)
        return local
    ptype, datasets, _ = LDL_FIELDS[field]
    cols, h0, _ = _snapshot_rows(files, pm, ptype, datasets)
    comm = _comm(pm)
    pos = cols["Coordinates"]
    nmesh = np.asarray(pm.Nmesh)
    if field == "dm":
        weight = np.ones(len(pos))
    elif field == "Mstar":
        weight = cols["Masses"]
    else:
        frac = cols["NeutralHydrogenAbundance" if field == "nHI" else "ElectronAbundance"]
        weight = X * cols["Masses"] * frac
        if field == "nT":
            unit_vel = float(
                h0.get("UnitVelocity_in_cm_per_s", GADGET_UNITS["UnitVelocity_in_cm_per_s"])
            )
            weight = weight * temperature(cols["InternalEnergy"], frac, X, unit_vel)
    # each rank paints its share of the particles onto its own slab (no rank holds the map)
    slab, where = paint_slab(pos, weight, nmesh, pm.BoxSize, comm)
    mine = pm.local_slices("real") if hasattr(pm, "local_slices") else None
    bounds = [[(int(s.start or 0), int(s.stop)) for s in sl] for sl in (where, mine or where)]
    if bounds[0] != bounds[1]:
        raise RuntimeError(
            f"the painted slab {bounds[0]} is not the engine's local mesh {bounds[1]}"
        )
    npart = comm.allreduce(len(pos))
    if field == "dm":
        slab = slab * (nmesh.prod() / max(npart, 1))
    elif field != "Mstar":
        hubble, z = float(h0["HubbleParam"]), float(h0["Redshift"])
        unit_mass = float(h0.get("UnitMass_in_g", GADGET_UNITS["UnitMass_in_g"]))
        cell_cm = pm.BoxSize / nmesh * MPC_CM / hubble / (1.0 + z)
        slab = slab * (unit_mass / hubble) / PROTON_MASS_G / np.prod(cell_cm)
    local = jnp.asarray(np.asarray(slab, dtype=pm.dtype))
    check_target(local, pm, field, f"{field} painted from snapshot {files[0]}")
    return local


# --------------------------------------------------------------------------------------------
# jerald-ldl
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``jerald-ldl`` argument parser (LDL.py's options, then jerald-nbk's)."""
    ap = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "LDL (Dai & Seljak) with LDL.py's options and files, on the jerald-nbk engine.\n\n"
            "As LDL.py: L-BFGS-B inside LDL's bounds (default; --optimizer adam trains with the "
            "paper's Adam instead), the parameters with the best validation loss kept; "
            "TNG-Dark particles are the input when --FastPMpath is absent; --TNGpath and "
            "--TNGDarkpath are TNG directories (snapdir_XXX/snap_XXX.N.hdf5) painted as LDL "
            "paints them (or mesh files). Differences: the box size is an option (--BoxSize, "
            "LDL hard-codes 205 Mpc/h); --evaluateOnly infers the layers from the file's length."
        ),
        epilog=(
            "Files: parameters are plain text (np.savetxt; per layer alpha, gamma, kh, kl, n, then "
            "mu, b1, b0) named {target}_snap{snap:03d}_Nmesh{N}_Nstep{S}_n{n:.2f}_bestparam.txt in "
            "--save, rewritten whenever the validation loss improves; the map is ..._map next to "
            "it (kSZ: ne_snap..._map and kSZ_snap..._map; tSZ_T: tSZ_snap..._map; Xray_T: "
            "Xray_snap..._map). Losses per evaluation (or Adam step) go to ..._train/. Composed "
            "tSZ/X-ray targets: see the module docstring of jerald_nbk.cli.ldl."
        ),
    )
    ap.add_argument("--target", choices=TARGETS, default="Mstar", help="target field (LDL's)")
    ap.add_argument(
        "--FastPMpath",
        help="FastPM particles: bigfile catalog with Position (and Velocity for kSZ); "
        "without it the TNG-Dark particles of --TNGDarkpath are the input (as LDL)",
    )
    ap.add_argument(
        "--improveFastPM",
        help="DM parameter file (LDL plain text, 5*Nstep values, or jerald JSON) that improves "
        "the FastPM particles first (needs --FastPMpath)",
    )
    ap.add_argument(
        "--TNGpath",
        nargs="+",
        metavar="PATH",
        help="the hydro target: a TNG directory (snapdir_XXX/snap_XXX.N.hdf5; the fields are "
        "painted as LDL paints them), or mesh file(s) (bigfile or .npy): Mstar, nHI: the map; "
        "kSZ: the n_e map; tSZ_*, Xray_*: the n_e map then the (n_e-weighted) temperature map",
    )
    ap.add_argument(
        "--TNGDarkpath",
        help="TNG-Dark directory: the input particles without --FastPMpath, and the target of "
        "--target dm (or a mesh file of 1+delta for --target dm)",
    )
    ap.add_argument(
        "--snapNum",
        type=int,
        default=99,
        help="snapshot number of the TNG directories, also in the file names (default 99)",
    )
    ap.add_argument(
        "--Nmesh",
        type=int,
        help=f"mesh resolution (default: the target map file's, else {LDL_NMESH} as LDL)",
    )
    ap.add_argument(
        "--Nstep",
        type=int,
        default=None,
        help="displacement layers (default 2; with --restore, inferred from the file)",
    )
    ap.add_argument("--n", type=float, default=1.0, help="smoothing exponent n (eq 11; default 1)")
    ap.add_argument("--save", required=True, help="output directory")
    ap.add_argument(
        "--restore", help="parameter file to start from; with --evaluateOnly, the one to evaluate"
    )
    ap.add_argument(
        "--restore_ne",
        help="the n_e fit (tSZ_ne / Xray_ne parameter file) that tSZ_T / Xray_T compose with",
    )
    ap.add_argument(
        "--evaluateOnly",
        action="store_true",
        help="no training: paint the map of --restore, write it, report losses if targets are given",
    )
    ap.add_argument(
        "--BoxSize", type=float, default=205.0, help="box size in Mpc/h (default 205, LDL's)"
    )
    ap.add_argument(
        "--optimizer",
        choices=["lbfgsb", "adam"],
        default="lbfgsb",
        help="L-BFGS-B inside LDL's bounds (default, as LDL) or Adam with the eq-16 schedule",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"L-BFGS-B iterations (default {LDL_MAXITER}, LDL's maxiter) or Adam steps "
        f"(default {ADAM_STEPS})",
    )
    ap.add_argument("--ne-scale", type=float, default=1e5, help="n_e multiplier (LDL: 1e5)")
    ap.add_argument(
        "--T-scale", type=float, default=1e-5, help="temperature multiplier (LDL: 1e-5)"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="--optimizer adam: continue from the checkpoint in ..._train/",
    )
    add_engine_options(ap, adam_defaults=False)
    return ap


def ldl_stem(target: str, snap: int, nmesh: int, nstep: int, n: float) -> str:
    """LDL.py's file stem: ``{target}_snap{snap:03d}_Nmesh{N}_Nstep{S}_n{n:.2f}``."""
    return f"{target}_snap{snap:03d}_Nmesh{nmesh}_Nstep{nstep}_n{n:.2f}"


def _check_options(args) -> None:
    """Options that cannot go together, or would be ignored, are usage errors."""
    from .common import ADAM_DEFAULTS

    t = args.target
    check_option_values(args)
    if args.optimizer == "lbfgsb":
        given = [flag for dest, flag in ADAM_ONLY.items() if getattr(args, dest) is not None]
        if args.resume:
            given.append("--resume")
        if given:
            raise UsageError(
                f"{', '.join(given)} only apply to --optimizer adam (L-BFGS-B, the default, has "
                "no schedule or checkpoints; restart it from the best parameters with --restore)"
            )
    for dest, value in ADAM_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.steps is None:
        args.steps = LDL_MAXITER if args.optimizer == "lbfgsb" else ADAM_STEPS
    if not args.FastPMpath:
        if t == "dm":
            raise UsageError(
                "--target dm improves FastPM particles: it needs --FastPMpath (LDL.py asserts it)"
            )
        if args.improveFastPM:
            raise UsageError("--improveFastPM improves FastPM particles: it needs --FastPMpath")
        if not args.TNGDarkpath:
            raise UsageError(
                "no input particles: give --FastPMpath, or --TNGDarkpath (a TNG-Dark directory)"
            )
    if t in ("tSZ_T", "Xray_T") and not args.restore_ne:
        raise UsageError(
            f"--target {t} needs --restore_ne (the n_e parameter file of the first fit)"
        )
    if args.restore_ne and t not in ("tSZ_T", "Xray_T"):
        raise UsageError("--restore_ne applies to --target tSZ_T and Xray_T only")
    if args.evaluateOnly and not args.restore:
        raise UsageError("--evaluateOnly needs --restore (the parameter file to evaluate)")


class _Sources:
    """Where the target fields come from: a TNG snapshot (files) or mesh files, per role."""

    def __init__(self, args):
        t, snap = args.target, args.snapNum
        self.dark_files = tng_snapshot(args.TNGDarkpath, snap) if args.TNGDarkpath else None
        tng = list(args.TNGpath or [])
        self.hydro_files = tng_snapshot(tng[0], snap) if tng else None
        if self.hydro_files is not None and len(tng) > 1:
            raise UsageError(f"--TNGpath: one TNG directory, got {len(tng)} paths")
        self.meshes: list = []  # mesh files of the target, in the order the target uses them
        if t == "dm":
            if not args.TNGDarkpath and self.hydro_files is not None:
                raise UsageError("--target dm: its target is TNG-Dark's: --TNGDarkpath DIR")
            if args.TNGDarkpath and self.dark_files is None:
                self.meshes = [args.TNGDarkpath]
            elif not args.TNGDarkpath and tng and self.hydro_files is None:
                self.meshes = tng[:1]  # a 1+delta mesh passed as --TNGpath
            self.given = bool(args.TNGDarkpath or tng)
        else:
            if tng and self.hydro_files is None:
                want = 1 if t in ("Mstar", "nHI", "kSZ") else 2
                what = "the target map" if want == 1 else "the n_e map and the temperature map"
                if len(tng) != want:
                    raise UsageError(
                        f"--target {t} needs {what}: --TNGpath with {want} mesh file(s) or one "
                        f"TNG directory, got {len(tng)}"
                    )
                self.meshes = tng
            self.given = bool(tng)
        if args.TNGDarkpath and self.dark_files is None and not args.FastPMpath:
            raise UsageError(
                f"--TNGDarkpath {args.TNGDarkpath} is not a TNG directory (no "
                f"snapdir_{snap:03d}/snap_{snap:03d}.N.hdf5): without --FastPMpath it must "
                "hold the input particles"
            )
        if not self.given and not args.evaluateOnly:
            need = "--TNGDarkpath" if t == "dm" else "--TNGpath"
            raise UsageError(f"--target {t} needs its target for training: {need}")


def _targets(args, src: _Sources, pm):
    """(target, field2 of the *_ne targets, source of the initial b1) on the local mesh."""
    import jax.numpy as jnp

    t = args.target
    if not src.given:
        return None, None, None

    def field(name, mesh_index, kind, scale=1.0):
        if src.meshes:
            local, _ = read_target(src.meshes[mesh_index], pm, kind, scale)
            return local
        files = src.dark_files if t == "dm" else src.hydro_files
        return tng_map(files, name, pm) / scale

    if t == "dm":
        return field("dm", 0, "dm"), None, None
    if t in ("Mstar", "nHI"):
        target = field(t, 0, "stellar" if t == "Mstar" else "nHI")
        return target, None, target
    ne = field("ne", 0, "n_e", 1.0 / args.ne_scale)
    if t == "kSZ":
        return ne, None, ne
    if src.meshes:
        temp, _ = read_target(src.meshes[1], pm, "temperature", 1.0 / args.T_scale)
    else:  # LDL: T = nT / ne, the electron-density-weighted temperature (0 where ne = 0)
        nt = tng_map(src.hydro_files, "nT", pm)
        ne_phys = ne / args.ne_scale
        pos_ne = ne_phys > 0
        temp = jnp.where(pos_ne, nt / jnp.where(pos_ne, ne_phys, 1.0), 0.0) * args.T_scale
    target = ne * temp if t.startswith("tSZ") else ne**2 * jnp.sqrt(temp)
    field2 = None
    if t.endswith("_ne"):
        field2 = temp if t == "tSZ_ne" else jnp.sqrt(temp)
    return target, field2, ne if t.endswith("_ne") else temp


def cmd_ldl(args) -> int:
    """Run ``jerald-ldl`` (train or evaluate one LDL target); see the module docstring."""
    import jax.numpy as jnp

    from .. import workflow as wf
    from ..io.paramfiles import save_plaintext
    from ..model.composed import ComposedModel, safe_power
    from ..model.params import ldl_table
    from ..model.pipeline import Stage, StageConfig
    from ..utils import atomic_write, root_only

    t = args.target
    _check_options(args)
    if args.dtype == "f8":  # before any JAX array exists
        import jax

        jax.config.update("jax_enable_x64", True)
    src = _Sources(args)

    # the mesh: from the first target mesh file, else --Nmesh (LDL's 625 by default)
    if src.meshes:
        nmesh, _ = mesh_of(src.meshes[0])
        if args.Nmesh is not None and (args.Nmesh,) * 3 != nmesh:
            raise ValueError(f"map {src.meshes[0]}: Nmesh {list(nmesh)} != --Nmesh {args.Nmesh}")
    else:
        nmesh = (args.Nmesh or LDL_NMESH,) * 3
    pm = wf.engine(nmesh, args.BoxSize, args.dtype, args.backend)
    order, green = 4, "gaussian"
    stage_target = "dm" if t == "dm" else "stellar"

    # parameter files first (cheap, and bad ones must fail before anything is written)
    restored = None
    if args.restore:
        restored = load_plain_or_json(
            args.restore, stage_target, "ldl", pm, order, green, args.Nstep
        )
    nstep = restored[0].config.n_layers if restored else (args.Nstep or 2)
    out = Path(args.save)
    stem = ldl_stem(t, args.snapNum, nmesh[0], nstep, args.n)
    ppath = out / f"{stem}_bestparam.txt"
    train_outputs = not args.evaluateOnly
    check_outputs(
        pm.comm,
        out,
        "--save",
        maps=[
            map_path(out / f"{ldl_stem(name, args.snapNum, nmesh[0], nstep, args.n)}_map",
                     args.map_format)
            for name in MAP_NAMES.get(t, (t,))
        ],
        files=[ppath] if train_outputs else [],
        train_dir=out / f"{stem}_train" if train_outputs else None,
        overwrite=args.overwrite,
    )  # fmt: skip
    improve = ne_stage = None
    if args.improveFastPM:
        improve = load_plain_or_json(args.improveFastPM, "dm", "ldl", pm, order, green)
    if t in ("tSZ_T", "Xray_T"):
        ne_stage = load_plain_or_json(args.restore_ne, "stellar", "ldl", pm, order, green)

    # inputs: FastPM particles (improved), else TNG-Dark particles
    vel = None
    if args.FastPMpath:
        try:
            pos, cattrs, ds = read_positions(args.FastPMpath, pm, args.dataset)
        except ValueError as err:
            if "BoxSize" in str(err):
                raise ValueError(f"{err} (set the box size with --BoxSize)") from None
            raise
        redshift = cattrs.get("redshift")
        source_attrs = cattrs
        if t == "kSZ":
            from ..io import read_catalog

            cols, _ = read_catalog(args.FastPMpath, ("Velocity",), dataset=ds, comm=pm.comm)
            vel = np.asarray(cols["Velocity"], dtype=pm.dtype)[:, 2]
    else:
        pos, vel, redshift = tng_particles(src.dark_files, pm, velocity=t == "kSZ")
        source_attrs = {"redshift": redshift}
    raw_pos = pos
    if improve is not None:
        say(pm, f"[{PROG}] improving the particles with {args.improveFastPM}")
        pos = improve[0].displace(pos, improve[1])
    ne_model = None
    if ne_stage is not None:
        ne_model = ne_stage[0].forward(pos, ne_stage[1])

    target, field2, w_src = _targets(args, src, pm)
    if t in ("tSZ_T", "Xray_T"):
        field2 = ne_model if t == "tSZ_T" else ne_model**2

    # the model: LDL's start (b1 = sum(target) / Nparticles) and LDL's bounds
    index = COMPOSED.get(t, (1.0, None))[0]
    w_init = 1.0
    if t != "dm" and w_src is not None:
        w_init = float(pm.sum(w_src)) / pm.count(pos)
    config = StageConfig(stage_target, nstep, order, False, green)
    if restored is not None and restored[0].config != config:
        config = restored[0].config  # a JSON file with its own configuration
    specs = ldl_table(stage_target, config.n_layers, pm.Nmesh, pm.BoxSize, w_init)
    model = ComposedModel(Stage(pm, config, w_init=w_init), index, field2, specs)
    cfg = train_config(args, args.n, "ldl")

    if args.evaluateOnly:
        raw = restored[1]
        if target is not None:
            losses = region_losses(pm, model, pos, target, cfg, raw)
            say(pm, f"[{PROG}] {t} losses of {args.restore}: {fmt_losses(losses)}")
        else:
            say(pm, f"[{PROG}] no target given: map written without losses")
    else:
        raw0 = restored[1] if restored is not None else None
        workdir = out / f"{stem}_train"
        prov = {
            "command": " ".join([PROG, *sys.argv[1:]]),
            "ldl_target": t,
            "optimizer": args.optimizer,
            "FastPMpath": args.FastPMpath,
            "improveFastPM": args.improveFastPM,
            "TNGpath": args.TNGpath,
            "TNGDarkpath": args.TNGDarkpath,
            "restore": args.restore,
            "restore_ne": args.restore_ne,
            "redshift": redshift,
        }
        if args.optimizer == "lbfgsb":
            res = _fit_lbfgsb(pm, model, pos, target, cfg, raw0, args, ppath)
        else:
            say(pm, f"[{PROG}] training {t} ({nstep} layers, {args.steps} Adam steps) -> {workdir}")
            res = wf.fit_stage(
                model,
                pos,
                target,
                workdir,
                cfg,
                raw0,
                provenance=prov,
                resume=args.resume,
                overwrite=args.overwrite,
            ).result
        raw = res.best_raw
        say(
            pm,
            f"[{PROG}] best validation loss at step {res.best_step}: {fmt_losses(res.best_losses)}",
        )
        with root_only(pm.comm, f"writing {ppath}") as root:
            if root:
                save_plaintext(ppath, model.config, raw, flavour="ldl")
                if args.optimizer == "lbfgsb":
                    workdir.mkdir(parents=True, exist_ok=True)
                    with atomic_write(workdir / "metrics.jsonl") as fh:
                        fh.write("".join(json.dumps(rec) + "\n" for rec in res.history))
        say(pm, f"[{PROG}] parameters: {ppath}")

    # the maps LDL.py writes
    F = model.base(pos, raw)
    from ..io.meshes import inherited_attrs

    attrs = {
        **inherited_attrs(source_attrs),
        "target": t,
        "parameters": str(args.restore if args.evaluateOnly else ppath),
        "model": f"LDL (Dai & Seljak), {PROG} of jerald_nbk",
        "command": " ".join([PROG, *sys.argv[1:]]),
        "BoxSize_units": "Mpc/h",
    }
    maps = []
    if t == "kSZ":
        ne = F / args.ne_scale
        maps.append(("ne", ne, "n_e (the target's units)"))
        # v_z: mean z velocity of the (unimproved) input particles per cell, as LDL.py does
        ones = pm.paint(raw_pos)
        vz = pm.paint(raw_pos, jnp.asarray(vel))
        vz = jnp.where(ones > 0, vz / jnp.where(ones > 0, ones, 1.0), 0.0)
        maps.append(("kSZ", ne * vz, "n_e * v_z (n_e in the target's units, v_z in km/s)"))
    elif t in ("tSZ_ne", "Xray_ne"):
        maps.append((t, F / args.ne_scale, "n_e (the target's units)"))
    elif t == "tSZ_T":
        maps.append(("tSZ", F * ne_model / (args.ne_scale * args.T_scale), "n_e T"))
    elif t == "Xray_T":
        xray = safe_power(F / args.T_scale, 0.5) * (ne_model / args.ne_scale) ** 2
        maps.append(("Xray", xray, "n_e^2 T^0.5"))
    else:
        maps.append((t, F, {"dm": "1+delta"}.get(t, "the target's units")))
    for name, local, units in maps:
        path = out / f"{ldl_stem(name, args.snapNum, nmesh[0], nstep, args.n)}_map"
        mpath = write_map(
            pm, local, path, attrs | {"units": units}, args.map_format, args.overwrite
        )
        say(pm, f"[{PROG}] map: {mpath}")
    return 0


def _fit_lbfgsb(pm, model, pos, target, cfg, raw0, args, ppath):
    """L-BFGS-B as LDL runs it; the best parameters are rewritten as they improve."""
    from ..io.paramfiles import save_plaintext
    from ..train.lbfgs import fit_lbfgsb
    from ..train.loop import Objective
    from ..utils import root_only

    obj = Objective(model, pos, target, cfg)

    def on_best(raw, step, losses):
        with root_only(pm.comm, f"writing {ppath}") as root:
            if root:
                save_plaintext(ppath, model.config, raw, flavour="ldl")

    say(
        pm,
        f"[{PROG}] training {args.target} ({model.config.n_layers} layers, L-BFGS-B, at most "
        f"{args.steps} iterations) -> {ppath}",
    )
    return fit_lbfgsb(obj, raw0, maxiter=args.steps, on_best=on_best, progress=not args.quiet)


def main(argv=None) -> int:
    """Entry point of ``jerald-ldl``."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, cmd_ldl, args)


if __name__ == "__main__":
    sys.exit(main())
