"""Real meshes on disk: bigfile meshes (LDL / JERALD / nbodykit layout) and ``.npy`` files.

bigfile layout (what ``nbodykit``'s ``MeshSource.save(path, dataset='Field', mode='real')`` writes
and ``BigFileMesh(path, 'Field')`` reads): one block ``<dataset>`` holding the whole mesh flattened
in C order (x slowest), dtype ``f4`` or ``f8``, with attributes

* ``Nmesh``: cells per axis (int array),
* ``BoxSize``: box size per axis in Mpc/h (float array),
* ``ndarray.shape``: the mesh shape (equal to ``Nmesh``),

plus any user attributes (values bigfile cannot store are kept as ``"json://..."`` strings).

``.npy`` layout: the array in ``name.npy`` and its attributes (``BoxSize``, ``Nmesh`` and the user
attributes) in the JSON sidecar ``name.npy.json``. :func:`write_mesh` always writes the sidecar;
:func:`read_mesh` needs it, or the caller's ``BoxSize`` when it is absent.

Writes are atomic: the output is built under a temporary sibling name and renamed into place, so
a failed write leaves any previous file at ``path`` untouched and no temporary behind. An existing
output is replaced only if it is one of ours (a bigfile directory with jerald-nbk's output marker
and no other files, see :func:`jerald_nbk.utils.foreign_content`; a ``.npy`` whose sidecar records
``written_by: jerald_nbk ...``), as a whole (other datasets in it included); anything else at the
path is an error naming it, unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..geometry import BOX_RTOL, box_vector, mesh_vector
from ..utils import ForeignOutputError, atomic_dir, atomic_write, raise_first
from . import _bigfile

__all__ = [
    "write_mesh",
    "read_mesh",
    "sidecar_path",
    "check_mesh_output",
    "inherited_attrs",
    "read_mesh_slab",
    "write_mesh_slab",
]

#: attributes a real mesh always carries (nbodykit's BigFileMesh needs all three)
MESH_ATTRS = ("Nmesh", "BoxSize", "ndarray.shape")
#: sidecar key of a ``.npy`` mesh written by :func:`write_mesh` (how we recognise our own outputs)
WRITTEN_BY = "written_by"


def sidecar_path(path) -> Path:
    """The JSON sidecar of a ``.npy`` mesh: ``name.npy`` -> ``name.npy.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _is_npy(path) -> bool:
    return str(path).endswith(".npy")


