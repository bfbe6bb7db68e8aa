"""Paint stellar-mass and HI maps from a FastPM catalog and cross-correlate them.

    python examples/stellar_hi_cross.py --catalog runs/suite/fastpm_z2 --params runs/train \
        --out runs/maps
"""

import argparse
from pathlib import Path

import numpy as np
from nbodykit.lab import BigFileCatalog, FFTPower

from jerald_nbk import JeraldMesh

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--catalog", default="runs/suite/fastpm_z2")
p.add_argument("--params", default="runs/train", help="folder with dm/, stellar/, hi/params.json")
p.add_argument("--out", default="runs/maps")
args = p.parse_args()
params, out = Path(args.params), Path(args.out)
out.mkdir(parents=True, exist_ok=True)

cat = BigFileCatalog(args.catalog, dataset="1")
stages = {t: params / t / "params.json" for t in ("dm", "stellar", "hi")}
star = JeraldMesh(cat, dm=stages["dm"], stellar=stages["stellar"])  # target: the last stage
hi = JeraldMesh(cat, **stages)  # the HI model reads the frozen stellar map itself

# As for any nbodykit mesh, compute()/FFTPower/save see 1 + delta (the map over its mean);
# the model's own units (attrs["raw_units"]) are to_real_field(normalize=False).
raw = star.to_real_field(normalize=False)
print(f"stellar mass in the box: {raw.csum():.4g} [{star.attrs['raw_units']}]")

p_star = FFTPower(star, mode="1d").power
p_hi = FFTPower(hi, mode="1d").power
p_x = FFTPower(star, second=hi, mode="1d").power
r = p_x["power"].real / np.sqrt(p_star["power"].real * p_hi["power"].real)

ok = p_x["modes"] > 1  # drop the k = 0 bin
np.savetxt(out / "r_stellar_hi.txt", np.c_[p_x["k"][ok], r[ok]], header="k [h/Mpc]  r(k)")
star.save(str(out / "stellar"))  # bigfile meshes, readable by nbodykit's BigFileMesh
hi.save(str(out / "hi"))
for k, rk in zip(p_x["k"][ok], r[ok], strict=True):
    print(f"k = {k:.3f} h/Mpc  r_stellar,HI = {rk:+.3f}")
print(f"wrote {out}")
