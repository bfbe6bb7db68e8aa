"""Move an LDL run over: paint with LDL's plain-text parameter files, then keep them as JSON.

LDL (Dai & Seljak) saves each model with np.savetxt: per layer alpha, gamma, kh, kl, n, then
mu, b1, b0 for a stellar-like target. jerald-nbk reads these files as they are (flavour="ldl":
LDL's order, 4th-order gradients and eq-6 Green's function); the layer count follows from the
file's length. The files record no mesh, so give the one the model was trained on.

    python examples/migrate_ldl.py --catalog runs/suite/fastpm_z2 --Nmesh 64 \
        --ldl-dm ldl/dm_param.txt --ldl-stellar ldl/Mstar_param.txt --out runs/from_ldl
"""

import argparse
import json
from pathlib import Path

import numpy as np
from nbodykit.lab import BigFileCatalog

from jerald_nbk import JeraldMesh
from jerald_nbk.io.paramfiles import load_params, load_plaintext, save_params
from jerald_nbk.model.pipeline import StageConfig

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--catalog", default="runs/suite/fastpm_z2")
p.add_argument("--Nmesh", type=int, default=64, help="the mesh LDL trained on")
p.add_argument("--ldl-dm", default="ldl/dm_param.txt")
p.add_argument("--ldl-stellar", default="ldl/Mstar_param.txt")
p.add_argument("--out", default="runs/from_ldl")
args = p.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

cat = BigFileCatalog(args.catalog, dataset="1")
ldl = JeraldMesh(cat, dm=args.ldl_dm, stellar=args.ldl_stellar, flavour="ldl", Nmesh=args.Nmesh)
stellar = ldl.to_real_field(normalize=False)  # LDL's map, in the units of its training target
print(f"LDL stellar map: {ldl.attrs['jerald.stellar.layers']} layers, sum {stellar.csum():.6g}")

# Keep the models as self-describing JSON (target, layers, gradient order, Green's function and
# the mesh recorded), so later runs need no flavour or Nmesh.
provenance = {"Nmesh": [args.Nmesh] * 3, "BoxSize": ldl.attrs["BoxSize"].tolist()}
for target, path in (("dm", args.ldl_dm), ("stellar", args.ldl_stellar)):
    config = StageConfig(**json.loads(ldl.attrs[f"jerald.{target}.config"]))  # what was read
    raw = load_plaintext(path, config, "ldl")
    json_path = save_params(out / f"{target}.json", config, raw, provenance | {"ldl_file": path})
    print(f"{path} -> {json_path} ({load_params(json_path)[0]})")

again = JeraldMesh(cat, dm=out / "dm.json", stellar=out / "stellar.json")
same = np.allclose(again.to_real_field(normalize=False).value, stellar.value, rtol=1e-6)
print(f"JSON and LDL files paint the same map: {same}")