def _check_array(array, where: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{where}: a mesh must be 2- or 3-dimensional, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{where}: a mesh must be real (float32/float64), got dtype {arr.dtype}")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    if min(arr.shape) < 1:
        raise ValueError(f"{where}: a mesh must have at least one cell per axis, got {arr.shape}")
    return arr


def write_mesh(
    path,
    array,
    BoxSize,
    attrs: Mapping | None = None,
    dataset: str = "Field",
    comm=None,
    overwrite: bool = False,
) -> None:
    """Write a real mesh as a bigfile (or ``.npy`` + JSON sidecar) that nbodykit can read.

    Parameters
    ----------
    path : str or Path
        Output bigfile directory, or a file name ending in ``.npy``.
    array : array_like, shape (Nx, Ny, Nz) or (Nx, Ny)
        The whole mesh (numpy or JAX). float32 and float64 are kept; integers become float64.
    BoxSize : float or sequence of floats
        Box size per axis in Mpc/h.
    attrs : mapping, optional
        Extra attributes (e.g. units, redshift, the prescription that made the map). They cannot
        override ``Nmesh``, ``BoxSize`` or ``ndarray.shape``.
    dataset : str
        bigfile block name (ignored for ``.npy``).
    comm : MPI communicator, optional
        With a communicator, ``array`` is the whole mesh on rank 0 (ignored elsewhere); rank 0
        writes, and every rank returns once the file is complete or raises rank 0's error.
    overwrite : bool
        Replace whatever stands at ``path`` (default: only a previous output of ours).

    Raises
    ------
    ValueError
        Bad array, BoxSize or attributes; nothing is written.
    ForeignOutputError
        ``path`` (or the ``.npy`` sidecar) holds something that is not a previous output of ours;
        it is left untouched.
    """
    if comm is not None and comm.size > 1:
        _on_root(comm, lambda: write_mesh(path, array, BoxSize, attrs, dataset, None, overwrite))
        return
    arr = _check_array(array, f"mesh {path}")
    full = tuple(slice(0, n) for n in arr.shape)
    write_mesh_slab(path, arr, full, arr.shape, BoxSize, attrs, dataset, None, overwrite)


def write_mesh_slab(
    path,
    part,
    slices,
    shape,
    BoxSize,
    attrs: Mapping | None = None,
    dataset: str = "Field",
    comm=None,
    overwrite: bool = False,
) -> None:
    """Write a mesh from every rank's own part, collectively: no rank holds the whole mesh.

    The file is what :func:`write_mesh` writes for the assembled mesh (same layout, attributes
    and atomicity). A bigfile block is created by rank 0 and each rank writes its part at its
    offsets (``bigfile.FileMPI``); a ``.npy`` file is created by rank 0 at its full size and each
    rank writes its part through a memory map. For a pmesh engine pass
    ``pm.local_slices("real")``; the inverse is :func:`read_mesh_slab`.

    Parameters
    ----------
    path : str or Path
        Output bigfile directory, or a file name ending in ``.npy``.
    part : array_like
        This rank's part ``mesh[slices]`` (float32 or float64, the same dtype on every rank).
    slices : tuple of slices
        Where ``part`` lies in the whole mesh (steps of 1); the ranks' parts must tile it.
    shape : tuple of ints
        The whole mesh's shape (2 or 3 axes).
    BoxSize, attrs, dataset, overwrite
        As for :func:`write_mesh` (the same on every rank).
    comm : MPI communicator, optional
        Every rank of ``comm`` calls this. An error on any rank (a bad part, an unwritable path,
        a failed write) is raised on every rank and nothing is left at ``path``.

    Raises
    ------
    ValueError
        Bad part, slices, BoxSize or attributes; nothing is written.
    ForeignOutputError
        ``path`` holds something that is not a previous output of ours; it is left untouched.
    """
    path = Path(path)
    where = f"mesh {path}"
    prepared, error = None, None
    try:
        prepared = _prepare_mesh(path, part, slices, shape, BoxSize, attrs, dataset)
    except ValueError as err:
        error = err
    raise_first(comm, error)
    if comm is not None and comm.size > 1:
        dtypes = set(comm.allgather(prepared[0].dtype.str))
        if len(dtypes) > 1:
            raise ValueError(f"{where}: the ranks' parts differ in dtype: {sorted(dtypes)}")
        if sum(comm.allgather(prepared[0].size)) != int(np.prod(shape)):
            raise ValueError(f"{where}: the ranks' parts do not tile a mesh of {shape}")
    arr, slices, box, attrs, nmesh = prepared
    if _is_npy(path):
        _write_npy_slab(path, arr, slices, box, attrs, nmesh, comm, overwrite)
        return

    import bigfile

    collective = comm is not None and comm.size > 1
    with atomic_dir(path, comm=comm if collective else None, overwrite=overwrite) as tmp:
        if collective:
            ff = bigfile.FileMPI(comm, str(tmp), create=True)
        else:
            ff = bigfile.File(str(tmp), create=True)
        with ff:
            with ff.create(dataset, dtype=arr.dtype, size=int(np.prod(nmesh)), Nfile=1) as bb:
                for offset, run in _c_order_runs(arr, slices, tuple(nmesh)):
                    bb.write(offset, run)
                bb.attrs["ndarray.shape"] = nmesh
                bb.attrs["BoxSize"] = box
                bb.attrs["Nmesh"] = nmesh
                _bigfile.set_attrs(bb, attrs, f"{where}: dataset {dataset!r}")


def _prepare_mesh(path: Path, part, slices, shape, BoxSize, attrs, dataset):
    """Check one rank's part and the attributes; (part, slices, box, attrs, nmesh)."""
    where = f"mesh {path}"
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"{where}: a mesh must have 2 or 3 axes of at least one cell, got {shape}")
    slices = tuple(slices)
    if len(slices) != len(shape) or any(s.step not in (None, 1) for s in slices):
        raise ValueError(f"{where}: slices {slices} do not select a block of a mesh of {shape}")
    slices = tuple(slice(*s.indices(n)[:2]) for s, n in zip(slices, shape, strict=True))
    arr = np.asarray(part)
    want = tuple(max(0, s.stop - s.start) for s in slices)
    if arr.shape != want:
        raise ValueError(f"{where}: part of shape {arr.shape}, its slices {slices} need {want}")
    if arr.size:
        arr = _check_array(arr, where)
    elif arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    box = box_vector(BoxSize, where, ndim=len(shape))
    attrs = dict(attrs or {})
    clash = sorted(set(attrs) & set(MESH_ATTRS))
    if clash:
        raise ValueError(f"{where}: attributes {clash} are set from the array and BoxSize")
    if _is_npy(path):
        for key, value in attrs.items():
            try:
                json.dumps(value, cls=_bigfile._NumpyJSON)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{where}: attribute {key!r} of type {type(value).__name__} cannot be stored "
                    "in the JSON sidecar"
                ) from err
    elif not dataset or dataset.startswith("/") or dataset.endswith("/"):
        raise ValueError(f"{where}: dataset name must be a relative block name, got {dataset!r}")
    return arr, slices, box, attrs, np.asarray(shape, dtype=np.int64)


