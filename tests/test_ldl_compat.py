"""``jerald-ldl`` behaves as LDL.py (biweidai/LDL, commit f62f3a6): its bounds, its optimiser
(L-BFGS-B, best by validation), its TNG inputs (small synthetic TNG-layout snapshots written
here: ``snapdir_099/snap_099.N.hdf5``), its targets and its files.

The expected TNG maps are an independent numpy evaluation of LDL's ``readTNG.load_TNG_map``
(its constants, its CIC weights), not our painting code.
"""

from __future__ import annotations

import h5py
import jax.numpy as jnp
import numpy as np
import pytest

from jerald_nbk.cli import ldl
from jerald_nbk.io import read_mesh, write_catalog, write_mesh
from jerald_nbk.io.paramfiles import load_plaintext
from jerald_nbk.model.params import LDL_BOUNDS, ParamTable, ldl_bounds, ldl_table, table
from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train.lbfgs import fit_lbfgsb
from jerald_nbk.train.loop import Objective, TrainConfig
from jerald_nbk.workflow import engine

BOX, N, SNAP, Z, H = 20.0, 8, 99, 1.0, 0.6774
LDL_CFG = StageConfig("stellar", 1, 4, green="sm")


# ------------------------------------------------------------------------------------ fixtures


def _cic(pos, weight, n=N, box=BOX):
    """CIC paint, numpy, periodic (pmesh's convention: cell centres at integer * H)."""
    x = pos / (box / n)
    i0 = np.floor(x).astype(int)
    f = x - i0
    out = np.zeros((n, n, n))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = (
                    (f[:, 0] if dx else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dz else 1 - f[:, 2])
                )
                idx = (i0 + [dx, dy, dz]) % n
                np.add.at(out, (idx[:, 0], idx[:, 1], idx[:, 2]), w * weight)
    return out


def _write_tng(base, parts, nchunks=2):
    """TNG's layout: ``base/snapdir_099/snap_099.{c}.hdf5``; coordinates in kpc/h."""
    d = base / f"snapdir_{SNAP:03d}"
    d.mkdir(parents=True)
    totals = [len(parts[t]["Coordinates"]) if t in parts else 0 for t in range(6)]
    for c in range(nchunks):
        with h5py.File(d / f"snap_{SNAP:03d}.{c}.hdf5", "w") as fh:
            this = []
            for t in range(6):
                lo, hi = totals[t] * c // nchunks, totals[t] * (c + 1) // nchunks
                this.append(hi - lo)
                if t in parts and hi > lo:
                    g = fh.create_group(f"PartType{t}")
                    for name, arr in parts[t].items():
                        g.create_dataset(name, data=arr[lo:hi])
            head = fh.create_group("Header")
            head.attrs["BoxSize"] = BOX * 1000.0
            head.attrs["NumPart_ThisFile"] = np.array(this, dtype=np.int32)
            head.attrs["NumPart_Total"] = np.array(totals, dtype=np.uint32)
            head.attrs["NumPart_Total_HighWord"] = np.zeros(6, dtype=np.uint32)
            head.attrs["NumFilesPerSnapshot"] = nchunks
            head.attrs["Redshift"] = Z
            head.attrs["Time"] = 1 / (1 + Z)
            head.attrs["MassTable"] = np.array([0, 0.01, 0, 0, 0, 0], dtype=float)
            head.attrs["HubbleParam"] = H
    return base


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """A TNG hydro and a TNG-Dark directory, a FastPM catalog, and the particles written."""
    d = tmp_path_factory.mktemp("ldl_tng")
    rng = np.random.default_rng(3)
    dm = zeldovich_particles(N, BOX, seed=2, rms_disp=0.8).astype(float)
    gas = np.mod(dm + rng.normal(0, 0.3, dm.shape), BOX)
    ngas = len(gas)
    hydro = {
        0: {
            "Coordinates": gas * 1000.0,
            "Masses": rng.uniform(1e-3, 2e-3, ngas),
            "ElectronAbundance": rng.uniform(0.5, 1.16, ngas),
            "NeutralHydrogenAbundance": rng.uniform(0, 0.2, ngas),
            "InternalEnergy": rng.uniform(1e2, 1e4, ngas),
        },
        1: {"Coordinates": dm * 1000.0},
        4: {
            "Coordinates": dm[::3] * 1000.0,
            "Masses": rng.uniform(1e-4, 1e-3, len(dm[::3])),
        },
    }
    vel = rng.normal(0, 100, dm.shape)
    dark = {1: {"Coordinates": dm * 1000.0, "Velocities": vel}}
    _write_tng(d / "TNG", hydro)
    _write_tng(d / "TNGDark", dark)
    fastpm = zeldovich_particles(N, BOX, seed=2, rms_disp=0.6)
    write_catalog(
        d / "fastpm",
        {"Position": fastpm, "Velocity": rng.normal(size=fastpm.shape).astype("f4")},
        {"BoxSize": BOX, "redshift": Z},
    )
    return {"dir": d, "hydro": hydro, "dark": dark}


