"""nbodykit adapters: JeraldCatalog and JeraldMesh against the model run directly.

Inputs are Zel'dovich particles (16^3 in a 100 Mpc/h box, mesh 16^3) in an nbodykit
``ArrayCatalog``; parameters are written with ``save_params`` with non-trivial values so that the
improved positions differ from the inputs.

Tolerances:

* Position column vs ``Stage.displace``: exact (the same engine, the same float32 arithmetic);
* nbodykit ``FFTPower`` of a JeraldMesh vs :func:`jerald_nbk.analysis.power_spectrum` of the map
  from ``Pipeline.maps``: rtol 1e-4 (nbodykit transforms float32 meshes in float32, ours in
  float64); k and mode counts exact;
* save / ``BigFileMesh`` round trip: exact;
* 2 ranks (pmesh engine) vs 1 process (JAX engine), float32: rtol 1e-4 on positions and maps, as for
  the engines' own float32 parity tests (CIC weights rounded differently).
"""

import os

import numpy as np
import pytest
from mpi4py import MPI

from jerald_nbk.analysis import power_spectrum
from jerald_nbk.io.paramfiles import save_params
from jerald_nbk.model.params import ParamTable, table
from jerald_nbk.model.pipeline import Pipeline, Stage, StageConfig
from jerald_nbk.pm import JaxEngine
from jerald_nbk.testing import zeldovich_particles

nbodykit_lab = pytest.importorskip("nbodykit.lab")
from jerald_nbk.sources import JeraldCatalog, JeraldMesh  # noqa: E402

COMM = MPI.COMM_WORLD
NSIDE, NMESH, BOX = 16, 16, 100.0
PROV = {"BoxSize": [BOX] * 3, "Nmesh": [NMESH] * 3, "redshift": 0.0}

CONFIGS = {
    "dm": StageConfig("dm", n_layers=2),
    "stellar": StageConfig("stellar", n_layers=1),
    "hi": StageConfig("hi", n_layers=1),
}

#: physical values that move particles visibly (alpha in (Mpc/h)^2) and give non-trivial maps
PHYS = {
    "dm": {"alpha_0": 10.0, "gamma_0": 1.0, "nu_0": -1.0, "alpha_1": -0.5, "kl_1": 2.0},
    "stellar": {"alpha_0": 0.5, "w": 0.02, "mu": 1.5, "b": 0.005},
    "hi": {"alpha1_0": 0.3, "alpha2_0": 0.1, "w": 1.0, "mu": 1.2, "beta1": 0.2, "beta2": 0.1},
}


def raw_params(target):
    tab = ParamTable(table(target, CONFIGS[target].n_layers, w_init=1.0))
    phys = tab.as_dict(tab.init_raw()) | PHYS[target]
    return tab.to_raw(phys)


@pytest.fixture(scope="module")
def param_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("params") if COMM.rank == 0 else None
    root = COMM.bcast(str(root) if root is not None else None)
    paths = {}
    for target, cfg in CONFIGS.items():
        paths[target] = save_params(
            f"{root}/{target}.json", cfg, raw_params(target), PROV, comm=COMM
        )
    COMM.barrier()
    return paths


@pytest.fixture(scope="module")
def particles():
    return zeldovich_particles(NSIDE, BOX, seed=3, rms_disp=0.6)


def serial_catalog(pos, **attrs):
    from nbodykit.lab import ArrayCatalog

    vel = np.arange(pos.size, dtype="f4").reshape(pos.shape)
    return ArrayCatalog({"Position": pos, "Velocity": vel}, comm=MPI.COMM_SELF, **attrs)


def local_catalog(pos, comm, **attrs):
    """Rows [N r / size, N (r+1) / size) on rank r (nbodykit's split)."""
    from nbodykit.lab import ArrayCatalog

    n = len(pos)
    lo, hi = n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size
    vel = np.arange(pos.size, dtype="f4").reshape(pos.shape)
    return ArrayCatalog({"Position": pos[lo:hi], "Velocity": vel[lo:hi]}, comm=comm, **attrs)


def reference_pipeline(targets=("dm", "stellar", "hi")):
    pm = JaxEngine(NMESH, BOX)
    return Pipeline(**{t: (Stage(pm, CONFIGS[t]), raw_params(t)) for t in targets})


