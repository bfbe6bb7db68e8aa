"""Power spectra, r(k), figures of merit, plots and reports.

Tolerances: our estimator against nbodykit ``FFTPower(ArrayMesh(...), mode='1d')``: identical
mode counts, power and mean k to 1e-6 relative per bin (float64 meshes agree to ~1e-14; float32
meshes differ by nbodykit's float32 FFT, ~4e-7). Exact identities (plane wave, r = 1) to 1e-10.
"""

import json

import numpy as np
import pytest

from jerald_nbk.analysis import (
    cross_correlation,
    figures_of_merit,
    fom_table,
    k_above,
    k_within,
    plot_power_comparison,
    plot_slices,
    plot_training_curves,
    power_spectrum,
    project_slab,
    relative_difference_map,
    smooth_field,
    write_report,
)

RTOL_NBODYKIT = 1e-6


def painted_field(nmesh, box, n=4000, seed=0, dtype="f8"):
    """1 + delta of uniformly random particles, CIC-painted by nbodykit: a non-trivial field."""
    from nbodykit.lab import UniformCatalog

    cat = UniformCatalog(nbar=n / np.prod(np.broadcast_to(box, 3)), BoxSize=box, seed=seed)
    mesh = cat.to_mesh(Nmesh=nmesh, resampler="cic", compensated=False, dtype=dtype)
    return np.asarray(mesh.compute(mode="real").preview())


def nbodykit_power(field, box, second=None, **kwargs):
    from nbodykit.lab import ArrayMesh, FFTPower

    other = None if second is None else ArrayMesh(second, BoxSize=box)
    return FFTPower(ArrayMesh(field, BoxSize=box), mode="1d", second=other, **kwargs).power


def assert_matches_nbodykit(ours, theirs):
    np.testing.assert_array_equal(ours.modes, theirs["modes"])
    good = theirs["modes"] > 0
    np.testing.assert_allclose(ours.k[good], theirs["k"][good], rtol=RTOL_NBODYKIT, atol=0)
    np.testing.assert_allclose(
        ours.power[good], theirs["power"].real[good], rtol=RTOL_NBODYKIT, atol=0
    )
    np.testing.assert_array_equal(np.isnan(ours.power), np.isnan(theirs["power"].real))
    np.testing.assert_allclose(ours.edges, theirs.edges["k"], rtol=1e-14)


# ------------------------------------------------------------------ agreement with nbodykit


@pytest.mark.parametrize("dtype", ["f8", "f4"])
@pytest.mark.parametrize(
    "nmesh,box",
    [(32, 25.0), (32, 500.0), ((32, 16, 24), (40.0, 20.0, 30.0))],
)
def test_auto_power_matches_nbodykit(nmesh, box, dtype):
    field = painted_field(nmesh, box, dtype=dtype)
    assert field.dtype == np.dtype(dtype)
    assert_matches_nbodykit(power_spectrum(field, box), nbodykit_power(field, box))


@pytest.mark.parametrize("kwargs", [{"dk": 0.05}, {"dk": 0.1, "kmin": 0.02, "kmax": 1.0}])
def test_binning_options_match_nbodykit(kwargs):
    field = painted_field(32, 40.0)
    assert_matches_nbodykit(
        power_spectrum(field, 40.0, **kwargs), nbodykit_power(field, 40.0, **kwargs)
    )


def test_cross_power_matches_nbodykit():
    a = painted_field(32, 50.0, seed=1)
    b = a + 0.3 * painted_field(32, 50.0, seed=2)
    ours = power_spectrum(a, 50.0, second=b)
    assert ours.attrs["kind"] == "cross"
    assert_matches_nbodykit(ours, nbodykit_power(a, 50.0, second=b))


def test_linear_mesh_matches_nbodykit():
    from nbodykit.lab import LinearMesh

    def plin(k):
        return 1e3 * (k / 0.1) ** -1.5

    mesh = LinearMesh(plin, Nmesh=32, BoxSize=200.0, seed=5)
    field = np.asarray(mesh.compute(mode="real").preview())
    assert_matches_nbodykit(power_spectrum(1 + field, 200.0), nbodykit_power(1 + field, 200.0))


