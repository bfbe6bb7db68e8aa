"""Private helpers shared by the bigfile mesh and catalog readers/writers.

bigfile keeps each block in a directory holding a text ``header`` (dtype, items per row, physical
files with their row counts), one binary file per physical file (``000000``, ...) and ``attr-v2``.
Attribute values that bigfile cannot store (dicts, None, nested lists) are written as
``"json://" + json.dumps(value)``, as nbodykit does, and decoded back on reading.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

JSON_PREFIX = "json://"


class _NumpyJSON(json.JSONEncoder):
    """JSON encoder that accepts numpy scalars and arrays (written as plain lists)."""

    def default(self, o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        return super().default(o)


def set_attrs(block, attrs, where: str) -> None:
    """Store ``attrs`` on a bigfile block, JSON-encoding values bigfile cannot hold natively."""
    for key, value in attrs.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: attribute names must be non-empty strings, got {key!r}")
        native = value is not None and not isinstance(value, (dict, list, tuple))
        if isinstance(value, (list, tuple)):
            # homogeneous numeric/bool sequences are stored as arrays, like nbodykit does
            arr = np.asarray(value)
            native = arr.dtype.kind in "biuf" and arr.ndim == 1
            value = arr if native else value
        if native:
            try:
                block.attrs[key] = value
                continue
            except (ValueError, TypeError):
                pass
        try:
            block.attrs[key] = JSON_PREFIX + json.dumps(value, cls=_NumpyJSON)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: attribute {key!r} of type {type(value).__name__} cannot be stored"
            ) from err


def decode_attr(value):
    """A bigfile attribute as a Python value: JSON decoded, single-element arrays as scalars."""
    if isinstance(value, str):
        if value.startswith(JSON_PREFIX):
            return json.loads(value[len(JSON_PREFIX) :])
        return value
    arr = np.asarray(value)
    if arr.size == 1 and arr.ndim <= 1:
        return arr.reshape(()).item() if arr.dtype.kind == "b" else arr.reshape(())[()]
    return np.array(arr, copy=True)


def get_attrs(block) -> dict:
    """All attributes of an open bigfile block, decoded."""
    with warnings.catch_warnings():
        # bigfile 0.1.52 reads string attributes through numpy's deprecated 'a' dtype alias
        warnings.simplefilter("ignore", DeprecationWarning)
        return {key: decode_attr(block.attrs[key]) for key in block.attrs}


def check_physical_files(blockdir: Path, dtype: np.dtype, where: str) -> None:
    """Compare each physical file's length with the row count in the block header.

    bigfile only notices a truncated file when the missing rows are read; checking the sizes up
    front gives the same clear error on every rank, whatever range each rank reads.
    """
    header = blockdir / "header"
    try:
        lines = header.read_text().splitlines()
    except OSError:
        return  # bigfile itself will report the unreadable header
    for line in lines:
        # physical-file lines read "<hex index>: <rows> : <checksum> : <checksum>"; the
        # DTYPE / NMEMB / NFILE lines do not parse as a hex index and a row count
        parts = line.split(":")
        try:
            index = int(parts[0].strip(), 16)
            rows = int(parts[1].strip())
        except (ValueError, IndexError):
            continue
        phys = blockdir / f"{index:06X}"
        expected = rows * dtype.itemsize
        try:
            found = os.path.getsize(phys)
        except OSError:
            raise FileNotFoundError(
                f"{where}: physical file {phys} is missing (expected {expected} bytes)"
            ) from None
        if found < expected:
            raise ValueError(
                f"{where}: physical file {phys} is truncated: {found} bytes, expected {expected} "
                f"({rows} rows of {dtype})"
            )


def open_file(path, kind: str):
    """Open an existing bigfile, turning a missing path into a FileNotFoundError naming it."""
    import bigfile

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{kind} {path}: no such bigfile directory")
    try:
        return bigfile.File(str(path))
    except bigfile.Error as err:
        raise ValueError(f"{kind} {path}: not a readable bigfile ({err})") from err


def open_block(ff, path, name: str, kind: str):
    """Open block ``name`` of an open bigfile with errors that name the file and the block."""
    import bigfile

    blockdir = Path(path) / name
    if not (blockdir / "header").is_file():
        available = sorted(b for b in ff.blocks)
        raise ValueError(f"{kind} {path}: no dataset {name!r} (blocks found: {available})")
    try:
        block = ff[name]
    except bigfile.Error as err:
        raise ValueError(f"{kind} {path}: dataset {name!r} cannot be opened ({err})") from err
    return block


def read_rows(block, start: int, stop: int, path, name: str, kind: str) -> np.ndarray:
    """Rows ``[start, stop)`` of a block, with bigfile's errors turned into ValueErrors."""
    import bigfile

    try:
        return block[start:stop]
    except bigfile.Error as err:
        raise ValueError(
            f"{kind} {path}: dataset {name!r} rows {start}:{stop} cannot be read ({err})"
        ) from err