# --------------------------------------------------------------------------------- catalogs


def test_catalog_position_is_stage_displace(param_files, particles):
    src = serial_catalog(particles, BoxSize=BOX)
    cat = JeraldCatalog(src, param_files["dm"], velocity="input")
    expected = np.mod(np.asarray(reference_pipeline(["dm"]).improve(particles)), BOX)
    got = cat["Position"].compute()
    np.testing.assert_array_equal(got, expected.astype("f4"))
    # the layers really moved the particles (by a fraction of a cell)
    moved = np.abs(np.mod(got - particles + BOX / 2, BOX) - BOX / 2)
    assert moved.max() > 0.05 * BOX / NMESH
    # pass-through column, sizes, provenance
    np.testing.assert_array_equal(cat["Velocity"].compute(), src["Velocity"].compute())
    assert cat.size == cat.csize == NSIDE**3
    assert cat.attrs["jerald.dm.params"] == str(param_files["dm"])
    assert cat.attrs["jerald.dm.layers"] == 2
    np.testing.assert_array_equal(cat.attrs["Nmesh"], [NMESH] * 3)
    np.testing.assert_allclose(cat.attrs["BoxSize"], [BOX] * 3)
    assert cat.attrs["jerald.backend"] == "jax"


def test_catalog_accepts_stage_and_pipeline(param_files, particles):
    src = serial_catalog(particles)
    pipe = reference_pipeline(["dm"])
    a = JeraldCatalog(src, param_files["dm"])["Position"].compute()
    b = JeraldCatalog(src, pipe)["Position"].compute()
    c = JeraldCatalog(src, pipe.dm)["Position"].compute()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_catalog_to_mesh_fftpower_save(param_files, particles, tmp_path):
    from nbodykit.lab import BigFileCatalog, FFTPower

    cat = JeraldCatalog(serial_catalog(particles, BoxSize=BOX), param_files["dm"], velocity="input")
    mesh = cat.to_mesh(resampler="cic", compensated=False)  # Nmesh, BoxSize from attrs
    r = FFTPower(mesh, mode="1d").power
    density = np.asarray(JaxEngine(NMESH, BOX).density(cat["Position"].compute()))
    ours = power_spectrum(density, BOX)
    ok = np.isfinite(ours.power) & (ours.modes > 1)
    np.testing.assert_allclose(r["power"].real[ok], ours.power[ok], rtol=1e-4)

    cat.save(str(tmp_path / "improved"), ["Position", "Velocity"])
    back = BigFileCatalog(str(tmp_path / "improved"), comm=MPI.COMM_SELF)
    np.testing.assert_array_equal(back["Position"].compute(), cat["Position"].compute())
    np.testing.assert_array_equal(back["Velocity"].compute(), cat["Velocity"].compute())
    assert back.attrs["jerald.dm.params"] == str(param_files["dm"])
    # slicing keeps the improved column and the class working
    sub = cat[:10]
    np.testing.assert_array_equal(sub["Position"].compute(), cat["Position"].compute()[:10])


def test_catalog_mismatched_boxsize(param_files, particles):
    with pytest.raises(ValueError, match=r"BoxSize mismatch.*dm\.json.*100\.0.*80\.0"):
        JeraldCatalog(serial_catalog(particles, BoxSize=80.0), param_files["dm"])
    with pytest.raises(
        ValueError, match=r"Nmesh mismatch.*\[32, 32, 32\].*dm\.json.*\[16, 16, 16\]"
    ):
        JeraldCatalog(serial_catalog(particles), param_files["dm"], Nmesh=32)


def test_catalog_bad_geometry_names_its_source(param_files, particles):
    # bug caught: Nmesh=16.5 was truncated to 16 and then "agreed" with the parameter file's 16
    with pytest.raises(ValueError, match=r"the Nmesh argument: Nmesh must be whole numbers"):
        JeraldCatalog(serial_catalog(particles), param_files["dm"], Nmesh=16.5)
    # bug caught: a negative BoxSize from the catalog's attrs reached the engine, whose error did
    # not say which of the three records (argument, parameter file, catalog) was wrong
    with pytest.raises(ValueError, match=r"the input catalog: BoxSize must be positive"):
        JeraldCatalog(serial_catalog(particles, BoxSize=-100.0), param_files["dm"])