def test_cross_correlation_spectra_equal_power_spectrum():
    a = painted_field(16, 30.0, seed=3)
    b = painted_field(16, 30.0, seed=4)
    res = cross_correlation(a, b, 30.0)
    np.testing.assert_allclose(res.power_a, power_spectrum(a, 30.0).power, rtol=1e-12)
    np.testing.assert_allclose(res.power_b, power_spectrum(b, 30.0).power, rtol=1e-12)
    np.testing.assert_allclose(res.power_ab, power_spectrum(a, 30.0, second=b).power, rtol=1e-12)
    json.dumps(res.to_dict())  # JSON-ready


def test_compensation_divides_by_cic_window():
    field = painted_field(16, 30.0)
    raw = power_spectrum(field, 30.0)
    comp = power_spectrum(field, 30.0, compensate=True)
    assert comp.attrs["compensated"] and not raw.attrs["compensated"]
    # one mode exactly, in a non-cubic box with a different cell size per axis: a plane wave
    # cos(2 pi sum_i m_i x_i / L_i) has P boosted by 1 / W^2, W = prod_i sinc^2(k_i H_i / 2) the CIC
    # window, written here with numpy's sinc (sin(pi t) / (pi t), t = k_i H_i / 2 pi = m_i / N_i)
    n, box, m = (16, 12, 20), (30.0, 24.0, 50.0), (5, 2, 3)
    x = np.meshgrid(*[np.arange(n[a]) * box[a] / n[a] for a in range(3)], indexing="ij")
    phase = 2 * np.pi * sum(m[a] * x[a] / box[a] for a in range(3))
    wave = np.cos(phase)
    p0 = power_spectrum(wave, box, kmax=2.0)  # |k| = 1.23 h/Mpc: above the default kmax
    p1 = power_spectrum(wave, box, compensate=True, kmax=2.0)
    i = np.nanargmax(p0.power)
    assert np.nanmax(np.delete(p0.power, i)) < 1e-10 * p0.power[i]  # the wave's bin alone
    w = np.prod([np.sinc(m[a] / n[a]) ** 2 for a in range(3)])
    assert p1.power[i] / p0.power[i] == pytest.approx(1 / w**2, rel=1e-10)  # 2.713


# --------------------------------------------------------------------- exact identities


def test_plane_wave_power_in_its_bin_only():
    n, box, amp = 32, 100.0, 0.7
    mvec = np.array([3, 2, 0])  # |m| = sqrt(13): strictly inside bin [3, 4) x 2 pi / L
    x = np.arange(n) * box / n
    phase = (
        2
        * np.pi
        * (mvec[0] * x[:, None, None] + mvec[1] * x[None, :, None] + mvec[2] * x[None, None, :])
        / box
    )
    field = 1.0 + amp * np.cos(phase)
    res = power_spectrum(field, box)
    kmode = 2 * np.pi * np.sqrt(13) / box
    i = int(np.searchsorted(res.edges, kmode) - 1)
    others = np.delete(res.power, i)
    assert np.nanmax(np.abs(others)) < 1e-10 * res.power[i]
    # Parseval: sum over modes of P = V * variance = V amp^2 / 2
    total = np.nansum(res.power * res.modes)
    assert total == pytest.approx(box**3 * amp**2 / 2, rel=1e-10)


def test_r_is_one_for_itself_and_scaled_copies():
    a = painted_field(16, 30.0, seed=6)
    for b, expected in ((a, 1.0), (3.7 * a + 2.0, 1.0), (-a, -1.0)):
        res = cross_correlation(a, b, 30.0)
        good = res.k > 0
        np.testing.assert_allclose(res.r[good], expected, rtol=1e-10)
    assert np.isnan(res.r[0])  # the k = 0 bin: both powers are zero


def test_mean_does_not_change_power():
    a = painted_field(16, 30.0, seed=7)
    np.testing.assert_allclose(
        power_spectrum(a + 5.0, 30.0).power[1:], power_spectrum(a, 30.0).power[1:], rtol=1e-10
    )


