"""Peak memory and time of one training step, measured in a fresh process.

``python -m benchmarks.memory STAGE N BACKEND [--remat on|off] [--steps K]`` prints one JSON line.
``peak_bytes_per_particle`` is the peak resident set size during a step (after a first, compiling
step) minus the resident size before the step was built (input particles already in memory),
divided by the number of particles: it counts the target and mask meshes, the compiled program's
buffers and every temporary of the step, not the one-off compilation. The kernel's peak counter
(VmHWM) is reset through /proc/self/clear_refs so that earlier peaks (imports, compilation) do
not hide the step's own. ``peak_rss_bytes`` is the process's whole peak over the steps (what a
user's machine must hold), ``first_call_seconds`` the compiling step, ``step_seconds_median`` the
median of the ``K`` steps after it.

``python -m benchmarks.memory --inputs DIR N`` writes a synthetic FastPM catalog
(``DIR/particles``, Zel'dovich particles, seed 0) and a DM target map (``DIR/target_dm``, the
density of another seed's particles) at ``N^3`` for a ``jerald train`` run at that size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_step(stage: str, n: int, backend: str, remat: bool | None = None, steps: int = 1):
    """Peak memory and times of ``stage``'s training step at ``n^3`` (see the module docstring).

    Parameters
    ----------
    stage : str
        A key of :data:`benchmarks.run.STAGES` or :data:`benchmarks.run.LARGE_STAGES`.
    n : int
        Particles per side (on an ``n^3`` mesh).
    backend : {"jax", "pmesh"}
    remat : bool or None
        ``Stage(remat=...)``; None: the engine's default.
    steps : int
        Steps timed after the compiling one (the memory peak is over all of them).

    Returns
    -------
    dict
        JSON-able record.
    """
    import jax  # noqa: F401

    from benchmarks.run import make_step
    from jerald_nbk.testing import zeldovich_particles

    pos = zeldovich_particles(n, 100.0, seed=0, rms_disp=1.0)
    before = _status("VmRSS")
    t0 = time.perf_counter()
    step, _ = make_step(stage, n, backend, pos=pos, remat=remat)
    step()  # compiles (its one-off peak is excluded); XLA keeps the step's buffers resident
    first = time.perf_counter() - t0
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(max(1, steps)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = max(_status("VmHWM"), before)  # the steps' peak, retained buffers included
    times.sort()
    return {
        "stage": stage,
        "N": n,
        "backend": backend,
        "remat": remat,
        "peak_bytes_per_particle": (peak - before) / n**3,
        "peak_rss_bytes": peak,
        "rss_before_bytes": before,
        "first_call_seconds": first,
        "step_seconds_median": times[len(times) // 2],
        "steps_timed": len(times),
    }


def write_inputs(directory, n: int, box: float = 100.0) -> dict:
    """A synthetic catalog and DM target map at ``n^3`` for ``jerald train`` (see the docstring).

    Parameters
    ----------
    directory : str or Path
    n : int
        Particles per side; the map has ``n^3`` cells.
    box : float
        Box size, Mpc/h.

    Returns
    -------
    dict
        ``{"particles": path, "target": path}``.
    """
    import numpy as np

    from jerald_nbk.io import write_catalog, write_mesh
    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.testing import zeldovich_particles

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    attrs = {"BoxSize": [box] * 3, "redshift": 2.0}
    pos = zeldovich_particles(n, box, seed=0, rms_disp=1.0)
    write_catalog(directory / "particles", {"Position": pos}, attrs, overwrite=True)
    del pos
    other = zeldovich_particles(n, box, seed=1, rms_disp=1.2)
    target = np.asarray(JaxEngine(n, box).density(other))
    del other
    write_mesh(directory / "target_dm", target, box, {"redshift": 2.0}, overwrite=True)
    return {"particles": str(directory / "particles"), "target": str(directory / "target_dm")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", metavar="DIR", help="write train inputs at N^3 into DIR instead")
    ap.add_argument("args", nargs="+", help="STAGE N BACKEND, or N with --inputs")
    ap.add_argument("--remat", choices=["on", "off", "default"], default="default")
    ap.add_argument("--steps", type=int, default=1, help="steps timed after the compiling one")
    args = ap.parse_args(argv)
    if args.inputs:
        print(json.dumps(write_inputs(args.inputs, int(args.args[0]))))
        return
    stage, n, backend = args.args[0], int(args.args[1]), args.args[2]
    remat = {"on": True, "off": False, "default": None}[args.remat]
    print(json.dumps(measure_step(stage, n, backend, remat, args.steps)))


if __name__ == "__main__":
    main()
