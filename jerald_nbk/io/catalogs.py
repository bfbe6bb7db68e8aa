"""Particle catalogs on disk: FastPM and nbodykit bigfile catalogs.

Two layouts are read (both are what nbodykit's ``BigFileCatalog(path, dataset=...)`` reads):

* FastPM (C and python): columns under a dataset, ``1/Position``, ``1/Velocity`` (``1/ID``, ...),
  and the run's attributes (``BoxSize``, ``NC``, ``Time`` or ``ScalingFactor``, cosmology) on a
  top-level ``Header`` block. Pass ``dataset="1"`` (the default).
* nbodykit's ``CatalogSource.save(path, columns)``: columns at the top level (``Position``, ...),
  attributes on ``Header``. Pass ``dataset=None``. (``save(path, columns, dataset="1")`` gives
  the FastPM layout.)

Attributes are merged like nbodykit does: ``Header``, then ``header``, then the dataset's own
attributes, later ones overriding earlier ones.

:func:`write_catalog` writes the FastPM layout (or the top-level one with ``dataset=None``), so that
both :func:`read_catalog` and nbodykit read it.

With an MPI communicator each rank reads only its contiguous share of the rows,
``[N * rank // size, N * (rank + 1) // size)`` (nbodykit's split), never the whole catalog.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..utils import atomic_dir, fault_point, gather_errors, raise_first
from . import _bigfile

__all__ = ["read_catalog", "write_catalog", "rank_range", "catalog_columns", "catalog_attrs"]

#: columns that are 3-vectors per particle whenever present
VECTOR_COLUMNS = ("Position", "Velocity")

#: header blocks searched for attributes, in merge order (nbodykit's default)
HEADER_BLOCKS = ("Header", "header")

#: rows per physical file (nbodykit and bigfile use 32 M items per file)
ROWS_PER_FILE = 32 * 1024 * 1024


def rank_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` held by ``rank`` of ``size`` (nbodykit's split)."""
    return n * rank // size, n * (rank + 1) // size


def _prefix(dataset) -> str:
    if dataset is None or dataset in ("", ".", "/", "./"):
        return ""
    dataset = str(dataset).strip("/")
    return dataset + "/"


def _dataset_label(dataset) -> str:
    prefix = _prefix(dataset)
    return f"dataset {prefix.rstrip('/')!r}" if prefix else "top level"


