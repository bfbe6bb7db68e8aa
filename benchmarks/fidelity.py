"""Fidelity benchmark (issue 6): figures of merit per target and redshift at bench size, the
FastPM-only DM baseline, and generalisation to an unseen seed with the parameters trained on the
first.

    python -m benchmarks.fidelity [--size bench] [--redshifts 2,0,5] [--seed 42] [--unseen-seed 1042]
                                  [--steps 300] [--out runs/fidelity]
    python -m benchmarks.fidelity --report-only | --remeasure [--json ...] [--out ...]

Writes ``benchmarks/results/fidelity.json`` (after every redshift, so a partial run keeps what it
measured) and ``<out>/report.md`` with the plots. Goals (issue 6, at bench size, z = 2) are checked
and reported as met or missed; nothing is hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
FOMS = ("k_10pct", "k_30pct", "k_r09", "k_r07")
#: what :func:`diagnostics` measures, in the report's order
DIAG_COLUMNS = (
    "mean_ratio",
    "empty_pred",
    "empty_ref",
    "first_bin_k",
    "first_bin_ratio",
    "first_bin_r",
    "median_over_mean_pred",
    "median_over_mean_ref",
    "ratio_above_2",
)
#: keys of a map's record that are not figures-of-merit rows of the report's tables
NOT_ROWS = ("losses", "diagnostics", "params", "best_step", "curves")
#: which curve and which threshold each figure of merit reads (:func:`seed_stability`)
FIG_CURVE = {
    "k_10pct": ("ratio", 0.1),
    "k_20pct": ("ratio", 0.2),
    "k_30pct": ("ratio", 0.3),
    "k_r09": ("r", 0.9),
    "k_r07": ("r", 0.7),
}
#: largest difference between two seeds' curves (P/P_ref, r) still called "the maps agree" by
#: :func:`seed_stability`: 10% in power (the tightest goal), 0.05 in r
GRAZING_DIFF = {"ratio": 0.1, "r": 0.05}
#: the grid of :func:`transform_fit`: powers, and ``w`` and ``b`` in units of the target's mean
FIT_MU = (0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
FIT_W = (0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)
FIT_B = (-0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _scalars(fom: dict, extra_tols=(0.2,)) -> dict:
    from jerald_nbk.analysis.metrics import k_within

    out = {k: float(fom[k]) for k in FOMS}
    for tol in extra_tols:
        out[f"k_{int(tol * 100)}pct"] = float(k_within(fom["k"], fom["ratio"], tol))
    return out


def _bin_value(fom: dict, key: str, k0: float) -> float:
    """Value of ``fom[key]`` in the bin nearest ``k0``."""
    k = np.asarray(fom["k"])
    return float(np.asarray(fom[key])[np.nanargmin(np.abs(k - k0))])


def goals(z: float, train: dict, unseen: dict, k_max: float) -> list[dict]:
    """Issue 10's fidelity goals at one redshift, each with what was reached.

    At bench size: HI within 10% to k = 1 h/Mpc at z = 2 and within 30% to k = 1 at z = 0;
    stellar within 20% to k = 2 at z = 2; r >= 0.9 to k = 1 for every target and redshift; on the
    unseen seed every figure of merit within 15% of the training seed's.
    """
    g = []
    if abs(z - 2) < 1e-9:
        g.append(
            {
                "goal": "HI: within 10% to k = 1 h/Mpc",
                "reached": train["hi"]["JERALD"]["k_10pct"],
                "target": 1.0,
            }
        )
        g.append(
            {
                "goal": "stellar: within 20% to k = 2 h/Mpc",
                "reached": train["stellar"]["JERALD"]["k_20pct"],
                "target": 2.0,
            }
        )
    if abs(z) < 1e-9:
        g.append(
            {
                "goal": "HI: within 30% to k = 1 h/Mpc",
                "reached": train["hi"]["JERALD"]["k_30pct"],
                "target": 1.0,
            }
        )
    for t in ("dm", "stellar", "hi"):
        g.append(
            {
                "goal": f"{t}: r >= 0.9 to k = 1 h/Mpc",
                "reached": train[t]["JERALD"]["k_r09"],
                "target": 1.0,
            }
        )
    worst, where = 0.0, ""
    for t in ("dm", "stellar", "hi"):
        for k in FOMS:
            a, b = train[t]["JERALD"][k], unseen[t]["JERALD"][k]
            if a > 0 and abs(b - a) / a > worst:
                worst, where = abs(b - a) / a, f"{t} {k}: {a:.2f} -> {b:.2f}"
    g.append(
        {
            "goal": "unseen seed: every figure within 15% of the training seed's",
            "reached": worst,
            "target": 0.15,
            "lower_is_better": True,
            "note": f"worst: {where}" if where else "",
        }
    )
    for x in g:
        if "to k =" in x["goal"] and x["target"] > k_max:
            x["note"] = f"unreachable on this mesh: the largest k bin is {k_max:.2f} h/Mpc"
        x["met"] = (
            bool(x["reached"] <= x["target"])
            if x.get("lower_is_better")
            else bool(x["reached"] >= x["target"])
        )
    return g


def diagnostics(pred, ref, fom: dict) -> dict:
    """Measurements that explain a missed goal.

    Map means, empty cells, the first k bin, each map's median over its mean (an L1 loss fits the
    per-cell median, so a target whose median is far below its mean is fitted low) and the mean
    ``P_pred / P_ref`` over the bins with ``k >= 2 h/Mpc`` (small-scale power).
    """
    pred, ref = np.asarray(pred, dtype=float), np.asarray(ref, dtype=float)
    k = np.asarray(fom["k"])
    ratio = np.asarray(fom["ratio"], dtype=float)
    first = int(np.flatnonzero(np.isfinite(k) & (k > 0))[0])
    small = np.isfinite(k) & (k >= 2.0) & np.isfinite(ratio)
    return {
        "mean_ratio": float(pred.mean() / ref.mean()) if ref.mean() else float("nan"),
        "empty_pred": float(np.mean(pred <= 0)),
        "empty_ref": float(np.mean(ref <= 0)),
        "first_bin_k": float(k[first]),
        "first_bin_ratio": float(ratio[first]),
        "first_bin_r": float(np.asarray(fom["r"])[first]),
        "median_over_mean_pred": _median_over_mean(pred),
        "median_over_mean_ref": _median_over_mean(ref),
        "ratio_above_2": float(np.mean(ratio[small])) if small.any() else float("nan"),
    }


def _median_over_mean(x) -> float:
    m = float(np.mean(x))
    return float(np.median(x) / m) if m else float("nan")


def curves(fom: dict) -> dict:
    """The per-bin ``k``, ``P_pred / P_ref`` and ``r`` of a figures-of-merit dict, JSON-ready.

    Non-finite values (empty bins) become None.
    """
    return {
        key: [float(v) if np.isfinite(v) else None for v in np.asarray(fom[key], dtype=float)]
        for key in ("k", "ratio", "r")
    }


def _arrays(c: dict) -> dict:
    return {key: np.array([np.nan if v is None else v for v in c[key]], float) for key in c}


def seed_stability(train_curves: dict, unseen_curves: dict, fig: str, a: float, b: float) -> dict:
    """Why a figure of merit moved between two seeds: the curves it reads, compared.

    A figure such as ``k_10pct`` is the k where a curve first crosses a threshold. Where the
    curve runs close to the threshold over a range of k, a small difference between two maps
    moves the crossing across that whole range. This measures both: ``max_diff``, the largest
    ``|curve_unseen - curve_train|`` over the bins up to ``max(a, b)``, at ``k_max_diff``;
    ``band``, the largest distance of the training curve from the threshold between ``min(a, b)``
    and ``max(a, b)``. ``grazing`` is True when the two maps agree closely (``max_diff`` at most
    :data:`GRAZING_DIFF` of the curve) while the figure moved: the threshold figure, not the
    map, is what is unstable.

    Parameters
    ----------
    train_curves, unseen_curves : dict
        :func:`curves` of the same map on the two seeds (same binning).
    fig : str
        A key of :data:`FIG_CURVE`.
    a, b : float
        The figure on the training and on the unseen seed (h/Mpc).

    Returns
    -------
    dict with ``curve``, ``threshold``, ``k_lo``, ``k_hi``, ``max_diff``, ``k_max_diff``,
    ``train_at``, ``unseen_at`` (the two curves there), ``band``, ``grazing``.
    """
    key, thr = FIG_CURVE[fig]
    t, u = _arrays(train_curves), _arrays(unseen_curves)
    k = t["k"]
    if len(k) != len(u["k"]) or not np.allclose(k, u["k"], equal_nan=True):
        raise ValueError(f"{fig}: the two seeds' curves have different k bins")
    lo, hi = min(a, b), max(a, b)
    upto = np.isfinite(k) & (k > 0) & (k <= hi * (1 + 1e-9))
    diff = np.where(upto, np.abs(u[key] - t[key]), np.nan)
    between = upto & (k >= lo * (1 - 1e-9))
    dist = (thr - np.abs(t[key] - 1.0)) if key == "ratio" else (t[key] - thr)
    dist = np.abs(dist[between])
    if not np.isfinite(diff).any():
        raise ValueError(f"{fig}: no informative bin up to k = {hi:g}")
    at = int(np.nanargmax(diff))
    max_diff = float(diff[at])
    return {
        "curve": "P/P_ref" if key == "ratio" else "r",
        "threshold": f"|P/P_ref - 1| = {thr:g}" if key == "ratio" else f"r = {thr:g}",
        "k_lo": lo,
        "k_hi": hi,
        "max_diff": max_diff,
        "k_max_diff": float(k[at]),
        "train_at": float(t[key][at]),
        "unseen_at": float(u[key][at]),
        "band": float(np.nanmax(dist)) if np.isfinite(dist).any() else float("nan"),
        "grazing": bool(max_diff <= GRAZING_DIFF[key]),
    }


def transform_fit(rho, ref, p: int, mus=FIT_MU, ws=FIT_W, bs=FIT_B) -> dict:
    """The best ``ReLU(w rho^mu - b)`` map for an L^p loss over a grid: what the loss itself asks.

    A measurement of the loss, not of the optimiser: if even the grid's best map under L1 leaves
    cells empty and its mean low, a trained model under the same loss will too. ``w`` and ``b`` are
    in units of the target's mean. All cells count (no split, no smoothing).

    Parameters
    ----------
    rho : array
        The density the final transform acts on (``1 + delta``).
    ref : array
        The target map, same shape.
    p : {1, 2}
        The loss exponent (eq 10).

    Returns
    -------
    dict with ``mu``, ``w``, ``b`` (units of the target's mean), ``loss``, ``empty`` (fraction of
    cells at zero), ``mean_ratio`` (map mean over target mean).
    """
    rho = np.asarray(rho, dtype=np.float32).ravel()
    ref = np.asarray(ref, dtype=np.float32).ravel()
    a = float(ref.mean())
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    best = None
    for mu in mus:
        base = (rho + np.float32(1e-8)) ** np.float32(mu)
        for w in ws:
            for b in bs:
                f = np.maximum(np.float32(w * a) * base - np.float32(b * a), 0)
                r = np.abs(f - ref)
                loss = float(np.mean(r if p == 1 else r * r))
                if best is None or loss < best[0]:
                    best = (loss, mu, w, b, float(np.mean(f <= 0)), float(f.mean() / a))
    loss, mu, w, b, empty, mean_ratio = best
    return {"mu": mu, "w": w, "b": b, "loss": loss, "empty": empty, "mean_ratio": mean_ratio}


def threshold_check(pm, rho, ref, w: float, mu: float, b: float, smoothing_n: float) -> dict:
    """Does the stellar loss prefer the trained threshold to one giving the truth's empty cells?

    Compares the trained eq-8 map ``ReLU(w rho^mu - b)`` with :func:`occupancy_map` (same ``mu``,
    the target's fraction of non-empty cells, the target's mean): the L1 loss without and with the eq-11 smoothing (all cells), the non-empty fraction,
    and the mean ``P/P_ref`` above k = 2 h/Mpc.

    Returns
    -------
    dict ``{"trained": {...}, "truth_occupancy": {...}}``, each with ``nonempty``, ``l1``,
    ``l1_smoothed``, ``ratio_above_2``.
    """
    from jerald_nbk.analysis.metrics import figures_of_merit
    from jerald_nbk.train.loss import smoothing_filter

    rho = np.asarray(rho, dtype=float)
    ref = np.asarray(ref, dtype=float)
    filt = smoothing_filter(pm, smoothing_n) if smoothing_n else None
    base = (rho + 1e-8) ** mu
    trained = np.maximum(w * base - b, 0)
    matched = occupancy_map(rho, ref, mu)

    def stats(f):
        r = f - ref
        rs = np.asarray(pm.apply_fourier(r, filt)) if filt is not None else r
        fom = figures_of_merit(f, ref, pm.BoxSize)
        return {
            "nonempty": float(np.mean(f > 0)),
            "l1": float(np.mean(np.abs(r))),
            "l1_smoothed": float(np.mean(np.abs(rs))),
            "ratio_above_2": diagnostics(f, ref, fom)["ratio_above_2"],
        }

    return {
        "trained": stats(trained),
        "truth_occupancy": stats(matched),
        "smoothing_n": smoothing_n,
    }


def explain(res: dict) -> list[str]:
    """One paragraph per missed goal of a redshift's record, each quoting the measurement that
    shows why (from ``diagnostics``, ``curves`` and ``measurements``; nothing is guessed)."""
    out = []
    tr = res["train_seed"]
    meas = res.get("measurements", {})
    for g in res.get("goals", []):
        if g["met"]:
            continue
        name = g["goal"]
        t = name.split(":")[0].strip().lower()
        if name.startswith("unseen seed"):
            out += _explain_unseen(res)
            continue
        d = tr.get(t, {}).get("diagnostics", {})
        text = f"**{name}** (reached {g['reached']:.3g}): "
        parts = []
        if d:
            parts.append(
                f"map mean {d['mean_ratio']:.3g}x the truth's, first bin (k = "
                f"{d['first_bin_k']:.3g}) P/P_ref {d['first_bin_ratio']:.3g} and r "
                f"{d['first_bin_r']:.3g}, empty cells {d['empty_pred']:.1%} predicted vs "
                f"{d['empty_ref']:.1%} in the truth"
            )
            if "median_over_mean_ref" in d and d["empty_ref"] < 0.5:
                parts.append(
                    f"median/mean {d['median_over_mean_pred']:.3g} predicted vs "
                    f"{d['median_over_mean_ref']:.3g} in the truth, P/P_ref above k = 2 "
                    f"{d['ratio_above_2']:.3g}"
                )
        fit = meas.get(f"{t}_transform_fit")
        if fit and t == "hi":
            f1, f2 = fit["L1"], fit["L2"]
            parts.append(
                "the best ReLU(w (1+delta)^mu - b) on the HI stage's input density over a grid "
                f"(benchmarks.fidelity.transform_fit) is, under L1 (the paper's HI loss), mu = "
                f"{f1['mu']:g} with {f1['empty']:.1%} empty cells and mean {f1['mean_ratio']:.3g}x "
                f"the truth's; under L2, mu = {f2['mu']:g}, {f2['empty']:.1%} empty, mean "
                f"{f2['mean_ratio']:.3g}x. L1 fits the per-cell median, and this target's median is "
                f"{d.get('median_over_mean_ref', float('nan')):.3g} of its mean: the loss itself, not "
                "the optimiser or the initial values, asks for the empty cells and the low mean"
            )
        thr = meas.get("stellar_threshold")
        if thr and t == "stellar":
            a, m = thr["trained"], thr["truth_occupancy"]
            prefers = a["l1_smoothed"] < m["l1_smoothed"] and m["l1"] < a["l1"]
            parts.append(
                f"smoothed L1 (the paper's n = {thr['smoothing_n']:g}) of the trained map "
                f"({a['nonempty']:.1%} non-empty cells) {a['l1_smoothed']:.4g}, of the same-mu "
                f"map with the truth's occupancy ({m['nonempty']:.1%}) {m['l1_smoothed']:.4g}; "
                f"unsmoothed L1 {a['l1']:.4g} vs {m['l1']:.4g}; P/P_ref above k = 2 "
                f"{a['ratio_above_2']:.3g} vs {m['ratio_above_2']:.3g}"
                + (
                    ": the smoothed loss prefers the trained map's extra occupied cells, which "
                    "the unsmoothed loss would not, so eq 11 spreads the stellar mass (the paper "
                    "reports the same smearing of its stellar peaks)"
                    if prefers
                    else ""
                )
            )
        tdr = meas.get("stellar_from_true_density")
        if tdr and t == "stellar" and "r >=" in name:
            parts.append(
                f"the same form applied to the true (high-resolution) density with the truth's "
                f"occupancy (benchmarks.fidelity.true_density_r, best mu = {tdr['mu']:.3g}) reaches "
                f"r >= 0.9 only to k = {tdr['k_r09']:.3g} (r = {tdr['r_at_1']:.3g} at k = 1): "
                "the stellar target's scatter at fixed density bounds r, whatever the model"
            )
        out.append(text + "; ".join(parts) + "." if parts else text + "no measurement stored.")
    return out


def _explain_unseen(res: dict) -> list[str]:
    """Per figure that moved more than 15% between the seeds: :func:`seed_stability`."""
    out = []
    for t, d in res["train_seed"].items():
        u = res["unseen_seed"].get(t, {})
        if "curves" not in d or "curves" not in u:
            continue
        for fig, (_key, _thr) in FIG_CURVE.items():
            if fig not in d["JERALD"] or fig not in u["JERALD"]:
                continue
            a, b = d["JERALD"][fig], u["JERALD"][fig]
            if not (a > 0 and abs(b - a) / a > 0.15):
                continue
            s = seed_stability(d["curves"], u["curves"], fig, a, b)
            where = (
                f"the largest difference is at k = {s['k_max_diff']:.3g} ({s['train_at']:.3g} vs "
                f"{s['unseen_at']:.3g})"
            )
            why = (
                "the maps agree this closely and the figure still moved because the curve "
                "runs near the threshold: the threshold figure, not the map, is unstable"
                if s["grazing"]
                else "the unseen seed's map itself differs"
            )
            out.append(
                f"**unseen seed, {t} {fig}** ({a:.3g} -> {b:.3g} h/Mpc): the two seeds' "
                f"{s['curve']} differ by at most {s['max_diff']:.3g} below k = {s['k_hi']:.3g}; "
                f"{where}; between k = {s['k_lo']:.3g} and {s['k_hi']:.3g} the training curve "
                f"stays within {s['band']:.3g} of {s['threshold']}: {why}."
            )
    return out


def occupancy_map(rho, ref, mu: float) -> np.ndarray:
    """``ReLU(rho^mu - t)`` with ``t`` leaving the target's fraction of cells non-empty, scaled to
    the target's mean: the eq-8 form at a given ``mu`` with the target's occupancy."""
    rho, ref = np.asarray(rho, dtype=float), np.asarray(ref, dtype=float)
    base = (rho + 1e-8) ** mu
    f = np.maximum(base - np.quantile(base, 1.0 - np.mean(ref > 0)), 0)
    return f * (ref.mean() / f.mean()) if f.mean() else f


def true_density_r(pm, dm_truth, ref, mu: float, mus=(0.5, 1.0, 1.5, 2.0, 3.0, 4.0)) -> dict:
    """How far r can go for a map made from the *true* density: the target's own stochasticity.

    Applies :func:`occupancy_map` to the high-resolution DM target (the true density on the output
    mesh, not FastPM's) for the trained ``mu`` and each of ``mus``, and keeps the one reaching
    r >= 0.9 to the largest k (then the largest r at k = 1). If even this map misses r >= 0.9, the
    miss is the target's scatter at fixed density (e.g. the stellar-to-halo scatter of the stand-in
    suite), which no function of the local density can recover.

    Returns
    -------
    dict with ``mu`` (the best), ``k_r09``, ``r_at_1`` (r in the bin nearest k = 1 h/Mpc),
    ``k_20pct``.
    """
    from jerald_nbk.analysis.metrics import figures_of_merit, k_within

    best = None
    for m in sorted({float(mu), *map(float, mus)}):
        fom = figures_of_merit(occupancy_map(dm_truth, ref, m), ref, pm.BoxSize)
        out = {
            "mu": m,
            "k_r09": float(fom["k_r09"]),
            "r_at_1": _bin_value(fom, "r", 1.0),
            "k_20pct": float(k_within(fom["k"], fom["ratio"], 0.2)),
        }
        if best is None or (out["k_r09"], out["r_at_1"]) > (best["k_r09"], best["r_at_1"]):
            best = out
    return best


def measurements(pm, stages: dict, pos, truth: dict) -> dict:
    """The measurements :func:`explain` quotes, on the training seed.

    Parameters
    ----------
    pm : ParticleMesh
    stages : dict
        ``{"dm": (stage, raw), "stellar": (stage, raw, smoothing_n), "hi": ...}``, the trained
        stages (best parameters) and the stellar stage's eq-11 smoothing exponent.
    pos : array
        FastPM particles of the training seed.
    truth : dict
        Target maps ``stellar`` and ``hi`` (local meshes).

    Returns
    -------
    dict with ``hi_transform_fit`` (:func:`transform_fit` for L1 and L2 on the DM-improved
    density, the HI stage's input) and ``stellar_threshold`` (:func:`threshold_check`).
    """
    dm_stage, dm_raw = stages["dm"][:2]
    improved = dm_stage.displace(pos, dm_raw)
    rho = np.asarray(pm.density(improved))
    out = {
        "hi_transform_fit": {
            f"L{p}": transform_fit(rho, np.asarray(truth["hi"]), p) for p in (1, 2)
        }
    }
    st, st_raw, n = stages["stellar"]
    x = st.displace(improved, st_raw)
    prm = st.table.as_dict(st_raw)
    out["stellar_threshold"] = threshold_check(
        pm,
        np.asarray(pm.density(x)),
        np.asarray(truth["stellar"]),
        prm["w"],
        prm["mu"],
        prm["b"],
        float(n),
    )
    if "dm" in truth:
        out["stellar_from_true_density"] = true_density_r(
            pm, np.asarray(truth["dm"]), np.asarray(truth["stellar"]), prm["mu"]
        )
    return out


def remeasure(json_path, out) -> Path:
    """Add per-k curves, the newer diagnostics and :func:`measurements` to a finished run's records.

    For every redshift of ``json_path``: reloads the trained stages from
    ``<out>/z<z>/train_*/params.json`` and both seeds' suites from ``<out>/suite_seed<seed>``,
    recomputes the maps, checks that the stored figures of merit are reproduced (they must be:
    same parameters, same inputs), and stores ``curves``, ``diagnostics`` and ``measurements``.
    Then rewrites the report.
    """
    from jerald_nbk import workflow as wf
    from jerald_nbk.analysis.metrics import figures_of_merit
    from jerald_nbk.io import read_mesh
    from jerald_nbk.io.paramfiles import load_params
    from jerald_nbk.utils import atomic_write

    doc = json.loads(Path(json_path).read_text())
    out = Path(out)
    for tag, res in doc["redshifts"].items():
        suites = {s: out / f"suite_seed{doc[k]}" for s, k in (("a", "seed"), ("b", "unseen_seed"))}
        _, attrs = read_mesh(suites["a"] / f"truth_dm_z{tag}")
        pm = wf.engine(tuple(int(n) for n in attrs["Nmesh"]), attrs["BoxSize"])
        stages = {}
        for t in ("dm", "stellar", "hi"):
            path = out / f"z{tag}" / f"train_{t}" / "params.json"
            stage, raw = wf.load_stage(path, pm, t)
            stages[t] = (stage, raw, load_params(path)[2].get("smoothing_n", 0.0))
        pipe = wf.pipeline_from_files(
            pm, **{t: out / f"z{tag}" / f"train_{t}" / "params.json" for t in stages}
        )
        for s, which in (("a", "train_seed"), ("b", "unseen_seed")):
            pos, _ = wf.read_particles(suites[s] / f"fastpm_z{tag}", pm)
            maps = pipe.maps(pos)
            truth = {t: wf.read_map(suites[s] / f"truth_{t}_z{tag}", pm)[0] for t in stages}
            for t in stages:
                fom = figures_of_merit(np.asarray(maps[t]), np.asarray(truth[t]), pm.BoxSize)
                rec = res[which][t]
                # the same parameters and inputs must give the stored figures (bin centres can
                # move in the last digit between float32 maps of the same numbers)
                moved = [
                    f"{f} {rec['JERALD'][f]:.4g} -> {fom[f]:.4g}"
                    for f in FOMS
                    if not np.isclose(fom[f], rec["JERALD"][f], rtol=0.01, atol=1e-6)
                ]
                if moved:
                    raise RuntimeError(
                        f"z = {tag}, {which} {t}: recomputed figures differ from the stored ones "
                        f"({'; '.join(moved)}): {out} does not hold the run of {json_path}"
                    )
                rec["curves"] = curves(fom)
                rec["diagnostics"] = diagnostics(maps[t], truth[t], fom)
            if s == "a":
                res["measurements"] = measurements(pm, stages, pos, truth)
        with atomic_write(json_path) as fh:
            json.dump(doc, fh, indent=1)
        print(f"[fidelity] z = {tag}: curves, diagnostics and measurements stored", flush=True)
    return rewrite_report(json_path, out)


def _section(z: float, res: dict) -> dict:
    """The report section of one redshift, from its JSON record."""
    from jerald_nbk.analysis.report import fom_table

    def rows(which, suffix=""):
        return {
            f"{t} {lab}{suffix}": v
            for t, d in res[which].items()
            for lab, v in d.items()
            if lab not in NOT_ROWS
        }

    tables = [fom_table(rows("train_seed")), fom_table(rows("unseen_seed", " (unseen)"))]
    if "goals" in res:
        tables.append(
            {
                "columns": ["goal", "reached", "target", "met", "note"],
                "rows": [
                    [
                        g["goal"],
                        g["reached"],
                        g["target"],
                        "yes" if g["met"] else "NO",
                        g.get("note", ""),
                    ]
                    for g in res["goals"]
                ],
            }
        )
    diag_rows = [
        [
            f"{t} ({which.split('_')[0]})",
            *(d["diagnostics"].get(c, float("nan")) for c in DIAG_COLUMNS),
        ]
        for which in ("train_seed", "unseen_seed")
        for t, d in res[which].items()
        if "diagnostics" in d
    ]
    if diag_rows:
        tables.append({"columns": ["map", *DIAG_COLUMNS], "rows": diag_rows})
    figs = [(cap, Path(p)) for cap, p in res.get("figures", [])]
    notes = [
        f"**{t}**: every figure of merit is 0, the trained map does not follow the reference even "
        "at the largest scales. Typically the target is so sparse (few halos) that the L1 loss is "
        "minimised by a map near zero (the median of the cells): w ends on its lower bound."
        for t, d in res["train_seed"].items()
        if all(d["JERALD"][k] == 0 for k in FOMS)
    ]
    notes += explain(res)
    # measurements made outside this script (how, where and with which numbers), kept with the
    # record so that a rebuilt report keeps them
    notes += [f"**Measured separately**: {n}" for n in res.get("notes", [])]
    return {"title": f"z = {z:g}", "text": "\n\n".join(notes), "tables": tables, "figures": figs}


def _largest_k(manifest) -> float:
    """Centre of the largest-k bin of the power spectra of a suite's meshes."""
    from jerald_nbk.analysis.power import power_spectrum

    man = json.loads(Path(manifest).read_text())
    n, box = int(man["config"]["Nmesh"]), float(man["config"]["BoxSize"])
    field = np.random.default_rng(0).normal(size=(n, n, n))
    return float(np.nanmax(power_spectrum(field, box).k))


def merged_records(old: dict, doc: dict) -> dict:
    """The redshift records of an earlier JSON that a new run keeps: those of the same suites.

    Records are kept when size and seeds match; each keeps its own number of training steps
    (``steps``, filled in from the old document's when a record predates the per-record field),
    so a redshift re-run with fewer steps does not drop the others. Records of other suites are
    dropped.
    """
    if any(old.get(k) != doc[k] for k in ("size", "seed", "unseen_seed")):
        return {}
    out = {}
    for tag, res in old.get("redshifts", {}).items():
        out[tag] = {**res, "steps": res.get("steps", old.get("steps"))}
    return out


def _provenance(doc: dict, json_path) -> dict:
    steps = {tag: res.get("steps", doc["steps"]) for tag, res in doc.get("redshifts", {}).items()}
    return {
        "size": doc["size"],
        "seeds": f"{doc['seed']} (training), {doc['unseen_seed']} (unseen)",
        "steps per stage": ", ".join(f"{n} at z = {tag}" for tag, n in steps.items())
        or doc["steps"],
        "json": str(json_path),
    }


def rewrite_report(json_path, out) -> Path:
    """Rebuild ``report.md`` (goals and notes recomputed) from a finished run's JSON and plots."""
    from jerald_nbk.analysis.report import write_report
    from jerald_nbk.utils import atomic_write

    doc = json.loads(Path(json_path).read_text())
    sections = []
    for tag, res in doc["redshifts"].items():
        z = float(tag)
        if "k_max" not in res:  # records from before k_max was stored: the mesh's largest bin
            res["k_max"] = _largest_k(Path(out) / f"suite_seed{doc['seed']}" / "suite.json")
        res["goals"] = goals(z, res["train_seed"], res["unseen_seed"], res["k_max"])
        if "figures" not in res:
            res["figures"] = [
                [f"{t}, {w} seed", str(Path(out) / f"z{tag}" / f"power_{t}{s}.png")]
                for t in ("dm", "stellar", "hi")
                for w, s in (("training", ""), ("unseen", "_unseen"))
            ]
        sections.append(_section(z, res))
    with atomic_write(json_path) as fh:
        json.dump(doc, fh, indent=1)
    return write_report(
        Path(out) / "report.md",
        sections,
        title=f"JERALD fidelity ({doc['size']})",
        provenance=_provenance(doc, json_path),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="bench", choices=["smoke", "demo", "bench", "paper"])
    ap.add_argument("--redshifts", default="2,0,5")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--unseen-seed", type=int, default=1042)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/fidelity")
    ap.add_argument("--json", default=str(RESULTS / "fidelity.json"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report from --json and the plots in --out",
    )
    ap.add_argument(
        "--remeasure",
        action="store_true",
        help="add per-k curves, diagnostics and the measurements that explain missed goals to "
        "--json from the trained parameters and suites in --out, then rebuild the report",
    )
    args = ap.parse_args(argv)
    if args.remeasure:
        print(f"[fidelity] report: {remeasure(args.json, args.out)}")
        return 0
    if args.report_only:
        print(f"[fidelity] report: {rewrite_report(args.json, args.out)}")
        return 0

    from jerald_nbk import workflow as wf
    from jerald_nbk.analysis.metrics import figures_of_merit
    from jerald_nbk.analysis.plots import plot_power_comparison
    from jerald_nbk.suite.build import build_suite, ztag
    from jerald_nbk.utils import atomic_write

    zs = [float(z) for z in args.redshifts.split(",") if z]
    out = Path(args.out)
    progress = not args.quiet
    t0 = time.perf_counter()
    print(
        f"[fidelity] suites ({args.size}) for seeds {args.seed} and {args.unseen_seed}", flush=True
    )
    suite_a = build_suite(
        out / f"suite_seed{args.seed}", args.size, args.seed, zs, progress=progress
    )
    suite_b = build_suite(
        out / f"suite_seed{args.unseen_seed}", args.size, args.unseen_seed, zs, progress=progress
    )
    doc = {
        "size": args.size,
        "seed": args.seed,
        "unseen_seed": args.unseen_seed,
        "steps": args.steps,
        "redshifts": {},
    }
    if Path(args.json).exists():
        doc["redshifts"] = merged_records(json.loads(Path(args.json).read_text()), doc)
    for z in zs:
        tag = ztag(z)
        print(f"[fidelity] z = {z:g}: training DM -> stellar -> HI on seed {args.seed}", flush=True)
        truth_path = suite_a[f"truth_dm_z{tag}"]
        from jerald_nbk.io import read_mesh

        _, attrs = read_mesh(truth_path)
        pm = wf.engine(tuple(int(n) for n in attrs["Nmesh"]), attrs["BoxSize"])
        box = pm.BoxSize

        def load(suite, pm=pm, tag=tag):
            pos, _ = wf.read_particles(suite[f"fastpm_z{tag}"], pm)
            truth = {
                t: wf.read_map(suite[f"truth_{t}_z{tag}"], pm)[0] for t in ("dm", "stellar", "hi")
            }
            return pos, truth

        pos_a, truth_a = load(suite_a)
        t1 = time.perf_counter()
        trained = wf.train_pipeline(
            pm, pos_a, truth_a, out / f"z{tag}", z, args.steps, progress=progress
        )
        t_train = time.perf_counter() - t1
        pos_b, truth_b = load(suite_b)
        maps_b = wf.apply_pipeline(trained.runs, pos_b)
        res = {"train_seed": {}, "unseen_seed": {}}
        figs = []
        for t in ("dm", "stellar", "hi"):
            fa = {
                "JERALD": figures_of_merit(np.asarray(trained.maps[t]), np.asarray(truth_a[t]), box)
            }
            fb = {"JERALD": figures_of_merit(np.asarray(maps_b[t]), np.asarray(truth_b[t]), box)}
            if t == "dm":
                res["k_max"] = float(np.nanmax(fa["JERALD"]["k"]))
                fa["FastPM"] = figures_of_merit(
                    np.asarray(pm.density(pos_a)), np.asarray(truth_a[t]), box
                )
                fb["FastPM"] = figures_of_merit(
                    np.asarray(pm.density(pos_b)), np.asarray(truth_b[t]), box
                )
            figs.append(
                (
                    f"{t}, training seed",
                    plot_power_comparison(
                        out / f"z{tag}" / f"power_{t}.png",
                        fa,
                        title=f"{t}, z = {z:g}, seed {args.seed}",
                    ),
                )
            )
            figs.append(
                (
                    f"{t}, unseen seed",
                    plot_power_comparison(
                        out / f"z{tag}" / f"power_{t}_unseen.png",
                        fb,
                        title=f"{t}, z = {z:g}, unseen seed {args.unseen_seed}",
                    ),
                )
            )
            res["train_seed"][t] = {lab: _scalars(v) for lab, v in fa.items()}
            res["unseen_seed"][t] = {lab: _scalars(v) for lab, v in fb.items()}
            res["train_seed"][t]["losses"] = trained.runs[t].result.best_losses
            res["train_seed"][t]["diagnostics"] = diagnostics(
                trained.maps[t], truth_a[t], fa["JERALD"]
            )
            res["unseen_seed"][t]["diagnostics"] = diagnostics(maps_b[t], truth_b[t], fb["JERALD"])
            res["train_seed"][t]["curves"] = curves(fa["JERALD"])
            res["unseen_seed"][t]["curves"] = curves(fb["JERALD"])
            run = trained.runs[t]
            res["train_seed"][t]["params"] = run.stage.table.as_dict(run.result.best_raw)
            res["train_seed"][t]["best_step"] = run.result.best_step
        res["measurements"] = measurements(
            pm,
            {
                t: (r.stage, r.result.best_raw, wf.paper_defaults(t, z).smoothing_n)
                for t, r in trained.runs.items()
            },
            pos_a,
            truth_a,
        )
        res["seconds_training"] = t_train
        res["steps"] = args.steps
        res["goals"] = goals(z, res["train_seed"], res["unseen_seed"], res["k_max"])
        res["figures"] = [[cap, str(p)] for cap, p in figs]
        doc["redshifts"][tag] = res
        doc["seconds_total"] = time.perf_counter() - t0
        with atomic_write(args.json) as fh:
            json.dump(doc, fh, indent=1)
        rewrite_report(args.json, out)
        print(f"[fidelity] z = {z:g} done; {args.json}, {out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
