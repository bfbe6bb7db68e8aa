"""Benchmark of the compiled MPI engine (issue 13): training steps and per-operation costs on 1 and 2
ranks, against the JAX engine and the numpy + pmesh baseline measured in the same run.

The driver launches every measurement in its own process, each under a timeout:

* ``mpiexec -n R python -m benchmarks.mpi_engine --worker ...`` for R = 1, 2: the pmesh engine's
  step (loss + gradient, compiled with ``PmeshEngine.jit`` as the training loop does) of each
  stage, the engine's unit costs (layout, paint, readout, r2c, c2r, the fused elementwise work),
  the bytes one step sends between ranks, and the peak RSS per rank;
* ``python -m benchmarks.mpi_engine --jax-worker ...`` with 1 and with 2 threads: the JAX engine's
  step of the same stages on the same particles (the issue's 1-rank goal is <= 1.5x of it), and the
  numpy + pmesh hand-written 1-layer DM step (:mod:`benchmarks.baseline`, 1 thread).

Every rank runs one thread (``OMP_NUM_THREADS=1``, XLA's CPU runtime single-threaded); the machine's
core count and every process's thread count are recorded with the figures. Particles are
``N^3`` lattice points displaced by a Gaussian of 1 cell rms, made plane by plane from the plane's
own seed, so every rank makes only its own x planes and the global catalog is the same on any
rank count. Each figure is the median of ``--reps`` steps after one warm-up (compiling) step; the
driver repeats every process ``--repeat`` times and records the median of those medians.

Usage::

    python -m benchmarks.mpi_engine [--sizes 128,256] [--stages dm1,stellar,hi] [--reps 3]
        [--repeat 3] [--timeout 900] [--bind core] [--out benchmarks/results/mpi_engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.run import median_time

RESULTS = Path(__file__).parent / "results"
BOX = 100.0
#: stage name -> (target, layers); the paper's 1-layer DM, stellar and HI models
STAGES = {"dm1": ("dm", 1), "stellar": ("stellar", 2), "hi": ("hi", 2)}
#: JERALD reference (float64, its C++ slabs + FFTW-MPI), 1 / 2 ranks, s per 1-layer DM step, and
#: peak GB per rank at 256^3: ``../shared/spec/performance-anchors.md`` (same kind of machine,
#: another session: context, not a ratio of this run)
JERALD_REFERENCE = {
    "step_dm1_seconds": {"64": [0.228, 0.181], "128": [1.70, 0.99], "256": [26.3, 13.9]},
    "peak_gb_256": [8.9, 4.6],
    "source": "../shared/spec/performance-anchors.md (2026-11-29, 2 cores, 24 GB; not this run)",
}
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}


def plane_particles(n: int, planes: range, dtype=np.float32) -> np.ndarray:
    """Lattice points of the x planes ``planes`` displaced by 1 cell rms (seeded by plane)."""
    cell = BOX / n
    out = np.empty((len(planes) * n * n, 3), dtype)
    j, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for a, i in enumerate(planes):
        rng = np.random.default_rng(1000 + i)
        lat = np.stack([np.full(n * n, i), j.ravel(), k.ravel()], -1) + 0.5
        out[a * n * n : (a + 1) * n * n] = (lat + rng.normal(0.0, 1.0, (n * n, 3))) * cell
    return out


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)


def _step(pm, stage_name: str, pos, target_scale=1.1):
    """A compiled training step of ``stage_name`` on ``pm`` (the training loop's Objective)."""
    import jax.numpy as jnp

    from jerald_nbk.model.pipeline import Stage, StageConfig
    from jerald_nbk.train.loop import Objective, TrainConfig

    kind, layers = STAGES[stage_name]
    stage = Stage(pm, StageConfig(kind, layers))
    target = pm.density(pos) * target_scale
    star = pm.density(pos) if kind == "hi" else None
    obj = Objective(stage, pos, target, TrainConfig(progress=False), star=star)
    raw = jnp.asarray(stage.table.init_raw(), pm.dtype)

    def run():
        out, g = obj.value_and_grad(raw)
        np.asarray(g)

    return run


def worker(n: int, stages: list[str], reps: int, ops: bool) -> dict:
    """Under mpiexec: the pmesh engine's steps, unit costs, bytes sent and peak RSS (rank 0 prints)."""
    import jax
    import jax.numpy as jnp
    from mpi4py import MPI

    from jerald_nbk.pm import PmeshEngine, fourier
    from jerald_nbk.pm.jax_backend import num_threads

    comm = MPI.COMM_WORLD
    rss0 = _rss_gb()
    pm = PmeshEngine(n, BOX, dtype="f4", comm=comm)
    sl = pm.local_slices()[0]
    pos = jnp.asarray(plane_particles(n, range(sl.start, sl.stop)))
    rec: dict = {
        "N": n,
        "ranks": comm.size,
        "threads_per_rank": num_threads(),
        "particles_per_rank": int(pos.shape[0]),
        "rss_after_import_gb": rss0,
        "steps": {},
        "ops": {},
    }
    counter = {"bytes": 0, "calls": 0}
    import jerald_nbk.pm.pmesh_backend as pb

    plain = pb._alltoallv

    def counted(c, send, counts, recv_counts, out=None):
        row = int(np.prod(send.shape[1:], dtype=np.int64)) * send.dtype.itemsize
        mine = np.asarray(counts).copy()
        mine[c.rank] = 0  # rows kept on this rank are not communication
        counter["bytes"] += int(mine.sum()) * row
        counter["calls"] += 1
        return plain(c, send, counts, recv_counts, out=out)

    # time spent in each kind of callback during one step (rank 0's), by wrapping the engine's
    # numpy kernels on this instance
    spent: dict = {}

    def timed(key, fn):
        def run(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
            return out

        return run

    kernels = [k for k in dir(pm) if k.startswith("_np_")]
    for name in stages:
        step = _step(pm, name, pos)
        step()  # compiles
        comm.Barrier()
        c0 = time.process_time()
        t = median_time(lambda step=step: (step(), comm.Barrier()), reps)
        # CPU seconds of this process per compiled step (MPI's busy waits count): less sensitive
        # than wall time to a loaded machine
        cpu = (time.process_time() - c0) / (reps + 1)
        # one more step, instrumented (its callbacks are bound when it is traced)
        for k in kernels:
            setattr(pm, k, timed(k[4:], getattr(type(pm), k).__get__(pm)))
        step = _step(pm, name, pos)
        step()  # compiles
        pb._alltoallv = counted
        counter.update(bytes=0, calls=0)
        spent.clear()
        comm.Barrier()
        t0 = time.perf_counter()
        step()
        t_one = time.perf_counter() - t0
        for k in kernels:
            delattr(pm, k)
        pb._alltoallv = plain
        sent = comm.allreduce(counter["bytes"])
        rec["steps"][name] = {
            "seconds_median": comm.allreduce(t, op=MPI.MAX),
            "cpu_seconds_per_step_max_rank": comm.allreduce(cpu, op=MPI.MAX),
            "particle_bytes_sent_all_ranks": sent,
            "alltoallv_calls_per_rank": counter["calls"],
            "callback_seconds_rank0": dict(spent),
            "callbacks_total_s_rank0": sum(spent.values()),
            "instrumented_step_s_rank0": t_one,
        }
    rec["peak_rss_gb_per_rank_max"] = comm.allreduce(_rss_gb(), op=MPI.MAX)
    rec["peak_rss_engine_gb_per_rank_max"] = comm.allreduce(_rss_gb() - rss0, op=MPI.MAX)

    if ops:
        mesh = pm.density(pos)
        ch3 = jnp.stack([mesh] * 3, -1)
        cmesh = pm.r2c(mesh)
        w = jnp.ones((pos.shape[0], 1), pm.dtype)
        posn = np.asarray(pos)
        kern = pm.gradient_kernels()[0]

        def ew(m, ck):  # a layer's elementwise work: power law, Green's function x gradient
            src = (m + 1e-8) ** 0.5
            green = pm.fourier_factor("green", lambda k: jnp.exp(-1.0 / k - k / 8.0) * k**-0.5)
            return src, ck * green * kern

        ew_j = jax.jit(ew)
        timings = {"elementwise_jit": lambda: jax.block_until_ready(ew_j(mesh, cmesh))}
        r2c_j, c2r_j = jax.jit(pm.r2c), jax.jit(pm.c2r)
        real1 = np.asarray(mesh)[..., None]
        pf_c = pm.ppm.create(type="complex").value[..., None].copy()
        timings |= {
            "r2c": lambda: jax.block_until_ready(r2c_j(mesh)),
            "c2r": lambda: jax.block_until_ready(c2r_j(cmesh)),
            # pmesh's pfft on the same slab, for comparison (the engine's fft="pfft")
            "r2c_pfft": lambda: pm._np_r2c(real1),
            "c2r_pfft": lambda: pm._np_c2r(pf_c),
        }
        if comm.size == 1:
            paint_j = jax.jit(lambda p: pm.paint(p))
            read_j = jax.jit(lambda m, p: pm.readout(m, p))
            timings |= {
                "paint": lambda: jax.block_until_ready(paint_j(pos)),
                "readout_3ch": lambda: jax.block_until_ready(read_j(ch3, pos)),
            }
        else:
            h = pm._np_layout(posn)
            wn, ch3n = np.asarray(w), np.asarray(ch3)
            pm._layout_cache = 1000  # keep ``h`` while layouts are timed
            timings |= {
                "paint": lambda: pm._np_paint(h, wn),
                "readout_3ch": lambda: pm._np_readout(h, ch3n),
                "layout": lambda: pm._np_layout(posn),
            }
        for key, fn in timings.items():
            comm.Barrier()
            t = median_time(lambda fn=fn: (fn(), comm.Barrier()), reps)
            rec["ops"][key] = comm.allreduce(t, op=MPI.MAX)
        pm._free_layouts(0)
        rec["ops"]["fft_reference_jnp_rfftn_whole_mesh"] = None
        if comm.size == 1:
            full = jnp.asarray(np.asarray(mesh))
            rf = jax.jit(lambda m: jnp.fft.rfftn(m) * fourier.r2c_scale(pm.ncells))
            rec["ops"]["fft_reference_jnp_rfftn_whole_mesh"] = median_time(
                lambda: jax.block_until_ready(rf(full)), reps
            )
    return rec


def jax_worker(n: int, stages: list[str], reps: int, baseline: bool) -> dict:
    """One process: the JAX engine's steps (and the numpy + pmesh 1-layer DM step)."""
    import jax.numpy as jnp

    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.pm.jax_backend import num_threads

    pos = jnp.asarray(plane_particles(n, range(n)))
    pm = JaxEngine(n, BOX)
    rec = {"N": n, "threads": num_threads(), "steps": {}}
    for name in stages:
        step = _step(pm, name, pos)
        step()  # compiles
        c0 = time.process_time()
        t = median_time(step, reps)
        rec["steps"][name] = {
            "seconds_median": t,
            "cpu_seconds_per_step": (time.process_time() - c0) / (reps + 1),  # all threads
        }
    if baseline:
        from benchmarks.baseline import NumpyPmeshDMLayer
        from jerald_nbk.train.loss import split_masks

        target = np.asarray(pm.density(pos)) * 1.1
        mask = np.asarray(split_masks(pm)["train"])
        base = NumpyPmeshDMLayer(np.asarray(pos), target, mask, n, BOX, "f4")
        rec["numpy_pmesh_dm1_seconds"] = median_time(
            lambda: base.loss_and_grad(0.001, 0.5, 1.0, 8.0, 0.0), reps
        )
    return rec


def _launch(cmd: list[str], env: dict, timeout: float) -> dict:
    load = os.getloadavg()[0]  # the machine is shared: its load when the process started
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": " ".join(cmd)}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}", "cmd": " ".join(cmd)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1])
    out["wall_seconds"] = time.perf_counter() - t0
    out["load_average_1min_at_start"] = load
    return out


