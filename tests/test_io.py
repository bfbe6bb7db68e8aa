"""Meshes and catalogs on disk: round trips, nbodykit interoperability, bad files, atomicity, MPI.

Round trips are exact (bit for bit). nbodykit reads what we write and we read what nbodykit
writes, in both catalog layouts (FastPM ``1/`` dataset and nbodykit's top level).
"""

import os

import numpy as np
import pytest

from jerald_nbk.io import catalogs as catalogs_mod
from jerald_nbk.io import (
    rank_range,
    read_catalog,
    read_mesh,
    read_mesh_slab,
    sidecar_path,
    write_catalog,
    write_mesh,
    write_mesh_slab,
)


def listing(directory):
    """Everything in a directory, temporaries included (they start with a dot)."""
    return sorted(os.listdir(directory))


def random_mesh(shape, dtype, seed=0):
    return np.random.default_rng(seed).lognormal(size=shape).astype(dtype)


# --------------------------------------------------------------------------- meshes: round trips


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,box", [((8, 8, 8), 25.0), ((8, 6, 4), (10.0, 12.0, 14.0))])
def test_mesh_round_trip_bigfile(tmp_path, dtype, shape, box):
    arr = random_mesh(shape, dtype)
    attrs = {"redshift": 2.0, "units": "1e10 Msun/h", "prescription": {"T0": 1e4, "gamma": 1.5}}
    write_mesh(tmp_path / "m", arr, box, attrs=attrs)
    out, got = read_mesh(tmp_path / "m")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(got["BoxSize"], np.broadcast_to(box, (3,)))
    np.testing.assert_array_equal(got["Nmesh"], shape)
    np.testing.assert_array_equal(got["ndarray.shape"], shape)
    assert got["redshift"] == 2.0
    assert got["units"] == "1e10 Msun/h"
    assert got["prescription"] == {"T0": 1e4, "gamma": 1.5}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mesh_round_trip_npy(tmp_path, dtype):
    arr = random_mesh((6, 8, 10), dtype)
    write_mesh(tmp_path / "m.npy", arr, (6.0, 8.0, 10.0), attrs={"redshift": 5.0})
    assert sidecar_path(tmp_path / "m.npy").is_file()
    out, got = read_mesh(tmp_path / "m.npy", BoxSize=(6.0, 8.0, 10.0), Nmesh=(6, 8, 10))
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(got["BoxSize"], [6.0, 8.0, 10.0])
    assert got["redshift"] == 5.0


def test_npy_without_sidecar_needs_boxsize(tmp_path):
    arr = random_mesh((4, 4, 4), np.float32)
    np.save(tmp_path / "bare.npy", arr)
    with pytest.raises(FileNotFoundError, match=r"bare\.npy\.json.*BoxSize"):
        read_mesh(tmp_path / "bare.npy")
    out, got = read_mesh(tmp_path / "bare.npy", BoxSize=20.0)
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(got["BoxSize"], [20.0] * 3)


def test_mesh_accepts_jax_arrays(tmp_path):
    import jax.numpy as jnp

    arr = jnp.arange(64, dtype=jnp.float32).reshape(4, 4, 4)
    write_mesh(tmp_path / "j", arr, 4.0)
    out, _ = read_mesh(tmp_path / "j")
    np.testing.assert_array_equal(out, np.asarray(arr))


def test_write_mesh_replaces_existing(tmp_path):
    write_mesh(tmp_path / "m", np.zeros((4, 4, 4)), 1.0)
    write_mesh(tmp_path / "m", np.ones((2, 2, 2), np.float32), 2.0)
    out, got = read_mesh(tmp_path / "m")
    np.testing.assert_array_equal(out, np.ones((2, 2, 2)))
    np.testing.assert_array_equal(got["BoxSize"], [2.0] * 3)
    assert listing(tmp_path) == ["m"]


# ------------------------------------------------------------------- meshes: nbodykit interop


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nbodykit_bigfilemesh_reads_our_mesh(tmp_path, dtype):
    from nbodykit.lab import BigFileMesh

    arr = random_mesh((8, 6, 4), dtype, seed=3)
    write_mesh(tmp_path / "m", arr, (10.0, 12.0, 14.0), attrs={"redshift": 0.0})
    mesh = BigFileMesh(str(tmp_path / "m"), "Field")
    np.testing.assert_array_equal(mesh.pm.Nmesh, [8, 6, 4])
    np.testing.assert_array_equal(mesh.pm.BoxSize, [10.0, 12.0, 14.0])
    assert np.dtype(mesh.dtype) == dtype
    np.testing.assert_array_equal(mesh.compute(mode="real").preview(), arr)