def _ldl_n_cm3(mass, x, nmesh=N, box=BOX):
    """LDL's ``readTNG.n_cm3`` (SI constants as there; its 205 is the box)."""
    XH, mp, Msun10, Mpc_cm = 0.76, 1.6726219e-27, 1.989e40, 3.085678e24
    a = 1 / (1 + Z)
    return Msun10 / H / (a * box / nmesh * Mpc_cm / H) ** 3 * mass * XH / mp * x


def _ldl_temperature(xe, u):
    """LDL's ``readTNG.load_TNG_map`` temperature (SI)."""
    XH, kb, mp = 0.76, 1.38064852e-23, 1.6726219e-27
    mu = 4.0 / (1.0 + 3.0 * XH + 4.0 * XH * xe) * mp
    return 2.0 / 3.0 * 1e6 * u / kb * mu


def _ldl_expected(sims, field):
    """LDL's painted map of ``field`` from the synthetic hydro (or dark) particles."""
    if field == "dm":
        pos = sims["dark"][1]["Coordinates"] / 1000.0
        return _cic(pos, np.ones(len(pos))) * N**3 / len(pos)
    if field == "Mstar":
        s = sims["hydro"][4]
        return _cic(s["Coordinates"] / 1000.0, s["Masses"])
    g = sims["hydro"][0]
    pos = g["Coordinates"] / 1000.0
    if field == "nHI":
        return _cic(pos, _ldl_n_cm3(g["Masses"], g["NeutralHydrogenAbundance"]))
    ne = _ldl_n_cm3(g["Masses"], g["ElectronAbundance"])
    if field == "ne":
        return _cic(pos, ne)
    return _cic(pos, ne * _ldl_temperature(g["ElectronAbundance"], g["InternalEnergy"]))


def _pm():
    return engine((N,) * 3, BOX, "f4", "jax")


# ------------------------------------------------------------------------------------ bounds


def test_ldl_bounds_are_ldls():
    """The table reproduces LDL.py's ``bounds`` list (in our order and names)."""
    nmesh, box = 625, 205.0
    kmax = 2 * np.pi * nmesh / 205.0
    # LDL.py, verbatim but for None -> inf: layers (alpha, gamma, kh, kl, n), then mu, b1, b0
    ldl_list = [(None, None), (0.05, 2), (0.03, kmax), (0.03, kmax), (-4.5, 4.5)] * 2
    ldl_list += [(0.1, None), (0.0, None), (None, None)]
    lo, hi = ldl_bounds("stellar", 2, nmesh, box)
    ours = ParamTable(table("stellar", 2))
    # ours: ..., w, mu, b; LDL: ..., mu, b1 (= w), b0 (= -b)
    perm = list(range(10)) + [ours.index["mu"], ours.index["w"], ours.index["b"]]
    for (a, b), lo_i, hi_i in zip(ldl_list, lo[perm], hi[perm], strict=True):
        assert lo_i == (-np.inf if a is None else a)
        assert hi_i == pytest.approx(np.inf if b is None else b)
    lo, hi = ldl_bounds("dm", 1, nmesh, box)
    assert lo.tolist() == [-np.inf, 0.05, 0.03, 0.03, -4.5]
    assert all("LDL.py" in v[2] for v in LDL_BOUNDS.values())
    # the table carries LDL's bounds and our names, scalings and initial values
    specs = ldl_table("stellar", 2, nmesh, box, w_init=0.5)
    assert [s.name for s in specs] == list(ours.names)
    assert specs[ours.index["w"]].lower == 0.0 and specs[ours.index["w"]].init == 0.5