def test_catalog_needs_geometry(particles):
    pipe_free = (Stage(JaxEngine(NMESH, BOX), CONFIGS["dm"]), raw_params("dm"))
    cat = JeraldCatalog(serial_catalog(particles), pipe_free)  # the stage's engine gives both
    assert cat.attrs["jerald.dm.params"] == "<in memory>"
    from nbodykit.lab import ArrayCatalog

    with pytest.raises(ValueError, match="no 'Position' column"):
        JeraldCatalog(ArrayCatalog({"X": particles}, comm=MPI.COMM_SELF), pipe_free)


# ----------------------------------------------------------------------------------- meshes


@pytest.mark.parametrize("target", ["dm", "stellar", "hi"])
def test_mesh_power_equals_pipeline_maps(param_files, particles, target):
    from nbodykit.lab import FFTPower

    kw = {"dm": param_files["dm"], "stellar": param_files["stellar"], "hi": param_files["hi"]}
    mesh = JeraldMesh(serial_catalog(particles, BoxSize=BOX), target=target, **kw)
    expected = np.asarray(reference_pipeline().maps(particles)[target])
    expected = expected / expected.mean(dtype=np.float64)  # compute() is 1 + delta (nbodykit's)
    field = mesh.compute(mode="real")
    np.testing.assert_allclose(field.value, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    assert np.std(expected) > 0
    if target == "dm":
        np.testing.assert_allclose(expected.mean(), 1.0, rtol=1e-5)

    r = FFTPower(mesh, mode="1d").power
    # bins in the mesh's (float32) precision, as nbodykit does
    ours = power_spectrum(expected.astype(np.float32), BOX)
    np.testing.assert_array_equal(r["modes"], ours.modes)
    ok = np.isfinite(ours.power)
    np.testing.assert_allclose(r["k"][ok], ours.k[ok], rtol=1e-6)
    np.testing.assert_allclose(r["power"].real[ok], ours.power[ok], rtol=1e-4, atol=1e-12)
    assert mesh.attrs["target"] == target


def test_mesh_cross_power_apply_paint_save(param_files, particles, tmp_path):
    from nbodykit.lab import BigFileMesh, FFTPower

    src = serial_catalog(particles, BoxSize=BOX)
    dm = JeraldMesh(src, dm=param_files["dm"])
    star = JeraldMesh(src, dm=param_files["dm"], stellar=param_files["stellar"], target="stellar")
    maps = reference_pipeline(["dm", "stellar"]).maps(particles)
    maps = {k: np.asarray(v) / np.asarray(v).mean(dtype=np.float64) for k, v in maps.items()}

    cross = FFTPower(dm, mode="1d", second=star).power
    ours = power_spectrum(
        np.asarray(maps["dm"], "f4"), BOX, second=np.asarray(maps["stellar"], "f4")
    )
    ok = np.isfinite(ours.power)
    np.testing.assert_allclose(cross["power"].real[ok], ours.power[ok], rtol=1e-4, atol=1e-12)

    # apply: a real-space action on a view, the original untouched
    doubled = dm.apply(lambda x, v: 2 * v, kind="relative", mode="real")
    np.testing.assert_allclose(doubled.compute().value, 2 * np.asarray(maps["dm"]), rtol=1e-6)
    with pytest.warns(DeprecationWarning):
        painted = dm.paint(mode="real")
    np.testing.assert_allclose(painted.value, np.asarray(maps["dm"]), rtol=1e-6)

    star.save(str(tmp_path / "star"))
    back = BigFileMesh(str(tmp_path / "star"), dataset="Field", comm=MPI.COMM_SELF)
    np.testing.assert_array_equal(back.compute().value, star.compute().value)
    np.testing.assert_allclose(back.attrs["BoxSize"], [BOX] * 3)
    assert back.attrs["target"] == "stellar"


def test_mesh_input_checks(param_files, particles):
    src = serial_catalog(particles)
    with pytest.raises(ValueError, match="needs the stellar parameters"):
        JeraldMesh(src, dm=param_files["dm"], hi=param_files["hi"], target="hi")
    with pytest.raises(ValueError, match="holds a 'dm' model, expected 'stellar'"):
        JeraldMesh(src, stellar=param_files["dm"], target="stellar")
    with pytest.raises(ValueError, match="BoxSize mismatch"):
        JeraldMesh(src, dm=param_files["dm"], BoxSize=50.0)


def test_every_model_target_has_raw_units():
    # bug caught: a target added to the model's registry (model.params.TARGETS, which JeraldMesh
    # accepts) without its units here fails with a KeyError after the whole model has run
    from jerald_nbk.model.params import TARGETS
    from jerald_nbk.sources import RAW_UNITS

    assert set(RAW_UNITS) == set(TARGETS)


# ------------------------------------------------- behaving like nbodykit's own sources


def nbodykit_mesh(pos):
    """What nbodykit does with the same positions: an ArrayCatalog painted with CIC."""
    from nbodykit.lab import ArrayCatalog

    cat = ArrayCatalog({"Position": np.asarray(pos, "f4")}, comm=MPI.COMM_SELF, BoxSize=BOX)
    return cat.to_mesh(Nmesh=NMESH, BoxSize=BOX, resampler="cic", compensated=False)


@pytest.mark.parametrize("dm", [False, True])
def test_mesh_normalize_and_power_match_nbodykit_array_catalog(param_files, particles, dm):
    """JeraldMesh(target='dm') = nbodykit painting the (improved) positions, both normalisations."""
    from nbodykit.lab import FFTPower

    src = serial_catalog(particles, BoxSize=BOX)
    mesh = JeraldMesh(src, dm=param_files["dm"] if dm else None, target="dm", Nmesh=NMESH)
    pos = JeraldCatalog(src, param_files["dm"])["Position"].compute() if dm else particles
    ref = nbodykit_mesh(pos)
    for normalize in (False, True):
        ours = mesh.to_real_field(normalize=normalize)
        theirs = ref.to_real_field(normalize=normalize)
        np.testing.assert_allclose(ours.value, theirs.value, rtol=1e-5, atol=1e-5)
        assert ours.attrs["normalized"] is normalize
        np.testing.assert_allclose(ours.attrs["shotnoise"], theirs.attrs["shotnoise"], rtol=1e-12)
    raw = mesh.to_real_field(normalize=False).value
    np.testing.assert_allclose(raw.sum(), NSIDE**3, rtol=1e-5)  # counts of unit-mass particles
    assert mesh.attrs["units"] == "1+delta"
    assert "particles per cell" in mesh.attrs["raw_units"]

    p_ours = FFTPower(mesh, mode="1d").power
    p_theirs = FFTPower(ref, mode="1d").power
    np.testing.assert_array_equal(p_ours["modes"], p_theirs["modes"])
    ok = p_theirs["modes"] > 1
    np.testing.assert_allclose(p_ours["power"].real[ok], p_theirs["power"].real[ok], rtol=1e-4)
    assert p_ours.attrs["shotnoise"] == pytest.approx(p_theirs.attrs["shotnoise"], rel=1e-12)


def test_mesh_out_and_raw_units(param_files, particles):
    """``out`` is written and returned; ``normalize=False`` is the model's map, True map/mean."""
    src = serial_catalog(particles, BoxSize=BOX)
    kw = {"dm": param_files["dm"], "stellar": param_files["stellar"]}
    star = JeraldMesh(src, **kw)  # target inferred: the last stage given
    assert star.attrs["target"] == "stellar"
    assert star.attrs["raw_units"] == "1e10 Msun/h per cell"
    expected = np.asarray(reference_pipeline(["dm", "stellar"]).maps(particles)["stellar"])
    out = star.pm.create(type="real")
    got = star.to_real_field(out=out, normalize=False)
    assert got is out
    np.testing.assert_allclose(out.value, expected, rtol=1e-6, atol=1e-6 * expected.max())
    assert out.attrs["units"] == "1e10 Msun/h per cell"
    mean = expected.mean(dtype=np.float64)
    assert out.attrs["mean"] == pytest.approx(mean, rel=1e-5)
    norm = star.to_real_field()
    np.testing.assert_allclose(norm.value, expected / mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.value.mean(dtype=np.float64), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"out is on a mesh with Nmesh \[8, 8, 8\]"):
        from pmesh.pm import ParticleMesh

        other = ParticleMesh(Nmesh=[8] * 3, BoxSize=BOX, comm=MPI.COMM_SELF, dtype="f4")
        star.to_real_field(out=other.create(type="real"))


def test_catalog_velocity_withheld_unless_asked(param_files, particles):
    src = serial_catalog(particles, BoxSize=BOX)
    cat = JeraldCatalog(src, param_files["dm"])
    assert "Velocity" not in cat.columns
    with pytest.raises(KeyError, match="withheld.*velocity='input'"):
        cat["Velocity"]
    assert "withheld (Velocity)" in cat.attrs["jerald.velocity"]
    kept = JeraldCatalog(src, param_files["dm"], velocity="input")
    np.testing.assert_array_equal(kept["Velocity"].compute(), src["Velocity"].compute())
    assert kept.attrs["jerald.velocity"].startswith("input")
    with pytest.raises(ValueError, match="velocity must be None or 'input'"):
        JeraldCatalog(src, param_files["dm"], velocity="fastpm")


@pytest.mark.parametrize("flavour", ["jerald", "ldl"])
def test_plaintext_parameter_files(param_files, particles, tmp_path, flavour):
    """LDL and JERALD plain-text files give the model those codes define, layers from the length."""
    from jerald_nbk.io.paramfiles import save_plaintext

    order, green = {"ldl": (4, "sm"), "jerald": (6, None)}[flavour]
    configs = {
        t: StageConfig(t, CONFIGS[t].n_layers, order, False, green) for t in ("dm", "stellar")
    }
    paths = {
        t: save_plaintext(tmp_path / f"{t}.txt", configs[t], raw_params(t), flavour)
        for t in configs
    }
    src = serial_catalog(particles, BoxSize=BOX)
    cat = JeraldCatalog(src, paths["dm"], flavour=flavour, Nmesh=NMESH)
    pm = JaxEngine(NMESH, BOX)
    ref = Pipeline(**{t: (Stage(pm, c), raw_params(t)) for t, c in configs.items()})
    np.testing.assert_allclose(
        cat["Position"].compute(), np.mod(np.asarray(ref.improve(particles)), BOX), atol=1e-4
    )
    assert cat.attrs["jerald.dm.format"] == flavour
    assert cat.attrs["jerald.dm.layers"] == CONFIGS["dm"].n_layers
    if flavour == "jerald":  # the same model as the JSON file: the same positions
        json_pos = JeraldCatalog(src, param_files["dm"])["Position"].compute()
        np.testing.assert_allclose(cat["Position"].compute(), json_pos, atol=1e-4)
    star = JeraldMesh(src, dm=paths["dm"], stellar=paths["stellar"], flavour=flavour, Nmesh=NMESH)
    expected = np.asarray(ref.maps(particles)["stellar"])
    np.testing.assert_allclose(
        star.to_real_field(normalize=False).value, expected, rtol=1e-5, atol=1e-5 * expected.max()
    )
    # mixed: a JSON DM stage and a plain-text stellar stage
    JeraldMesh(src, dm=param_files["dm"], stellar=paths["stellar"], flavour={"stellar": flavour})


def test_parameter_file_ambiguities(param_files, particles, tmp_path):
    from jerald_nbk.io.paramfiles import save_plaintext

    src = serial_catalog(particles, BoxSize=BOX)
    path = save_plaintext(tmp_path / "dm.txt", CONFIGS["dm"], raw_params("dm"), "jerald")
    with pytest.raises(
        ValueError, match=r"dm\.txt is plain text.*flavour='ldl' or flavour='jerald'"
    ):
        JeraldCatalog(src, path, Nmesh=NMESH)
    with pytest.raises(ValueError, match=r"10 values are a 2-layer dm model, but layers=3"):
        JeraldCatalog(src, path, flavour="jerald", layers=3, Nmesh=NMESH)
    with pytest.raises(ValueError, match=r"has 2 dm layers, but layers=1"):
        JeraldCatalog(src, param_files["dm"], layers=1)
    with pytest.raises(ValueError, match=r"layers=2 is ambiguous with 2 stages"):
        JeraldMesh(src, dm=param_files["dm"], stellar=param_files["stellar"], layers=2)
    with pytest.raises(ValueError, match=r"BoxSize is not given"):  # plain text records no mesh
        JeraldCatalog(serial_catalog(particles), path, flavour="jerald")
    with pytest.raises(ValueError, match=r"11 values; a JERALD reference dm file has 5\*Nstep"):
        bad = tmp_path / "bad.txt"
        np.savetxt(bad, np.ones(11))
        JeraldCatalog(src, bad, flavour="jerald", Nmesh=NMESH)


# ------------------------------------------------------------------------------------- MPI


@pytest.mark.mpi(min_size=2)
def test_mpi_matches_single_process(param_files, particles):
    from nbodykit.lab import FFTPower

    comm = COMM
    src = local_catalog(particles, comm, BoxSize=BOX)
    cat = JeraldCatalog(src, param_files["dm"], velocity="input")
    pos = np.concatenate(comm.allgather(cat["Position"].compute()))
    vel = np.concatenate(comm.allgather(cat["Velocity"].compute()))
    kw = {"dm": param_files["dm"], "stellar": param_files["stellar"], "hi": param_files["hi"]}
    fields = {}
    powers = {}
    for target in ("dm", "stellar", "hi"):
        mesh = JeraldMesh(src, target=target, **kw)
        f = mesh.compute()
        fields[target] = np.zeros([NMESH] * 3, "f4")
        for sl, part in comm.allgather((f.slices, f.value)):
            fields[target][sl] = part
        powers[target] = FFTPower(mesh, mode="1d").power["power"].real
    assert cat.attrs["jerald.backend"] == "pmesh"
    assert cat.csize == NSIDE**3

    serial = serial_catalog(particles)
    ref = JeraldCatalog(serial, param_files["dm"], BoxSize=BOX)["Position"].compute()
    dpos = np.mod(pos - ref + BOX / 2, BOX) - BOX / 2
    np.testing.assert_allclose(dpos, 0, atol=1e-4 * BOX)
    np.testing.assert_array_equal(vel, serial["Velocity"].compute())
    maps = reference_pipeline().maps(particles)
    for target in ("dm", "stellar", "hi"):
        expected = np.asarray(maps[target]) / np.asarray(maps[target]).mean(dtype=np.float64)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(fields[target], expected, atol=1e-4 * scale)
        ours = power_spectrum(expected.astype(np.float32), BOX).power
        ok = np.isfinite(ours)
        np.testing.assert_allclose(powers[target][ok], ours[ok], rtol=1e-3, atol=1e-8 * scale**2)


@pytest.mark.mpi(min_size=2)
def test_mpi_save_round_trip(param_files, particles, tmp_path):
    """Collective saves (atomic: written under a temporary name) read back whole by nbodykit."""
    from nbodykit.lab import BigFileCatalog, BigFileMesh

    root = COMM.bcast(str(tmp_path) if COMM.rank == 0 else None)
    src = local_catalog(particles, COMM, BoxSize=BOX)
    cat = JeraldCatalog(src, param_files["dm"], velocity="input")
    mesh = JeraldMesh(src, dm=param_files["dm"], stellar=param_files["stellar"], target="stellar")
    cat.save(f"{root}/cat", ["Position", "Velocity"])
    mesh.save(f"{root}/mesh")
    pos = np.concatenate(COMM.allgather(cat["Position"].compute()))
    f = mesh.compute()
    full = np.zeros([NMESH] * 3, "f4")
    for sl, part in COMM.allgather((f.slices, f.value)):
        full[sl] = part
    if COMM.rank == 0:
        back = BigFileCatalog(f"{root}/cat", comm=MPI.COMM_SELF)
        np.testing.assert_array_equal(back["Position"].compute(), pos)
        m = BigFileMesh(f"{root}/mesh", dataset="Field", comm=MPI.COMM_SELF).compute()
        np.testing.assert_array_equal(m.value, full)
        assert sorted(os.listdir(root)) == ["cat", "mesh"]  # no temporaries left
