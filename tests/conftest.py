"""Test configuration: float64 available everywhere (gradient checks), small meshes for 2 cores."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

# Gradient and adjoint checks run in float64; the engines cast to their own dtype explicitly, so
# float32 tests are unaffected.
jax.config.update("jax_enable_x64", True)

import time  # noqa: E402

import pytest  # noqa: E402

#: the smoke reference suite shared by every test file that needs realistic inputs
SMOKE_REDSHIFTS = (5.0, 2.0, 0.0)
SMOKE_SEED = 7


@pytest.fixture(scope="session")
def smoke_suite(tmp_path_factory):
    """The smoke-size reference suite (32^3, 25 Mpc/h, z = 5, 2, 0), built once per session."""
    from jerald_nbk.suite import build_suite

    out = tmp_path_factory.mktemp("suite")
    t0 = time.perf_counter()
    paths = build_suite(
        out,
        size="smoke",
        seed=SMOKE_SEED,
        redshifts=SMOKE_REDSHIFTS,
        progress=False,
        save_highres=True,
    )
    return {"dir": out, "paths": paths, "seconds": time.perf_counter() - t0}