def _ldl_vector(kl=0.05, b1=0.0, b0=0.3, gamma=0.5):
    #         alpha  gamma  kh    kl  n    mu   b1  b0
    return np.array([2e-3, gamma, 0.03, kl, 0.5, 1.2, b1, b0])


def test_ldl_file_outside_our_bounds_loads_and_evaluates(tmp_path, sims):
    path = tmp_path / "Mstar_bestparam.txt"
    vec = _ldl_vector()
    np.savetxt(path, vec)
    raw = load_plaintext(path, LDL_CFG, "ldl", Nmesh=N, BoxSize=BOX)
    ours = ParamTable(table("stellar", 1))
    with pytest.raises(ValueError, match="kl_0=0.05") as err:  # our bounds would refuse it
        ours.check_bounds(ours.to_physical(raw))
    assert "w=0" in str(err.value)
    # b1 = 0: F = ReLU(0 * rho^mu + b0) = b0 in every cell, whatever the layers do
    pm = _pm()
    pos = jnp.asarray(zeldovich_particles(N, BOX, seed=1))
    F = np.asarray(Stage(pm, LDL_CFG).forward(pos, raw))
    np.testing.assert_allclose(F, 0.3, rtol=1e-6)

    # and through the command: --evaluateOnly writes that map
    save = tmp_path / "out"
    rc = ldl.main(
        ["--target", "Mstar", "--FastPMpath", str(sims["dir"] / "fastpm"), "--BoxSize", str(BOX),
         "--Nmesh", str(N), "--evaluateOnly", "--restore", str(path), "--save", str(save),
         "--quiet"]
    )  # fmt: skip
    assert rc == 0
    np.testing.assert_allclose(read_mesh(save / f"Mstar_snap099_Nmesh{N}_Nstep1_n1.00_map")[0], 0.3)


def test_any_vector_inside_ldls_bounds_loads_and_evaluates(tmp_path):
    """Random vectors anywhere inside LDL's bounds (on the bounds too) load and give finite maps."""
    pm = _pm()
    pos = jnp.asarray(zeldovich_particles(N, BOX, seed=1))
    rng = np.random.default_rng(0)
    kmax = 2 * np.pi * N / BOX
    for i in range(6):
        edge = i % 2 == 1
        a = [rng.uniform(-0.01, 0.01)]
        g = [0.05 if edge else rng.uniform(0.05, 2)]
        kh = [0.03 if edge else rng.uniform(0.03, kmax)]
        kl = [kmax if edge else rng.uniform(0.03, kmax)]
        n = [-4.5 if edge else rng.uniform(-4.5, 4.5)]
        tail = [0.1 if edge else rng.uniform(0.1, 3), 0.0 if edge else rng.uniform(0, 2)]
        vec = np.array(a + g + kh + kl + n + tail + [rng.uniform(-1, 1)])
        path = tmp_path / f"v{i}.txt"
        np.savetxt(path, vec)
        raw = load_plaintext(path, LDL_CFG, "ldl", Nmesh=N, BoxSize=BOX)
        F = np.asarray(Stage(pm, LDL_CFG).forward(pos, raw))
        assert np.all(np.isfinite(F)) and np.all(F >= 0), vec