def test_power_spectrum_accepts_jax_and_rejects_bad_input():
    import jax.numpy as jnp

    a = painted_field(8, 10.0)
    np.testing.assert_allclose(
        power_spectrum(jnp.asarray(a), 10.0).power, power_spectrum(a, 10.0).power, rtol=1e-12
    )
    with pytest.raises(ValueError, match="3D mesh"):
        power_spectrum(np.zeros((8, 8)), 10.0)
    with pytest.raises(ValueError, match="second has shape"):
        power_spectrum(a, 10.0, second=np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="BoxSize must be positive"):
        power_spectrum(a, -1.0)


# ------------------------------------------------------------------------------- metrics


def test_k_within_constructed():
    k = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    ratio = np.array([np.nan, 1.02, 0.95, 1.08, 1.2, 1.01])
    assert k_within(k, ratio, 0.1) == 0.3  # 0.4 fails; 0.5 passing again does not count
    assert k_within(k, ratio, 0.3) == 0.5  # never fails: the last bin
    assert k_within(k, ratio, 0.01) == 0.0  # the first informative bin fails
    ratio_gap = np.array([np.nan, 1.0, np.nan, 1.0, 2.0, 1.0])  # an empty bin is skipped
    assert k_within(k, ratio_gap, 0.1) == 0.3
    assert k_within(k, np.array([np.nan, 1.0, np.inf, 1, 1, 1]), 0.1) == 0.1


def test_k_above_constructed():
    k = np.array([0.05, 0.1, 0.15, 0.2])
    r = np.array([0.99, 0.93, 0.85, 0.95])
    assert k_above(k, r, 0.9) == 0.1
    assert k_above(k, r, 0.7) == 0.2
    assert k_above(k, r, 0.995) == 0.0
    with pytest.raises(ValueError, match="same length"):
        k_above(k, r[:2], 0.9)


def test_figures_of_merit_identity_and_scaled():
    ref = painted_field(16, 30.0, seed=8)
    fom = figures_of_merit(ref, ref, 30.0)
    last_k = fom["k"][-1]
    for key in ("k_10pct", "k_30pct", "k_r09", "k_r07"):
        assert fom[key] == last_k
    # delta scaled by 1.2: P ratio 1.44 everywhere (fails 10% and 30%), r = 1 everywhere
    pred = 1 + 1.2 * (ref - ref.mean())
    fom = figures_of_merit(pred, ref, 30.0)
    np.testing.assert_allclose(fom["ratio"][1:], 1.44, rtol=1e-10)
    assert fom["k_10pct"] == 0.0 and fom["k_30pct"] == 0.0
    assert fom["k_r09"] == last_k


def test_figures_of_merit_smoothed_prediction():
    """A Gaussian-smoothed prediction: P ratio exp(-k^2 R^2); the 10% point lies within a bin."""
    box, radius = 50.0, 1.0
    ref = painted_field(32, box, n=20000, seed=9)
    pred = smooth_field(ref, box, radius)
    fom = figures_of_merit(pred, ref, box)
    k_cross = np.sqrt(-np.log(0.9)) / radius  # where exp(-k^2 R^2) = 0.9
    dk = 2 * np.pi / box
    assert k_cross - 1.5 * dk < fom["k_10pct"] <= k_cross + 0.5 * dk
    assert fom["k_r09"] == fom["k"][-1]  # a positive linear filter keeps r = 1


def test_relative_difference_map():
    rng = np.random.default_rng(10)
    ref = rng.uniform(1.0, 2.0, (8, 8, 8))
    np.testing.assert_allclose(relative_difference_map(ref, ref, 10.0), 0.0, atol=1e-12)
    np.testing.assert_allclose(relative_difference_map(2 * ref, ref, 10.0), 1.0, rtol=1e-10)
    # clipping: a constant reference and a prediction with empty cells, no smoothing
    ref = np.full((4, 4, 4), 2.0)
    pred = ref.copy()
    pred[0, 0, 0] = 0.0
    out = relative_difference_map(pred, ref, 10.0, clip=0.5, smooth=0.0)
    assert out[0, 0, 0] == pytest.approx(-0.5)  # 0 raised to 0.5 x mean(ref) = 1
    assert np.all(np.delete(out.ravel(), 0) == 0.0)
    with pytest.raises(ValueError, match="must be positive"):
        relative_difference_map(ref, np.zeros_like(ref), 10.0)


