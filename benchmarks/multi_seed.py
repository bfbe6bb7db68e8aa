"""One-seed against two-seed training (issue 14, item 4), judged on a third, unseen seed.

    python -m benchmarks.multi_seed [--size demo] [--redshift 5] [--seeds 101,202,303]
                                    [--steps 300] [--out runs/multi-seed]

The DM -> stellar -> HI pipeline (the paper's settings at that redshift) is trained twice: on the
first seed's simulation alone, and on the first two together (:func:`jerald_nbk.workflow.
train_pipeline` with lists: every stage's loss summed over both). Both are applied to the third
seed's FastPM particles and compared with its truth maps: the figures of merit of each target, the
per-k curves, and a plot per target with both models. Writes ``benchmarks/results/multi_seed.json``
and ``<out>/power_<target>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
TARGETS = ("dm", "stellar", "hi")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="demo", choices=["smoke", "demo", "bench", "paper"])
    ap.add_argument("--redshift", type=float, default=5.0)
    ap.add_argument("--seeds", default="101,202,303", help="train A, train B, unseen C")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/multi-seed")
    ap.add_argument("--json", default=str(RESULTS / "multi_seed.json"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from benchmarks.fidelity import _scalars, curves
    from jerald_nbk import workflow as wf
    from jerald_nbk.analysis.metrics import figures_of_merit
    from jerald_nbk.analysis.plots import plot_power_comparison
    from jerald_nbk.io import read_mesh
    from jerald_nbk.suite.build import build_suite, ztag
    from jerald_nbk.utils import atomic_write

    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) != 3 or len(set(seeds)) != 3:
        ap.error(f"--seeds: expected three different seeds, found {args.seeds!r}")
    z, tag, out = args.redshift, ztag(args.redshift), Path(args.out)
    progress = not args.quiet
    t0 = time.perf_counter()
    # the fidelity benchmark's suites are reused when they exist (same layout and cache rule)
    suites = []
    for s in seeds:
        where = Path("runs/fidelity-demo" if args.size == "demo" else out) / f"suite_seed{s}"
        print(f"[multi-seed] suite {args.size}, seed {s}: {where}", flush=True)
        suites.append(build_suite(where, args.size, s, [z], progress=progress))
    _, attrs = read_mesh(suites[0][f"truth_dm_z{tag}"])
    pm = wf.engine(tuple(int(n) for n in attrs["Nmesh"]), attrs["BoxSize"])

    def load(suite):
        pos, _ = wf.read_particles(suite[f"fastpm_z{tag}"], pm)
        truth = {t: wf.read_map(suite[f"truth_{t}_z{tag}"], pm)[0] for t in TARGETS}
        return pos, truth

    (pos_a, truth_a), (pos_b, truth_b), (pos_c, truth_c) = map(load, suites)
    trained, seconds = {}, {}
    for label, pos, truth in (
        ("one seed", pos_a, truth_a),
        ("two seeds", [pos_a, pos_b], [truth_a, truth_b]),
    ):
        print(f"[multi-seed] training on {label}", flush=True)
        t1 = time.perf_counter()
        run = wf.train_pipeline(
            pm, pos, truth, out / label.replace(" ", "_"), z, args.steps, progress=progress
        )
        seconds[label] = time.perf_counter() - t1
        trained[label] = run.runs
    results = {t: {} for t in TARGETS}
    figs = {}
    for label, runs in trained.items():
        maps = wf.apply_pipeline(runs, pos_c)
        for t in TARGETS:
            fom = figures_of_merit(np.asarray(maps[t]), np.asarray(truth_c[t]), pm.BoxSize)
            results[t][label] = {"fom": fom, "best_step": runs[t].result.best_step}
    doc = {
        "size": args.size,
        "redshift": z,
        "seeds": {"train": seeds[:2], "unseen": seeds[2]},
        "steps": args.steps,
        "seconds_training": seconds,
        "targets": {},
    }
    for t in TARGETS:
        by = results[t]
        figs[t] = plot_power_comparison(
            out / f"power_{t}.png",
            {lab: r["fom"] for lab, r in by.items()},
            title=f"{t}, z = {z:g}, unseen seed {seeds[2]}: trained on one seed vs two",
        )
        doc["targets"][t] = {
            lab: {
                "figures": _scalars(r["fom"]),
                "curves": curves(r["fom"]),
                "best_step": r["best_step"],
            }
            for lab, r in by.items()
        }
        one, two = (doc["targets"][t][lab]["figures"] for lab in ("one seed", "two seeds"))
        doc["targets"][t]["two_minus_one"] = {k: two[k] - one[k] for k in one}
        doc["targets"][t]["plot"] = str(figs[t])
    doc["seconds_total"] = time.perf_counter() - t0
    with atomic_write(args.json) as fh:
        json.dump(doc, fh, indent=1)
    for t in TARGETS:
        d = doc["targets"][t]
        line = ", ".join(
            f"{k} {d['one seed']['figures'][k]:.2f} -> {d['two seeds']['figures'][k]:.2f}"
            for k in ("k_10pct", "k_20pct", "k_r09")
        )
        print(f"[multi-seed] {t} on seed {seeds[2]} (one seed -> two seeds): {line}", flush=True)
    print(f"[multi-seed] wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