def read_catalog(
    path,
    columns: Sequence[str] = ("Position",),
    dataset: str | None = "1",
    comm=None,
) -> tuple[dict, dict]:
    """Read columns of a FastPM or nbodykit bigfile catalog.

    Parameters
    ----------
    path : str or Path
        The bigfile directory.
    columns : sequence of str
        Column names to read (``Position`` and ``Velocity`` must be (N, 3)).
    dataset : str or None
        Dataset holding the columns: ``"1"`` for FastPM output (and nbodykit ``save(...,
        dataset="1")``), ``None`` for columns at the top level (nbodykit ``save`` default).
    comm : MPI communicator, optional
        Each rank reads only rows ``[N * rank // size, N * (rank + 1) // size)``.

    Returns
    -------
    data : dict of numpy arrays
        The requested columns (this rank's rows only when ``comm`` is given).
    attrs : dict
        Merged attributes of ``Header``, ``header`` and the dataset; ``"json://"`` values decoded,
        single-element arrays as scalars.

    Raises
    ------
    FileNotFoundError
        No such bigfile, or a physical file of a column is missing.
    ValueError
        Missing dataset or column, columns of different lengths, a vector column that is not
        (N, 3), or truncated data.
    """
    fault_point("read")
    path = Path(path)
    if isinstance(columns, str):
        columns = (columns,)
    columns = tuple(columns)
    if not columns:
        raise ValueError(f"catalog {path}: no columns requested")
    prefix = _prefix(dataset)
    label = _dataset_label(dataset)
    kind = "catalog"

    with _bigfile.open_file(path, kind) as ff:
        blocks = set(ff.blocks)
        available = sorted(b[len(prefix) :] for b in blocks if b.startswith(prefix))
        available = [b for b in available if "/" not in b and b not in HEADER_BLOCKS]
        if prefix and not any(b.startswith(prefix) for b in blocks):
            raise ValueError(
                f"catalog {path}: no {label} (blocks found: {sorted(blocks)}); "
                "for columns stored at the top level (nbodykit save) pass dataset=None"
            )
        attrs = _read_header(ff, path, prefix, blocks)

        sizes, dtypes = {}, {}
        for col in columns:
            name = prefix + col
            if name not in blocks:
                raise ValueError(
                    f"catalog {path}: {label} has no column {col!r} (columns found: {available})"
                )
            with _bigfile.open_block(ff, path, name, kind) as block:
                sizes[col], dtypes[col] = int(block.size), block.dtype
            shape = dtypes[col].shape
            if col in VECTOR_COLUMNS and shape != (3,):
                found = ", ".join(["N", *map(str, shape)])
                raise ValueError(
                    f"catalog {path}: column {col!r} has shape ({found}), expected (N, 3)"
                )
            if col in VECTOR_COLUMNS and dtypes[col].base.kind != "f":
                raise ValueError(
                    f"catalog {path}: column {col!r} has dtype {dtypes[col].base}, expected float"
                )
        if len(set(sizes.values())) > 1:
            raise ValueError(f"catalog {path}: {label} columns have different lengths {sizes}")
        n = next(iter(sizes.values()))
        for col in columns:
            _bigfile.check_physical_files(
                path / (prefix + col), dtypes[col], f"catalog {path}: column {col!r}"
            )

        start, stop = (0, n) if comm is None else rank_range(n, comm.rank, comm.size)
        data = {}
        for col in columns:
            name = prefix + col
            with _bigfile.open_block(ff, path, name, kind) as block:
                rows = _bigfile.read_rows(block, start, stop, path, name, kind)
            data[col] = rows.reshape((stop - start, *dtypes[col].shape))
    return data, attrs


def _read_header(ff, path: Path, prefix: str, blocks) -> dict:
    attrs: dict = {}
    names = [h for h in HEADER_BLOCKS if h in blocks]
    # the dataset's own attributes live on its directory when a writer put them there
    if prefix and (Path(path) / prefix / "attr-v2").is_file():
        names.append(prefix + ".")
    import bigfile

    for name in names:
        try:
            block = ff[name]
        except bigfile.Error as err:
            raise ValueError(
                f"catalog {path}: header block {name!r} cannot be read ({err})"
            ) from err
        with block:
            attrs.update(_bigfile.get_attrs(block))
    return attrs


def _check_columns(path, columns: Mapping, where_rank: str = "") -> dict:
    if not isinstance(columns, Mapping) or not columns:
        raise ValueError(f"catalog {path}: columns must be a non-empty dict of arrays")
    out, lengths = {}, {}
    for name, value in columns.items():
        if not isinstance(name, str) or not name or "/" in name or name in HEADER_BLOCKS:
            raise ValueError(f"catalog {path}: invalid column name {name!r}")
        arr = np.asarray(value)
        if arr.ndim not in (1, 2):
            raise ValueError(
                f"catalog {path}: column {name!r} has shape {arr.shape}{where_rank}, expected "
                "(N,) or (N, k)"
            )
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"catalog {path}: column {name!r} has unsupported dtype {arr.dtype}")
        if name in VECTOR_COLUMNS and (arr.ndim != 2 or arr.shape[1] != 3):
            found = ", ".join(["N", *map(str, arr.shape[1:])])
            raise ValueError(
                f"catalog {path}: column {name!r} has shape ({found}){where_rank}, expected (N, 3)"
            )
        out[name] = np.ascontiguousarray(arr)
        lengths[name] = len(arr)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"catalog {path}: columns have different lengths {lengths}{where_rank}")
    return out


