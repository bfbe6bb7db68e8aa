"""The fidelity benchmark's explanations of missed goals (issue 10, item 8): each measurement it
quotes is checked against numbers computed here by hand."""

import numpy as np
import pytest

from benchmarks import fidelity as fid


def _curves(k, ratio, r):
    return {"k": list(map(float, k)), "ratio": list(map(float, ratio)), "r": list(map(float, r))}


K = np.arange(0.25, 5.0, 0.25)


def test_seed_stability_grazing_curve():
    """A ratio running 1-2% inside the 10% line: a 2% difference moves k_10pct from 4.0 to 2.5.

    Catches: the difference or the band taken over the wrong range of k (e.g. all bins, which
    would include the bins above 4 where both curves are 20% off and report 0.1 as the band).
    """
    train = np.where(K <= 4.0, 1.09, 1.2)
    unseen = np.where(K < 2.75, 1.09, 1.11)
    unseen = np.where(K > 4.0, 1.2, unseen)
    s = fid.seed_stability(
        _curves(K, train, np.ones_like(K)), _curves(K, unseen, np.ones_like(K)), "k_10pct", 4.0, 2.5
    )
    assert s["max_diff"] == pytest.approx(0.02, abs=1e-9)
    assert s["k_max_diff"] == pytest.approx(2.75)
    assert s["band"] == pytest.approx(0.01, abs=1e-9)  # 0.1 - |1.09 - 1|
    assert s["grazing"] is True
    assert s["curve"] == "P/P_ref"


def test_seed_stability_different_maps_r():
    """r curves: the unseen map's r drops by 0.3 at k = 1.5: not grazing, r's threshold read.

    Catches: the r figures compared against the ratio's |x - 1| line instead of r = 0.9.
    """
    r_train = np.full_like(K, 0.95)
    r_unseen = np.where(K >= 1.5, 0.65, 0.95)
    s = fid.seed_stability(
        _curves(K, np.ones_like(K), r_train),
        _curves(K, np.ones_like(K), r_unseen),
        "k_r09",
        4.75,
        1.25,
    )
    assert s["max_diff"] == pytest.approx(0.3)
    assert s["band"] == pytest.approx(0.05)  # 0.95 - 0.9
    assert s["grazing"] is False
    assert s["threshold"] == "r = 0.9"


def test_seed_stability_rejects_different_binning():
    c = _curves(K, np.ones_like(K), np.ones_like(K))
    other = _curves(K * 1.1, np.ones_like(K), np.ones_like(K))
    with pytest.raises(ValueError, match="different k bins"):
        fid.seed_stability(c, other, "k_10pct", 1.0, 2.0)


def test_transform_fit_l1_is_the_median_l2_the_mean():
    """On a uniform density the best ReLU(w rho^mu - b) is a constant: L1's is the target's median,
    L2's its mean (computed here with numpy).

    Catches: the exponent p ignored (L1 and L2 the same fit), or the fit not measuring the loss
    it names.
    """
    rng = np.random.default_rng(3)
    ref = rng.lognormal(0.0, 1.2, size=20000).astype(np.float32)
    rho = np.ones_like(ref)
    a = ref.mean()
    l1 = fid.transform_fit(rho, ref, 1)
    l2 = fid.transform_fit(rho, ref, 2)
    median_over_mean = np.median(ref) / a
    assert median_over_mean < 0.6  # a skewed target: the two fits must differ
    # the grid of w - b is spaced by at most 0.1 (in units of the mean) near these values
    assert l1["mean_ratio"] == pytest.approx(median_over_mean, abs=0.1)
    assert l2["mean_ratio"] == pytest.approx(1.0, abs=0.1)
    assert l1["empty"] == 0.0 and l2["empty"] == 0.0
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        fid.transform_fit(rho, ref, 3)


def test_diagnostics_new_columns():
    """median/mean of each map and the mean P/P_ref above k = 2, against hand values."""
    pred = np.array([0.0, 1.0, 2.0, 5.0])  # median 1.5, mean 2
    ref = np.array([1.0, 1.0, 1.0, 5.0])  # median 1, mean 2
    fom = {
        "k": np.array([0.0, 0.5, 1.0, 2.0, 3.0, np.nan]),
        "ratio": np.array([np.nan, 0.9, 1.0, 0.6, 0.8, np.nan]),
        "r": np.array([np.nan, 0.99, 0.9, 0.8, 0.7, np.nan]),
    }
    d = fid.diagnostics(pred, ref, fom)
    assert d["median_over_mean_pred"] == pytest.approx(0.75)
    assert d["median_over_mean_ref"] == pytest.approx(0.5)
    assert d["ratio_above_2"] == pytest.approx(0.7)
    assert d["empty_pred"] == pytest.approx(0.25)
    assert d["first_bin_ratio"] == pytest.approx(0.9)


def test_occupancy_map_has_the_targets_occupancy_and_mean():
    rng = np.random.default_rng(0)
    rho = rng.lognormal(0, 1, size=(16, 16, 16))
    ref = np.where(rng.random(rho.shape) < 0.05, rng.random(rho.shape) * 10, 0.0)
    f = fid.occupancy_map(rho, ref, 1.7)
    assert np.mean(f > 0) == pytest.approx(np.mean(ref > 0), abs=1.0 / rho.size)
    assert f.mean() == pytest.approx(ref.mean(), rel=1e-9)
    # it keeps the densest cells
    assert np.all(rho[f > 0].min() >= rho[f == 0].max())