def _c_order_runs(arr: np.ndarray, slices, shape):
    """(offset, values) of the contiguous runs ``arr = mesh[slices]`` makes in C-ordered ``mesh``.

    The axes after the last partial one are whole, so each run covers them: one run for a slab
    of whole planes, one per plane for a pmesh 2-D decomposition.
    """
    if arr.size == 0:
        return
    partial = [
        d for d, (s, n) in enumerate(zip(slices, shape, strict=True)) if s.stop - s.start != n
    ]
    k = partial[-1] if partial else 0
    strides = np.cumprod((1,) + shape[::-1])[::-1][1:]  # C-order strides in elements
    for lead in np.ndindex(*arr.shape[:k]):
        idx = [slices[d].start + i for d, i in enumerate(lead)] + [slices[k].start]
        offset = int(np.dot(idx, strides[: k + 1]))
        yield offset, np.ascontiguousarray(arr[lead]).reshape(-1)


def _write_npy_slab(path: Path, arr, slices, box, attrs, nmesh, comm, overwrite) -> None:
    """The ``.npy`` branch of :func:`write_mesh_slab`: rank 0 creates, every rank fills its part."""
    import tempfile

    from ..utils import default_mode, fault_point

    meta = {"BoxSize": box.tolist(), "Nmesh": nmesh.tolist(), **attrs, WRITTEN_BY: _writer()}
    # serialised before anything is written, so a bad attribute leaves no file behind
    text = json.dumps(meta, cls=_bigfile._NumpyJSON, indent=1)
    collective = comm is not None and comm.size > 1
    root = not collective or comm.rank == 0

    tmp, error = None, None
    if root:
        try:
            if not overwrite:
                _check_npy_output(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.fchmod(fd, default_mode())
            os.close(fd)
            mm = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=arr.dtype, shape=tuple(int(n) for n in nmesh)
            )
            del mm
        except (OSError, ValueError) as err:
            error = err
    if collective:
        tmp = comm.bcast(tmp, root=0)
    raise_first(comm, error)
    try:
        try:
            fault_point("write")
            mm = np.lib.format.open_memmap(tmp, mode="r+")
            mm[slices] = arr
            mm.flush()
            del mm
        except Exception as err:  # noqa: BLE001 - raised on every rank
            error = err
        raise_first(comm, error)
        if root:
            try:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                if not overwrite:
                    _check_npy_output(path)  # again: something may have appeared meanwhile
                os.replace(tmp, path)
                tmp = None
                with atomic_write(sidecar_path(path), "w") as fh:
                    fh.write(text)
            except (OSError, ValueError) as err:
                error = err
        raise_first(comm, error)
    finally:
        if root and tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


#: what a map inherits from the catalog, snapshot or parameter file it was made from (what
#: nbodykit users look for): name in the map -> names it may have in the source, first found wins
INHERITED_ATTRS = {
    "redshift": ("redshift", "Redshift"),
    "Time": ("Time", "ScalingFactor"),
    "cosmology": ("cosmology",),
    "Om0": ("Om0", "OmegaM", "Omega0", "Omega_m"),
    "HubbleParam": ("HubbleParam", "h"),
}


