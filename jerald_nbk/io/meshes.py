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

from ..utils import ForeignOutputError, atomic_dir, atomic_write
from . import _bigfile

__all__ = ["write_mesh", "read_mesh", "sidecar_path"]

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


def _boxsize_vector(BoxSize, ndim: int, where: str) -> np.ndarray:
    try:
        box = np.broadcast_to(np.asarray(BoxSize, dtype=float), (ndim,)).copy()
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: BoxSize must be a number or {ndim} numbers, got {BoxSize!r}"
        ) from None
    if not np.all(np.isfinite(box)) or np.any(box <= 0):
        raise ValueError(f"{where}: BoxSize must be positive and finite, got {box.tolist()}")
    return box


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

    path = Path(path)
    where = f"mesh {path}"
    arr = _check_array(array, where)
    box = _boxsize_vector(BoxSize, arr.ndim, where)
    attrs = dict(attrs or {})
    clash = sorted(set(attrs) & set(MESH_ATTRS))
    if clash:
        raise ValueError(f"{where}: attributes {clash} are set from the array and BoxSize")
    nmesh = np.asarray(arr.shape, dtype=np.int64)

    if _is_npy(path):
        for key, value in attrs.items():
            try:
                json.dumps(value, cls=_bigfile._NumpyJSON)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{where}: attribute {key!r} of type {type(value).__name__} cannot be stored "
                    "in the JSON sidecar"
                ) from err
        meta = {"BoxSize": box.tolist(), "Nmesh": nmesh.tolist(), **attrs, WRITTEN_BY: _writer()}
        # serialised before anything is written, so a bad attribute leaves no file behind
        text = json.dumps(meta, cls=_bigfile._NumpyJSON, indent=1)
        if not overwrite:
            _check_npy_output(path)
        with atomic_write(path, "wb") as fh:
            np.save(fh, arr)
        with atomic_write(sidecar_path(path), "w") as fh:
            fh.write(text)
        return

    import bigfile

    if not dataset or dataset.startswith("/") or dataset.endswith("/"):
        raise ValueError(f"{where}: dataset name must be a relative block name, got {dataset!r}")
    with atomic_dir(path, overwrite=overwrite) as tmp:
        with bigfile.File(str(tmp), create=True) as ff:
            # C-order flattening is what pmesh's RealField.ravel/unravel use for the global mesh
            with ff.create_from_array(dataset, arr.reshape(-1), Nfile=1) as bb:
                bb.attrs["ndarray.shape"] = nmesh
                bb.attrs["BoxSize"] = box
                bb.attrs["Nmesh"] = nmesh
                _bigfile.set_attrs(bb, attrs, f"{where}: dataset {dataset!r}")


def _writer() -> str:
    from .. import __version__

    return f"jerald_nbk {__version__}"


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

    path = Path(path)
    if _is_npy(path):
        arr, attrs = _read_npy(path, BoxSize)
        where = f"mesh {path}"
    else:
        arr, attrs = _read_bigfile_mesh(path, dataset)
        where = f"mesh {path}: dataset {dataset!r}"
    if BoxSize is not None:
        want = _boxsize_vector(BoxSize, arr.ndim, "expected BoxSize")
        if not np.allclose(attrs["BoxSize"], want, rtol=1e-6, atol=0):
            raise ValueError(
                f"{where}: BoxSize {attrs['BoxSize'].tolist()} != expected {want.tolist()}"
            )
    if Nmesh is not None:
        want = np.broadcast_to(np.asarray(Nmesh, dtype=np.int64), (arr.ndim,))
        if not np.array_equal(attrs["Nmesh"], want):
            found = attrs["Nmesh"].tolist()
            raise ValueError(f"{where}: Nmesh {found} != expected {want.tolist()}")
    return arr, attrs


def _read_npy(path: Path, BoxSize):
    where = f"mesh {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{where}: not a readable .npy file ({err})") from err
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
    attrs["BoxSize"] = _boxsize_vector(attrs["BoxSize"], arr.ndim, f"mesh sidecar {side}")
    nmesh = np.asarray(attrs.get("Nmesh", arr.shape), dtype=np.int64)
    if not np.array_equal(nmesh, arr.shape):
        raise ValueError(f"mesh sidecar {side}: Nmesh {nmesh.tolist()} != array shape {arr.shape}")
    attrs["Nmesh"] = nmesh
    attrs["ndarray.shape"] = nmesh.copy()
    return arr, attrs


def _read_bigfile_mesh(path: Path, dataset: str):
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
            data = _bigfile.read_rows(block, 0, block.size, path, dataset, kind)
    attrs["Nmesh"] = nmesh
    attrs["ndarray.shape"] = shape
    attrs["BoxSize"] = _boxsize_vector(attrs["BoxSize"], nmesh.size, where + " attribute 'BoxSize'")
    return data.reshape(tuple(nmesh)), attrs


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