def _median_of(runs: list[dict], path: tuple) -> float | None:
    vals = []
    for r in runs:
        v = r
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            vals.append(float(v))
    return float(np.median(vals)) if vals else None


def driver(args) -> dict:
    from benchmarks.run import machine_info

    here = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH", "")]))
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = args.stages.split(",")
    # each rank pinned to its own core (MPICH's hydra): unpinned ranks migrate between cores and
    # lose their caches, 10-30 % of an FFT's time measured here
    bind = [] if args.bind == "none" else ["-bind-to", args.bind]
    result: dict = {
        "what": "pmesh engine (compiled) training step and unit costs, float32; see module doc",
        "command": "python -m benchmarks.mpi_engine " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "jerald_reference_anchor": JERALD_REFERENCE,
        "mpiexec_binding": args.bind,
        "sizes": {},
    }
    for n in sizes:
        st = stages if n <= 128 else [s for s in stages if s in args.big_stages.split(",")]
        common = ["--N", str(n), "--stages", ",".join(st), "--reps", str(args.reps)]
        runs: dict = {"pmesh_1rank": [], "pmesh_2ranks": [], "jax_1thread": [], "jax_2threads": []}
        for rep in range(args.repeat):
            for key, ranks in (("pmesh_1rank", 1), ("pmesh_2ranks", 2)):
                cmd = [
                    mpiexec,
                    *bind,
                    "-n",
                    str(ranks),
                    sys.executable,
                    "-m",
                    "benchmarks.mpi_engine",
                ]
                cmd += ["--worker", *common] + (["--ops"] if rep == 0 else [])
                runs[key].append(_launch(cmd, env | ONE_THREAD, args.timeout))
            jcmd = [sys.executable, "-m", "benchmarks.mpi_engine", "--jax-worker", *common]
            runs["jax_1thread"].append(
                _launch(jcmd + (["--baseline"] if rep == 0 else []), env | ONE_THREAD, args.timeout)
            )
            two = {k: v for k, v in env.items() if k not in ONE_THREAD} | {"OMP_NUM_THREADS": "2"}
            runs["jax_2threads"].append(_launch(jcmd, two, args.timeout))
            print(f"N={n} repeat {rep + 1}/{args.repeat} done", flush=True)
        summary: dict = {}
        for s in st:
            t1 = _median_of(runs["pmesh_1rank"], ("steps", s, "seconds_median"))
            t2 = _median_of(runs["pmesh_2ranks"], ("steps", s, "seconds_median"))
            j1 = _median_of(runs["jax_1thread"], ("steps", s, "seconds_median"))
            j2 = _median_of(runs["jax_2threads"], ("steps", s, "seconds_median"))
            summary[s] = {
                "pmesh_1rank_1thread_s": t1,
                "pmesh_2ranks_1thread_each_s": t2,
                "jax_engine_1thread_s": j1,
                "jax_engine_2threads_s": j2,
                "speedup_2ranks_vs_1rank": (t1 / t2) if t1 and t2 else None,
                "pmesh_1rank_over_jax_1thread": (t1 / j1) if t1 and j1 else None,
                "pmesh_1rank_over_jax_2threads": (t1 / j2) if t1 and j2 else None,
                "pmesh_2ranks_over_jax_2threads": (t2 / j2) if t2 and j2 else None,
                "bytes_sent_per_step_2ranks": _median_of(
                    runs["pmesh_2ranks"], ("steps", s, "particle_bytes_sent_all_ranks")
                ),
            }
        base = _median_of(runs["jax_1thread"], ("numpy_pmesh_dm1_seconds",))
        if "dm1" in summary:
            summary["dm1"]["numpy_pmesh_baseline_1thread_s"] = base
            ref = JERALD_REFERENCE["step_dm1_seconds"].get(str(n))
            if ref:
                summary["dm1"]["jerald_reference_anchor_1_2_ranks_s"] = ref
        summary["peak_rss_gb_per_rank"] = {
            k: _median_of(runs[k], ("peak_rss_gb_per_rank_max",))
            for k in ("pmesh_1rank", "pmesh_2ranks")
        }
        summary["peak_rss_engine_gb_per_rank"] = {
            k: _median_of(runs[k], ("peak_rss_engine_gb_per_rank_max",))
            for k in ("pmesh_1rank", "pmesh_2ranks")
        }
        result["sizes"][str(n)] = {"summary": summary, "runs": runs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # after each size
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--stages", default="dm1,stellar,hi")
    ap.add_argument("--big-stages", default="dm1", help="stages also measured above 128^3")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per launched process")
    ap.add_argument("--out", type=Path, default=RESULTS / "mpi_engine.json")
    ap.add_argument(
        "--bind", default="core", help="mpiexec -bind-to of the ranks ('none': unpinned)"
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jax-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ops", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--N", type=int, default=128, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker or args.jax_worker:
        from jerald_nbk.utils import install_mpi_excepthook

        install_mpi_excepthook()  # an exception on one rank ends every rank
        stages = args.stages.split(",")
        if args.worker:
            rec = worker(args.N, stages, args.reps, args.ops)
            from mpi4py import MPI

            if MPI.COMM_WORLD.rank == 0:
                print(json.dumps(rec), flush=True)
        else:
            print(json.dumps(jax_worker(args.N, stages, args.reps, args.baseline)), flush=True)
        return 0
    res = driver(args)
    for n, block in res["sizes"].items():
        print(f"N={n}:", json.dumps(block["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
