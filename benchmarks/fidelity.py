"""Fidelity benchmark (issue 6): figures of merit per target and redshift at bench size, the
FastPM-only DM baseline, and generalisation to an unseen seed with the parameters trained on the
first.

    python -m benchmarks.fidelity [--size bench] [--redshifts 2,0,5] [--seed 42] [--unseen-seed 1042]
                                  [--steps 300] [--out runs/fidelity]

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
)


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
    """Measurements that explain a missed goal: map means, empty cells, the first k bin."""
    pred, ref = np.asarray(pred, dtype=float), np.asarray(ref, dtype=float)
    k = np.asarray(fom["k"])
    first = int(np.flatnonzero(np.isfinite(k) & (k > 0))[0])
    return {
        "mean_ratio": float(pred.mean() / ref.mean()) if ref.mean() else float("nan"),
        "empty_pred": float(np.mean(pred <= 0)),
        "empty_ref": float(np.mean(ref <= 0)),
        "first_bin_k": float(k[first]),
        "first_bin_ratio": float(np.asarray(fom["ratio"])[first]),
        "first_bin_r": float(np.asarray(fom["r"])[first]),
    }


def _section(z: float, res: dict) -> dict:
    """The report section of one redshift, from its JSON record."""
    from jerald_nbk.analysis.report import fom_table

    def rows(which, suffix=""):
        return {
            f"{t} {lab}{suffix}": v
            for t, d in res[which].items()
            for lab, v in d.items()
            if lab not in ("losses", "diagnostics", "params", "best_step")
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
        [f"{t} ({which.split('_')[0]})", *(d["diagnostics"][c] for c in DIAG_COLUMNS)]
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
    return {"title": f"z = {z:g}", "text": "\n\n".join(notes), "tables": tables, "figures": figs}


def _largest_k(manifest) -> float:
    """Centre of the largest-k bin of the power spectra of a suite's meshes."""
    from jerald_nbk.analysis.power import power_spectrum

    man = json.loads(Path(manifest).read_text())
    n, box = int(man["config"]["Nmesh"]), float(man["config"]["BoxSize"])
    field = np.random.default_rng(0).normal(size=(n, n, n))
    return float(np.nanmax(power_spectrum(field, box).k))


def _provenance(doc: dict, json_path) -> dict:
    return {
        "size": doc["size"],
        "seeds": f"{doc['seed']} (training), {doc['unseen_seed']} (unseen)",
        "steps per stage": doc["steps"],
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
    args = ap.parse_args(argv)
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
    if Path(args.json).exists():  # keep the other redshifts of the same configuration
        old = json.loads(Path(args.json).read_text())
        if all(old.get(k) == doc[k] for k in ("size", "seed", "unseen_seed", "steps")):
            doc["redshifts"] = old.get("redshifts", {})
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
            run = trained.runs[t]
            res["train_seed"][t]["params"] = run.stage.table.as_dict(run.result.best_raw)
            res["train_seed"][t]["best_step"] = run.result.best_step
        res["seconds_training"] = t_train
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
