"""Test configuration: float64 available everywhere (gradient checks), small meshes for 2 cores."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

# Gradient and adjoint checks run in float64; the engines cast to their own dtype explicitly, so
# float32 tests are unaffected.
jax.config.update("jax_enable_x64", True)