def test_we_read_nbodykit_saved_mesh(tmp_path):
    from nbodykit.lab import ArrayMesh

    arr = random_mesh((8, 6, 4), np.float64, seed=4)
    ArrayMesh(arr, BoxSize=(10.0, 12.0, 14.0)).save(str(tmp_path / "nb"), dataset="Field")
    out, got = read_mesh(tmp_path / "nb")
    np.testing.assert_array_equal(out, arr)
    np.testing.assert_array_equal(got["BoxSize"], [10.0, 12.0, 14.0])


# ------------------------------------------------------------------------ meshes: bad files


def _bigfile_block(path, name, data, attrs):
    import bigfile

    with bigfile.File(str(path), create=True) as ff:
        with ff.create_from_array(name, data) as bb:
            for key, value in attrs.items():
                bb.attrs[key] = value


def test_read_mesh_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_mesh(tmp_path / "nothere")
    with pytest.raises(FileNotFoundError, match=r"nothere\.npy"):
        read_mesh(tmp_path / "nothere.npy")


def test_read_mesh_missing_dataset(tmp_path):
    write_mesh(tmp_path / "m", np.zeros((4, 4, 4)), 1.0)
    with pytest.raises(
        ValueError, match=r"mesh .*/m: no dataset 'Density' \(blocks found: \['Field'\]"
    ):
        read_mesh(tmp_path / "m", dataset="Density")


def test_read_mesh_missing_attribute(tmp_path):
    _bigfile_block(tmp_path / "m", "Field", np.zeros(64), {"Nmesh": [4, 4, 4]})
    with pytest.raises(ValueError, match=r"dataset 'Field' has no attribute 'BoxSize'"):
        read_mesh(tmp_path / "m")


def test_read_mesh_wrong_shape(tmp_path):
    attrs = {"Nmesh": [4, 4, 4], "BoxSize": [1.0, 1.0, 1.0], "ndarray.shape": [4, 4, 4]}
    _bigfile_block(tmp_path / "m", "Field", np.zeros(60), attrs)
    with pytest.raises(ValueError, match=r"has 60 values, expected 64 for Nmesh \[4, 4, 4\]"):
        read_mesh(tmp_path / "m")
    attrs["ndarray.shape"] = [8, 2, 4]
    _bigfile_block(tmp_path / "n", "Field", np.zeros(64), attrs)
    with pytest.raises(ValueError, match=r"'ndarray.shape' \[8, 2, 4\] != Nmesh \[4, 4, 4\]"):
        read_mesh(tmp_path / "n")


def test_read_mesh_expected_values(tmp_path):
    write_mesh(tmp_path / "m", np.zeros((4, 4, 4)), 80.0)
    with pytest.raises(ValueError, match=r"BoxSize \[80.0, 80.0, 80.0\] != expected \[100.0"):
        read_mesh(tmp_path / "m", BoxSize=100.0)
    with pytest.raises(ValueError, match=r"Nmesh \[4, 4, 4\] != expected \[8, 8, 8\]"):
        read_mesh(tmp_path / "m", Nmesh=8)


def test_read_mesh_complex_field(tmp_path):
    attrs = {"Nmesh": [4, 4, 4], "BoxSize": [1.0, 1.0, 1.0], "ndarray.shape": [4, 4, 3]}
    _bigfile_block(tmp_path / "c", "Field", np.zeros(48, np.complex64), attrs)
    with pytest.raises(ValueError, match=r"complex \(Fourier-space\) mesh.*mode='real'"):
        read_mesh(tmp_path / "c")


def test_read_mesh_truncated(tmp_path):
    write_mesh(tmp_path / "m", np.ones((8, 8, 8), np.float32), 1.0)
    phys = tmp_path / "m" / "Field" / "000000"
    with open(phys, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ValueError, match=r"000000 is truncated: 100 bytes, expected 2048"):
        read_mesh(tmp_path / "m")
    phys.unlink()
    with pytest.raises(FileNotFoundError, match="000000 is missing"):
        read_mesh(tmp_path / "m")


def test_read_mesh_truncated_npy(tmp_path):
    write_mesh(tmp_path / "m.npy", np.ones((8, 8, 8)), 1.0)
    with open(tmp_path / "m.npy", "r+b") as fh:
        fh.truncate(300)
    with pytest.raises(ValueError, match=r"m\.npy: not a readable \.npy file"):
        read_mesh(tmp_path / "m.npy")


