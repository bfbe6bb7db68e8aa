"""HDF5 snapshots (Gadget / AREPO / IllustrisTNG layouts) -> target maps.

Small synthetic snapshots are written with h5py, as one file and as 2 chunks
(``snap_033.0.hdf5``, ``snap_033.1.hdf5``) holding the same particles. Checks: mass conservation
(rtol 1e-12, float64 painting), kpc/h -> Mpc/h conversion (same map as a file written in Mpc/h),
the nHI, ne and T formulas by hand for a single particle, chunks = single file (rtol 1e-12),
clear errors (missing dataset, missing group, truncated file, mismatched boxes, missing chunk), a
2-rank run equal to the serial one.
"""

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from jerald_nbk.io import read_mesh
from jerald_nbk.io.snapshots import (
    BOLTZMANN_ERG_K,
    MPC_CM,
    PROTON_MASS_G,
    SnapshotError,
    make_target,
    snapshot_files,
    temperature,
    write_target,
)

COMM = MPI.COMM_WORLD
BOX_KPC = 25000.0  # 25 Mpc/h in kpc/h
H, Z, DM_MASS = 0.6774, 2.0, 0.05


def particles(seed=0, n=(300, 400, 200), box=BOX_KPC):
    """Gas, DM and star particles (code units: kpc/h, 1e10 Msun/h, (km/s)^2)."""
    rng = np.random.default_rng(seed)
    ngas, ndm, nstar = n
    return {
        0: {
            "Coordinates": rng.uniform(0, box, (ngas, 3)),
            "Masses": rng.uniform(1e-3, 2e-3, ngas),
            "Density": rng.lognormal(size=ngas),
            "NeutralHydrogenAbundance": rng.uniform(0, 1, ngas),
            "ElectronAbundance": rng.uniform(0, 1.16, ngas),
            "InternalEnergy": rng.uniform(10, 1e4, ngas),
        },
        1: {"Coordinates": rng.uniform(0, box, (ndm, 3))},
        4: {
            "Coordinates": rng.uniform(0, box, (nstar, 3)),
            "Masses": rng.uniform(1e-4, 1e-3, nstar),
        },
    }


def write_snapshot(base, parts, nchunks=1, box=BOX_KPC, header_extra=None, scale=1.0):
    """Write ``parts`` as ``base.hdf5`` (one chunk) or ``base.N.hdf5``; returns the paths."""
    totals = [len(parts.get(t, {}).get("Coordinates", [])) for t in range(6)]
    paths = []
    for c in range(nchunks):
        path = f"{base}.hdf5" if nchunks == 1 else f"{base}.{c}.hdf5"
        with h5py.File(path, "w") as fh:
            this = []
            for t in range(6):
                n = totals[t]
                lo, hi = n * c // nchunks, n * (c + 1) // nchunks
                this.append(hi - lo)
                if t in parts and hi > lo:
                    g = fh.create_group(f"PartType{t}")
                    for name, arr in parts[t].items():
                        data = arr[lo:hi] * (scale if name == "Coordinates" else 1.0)
                        g.create_dataset(name, data=data)
            head = fh.create_group("Header")
            head.attrs["BoxSize"] = box * scale
            head.attrs["NumPart_ThisFile"] = np.array(this, dtype=np.int32)
            head.attrs["NumPart_Total"] = np.array(totals, dtype=np.uint32)
            head.attrs["NumPart_Total_HighWord"] = np.zeros(6, dtype=np.uint32)
            head.attrs["NumFilesPerSnapshot"] = nchunks
            head.attrs["Redshift"] = Z
            head.attrs["Time"] = 1 / (1 + Z)
            head.attrs["MassTable"] = np.array([0, DM_MASS, 0, 0, 0, 0], dtype=float)
            head.attrs["HubbleParam"] = H
            for k, v in (header_extra or {}).items():
                head.attrs[k] = v
        paths.append(path)
    return paths


@pytest.fixture
def snaps(tmp_path):
    """The same particles as one file and as two chunks (written by rank 0)."""
    root = COMM.bcast(str(tmp_path) if COMM.rank == 0 else None)
    parts = particles()
    if COMM.rank == 0:
        (tmp_path / "single").mkdir()
        (tmp_path / "chunks").mkdir()
        write_snapshot(f"{root}/single/snap_033", parts)
        write_snapshot(f"{root}/chunks/snap_033", parts, nchunks=2)
    COMM.barrier()
    return {
        "single": f"{root}/single/snap_033.hdf5",
        "chunks": f"{root}/chunks/snap_033.0.hdf5",
        "parts": parts,
        "root": root,
    }


# --------------------------------------------------------------------------------- serial


def test_snapshot_files_finds_chunks(snaps):
    files = snapshot_files(snaps["chunks"])
    assert [f.name for f in files] == ["snap_033.0.hdf5", "snap_033.1.hdf5"]
    assert snapshot_files(snaps["single"])[0].name == "snap_033.hdf5"