def inherited_attrs(*sources: Mapping | None) -> dict:
    """The redshift, scale factor and cosmology a map inherits from its sources.

    Parameters
    ----------
    *sources : mappings or None
        Attributes of the inputs (a catalog's header, a snapshot's, a parameter file's
        provenance), most authoritative first; None and missing keys are skipped.

    Returns
    -------
    dict
        Keys of :data:`INHERITED_ATTRS` found in some source. ``redshift`` is derived from the
        scale factor (``1/a - 1``) when only that is recorded (FastPM's ``Time``), and ``Time``
        from the redshift.
    """
    out: dict = {}
    for key, names in INHERITED_ATTRS.items():
        for src in sources:
            found = next((src[n] for n in names if src and src.get(n) is not None), None)
            if found is not None:
                out[key] = found
                break
    for key, other, low in (("redshift", "Time", -1.0), ("Time", "redshift", 0.0)):
        if key not in out or other in out:
            continue
        try:
            v = np.asarray(out[key], dtype=float).reshape(-1)
        except (TypeError, ValueError):
            continue
        if v.size == 1 and np.isfinite(v[0]) and v[0] > low:
            out[other] = 1.0 / (1.0 + v[0]) if key == "redshift" else 1.0 / v[0] - 1.0
    return out


def _writer() -> str:
    from .. import __version__

    return f"jerald_nbk {__version__}"


def check_mesh_output(path, overwrite: bool = False) -> None:
    """Raise if :func:`write_mesh` would refuse ``path``: call it before a long computation.

    Parameters
    ----------
    path : str or Path
        A bigfile mesh directory or a ``.npy`` file (its sidecar is checked too).
    overwrite : bool
        Anything may be replaced (the check passes).

    Raises
    ------
    ForeignOutputError
        ``path`` (or the sidecar) holds something that is not a previous output of ours.
    """
    if overwrite:
        return
    if _is_npy(path):
        _check_npy_output(Path(path))
    else:
        from ..utils import check_output

        check_output(path, overwrite, "mesh")


def _check_npy_output(path: Path) -> None:
    """Raise if ``path`` or its sidecar exists and is not a ``.npy`` mesh we wrote."""
    side = sidecar_path(path)
    present = [p for p in (path, side) if os.path.lexists(p)]
    if not present:
        return
    ours = False
    if side.is_file() and not side.is_symlink():
        try:
            doc = json.loads(side.read_text())
            ours = isinstance(doc, dict) and str(doc.get(WRITTEN_BY, "")).startswith("jerald_nbk")
        except (OSError, ValueError):
            ours = False
    if ours and (not os.path.lexists(path) or (path.is_file() and not path.is_symlink())):
        return
    raise ForeignOutputError(
        f"mesh {path}: {present[0]} exists and is not a jerald-nbk output (no sidecar recording "
        f"'{WRITTEN_BY}: jerald_nbk'); it is left untouched. Remove it, choose another path, or "
        "pass overwrite=True (--overwrite on the command line) to replace it"
    )


def read_mesh(
    path,
    dataset: str = "Field",
    comm=None,
    BoxSize=None,
    Nmesh=None,
) -> tuple[np.ndarray, dict]:
    """Read a whole real mesh written by :func:`write_mesh`, nbodykit, LDL or JERALD.

    Parameters
    ----------
    path : str or Path
        bigfile directory, or ``.npy`` file (with its ``.npy.json`` sidecar).
    dataset : str
        bigfile block holding the mesh (ignored for ``.npy``).
    comm : MPI communicator, optional
        With a communicator, rank 0 reads and broadcasts the mesh to every rank.
    BoxSize : float or sequence, optional
        Expected box size (Mpc/h). Checked against the file; for a ``.npy`` without sidecar it
        supplies the box size.
    Nmesh : int or sequence, optional
        Expected mesh shape, checked against the file.

    Returns
    -------
    array : numpy.ndarray
        The mesh with shape ``Nmesh`` in its stored dtype.
    attrs : dict
        The file's attributes; ``BoxSize`` as a float64 vector and ``Nmesh`` as an int vector.

    Raises
    ------
    FileNotFoundError
        Missing file or sidecar.
    ValueError
        Missing dataset or attribute, inconsistent shapes, complex (Fourier-space) mesh,
        truncated data, or a mismatch with the expected ``BoxSize`` / ``Nmesh``.
    """
    if comm is not None and comm.size > 1:
        return _on_root(comm, lambda: read_mesh(path, dataset, None, BoxSize, Nmesh))

    return _read(path, dataset, BoxSize, Nmesh, None)


