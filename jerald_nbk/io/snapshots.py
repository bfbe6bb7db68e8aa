"""Gadget / AREPO / IllustrisTNG HDF5 snapshots -> target maps on a mesh (CIC).

Layout read (one file, or chunks ``snap_XXX.0.hdf5 ... snap_XXX.{n-1}.hdf5``):

* ``Header`` attributes: ``BoxSize``, ``NumPart_ThisFile``, ``NumPart_Total`` (and
  ``NumPart_Total_HighWord``), ``NumFilesPerSnapshot``, ``Redshift``, ``MassTable``,
  ``HubbleParam``; optional ``UnitLength_in_cm``, ``UnitMass_in_g``, ``UnitVelocity_in_cm_per_s``
  (Gadget defaults otherwise: kpc/h, 1e10 Msun/h, km/s);
* ``PartType0`` (gas): ``Coordinates``, ``Masses``, ``NeutralHydrogenAbundance``,
  ``ElectronAbundance``, ``InternalEnergy`` (``Density`` is not needed: CIC paints masses);
* ``PartType1`` (DM): ``Coordinates``; mass ``MassTable[1]`` (``Masses`` if that is 0);
* ``PartType4`` (stars): ``Coordinates``, ``Masses``.

Fields (``X = 0.76`` the hydrogen mass fraction, ``m_p`` the proton mass, ``a = 1/(1+z)``, ``h`` =
``HubbleParam``, ``V_cell`` the *physical* cell volume ``prod(BoxSize_i / Nmesh_i) (a Mpc / h)^3``
in cm^3, ``m`` particle masses converted to grams ``m_code UnitMass_in_g / h``):

* ``dm``, ``gas``: ``1 + delta`` = CIC mass per cell / mean mass per cell;
* ``stellar``: stellar mass per cell in 1e10 Msun/h (the code unit, not converted);
* ``nHI``: ``sum_p W X m_p' f_HI,p / m_p / V_cell`` in cm^-3 (``f_HI`` =
  ``NeutralHydrogenAbundance``, the neutral fraction of hydrogen), i.e. HI atoms per physical cm^3;
* ``ne``: ``sum_p W X m_p' x_e,p / m_p / V_cell`` in cm^-3 (``x_e`` = ``ElectronAbundance`` =
  n_e / n_H);
* ``T``: mass-weighted temperature in K, ``sum W m T / sum W m`` (0 in cells without gas), with
  ``T = (gamma - 1) u mu m_p / k_B``, ``gamma = 5/3``, ``u`` = ``InternalEnergy`` x
  ``UnitVelocity^2`` (erg/g) and ``mu = 4 / (1 + 3 X + 4 X x_e)`` (mean molecular weight in m_p;
  the IllustrisTNG documentation's formula).

Masses and weights are painted in code units in float64 and converted afterwards (a per-particle
number of atoms would overflow float32).

Lengths: coordinates and ``BoxSize`` are converted to Mpc/h. ``units="auto"`` uses
``UnitLength_in_cm`` when the header has it, otherwise ``BoxSize > 3000`` means kpc/h (hydro
boxes in Mpc/h are smaller than 3 Gpc/h, and boxes in kpc/h larger than 3 Mpc/h); pass
``units`` to be explicit.

MPI: rank 0 reads the headers (small) and broadcasts them; each rank then reads only its
contiguous share of the rows of the concatenated chunks (whole files when there are many, parts
of files when there are few), paints with pmesh, and rank 0 assembles the mesh.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..geometry import box_vector, mesh_vector, wrap_positions

__all__ = [
    "FIELDS",
    "make_target",
    "target_slab",
    "write_target",
    "snapshot_files",
    "read_headers",
]

#: physical constants (cgs)
PROTON_MASS_G = 1.67262192e-24
BOLTZMANN_ERG_K = 1.380649e-16
MPC_CM = 3.085677581e24
#: hydrogen mass fraction (primordial)
X_H = 0.76
#: adiabatic index of a monatomic ideal gas
GAMMA = 5.0 / 3.0
#: Gadget's default code units (when the header does not record them)
GADGET_UNITS = {
    "UnitLength_in_cm": 3.085677581e21,  # kpc/h
    "UnitMass_in_g": 1.989e43,  # 1e10 Msun/h
    "UnitVelocity_in_cm_per_s": 1e5,  # km/s
}
#: a header BoxSize above this is taken to be in kpc/h (units="auto", no UnitLength_in_cm)
KPC_THRESHOLD = 3000.0

#: particle type, datasets and units of each field
FIELDS = {
    "dm": (1, ("Coordinates",), "1+delta (DM mass)"),
    "gas": (0, ("Coordinates", "Masses"), "1+delta (gas mass)"),
    "stellar": (4, ("Coordinates", "Masses"), "1e10 Msun/h per cell"),
    "nHI": (0, ("Coordinates", "Masses", "NeutralHydrogenAbundance"), "cm^-3 (physical)"),
    "ne": (0, ("Coordinates", "Masses", "ElectronAbundance"), "cm^-3 (physical)"),
    "T": (0, ("Coordinates", "Masses", "InternalEnergy", "ElectronAbundance"), "K, mass-weighted"),
}

FORMULAS = {
    "dm": "CIC(m) / mean(CIC(m)), m = MassTable[1] or PartType1/Masses",
    "gas": "CIC(m) / mean(CIC(m)), m = PartType0/Masses",
    "stellar": "CIC(m), m = PartType4/Masses in 1e10 Msun/h",
    "nHI": "CIC(X m f_HI) / m_p / V_cell, X = {X}, m in g (m_code UnitMass_in_g / h), "
    "V_cell physical (a = 1/(1+z)), f_HI = NeutralHydrogenAbundance",
    "ne": "CIC(X m x_e) / m_p / V_cell, X = {X}, x_e = ElectronAbundance (n_e/n_H)",
    "T": "CIC(m T) / CIC(m), T = (gamma-1) u mu m_p / k_B, gamma = 5/3, mu = 4/(1+3X+4X x_e), "
    "X = {X}, u = InternalEnergy UnitVelocity^2",
}


class SnapshotError(ValueError):
    """A snapshot file that cannot be used (missing group/dataset, truncated, inconsistent)."""


# --------------------------------------------------------------------------------------------
# files and headers


def snapshot_files(paths) -> list[Path]:
    """The chunk files of a snapshot, in chunk order.

    Parameters
    ----------
    paths : path, glob pattern, directory, or sequence of paths
        A single file (``snap_033.hdf5``); one chunk (``snap_033.0.hdf5``: its siblings
        ``snap_033.N.hdf5`` are found); a directory (every ``*.hdf5`` in it); a glob pattern; or
        an explicit list.

    Returns
    -------
    list of Path, sorted by chunk number.
    """
    if isinstance(paths, str | Path):
        p = Path(paths)
        if p.is_dir():
            files = sorted(p.glob("*.hdf5"))
        elif any(c in str(paths) for c in "*?["):
            files = [Path(f) for f in glob.glob(str(paths))]
        else:
            m = re.match(r"^(.*)\.(\d+)\.hdf5$", p.name)
            files = sorted(p.parent.glob(f"{m.group(1)}.*.hdf5")) if m else [p]
            files = [f for f in files if re.match(r"^.*\.\d+\.hdf5$", f.name)] if m else files
    else:
        files = [Path(f) for f in paths]
    if not files:
        raise FileNotFoundError(f"no snapshot files match {paths}")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"snapshot file {f} does not exist")

    def chunk(f):
        m = re.match(r"^.*\.(\d+)\.hdf5$", f.name)
        return (int(m.group(1)) if m else -1, str(f))

    return sorted(set(files), key=chunk)


def _open(path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise SnapshotError(
            f"snapshot file {path}: cannot open as HDF5 (truncated or corrupt?): {err}"
        ) from err


def _header(path) -> dict:
    with _open(path) as fh:
        if "Header" not in fh:
            raise SnapshotError(f"snapshot file {path}: no 'Header' group")
        head = {k: np.asarray(v) for k, v in fh["Header"].attrs.items()}
        groups = sorted(k for k in fh.keys() if k.startswith("PartType"))
    for key in ("BoxSize", "NumPart_ThisFile", "Redshift", "MassTable", "HubbleParam"):
        if key not in head:
            raise SnapshotError(f"snapshot file {path}: Header has no attribute {key!r}")
    head["_groups"] = groups
    return head


def read_headers(files: Sequence[Path]) -> list[dict]:
    """Headers of all chunks, checked for consistency.

    Raises
    ------
    SnapshotError
        Missing Header attributes, chunks with different BoxSize / Redshift / HubbleParam, a
        chunk count that disagrees with ``NumFilesPerSnapshot``, or per-file counts that do not
        add up to ``NumPart_Total``.
    """
    heads = [_header(f) for f in files]
    h0 = heads[0]
    for f, h in zip(files[1:], heads[1:], strict=True):
        for key in ("BoxSize", "Redshift", "HubbleParam"):
            if not np.allclose(h[key], h0[key], rtol=1e-10):
                raise SnapshotError(
                    f"snapshot chunks disagree on {key}: {files[0]} has {h0[key].tolist()}, "
                    f"{f} has {h[key].tolist()}"
                )
    nfiles = int(h0.get("NumFilesPerSnapshot", len(files)))
    if nfiles != len(files):
        raise SnapshotError(
            f"snapshot {files[0]}: Header NumFilesPerSnapshot = {nfiles}, but {len(files)} "
            f"chunk file(s) were found ({', '.join(str(f) for f in files)})"
        )
    if "NumPart_Total" in h0:
        total = h0["NumPart_Total"].astype(np.int64)
        if "NumPart_Total_HighWord" in h0:
            total = total + (h0["NumPart_Total_HighWord"].astype(np.int64) << 32)
        found = np.sum([h["NumPart_ThisFile"].astype(np.int64) for h in heads], axis=0)
        if not np.array_equal(found, total):
            raise SnapshotError(
                f"snapshot {files[0]}: NumPart_Total {total.tolist()} but the chunks hold "
                f"{found.tolist()} particles"
            )
    return heads


def _length_factor(head: dict, units: str) -> tuple[float, str]:
    """Factor from coordinate units to Mpc/h, and the name of the input units."""
    if units == "kpc/h":
        return 1e-3, units
    if units == "Mpc/h":
        return 1.0, units
    if units != "auto":
        raise ValueError(f"units must be 'kpc/h', 'Mpc/h' or 'auto', got {units!r}")
    if "UnitLength_in_cm" in head:
        f = float(head["UnitLength_in_cm"]) / MPC_CM
        if np.isclose(f, 1e-3, rtol=1e-3):
            return 1e-3, "kpc/h"
        if np.isclose(f, 1.0, rtol=1e-3):
            return 1.0, "Mpc/h"
        return f, f"{float(head['UnitLength_in_cm']):.6g} cm/h"
    box = float(np.max(head["BoxSize"]))
    return (1e-3, "kpc/h") if box > KPC_THRESHOLD else (1.0, "Mpc/h")


# --------------------------------------------------------------------------------------------
# reading each rank's rows


def _my_rows(counts: np.ndarray, rank: int, size: int) -> list[tuple[int, int, int]]:
    """``(file index, start, stop)`` of this rank's share of the concatenated rows."""
    total = int(counts.sum())
    lo, hi = total * rank // size, total * (rank + 1) // size
    out = []
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for i, n in enumerate(counts):
        a, b = max(lo, offsets[i]), min(hi, offsets[i] + n)
        if b > a:
            out.append((i, int(a - offsets[i]), int(b - offsets[i])))
    return out


