"""Files in and out: bigfile meshes and catalogs (FastPM, nbodykit, LDL/JERALD layouts).

* :mod:`.meshes`: :func:`write_mesh`, :func:`read_mesh`; :func:`read_mesh_slab` and
  :func:`write_mesh_slab` (one rank's part, collectively)
  (bigfile ``Field`` meshes, ``.npy``);
* :mod:`.catalogs`: :func:`read_catalog`, :func:`write_catalog` (FastPM ``1/Position`` layout and
  nbodykit's top-level layout), MPI-aware reads of each rank's share.

Importing this package does not import nbodykit (slow); bigfile is imported when a file is opened.
"""

from .catalogs import rank_range, read_catalog, write_catalog
from .meshes import read_mesh, read_mesh_slab, sidecar_path, write_mesh, write_mesh_slab
from .snapshots import SnapshotError, make_target, snapshot_files, write_target

__all__ = [
    "read_mesh",
    "read_mesh_slab",
    "write_mesh",
    "write_mesh_slab",
    "sidecar_path",
    "read_catalog",
    "write_catalog",
    "rank_range",
    "make_target",
    "write_target",
    "snapshot_files",
    "SnapshotError",
]
