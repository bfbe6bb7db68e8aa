"""Our power-spectrum estimator against nbodykit's ``FFTPower``, in the same run (issue 15, item 4).

For each mesh size the same float32 ``1 + delta`` mesh (CIC-painted Zel'dovich particles) is
measured by

* ``ours``: :func:`jerald_nbk.analysis.power_spectrum` (one process, scipy rfft in float64,
  threaded over the cores, binning in blocks of planes);
* ``nbodykit``: ``FFTPower(ArrayMesh(field, BoxSize), mode="1d")`` in this process (one rank);
* ``nbodykit_mpi2``: the same under ``mpiexec -n 2`` (a fresh process pair; the time is rank 0's
  wall time of the ``FFTPower`` call only, the array being scattered from rank 0 by ``ArrayMesh``);

and for the cross-correlation coefficient (two fields, the three spectra ``P_a, P_b, P_ab``):
``cross_correlation`` (two FFTs, one binning pass) against three ``FFTPower`` calls.

Agreement is recorded alongside: mode counts must be equal and the powers agree to float32
rounding (nbodykit transforms a float32 mesh in float32).

Usage::

    python -m benchmarks.power_estimators [--sizes 64,128] [--reps 5] [--no-mpi] [--out PATH]

Results: ``benchmarks/results/power_estimators.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.run import median_time

RESULTS = Path(__file__).parent / "results"
BOX = 100.0


def test_field(n: int, seed: int = 0, box: float = BOX) -> np.ndarray:
    """A float32 ``1 + delta`` mesh of ``n^3`` cells: CIC paint of Zel'dovich particles."""
    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.testing import zeldovich_particles

    pos = zeldovich_particles(n, box, seed=seed, rms_disp=0.5)
    return np.asarray(JaxEngine(n, box).density(pos), dtype=np.float32)


def nbodykit_power(field, box, second=None, comm=None):
    """``FFTPower(ArrayMesh(field), mode='1d').power`` (``field`` whole on rank 0)."""
    from nbodykit.lab import ArrayMesh, FFTPower

    kw = {} if comm is None else {"comm": comm}
    mesh = ArrayMesh(field, BoxSize=box, **kw)
    other = None if second is None else ArrayMesh(second, BoxSize=box, **kw)
    return FFTPower(mesh, mode="1d", second=other).power


def agreement(ours, theirs) -> dict:
    """Mode counts equal? Largest relative difference of k and P over non-empty bins."""
    # the first bin may hold k = 0 alone (k = 0, P = 0 in both): compared absolutely below
    good = (np.asarray(theirs["modes"]) > 0) & (np.asarray(theirs["k"]) > 0)
    p_ref = np.asarray(theirs["power"].real)[good]
    return {
        "modes_equal": bool(np.array_equal(ours.modes, theirs["modes"])),
        "max_rel_diff_k": float(np.max(np.abs(ours.k[good] / theirs["k"][good] - 1))),
        "max_rel_diff_power": float(
            np.max(np.abs(ours.power[good] - p_ref) / np.maximum(np.abs(p_ref), 1e-300))
        ),
    }


def compare(n: int, reps: int = 5, box: float = BOX) -> dict:
    """Time both estimators on one ``n^3`` mesh (auto and cross) and check they agree.

    Parameters
    ----------
    n : int
        Cells per side.
    reps : int
        Repetitions (median reported) after one warm-up call.
    box : float
        Box size in Mpc/h.

    Returns
    -------
    dict
        ``seconds`` per estimator, ``speedup`` (nbodykit / ours) and ``agreement``.
    """
    from mpi4py import MPI

    from jerald_nbk.analysis import cross_correlation, power_spectrum

    a = test_field(n, seed=1, box=box)
    b = test_field(n, seed=2, box=box)
    self_comm = MPI.COMM_SELF
    t_ours = median_time(lambda: power_spectrum(a, box), reps)
    t_nbk = median_time(lambda: nbodykit_power(a, box, comm=self_comm), reps)
    t_ours_x = median_time(lambda: cross_correlation(a, b, box), reps)

    def nbk_cross():
        nbodykit_power(a, box, comm=self_comm)
        nbodykit_power(b, box, comm=self_comm)
        nbodykit_power(a, box, second=b, comm=self_comm)

    t_nbk_x = median_time(nbk_cross, reps)
    ours = power_spectrum(a, box)
    ours_x = power_spectrum(a, box, second=b)
    return {
        "Nmesh": n,
        "BoxSize": box,
        "dtype": "f4",
        "seconds": {
            "ours_power": t_ours,
            "nbodykit_power": t_nbk,
            "ours_cross_correlation": t_ours_x,
            "nbodykit_cross_correlation_3_calls": t_nbk_x,
        },
        "speedup": {
            "power": t_nbk / t_ours,
            "cross_correlation": t_nbk_x / t_ours_x,
        },
        "agreement": {
            "auto": agreement(ours, nbodykit_power(a, box, comm=self_comm)),
            "cross": agreement(ours_x, nbodykit_power(a, box, second=b, comm=self_comm)),
        },
    }


def _mpi_worker(sizes: list[int], reps: int, box: float) -> None:
    """Under mpiexec: time ``FFTPower`` of the same meshes on all ranks; rank 0 prints JSON."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out = {}
    for n in sizes:
        a = test_field(n, seed=1, box=box) if comm.rank == 0 else None

        def run(a=a):
            comm.barrier()
            nbodykit_power(a, box, comm=comm)

        t = median_time(run, reps)
        out[str(n)] = comm.allreduce(t, op=MPI.MAX)
    if comm.rank == 0:
        print("RESULT " + json.dumps({"ranks": comm.size, "seconds": out}))


def mpi_times(sizes: list[int], reps: int, box: float = BOX, ranks: int = 2) -> dict | None:
    """nbodykit ``FFTPower`` wall times under ``mpiexec -n ranks`` (None if that fails)."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [
        str(mpiexec),
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "benchmarks.power_estimators",
        "--mpi-worker",
        "--sizes",
        ",".join(map(str, sizes)),
        "--reps",
        str(reps),
    ]
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"mpiexec run failed: {err}", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"mpiexec run failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def main(argv=None) -> int:
    """Run the comparison and write ``benchmarks/results/power_estimators.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-mpi", action="store_true", help="skip the mpiexec -n 2 nbodykit timing")
    p.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS / "power_estimators.json"))
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.mpi_worker:
        _mpi_worker(sizes, args.reps, BOX)
        return 0

    from benchmarks.run import machine_info

    records = []
    for n in sizes:
        rec = compare(n, args.reps)
        records.append(rec)
        print(json.dumps(rec, indent=1), flush=True)
    mpi = None if args.no_mpi else mpi_times(sizes, args.reps)
    if mpi is not None:
        for rec in records:
            t = mpi["seconds"].get(str(rec["Nmesh"]))
            rec["seconds"][f"nbodykit_power_mpi{mpi['ranks']}"] = t
            rec["speedup"][f"power_vs_nbodykit_mpi{mpi['ranks']}"] = (
                t / rec["seconds"]["ours_power"]
            )
    doc = {
        "machine": machine_info(),
        "cpus": os.cpu_count(),
        "reps": args.reps,
        "records": records,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