@pytest.mark.parametrize(
    "vec,words",
    [
        (_ldl_vector(gamma=3.0), ["gamma_0 = 3", "[0.05, 2]", "LDL.py"]),
        (_ldl_vector(b1=-0.1), ["b1 = -0.1", "[0, inf]"]),
        (_ldl_vector(kl=9.0), ["kl_0 = 9", "2 pi Nmesh"]),
        (np.ones(7), ["7 values", "5*Nstep + 3"]),
    ],
    ids=["gamma", "b1", "kl above 2 pi Nmesh / BoxSize", "length"],
)
def test_bad_ldl_files_name_file_and_bound(tmp_path, sims, capsys, vec, words):
    path = tmp_path / "bad.txt"
    np.savetxt(path, vec)
    save = tmp_path / "out"
    rc = ldl.main(
        ["--target", "Mstar", "--FastPMpath", str(sims["dir"] / "fastpm"), "--BoxSize", str(BOX),
         "--Nmesh", str(N), "--evaluateOnly", "--restore", str(path), "--save", str(save)]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and str(path) in err, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert not save.exists()


# ------------------------------------------------------------------------------------ L-BFGS-B


@pytest.fixture(scope="module")
def objective():
    pm = _pm()
    pos = jnp.asarray(zeldovich_particles(N, BOX, seed=1))
    true = zeldovich_particles(N, BOX, seed=1, rms_disp=0.7)
    target = jnp.asarray(np.maximum(_cic(true, np.ones(len(true))) - 0.8, 0) * 0.2, "f4")
    specs = ldl_table("stellar", 1, pm.Nmesh, pm.BoxSize, float(np.mean(target)))
    from jerald_nbk.model.composed import ComposedModel

    model = ComposedModel(Stage(pm, LDL_CFG, w_init=specs[5].init), specs=specs)
    return Objective(model, pos, target, TrainConfig(smoothing_n=1.0, split="ldl"))


def test_lbfgsb_lowers_the_loss_inside_the_bounds(objective):
    tab = objective.stage.table
    seen = []
    res = fit_lbfgsb(objective, maxiter=8, on_best=lambda raw, s, losses: seen.append(s))
    first, last = res.history[0]["train"], objective.losses(jnp.asarray(res.raw))["train"]
    assert last < 0.9 * first
    lo, hi = tab.lower, tab.upper
    for rec in res.history:  # every evaluated point inside LDL's bounds
        phys = np.array([rec["params"][n] for n in tab.names])
        assert np.all(phys >= lo - 1e-12) and np.all(phys <= hi + 1e-12), rec["params"]
    # best by validation over every evaluated point, as LDL's MemoizeJac keeps it
    vals = [r["validation"] for r in res.history]
    assert res.best_step == int(np.argmin(vals)) and res.best_losses["validation"] == min(vals)
    np.testing.assert_array_equal(
        tab.to_physical(res.best_raw), [res.history[res.best_step]["params"][n] for n in tab.names]
    )
    assert seen and seen[-1] == res.best_step and seen == sorted(seen)
    assert res.final_step <= 8


class _Quadratic:
    """A stand-in objective: train loss |x - a|^2, validation |x - b|^2 (x raw, 2 parameters)."""

    def __init__(self):
        from types import SimpleNamespace

        from jerald_nbk.model.params import ParamSpec

        specs = [ParamSpec("p", 0.0, 1.0, -1.0, 1.0), ParamSpec("q", 0.0, 1.0, 0.0)]
        pm = SimpleNamespace(dtype=np.dtype("f8"), comm=None)
        self.stage = SimpleNamespace(table=ParamTable(specs), pm=pm)
        self.a, self.b = np.array([3.0, 2.0]), np.array([0.2, 0.5])

    def losses(self, x):
        x = np.asarray(x)
        return {
            "train": float(np.sum((x - self.a) ** 2)),
            "validation": float(np.sum((x - self.b) ** 2)),
        }

    def value_and_grad(self, x):
        return self.losses(x), 2 * (np.asarray(x) - self.a)


def test_best_by_validation_is_kept():
    """Train pulls to (1, 2) (p clipped at its bound 1), validation prefers (0.2, 0.5): the kept
    point is the evaluated point nearest the validation optimum, not the last iterate."""
    obj = _Quadratic()
    res = fit_lbfgsb(obj, np.array([0.0, 0.0]), maxiter=50)
    np.testing.assert_allclose(res.raw, [1.0, 2.0], atol=1e-6)  # the bounded train optimum
    vals = [r["validation"] for r in res.history]
    assert res.best_losses["validation"] == min(vals) < obj.losses(res.raw)["validation"]
    assert not np.allclose(res.best_raw, res.raw)


# ------------------------------------------------------------------------------------ TNG inputs


@pytest.mark.parametrize("field", ["dm", "Mstar", "ne", "nT", "nHI"])
def test_tng_fields_are_painted_as_ldl_paints_them(sims, field):
    base = sims["dir"] / ("TNGDark" if field == "dm" else "TNG")
    files = ldl.tng_snapshot(base, SNAP)
    assert len(files) == 2
    got = np.asarray(ldl.tng_map(files, field, _pm()))
    want = _ldl_expected(sims, field)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * np.abs(want).max())


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("field", ["dm", "Mstar", "nT"])
def test_mpi_tng_map_is_painted_per_slab(sims, field):
    """Under MPI each rank paints its share of the snapshot onto its own slab (rank 0 painted the
    whole map and broadcast it before): the slabs are the one-rank map's, to float32 rounding."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    files = ldl.tng_snapshot(sims["dir"] / ("TNGDark" if field == "dm" else "TNG"), SNAP)
    one = np.asarray(ldl.tng_map(files, field, engine((N,) * 3, BOX, "f4", "jax", MPI.COMM_SELF)))
    pm = engine((N,) * 3, BOX, "f4", "pmesh", comm)
    local = np.asarray(ldl.tng_map(files, field, pm))
    assert local.shape == tuple(pm.local_real_shape) and local.shape[0] < N  # a slab only
    np.testing.assert_allclose(
        local, one[pm.local_slices("real")], rtol=1e-6, atol=1e-6 * np.abs(one).max()
    )


def test_temperature_is_electron_density_weighted(sims):
    """tSZ's T = nT / ne (LDL), not the mass-weighted T of ``jerald make-target T``."""
    g = sims["hydro"][0]
    pos = g["Coordinates"] / 1000.0
    T = _ldl_temperature(g["ElectronAbundance"], g["InternalEnergy"])
    ne = _ldl_n_cm3(g["Masses"], g["ElectronAbundance"])
    gas = _cic(pos, g["Masses"]) > 0
    ne_weighted = _cic(pos, ne * T)[gas] / _cic(pos, ne)[gas]
    mass_weighted = _cic(pos, g["Masses"] * T)[gas] / _cic(pos, g["Masses"])[gas]
    files = ldl.tng_snapshot(sims["dir"] / "TNG", SNAP)
    pm = _pm()
    nt, ne_map = (np.asarray(ldl.tng_map(files, f, pm))[gas] for f in ("nT", "ne"))
    got = nt / ne_map
    np.testing.assert_allclose(got, ne_weighted, rtol=1e-4)
    assert np.max(np.abs(got / mass_weighted - 1)) > 1e-2