def test_smooth_field_is_the_gaussian_of_the_fourier_module():
    n, box, radius = 64, 32.0, 1.5
    spike = np.zeros((n, n, n))
    spike[0, 0, 0] = 1.0
    out = smooth_field(spike, box, radius)
    assert out.sum() == pytest.approx(1.0, rel=1e-12)  # the k = 0 mode is untouched
    x = np.fft.fftfreq(n, 1 / n) * box / n  # signed distance from the spike
    profile = out.sum(axis=(1, 2))
    assert np.sum(profile * x**2) == pytest.approx(radius**2, rel=1e-6)


# --------------------------------------------------------------------------------- plots


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert np.std(img) > 0.01  # not a blank canvas


def test_plot_power_comparison(tmp_path):
    ref = painted_field(16, 30.0, seed=11)
    pred = smooth_field(ref, 30.0, 1.0)
    results = {
        "smoothed": figures_of_merit(pred, ref, 30.0),
        "noisy": figures_of_merit(
            ref + 0.1 * np.random.default_rng(1).normal(size=ref.shape), ref, 30.0
        ),
    }
    out = plot_power_comparison(tmp_path / "pk.png", results, title="DM z=0")
    assert out == tmp_path / "pk.png"
    assert_valid_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pk.png"]  # no temporaries


def test_plot_slices(tmp_path):
    ref = painted_field((16, 16, 8), (30.0, 30.0, 15.0), seed=12)
    pred = smooth_field(ref, (30.0, 30.0, 15.0), 1.0)
    out = plot_slices(tmp_path / "slices.png", ref, pred, (30.0, 30.0, 15.0), thickness=4.0, axis=2)
    assert_valid_png(out)
    # the slab is 4 Mpc/h thick: 2 cells of 1.875 Mpc/h, averaged
    np.testing.assert_allclose(
        project_slab(ref, (30.0, 30.0, 15.0), 4.0, axis=2), ref[:, :, :2].mean(axis=2)
    )


def test_plot_training_curves(tmp_path):
    history = [
        {
            "step": s,
            "train": 1 / (s + 1),
            "validation": 1.2 / (s + 1),
            "lr": 0.002 + 1e-4 * s,
            "test": 1.3 / (s + 1) if s % 10 == 0 else None,
        }
        for s in range(50)
    ]
    out = plot_training_curves(tmp_path / "loss.png", history, title="stellar z=2")
    assert_valid_png(out)
    with pytest.raises(ValueError, match="empty history"):
        plot_training_curves(tmp_path / "x.png", [])


# -------------------------------------------------------------------------------- report


def test_write_report_contains_the_numbers(tmp_path):
    foms = {
        "JERALD": {"k_10pct": 1.234567, "k_30pct": 2.5, "k_r09": 3.25, "k_r07": 4.125},
        "FastPM": {"k_10pct": 0.3141, "k_30pct": 0.5, "k_r09": 0.75, "k_r07": 1.0},
    }
    (tmp_path / "figs").mkdir()
    fig = tmp_path / "figs" / "pk.png"
    fig.write_bytes(PNG_SIGNATURE)
    sections = [
        {
            "title": "DM, z = 0",
            "text": "Whole box, 64^3, 40 Mpc/h.",
            "table": fom_table(foms),
            "figures": [("power spectra", fig)],
        },
        {
            "title": "Losses",
            "table": [{"region": "train", "loss": 0.0123}, {"region": "test", "loss": 0.0456}],
        },
    ]
    out = write_report(
        tmp_path / "report.md", sections, provenance={"command": "jerald train --demo", "seed": 42}
    )
    text = out.read_text()
    for number in ("1.235", "2.5", "3.25", "4.125", "0.3141", "0.0123", "0.0456", "42"):
        assert number in text
    assert "| JERALD |" in text and "| FastPM |" in text
    assert "![power spectra](figs/pk.png)" in text
    assert "jerald train --demo" in text and "## Provenance" in text
    with pytest.raises(ValueError, match="has no 'title'"):
        write_report(tmp_path / "bad.md", [{"text": "x"}])
    assert not (tmp_path / "bad.md").exists()


