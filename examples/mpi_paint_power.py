"""The same nbodykit calls under MPI: improve, paint and measure P(k) on several processes.

    mpiexec -n 4 python examples/mpi_paint_power.py --catalog runs/suite/fastpm_z2 \
        --params runs/train --out runs/mpi

Nothing here is MPI-specific: nbodykit splits the catalog over the ranks, JeraldCatalog and
JeraldMesh then run the model on the pmesh engine (each rank displaces its own particles and holds
one slab of the mesh), and FFTPower is nbodykit's distributed one. Run with one process, the
same script uses the single-process JAX engine.
"""

import argparse
import json
from pathlib import Path

from nbodykit.lab import BigFileCatalog, FFTPower

from jerald_nbk import JeraldCatalog, JeraldMesh

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--catalog", default="runs/suite/fastpm_z2")
p.add_argument("--params", default="runs/train", help="folder with dm/, stellar/params.json")
p.add_argument("--out", default="runs/mpi")
args = p.parse_args()
params, out = Path(args.params), Path(args.out)

cat = BigFileCatalog(args.catalog, dataset="1")  # each rank reads its share of the rows
comm = cat.comm
improved = JeraldCatalog(cat, params / "dm" / "params.json")
star = JeraldMesh(cat, dm=params / "dm" / "params.json", stellar=params / "stellar" / "params.json")

p_dm = FFTPower(improved.to_mesh(resampler="cic", compensated=False), mode="1d").power
p_star = FFTPower(star, mode="1d").power
star.save(str(out / "stellar"))  # collective: every rank writes its slab

if comm.rank == 0:  # results are the same on every rank; one writes them
    doc = {
        "ranks": comm.size,
        "backend": improved.attrs["jerald.backend"],
        "particles": int(improved.csize),
        "k": p_dm["k"].tolist(),
        "power_dm": p_dm["power"].real.tolist(),
        "power_stellar": p_star["power"].real.tolist(),
    }
    (out / "power.json").write_text(json.dumps(doc, indent=1, default=float))
    print(f"{comm.size} ranks, engine {doc['backend']}, {doc['particles']} particles")
    print(f"wrote {out / 'power.json'}")