@pytest.mark.parametrize("field", ["dm", "gas", "stellar"])
def test_mass_conservation_and_units(snaps, field):
    arr, attrs = make_target(snaps["single"], field, 16)
    ptype = {"dm": 1, "gas": 0, "stellar": 4}[field]
    parts = snaps["parts"][ptype]
    mass = parts["Masses"] if "Masses" in parts else np.full(len(parts["Coordinates"]), DM_MASS)
    if field == "stellar":
        np.testing.assert_allclose(arr.sum(), mass.sum(), rtol=1e-12)
    else:
        np.testing.assert_allclose(arr.mean(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(attrs["total_mass"], mass.sum(), rtol=1e-12)
    assert arr.shape == (16, 16, 16) and arr.dtype == np.float64
    np.testing.assert_allclose(attrs["BoxSize"], [25.0] * 3)
    assert attrs["input_length_units"] == "kpc/h"
    assert attrs["redshift"] == Z and attrs["field"] == field


def test_units_kpc_and_mpc_give_the_same_map(snaps, tmp_path):
    write_snapshot(tmp_path / "mpc", snaps["parts"], scale=1e-3)
    a, _ = make_target(snaps["single"], "stellar", 8)
    b, attrs = make_target(tmp_path / "mpc.hdf5", "stellar", 8)
    assert attrs["input_length_units"] == "Mpc/h"
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-15)
    # explicit units override the BoxSize heuristic, the header's unit length is used if present
    c, attrs = make_target(tmp_path / "mpc.hdf5", "stellar", 8, units="Mpc/h")
    np.testing.assert_array_equal(c, b)
    write_snapshot(
        tmp_path / "u", snaps["parts"], header_extra={"UnitLength_in_cm": 3.085677581e21}
    )
    _, attrs = make_target(tmp_path / "u.hdf5", "stellar", 8)
    assert attrs["input_length_units"] == "kpc/h"
    with pytest.raises(ValueError, match="units must be"):
        make_target(snaps["single"], "stellar", 8, units="pc")


def one_gas_particle(tmp_path, x_kpc, mass, fhi, xe, u):
    parts = {
        0: {
            "Coordinates": np.array([x_kpc]),
            "Masses": np.array([mass]),
            "NeutralHydrogenAbundance": np.array([fhi]),
            "ElectronAbundance": np.array([xe]),
            "InternalEnergy": np.array([u]),
        }
    }
    return write_snapshot(tmp_path / "one", parts)[0]


def test_nhi_ne_T_formulas_for_one_particle(tmp_path):
    # a particle exactly on a mesh node puts all its weight in that cell
    nmesh, cell_kpc = 10, BOX_KPC / 10
    x = [3 * cell_kpc, 5 * cell_kpc, 7 * cell_kpc]
    mass, fhi, xe, u = 2e-3, 0.3, 0.9, 5000.0
    path = one_gas_particle(tmp_path, x, mass, fhi, xe, u)

    # by hand: HI atoms / physical cm^3
    m_g = mass * 1.989e43 / H
    cell_cm = (cell_kpc * 1e-3) * MPC_CM / (1 + Z) / H
    nhi = 0.76 * m_g * fhi / PROTON_MASS_G / cell_cm**3
    ne = 0.76 * m_g * xe / PROTON_MASS_G / cell_cm**3
    mu = 4 / (1 + 3 * 0.76 + 4 * 0.76 * xe)
    T = (5 / 3 - 1) * u * 1e10 * mu * PROTON_MASS_G / BOLTZMANN_ERG_K

    arr, attrs = make_target(path, "nHI", nmesh)
    assert arr[3, 5, 7] == pytest.approx(nhi, rel=1e-10)
    assert np.count_nonzero(arr) == 1
    assert "NeutralHydrogenAbundance" in attrs["formula"] and attrs["units"].startswith("cm^-3")
    arr, _ = make_target(path, "ne", nmesh)
    assert arr[3, 5, 7] == pytest.approx(ne, rel=1e-10)
    arr, _ = make_target(path, "T", nmesh)
    assert arr[3, 5, 7] == pytest.approx(T, rel=1e-10)
    assert np.count_nonzero(arr) == 1  # empty cells are 0
    assert temperature(u, xe) == pytest.approx(T, rel=1e-12)
    assert 1e4 < T < 1e6  # 5000 (km/s)^2 of ionised gas is ~2e5 K


def test_T_is_mass_weighted(tmp_path):
    # two particles in the same cell: T = (m1 T1 + m2 T2) / (m1 + m2)
    cell = BOX_KPC / 4
    parts = {
        0: {
            "Coordinates": np.array([[cell, cell, cell]] * 2),
            "Masses": np.array([1e-3, 3e-3]),
            "NeutralHydrogenAbundance": np.array([0.1, 0.1]),
            "ElectronAbundance": np.array([1.0, 1.0]),
            "InternalEnergy": np.array([100.0, 900.0]),
        }
    }
    path = write_snapshot(tmp_path / "two", parts)[0]
    arr, _ = make_target(path, "T", 4)
    t1, t2 = temperature(np.array([100.0, 900.0]), np.array([1.0, 1.0]))
    assert arr[1, 1, 1] == pytest.approx((1e-3 * t1 + 3e-3 * t2) / 4e-3, rel=1e-10)


@pytest.mark.parametrize("field", ["dm", "stellar", "nHI", "T"])
def test_chunks_equal_single_file(snaps, field):
    a, attrs_a = make_target(snaps["single"], field, 16)
    b, attrs_b = make_target(snaps["chunks"], field, 16)
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.abs(a).max())
    assert len(attrs_b["files"]) == 2 and attrs_a["nparticles"] == attrs_b["nparticles"]


