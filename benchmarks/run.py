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
    python -m benchmarks.run --speed 128      # layer and 1-layer DM step, where the time goes
    python -m benchmarks.run --marginal 256,320 [--remat off]   # bytes per particle

The layer and training-step records carry a ``breakdown`` (:func:`breakdown`): the compiled
program's FFTs and C++ CIC kernel calls, each charged its unit time measured alone, and the rest
(elementwise work, copies, dispatch), all in FFT-equivalents, printed as the benchmark runs.
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
    return interleaved_medians({"fn": fn}, reps, warmup)["fn"]


def interleaved_medians(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median wall times of several ``fn()``, called in turn (one of each per round), by key.

    On a shared machine the speed of a process drifts by tens of per cent over a minute; taking
    the unit (an FFT) and the measured program in the same rounds keeps their ratio from
    following that drift, as timing them one after the other does not.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in ts.items()}


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
        step, params = layer_fwd_vjp(pm, pos, green="dm", order=6)
        t_l = median_time(lambda step=step, params=params: _block(step(params, pos)), reps)
        extra = {}
        if kernel == "cpp":
            text = step.lower(params, pos).compile().as_text()
            extra["breakdown"] = breakdown(text, unit_times(pm, pos, reps), t_l, t_fft)
            _print_breakdown(f"layer forward + VJP at {n}^3", extra["breakdown"])
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
            | extra
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


def layer_fwd_vjp(pm, pos, **layer_kw):
    """One displacement layer's forward + VJP (cotangent: ones) on ``pm``, jitted.

    Returns ``(fn, params)``: ``fn(params, positions)`` gives the new positions and the
    cotangents of (params, positions); ``params`` are fixed, typical values. ``layer_kw`` goes to
    :func:`jerald_nbk.model.layers.displacement_layer` (``green``, ``order``).
    """
    import jax
    import jax.numpy as jnp

    from jerald_nbk.model import layers

    params = jnp.array([0.02, 0.8, 0.5, 5.0, -0.5], jnp.float32)
    ct = jnp.ones_like(pos)

    def fwd_vjp(p, x, ct):
        y, vjp = jax.vjp(lambda p, x: layers.displacement_layer(pm, x, *p, **layer_kw), p, x)
        return y, vjp(ct)

    # the cotangent is an argument, as in a training step: a constant one would let XLA fold
    # what depends on it (the backward pass's ties, remat.tied_to) and broadcast it in memory
    jitted = jax.jit(fwd_vjp)

    def fn(p, x):
        return jitted(p, x, ct)

    fn.lower = lambda p, x: jitted.lower(p, x, ct)
    return fn, params