def test_tng_dark_particles_are_the_input(sims):
    files = ldl.tng_snapshot(sims["dir"] / "TNGDark", SNAP)
    pos, vz, z = ldl.tng_particles(files, _pm(), velocity=True)
    d = sims["dark"][1]
    np.testing.assert_allclose(np.asarray(pos), np.mod(d["Coordinates"] / 1000.0, BOX), rtol=1e-6)
    np.testing.assert_allclose(vz, d["Velocities"][:, 2] * (1 / (1 + Z)) ** 0.5, rtol=1e-6)
    assert z == Z


def test_ldls_cached_map_is_read(sims, tmp_path):
    import shutil

    base = tmp_path / "TNG"
    shutil.copytree(sims["dir"] / "TNG", base)
    cached = np.full((N,) * 3, 7.0)
    write_mesh(base / f"snapdir_{SNAP:03d}" / f"Mstarmap_Nmesh{N}", cached, BOX)
    got = ldl.tng_map(ldl.tng_snapshot(base, SNAP), "Mstar", _pm())
    np.testing.assert_array_equal(np.asarray(got), cached)


def test_wrong_snapnum_names_the_snapshots(sims):
    with pytest.raises(ValueError, match="no snapshot 033.*snapdir_099"):
        ldl.tng_snapshot(sims["dir"] / "TNG", 33)


# ------------------------------------------------------------------------------------ every target


def _run(sims, save, *args):
    argv = ["--BoxSize", str(BOX), "--Nmesh", str(N), "--Nstep", "1", "--steps", "3"]
    argv += ["--save", str(save), "--quiet", *map(str, args)]
    assert ldl.main(argv) == 0


def _stem(name):
    return f"{name}_snap099_Nmesh{N}_Nstep1_n1.00"