def _read_rows(files, heads, ptype: int, datasets, shares) -> dict:
    """Read ``datasets`` of ``PartType{ptype}`` for this rank's row ranges (float64)."""
    group = f"PartType{ptype}"
    cols: dict[str, list] = {d: [] for d in datasets}
    for i, start, stop in shares:
        path = files[i]
        with _open(path) as fh:
            if group not in fh:
                raise SnapshotError(
                    f"snapshot file {path}: no group {group!r} although its header counts "
                    f"{stop - start}+ particles of type {ptype}"
                )
            for d in datasets:
                if d not in fh[group]:
                    raise SnapshotError(
                        f"snapshot file {path}: {group} has no dataset {d!r} "
                        f"(found: {sorted(fh[group].keys())})"
                    )
                try:
                    cols[d].append(np.asarray(fh[group][d][start:stop], dtype=np.float64))
                except OSError as err:
                    raise SnapshotError(
                        f"snapshot file {path}: cannot read {group}/{d} (truncated?): {err}"
                    ) from err
    out = {}
    for d, parts in cols.items():
        width = 3 if d == "Coordinates" else None
        empty = np.zeros((0, 3) if width else (0,))
        out[d] = np.concatenate(parts) if parts else empty
    return out


def _collective(comm, fn, *args):
    """Run ``fn`` on every rank; if any rank fails, raise the first failure on every rank."""
    try:
        result, err = fn(*args), None
    except (OSError, ValueError, KeyError) as exc:
        result, err = None, exc
    errors = comm.allgather(None if err is None else (type(err).__name__, str(err)))
    bad = [e for e in errors if e is not None]
    if bad:
        if err is not None:
            raise err
        name, msg = bad[0]
        raise (SnapshotError if name == "SnapshotError" else RuntimeError)(msg)
    return result