def _read(path, dataset, BoxSize, Nmesh, planes):
    path = Path(path)
    if _is_npy(path):
        arr, attrs = _read_npy(path, BoxSize, planes)
        where = f"mesh {path}"
    else:
        arr, attrs = _read_bigfile_mesh(path, dataset, planes)
        where = f"mesh {path}: dataset {dataset!r}"
    if BoxSize is not None:
        want = box_vector(BoxSize, "expected BoxSize", ndim=arr.ndim)
        if not np.allclose(attrs["BoxSize"], want, rtol=BOX_RTOL, atol=0):
            raise ValueError(
                f"{where}: BoxSize {attrs['BoxSize'].tolist()} != expected {want.tolist()}"
            )
    if Nmesh is not None:
        want = mesh_vector(Nmesh, "expected Nmesh", ndim=arr.ndim)
        if not np.array_equal(attrs["Nmesh"], want):
            found = attrs["Nmesh"].tolist()
            raise ValueError(f"{where}: Nmesh {found} != expected {want.tolist()}")
    return arr, attrs


def read_mesh_slab(
    path,
    slices,
    dataset: str = "Field",
    comm=None,
    BoxSize=None,
    Nmesh=None,
) -> tuple[np.ndarray, dict]:
    """Read only this rank's part ``mesh[slices]`` of a mesh file (no rank holds the whole mesh).

    Only the planes of the first axis that ``slices[0]`` covers are read (one contiguous row range
    of the bigfile block, or of a memory-mapped ``.npy``); the other slices are applied to them.
    For a pmesh engine (slabs in x) pass ``pm.local_slices("real")``.

    Parameters
    ----------
    path : str or Path
        bigfile directory, or ``.npy`` file (with its sidecar).
    slices : tuple of slices, or None
        This rank's part of the global mesh (steps of 1); None reads the whole mesh.
    dataset : str
        bigfile block (ignored for ``.npy``).
    comm : MPI communicator, optional
        Every rank reads its own part; an error on any rank is raised on every rank (the first
        rank's), so that no rank is left waiting.
    BoxSize, Nmesh : optional
        Expected values, checked as :func:`read_mesh` checks them.

    Returns
    -------
    part : numpy.ndarray
        ``mesh[slices]`` in the stored dtype.
    attrs : dict
        The file's attributes (``Nmesh`` the whole mesh's), as :func:`read_mesh` returns them.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_mesh`; also slices outside the mesh or with a step.
    """
    result, error = None, None
    try:
        planes, rest = None, ()
        if slices is not None:
            slices = tuple(slices)
            if any(s.step not in (None, 1) for s in slices):
                raise ValueError(f"mesh {path}: slices with a step are not supported: {slices}")
            first = slices[0]
            planes, rest = (first.start or 0, first.stop), slices[1:]
        if planes is not None and planes[1] is None:
            planes = (planes[0], _first_axis(Path(path), dataset))
        arr, attrs = _read(path, dataset, BoxSize, Nmesh, planes)
        result = (arr[(slice(None), *rest)] if rest else arr), attrs
    except (OSError, ValueError) as err:
        error = err
    raise_first(comm, error)
    return result


def _first_axis(path: Path, dataset: str) -> int:
    """Cells along the first axis of a mesh file, from its header only."""
    if _is_npy(path):
        if not path.is_file():
            raise FileNotFoundError(f"mesh {path}: no such file")
        try:
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        except (ValueError, OSError, EOFError, IndexError) as err:
            raise ValueError(f"mesh {path}: not a readable .npy file ({err})") from err
    with _bigfile.open_file(path, "mesh") as ff:
        with _bigfile.open_block(ff, path, dataset, "mesh") as block:
            attrs = _bigfile.get_attrs(block)
    if "Nmesh" not in attrs:
        raise ValueError(f"mesh {path}: dataset {dataset!r} has no attribute 'Nmesh'")
    return int(np.atleast_1d(np.asarray(attrs["Nmesh"]))[0])