def unit_times(pm, pos, reps: int) -> dict:
    """Seconds of each kind of operation a layer is made of, on ``pm``'s mesh and these particles.

    Keys: ``("fft", "RFFT")``, ``("fft", "IRFFT")`` and ``(kernel, channels)`` for the C++ CIC
    kernels (``jerald_cic_paint``, ``jerald_cic_readout``, ``jerald_cic_readout_vjp_pos``) with
    1 and 3 channels, a layer's fused readout and position cotangent (``jerald_cic_displace``,
    ``jerald_cic_displace_vjp``, 3 channels), and ``("jerald_fd_gradient" | "jerald_fd_gradient_adjoint", 3)`` for the
    6th-order gradient stencil and its adjoint, each a median of ``reps`` jitted calls.
    """
    import jax
    import jax.numpy as jnp

    from jerald_nbk.pm import jax_backend as jb

    n = pm.Nmesh
    mesh = jnp.asarray(np.random.default_rng(1).random(n).astype(np.float32))
    cmesh = jnp.fft.rfftn(mesh)
    cfg = pm._cfg
    out = {
        ("fft", "RFFT"): (jax.jit(jnp.fft.rfftn), (mesh,)),
        ("fft", "IRFFT"): (jax.jit(lambda c: jnp.fft.irfftn(c, s=n)), (cmesh,)),
    }
    for c in (1, 3):
        m = jnp.stack([mesh] * c, axis=-1)
        w = jnp.ones((pos.shape[0], c), jnp.float32)
        g = jnp.ones((pos.shape[0], c), jnp.float32)
        out[("jerald_cic_paint", c)] = (jax.jit(lambda p, w: jb._paint_impl(p, w, cfg)), (pos, w))
        out[("jerald_cic_readout", c)] = (
            jax.jit(lambda m, p: jb._readout_impl(m, p, cfg)),
            (m, pos),
        )
        out[("jerald_cic_readout_vjp_pos", c)] = (
            jax.jit(lambda m, p, g: jb._readout_vjp_pos_impl(m, p, g, cfg)),
            (m, pos, g),
        )
    if cfg.kernel == "cpp":  # the C++ gradient stencil of a layer (JaxEngine.gradient_mesh)
        cells, grad = tuple(float(h) for h in pm.cellsize), jnp.stack([mesh] * 3, axis=-1)
        # a layer's last readout and its position cotangent (JaxEngine.displace)
        ct = jnp.ones((pos.shape[0], 3), jnp.float32)
        out[("jerald_cic_displace", 3)] = (
            jax.jit(lambda m, p: jb._displace_impl(m, p, cfg)),
            (grad, pos),
        )
        out[("jerald_cic_displace_vjp", 3)] = (
            jax.jit(lambda m, u, p, g: jb._displace_vjp_impl(m, u, p, g, cfg)),
            (grad, mesh[..., None], pos, ct),
        )
        for adjoint, arg in ((False, mesh), (True, grad)):
            name = "jerald_fd_gradient_adjoint" if adjoint else "jerald_fd_gradient"
            out[(name, 3)] = (
                jax.jit(lambda x, a=adjoint: jb._fd_apply(x, cells, 6, "cpp", a)),
                (arg,),
            )
    return {k: median_time(lambda f=f, a=a: _block(f(*a)), reps) for k, (f, a) in out.items()}


def hlo_op_counts(compiled_text: str) -> dict:
    """FFTs and C++ CIC kernel calls in a compiled XLA program (``compiled.as_text()``).

    Returns ``{("fft", "RFFT" | "IRFFT"): count, (kernel, channels): count}``; the channels of a
    CIC call are read from its mesh operand (readouts) or weight operand (paints); the C++
    gradient stencils (``jerald_fd_gradient`` and its adjoint) count with 3 channels.
    """
    import re
    from collections import Counter

    counts: Counter = Counter()
    for line in compiled_text.splitlines():
        m = re.search(r"fft_type=(RFFT|IRFFT)", line)
        if m and " fft(" in line:
            counts[("fft", m.group(1))] += 1
            continue
        m = re.search(r'custom_call_target="(jerald_\w+)"', line)
        if not m:
            continue
        if m.group(1).startswith("jerald_fd_"):
            counts[(m.group(1), 3)] += 1
            continue
        shapes = re.findall(
            r"f(?:32|64)\[([\d,]+)\]", line.split("operand_layout_constraints=")[-1]
        )
        dims = [tuple(int(d) for d in sh.split(",")) for sh in shapes]
        if m.group(1) == "jerald_cic_paint":
            nch = dims[1][-1]  # (positions, weights)
        else:
            nch = dims[0][-1]  # (mesh, positions[, cotangents])
        counts[(m.group(1), nch)] += 1
    return dict(counts)


def breakdown(compiled_text: str, units: dict, total: float, t_fft: float) -> dict:
    """Where a compiled program's time goes, in FFT-equivalents (``t_fft``: one rfftn).

    The program's FFTs, CIC kernel calls and gradient stencils (:func:`hlo_op_counts`) are charged
    their unit times (:func:`unit_times`, measured alone); what is left of the measured ``total``
    is the elementwise work (Fourier factors, losses), copies and dispatch.
    """
    counts = hlo_op_counts(compiled_text)

    def charged(prefix):
        return sum(
            c * units[k] for k, c in counts.items() if k[0].startswith(prefix) and k in units
        )

    ffts, passes, stencils = charged("fft"), charged("jerald_cic_"), charged("jerald_fd_")
    return {
        "ffts": ffts / t_fft,
        "particle_passes": passes / t_fft,
        "stencils": stencils / t_fft,
        "elementwise_and_dispatch": (total - ffts - passes - stencils) / t_fft,
        "total": total / t_fft,
        "counts": {f"{k[0]}[{k[1]}]": c for k, c in sorted(counts.items(), key=str)},
    }


