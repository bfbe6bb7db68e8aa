"""Reference-suite generator (jerald_nbk.suite): smoke-size suite built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SMOKE_REDSHIFTS, SMOKE_SEED  # noqa: E402

from jerald_nbk.suite import build as suite_build
from jerald_nbk.suite import build_suite, halos, hi, output_names, ztag

REDSHIFTS = SMOKE_REDSHIFTS
SEED = SMOKE_SEED
DOCS = Path(__file__).resolve().parents[1] / "docs" / "reference-suite.md"


# --------------------------------------------------------------------------------------------------
# helpers: numpy CIC paint (pmesh convention: value i at x = i H) and FFT power spectra
# --------------------------------------------------------------------------------------------------
def cic_density(pos, N, L):
    """1 + delta of particles, CIC on an N^3 mesh, independent of pmesh."""
    x = np.asarray(pos, dtype="f8") / (L / N)
    i0 = np.floor(x).astype(np.int64)
    f = x - i0
    out = np.zeros(N**3)
    for d in np.ndindex(2, 2, 2):
        w = np.prod([f[:, a] if d[a] else 1 - f[:, a] for a in range(3)], axis=0)
        idx = [(i0[:, a] + d[a]) % N for a in range(3)]
        out += np.bincount(np.ravel_multi_index(idx, (N, N, N)), weights=w, minlength=N**3)
    return out.reshape(N, N, N) * N**3 / len(pos)


def power(a, b, L, nbins=None):
    """Spherically binned cross power of two real meshes (numpy FFT); bins of width k_f."""
    N = a.shape[0]
    fa = np.fft.rfftn(a - a.mean()) / a.size
    fb = np.fft.rfftn(b - b.mean()) / b.size
    kf = 2 * np.pi / L
    kx = np.fft.fftfreq(N, 1.0 / N)
    kz = np.fft.rfftfreq(N, 1.0 / N)
    kk = np.sqrt(kx[:, None, None] ** 2 + kx[None, :, None] ** 2 + kz[None, None, :] ** 2)
    # rfft half-space: modes with 0 < kz < N/2 stand for two modes
    weight = np.where((kz > 0) & (kz < N / 2), 2.0, 1.0)[None, None, :] * np.ones_like(kk)
    ibin = np.rint(kk).astype(int)
    nb = N // 2 if nbins is None else nbins
    sel = (ibin >= 1) & (ibin <= nb)
    p = (fa * np.conj(fb)).real * L**3
    num = np.bincount(ibin[sel], weights=(weight * p)[sel], minlength=nb + 1)[1:]
    cnt = np.bincount(ibin[sel], weights=weight[sel], minlength=nb + 1)[1:]
    return kf * np.arange(1, nb + 1), num / np.maximum(cnt, 1)


def _read_mesh(path):
    from jerald_nbk.io import read_mesh

    return read_mesh(path)


def _read_cat(path, columns=("Position",)):
    from jerald_nbk.io import read_catalog

    return read_catalog(path, columns=columns)


# --------------------------------------------------------------------------------------------------
# the session suite
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def suite(smoke_suite):
    assert (SEED, REDSHIFTS) == (SMOKE_SEED, SMOKE_REDSHIFTS)
    return smoke_suite


@pytest.fixture(scope="session")
def manifest(suite):
    return json.loads(Path(suite["paths"]["manifest"]).read_text())


@pytest.fixture(scope="session")
def targets_z0(suite, manifest):
    """make_targets re-run in memory on the saved high-res z = 0 particles (with diagnostics)."""
    from jerald_nbk.suite.runs import sherwood_cosmology

    data, attrs = _read_cat(suite["paths"]["highres_z0"], ("Position", "Velocity"))
    cfg = manifest["config"]
    return suite_build.make_targets(
        data["Position"].astype("f8"),
        data["Velocity"].astype("f8"),
        int(attrs["Nparticles"]),
        cfg["Nmesh"],
        cfg["BoxSize"],
        0.0,
        sherwood_cosmology(),
        SEED,
    )


# --------------------------------------------------------------------------------------------------
# pure functions (fast)
# --------------------------------------------------------------------------------------------------
def test_moster13_published_values_by_hand():
    # Moster, Naab & White 2013, Table 1: M10 = 11.590, N10 = 0.0351.  At z = 0 and M = M1 the
    # bracket is 1 + 1 = 2, so m = N10 * M1.
    M1 = 10**11.590
    assert np.isclose(halos.moster13_stellar_mass(M1, 0.0), 0.0351 * M1, rtol=1e-12)
    # z = 2, M = 1e12 Msun, by hand: z/(z+1) = 2/3,
    # log10 M1 = 11.590 + 1.195 * 2/3 = 12.386667; N = 0.0351 - 0.0247 * 2/3 = 0.0186333;
    # beta = 1.376 - 0.826 * 2/3 = 0.825333; gamma = 0.608 + 0.329 * 2/3 = 0.827333;
    # x = 1e12 / 10**12.386667 = 0.410519; x**-beta = 2.085110; x**gamma = 0.478738;
    # m = 2 * 0.0186333 * 1e12 / (2.085110 + 0.478738) = 1.453545e10 Msun.
    assert np.isclose(halos.moster13_stellar_mass(1e12, 2.0), 1.453545e10, rtol=1e-5)
    # h conversion: a 1e12 Msun/h halo -> 1e12/h Msun -> stellar mass * h / 1e10
    h = 0.678
    direct = halos.moster13_stellar_mass(1e12 / h, 1.0) * h / 1e10
    assert np.isclose(halos.stellar_mass_h(1e12, 1.0, h), direct)


def test_shmr_scatter_is_lognormal_and_seeded():
    M = np.full(20000, 1e12)
    a = halos.stellar_mass_h(M, 0.0, 0.678, 0.15, np.random.default_rng(1))
    b = halos.stellar_mass_h(M, 0.0, 0.678, 0.15, np.random.default_rng(1))
    assert np.array_equal(a, b)
    mean = halos.stellar_mass_h(1e12, 0.0, 0.678)
    assert np.isclose(np.std(np.log10(a / mean)), 0.15, rtol=0.05)


def test_fgpa_scalings():
    # photoionised gas: n_HI ~ (1+delta)^2 T^-0.7; collisional ionisation kills hot gas
    nH, G, ne = 1e-5, 1e-12, 1.16
    r = hi.n_hi_equilibrium(2 * nH, 1e4, G, ne) / hi.n_hi_equilibrium(nH, 1e4, G, ne)
    assert np.isclose(r, 4.0, rtol=1e-3)
    r = hi.n_hi_equilibrium(nH, 2e4, G, ne) / hi.n_hi_equilibrium(nH, 1e4, G, ne)
    assert np.isclose(r, 2**-0.7, rtol=1e-3)
    hot = hi.n_hi_equilibrium(1e-3, 1e6, G, ne) / hi.n_hi_equilibrium(1e-3, 1e4, G, ne)
    assert hot < 1e-2


def test_virial_and_jeans_scales():
    # by hand from SI constants (scipy) and the IAU solar mass, not the module's constants
    from scipy import constants as c

    msun_kg, mpc_m, mu = 1.988409870698051e30, 1e6 * c.parsec, 0.59  # mu_ionised (documented)
    g_kms = c.G * msun_kg / mpc_m / 1e6  # Mpc (km/s)^2 / Msun
    rho_c0 = 3 * 100.0**2 / (8 * np.pi * g_kms)  # (Msun/h) / (Mpc/h)^3, H0 = 100 h km/s/Mpc
    om = 0.308
    # Bryan & Norman (1998): Einstein-de Sitter limit 18 pi^2 at high z, ~102 today for om = 0.308
    assert halos.virial_overdensity(1e3, om) == pytest.approx(18 * np.pi**2, rel=1e-6)
    for z in (0.0, 2.0):
        ez2 = om * (1 + z) ** 3 + 1 - om
        x = om * (1 + z) ** 3 / ez2 - 1
        delta_c = 18 * np.pi**2 + 82 * x - 39 * x**2
        r_phys = (3 * 1e12 / (4 * np.pi * delta_c * rho_c0 * ez2)) ** (1 / 3)  # Mpc/h
        vc2 = g_kms * 1e12 / r_phys  # (km/s)^2, h cancels
        t_vir = mu * c.m_p * vc2 * 1e6 / (2 * c.k)
        R, T = halos.virial_radius_temperature(1e12, z, om)
        assert R == pytest.approx((1 + z) * r_phys, rel=1e-4)  # comoving
        assert T == pytest.approx(t_vir, rel=1e-4)
    assert halos.virial_overdensity(0.0, om) == pytest.approx(102.2, abs=0.1)
    # Jeans length x_J = H0^-1 [2 gamma k_B T0 / (3 mu m_p om (1+z))]^(1/2) (Hui & Gnedin 1997)
    v = np.sqrt(2 * (5 / 3) * c.k * 1.2e4 / (3 * mu * c.m_p * om * 3.0)) / 1e3  # km/s
    assert hi.jeans_filter_scale(2.0, 1.2e4, om) == pytest.approx(v / 100.0, rel=1e-4)


def test_stages_hit_outputs():
    from jerald_nbk.suite.runs import stages_for

    st = stages_for(10, (5, 2, 0))
    assert len(st) == 11 and np.isclose(st[0], 0.1) and np.isclose(st[-1], 1.0)
    for z in (5, 2, 0):
        assert np.any(st == 1.0 / (1 + z))
    with pytest.raises(ValueError):
        stages_for(10, (12.0,))


# --------------------------------------------------------------------------------------------------
# the built suite
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_build_outputs(suite, manifest):
    # (the build time is a benchmark's business: benchmarks/run.py records it)
    for name in output_names(REDSHIFTS):
        assert (suite["dir"] / name).is_dir(), name
        assert name in suite["paths"]
    assert manifest["size"] == "smoke" and manifest["seed"] == SEED
    assert manifest["redshifts"] == list(REDSHIFTS)
    assert manifest["config"]["Nmesh"] == 32 and manifest["config"]["BoxSize"] == 25.0
    assert manifest["generator_version"] == suite_build.GENERATOR_VERSION
    for key in ("linear_s", "lowres_s", "highres_s", "total_s"):
        assert key in manifest["timings"]


@pytest.mark.slow
def test_catalogs(suite, manifest):
    for z in REDSHIFTS:
        data, attrs = _read_cat(suite["paths"][f"fastpm_z{ztag(z)}"], ("Position", "Velocity"))
        pos = data["Position"]
        assert pos.shape == (32**3, 3) and data["Velocity"].shape == (32**3, 3)
        assert pos.min() >= 0 and pos.max() < 25.0
        for key in ("BoxSize", "Nmesh", "redshift", "seed", "cosmology"):
            assert key in attrs, key
        assert np.allclose(attrs["BoxSize"], 25.0) and np.all(np.asarray(attrs["Nmesh"]) == 32)
        assert float(attrs["redshift"]) == z and int(attrs["seed"]) == SEED
        assert attrs["cosmology"]["sigma8"] == pytest.approx(0.829)
        assert attrs["cosmology"]["Omega_m"] == pytest.approx(0.308)


@pytest.mark.slow
def test_mesh_attrs_present_and_match_manifest(suite, manifest):
    for z in REDSHIFTS:
        t = ztag(z)
        for target in ("dm", "stellar", "hi"):
            arr, attrs = _read_mesh(suite["paths"][f"truth_{target}_z{t}"])
            assert arr.shape == (32, 32, 32)
            for key in (
                "Nmesh",
                "BoxSize",
                "ndarray.shape",
                "units",
                "constants",
                "redshift",
                "seed",
                "cosmology",
                "generator_version",
            ):
                assert key in attrs, (target, z, key)
            assert attrs["constants"] == manifest["constants"][t][target]
            assert float(attrs["redshift"]) == z
        _, hattrs = _read_mesh(suite["paths"][f"truth_hi_z{t}"])
        assert hattrs["hi_norm"] == hattrs["constants"]["hi_norm_cm3"] > 0


def test_every_constant_is_documented():
    text = DOCS.read_text()
    # keys of the constants dicts make_targets writes (the same at every redshift)
    keys = {"hi_norm_cm3", "T0_K", "gamma_T", "Gamma_HI_s", "x_J_Mpc_h"}
    keys |= {f"moster13_{k}" for k in halos.MOSTER13}
    keys |= {
        "shmr_scatter_dex",
        "fof_linking_length",
        "fof_nmin",
        "alpha_A0_cm3_s",
        "alpha_A_slope",
        "X_H",
        "Y_He",
        "ne_per_nH",
        "nH_mean_cm3",
        "gas_floor",
        "T_hot_K",
        "mu_ionised",
        "wind_M0_1e10Msun_h",
        "wind_radius_Mpc_h",
        "particle_mass_Msun_h",
    }
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, missing


@pytest.mark.slow
def test_constants_in_files_are_documented(manifest):
    text = DOCS.read_text()
    for per_z in manifest["constants"].values():
        for consts in per_z.values():
            missing = [k for k in consts if f"`{k}`" not in text]
            assert not missing, missing


@pytest.mark.slow
def test_low_and_high_res_share_phases(suite, manifest):
    L, N = 25.0, 32
    for z in REDSHIFTS:
        t = ztag(z)
        data, _ = _read_cat(suite["paths"][f"fastpm_z{t}"])
        low = cic_density(data["Position"], N, L)
        high, _ = _read_mesh(suite["paths"][f"truth_dm_z{t}"])
        high = high.astype("f8")
        k, pll = power(low, low, L)
        _, phh = power(high, high, L)
        _, plh = power(low, high, L)
        r = plh / np.sqrt(pll * phh)
        lowk = k < 1.0  # h/Mpc: four bins at k_f = 0.25 h/Mpc
        assert np.all(r[lowk] > 0.9), (z, r[lowk])


@pytest.mark.slow
def test_highres_has_more_small_scale_power(suite):
    L, N = 25.0, 32
    data, _ = _read_cat(suite["paths"]["fastpm_z0"])
    low = cic_density(data["Position"], N, L)
    high, _ = _read_mesh(suite["paths"]["truth_dm_z0"])
    _, pll = power(low, low, L)
    _, phh = power(high.astype("f8"), high.astype("f8"), L)
    ratio = phh / pll
    assert np.all(ratio[-4:] > 1.0), ratio


@pytest.mark.slow
def test_painted_maps_conserve_mass(suite):
    for z in REDSHIFTS:
        t = ztag(z)
        dm, _ = _read_mesh(suite["paths"][f"truth_dm_z{t}"])
        assert np.isclose(dm.astype("f8").mean(), 1.0, rtol=1e-5)
        assert dm.min() >= 0
        # our CIC of the same particles agrees with the file (pmesh painter, f4 storage)
        data, _ = _read_cat(suite["paths"][f"highres_z{t}"])
        assert np.allclose(cic_density(data["Position"], 32, 25.0), dm, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_stellar_total_equals_halo_sum(suite, manifest):
    for z in REDSHIFTS:
        t = ztag(z)
        star, attrs = _read_mesh(suite["paths"][f"truth_stellar_z{t}"])
        cat, hattrs = _read_cat(suite["paths"][f"halos_z{t}"], ("StellarMass", "Mass"))
        total = cat["StellarMass"].astype("f8").sum()
        assert np.isclose(star.astype("f8").sum(), total, rtol=1e-5)
        assert np.isclose(attrs["constants"]["total_stellar_mass_1e10Msun_h"], total, rtol=1e-6)
        assert len(cat["Mass"]) == manifest["n_halos"][t] == attrs["constants"]["n_halos"]
        assert star.min() >= 0
    assert manifest["n_halos"]["0"] > 50  # smoke z = 0 has a few hundred FOF halos


@pytest.mark.slow
def test_hi_is_order_unity(suite):
    for z in REDSHIFTS:
        hi, attrs = _read_mesh(suite["paths"][f"truth_hi_z{ztag(z)}"])
        assert hi.min() >= 0 and np.all(np.isfinite(hi))
        assert 0.1 < hi.astype("f8").mean() < 30


@pytest.mark.slow
def test_targets_are_deterministic(suite, targets_z0):
    # the in-memory re-run on the saved particles reproduces the files (same seed, same scatter)
    for name, m in (("dm", targets_z0.dm), ("stellar", targets_z0.stellar), ("hi", targets_z0.hi)):
        arr, _ = _read_mesh(suite["paths"][f"truth_{name}_z0"])
        assert np.allclose(arr, m.array, rtol=1e-4, atol=1e-5 * np.abs(m.array).max()), name


@pytest.mark.slow
def test_hi_lower_in_halos_at_fixed_density(targets_z0):
    gas = targets_z0.diagnostics["gas"].ravel()
    hot = targets_z0.diagnostics["hot_fraction"].ravel()
    hi = targets_z0.hi.array.ravel()
    inside = hot > 0.3
    outside = hot == 0
    assert inside.sum() >= 5
    # Halo cores are denser than any cell outside halos, so "the same density" is the FGPA power
    # law n_HI ~ (1+delta_g)^s fitted to the cells outside halos (overdense ones, s ~ 1.4-1.6):
    # cells inside virial radii must lie far below it (collisional ionisation, T_vir^-0.7).
    lg, lh = np.log10(gas), np.log10(np.maximum(hi, 1e-30))
    fit = outside & (lg > 0)
    slope, icpt = np.polyfit(lg[fit], lh[fit], 1)
    assert 1.0 < slope < 2.0
    resid_in = lh[inside] - (slope * lg[inside] + icpt)
    resid_out = lh[fit] - (slope * lg[fit] + icpt)
    assert np.median(resid_in) < -0.5  # > 3x less HI than cold gas of the same density
    assert np.median(resid_in) < np.percentile(resid_out, 5)


@pytest.mark.slow
def test_wind_suppression_near_galaxies(targets_z0):
    sup = targets_z0.diagnostics["wind_suppression"]
    star = targets_z0.stellar.array
    assert sup.max() <= 1.0
    # the cell holding most stellar mass is the most suppressed region
    assert sup.ravel()[np.argmax(star)] < np.median(sup)


@pytest.mark.slow
def test_cache_returns_without_recomputing(suite, monkeypatch):
    import jerald_nbk.suite.runs as runs

    def boom(*a, **k):
        raise AssertionError("recomputed a cached suite")

    monkeypatch.setattr(runs, "run_pair", boom)  # the check: any recomputation raises
    again = build_suite(
        suite["dir"],
        size="smoke",
        seed=SEED,
        redshifts=REDSHIFTS,
        progress=False,
        save_highres=True,
    )
    assert again == suite["paths"]
    # a different seed / size / generator version does not match the manifest
    zs = list(REDSHIFTS)
    assert suite_build._cached(suite["dir"], "smoke", SEED, zs) is not None
    assert suite_build._cached(suite["dir"], "smoke", SEED + 1, zs) is None
    assert suite_build._cached(suite["dir"], "demo", SEED, zs) is None
    assert suite_build._cached(suite["dir"], "smoke", SEED, [2.0, 0.0]) is None
    monkeypatch.setattr(suite_build, "GENERATOR_VERSION", "0-old")
    assert suite_build._cached(suite["dir"], "smoke", SEED, zs) is None


@pytest.mark.slow
def test_manifest_round_trip(suite, manifest):
    # the manifest's relative paths resolve to the outputs build_suite returned
    assert set(manifest["paths"]) == set(suite["paths"]) - {"manifest"}
    for name, rel in manifest["paths"].items():
        assert Path(suite["paths"][name]) == suite["dir"] / rel
    assert Path(suite["paths"]["manifest"]).name == "suite.json"
    # an incomplete suite (missing output) is not served from the cache
    victim = suite["dir"] / manifest["paths"]["halos_z5"]
    moved = victim.with_name("halos_z5.moved")
    victim.rename(moved)
    try:
        assert suite_build._cached(suite["dir"], "smoke", SEED, list(REDSHIFTS)) is None
    finally:
        moved.rename(victim)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size must be one of .*got 'huge'"):
        build_suite(tmp_path, size="huge")
    with pytest.raises(ValueError, match=r"duplicate redshifts in \(2, 2\)"):
        build_suite(tmp_path, size="smoke", redshifts=(2, 2))


def test_float32_positions_stay_in_box():
    L = 25.0
    pos = np.array([[L - 1e-9, 0.0, 12.5], [np.nextafter(L, 0), 3.0, 1e-12]])
    out = suite_build._f4_positions(pos, L)
    assert out.dtype == np.float32
    assert out.min() >= 0 and out.max() < L


# --------------------------------------------------------------------------------------------------
# MPI: no rank holds a whole target map (issue 13, item 3)
# --------------------------------------------------------------------------------------------------
@pytest.mark.mpi(min_size=2)
def test_mpi_targets_are_parts_of_the_one_process_maps():
    """On several ranks ``make_targets`` gives each rank its own part of every map (and of the HI
    diagnostics), equal to that part of the maps one process makes from the same particles; the
    parts tile the mesh, and none is the whole mesh."""
    from mpi4py import MPI

    from jerald_nbk.suite.runs import sherwood_cosmology
    from jerald_nbk.testing import zeldovich_particles

    comm = MPI.COMM_WORLD
    N, L = 16, 40.0
    pos = zeldovich_particles(2 * N, L, seed=3, rms_disp=0.5, dtype=np.float64)
    rng = np.random.default_rng(4)  # 20 compact clumps of 200 particles: FOF halos
    centres = rng.uniform(0, L, (20, 3))
    pos[: 20 * 200] = np.repeat(centres, 200, axis=0) + rng.normal(0, 0.1, (20 * 200, 3))
    pos = np.mod(pos, L)
    vel = np.zeros_like(pos)
    args = (len(pos), N, L, 0.0, sherwood_cosmology(), SEED)
    whole = suite_build.make_targets(pos, vel, *args, comm=MPI.COMM_SELF)
    mine = slice(comm.rank, None, comm.size)
    parts = suite_build.make_targets(pos[mine], vel[mine], *args, comm=comm)
    assert len(whole.halos.Mass) > 0  # the stellar map is not empty
    cells = 0
    for name in ("dm", "stellar", "hi"):
        w, p = getattr(whole, name), getattr(parts, name)
        assert p.shape == (N, N, N) and p.array.shape != (N, N, N)
        scale = np.abs(w.array).max()
        np.testing.assert_allclose(p.array, w.array[p.slices], rtol=1e-9, atol=1e-12 * scale)
        if name == "hi":
            for key, value in parts.diagnostics.items():
                np.testing.assert_allclose(value, whole.diagnostics[key][p.slices], atol=1e-10)
        cells += p.array.size
    assert comm.allreduce(cells) == 3 * N**3
