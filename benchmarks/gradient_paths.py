"""How a layer's gradient is taken, compared: three FFTs, the real-space stencil, the stencil
recomputed in the backward pass, and the layer differentiated as one operation (the JAX engine's
default).

``python -m benchmarks.gradient_paths [--size 128] [--rounds 3] [--calls 10]`` runs each variant
in its own process, the variants one after another and that ``--rounds`` times (so that the
machine's drift falls on all of them alike), and times, in each process, one DM layer's forward +
VJP (positions differentiated) and the training steps of 1- and 2-layer DM and of HI, each the
median of ``--calls`` calls. Results under ``speed/gradient_paths_N`` of
``benchmarks/results/latest.json``.

Variants (engines that differ only in how a layer's potential becomes a displacement):

* ``fourier``: ``ParticleMesh.gradient_mesh`` (three inverse FFTs; three forward FFTs in the
  backward pass) read out as one 3-channel mesh, which is kept for the backward pass;
* ``stencil``: the C++ stencil on one inverse FFT, the 3-channel mesh kept;
* ``recompute``: the stencil, and the backward pass recomputes the gradient mesh from the
  1-channel potential (``JaxEngine.readout_gradient``): 8 bytes per cell less per layer at the
  step's peak, one stencil more per layer whose positions are differentiated;
* ``fused``: ``recompute``, with the whole layer one operation (``JaxEngine.displace``): its
  position cotangent in one particle pass, its readout added to the positions in the readout.

The first three compose the layer as :meth:`ParticleMesh.displace` does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("fourier", "stencil", "recompute", "fused")
PROGRAMS = ("layer", "dm1", "dm2", "hi")


def _engine(variant: str, n: int, box: float):
    from jerald_nbk.pm import JaxEngine
    from jerald_nbk.pm.base import ParticleMesh

    class Recompute(JaxEngine):
        def displace(self, pos, source, args=(), order=6, density=None):
            return ParticleMesh.displace(self, pos, source, args, order, density)

    class Stencil(Recompute):
        def readout_gradient(self, phik, pos, order=6):
            return ParticleMesh.readout_gradient(self, phik, pos, order)

    class Fourier(Stencil):
        def gradient_mesh(self, phik, order=6):
            return ParticleMesh.gradient_mesh(self, phik, order)

    variants = {"fourier": Fourier, "stencil": Stencil, "recompute": Recompute, "fused": JaxEngine}
    return variants[variant](n, box)


def measure(variant: str, n: int, calls: int, box: float = 100.0) -> dict:
    """Median seconds of each of :data:`PROGRAMS` with one variant's engine (this process)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.run import _block, interleaved_medians, layer_fwd_vjp
    from jerald_nbk.model.pipeline import Stage, StageConfig
    from jerald_nbk.testing import zeldovich_particles
    from jerald_nbk.train.loop import Objective, TrainConfig

    pm = _engine(variant, n, box)
    pos = jnp.asarray(zeldovich_particles(n, box, seed=0, rms_disp=1.0))
    layer, params = layer_fwd_vjp(pm, pos)
    fns = {"layer": lambda: _block(layer(params, pos))}
    target = pm.density(pos) * 1.1
    for name, (kind, layers) in {"dm1": ("dm", 1), "dm2": ("dm", 2), "hi": ("hi", 2)}.items():
        stage = Stage(pm, StageConfig(kind, layers))
        star = pm.density(pos) if kind == "hi" else None
        obj = Objective(stage, pos, target, TrainConfig(progress=False), star=star)
        raw = jnp.asarray(stage.table.init_raw(), jnp.float32)
        fns[name] = lambda obj=obj, raw=raw: _block(obj.value_and_grad(raw))
    fft = jax.jit(jnp.fft.rfftn)
    fns["rfftn"] = lambda: _block(fft(target))
    return interleaved_medians(fns, calls)


def run(n: int = 128, rounds: int = 3, calls: int = 10) -> dict:
    """Every variant in its own process, ``rounds`` times in turn; medians over the rounds."""
    runs = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for v in VARIANTS:
            cmd = [sys.executable, "-m", "benchmarks.gradient_paths", "--child", v,
                   "--size", str(n), "--calls", str(calls)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"[gradient-paths] round {r + 1} {v}: " + ", ".join(
                f"{k} {1e3 * t:.0f} ms" for k, t in runs[v][-1].items()), flush=True)  # fmt: skip
    median = {v: {k: float(np.median([x[k] for x in runs[v]])) for k in runs[v][0]} for v in runs}
    from benchmarks.run import machine_info

    return {
        "N": n,
        "rounds": rounds,
        "calls": calls,
        "machine": machine_info(),
        "median_seconds": median,
        "vs_fourier": {
            v: {k: median[v][k] / median["fourier"][k] for k in PROGRAMS} for v in VARIANTS
        },
        "runs": runs,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "latest.json"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.size, args.calls)))
        return 0
    t0 = time.perf_counter()
    doc = run(args.size, args.rounds, args.calls)
    doc["seconds"] = time.perf_counter() - t0
    for v, r in doc["vs_fourier"].items():
        print(f"[gradient-paths] {v} / fourier: " + ", ".join(f"{k} {x:.3f}" for k, x in r.items()))
    from benchmarks.run import merge_into

    merge_into(args.out, "speed", f"gradient_paths_{args.size}", doc)
    print(f"[gradient-paths] wrote speed/gradient_paths_{args.size} of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