def _print_breakdown(label: str, b: dict) -> None:
    print(
        f"[bench] {label}: {b['total']:.1f} FFT-eq = FFTs {b['ffts']:.1f} + particle passes "
        f"{b['particle_passes']:.1f} + gradient stencils {b.get('stencils', 0.0):.1f} + "
        f"elementwise/dispatch {b['elementwise_and_dispatch']:.1f}; "
        + ", ".join(f"{k} x{c}" for k, c in b["counts"].items()),
        flush=True,
    )


STAGES = {
    "dm1": ("dm", 1),
    "dm2": ("dm", 2),
    "stellar": ("stellar", 2),
    "hi": ("hi", 2),
}

#: the paper's models for the large runs (``--large``): DM with 1 and 2 layers, stellar mass with
#: 2 and 3 (z = 5), HI with 2 (its two sources: particles and the stellar map)
LARGE_STAGES = {**STAGES, "stellar3": ("stellar", 3)}


def make_step(
    stage_name: str,
    n: int,
    backend: str,
    box: float = 100.0,
    pos=None,
    remat: bool | None = None,
    **pm_kw,
):
    """A training step (loss + gradient) of a stage on synthetic data; returns (step, raw).

    ``stage_name``: a key of :data:`LARGE_STAGES`; ``remat``: ``Stage(remat=...)``; ``pm_kw``:
    passed to the engine (e.g. ``kernel``, ``chunk`` of :class:`~jerald_nbk.pm.JaxEngine`).
    """
    import jax.numpy as jnp

    from jerald_nbk.model.pipeline import Stage, StageConfig
    from jerald_nbk.pm import make_pm
    from jerald_nbk.testing import zeldovich_particles
    from jerald_nbk.train.loop import Objective, TrainConfig

    pm = make_pm(n, box, backend=backend, **pm_kw)
    if pos is None:
        pos = zeldovich_particles(n, box, seed=0, rms_disp=1.0)
    pos = jnp.asarray(pos)
    target_kind, nl = LARGE_STAGES[stage_name]
    stage = Stage(pm, StageConfig(target_kind, nl), remat=remat)
    target = pm.density(pos) * 1.1
    star = pm.density(pos) if target_kind == "hi" else None
    obj = Objective(stage, pos, target, TrainConfig(progress=False), star=star)
    raw = jnp.asarray(stage.table.init_raw(), jnp.float32)

    def step():
        return _block(obj.value_and_grad(raw))

    step.objective = obj  # for the compiled program (:func:`breakdown`)
    return step, raw


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
    units = unit_times(jpm, jnp.asarray(pos), reps) if jpm.kernel == "cpp" else None
    for backend in backends:
        for name in STAGES:
            step, raw = make_step(name, n, backend, box)
            t = median_time(step, reps if backend == "jax" else max(2, reps // 2))
            extra = {}
            if backend == "jax" and units is not None:
                obj = step.objective
                text = obj._value_and_grad.lower(raw, obj.data).compile().as_text()
                extra["breakdown"] = breakdown(text, units, t, t_fft)
                _print_breakdown(f"step_{name} at {n}^3", extra["breakdown"])
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
            } | extra
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


#: address space a large run's process may use beyond the memory available: its virtual size
#: exceeds its resident size by ~1.4 GB (thread stacks, libraries; measured: HI step at 128^3,
#: VmPeak 2.2 GB, VmHWM 0.8 GB)
ADDRESS_SLACK_BYTES = 2 * 2**30


def _run_measured(
    cmd: list[str], timeout: float, max_address_bytes: int | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``cmd`` in the repository root; its result and ``{"seconds", "peak_rss_bytes"}``.

    The peak is the child's own (``os.wait4``'s ``ru_maxrss``), not this process's.
    ``max_address_bytes``: the child's address-space limit (``RLIMIT_AS``), so that a run too
    large for the machine fails its own allocation instead of waking the kernel's OOM killer.
    """
    import resource
    import tempfile

    def limit():
        if max_address_bytes is not None:
            lim = int(max_address_bytes)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, text=True, cwd=Path(__file__).parent.parent,
            preexec_fn=limit,
        )  # fmt: skip
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                status = -9
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status) if status != -9 else -9
        out.seek(0), err.seek(0)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return res, {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def step_record(
    stage: str,
    n: int,
    remat: bool | None = None,
    steps: int = 3,
    timeout: float = 3600,
    max_address_bytes: int | None = None,
) -> dict:
    """One training step of ``stage`` at ``n^3`` in its own process (:mod:`benchmarks.memory`).

    Returns the JSON record of :func:`benchmarks.memory.measure_step` (step time, first call,
    peak RSS and the step's bytes per particle), or ``{"stage", "N", "error"}`` when the process
    failed (e.g. out of memory: ``returncode`` -9).
    """
    flag = {None: "default", True: "on", False: "off"}[remat]
    cmd = [sys.executable, "-m", "benchmarks.memory", stage, str(n), "jax", "--remat", flag]
    res, usage = _run_measured([*cmd, "--steps", str(steps)], timeout, max_address_bytes)
    try:
        rec = _last_json(res.stdout)
    except (ValueError, IndexError):
        tail = (res.stderr or "").strip().splitlines()[-3:]
        return {"stage": stage, "N": n, "remat": remat, "returncode": res.returncode,
                "error": " | ".join(tail)}  # fmt: skip
    return rec | {"process_peak_rss_bytes": usage["peak_rss_bytes"]}


def train_command_record(
    n: int, steps: int = 3, timeout: float = 7200, layers: int = 2, limit: int | None | str = "auto"
) -> dict:
    """A few-step ``jerald train`` (DM, ``layers`` layers) at ``n^3`` on synthetic inputs.

    ``limit``: the command's address-space limit in bytes, None for none, ``"auto"`` for the
    memory available plus :data:`ADDRESS_SLACK_BYTES` (see :func:`address_limit`).

    The inputs (a FastPM-layout catalog and a DM target map, :func:`benchmarks.memory.write_inputs`)
    are written by another process into a temporary directory, removed afterwards. Records the
    command's wall time (reading, painting the first density, compiling, ``steps`` steps, writing),
    its peak RSS, and the steps' own times from ``metrics.jsonl``.
    """
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f"jerald-large-{n}-"))
    try:
        res, made = _run_measured(
            [sys.executable, "-m", "benchmarks.memory", "--inputs", str(tmp), str(n)], timeout
        )
        if res.returncode != 0:
            return {"name": "jerald_train", "N": n, "error": res.stderr.strip()[-500:]}
        inputs = _last_json(res.stdout)
        out = tmp / "run"
        cmd = [
            sys.executable, "-m", "jerald_nbk.cli.main", "train", "--target", "dm",
            "--particles", inputs["particles"], "--target-map", inputs["target"],
            "--layers", str(layers), "--steps", str(steps), "--out", str(out), "--quiet",
        ]  # fmt: skip
        if limit == "auto":
            limit = available_bytes() + ADDRESS_SLACK_BYTES
        res, usage = _run_measured(cmd, timeout, limit)
        rec = {
            "name": "jerald_train",
            "address_limit": limit,
            "N": n,
            "target": "dm",
            "layers": layers,
            "steps": steps,
            "returncode": res.returncode,
            "seconds": usage["seconds"],
            "peak_rss_bytes": usage["peak_rss_bytes"],
            "peak_rss_bytes_per_particle": usage["peak_rss_bytes"] / n**3,
            "input_writing_seconds": made["seconds"],
        }
        metrics = out / "metrics.jsonl"
        if res.returncode == 0 and metrics.exists():
            secs = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]
            rec["step_seconds"] = secs
        else:
            rec["error"] = res.stderr.strip()[-500:]
        return rec
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def available_bytes() -> int:
    """This machine's available memory (``MemAvailable`` of /proc/meminfo), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def latest_marginal(large: dict) -> list[dict] | None:
    """The marginal records (``large/marginal_N1_N2``) measured at the largest sizes, or None.

    Below 256^3 glibc's dynamic mmap threshold (up to 32 MB) keeps freed buffers in the heap, and
    the marginal bytes per particle between 128^3 and 192^3 overstate larger runs by a third
    (measured: 118 against 88 with ``MALLOC_MMAP_THRESHOLD_`` fixed, or between 256^3 and 320^3).
    """
    keys = [k for k in large if k.startswith("marginal_") and k.count("_") == 2]
    if not keys:
        return None
    return large[max(keys, key=lambda k: tuple(int(x) for x in k.split("_")[1:]))]


def predicted_peak(stage: str, n: int, marginal: list[dict] | None) -> dict | None:
    """The peak RSS of ``stage``'s step at ``n^3`` predicted from a marginal record, or None.

    ``peak(n2) + b (n^3 - n2^3)`` with ``b`` the marginal bytes per particle between the two
    sizes of :func:`marginal_records` (without remat, the default), and ``n2`` the larger size.
    None when ``marginal`` has no record of ``stage``.
    """
    for rec in marginal or []:
        if rec.get("stage") == stage and rec.get("remat") is False and "peak_rss_bytes" in rec:
            n2 = int(rec["sizes"][1])
            b = float(rec["marginal_bytes_per_particle"])
            peak = rec["peak_rss_bytes"][1] + b * (n**3 - n2**3)
            return {"predicted_peak_rss_bytes": peak, "from": f"marginal {b:.0f} B/particle, "
                    f"sizes {rec['sizes'][0]} and {n2}"}  # fmt: skip
    return None


#: a step predicted to peak below this fraction of the memory available runs without the
#: address-space limit (:func:`address_limit`)
PREDICTED_FIT = 0.9


def address_limit(guess: dict | None, room: int) -> int | None:
    """The address-space limit of a large run's process: None when it is predicted to fit.

    The limit (the memory available plus :data:`ADDRESS_SLACK_BYTES`) makes a step too large for
    the machine fail its own allocation. But at 512^3 a step's virtual size exceeds its resident
    size by more than the slack measured at 128^3, and the limit refused steps that fit (2-layer DM,
    stellar and HI: their XLA arenas of 10-15 GB, with peaks of 15-20 GB on 22.5 GB available).
    A step whose peak the marginal record predicts (:func:`predicted_peak`) below
    :data:`PREDICTED_FIT` of the memory available runs without it: the 256^3 -> 320^3 marginal
    predicted the 1-layer DM step at 512^3 to 1% (12.07 against 12.0 GB).
    """
    if guess is not None and guess["predicted_peak_rss_bytes"] < PREDICTED_FIT * room:
        return None
    return room + ADDRESS_SLACK_BYTES


def large_records(
    n: int = 512,
    stages=("dm1", "dm2", "stellar", "stellar3", "hi"),
    steps: int = 3,
    train_steps: int = 3,
    remat: bool | None = None,
    marginal: list[dict] | None = None,
    train_layers: int = 2,
) -> dict:
    """Training steps of every paper model at ``n^3``, each in its own process, and ``jerald train``.

    ``make bench-large`` (``python -m benchmarks.run --large --size N``). Each stage
    (:data:`LARGE_STAGES`) runs one compiling step and ``steps`` timed ones in a fresh process
    (:func:`step_record`: step time, first call, peak RSS, the step's bytes per particle), one
    after another so that their peaks do not add up; then a ``train_steps``-step
    ``jerald train`` of the 2-layer DM stage on synthetic inputs (:func:`train_command_record`).

    Returns
    -------
    dict
        ``{"N", "remat", "steps", "machine", "records": [...], "jerald_train": {...}}``.
    """
    records = []
    for stage in stages:
        kind, layers = LARGE_STAGES[stage]
        head = {"name": f"step_{stage}", "target": kind, "layers": layers, "N": n}
        guess = predicted_peak(stage, n, marginal) if remat is None else None
        room = available_bytes()
        limit = address_limit(guess, room)
        print(f"[bench-large] {stage} step at {n}^3", flush=True)
        # a step too large fails its own allocation (recorded as an error), not the machine
        rec = step_record(stage, n, remat, steps, max_address_bytes=limit)
        records.append(
            head | (guess or {}) | {"available_bytes": room, "address_limit": limit} | rec
        )
        print(f"[bench-large]   {_describe(records[-1])}", flush=True)
    # under the same address-space limit as the steps (train_command_record): too large fails alone
    print(f"[bench-large] jerald train, {train_layers} layers, {train_steps} steps", flush=True)
    guess = predicted_peak(f"dm{train_layers}", n, marginal) if remat is None else None
    limit = address_limit(guess, available_bytes())
    train_rec = train_command_record(n, train_steps, layers=train_layers, limit=limit)
    print(f"[bench-large]   {_describe(train_rec)}", flush=True)
    return {
        "N": n,
        "remat": remat,
        "steps": steps,
        "machine": machine_info(),
        "records": records,
        "jerald_train": train_rec,
    }


#: goals of issue 14 in FFT-equivalents (one jitted rfftn of the same mesh) at 128^3
SPEED_GOALS = {"layer_fwd_vjp": 25.0, "step_dm1": 30.0}


def speed_records(n: int = 128, reps: int = 5, box: float = 100.0) -> dict:
    """One DM layer's forward + VJP and the 1-layer DM step at ``n^3``, with their breakdowns.

    The same measurements as :func:`pm_core_records` (layer, C++ kernels) and
    :func:`training_records` (step) without the pmesh and baseline comparisons, against
    :data:`SPEED_GOALS`; every figure is relative to one jitted rfftn measured in the same run.
    """
    import jax
    import jax.numpy as jnp

    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.testing import zeldovich_particles

    pm = JaxEngine(n, box)
    pos = jnp.asarray(zeldovich_particles(n, box, seed=0, rms_disp=1.0))
    mesh = jnp.asarray(np.random.default_rng(0).random((n, n, n)).astype(np.float32))
    fft = jax.jit(jnp.fft.rfftn)
    units = unit_times(pm, pos, reps)
    layer, params = layer_fwd_vjp(pm, pos)
    step, raw = make_step("dm1", n, "jax", box, pos=pos)
    # the unit and both programs in the same rounds (interleaved_medians)
    t = interleaved_medians(
        {
            "fft": lambda: _block(fft(mesh)),
            "layer": lambda: _block(layer(params, pos)),
            "step": step,
        },
        reps,
    )
    t_fft, t_layer, t_step = t["fft"], t["layer"], t["step"]
    b_layer = breakdown(layer.lower(params, pos).compile().as_text(), units, t_layer, t_fft)
    _print_breakdown(f"layer forward + VJP at {n}^3", b_layer)
    obj = step.objective
    text = obj._value_and_grad.lower(raw, obj.data).compile().as_text()
    b_step = breakdown(text, units, t_step, t_fft)
    _print_breakdown(f"step_dm1 at {n}^3", b_step)
    records = []
    for name, t, b in (("layer_fwd_vjp", t_layer, b_layer), ("step_dm1", t_step, b_step)):
        goal = SPEED_GOALS[name] if n == 128 else None
        records.append(
            {
                "name": name,
                "seconds_median": t,
                "fft_equivalents": t / t_fft,
                "goal_fft_equivalents": goal,
                "goal_met": None if goal is None else bool(t / t_fft <= goal),
                "breakdown": b,
            }
        )
    units_fft = {f"{k[0]}[{k[1]}]": v / t_fft for k, v in units.items()}
    return {
        "N": n,
        "reps": reps,
        "rfftn_seconds": t_fft,
        "unit_fft_equivalents": units_fft,
        "machine": machine_info(),
        "records": records,
    }


#: goals of issue 14 for the marginal bytes per particle of a training step
MEMORY_GOALS = {"dm1": 100.0, "dm2": 150.0, "stellar": 150.0, "stellar3": 150.0, "hi": 150.0}


def marginal_records(
    sizes=(128, 192), stages=("dm1", "dm2", "stellar", "stellar3", "hi"), remats=(False, True)
) -> list[dict]:
    """Marginal bytes per particle of training steps between two sizes, with and without remat.

    ``(peak RSS at n2 - peak RSS at n1) / (n2^3 - n1^3)``, each peak measured in its own process
    (:func:`step_record`), one at a time: what one more particle costs, free of the fixed costs
    (the interpreter, JAX, the compiled program). Against :data:`MEMORY_GOALS`.
    """
    n1, n2 = sizes
    out = []
    for stage in stages:
        for remat in remats:
            recs = []
            for n in sizes:
                print(f"[bench-marginal] {stage} remat={remat} at {n}^3", flush=True)
                recs.append(step_record(stage, n, remat, steps=1))
            if any("error" in r for r in recs):
                out.append({"stage": stage, "remat": remat, "sizes": list(sizes), "runs": recs})
                continue
            b = (recs[1]["peak_rss_bytes"] - recs[0]["peak_rss_bytes"]) / (n2**3 - n1**3)
            goal = MEMORY_GOALS[stage]
            out.append(
                {
                    "stage": stage,
                    "remat": remat,
                    "sizes": list(sizes),
                    "marginal_bytes_per_particle": b,
                    "goal_bytes_per_particle": goal,
                    "goal_met": bool(b <= goal),
                    "step_seconds": [r["step_seconds_median"] for r in recs],
                    "peak_rss_bytes": [r["peak_rss_bytes"] for r in recs],
                }
            )
            print(f"[bench-marginal]   {stage} remat={remat}: {b:.0f} B/particle (goal {goal:.0f})")
    return out


def _describe(rec: dict) -> str:
    if "error" in rec:
        return f"failed: {rec['error']}"
    if rec.get("name") == "jerald_train":
        return f"{rec['seconds']:.1f} s, peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB"
    return (
        f"step {rec['step_seconds_median']:.2f} s (first {rec['first_call_seconds']:.1f} s), "
        f"peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"{rec['peak_bytes_per_particle']:.0f} B/particle"
    )


def merge_into(path, key: str, sub: str, value) -> None:
    """Set ``doc[key][sub] = value`` in the JSON file ``path``, keeping everything else."""
    from jerald_nbk.utils import atomic_write

    path = Path(path)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault(key, {})[sub] = value
    with atomic_write(path) as fh:
        json.dump(doc, fh, indent=1)


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
    ap.add_argument(
        "--large",
        action="store_true",
        help="only the large runs (make bench-large): every paper model's training step at "
        "--size, each in its own process, and a few-step jerald train; stored under the 'large' "
        "key of --out, by size",
    )
    ap.add_argument("--size", type=int, default=512, help="size of --large (default 512)")
    ap.add_argument(
        "--remat", choices=["on", "off", "default"], default="default", help="remat of --large"
    )
    ap.add_argument(
        "--marginal",
        metavar="N1,N2",
        help="only the marginal bytes per particle between two sizes (with and without remat), "
        "stored under large/marginal_N1_N2 of --out",
    )
    ap.add_argument(
        "--speed",
        metavar="N",
        type=int,
        help="only one DM layer's forward + VJP and the 1-layer DM training step at N^3, in "
        "FFT-equivalents with the breakdown of where the time goes, stored under speed/N of --out",
    )
    args = ap.parse_args(argv)
    if args.speed:
        doc = speed_records(args.speed, args.reps)
        merge_into(args.out, "speed", str(args.speed), doc)
        print(f"[bench-speed] wrote speed/{args.speed} of {args.out}")
        return 0
    if args.large:
        remat = {"on": True, "off": False, "default": None}[args.remat]
        old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        marginal = latest_marginal(old.get("large", {}))  # predicts what fits (see there)
        doc = large_records(args.size, remat=remat, marginal=marginal)
        merge_into(args.out, "large", str(args.size), doc)
        print(f"[bench-large] wrote large/{args.size} of {args.out}")
        return 0
    if args.marginal:
        sizes = tuple(int(s) for s in args.marginal.split(","))
        remats = {"on": (True,), "off": (False,), "default": (False, True)}[args.remat]
        recs = marginal_records(sizes, remats=remats)
        merge_into(args.out, "large", f"marginal_{sizes[0]}_{sizes[1]}", recs)
        print(f"[bench-marginal] wrote large/marginal_{sizes[0]}_{sizes[1]} of {args.out}")
        return 0
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
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for key in ("large", "speed"):  # measured apart (make bench-large, --speed): kept
        if key in old:
            doc[key] = old[key]
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
