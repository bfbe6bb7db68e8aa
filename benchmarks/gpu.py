"""The single-process JAX engine on a GPU: step times and device memory at 128^3-512^3 (issue 14, item 5).

Run on a machine with a GPU (JAX with CUDA; pmesh, nbodykit and the C++ extension are not
needed, the pure-JAX CIC kernels are what a GPU runs)::

    python -m benchmarks.gpu --out DIR [--sizes 128,512,256] [--deadline 520]

Every measurement runs in its own process (a fresh device, so that the device's peak memory
belongs to one step, and an out-of-memory error ends one record, not the run), in this order:

1. ``parity``: the 1-layer DM and the HI steps at 64^3, loss and gradient on the GPU against the
   same step on the host CPU (float32 both): the relative differences.
2. ``chunk``: the 1-layer DM step at 256^3 with the pure-JAX kernels' particle chunk at 2^18
   (the CPU default), 2^22 and 2^24; the fastest is used for everything after.
3. for each size: ``units`` (one rfftn, a 1-channel paint, a 3-channel readout, one DM layer's
   forward + VJP, in rfftn equivalents), then the training steps (loss + gradient, exactly
   :func:`benchmarks.run.make_step`): 1-layer DM and HI at every size; 2-layer DM, stellar with 2
   and 3 layers at the largest.

Each record: median step time over ``--reps`` calls after one warm call, the first call (compile
+ run), the device's peak bytes in use and bytes per particle. Written to ``DIR/gpu.json`` after
every record, so a run cut short keeps what it measured; ``--deadline`` (seconds) skips what
would start after it. The issue's goal: a 512^3 1-layer DM step <= 0.25 s on one H100-class GPU.
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

#: issue 14's goal for a 512^3 1-layer DM step on one H100-class GPU (seconds)
GOAL_512_DM1_SECONDS = 0.25
BOX = 100.0


def _positions(n: int):
    """The benchmark's particles (Zel'dovich lattice, 1 cell rms), made on the device."""
    import jax.numpy as jnp

    from jerald_nbk.testing import zeldovich_particles

    return zeldovich_particles(n, BOX, seed=0, rms_disp=1.0, xp=jnp)


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def child_step(stage: str, n: int, chunk: int, reps: int) -> dict:
    """One training step of ``stage`` at ``n^3`` (:func:`benchmarks.run.make_step`), timed."""
    from benchmarks.run import make_step, median_time

    t0 = time.perf_counter()
    pos = _positions(n)
    t_pos = time.perf_counter() - t0
    step, _ = make_step(stage, n, "jax", BOX, pos=pos, kernel="jax", chunk=chunk)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t = median_time(step, reps, warmup=1)
    peak = _peak_bytes()
    return {
        "kind": "step",
        "stage": stage,
        "N": n,
        "chunk": chunk,
        "seconds_median": t,
        "first_call_seconds": first,
        "positions_seconds": t_pos,
        "peak_device_bytes": peak,
        "bytes_per_particle": None if peak is None else peak / n**3,
    }


def child_units(n: int, chunk: int, reps: int) -> dict:
    """rfftn, paint, readout and one DM layer's forward + VJP at ``n^3``, in rfftn equivalents."""
    import jax
    import jax.numpy as jnp

    from benchmarks.run import _block, layer_fwd_vjp, median_time
    from jerald_nbk.pm import JaxEngine

    pm = JaxEngine(n, BOX, kernel="jax", chunk=chunk)
    pos = _positions(n)
    mesh = jax.random.uniform(jax.random.key(0), (n, n, n), jnp.float32)
    mesh3 = jnp.stack([mesh] * 3, -1)
    fft = jax.jit(jnp.fft.rfftn)
    paint = jax.jit(pm.paint)
    readout = jax.jit(pm.readout)
    layer, params = layer_fwd_vjp(pm, pos)
    times = {
        "rfftn": median_time(lambda: _block(fft(mesh)), reps),
        "paint_1ch": median_time(lambda: _block(paint(pos)), reps),
        "readout_3ch": median_time(lambda: _block(readout(mesh3, pos)), reps),
        "layer_fwd_vjp": median_time(lambda: _block(layer(params, pos)), reps),
    }
    return {
        "kind": "units",
        "N": n,
        "chunk": chunk,
        "seconds_median": times,
        "fft_equivalents": {k: v / times["rfftn"] for k, v in times.items()},
    }


def child_parity(stage: str, n: int) -> dict:
    """Loss and gradient of ``stage`` at ``n^3`` on the current default device (float32)."""
    import jax

    from benchmarks.run import make_step
    from jerald_nbk.testing import zeldovich_particles

    pos = zeldovich_particles(n, BOX, seed=0, rms_disp=1.0)
    step, raw = make_step(stage, n, "jax", BOX, pos=pos, kernel="jax")
    val, grad = step()
    return {
        "kind": "parity_half",
        "device": jax.default_backend(),
        "loss": {k: float(v) for k, v in val.items()},
        "grad": np.asarray(grad, np.float64).tolist(),
    }


