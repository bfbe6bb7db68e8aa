"""Benchmarks of jerald-nbk (``make bench``): particle-mesh operations and training steps.

Every figure is a median over repetitions after a warm-up (JAX compiles on the first call) and is
written as a ratio against baselines measured in the same run, because the machines are shared
and noisy:

* ``fft_equivalents``: seconds / one jitted ``jnp.fft.rfftn`` of the same mesh;
* ``vs_pmesh``: pmesh's time for the same operation on the same data / ours (> 1: we are faster);
* ``vs_baseline`` (training steps): the straightforward numpy + pmesh step
  (:mod:`benchmarks.baseline`, LDL's way) for 1-layer DM, or the pmesh engine running the same
  model eagerly for the other stages / ours.

Peak memory per particle is measured in a fresh process per case (``benchmarks.memory``).

Usage::

    python -m benchmarks.run [--sizes 64,128,256] [--reps 5] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def median_time(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def machine_info() -> dict:
    import jax
    import pmesh

    from jerald_nbk.pm.jax_backend import num_threads

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": num_threads(),
        "jax": jax.__version__,
        "jax_device": jax.default_backend(),
        "pmesh": pmesh.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _block(x):
    import jax

    return jax.block_until_ready(x)


def pm_core_records(n: int, reps: int, box: float = 100.0) -> list[dict]:
    """paint, readout and one DM layer forward+VJP at n^3 particles on an n^3 mesh."""
    import jax
    import jax.numpy as jnp
    from pmesh.pm import ParticleMesh

    from jerald_nbk.model import layers
    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.pm.jax_backend import num_threads
    from jerald_nbk.testing import zeldovich_particles

    pos_np = zeldovich_particles(n, box, seed=0, rms_disp=1.0)
    pos = jnp.asarray(pos_np)
    mesh_np = np.random.default_rng(0).random((n, n, n)).astype(np.float32)
    mesh = jnp.asarray(mesh_np)

    fft = jax.jit(jnp.fft.rfftn)
    t_fft = median_time(lambda: _block(fft(mesh)), reps)
    ppm = ParticleMesh(Nmesh=[n] * 3, BoxSize=box, dtype="f4", resampler="cic")
    pfield = ppm.create(type="real", value=mesh_np)
    t_pm_paint = median_time(lambda: ppm.paint(pos_np), reps)
    t_pm_readout = median_time(lambda: pfield.readout(pos_np), reps)
    t_pm_r2c = median_time(lambda: pfield.r2c(), reps)

    out = []
    base = {"N": n, "ranks": 1, "threads": num_threads()}
    for kernel in ("cpp", "jax"):
        pm = JaxEngine(n, box, kernel=kernel)
        paint = jax.jit(pm.paint)
        readout = jax.jit(pm.readout)
        t_p = median_time(lambda paint=paint: _block(paint(pos)), reps)
        t_r = median_time(lambda readout=readout: _block(readout(mesh, pos)), reps)
        for name, t, t_ref in (("paint", t_p, t_pm_paint), ("readout", t_r, t_pm_readout)):
            out.append(
                base
                | {
                    "name": name,
                    "backend": f"jax-{kernel}",
                    "seconds_median": t,
                    "fft_equivalents": t / t_fft,
                    "vs_pmesh": t_ref / t,
                }
            )
        if kernel == "jax" and n > 128:
            continue  # the pure-JAX scatter is the GPU/parity path; skip its slow big-mesh layer
        params = jnp.array([0.02, 0.8, 0.5, 5.0, -0.5], jnp.float32)
        ct = jnp.ones_like(pos)

        def layer(p, x, pm=pm):
            return layers.displacement_layer(pm, x, *p, green="dm", order=6)

        def fwd_vjp(p, x, layer=layer, ct=ct):
            y, vjp = jax.vjp(layer, p, x)
            return y, vjp(ct)

        step = jax.jit(fwd_vjp)
        t_l = median_time(lambda step=step, params=params: _block(step(params, pos)), reps)
        # pmesh's own operations for the same layer forward + VJP (params and positions):
        # forward 1 paint, 1 r2c, 3 c2r, 3 readouts; backward 3 paints (readout adjoint), 9
        # gradient readouts (readout w.r.t. positions, 3 channels x 3 axes), 3 r2c (c2r adjoint),
        # 1 c2r (r2c adjoint), 3 gradient readouts (paint w.r.t. positions).
        t_ref = 4 * t_pm_paint + 15 * t_pm_readout + 8 * t_pm_r2c
        out.append(
            base
            | {
                "name": "layer_fwd_vjp",
                "backend": f"jax-{kernel}",
                "seconds_median": t_l,
                "fft_equivalents": t_l / t_fft,
                "vs_pmesh": t_ref / t_l,
                "vs_pmesh_note": "sum of pmesh's paint/readout/FFT timings for the same operations",
            }
        )
    out.append(
        base | {"name": "rfftn", "backend": "jax", "seconds_median": t_fft, "fft_equivalents": 1.0}
    )
    out.append(
        base
        | {
            "name": "r2c",
            "backend": "pmesh",
            "seconds_median": t_pm_r2c,
            "fft_equivalents": t_pm_r2c / t_fft,
        }
    )
    return out


STAGES = {
    "dm1": ("dm", 1),
    "dm2": ("dm", 2),
    "stellar": ("stellar", 2),
    "hi": ("hi", 2),
}


def make_step(stage_name: str, n: int, backend: str, box: float = 100.0, pos=None):
    """A training step (loss + gradient) of a stage on synthetic data; returns (step, raw)."""
    import jax.numpy as jnp

    from jerald_nbk.model.pipeline import Stage, StageConfig
    from jerald_nbk.pm import make_pm
    from jerald_nbk.testing import zeldovich_particles
    from jerald_nbk.train.loop import Objective, TrainConfig

    pm = make_pm(n, box, backend=backend)
    if pos is None:
        pos = zeldovich_particles(n, box, seed=0, rms_disp=1.0)
    pos = jnp.asarray(pos)
    target_kind, nl = STAGES[stage_name]
    stage = Stage(pm, StageConfig(target_kind, nl))
    target = pm.density(pos) * 1.1
    star = pm.density(pos) if target_kind == "hi" else None
    obj = Objective(stage, pos, target, TrainConfig(progress=False), star=star)
    raw = jnp.asarray(stage.table.init_raw(), jnp.float32)
    return (lambda: _block(obj.value_and_grad(raw))), raw


def training_records(n: int, reps: int, backends: list[str], box: float = 100.0) -> list[dict]:
    """Training steps of every stage on each backend, with the numpy + pmesh baseline."""
    import jax
    import jax.numpy as jnp

    from benchmarks.baseline import NumpyPmeshDMLayer
    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.pm.jax_backend import num_threads
    from jerald_nbk.testing import zeldovich_particles
    from jerald_nbk.train.loss import split_masks

    pos = zeldovich_particles(n, box, seed=0, rms_disp=1.0)
    mesh = np.random.default_rng(0).random((n, n, n)).astype(np.float32)
    t_fft = median_time(lambda: _block(jax.jit(jnp.fft.rfftn)(jnp.asarray(mesh))), reps)
    jpm = JaxEngine(n, box)
    target = np.asarray(jpm.density(pos)) * 1.1
    mask = np.asarray(split_masks(jpm)["train"])
    base = NumpyPmeshDMLayer(pos, target, mask, n, box, "f4")
    t_base = median_time(lambda: base.loss_and_grad(0.001, 0.5, 1.0, 8.0, 0.0), max(2, reps // 2))
    out = [
        {
            "name": "step_dm1",
            "backend": "numpy+pmesh (baseline)",
            "N": n,
            "ranks": 1,
            "threads": 1,
            "seconds_median": t_base,
            "fft_equivalents": t_base / t_fft,
            "vs_baseline": 1.0,
        }
    ]
    engine_times: dict[str, float] = {}
    for backend in backends:
        for name in STAGES:
            step, _ = make_step(name, n, backend, box)
            t = median_time(step, reps if backend == "jax" else max(2, reps // 2))
            if backend == "pmesh":
                engine_times[name] = t
            rec = {
                "name": f"step_{name}",
                "backend": backend,
                "N": n,
                "ranks": 1,
                "threads": num_threads() if backend == "jax" else 1,
                "seconds_median": t,
                "fft_equivalents": t / t_fft,
            }
            mem = peak_memory(name, n, backend)
            if mem is not None:
                rec |= mem
            out.append(rec)
    for rec in out[1:]:
        stage = rec["name"][5:]
        if stage == "dm1":
            rec["vs_baseline"] = t_base / rec["seconds_median"]
            rec["baseline"] = "numpy+pmesh hand-written step (benchmarks/baseline.py)"
        elif stage in engine_times:
            rec["vs_baseline"] = engine_times[stage] / rec["seconds_median"]
            rec["baseline"] = "pmesh engine, eager, 1 rank"
    return out


def paint_many_records(
    sizes=(64, 128), catalogs: int = 4, box: float = 100.0, layers: int = 2
) -> list[dict]:
    """Maps per minute of :meth:`Pipeline.maps_many` (DM + stellar + HI, one compilation).

    A pipeline of ``layers``-layer DM, stellar and HI stages (initial parameters; the cost does
    not depend on their values) paints ``1 + catalogs`` Zel'dovich catalogs (different seeds,
    generated beforehand) at each size; every map is brought back to numpy (as a writer would).
    The first catalog pays for the compilation: ``compile_seconds`` is its time minus the median
    of the others, ``maps_per_minute`` counts one set of three maps per catalog after it, and
    ``compile_share_over_100`` is the share of the wall time spent compiling over 100 catalogs.
    The eager :meth:`Pipeline.maps` (op by op, no compilation) is timed on one catalog for
    comparison (``vs_eager``: its time over the compiled one's).

    Parameters
    ----------
    sizes : sequence of int
        Particles per side (N^3 particles on an N^3 mesh).
    catalogs : int
        Catalogs timed after the first.
    box : float
        Box size, Mpc/h.
    layers : int
        Displacement layers of each stage (the paper's models: 2).
    """
    import jax.numpy as jnp

    from jerald_nbk.model.pipeline import Pipeline, Stage, StageConfig
    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.pm.jax_backend import num_threads
    from jerald_nbk.testing import zeldovich_particles

    out = []
    for n in sizes:
        pm = JaxEngine(n, box)
        stages = {t: Stage(pm, StageConfig(t, layers)) for t in ("dm", "stellar", "hi")}
        pipe = Pipeline(**{t: (s, jnp.asarray(s.table.init_raw())) for t, s in stages.items()})
        cats = [
            zeldovich_particles(n, box, seed=s, rms_disp=1.0).astype(np.float32)
            for s in range(1 + catalogs)
        ]
        times = []
        t0 = time.perf_counter()
        for maps in pipe.maps_many(cats):
            _ = {k: np.asarray(v) for k, v in maps.items()}
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        steady = float(np.median(times[1:]))
        t0 = time.perf_counter()
        _ = {k: np.asarray(v) for k, v in pipe.maps(cats[-1]).items()}
        t_eager = time.perf_counter() - t0
        compile_s = times[0] - steady
        out.append(
            {
                "name": "paint_many",
                "backend": "jax",
                "N": n,
                "ranks": 1,
                "threads": num_threads(),
                "layers": layers,
                "maps": "dm+stellar+hi",
                "catalogs": catalogs,
                "seconds_median": steady,
                "maps_per_minute": 60.0 / steady,
                "first_catalog_seconds": times[0],
                "compile_seconds": compile_s,
                "eager_seconds": t_eager,
                "vs_eager": t_eager / steady,
                # share of the wall time spent compiling when painting 100 catalogs
                "compile_share_over_100": compile_s / (compile_s + 100 * steady),
            }
        )
    return out


def peak_memory(stage: str, n: int, backend: str) -> dict | None:
    """Peak memory of one training step per particle (see benchmarks/memory.py), fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.memory", stage, str(n), backend]
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent
        )
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        return {"peak_bytes_per_particle": float(rec["peak_bytes_per_particle"])}
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError):
        return None