@pytest.mark.parametrize(
    "array,box,match",
    [
        (np.zeros((4, 4)), (1.0, 1.0, 1.0), "BoxSize must be a number or 2 numbers"),
        (np.zeros(4), 1.0, r"2- or 3-dimensional, got shape \(4,\)"),
        (np.zeros((4, 4, 4), np.complex64), 1.0, "must be real"),
        (np.zeros((4, 4, 4)), -1.0, "BoxSize must be positive"),
    ],
)
def test_write_mesh_bad_input_writes_nothing(tmp_path, array, box, match):
    with pytest.raises(ValueError, match=match):
        write_mesh(tmp_path / "m", array, box)
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------- meshes: atomicity


def test_failed_mesh_write_keeps_previous_file(tmp_path):
    old = random_mesh((4, 4, 4), np.float32)
    write_mesh(tmp_path / "m", old, 5.0)
    # the field data is already written when the unstorable attribute fails
    with pytest.raises(ValueError, match="attribute 'bad'"):
        write_mesh(tmp_path / "m", np.zeros((8, 8, 8)), 9.0, attrs={"bad": object()})
    out, got = read_mesh(tmp_path / "m")
    np.testing.assert_array_equal(out, old)
    np.testing.assert_array_equal(got["BoxSize"], [5.0] * 3)
    assert listing(tmp_path) == ["m"]


def test_failed_npy_write_keeps_previous_file(tmp_path):
    old = random_mesh((4, 4, 4), np.float64)
    write_mesh(tmp_path / "m.npy", old, 5.0)
    with pytest.raises(ValueError, match="attribute 'bad' of type object"):
        write_mesh(tmp_path / "m.npy", np.zeros((8, 8, 8)), 9.0, attrs={"bad": object()})
    out, _ = read_mesh(tmp_path / "m.npy")
    np.testing.assert_array_equal(out, old)
    assert listing(tmp_path) == ["m.npy", "m.npy.json"]


# ------------------------------------------------------------------------------ catalogs


def random_catalog(n=100, box=10.0, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Position": rng.uniform(0, box, (n, 3)).astype(np.float32),
        "Velocity": rng.normal(size=(n, 3)).astype(np.float32),
        "ID": np.arange(n, dtype=np.uint64),
        "Mass": rng.uniform(size=n),
    }


@pytest.mark.parametrize("dataset", ["1", None])
def test_catalog_round_trip(tmp_path, dataset):
    cols = random_catalog()
    attrs = {"BoxSize": 10.0, "NC": 5, "Time": 0.5, "cosmology": {"Om0": 0.308, "h": 0.678}}
    write_catalog(tmp_path / "c", cols, attrs, dataset=dataset)
    data, got = read_catalog(tmp_path / "c", list(cols), dataset=dataset)
    for name, arr in cols.items():
        assert data[name].dtype == arr.dtype
        np.testing.assert_array_equal(data[name], arr)
    assert got["BoxSize"] == 10.0 and got["NC"] == 5 and got["Time"] == 0.5
    assert got["cosmology"] == {"Om0": 0.308, "h": 0.678}


def test_empty_catalog_round_trip(tmp_path):
    write_catalog(tmp_path / "c", {"Position": np.zeros((0, 3))}, {"BoxSize": 1.0})
    data, _ = read_catalog(tmp_path / "c")
    assert data["Position"].shape == (0, 3)


@pytest.mark.parametrize("dataset", ["1", None])
def test_nbodykit_bigfilecatalog_reads_our_catalog(tmp_path, dataset):
    from nbodykit.lab import BigFileCatalog

    cols = random_catalog(seed=1)
    write_catalog(tmp_path / "c", cols, {"BoxSize": 10.0, "Time": 0.25}, dataset=dataset)
    kwargs = {"dataset": dataset} if dataset else {}
    cat = BigFileCatalog(str(tmp_path / "c"), **kwargs)
    assert cat.csize == 100
    for name in cols:
        # nbodykit hands 1D bigfile columns back as (N, 1), its own saved ones included
        np.testing.assert_array_equal(cat[name].compute().reshape(cols[name].shape), cols[name])
    np.testing.assert_array_equal(cat.attrs["BoxSize"], [10.0])
    np.testing.assert_array_equal(cat.attrs["Time"], [0.25])