def _record(goals_met):
    diag = {
        "mean_ratio": 0.84,
        "empty_pred": 0.67,
        "empty_ref": 0.0,
        "first_bin_k": 0.11,
        "first_bin_ratio": 0.69,
        "first_bin_r": 0.99,
        "median_over_mean_pred": 0.01,
        "median_over_mean_ref": 0.06,
        "ratio_above_2": 0.9,
    }
    figs = {"k_10pct": 0.0, "k_30pct": 0.0, "k_r09": 1.5, "k_r07": 2.7}
    rec = {
        t: {
            "JERALD": dict(figs),
            "diagnostics": dict(diag),
            "curves": _curves(K, K * 0 + 1, K * 0 + 1),
        }
        for t in ("dm", "stellar", "hi")
    }
    res = {
        "train_seed": rec,
        "unseen_seed": {t: {**v, "JERALD": dict(v["JERALD"])} for t, v in rec.items()},
        "goals": [
            {
                "goal": "HI: within 30% to k = 1 h/Mpc",
                "reached": 0.0,
                "target": 1.0,
                "met": goals_met,
            }
        ],
        "measurements": {
            "hi_transform_fit": {
                "L1": {
                    "mu": 0.8,
                    "w": 1.4,
                    "b": 0.6,
                    "loss": 1.0,
                    "empty": 0.61,
                    "mean_ratio": 0.66,
                },
                "L2": {"mu": 1.2, "w": 1.0, "b": 0.0, "loss": 5.0, "empty": 0.0, "mean_ratio": 1.0},
            }
        },
        "figures": [],
    }
    return res


def test_report_explains_each_missed_goal_with_its_measurement():
    """A missed goal gets a paragraph quoting the stored measurements; a met one gets none.

    Catches: a report that lists a goal as missed without the measurement that shows why (the
    issue's requirement), or that explains goals that were met.
    """
    missed = fid._section(0.0, _record(False))["text"]
    assert "**HI: within 30% to k = 1 h/Mpc**" in missed
    assert "61.0% empty cells" in missed and "0.66x" in missed  # the L1 fit's numbers
    assert "median is 0.06 of its mean" in missed
    assert "67.0% predicted vs 0.0% in the truth" in missed
    met = fid._section(0.0, _record(True))["text"]
    assert "HI: within 30%" not in met
    # measurements made outside the script are kept with the record and shown
    rec = _record(True) | {"notes": ["HI trained with n = 1: within 30% to k = 2"]}
    assert "**Measured separately**: HI trained with n = 1" in fid._section(0.0, rec)["text"]


@pytest.fixture(scope="module")
def pm16():
    from jerald_nbk import workflow as wf

    return wf.engine((16, 16, 16), 20.0, dtype="f8")


def test_true_density_r_is_one_for_a_target_made_from_the_density(pm16):
    """A target that *is* the eq-8 form of the density: r = 1 at every k, k_r09 the last bin.

    Catches: the occupancy or the power applied to the wrong map (the target instead of the
    density) or the arguments swapped.
    """
    rng = np.random.default_rng(1)
    dm = rng.lognormal(0, 1, size=(16, 16, 16))
    ref = fid.occupancy_map(dm, np.where(dm > np.quantile(dm, 0.9), 1.0, 0.0), 2.0)
    out = fid.true_density_r(pm16, dm, ref, 2.0)
    assert out["r_at_1"] == pytest.approx(1.0, abs=1e-9)
    from jerald_nbk.analysis.power import power_spectrum

    k_last = float(np.nanmax(power_spectrum(ref, pm16.BoxSize).k))
    assert out["k_r09"] == pytest.approx(k_last)
    assert out["k_20pct"] == pytest.approx(k_last)


def test_threshold_check_trained_equal_to_target(pm16):
    """When the trained eq-8 map equals the target, its losses (plain and smoothed) are 0 and the
    occupancy-matched map is the same map; the smoothing exponent is recorded."""
    rng = np.random.default_rng(2)
    rho = rng.lognormal(0, 1, size=(16, 16, 16))
    w, mu, b = 0.5, 1.5, 2.0
    ref = np.maximum(w * (rho + 1e-8) ** mu - b, 0)
    out = fid.threshold_check(pm16, rho, ref, w, mu, b, 1.0)
    assert out["trained"]["l1"] == pytest.approx(0.0, abs=1e-12)
    assert out["trained"]["l1_smoothed"] == pytest.approx(0.0, abs=1e-9)
    assert out["truth_occupancy"]["nonempty"] == pytest.approx(np.mean(ref > 0), abs=1 / ref.size)
    assert out["smoothing_n"] == 1.0


def test_merged_records_keep_other_redshifts_with_their_own_steps():
    """A redshift re-run with fewer steps keeps the other redshifts' records, each stating its
    steps; another suite's records are dropped.

    Catches: the earlier merge, which required the same number of steps and so silently dropped
    z = 0 and 2 when z = 5 was run with 100 steps instead of 300.
    """
    old = {
        "size": "bench",
        "seed": 42,
        "unseen_seed": 1042,
        "steps": 300,
        "redshifts": {"2": {"k_max": 5.0}, "0": {"k_max": 5.0, "steps": 300}},
    }
    new = {"size": "bench", "seed": 42, "unseen_seed": 1042, "steps": 100, "redshifts": {}}
    kept = fid.merged_records(old, new)
    assert set(kept) == {"2", "0"}
    assert kept["2"]["steps"] == 300 and kept["0"]["steps"] == 300
    assert fid.merged_records(old, new | {"seed": 7}) == {}
    prov = fid._provenance(new | {"redshifts": kept | {"5": {"steps": 100}}}, "x.json")
    assert prov["steps per stage"] == "300 at z = 2, 300 at z = 0, 100 at z = 5"