def test_write_target_round_trip(snaps, tmp_path):
    attrs = write_target(tmp_path / "nHI_map", snaps["chunks"], "nHI", 8)
    arr, back = read_mesh(tmp_path / "nHI_map")
    ref, _ = make_target(snaps["single"], "nHI", 8)
    np.testing.assert_allclose(arr, ref, rtol=1e-12)
    assert back["field"] == "nHI" and back["redshift"] == Z
    np.testing.assert_allclose(back["BoxSize"], attrs["BoxSize"])


# ---------------------------------------------------------------------------------- errors


def test_missing_dataset(snaps, tmp_path):
    parts = particles()
    del parts[0]["NeutralHydrogenAbundance"]
    path = write_snapshot(tmp_path / "nohi", parts)[0]
    with pytest.raises(
        SnapshotError, match=r"nohi\.hdf5.*PartType0 has no dataset 'NeutralHydrogenAbundance'"
    ):
        make_target(path, "nHI", 8)
    # the other fields still work
    make_target(path, "gas", 8)


def test_missing_group(tmp_path):
    parts = particles()
    path = write_snapshot(tmp_path / "nostars", parts)[0]
    with h5py.File(path, "a") as fh:
        del fh["PartType4"]
    with pytest.raises(SnapshotError, match=r"nostars\.hdf5: no group 'PartType4'"):
        make_target(path, "stellar", 8)


def test_truncated_file(snaps, tmp_path):
    data = open(snaps["chunks"].replace(".0.", ".1."), "rb").read()
    d = tmp_path / "trunc"
    d.mkdir()
    write_snapshot(d / "snap_033", particles(), nchunks=2)
    with open(d / "snap_033.1.hdf5", "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(SnapshotError, match=r"snap_033\.1\.hdf5: cannot open as HDF5"):
        make_target(d / "snap_033.0.hdf5", "dm", 8)


def test_mismatched_boxes_and_missing_chunk(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    write_snapshot(d / "snap_033", particles(), nchunks=2)
    with h5py.File(d / "snap_033.1.hdf5", "a") as fh:
        fh["Header"].attrs["BoxSize"] = 30000.0
    with pytest.raises(
        SnapshotError, match=r"disagree on BoxSize.*25000.*snap_033\.1\.hdf5.*30000"
    ):
        make_target(d / "snap_033.0.hdf5", "dm", 8)
    (d / "snap_033.1.hdf5").unlink()
    with pytest.raises(SnapshotError, match="NumFilesPerSnapshot = 2, but 1 chunk"):
        make_target(d / "snap_033.0.hdf5", "dm", 8)
    with pytest.raises(FileNotFoundError):
        make_target(d / "nothing.hdf5", "dm", 8)
    with pytest.raises(ValueError, match="field must be one of"):
        make_target(d / "snap_033.0.hdf5", "HI", 8)


# ------------------------------------------------------------------------------------- MPI


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("which", ["single", "chunks"])
def test_mpi_matches_serial(snaps, which, monkeypatch):
    from jerald_nbk.io import snapshots as mod

    read = []
    real_read = mod._read_rows

    def spy(files, heads, ptype, datasets, shares):
        read.extend((ptype, str(files[i]), a, b) for i, a, b in shares)
        return real_read(files, heads, ptype, datasets, shares)

    monkeypatch.setattr(mod, "_read_rows", spy)
    results = {f: make_target(snaps[which], f, 16, comm=COMM) for f in ("dm", "nHI", "T")}
    shares = COMM.allgather(read)
    if COMM.rank == 0:
        for field, (arr, _) in results.items():
            ref, _ = make_target(snaps[which], field, 16)
            np.testing.assert_allclose(arr, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    else:
        assert all(arr is None for arr, _ in results.values())
    # no rank read everything: each DM row was read by exactly one rank
    dm_rows = [sum(b - a for t, _, a, b in s if t == 1) for s in shares]
    assert sum(dm_rows) == 400 and max(dm_rows) < 400