# ------------------------------------------------------- distributed spectra (issue 13, item 3)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape", [(16, 12, 10), (9, 8, 7)])
@pytest.mark.parametrize("compensate", [False, True])
def test_mpi_spectra_of_slabs_equal_the_whole_mesh_ones(shape, compensate):
    """Each rank passes only its x slab (``slab_slices``): P(k), the cross spectrum, r(k) and the
    figures of merit equal those of the whole mesh in one process (float64, 1e-12; mode counts
    exactly), on every rank. A slab that is not the rank's own is refused on every rank."""
    from mpi4py import MPI

    from jerald_nbk.analysis.power import slab_slices

    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(5)
    a = 1 + rng.normal(size=shape)
    b = 0.5 * a + rng.normal(size=shape)
    box = (30.0, 20.0, 25.0)
    sl = slab_slices(shape, comm)
    assert a[sl].shape[0] < shape[0]  # a slab, not the whole mesh
    kw = {"compensate": compensate}
    for whole, part in (
        (power_spectrum(a, box, **kw), power_spectrum(a[sl], box, comm=comm, **kw)),
        (power_spectrum(a, box, b, **kw), power_spectrum(a[sl], box, b[sl], comm=comm, **kw)),
    ):
        np.testing.assert_array_equal(part.modes, whole.modes)
        np.testing.assert_allclose(part.k, whole.k, rtol=1e-12)
        np.testing.assert_allclose(part.power, whole.power, rtol=1e-12, atol=1e-14)
    whole = cross_correlation(a, b, box, **kw)
    part = cross_correlation(a[sl], b[sl], box, comm=comm, **kw)
    for key in ("power_a", "power_b", "power_ab", "r"):
        np.testing.assert_allclose(getattr(part, key), getattr(whole, key), rtol=1e-12)
    fw, fp = figures_of_merit(a, b, box), figures_of_merit(a[sl], b[sl], box, comm=comm)
    assert all(fw[key] == fp[key] for key in ("k_10pct", "k_30pct", "k_r09", "k_r07"))
    # rank 1 passes three planes too many: not pmesh's (even) cut of any mesh
    bad = a[sl] if comm.rank != 1 else np.concatenate([a[sl]] + [a[sl][:1]] * 3)
    with pytest.raises(ValueError, match="slab"):
        power_spectrum(bad, box, comm=comm)


@pytest.mark.mpi(min_size=2)
def test_mpi_smoothing_difference_and_projection_of_slabs():
    """``smooth_field`` and ``relative_difference_map`` of x slabs are the slabs of the whole-mesh
    results (1e-12); ``project_slab`` of slabs gives rank 0 the whole-mesh projection along each
    axis (slab planes on one or several ranks) and the other ranks None."""
    from mpi4py import MPI

    from jerald_nbk.analysis.power import slab_slices

    comm = MPI.COMM_WORLD
    shape, box = (12, 10, 8), (24.0, 20.0, 16.0)
    rng = np.random.default_rng(6)
    ref = rng.uniform(0.1, 3.0, shape)
    pred = ref * rng.uniform(0.5, 1.5, shape)
    sl = slab_slices(shape, comm)
    np.testing.assert_allclose(
        smooth_field(ref[sl], box, 1.5, comm=comm), smooth_field(ref, box, 1.5)[sl], rtol=1e-12
    )
    whole = relative_difference_map(pred, ref, box, smooth=1.0)
    part = relative_difference_map(pred[sl], ref[sl], box, smooth=1.0, comm=comm)
    np.testing.assert_allclose(part, whole[sl], rtol=1e-12, atol=1e-14)
    for axis, start, thickness in ((2, 3.0, 4.0), (1, 0.0, 2.0), (0, 10.0, 12.0), (0, 1.0, 2.0)):
        got = project_slab(ref[sl], box, thickness, axis, start, comm=comm)
        if comm.rank:
            assert got is None
        else:
            np.testing.assert_allclose(
                got, project_slab(ref, box, thickness, axis, start), rtol=1e-12
            )