def _root_call(comm, fn, *args):
    """Run ``fn`` on rank 0 and broadcast its result (or its error) to every rank."""
    res = err = None
    if comm.rank == 0:
        try:
            res = fn(*args)
        except (OSError, ValueError, KeyError) as exc:
            err = exc
    res, err_msg = comm.bcast((res, None if err is None else (type(err), str(err))), root=0)
    if err is not None:
        raise err
    if err_msg is not None:
        raise err_msg[0](err_msg[1])
    return res


# --------------------------------------------------------------------------------------------
# the maps


def make_target(
    paths,
    field: str,
    Nmesh,
    comm=None,
    units: str = "auto",
    X: float = X_H,
) -> tuple[np.ndarray | None, dict]:
    """Paint a target map from a Gadget/AREPO/IllustrisTNG HDF5 snapshot, whole on rank 0.

    :func:`target_slab` with the ranks' parts gathered on rank 0 (for one file on one rank);
    :func:`write_target` writes the parts without gathering them.

    Parameters
    ----------
    paths, field, Nmesh, comm, units, X
        As for :func:`target_slab`.

    Returns
    -------
    array : numpy.ndarray (float64, shape Nmesh) on rank 0; None on the other ranks
    attrs : dict (every rank)
        As :func:`target_slab` returns them.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_SELF
    part, slices, attrs = target_slab(paths, field, Nmesh, comm=comm, units=units, X=X)
    parts = comm.gather((slices, part), root=0)
    if comm.rank != 0:
        return None, attrs
    full = np.zeros(tuple(attrs["Nmesh"]), np.float64)
    for sl, val in parts:
        full[sl] = val
    return full, attrs


def target_slab(
    paths,
    field: str,
    Nmesh,
    comm=None,
    units: str = "auto",
    X: float = X_H,
) -> tuple[np.ndarray, tuple, dict]:
    """This rank's x slab of a target map painted from a Gadget/AREPO/IllustrisTNG snapshot.

    No rank holds the whole mesh: each reads its share of the rows and pmesh paints them onto
    x slabs (:func:`paint_slab`, the pmesh engine's cut).

    Parameters
    ----------
    paths : path-like or list of them
        The snapshot (see :func:`snapshot_files`).
    field : {"dm", "stellar", "gas", "nHI", "ne", "T"}
        See the module docstring for definitions and units.
    Nmesh : int or 3 ints
        Mesh cells per axis.
    comm : MPI communicator, optional
        Each rank reads its share of the rows; all ranks must call.
    units : {"auto", "kpc/h", "Mpc/h"}
        Units of ``Coordinates`` and ``BoxSize`` in the files.
    X : float
        Hydrogen mass fraction (nHI, ne, T).

    Returns
    -------
    part : numpy.ndarray (float64)
        This rank's part of the map.
    slices : tuple of 3 slices
        Where ``part`` lies in the whole mesh.
    attrs : dict (every rank)
        ``BoxSize`` (Mpc/h, 3-vector), ``Nmesh``, ``redshift``, ``HubbleParam``, ``field``,
        ``units`` (of the map), ``input_length_units``, ``formula``, ``files``, ``nparticles``,
        ``X`` and, for 1+delta fields, ``total_mass`` (code units).

    Raises
    ------
    SnapshotError
        Naming the file: missing group or dataset, truncated file, inconsistent chunks.
    """
    if field not in FIELDS:
        raise ValueError(f"field must be one of {sorted(FIELDS)}, got {field!r}")
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_SELF
    ptype, datasets, map_units = FIELDS[field]
    nmesh = mesh_vector(Nmesh, "make_target: Nmesh")

    files = _root_call(comm, snapshot_files, paths)
    heads = _root_call(comm, read_headers, files)
    h0 = heads[0]
    length, in_units = _length_factor(h0, units)
    box = box_vector(h0["BoxSize"], f"snapshot {files[0]}: Header/BoxSize") * length
    hubble = float(h0["HubbleParam"])
    redshift = float(h0["Redshift"])
    unit_mass = float(h0.get("UnitMass_in_g", GADGET_UNITS["UnitMass_in_g"]))
    unit_vel = float(h0.get("UnitVelocity_in_cm_per_s", GADGET_UNITS["UnitVelocity_in_cm_per_s"]))
    mass_table = float(np.asarray(h0["MassTable"])[ptype])
    if field == "dm" and mass_table == 0:
        datasets = datasets + ("Masses",)

    counts = np.array([int(h["NumPart_ThisFile"][ptype]) for h in heads], dtype=np.int64)
    shares = _my_rows(counts, comm.rank, comm.size)
    cols = _collective(comm, _read_rows, files, heads, ptype, datasets, shares)
    raw_pos = cols["Coordinates"] * length
    mass = cols["Masses"] if "Masses" in cols else np.full(len(raw_pos), mass_table)
    _check_rows(raw_pos, mass, cols, box, files, ptype, comm)
    # wrapped in float64, as before; a coordinate that rounds to the box length becomes 0
    pos = wrap_positions(np.asarray(raw_pos, dtype=np.float64), box, f"snapshot {files[0]}")

    if field in ("dm", "gas", "stellar"):
        weights = [mass]
    elif field == "nHI":
        weights = [X * mass * cols["NeutralHydrogenAbundance"]]
    elif field == "ne":
        weights = [X * mass * cols["ElectronAbundance"]]
    else:
        weights = [
            mass * temperature(cols["InternalEnergy"], cols["ElectronAbundance"], X, unit_vel),
            mass,
        ]

    painted = [paint_slab(pos, w, nmesh, box, comm) for w in weights]
    slices = painted[0][1]
    painted = [slab for slab, _ in painted]
    total_mass = comm.allreduce(float(np.sum(mass)))
    npart = int(counts.sum())
    attrs = {
        "BoxSize": box.copy(),
        "Nmesh": nmesh.copy(),
        "redshift": redshift,
        "HubbleParam": hubble,
        "field": field,
        "units": map_units,
        "input_length_units": in_units,
        "formula": FORMULAS[field].format(X=X),
        "files": [str(f) for f in files],
        "nparticles": npart,
        "X": float(X),
    }
    cosmo = _cosmology(h0)
    if cosmo:
        attrs["cosmology"] = cosmo
        if "Omega_m" in cosmo:
            attrs["Om0"] = cosmo["Omega_m"]
    if field in ("dm", "gas"):
        if total_mass <= 0:
            raise SnapshotError(f"snapshot {files[0]}: no {field} mass (PartType{ptype})")
        out = painted[0] * (nmesh.prod() / total_mass)
        attrs["total_mass"] = total_mass
    elif field == "stellar":
        out = painted[0]
        attrs["total_mass"] = total_mass
    elif field in ("nHI", "ne"):
        a = 1.0 / (1.0 + redshift)
        cell_cm = box / nmesh * a * MPC_CM / hubble
        out = painted[0] * (unit_mass / hubble) / PROTON_MASS_G / np.prod(cell_cm)
    else:
        mt, m = painted
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(m > 0, mt / np.where(m > 0, m, 1.0), 0.0)
    return out, slices, attrs


#: Gadget header attributes of the cosmology -> the names of the suite's ``cosmology`` attribute
COSMOLOGY_KEYS = {
    "Omega0": "Omega_m",
    "OmegaBaryon": "Omega_b",
    "OmegaLambda": "Omega_L",
    "HubbleParam": "h",
}


def _cosmology(head: dict) -> dict:
    """The cosmology a snapshot header records (``Omega_m``, ``Omega_b``, ``Omega_L``, ``h``)."""
    out = {}
    for key, name in COSMOLOGY_KEYS.items():
        if key in head:
            value = float(np.asarray(head[key]).reshape(-1)[0])
            if np.isfinite(value):
                out[name] = value
    return out


def _check_rows(pos, mass, cols: dict, box, files, ptype: int, comm) -> None:
    """Refuse non-finite or negative masses and weights, and positions far outside the box.

    Counts are summed over the ranks, so every rank raises the same error. Positions more than
    one box length outside ``[0, BoxSize)`` are warned about (they are still wrapped), beyond ten
    they are refused (:func:`jerald_nbk.train.validate.check_in_box`): almost always a units
    mistake.
    """
    from ..train.validate import check_in_box

    where = f"snapshot {files[0]}" + (f" (+{len(files) - 1} chunks)" if len(files) > 1 else "")
    counts = {}
    for name, values in (("Masses", mass), *((k, v) for k, v in cols.items() if k != "Masses")):
        if name == "Coordinates":
            continue
        v = np.asarray(values, dtype=np.float64)
        counts[name] = (
            int(v.size - np.count_nonzero(np.isfinite(v))),
            int(np.count_nonzero(v < 0)),
            float(v.min()) if v.size else np.inf,
        )
    nonfinite_pos = int(np.size(pos) - np.count_nonzero(np.isfinite(pos)))
    if comm is not None and comm.size > 1:
        counts = {
            k: (comm.allreduce(a), comm.allreduce(b), comm.allreduce(m, op=_min_op()))
            for k, (a, b, m) in counts.items()
        }
        nonfinite_pos = comm.allreduce(nonfinite_pos)
    if nonfinite_pos:
        raise SnapshotError(
            f"{where}: PartType{ptype}/Coordinates: expected finite values, found "
            f"{nonfinite_pos} NaN or inf"
        )
    for name, (nonfinite, negative, vmin) in counts.items():
        if nonfinite:
            raise SnapshotError(
                f"{where}: PartType{ptype}/{name}: expected finite values, found "
                f"{nonfinite} NaN or inf"
            )
        if negative:
            raise SnapshotError(
                f"{where}: PartType{ptype}/{name}: expected values >= 0, found {negative} "
                f"negative (min {vmin:g})"
            )
    check_in_box(pos, box, f"{where}: PartType{ptype}/Coordinates", comm=comm, units="Mpc/h")


def _min_op():
    from mpi4py import MPI

    return MPI.MIN


def temperature(u, x_e, X: float = X_H, unit_velocity: float = 1e5):
    """Gas temperature in K from Gadget's internal energy per unit mass and electron abundance.

    ``T = (gamma - 1) u mu m_p / k_B`` with ``gamma = 5/3``, ``mu = 4 / (1 + 3 X + 4 X x_e)``
    (mean molecular weight in proton masses) and ``u`` converted to erg/g by ``unit_velocity^2``.
    """
    mu = 4.0 / (1.0 + 3.0 * X + 4.0 * X * np.asarray(x_e, dtype=np.float64))
    return (
        (GAMMA - 1.0)
        * np.asarray(u, np.float64)
        * unit_velocity**2
        * mu
        * PROTON_MASS_G
        / BOLTZMANN_ERG_K
    )


def paint_slab(pos, weight, nmesh, box, comm) -> tuple[np.ndarray, tuple]:
    """CIC-paint this rank's particles with pmesh (float64) onto x slabs; no rank holds the mesh.

    The mesh is cut as the pmesh engine cuts it (one x slab per rank, ``np=[size, 1]``), so the
    slab is the engine's local mesh (:meth:`jerald_nbk.pm.PmeshEngine.local_slices`).

    Parameters
    ----------
    pos : (N, 3) array
        This rank's positions (Mpc/h).
    weight : (N,) array
        Their weights.
    nmesh : 3 ints
    box : 3 floats
    comm : MPI communicator

    Returns
    -------
    slab : numpy.ndarray (float64)
        This rank's part of the painted mesh.
    slices : tuple of 3 slices
        Where it lies in the whole mesh.
    """
    import pmesh.pm

    ppm = pmesh.pm.ParticleMesh(
        Nmesh=list(nmesh), BoxSize=box, dtype="f8", comm=comm, np=[comm.size, 1]
    )
    pos = np.ascontiguousarray(pos, dtype=np.float64)
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    if comm.size > 1:
        layout = ppm.decompose(pos, smoothing=1.0)
        real = ppm.paint(pos, mass=weight, layout=layout, resampler="cic")
    else:
        real = ppm.paint(pos, mass=weight, resampler="cic")
    return np.asarray(real.value), tuple(real.slices)


def write_target(
    out,
    paths,
    field: str,
    Nmesh,
    comm=None,
    units: str = "auto",
    X: float = X_H,
    overwrite: bool = False,
    extra: dict | None = None,
) -> dict:
    """:func:`target_slab` then :func:`jerald_nbk.io.write_mesh_slab` (each rank its own part).

    Parameters
    ----------
    out : path-like
        Output mesh: a bigfile directory, or a name ending in ``.npy`` (JSON sidecar).
    paths, field, Nmesh, comm, units, X
        As for :func:`make_target`.
    overwrite : bool
        Replace an existing ``out`` that is not a previous output of ours (default: refuse).
    extra : dict, optional
        More attributes for the mesh (e.g. the command line).

    Returns
    -------
    dict
        The attrs written with the mesh (``BoxSize`` and ``Nmesh`` are those of the array).
    """
    from .meshes import write_mesh_slab

    part, slices, attrs = target_slab(paths, field, Nmesh, comm=comm, units=units, X=X)
    attrs = {**attrs, **(extra or {})}
    meta = {k: v for k, v in attrs.items() if k not in ("BoxSize", "Nmesh")}
    shape = tuple(int(n) for n in attrs["Nmesh"])
    write_mesh_slab(
        out, part, slices, shape, attrs["BoxSize"], attrs=meta, comm=comm, overwrite=overwrite
    )
    return attrs
