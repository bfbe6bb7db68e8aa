"""Train the DM, stellar-mass and HI stages from Python on a reference suite.

Make the inputs first (FastPM particles and high-resolution "truth" maps, ~1 minute at smoke size):

    jerald suite --size smoke --redshifts 2 --out runs/suite

then

    python examples/train_stages.py --suite runs/suite --redshift 2 --steps 300 --out runs/train

Each stage writes <out>/<target>/params.json (best by validation loss), metrics.jsonl,
checkpoint.npz and training plots; the other examples read these parameter files. Running it
again with the same --out resumes from the checkpoints.
"""

import argparse
from pathlib import Path

import numpy as np

from jerald_nbk import workflow as wf
from jerald_nbk.io import read_mesh

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--suite", default="runs/suite", help="output of `jerald suite`")
p.add_argument("--redshift", default="2", help="which of the suite's redshifts (its file suffix)")
p.add_argument("--steps", type=int, default=300, help="Adam steps per stage (paper: ~500)")
p.add_argument("--out", default="runs/train")
args = p.parse_args()
suite, z, out = Path(args.suite), args.redshift, Path(args.out)

# One engine for everything: the truth maps fix the mesh and the box. With one process this is
# the JAX engine; under mpiexec the pmesh one (the model code does not change).
_, attrs = read_mesh(suite / f"truth_dm_z{z}")
pm = wf.engine(attrs["Nmesh"], attrs["BoxSize"])
pos, _ = wf.read_particles(suite / f"fastpm_z{z}", pm)  # FastPM particles, dataset "1"
redshift = float(z)


def target(name):
    return wf.read_map(suite / f"truth_{name}_z{z}", pm)[0]


# DM: the layers move the FastPM particles towards the high-resolution density (L2 loss).
layers, cfg = wf.paper_settings("dm", redshift, steps=args.steps, progress=False)
dm = wf.train_stage(pm, "dm", pos, target("dm"), out / "dm", n_layers=layers, train_config=cfg)
improved = dm.stage.displace(pos, dm.result.best_raw)

# Stellar mass: new layers on the improved particles, then eq 8 (L1 loss on a smoothed map).
layers, cfg = wf.paper_settings("stellar", redshift, steps=args.steps, progress=False)
star_run = wf.train_stage(
    pm, "stellar", improved, target("stellar"), out / "stellar", n_layers=layers, train_config=cfg
)
star = star_run.stage.forward(improved, star_run.result.best_raw)

# HI: its layers and eqs 13-15 use the frozen stellar map.
layers, cfg = wf.paper_settings("hi", redshift, steps=args.steps, progress=False)
hi = wf.train_stage(
    pm, "hi", improved, target("hi"), out / "hi", n_layers=layers, train_config=cfg, star=star
)

for name, run in (("dm", dm), ("stellar", star_run), ("hi", hi)):
    losses = {k: round(float(v), 6) for k, v in run.result.best_losses.items()}
    print(f"{name}: best step {run.result.best_step}, losses {losses} -> {run.params_path}")
    print(f"  parameters: {run.stage.table.as_dict(np.asarray(run.result.best_raw))}")
