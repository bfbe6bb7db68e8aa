"""Peak memory of one training step, per particle, measured in a fresh process.

``python -m benchmarks.memory STAGE N BACKEND`` prints one JSON line. The figure is the peak
resident set size during a step (after a first, compiling step) minus the resident size before the
step was built (input particles already in memory), divided by the number of particles: it counts
the target and mask meshes, the compiled program's buffers and every temporary of the step, not
the one-off compilation. The kernel's peak counter (VmHWM) is reset through /proc/self/clear_refs
so that earlier peaks (imports, compilation) do not hide the step's own.
"""

import json
import sys
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    stage, n, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import jax  # noqa: F401

    from benchmarks.run import make_step
    from jerald_nbk.testing import zeldovich_particles

    pos = zeldovich_particles(n, 100.0, seed=0, rms_disp=1.0)
    before = _status("VmRSS")
    step, _ = make_step(stage, n, backend, pos=pos)
    step()  # compiles (its one-off peak is excluded); XLA keeps the step's buffers resident
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    peak = max(_status("VmHWM"), before)  # the second step's peak, retained buffers included

    print(
        json.dumps(
            {
                "stage": stage,
                "N": n,
                "backend": backend,
                "peak_bytes_per_particle": (peak - before) / n**3,
            }
        )
    )


if __name__ == "__main__":
    main()
