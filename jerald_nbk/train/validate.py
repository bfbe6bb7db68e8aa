"""Checks on training and evaluation inputs, with errors that name what is wrong and where."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ..geometry import BOX_RTOL, box_vector, mesh_vector
from ..model.layers import GREEN_ALIASES, GREENS
from ..model.params import TARGETS

#: positions more than this many box lengths outside ``[0, BoxSize)`` are warned about
WARN_BOX_LENGTHS = 1.0
#: positions more than this many box lengths outside ``[0, BoxSize)`` are refused
REFUSE_BOX_LENGTHS = 10.0
#: rows per chunk of :func:`check_in_box` (bounds its temporaries to ~100 MB)
_CHECK_CHUNK = 1 << 20


_count_nonfinite = jax.jit(lambda a: jnp.sum(~jnp.isfinite(a)))


class FarOutsideBoxWarning(UserWarning):
    """Positions more than one box length outside the box (wrapped, but likely a units mistake)."""


def check_in_box(pos, box, where: str, comm=None, units: str = "Mpc/h") -> None:
    """Warn about positions far outside the periodic box and refuse those much farther.

    Positions are wrapped into ``[0, BoxSize)`` by the painters; a position more than one box
    length outside the box is almost always a units mistake (kpc/h given for Mpc/h), so it is
    warned about with the count and the range found, and more than ten box lengths away it is
    an error.

    Parameters
    ----------
    pos : (N, 3) array
        Positions (this rank's share).
    box : float or 3 floats
        BoxSize.
    where : str
        The file and field, for messages.
    comm : MPI communicator, optional
        Counts and ranges are combined over its ranks; the warning is issued on rank 0.
    units : str
        Units of ``pos`` and ``box``, for messages.

    Raises
    ------
    ValueError
        Some position lies more than :data:`REFUSE_BOX_LENGTHS` box lengths outside the box.
    """
    # a JAX array is read chunk by chunk too (np.asarray of the whole one keeps a host copy)
    a = (pos if hasattr(pos, "reshape") else np.asarray(pos)).reshape(-1, 3)
    L = box_vector(box, where)
    n_warn = n_refuse = 0
    lo, hi = np.inf, -np.inf
    # in chunks: float64 temporaries of the whole array took 9x its size (14 GB for a 512^3
    # float32 catalog)
    for start in range(0, a.shape[0], _CHECK_CHUNK):
        c = np.asarray(a[start : start + _CHECK_CHUNK], dtype=np.float64)
        c = c[np.isfinite(c).all(axis=1)]
        if not c.size:
            continue
        far = (np.maximum(np.maximum(-c, c - L), 0.0) / L).max(axis=1)
        n_warn += int(np.count_nonzero(far > WARN_BOX_LENGTHS))
        n_refuse += int(np.count_nonzero(far > REFUSE_BOX_LENGTHS))
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    if comm is not None and getattr(comm, "size", 1) > 1:
        from mpi4py import MPI

        n_warn, n_refuse = comm.allreduce(n_warn), comm.allreduce(n_refuse)
        lo, hi = comm.allreduce(lo, op=MPI.MIN), comm.allreduce(hi, op=MPI.MAX)
    if not n_warn:
        return
    box_txt = _fmt(L)
    found = f"{n_warn} positions more than one box length outside, range [{lo:g}, {hi:g}]"
    if n_refuse:
        raise ValueError(
            f"{where}: expected positions in [0, {box_txt}) {units} (BoxSize), found {found}, "
            f"{n_refuse} more than {REFUSE_BOX_LENGTHS:g} box lengths away: a units mistake "
            "(kpc/h for Mpc/h?); convert the positions or check the BoxSize"
        )
    if comm is None or getattr(comm, "rank", 0) == 0:
        warnings.warn(
            f"{where}: {found} (BoxSize {box_txt} {units}); they are wrapped into the box, but "
            "this is usually a units mistake (kpc/h for Mpc/h?)",
            FarOutsideBoxWarning,
            stacklevel=2,
        )


def check_particles(pos, pm, where: str = "particles") -> None:
    """Positions must be a non-empty, finite (N, 3) array (local part on MPI engines).

    Positions far outside the box are warned about or refused (:func:`check_in_box`).
    """
    shape = tuple(np.shape(pos))
    if len(shape) != 2 or shape[1] != 3:
        raise ValueError(f"{where}: Position has shape {shape}, expected (N, 3)")
    if pm.count(pos) == 0:
        raise ValueError(f"{where}: the particle set is empty (0 particles)")
    if isinstance(pos, jax.Array):  # counted by XLA: no host copy, no temporaries
        bad = int(_count_nonfinite(pos))
    else:
        bad = int(np.size(pos) - np.count_nonzero(np.isfinite(pos)))
    if pm.comm is not None:
        bad = pm.comm.allreduce(bad)
    if bad:
        raise ValueError(f"{where}: Position has {bad} non-finite (NaN or inf) values")
    check_in_box(pos, pm.BoxSize, where, comm=pm.comm)


def check_target(target, pm, kind: str, where: str = "target") -> None:
    """A target map must match the engine's local mesh, be finite, and be >= 0 for mass-like maps.

    ``kind``: "dm" (1 + delta, must be >= 0), "stellar" (stellar mass >= 0), "hi" (n_HI >= 0).
    """
    local = _local_real_shape(pm)
    shape = tuple(np.shape(target))
    if shape != local:
        raise ValueError(
            f"{where}: map has shape {shape}, expected the mesh's {local} (Nmesh {pm.Nmesh})"
        )
    a = np.asarray(target)
    nonfinite = int(a.size - np.count_nonzero(np.isfinite(a)))
    negative = int(np.count_nonzero(a < 0))
    if pm.comm is not None:
        nonfinite, negative = pm.comm.allreduce(nonfinite), pm.comm.allreduce(negative)
    if nonfinite:
        raise ValueError(f"{where}: map has {nonfinite} non-finite (NaN or inf) cells")
    if negative:
        raise ValueError(f"{where}: {kind} map has {negative} negative cells; it must be >= 0")


def check_same_box(
    a_attrs: dict, a_name: str, b_attrs: dict, b_name: str, rtol: float = BOX_RTOL
) -> None:
    """BoxSize (within ``rtol``) and Nmesh (exactly) of two inputs must agree, where both have them.

    Each is read by :func:`jerald_nbk.geometry.box_vector` / :func:`~jerald_nbk.geometry.mesh_vector`
    (an error naming the input when a BoxSize is not one or three positive numbers, or an Nmesh
    not one or three whole numbers >= 1).
    """
    for key, read in (("BoxSize", box_vector), ("Nmesh", mesh_vector)):
        if key in a_attrs and key in b_attrs:
            va, vb = read(a_attrs[key], a_name), read(b_attrs[key], b_name)
            same = np.allclose(va, vb, rtol=rtol) if key == "BoxSize" else np.array_equal(va, vb)
            if not same:
                raise ValueError(f"{b_name} {key} {_fmt(vb)} != {a_name} {key} {_fmt(va)}")


def _fmt(v) -> str:
    v = np.asarray(v)
    one = (lambda x: str(int(x))) if v.dtype.kind in "iu" else (lambda x: f"{x:g}")
    return one(v[0]) if np.all(v == v[0]) else "(" + ", ".join(one(x) for x in v) + ")"


def _local_real_shape(pm) -> tuple:
    i, j, l = pm.mesh_index()
    return tuple(np.broadcast_shapes(np.shape(i), np.shape(j), np.shape(l)))


def check_param_doc(doc, path) -> None:
    """The shape of a JSON parameter file's document, before anything is built from it.

    Parameters
    ----------
    doc : object
        The parsed JSON.
    path : path-like
        The file, for messages.

    Raises
    ------
    ValueError
        Naming the file, the field, what was expected and what was found: a document that is not
        an object, a ``config`` block that is not an object or has a field of the wrong type or
        value, a ``parameters`` entry that is not an object with a string ``name`` and a finite
        number ``value``.
    """
    where = f"parameter file {path}"
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object, found a {_json_type(doc)}")
    cfg = doc.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: field 'config': expected an object, found {_json_type(cfg)}")
    checks = {
        "target": (
            lambda v: isinstance(v, str) and v in TARGETS,
            "one of " + ", ".join(repr(t) for t in TARGETS),
        ),
        "n_layers": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "gradient_order": (
            lambda v: v in (4, 6, "exact") and not isinstance(v, bool),
            "4, 6 or 'exact'",
        ),
        "hi_shift": (lambda v: isinstance(v, bool), "true or false"),
        "green": (
            lambda v: v is None or v in GREENS or v in GREEN_ALIASES,
            "null, 'exponential' or 'gaussian' (or the old 'dm', 'sm')",
        ),
        "amplitude": (lambda v: _is_number(v) and np.isfinite(v) and v > 0, "a number > 0"),
    }
    for key, (ok, want) in checks.items():
        if key in cfg and not ok(cfg[key]):
            raise ValueError(f"{where}: field 'config.{key}': expected {want}, found {cfg[key]!r}")
    params = doc.get("parameters")
    if not isinstance(params, list):
        raise ValueError(
            f"{where}: field 'parameters': expected a list, found {_json_type(params)}"
        )
    for i, p in enumerate(params):
        field = f"parameters[{i}]"
        if not isinstance(p, dict):
            raise ValueError(f"{where}: field '{field}': expected an object, found {p!r}")
        if not isinstance(p.get("name"), str):
            raise ValueError(
                f"{where}: field '{field}.name': expected a string, found {p.get('name')!r}"
            )
        if "value" not in p:
            raise ValueError(
                f"{where}: field '{field}' ({p['name']}): expected a 'value', found none"
            )
        v = p["value"]
        if not (_is_number(v) and np.isfinite(v)):
            raise ValueError(
                f"{where}: field '{field}.value' ({p['name']}): expected a finite number, found {v!r}"
            )
    prov = doc.get("provenance", {})
    if not isinstance(prov, dict):
        raise ValueError(
            f"{where}: field 'provenance': expected an object, found {_json_type(prov)}"
        )


def check_map_values(arr, where: str, allow_negative: bool = False) -> None:
    """A map for spectra and figures of merit: 3-D, finite and (unless allowed) >= 0.

    Parameters
    ----------
    arr : array
        The whole mesh.
    where : str
        The file, for messages.
    allow_negative : bool
        Accept negative cells (a map of delta rather than 1 + delta or a mass).

    Raises
    ------
    ValueError
        Naming the file, with the count of bad cells and the first one.
    """
    a = np.asarray(arr)
    if a.ndim != 3:
        raise ValueError(f"{where}: expected a 3-D mesh, found shape {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{where}: expected finite values, found {int(bad.sum())} NaN or inf cells "
            f"(first at {first})"
        )
    neg = a < 0
    if neg.any() and not allow_negative:
        raise ValueError(
            f"{where}: expected values >= 0 (1 + delta or a mass), found {int(neg.sum())} "
            f"negative cells (min {float(a.min()):g}); pass --allow-negative for a map of delta"
        )


def _json_type(v) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    for t, n in names.items():
        if isinstance(v, t):
            return n if t is not list else f"list of {len(v)}"
    return "number" if _is_number(v) else type(v).__name__


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