def catalog_columns(path, dataset: str | None = "1") -> list[str]:
    """The column names of a bigfile catalog's ``dataset`` (header blocks left out).

    Parameters
    ----------
    path : str or Path
    dataset : str or None
        As :func:`read_catalog`'s.

    Raises
    ------
    FileNotFoundError, ValueError
        No such catalog, or no such dataset in it.
    """
    path = Path(path)
    prefix = _prefix(dataset)
    with _bigfile.open_file(path, "catalog") as ff:
        blocks = set(ff.blocks)
    if prefix and not any(b.startswith(prefix) for b in blocks):
        raise ValueError(f"catalog {path}: no {_dataset_label(dataset)} (blocks: {sorted(blocks)})")
    names = (b[len(prefix) :] for b in blocks if b.startswith(prefix))
    return sorted(b for b in names if b and "/" not in b and b not in HEADER_BLOCKS)


def catalog_attrs(path, dataset: str | None = "1") -> dict:
    """A bigfile catalog's merged attributes, as :func:`read_catalog` returns them."""
    path = Path(path)
    with _bigfile.open_file(path, "catalog") as ff:
        return _read_header(ff, path, _prefix(dataset), set(ff.blocks))


def _kept(keep_from, keep_dataset, columns: Mapping, attrs: dict, comm):
    """``columns`` and ``attrs`` completed with the input catalog's other columns and attrs."""
    if keep_from is None:
        return columns, attrs
    others = [c for c in catalog_columns(keep_from, keep_dataset) if c not in columns]
    use = comm if comm is not None and comm.size > 1 else None
    kept_cols: dict = {}
    if others:
        kept_cols, kept_attrs = read_catalog(keep_from, others, dataset=keep_dataset, comm=use)
    else:
        kept_attrs = catalog_attrs(keep_from, keep_dataset)
    n_in = {len(v) for v in kept_cols.values()}
    n_out = {len(np.asarray(v)) for v in columns.values()}
    if kept_cols and n_in != n_out:
        where = f" on rank {comm.rank}" if use is not None else ""
        raise ValueError(
            f"catalog {keep_from}: its columns {others} have {sorted(n_in)} rows{where}, the "
            f"columns written have {sorted(n_out)}: they must be the same particles, in the "
            "same order and the same share per rank"
        )
    return {**columns, **kept_cols}, {**kept_attrs, **attrs}


def write_catalog(
    path,
    columns: Mapping,
    attrs: Mapping | None = None,
    dataset: str | None = "1",
    comm=None,
    overwrite: bool = False,
    keep_from=None,
    keep_dataset: str | None = "1",
) -> None:
    """Write a bigfile catalog that :func:`read_catalog` and nbodykit's ``BigFileCatalog`` read.

    Parameters
    ----------
    path : str or Path
        Output bigfile directory. It is built under a temporary sibling name and renamed into
        place; an existing output of ours is replaced as a whole, anything else there is an error
        (see :func:`jerald_nbk.utils.atomic_dir`) unless ``overwrite``.
    columns : dict of str to array
        Columns with the same first dimension; ``Position`` and ``Velocity`` must be (N, 3).
    attrs : mapping, optional
        Catalog attributes (``BoxSize``, redshift, cosmology ...), stored on the ``Header`` block.
        Values bigfile cannot hold natively (dicts, None) are stored as ``"json://..."`` strings.
    dataset : str or None
        Dataset the columns go under (``"1"``: FastPM layout); ``None`` puts them at top level.
    comm : MPI communicator, optional
        Each rank passes its own rows; they are written in rank order. All ranks raise if any
        rank's input is bad or the write fails, and then nothing is left on disk.
    overwrite : bool
        Replace whatever stands at ``path`` (default: only a previous output of ours).
    keep_from : str or Path, optional
        An input catalog whose particles ``columns`` describe (e.g. improved positions of its
        particles): its columns that ``columns`` does not give (``Velocity``, ``ID``, ...) are
        copied (this rank's rows, read as :func:`read_catalog` reads them with ``comm``) and its
        attributes (redshift, cosmology, ...) are kept under ``attrs``, which override them.
    keep_dataset : str or None
        The dataset of ``keep_from`` (as :func:`read_catalog`'s ``dataset``).

    Raises
    ------
    ValueError
        Bad columns or attributes, or ``keep_from``'s columns of another length than
        ``columns`` (on any rank); nothing is written.
    jerald_nbk.utils.ForeignOutputError
        ``path`` holds something that is not a previous output of ours; it is left untouched.
    """
    path = Path(path)
    prefix = _prefix(dataset)
    attrs = dict(attrs or {})
    if keep_from is not None:
        if comm is not None and comm.size > 1:
            try:
                res, err = _kept(keep_from, keep_dataset, columns, attrs, comm), None
            except (OSError, ValueError) as e:
                res, err = None, e
            raise_first(comm, err)
            columns, attrs = res
        else:
            columns, attrs = _kept(keep_from, keep_dataset, columns, attrs, None)
    if comm is None or comm.size == 1:
        cols = _check_columns(path, columns)
        with atomic_dir(path, overwrite=overwrite) as tmp:
            _write_serial(tmp, path, cols, attrs, prefix)
        return
    _write_mpi(path, columns, attrs, prefix, comm, overwrite)