def _run_child(args: list[str], timeout: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--child", *args]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "args": args}
    wall = time.perf_counter() - t0
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = " | ".join((res.stderr or "").strip().splitlines()[-4:])
        return {"error": f"exit {res.returncode}: {tail}", "args": args, "process_seconds": wall}
    return json.loads(lines[-1]) | {"process_seconds": wall}


def _machine() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host_cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _table(records: list[dict]) -> str:
    rows = [
        "| what | N | chunk | median s | first call s | peak GiB | B/particle |",
        "|---" * 7 + "|",
    ]
    for r in records:
        if r.get("kind") == "step":
            peak = r["peak_device_bytes"]
            rows.append(
                f"| step {r['stage']} | {r['N']} | 2^{int(np.log2(r['chunk']))} | "
                f"{r['seconds_median']:.4f} | {r['first_call_seconds']:.1f} | "
                + ("-" if peak is None else f"{peak / 2**30:.2f}")
                + " | "
                + ("-" if peak is None else f"{r['bytes_per_particle']:.0f}")
                + " |"
            )
        elif r.get("kind") == "units":
            s, f = r["seconds_median"], r["fft_equivalents"]
            rows.append(
                f"| units | {r['N']} | 2^{int(np.log2(r['chunk']))} | rfftn {s['rfftn']:.5f}; "
                + ", ".join(f"{k} {v:.1f} FFT-eq" for k, v in f.items() if k != "rfftn")
                + " | | | |"
            )
        elif "error" in r:
            rows.append(f"| {' '.join(r.get('args', []))} | | | {r['error'][:200]} | | | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    """Run the GPU benchmark (see the module docstring); returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sizes", default="128,512,256")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=256, help="mesh size of the chunk choice")
    ap.add_argument("--parity-size", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=520.0, help="seconds; later jobs skipped")
    ap.add_argument("--chunk", type=int, help="the kernels' particle chunk (skips the choice)")
    ap.add_argument("--no-parity", action="store_true", help="skip the GPU/CPU parity check")
    ap.add_argument("--append", type=Path, help="a gpu.json of an earlier call to extend")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "step":
            rec = child_step(rest[0], int(rest[1]), int(rest[2]), args.reps)
        elif kind == "units":
            rec = child_units(int(rest[0]), int(rest[1]), args.reps)
        else:
            rec = child_parity(rest[0], int(rest[1]))
        print(json.dumps(rec), flush=True)
        return 0

    start = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": _machine(),
        "command": "python -m benchmarks.gpu " + " ".join(argv or sys.argv[1:]),
        "goal_512_dm1_seconds": GOAL_512_DM1_SECONDS,
        "records": [],
        "parity": [],
        "skipped": [],
    }
    if args.append:
        old = json.loads(args.append.read_text())
        result |= {k: old.get(k, []) for k in ("records", "parity", "skipped")}
        result["chunk"] = old.get("chunk")
        result["command"] = old["command"] + "; " + result["command"]

    def save():
        tmp = args.out / "gpu.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out / "gpu.json")

    def left() -> float:
        return args.deadline - (time.perf_counter() - start)

    def run(child: list[str], timeout: float, env=None) -> dict | None:
        if left() < 20:
            result["skipped"].append(" ".join(child))
            return None
        rec = _run_child(child, min(timeout, left()), env)
        print(json.dumps({k: v for k, v in rec.items() if k != "grad"})[:400], flush=True)
        return rec

    # 1. parity: GPU against the host CPU, same float32 step
    cpu_env = os.environ | {"JAX_PLATFORMS": "cpu"}
    for stage in () if args.no_parity else ("dm1", "hi"):
        gpu = run(["parity", stage, str(args.parity_size)], 120)
        cpu = run(["parity", stage, str(args.parity_size)], 120, env=cpu_env)
        if gpu and cpu and "error" not in gpu and "error" not in cpu:
            result["parity"].append(
                {
                    "stage": stage,
                    "N": args.parity_size,
                    "devices": [gpu["device"], cpu["device"]],
                    "loss_rel_diff": {
                        k: abs(gpu["loss"][k] - cpu["loss"][k]) / abs(cpu["loss"][k])
                        for k in cpu["loss"]
                    },
                    "grad_rel_diff": _rel(gpu["grad"], cpu["grad"]),
                }
            )
        save()

    # 2. the pure-JAX kernels' chunk: the fastest of three at 256^3
    chunk, best = args.chunk or result.get("chunk") or 1 << 18, None
    for c in () if args.chunk or result.get("chunk") else (1 << 18, 1 << 22, 1 << 24):
        rec = run(["step", "dm1", str(args.chunk_size), str(c)], 150)
        if rec is not None:
            result["records"].append(rec | {"purpose": "chunk choice"})
            if "error" not in rec and (best is None or rec["seconds_median"] < best):
                chunk, best = c, rec["seconds_median"]
        save()
    result["chunk"] = chunk

    # 3. units and steps at each size
    for n in sizes:
        stages = ["dm1", "dm2", "stellar", "stellar3", "hi"] if n == max(sizes) else ["dm1", "hi"]
        if any(r.get("purpose") == "chunk choice" and r.get("N") == n for r in result["records"]):
            stages = [s for s in stages if s != "dm1"]  # measured by the chunk choice
        for child in [["units", str(n), str(chunk)]] + [
            ["step", s, str(n), str(chunk)] for s in stages
        ]:
            rec = run(child, 240 if n >= 512 else 120)
            if rec is not None:
                result["records"].append(rec)
            save()
    for r in result["records"]:
        if r.get("kind") == "step" and r["stage"] == "dm1" and r["N"] == 512:
            result["goal_512_dm1_met"] = bool(r["seconds_median"] <= GOAL_512_DM1_SECONDS)
    result["seconds_total"] = time.perf_counter() - start
    save()
    print(json.dumps(result["machine"]))
    print(json.dumps(result["parity"]))
    print(_table(result["records"]))
    if result["skipped"]:
        print("skipped (deadline):", "; ".join(result["skipped"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
