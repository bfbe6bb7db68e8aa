"""Which training step to keep (issue 10, item 6): the selection rules measured on two seeds.

    python -m benchmarks.selection_rules [--target dm] [--steps 500] [--smoothing-n N]

Builds two demo-size suites (64^3, 40 Mpc/h) at z = 3 (seeds 101 and 202, in ``runs/selection``),
trains a stage on each seed, and for every rule of :data:`jerald_nbk.train.loss.SELECTION_RULES`
(and "last") takes the step that rule keeps and judges its parameters on the same seed and on the
other one (figures of merit of the power spectrum, the map mean, the first k bin). Writes
``benchmarks/results/selection_rules[_<target>].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SEEDS = (101, 202)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="dm", choices=["dm", "stellar", "hi"])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--smoothing-n", type=float, default=None, help="default: the paper's")
    ap.add_argument("--out", default="runs/selection")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")

    import jax.numpy as jnp

    from jerald_nbk.analysis.metrics import figures_of_merit
    from jerald_nbk.model.pipeline import Stage, StageConfig
    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.suite import build_suite
    from jerald_nbk.train.loop import Objective, train
    from jerald_nbk.train.loss import SELECTION_RULES, selection_score
    from jerald_nbk.workflow import paper_settings, read_map, read_particles

    z, target = 3.0, args.target
    pm = JaxEngine(64, 40.0)
    data = {}
    for s in SEEDS:
        paths = build_suite(Path(args.out) / f"suite_{s}", "demo", s, (z,), progress=False)
        pos, _ = read_particles(paths["fastpm_z3"], pm)
        maps = {t: read_map(paths[f"truth_{t}_z3"], pm)[0] for t in ("dm", "stellar", "hi")}
        data[s] = (jnp.asarray(pos), maps)
    out = {"suite": "demo (64^3, 40 Mpc/h), z = 3", "target": target, "steps": args.steps}
    for s in SEEDS:
        other = next(x for x in SEEDS if x != s)
        pos, maps = data[s]
        nl, cfg = paper_settings(target, z, args.steps, progress=False)
        if args.smoothing_n is not None:
            cfg.smoothing_n = args.smoothing_n
        w = 1.0 if target == "dm" else max(float(maps[target].sum()) / pm.ncells, 1e-5)
        stage = Stage(pm, StageConfig(target, nl), w_init=w)
        star = maps["stellar"] if target == "hi" else None  # HI: the true stellar map
        obj = Objective(stage, pos, maps[target], cfg, star=star)
        hist = train(obj, cfg).history
        cells = {k: float(m.sum()) for k, m in obj.masks.items()}
        rec = {}
        for rule in (*SELECTION_RULES, "last"):
            if rule == "last":
                step = len(hist) - 1
            else:
                step = int(np.argmin([selection_score(r, rule, cells) for r in hist]))
            raw = jnp.asarray(stage.table.to_raw(hist[step]["params"]))
            r = {"step": step}
            for lab, ss in (("same", s), ("unseen", other)):
                p2, m2 = data[ss]
                F = np.asarray(
                    stage.forward(p2, raw, star=m2["stellar"] if star is not None else None)
                )
                ref = np.asarray(m2[target])
                fom = figures_of_merit(F, ref, 40.0)
                k = np.asarray(fom["k"])
                first = int(np.flatnonzero(np.isfinite(k) & (k > 0))[0])
                r[lab] = {key: round(float(fom[key]), 3) for key in ("k_10pct", "k_30pct", "k_r09")}
                r[lab]["mean_ratio"] = round(float(F.mean() / ref.mean()), 3)
                r[lab]["ratio_first_bin"] = round(float(fom["ratio"][first]), 3)
            rec[rule] = r
            print(s, rule, r, flush=True)
        out[str(s)] = rec
    name = "selection_rules.json" if target == "dm" else f"selection_rules_{target}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