def _read_npy(path: Path, BoxSize, planes=None):
    where = f"mesh {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        # a slab is read through a memory map: only its planes are loaded
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if planes is not None else None)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{where}: not a readable .npy file ({err})") from err
    shape = tuple(arr.shape)
    if planes is not None:
        if arr.ndim not in (2, 3):  # checked here so that the slice below is valid
            _check_array(arr, where)
        _check_array(arr[:1], where)  # dtype and shape from one plane: the mesh is not loaded
        x0, x1 = _check_planes(planes, shape[0], where)
        arr = np.array(arr[x0:x1])  # no plane (x0 == x1): the header's checks only
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
    else:
        arr = _check_array(arr, where)
    side = sidecar_path(path)
    if side.is_file():
        try:
            attrs = json.loads(side.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"mesh sidecar {side}: not valid JSON ({err})") from err
        if not isinstance(attrs, dict) or "BoxSize" not in attrs:
            raise ValueError(f"mesh sidecar {side}: has no attribute 'BoxSize'")
    elif BoxSize is not None:
        attrs = {"BoxSize": BoxSize}
    else:
        raise FileNotFoundError(
            f"{where}: sidecar {side} with BoxSize is missing; pass BoxSize= to read it without one"
        )
    attrs["BoxSize"] = box_vector(attrs["BoxSize"], f"mesh sidecar {side}", ndim=arr.ndim)
    nmesh = np.asarray(attrs.get("Nmesh", shape), dtype=np.int64)
    if not np.array_equal(nmesh, shape):
        raise ValueError(f"mesh sidecar {side}: Nmesh {nmesh.tolist()} != array shape {shape}")
    attrs["Nmesh"] = nmesh
    attrs["ndarray.shape"] = nmesh.copy()
    return arr, attrs


def _check_planes(planes, nx: int, where: str) -> tuple[int, int]:
    x0, x1 = (int(p) for p in planes)
    if not 0 <= x0 <= x1 <= nx:
        raise ValueError(f"{where}: planes [{x0}, {x1}) outside the mesh's first axis [0, {nx})")
    return x0, x1


def _read_bigfile_mesh(path: Path, dataset: str, planes=None):
    kind = "mesh"
    where = f"mesh {path}: dataset {dataset!r}"
    with _bigfile.open_file(path, kind) as ff:
        block = _bigfile.open_block(ff, path, dataset, kind)
        with block:
            attrs = _bigfile.get_attrs(block)
            for key in ("Nmesh", "BoxSize"):
                if key not in attrs:
                    raise ValueError(f"{where} has no attribute {key!r}")
            if block.dtype.kind == "c":
                raise ValueError(
                    f"{where} holds a complex (Fourier-space) mesh, dtype {block.dtype}; "
                    "expected a real mesh (saved with mode='real')"
                )
            if block.dtype.kind != "f" or block.dtype.shape != ():
                raise ValueError(f"{where} has dtype {block.dtype}, expected float32 or float64")
            nmesh = np.atleast_1d(np.asarray(attrs["Nmesh"], dtype=np.int64))
            if nmesh.size not in (2, 3) or np.any(nmesh < 1):
                raise ValueError(
                    f"{where}: attribute 'Nmesh' is {nmesh.tolist()}, "
                    "expected 2 or 3 positive integers"
                )
            shape = np.atleast_1d(np.asarray(attrs.get("ndarray.shape", nmesh), dtype=np.int64))
            if not np.array_equal(shape, nmesh):
                raise ValueError(
                    f"{where}: attribute 'ndarray.shape' {shape.tolist()} != Nmesh {nmesh.tolist()}"
                )
            expected = int(np.prod(nmesh))
            if block.size != expected:
                raise ValueError(
                    f"{where} has {block.size} values, expected {expected} for Nmesh "
                    f"{nmesh.tolist()}"
                )
            _bigfile.check_physical_files(path / dataset, block.dtype, where)
            x0, x1 = (
                (0, int(nmesh[0])) if planes is None else _check_planes(planes, nmesh[0], where)
            )
            plane = int(np.prod(nmesh[1:]))  # C order: planes of x are contiguous rows
            data = _bigfile.read_rows(block, x0 * plane, x1 * plane, path, dataset, kind)
    attrs["Nmesh"] = nmesh
    attrs["ndarray.shape"] = shape
    attrs["BoxSize"] = box_vector(attrs["BoxSize"], where + " attribute 'BoxSize'", ndim=nmesh.size)
    return data.reshape((x1 - x0, *nmesh[1:])), attrs


def _on_root(comm, fn):
    """Run ``fn`` on rank 0, broadcast its result or its exception to every rank."""
    result, error = None, None
    if comm.rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    result, error = comm.bcast((result, error), root=0)
    if error is not None:
        raise error
    return result
