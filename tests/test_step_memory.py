"""Compiled temporaries of the single-process engine's training steps (issue 14, item 1).

XLA's own memory analysis of the compiled step, per particle at 32^3 (N^3 particles on an N^3
mesh), against bounds set a little above what the layers need since their intermediates are
recomputed in the backward pass: :func:`jerald_nbk.model.layers.fourier_sources` (the power law,
FFT and Green's function, one source after another) and the JAX engine's ``displace`` (the
3-channel gradient mesh, from the 1-channel potential, after the source's backward pass).
Measured: 1-layer DM 48.5, 2-layer DM 77.0, 2-layer HI 103.4, 3-layer stellar 103.1 bytes per
particle (with the layer differentiated piece by piece: 48.5, 79.4, 103.4, 105.8; with the
gradient mesh kept and the two HI sources recomputed together: 48.5, 86.6, 114.8, 116.8; before
any recomputation: 80.5, 141, 196). A bound that fails means that a layer keeps meshes alive from the
forward pass to the end of the backward one again: e.g. XLA scheduled a recomputation into the
forward pass (the cotangent no longer ties it), or a change saves the displacement, the gradient
mesh or the Green's function.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.pm import JaxEngine
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train.loop import Objective, TrainConfig

N = 32

#: (target, layers) -> upper bound of the compiled temporaries, bytes per particle
BOUNDS = {("dm", 1): 54.0, ("dm", 2): 86.0, ("hi", 2): 110.0, ("stellar", 3): 112.0}


@pytest.mark.parametrize(("target", "layers"), list(BOUNDS))
def test_step_temporaries_per_particle(target, layers):
    pm = JaxEngine(N, 100.0, kernel="cpp")
    pos = jnp.asarray(zeldovich_particles(N, 100.0, seed=0, rms_disp=1.0))
    stage = Stage(pm, StageConfig(target, layers), remat=False)
    rho = pm.density(pos)
    star = rho if target == "hi" else None
    obj = Objective(stage, pos, rho * 1.1, TrainConfig(progress=False), star=star)
    raw = jnp.asarray(stage.table.init_raw(), jnp.float32)
    compiled = obj._value_and_grad.lower(raw, obj.data).compile()
    per_particle = compiled.memory_analysis().temp_size_in_bytes / N**3
    assert per_particle <= BOUNDS[target, layers], (
        f"{target} {layers}-layer step: {per_particle:.1f} B/particle of temporaries "
        f"> {BOUNDS[target, layers]}"
    )


def test_large_run_prediction_uses_the_larger_size_and_the_default_step():
    """benchmarks.run.predicted_peak extrapolates from the larger measured size with the marginal
    bytes of the step without remat (what make bench-large runs): starting from the smaller size,
    or from the remat record, would misjudge whether a 512^3 step fits and either start a run the
    kernel kills or skip one that fits."""
    from benchmarks.run import predicted_peak

    marginal = [
        {"stage": "hi", "remat": True, "sizes": [128, 192], "marginal_bytes_per_particle": 1.0,
         "peak_rss_bytes": [0, 0]},
        {"stage": "hi", "remat": False, "sizes": [128, 192], "marginal_bytes_per_particle": 200.0,
         "peak_rss_bytes": [8e8, 1.9e9]},
    ]  # fmt: skip
    got = predicted_peak("hi", 512, marginal)
    assert got["predicted_peak_rss_bytes"] == pytest.approx(1.9e9 + 200.0 * (512**3 - 192**3))
    assert predicted_peak("dm1", 512, marginal) is None


def test_large_run_prediction_takes_the_marginal_of_the_largest_sizes():
    """benchmarks.run.latest_marginal: the prediction of make bench-large comes from the marginal
    record measured at the largest sizes (below 256^3 glibc keeps freed buffers in its heap and the
    marginal overstates a 512^3 step by a third), not from an older or smaller pair, and not from
    a record kept for comparison (``..._before_...``)."""
    from benchmarks.run import latest_marginal

    large = {
        "marginal_128_192": ["small"],
        "marginal_256_320": ["large"],
        "marginal_192_256": ["middle"],
        "marginal_512_640_before_abc": ["kept"],
        "512": {"records": []},
    }
    assert latest_marginal(large) == ["large"]
    assert latest_marginal({"512": {}}) is None


def test_large_run_limits_the_address_space_unless_predicted_to_fit():
    """benchmarks.run.address_limit: a step predicted well below the memory available runs
    without the address-space limit (at 512^3 the limit refused steps that fit); one predicted
    near or above it, or with no prediction, runs under the limit, so that it fails alone."""
    from benchmarks.run import ADDRESS_SLACK_BYTES, PREDICTED_FIT, address_limit

    room = 20 * 2**30
    fits = {"predicted_peak_rss_bytes": 0.5 * room}
    tight = {"predicted_peak_rss_bytes": (PREDICTED_FIT + 0.01) * room}
    assert address_limit(fits, room) is None
    assert address_limit(tight, room) == room + ADDRESS_SLACK_BYTES
    assert address_limit(None, room) == room + ADDRESS_SLACK_BYTES


def test_large_run_child_is_limited_to_the_memory_given():
    """A step too large for the machine must fail its own allocation (recorded as an error), not
    wake the kernel's OOM killer, which may kill other processes: _run_measured's address-space
    limit reaches the child."""
    import sys

    from benchmarks.run import _run_measured

    cmd = [sys.executable, "-c", "b = bytearray(3 * 2**30); print('allocated')"]
    res, _ = _run_measured(cmd, 60, max_address_bytes=2 * 2**30)
    assert res.returncode != 0 and "MemoryError" in res.stderr
    res, usage = _run_measured([sys.executable, "-c", "print('small')"], 60, 2 * 2**30)
    assert res.returncode == 0 and res.stdout.strip() == "small"