@pytest.mark.parametrize("dataset", [None, "1"])
def test_we_read_nbodykit_saved_catalog(tmp_path, dataset):
    from nbodykit.lab import UniformCatalog

    cat = UniformCatalog(nbar=0.1, BoxSize=10.0, seed=7)
    cat.save(str(tmp_path / "u"), ["Position", "Velocity"], dataset=dataset)
    data, attrs = read_catalog(tmp_path / "u", ("Position", "Velocity"), dataset=dataset)
    np.testing.assert_array_equal(data["Position"], cat["Position"].compute())
    np.testing.assert_array_equal(data["Velocity"], cat["Velocity"].compute())
    np.testing.assert_array_equal(attrs["BoxSize"], [10.0, 10.0, 10.0])
    assert attrs["seed"] == 7


def test_fastpm_layout_with_dataset_attrs(tmp_path):
    """FastPM files: columns under 1/, run attributes on Header, more on the dataset itself."""
    import bigfile

    pos = np.random.default_rng(2).uniform(0, 8.0, (27, 3)).astype(np.float32)
    with bigfile.File(str(tmp_path / "fastpm"), create=True) as ff:
        ff.create_from_array("1/Position", pos).close()
        ff.create_from_array("1/Velocity", np.zeros_like(pos)).close()
        with ff.create("Header") as hb:
            hb.attrs["BoxSize"] = np.array([8.0])
            hb.attrs["NC"] = np.array([3])
            hb.attrs["ScalingFactor"] = np.array([0.5])
        with ff.create("1/.") as db:
            db.attrs["ScalingFactor"] = np.array([1.0])  # the dataset's own value wins
    data, attrs = read_catalog(tmp_path / "fastpm", ["Position", "Velocity"])
    np.testing.assert_array_equal(data["Position"], pos)
    assert attrs["BoxSize"] == 8.0 and attrs["NC"] == 3 and attrs["ScalingFactor"] == 1.0


# --------------------------------------------------------------------- catalogs: bad files


def test_read_catalog_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalog .*/none: no such bigfile"):
        read_catalog(tmp_path / "none")


def test_read_catalog_missing_dataset_and_column(tmp_path):
    write_catalog(tmp_path / "c", random_catalog(), {"BoxSize": 10.0}, dataset=None)
    with pytest.raises(ValueError, match=r"no dataset '1'.*pass dataset=None"):
        read_catalog(tmp_path / "c")
    with pytest.raises(ValueError, match=r"top level has no column 'Density' \(columns found:"):
        read_catalog(tmp_path / "c", ["Position", "Density"], dataset=None)


def test_read_catalog_wrong_shape(tmp_path):
    import bigfile

    with bigfile.File(str(tmp_path / "c"), create=True) as ff:
        ff.create_from_array("1/Position", np.zeros((10, 2), np.float32)).close()
        ff.create_from_array("1/Velocity", np.zeros((9, 3), np.float32)).close()
    with pytest.raises(
        ValueError, match=r"column 'Position' has shape \(N, 2\), expected \(N, 3\)"
    ):
        read_catalog(tmp_path / "c")
    with pytest.raises(ValueError, match=r"columns have different lengths"):
        write_catalog(tmp_path / "d", {"Position": np.zeros((10, 3)), "ID": np.arange(9)}, {})


def test_read_catalog_truncated(tmp_path):
    write_catalog(tmp_path / "c", random_catalog(n=50), {"BoxSize": 10.0})
    with open(tmp_path / "c" / "1" / "Velocity" / "000000", "r+b") as fh:
        fh.truncate(120)
    with pytest.raises(ValueError, match=r"column 'Velocity'.*truncated: 120 bytes, expected 600"):
        read_catalog(tmp_path / "c", ["Position", "Velocity"])
    read_catalog(tmp_path / "c", ["Position"])  # the intact column still reads


def test_write_catalog_bad_position_writes_nothing(tmp_path):
    with pytest.raises(
        ValueError, match=r"column 'Position' has shape \(N, 2\), expected \(N, 3\)"
    ):
        write_catalog(tmp_path / "c", {"Position": np.zeros((5, 2))}, {})
    assert listing(tmp_path) == []


def test_failed_catalog_write_keeps_previous_file(tmp_path, monkeypatch):
    old = random_catalog(seed=5)
    write_catalog(tmp_path / "c", old, {"BoxSize": 10.0})
    calls = []

    def failing_nfile(n):
        calls.append(n)
        if len(calls) == 2:  # Header and the first column are on disk by now
            raise OSError("disk full (simulated)")
        return 1

    monkeypatch.setattr(catalogs_mod, "_nfile", failing_nfile)
    with pytest.raises(OSError, match="simulated"):
        write_catalog(tmp_path / "c", random_catalog(n=7, seed=6), {"BoxSize": 99.0})
    monkeypatch.undo()
    data, attrs = read_catalog(tmp_path / "c", list(old))
    np.testing.assert_array_equal(data["Position"], old["Position"])
    assert attrs["BoxSize"] == 10.0
    assert listing(tmp_path) == ["c"]


