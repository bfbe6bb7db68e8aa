"""The learning-rate schedule of eq 16 as an optax schedule."""

from __future__ import annotations

import jax.numpy as jnp


def paper_schedule(eta0: float = 0.002, eta_final: float = 0.02, tau: float = 100.0):
    """Eq 16: ``eta(t) = (eta_final - eta0) (2 / (exp(-t/tau) + 1) - 1) + eta0``.

    Rises from ``eta0`` at t = 0 toward ``eta_final`` on a time scale ``tau`` (steps).
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")

    def schedule(count):
        t = jnp.asarray(count, dtype=jnp.float32)
        return (eta_final - eta0) * (2.0 / (jnp.exp(-t / tau) + 1.0) - 1.0) + eta0

    return schedule
