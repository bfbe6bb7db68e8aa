"""Small shared helpers: atomic file writes and MPI rank checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def json_safe(obj):
    """``obj`` with numpy arrays and scalars as lists and floats, and NaN/inf as None (strict JSON)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic) or (hasattr(obj, "item") and getattr(obj, "shape", None) == ()):
        obj = obj.item()  # numpy and JAX scalars
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def is_root(comm=None) -> bool:
    """True on rank 0 of ``comm`` (always true without MPI)."""
    return comm is None or comm.rank == 0


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    A reader never sees a half-written file, and an exception (or an interrupt) leaves any previous
    file untouched and no temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished directory onto ``path``, replacing any previous one."""
    import shutil

    if path.exists():
        old = path.with_name(f".{path.name}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path, comm=None):
    """Build a directory under a temporary name; rename it onto ``path`` on success.

    For multi-file outputs (bigfile meshes and catalogs): an existing ``path`` is replaced only once
    the new one is complete. With an MPI ``comm`` every rank enters the block (collective writers):
    rank 0 creates the temporary directory and renames it once every rank has left the block
    without error; after an error on any rank it is removed and ``path`` is left untouched.
    """
    import shutil

    path = Path(path)
    if comm is None or comm.size == 1:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    from mpi4py import MPI

    tmp = None
    if comm.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(comm.bcast(tmp, root=0))
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        ok = comm.allreduce(ok, op=MPI.LAND)
        if comm.rank == 0:
            if ok:
                _replace_dir(tmp, path)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier()