def _nfile(n: int) -> int:
    return max(1, (n + ROWS_PER_FILE - 1) // ROWS_PER_FILE)


def _write_serial(tmp: Path, path: Path, cols: dict, attrs: dict, prefix: str) -> None:
    import bigfile

    with bigfile.File(str(tmp), create=True) as ff:
        with ff.create("Header") as hb:
            _bigfile.set_attrs(hb, attrs, f"catalog {path}: Header")
        for name, arr in cols.items():
            dtype = np.dtype((arr.dtype, arr.shape[1:]))
            with ff.create(prefix + name, dtype, len(arr), _nfile(len(arr))) as bb:
                if len(arr):
                    bb.write(0, arr)


def _write_mpi(path: Path, columns, attrs: dict, prefix: str, comm, overwrite: bool) -> None:
    import bigfile

    where_rank = f" on rank {comm.rank}"
    try:
        cols, error = _check_columns(path, columns, where_rank), None
    except ValueError as err:
        cols, error = None, err
    raise_first(comm, error)
    layout = [(name, arr.dtype.str, arr.shape[1:]) for name, arr in cols.items()]
    layouts = comm.allgather(layout)
    if any(lay != layouts[0] for lay in layouts):
        raise ValueError(
            f"catalog {path}: ranks pass different columns/dtypes/shapes: "
            + "; ".join(f"rank {r}: {lay}" for r, lay in enumerate(layouts))
        )
    counts = comm.allgather(len(next(iter(cols.values()))))
    total, offset = sum(counts), sum(counts[: comm.rank])
    agree = comm.Dup()  # the writers' errors are gathered apart from bigfile's collectives

    def body(tmp):
        try:
            fault_point("write")
            with bigfile.FileMPI(comm, str(tmp), create=True) as ff:
                with ff.create("Header") as hb:
                    if comm.rank == 0:
                        _bigfile.set_attrs(hb, attrs, f"catalog {path}: Header")
                for name, arr in cols.items():
                    dtype = np.dtype((arr.dtype, arr.shape[1:]))
                    with ff.create(prefix + name, dtype, total, _nfile(total)) as bb:
                        if len(arr):
                            bb.write(offset, arr)
            return None
        except Exception as err:  # noqa: BLE001 - gathered and re-raised on every rank
            return err

    if comm.rank == 0:
        sent = False
        try:
            with atomic_dir(path, overwrite=overwrite) as tmp:
                comm.bcast(str(tmp), root=0)
                sent = True
                errors = gather_errors(agree, body(tmp), cleanup=tmp)
                first = next((e for e in errors if e is not None), None)
                if first is not None:
                    raise first
        except Exception as err:
            if not sent:  # release the other ranks with rank 0's reason: no directory to write to
                comm.bcast(err, root=0)
                sent = True
            raise
        finally:
            if not sent:
                comm.bcast(None, root=0)
            comm.barrier()  # the others return only once the directory is renamed or removed
    else:
        tmp = comm.bcast(None, root=0)
        if not isinstance(tmp, str):
            comm.barrier()
            if isinstance(tmp, BaseException):
                raise tmp
            raise OSError(f"catalog {path}: rank 0 could not create the temporary output directory")
        errors = gather_errors(agree, body(tmp), cleanup=tmp)
        first = next((e for e in errors if e is not None), None)
        comm.barrier()
        if first is not None:
            raise first