def suite_build_record(size: str = "smoke") -> dict:
    """Wall time of building the reference suite (FastPM + high-res truth, z = 0, 2, 5).

    The budget (docs/reference-suite.md) is < 1 min for the smoke suite on an idle 2-core machine;
    it used to be asserted by a unit test, where a loaded machine made it flaky.
    """
    import tempfile

    from jerald_nbk.suite.build import build_suite

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_suite(tmp, size=size, seed=7, progress=False)
        t = time.perf_counter() - t0
    return {"name": f"suite_{size}", "backend": "fastpm", "N": 0, "seconds_median": t, "reps": 1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="64,128,256", help="particle/mesh sizes for the PM core")
    ap.add_argument("--train-sizes", default="64,128", help="sizes for the training steps")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default="jax,pmesh")
    ap.add_argument("--quick", action="store_true", help="64^3 only, 3 repetitions")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.train_sizes, args.reps = "64", "64", 3
    sizes = [int(s) for s in args.sizes.split(",") if s]
    train_sizes = [int(s) for s in args.train_sizes.split(",") if s]
    backends = [b for b in args.backends.split(",") if b]

    from jerald_nbk.utils import atomic_write

    records: list[dict] = []
    for n in sizes:
        print(f"[bench] particle-mesh core at {n}^3", flush=True)
        records += pm_core_records(n, args.reps)
    for n in train_sizes:
        print(f"[bench] training steps at {n}^3 ({', '.join(backends)})", flush=True)
        records += training_records(n, args.reps, backends)
    print(f"[bench] painting many catalogs at {', '.join(map(str, train_sizes))}^3", flush=True)
    records += paint_many_records(train_sizes)
    print("[bench] smoke reference suite build", flush=True)
    records.append(suite_build_record("smoke"))
    doc = {"machine": machine_info(), "records": records}
    with atomic_write(args.out) as fh:
        json.dump(doc, fh, indent=1)
    for r in records:
        extra = "".join(
            f" {k}={r[k]:.2f}" for k in ("fft_equivalents", "vs_pmesh", "vs_baseline") if k in r
        )
        mem = (
            f" mem={r['peak_bytes_per_particle']:.0f}B/p" if "peak_bytes_per_particle" in r else ""
        )
        print(
            f"{r['name']:>14} {r['backend']:>24} N={r['N']:<4} {r['seconds_median']:.4f}s{extra}{mem}"
        )
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
