"""Paint maps for many simulations with one trained pipeline (engine and stages built once).

    python examples/paint_many.py --params runs/train --out runs/many \
        sims/seed1/fastpm_z2 sims/seed2/fastpm_z2 ...

All catalogs must share the box and the particle count; the compiled model is reused, so only the
first catalog pays for compilation.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from jerald_nbk import workflow as wf
from jerald_nbk.io import write_mesh
from jerald_nbk.io.paramfiles import load_params

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("catalogs", nargs="*", default=["runs/suite/fastpm_z2"])
p.add_argument("--params", default="runs/train", help="folder with dm/, stellar/, hi/params.json")
p.add_argument("--out", default="runs/many")
args = p.parse_args()
params, out = Path(args.params), Path(args.out)

files = {t: params / t / "params.json" for t in ("dm", "stellar", "hi")}
prov = load_params(files["dm"])[2]  # the mesh the model was trained on
pm = wf.engine(prov["Nmesh"], prov["BoxSize"])
pipeline = wf.pipeline_from_files(pm, **files)  # built once, reused for every catalog


def positions(paths):
    """Read the catalogs one at a time (only one is in memory while the previous one paints)."""
    for path in paths:
        yield wf.read_particles(path, pm)[0]


t0 = time.perf_counter()
# maps_many compiles the whole pipeline once (per particle count) and reuses it for every catalog
for i, (path, maps) in enumerate(
    zip(args.catalogs, pipeline.maps_many(positions(args.catalogs)), strict=True)
):
    for name, local in maps.items():  # {"dm": 1 + delta, "stellar": ..., "hi": ...}
        arr = wf.to_global(pm, local)
        (out / f"sim{i:03d}").mkdir(parents=True, exist_ok=True)
        write_mesh(out / f"sim{i:03d}" / name, arr, pm.BoxSize, attrs={"source": str(path)})
    mean = {k: float(np.mean(wf.to_global(pm, v))) for k, v in maps.items()}
    print(f"sim{i:03d} {path}: {time.perf_counter() - t0:.2f} s, means {mean}")
    t0 = time.perf_counter()
print(f"painted {len(args.catalogs)} catalogs into {out}")