def test_rank_range_covers_rows():
    for n in (0, 1, 7, 100):
        for size in (1, 2, 3, 5):
            ranges = [rank_range(n, r, size) for r in range(size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            # balanced like nbodykit's split: shares differ by one row at most
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) == n // size


# ----------------------------------------------------------------------------------- MPI


def _shared_dir(comm, tmp_path):
    """One directory for all ranks: rank 0's tmp_path."""
    return comm.bcast(str(tmp_path), root=0)


@pytest.mark.mpi(min_size=2)
def test_mpi_read_catalog_splits_rows(tmp_path):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = os.path.join(_shared_dir(comm, tmp_path), "c")
    n = 101
    if comm.rank == 0:
        write_catalog(path, random_catalog(n=n, seed=8), {"BoxSize": 10.0})
    comm.barrier()
    data, attrs = read_catalog(path, ["Position", "ID"], comm=comm)
    start, stop = rank_range(n, comm.rank, comm.size)
    assert len(data["ID"]) == stop - start  # this rank's share only, not the whole catalog
    np.testing.assert_array_equal(data["ID"], np.arange(start, stop))
    ids = np.concatenate(comm.allgather(data["ID"]))
    assert len(ids) == n and len(np.unique(ids)) == n  # full coverage, no overlap
    assert attrs["BoxSize"] == 10.0


@pytest.mark.mpi(min_size=2)
def test_mpi_write_catalog_in_rank_order(tmp_path):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = os.path.join(_shared_dir(comm, tmp_path), "w")
    full = random_catalog(n=53, seed=9)
    start, stop = rank_range(53, comm.rank, comm.size)
    local = {k: v[start:stop] for k, v in full.items()}
    write_catalog(path, local, {"BoxSize": 10.0}, comm=comm)
    data, _ = read_catalog(path, list(full))
    for name in full:
        np.testing.assert_array_equal(data[name], full[name])
    # a bad input on one rank: every rank raises, nothing is replaced
    bad = dict(local)
    if comm.rank == 1:
        bad["Position"] = bad["Position"][:, :2]
    with pytest.raises(ValueError, match="expected \\(N, 3\\)"):
        write_catalog(path, bad, {"BoxSize": 1.0}, comm=comm)
    data, attrs = read_catalog(path, ["Position"])
    np.testing.assert_array_equal(data["Position"], full["Position"])
    assert attrs["BoxSize"] == 10.0


@pytest.mark.mpi(min_size=2)
def test_mpi_read_mesh_broadcasts(tmp_path):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    path = os.path.join(_shared_dir(comm, tmp_path), "m")
    arr = random_mesh((4, 6, 8), np.float32, seed=10)
    write_mesh(path, arr, 5.0, comm=comm)
    out, attrs = read_mesh(path, comm=comm)
    np.testing.assert_array_equal(out, arr)
    with pytest.raises(ValueError, match="no dataset 'Other'"):
        read_mesh(path, dataset="Other", comm=comm)


# ------------------------------------------------------------- slab reads (issue 13, item 3)


@pytest.mark.parametrize("name", ["m", "m.npy"])
def test_read_mesh_slab_is_the_slice(tmp_path, name):
    """``read_mesh_slab`` returns ``mesh[slices]``; out-of-range planes and steps are refused."""
    arr = random_mesh((6, 5, 4), np.float32, seed=12)
    write_mesh(tmp_path / name, arr, 10.0)
    part, attrs = read_mesh_slab(tmp_path / name, (slice(2, 5), slice(None), slice(1, 3)))
    np.testing.assert_array_equal(part, arr[2:5, :, 1:3])
    assert attrs["Nmesh"].tolist() == [6, 5, 4]  # the whole mesh's, not the part's
    part, _ = read_mesh_slab(tmp_path / name, (slice(4, None),))
    np.testing.assert_array_equal(part, arr[4:])
    with pytest.raises(ValueError, match=r"planes \[3, 9\) outside"):
        read_mesh_slab(tmp_path / name, (slice(3, 9),))
    with pytest.raises(ValueError, match="step"):
        read_mesh_slab(tmp_path / name, (slice(0, 6, 2),))
    with pytest.raises(ValueError, match="BoxSize"):
        read_mesh_slab(tmp_path / name, (slice(0, 2),), BoxSize=9.0)
    # no plane: the header only (a rank without planes, mesh_of); a .npy refused it as "a mesh
    # must have at least one cell per axis"
    part, attrs = read_mesh_slab(tmp_path / name, (slice(0, 0),))
    assert part.shape == (0, 5, 4) and attrs["Nmesh"].tolist() == [6, 5, 4]
    from jerald_nbk.cli.common import mesh_of

    nmesh, box = mesh_of(tmp_path / name)
    assert nmesh == (6, 5, 4) and box.tolist() == [10.0] * 3


def spy_on_row_reads(monkeypatch) -> list:
    """The (start, stop) row ranges asked of ``io._bigfile.read_rows`` from now on (a live list)."""
    from jerald_nbk.io import _bigfile

    asked = []
    real = _bigfile.read_rows

    def spy(block, start, stop, *a):
        asked.append((start, stop))
        return real(block, start, stop, *a)

    monkeypatch.setattr(_bigfile, "read_rows", spy)
    return asked


def test_read_mesh_slab_reads_only_its_rows(tmp_path, monkeypatch):
    """A slab of a bigfile mesh asks bigfile for its planes' rows only (not the whole block)."""

    arr = random_mesh((8, 3, 2), np.float64, seed=13)
    write_mesh(tmp_path / "m", arr, 4.0)
    asked = spy_on_row_reads(monkeypatch)
    part, _ = read_mesh_slab(tmp_path / "m", (slice(5, 7), slice(None), slice(None)))
    np.testing.assert_array_equal(part, arr[5:7])
    assert asked == [(5 * 6, 7 * 6)]


@pytest.mark.mpi(min_size=2)
def test_mpi_read_mesh_slab_pmesh_engine(tmp_path):
    """Each rank of a pmesh engine reads its own slab: together they are the whole mesh, and an
    error on one rank (a missing file there) is raised on every rank."""
    from mpi4py import MPI

    from jerald_nbk.pm import PmeshEngine

    comm = MPI.COMM_WORLD
    root = _shared_dir(comm, tmp_path)
    arr = random_mesh((8, 8, 8), np.float32, seed=14)
    pm = PmeshEngine(8, 5.0, dtype="f4", comm=comm)
    for name in ("m", "m.npy"):
        write_mesh(os.path.join(root, name), arr, 5.0, comm=comm)
        sl = pm.local_slices("real")
        part, attrs = read_mesh_slab(os.path.join(root, name), sl, comm=comm)
        assert part.shape == pm.local_real_shape and part.shape[0] < 8  # not the whole mesh
        np.testing.assert_array_equal(part, arr[sl])
        np.testing.assert_array_equal(pm.to_global(part), arr)
    missing = os.path.join(root, "m" if comm.rank == 0 else "none")
    with pytest.raises((FileNotFoundError, ValueError)):
        read_mesh_slab(missing, pm.local_slices("real"), comm=comm)


@pytest.mark.mpi(min_size=2)
def test_mpi_workflow_read_map_reads_only_its_slab(tmp_path, monkeypatch):
    """``workflow.read_map`` on the pmesh engine gives the old whole-mesh path's local part (read
    everything, divide, ``to_local``), but each rank reads only the rows of its own planes (issue
    13 item 3: before, every rank received the whole mesh)."""
    from mpi4py import MPI

    from jerald_nbk import workflow as wf
    from jerald_nbk.pm import PmeshEngine

    comm = MPI.COMM_WORLD
    root = _shared_dir(comm, tmp_path)
    arr = random_mesh((8, 6, 4), np.float32, seed=21)
    pm = PmeshEngine((8, 6, 4), 5.0, dtype="f4", comm=comm)
    path = os.path.join(root, "target")
    write_mesh(path, arr, 5.0, comm=comm)
    asked = spy_on_row_reads(monkeypatch)
    local, attrs = wf.read_map(path, pm, scale=2.5)
    monkeypatch.undo()
    asked = [(a, b) for a, b in asked if b > a]  # the header read asks for no row
    old = pm.to_local(np.asarray(read_mesh(path)[0], dtype="f4") / 2.5)
    np.testing.assert_array_equal(np.asarray(local), np.asarray(old))
    sl = pm.local_slices("real")[0]
    rows = (sl.stop - sl.start) * 6 * 4
    assert rows < arr.size  # a slab, not the whole mesh
    assert sum(stop - start for start, stop in asked) == rows
    assert all(sl.start * 24 <= a and b <= sl.stop * 24 for a, b in asked)
    assert list(attrs["Nmesh"]) == [8, 6, 4]


# ------------------------------------------------------------ slab writes (issue 13, item 3)


@pytest.mark.parametrize("name", ["m", "m.npy"])
def test_write_mesh_slab_parts_make_the_whole_file(tmp_path, name):
    """Parts written one after another through ``write_mesh_slab``'s runs give, byte for byte
    in values, the file ``write_mesh`` writes for the whole mesh: x slabs, a 2-D (x, y)
    decomposition (one run per plane) and a part cut in z (one run per row)."""
    from jerald_nbk.io.meshes import _c_order_runs

    arr = random_mesh((6, 5, 4), np.float32, seed=31)
    for sl in (
        (slice(2, 5), slice(0, 5), slice(0, 4)),
        (slice(1, 4), slice(2, 5), slice(0, 4)),
        (slice(0, 2), slice(1, 3), slice(1, 3)),
    ):
        flat = np.full(arr.size, np.nan, np.float32)
        for offset, run in _c_order_runs(arr[sl], sl, arr.shape):
            flat[offset : offset + run.size] = run
        want = np.full(arr.shape, np.nan, np.float32)
        want[sl] = arr[sl]
        np.testing.assert_array_equal(flat.reshape(arr.shape), want)
    # on one process the whole-mesh call and the slab call write the same file
    write_mesh(tmp_path / ("a" + name), arr, 3.0, attrs={"units": "x"})
    full = tuple(slice(0, n) for n in arr.shape)
    write_mesh_slab(tmp_path / ("b" + name), arr, full, arr.shape, 3.0, attrs={"units": "x"})
    a, attrs_a = read_mesh(tmp_path / ("a" + name))
    b, attrs_b = read_mesh(tmp_path / ("b" + name))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype == np.float32 and attrs_b["units"] == "x"
    assert attrs_b["Nmesh"].tolist() == [6, 5, 4]


def test_write_mesh_slab_refuses_a_part_that_does_not_match_its_slices(tmp_path):
    arr = random_mesh((6, 5, 4), np.float32, seed=32)
    with pytest.raises(ValueError, match=r"part of shape \(2, 5, 4\).*need \(3, 5, 4\)"):
        write_mesh_slab(
            tmp_path / "m", arr[:2], (slice(0, 3),) * 1 + (slice(None),) * 2, arr.shape, 1.0
        )
    with pytest.raises(ValueError, match="2 or 3 axes"):
        write_mesh_slab(tmp_path / "m", arr[0, 0], (slice(0, 4),), (4,), 1.0)
    assert not (tmp_path / "m").exists()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", ["m", "m.npy"])
def test_mpi_write_mesh_slab_no_rank_holds_the_mesh(tmp_path, name):
    """Every rank writes its own part (the pmesh engine's x slabs, and pmesh's default 2-D
    decomposition on 4 ranks): the file is the whole mesh. A bad part on one rank is an error on
    every rank and leaves no file."""
    from mpi4py import MPI
    from pmesh.pm import ParticleMesh

    from jerald_nbk.pm import PmeshEngine

    comm = MPI.COMM_WORLD
    root = _shared_dir(comm, tmp_path)
    arr = random_mesh((8, 6, 4), np.float64, seed=33)
    pm = PmeshEngine((8, 6, 4), 5.0, dtype="f8", comm=comm)
    sl = pm.local_slices("real")
    path = os.path.join(root, name)
    write_mesh_slab(path, arr[sl], sl, arr.shape, 5.0, attrs={"map": "dm"}, comm=comm)
    back, attrs = read_mesh(path)
    np.testing.assert_array_equal(back, arr)
    assert attrs["map"] == "dm"
    ppm = ParticleMesh(Nmesh=[8, 6, 4], BoxSize=5.0, dtype="f8", comm=comm)  # pmesh's own cut
    sl2 = tuple(ppm.create(type="real").slices)
    path2 = os.path.join(root, "2d" + name)
    write_mesh_slab(path2, arr[sl2], sl2, arr.shape, 5.0, comm=comm)
    np.testing.assert_array_equal(read_mesh(path2)[0], arr)
    bad = arr[sl] if comm.rank == 0 else arr[sl][:, :2]
    path3 = os.path.join(root, "bad" + name)
    with pytest.raises(ValueError, match="part of shape"):
        write_mesh_slab(path3, bad, sl, arr.shape, 5.0, comm=comm)
    comm.Barrier()
    assert not os.path.exists(path3)


@pytest.mark.mpi(min_size=2)
def test_mpi_write_mesh_slab_npy_fault_on_one_rank_writes_nothing(tmp_path, monkeypatch):
    """A failure while one rank writes its part of a ``.npy`` (the test-only fault hook, rank 1)
    is raised on every rank, and neither the file, its sidecar nor a temporary is left."""
    from mpi4py import MPI

    from jerald_nbk.pm import PmeshEngine
    from jerald_nbk.utils import FAULT_ENV

    comm = MPI.COMM_WORLD
    root = _shared_dir(comm, tmp_path)
    arr = random_mesh((8, 6, 4), np.float32, seed=34)
    sl = PmeshEngine((8, 6, 4), 5.0, dtype="f4", comm=comm).local_slices("real")
    monkeypatch.setenv(FAULT_ENV, "write:1")
    path = os.path.join(root, "m.npy")
    with pytest.raises(RuntimeError, match="injected fault at 'write' on rank 1"):
        write_mesh_slab(path, arr[sl], sl, arr.shape, 5.0, comm=comm)
    comm.Barrier()
    assert os.listdir(root) == []


# ------------------------------------------- metadata carried from inputs to outputs (issue 12)


@pytest.mark.parametrize("dataset", ["1", None])
def test_write_catalog_keeps_the_input_columns_and_attrs(tmp_path, dataset):
    """``keep_from``: an improved catalog keeps Velocity, ID, Mass and the input's redshift and
    cosmology; the new Position and the given attrs win; a length mismatch writes nothing."""
    cols = random_catalog(n=40, seed=15)
    cosmo = {"Omega_m": 0.3089, "h": 0.6774}
    write_catalog(
        tmp_path / "in",
        cols,
        {"BoxSize": 10.0, "redshift": 2.0, "cosmology": cosmo, "Om0": 0.3089},
        dataset=dataset,
    )
    moved = np.mod(cols["Position"] + 0.25, 10.0).astype(np.float32)
    write_catalog(
        tmp_path / "out",
        {"Position": moved},
        {"BoxSize": 10.0, "model": "JERALD"},
        keep_from=tmp_path / "in",
        keep_dataset=dataset,
    )
    data, attrs = read_catalog(tmp_path / "out", ["Position", "Velocity", "ID", "Mass"])
    np.testing.assert_array_equal(data["Position"], moved)
    for name in ("Velocity", "ID", "Mass"):
        np.testing.assert_array_equal(data[name], cols[name])
        assert data[name].dtype == cols[name].dtype
    assert attrs["redshift"] == 2.0 and attrs["cosmology"] == cosmo and attrs["Om0"] == 0.3089
    assert attrs["model"] == "JERALD"
    with pytest.raises(ValueError, match=r"in: its columns .* have \[40\] rows"):
        write_catalog(
            tmp_path / "short", {"Position": moved[:7]}, keep_from=tmp_path / "in",
            keep_dataset=dataset,
        )  # fmt: skip
    assert not (tmp_path / "short").exists()


@pytest.mark.mpi(min_size=2)
def test_mpi_write_catalog_keeps_the_input_columns(tmp_path):
    """Under MPI each rank's share of the input's columns goes with its share of the new ones."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    root = _shared_dir(comm, tmp_path)
    full = random_catalog(n=31, seed=16)
    if comm.rank == 0:
        write_catalog(os.path.join(root, "in"), full, {"BoxSize": 10.0, "redshift": 5.0})
    comm.barrier()
    start, stop = rank_range(31, comm.rank, comm.size)
    new = full["Position"][start:stop] * 0.5
    out = os.path.join(root, "out")
    write_catalog(out, {"Position": new}, {"BoxSize": 10.0}, comm=comm,
                  keep_from=os.path.join(root, "in"))  # fmt: skip
    data, attrs = read_catalog(out, ["Position", "ID", "Velocity"])
    np.testing.assert_array_equal(data["Position"], full["Position"] * 0.5)
    np.testing.assert_array_equal(data["ID"], full["ID"])
    np.testing.assert_array_equal(data["Velocity"], full["Velocity"])
    assert attrs["redshift"] == 5.0


def test_inherited_attrs():
    """Redshift, scale factor, cosmology and Om0 from the first source that has them; redshift
    from FastPM's Time (1/a - 1) and Time from a redshift."""
    from jerald_nbk.io.meshes import inherited_attrs

    fastpm = {"Time": 0.25, "OmegaM": 0.31, "BoxSize": 20.0}
    got = inherited_attrs(None, fastpm)
    assert got == {"Time": 0.25, "Om0": 0.31, "redshift": pytest.approx(3.0)}
    got = inherited_attrs({"redshift": 0.0}, {"redshift": 2.0, "cosmology": {"h": 0.7}})
    assert got == {"redshift": 0.0, "Time": 1.0, "cosmology": {"h": 0.7}}
    assert inherited_attrs({"redshift": None}, {}) == {}