@pytest.mark.parametrize("target", ["Mstar", "nHI", "kSZ", "Xray_ne"])
def test_each_target_from_tng_with_tng_dark_input(sims, tmp_path, target):
    """No --FastPMpath: the TNG-Dark particles are the input, the target painted from TNG."""
    d = sims["dir"]
    _run(sims, tmp_path, "--target", target, "--TNGpath", d / "TNG", "--TNGDarkpath", d / "TNGDark")
    vec = np.loadtxt(tmp_path / f"{_stem(target)}_bestparam.txt")
    assert vec.shape == (8,)
    # LDL's start for b1: sum(target) / Nparticles (Xray_ne: of the scaled n_e)
    names = {"Mstar": ["Mstar"], "nHI": ["nHI"], "kSZ": ["ne", "kSZ"], "Xray_ne": ["Xray_ne"]}
    for name in names[target]:
        m = read_mesh(tmp_path / f"{_stem(name)}_map")[0]
        assert np.all(np.isfinite(m))
    if target == "kSZ":  # the n_e map in the target's units, as LDL writes it (1e-5 undone)
        ne = read_mesh(tmp_path / f"{_stem('ne')}_map")[0]
        assert ne.mean() == pytest.approx(_ldl_expected(sims, "ne").mean(), rel=0.5)


def test_dm_and_two_stage_tsz_xray(sims, tmp_path):
    """dm: FastPM input, TNG-Dark target; tSZ_ne then tSZ_T / Xray_T from its n_e fit."""
    d = sims["dir"]
    fast = ["--FastPMpath", d / "fastpm"]
    _run(sims, tmp_path, "--target", "dm", "--TNGDarkpath", d / "TNGDark", *fast, "--n", "0")
    assert np.loadtxt(tmp_path / "dm_snap099_Nmesh8_Nstep1_n0.00_bestparam.txt").shape == (5,)
    tng = ["--TNGpath", d / "TNG", "--TNGDarkpath", d / "TNGDark"]
    _run(sims, tmp_path, "--target", "tSZ_ne", *tng)
    ne_txt = tmp_path / f"{_stem('tSZ_ne')}_bestparam.txt"
    _run(sims, tmp_path, "--target", "tSZ_T", "--restore_ne", ne_txt, *tng)
    tsz = read_mesh(tmp_path / f"{_stem('tSZ')}_map")[0]
    want = _ldl_expected(sims, "nT")  # n_e T, the observable
    assert np.all(tsz >= 0) and tsz.mean() == pytest.approx(want.mean(), rel=0.5)
    _run(sims, tmp_path, "--target", "Xray_T", "--restore_ne", ne_txt, *tng)
    assert (tmp_path / f"{_stem('Xray')}_map" / "Field").exists()


@pytest.mark.parametrize(
    "args,words",
    [
        (["--target", "Mstar", "--eta0", "0.01"], ["--eta0", "--optimizer adam"]),
        (["--target", "Mstar", "--improveFastPM", "x.txt"], ["--improveFastPM", "--FastPMpath"]),
        (["--target", "dm"], ["--FastPMpath"]),
    ],
    ids=["adam option with L-BFGS-B", "improve without FastPM", "dm without FastPM"],
)
def test_options_that_would_be_ignored_are_refused(sims, tmp_path, capsys, args, words):
    d = sims["dir"]
    argv = [*args, "--TNGpath", str(d / "TNG"), "--TNGDarkpath", str(d / "TNGDark")]
    rc = ldl.main([*argv, "--save", str(tmp_path / "out"), "--BoxSize", str(BOX)])
    err = capsys.readouterr().err
    assert rc == 2
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out").exists()


def test_adam_stays_an_option(sims, tmp_path):
    d = sims["dir"]
    _run(sims, tmp_path, "--target", "Mstar", "--optimizer", "adam", "--eta0", "0.01",
         "--TNGpath", d / "TNG", "--TNGDarkpath", d / "TNGDark")  # fmt: skip
    assert np.loadtxt(tmp_path / f"{_stem('Mstar')}_bestparam.txt").shape == (8,)
    assert (tmp_path / f"{_stem('Mstar')}_train" / "checkpoint.npz").exists()
