"""Final transforms from the displaced particles' density to the predicted map (eqs 8, 9, 13-15)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..pm.base import ParticleMesh
from .layers import EPS, positive_power

#: floor of ``1 + delta_star``, relative to the stellar map's mean (model.md: "floored at a tiny
#: positive value"). Relative, so that the HI model does not depend on the units of the stellar map
#: (an absolute 1e-8 in 1e10 Msun/h is a different floor from 1e-8 in Msun/h).
STAR_FLOOR = 1e-8


def dm_transform(one_plus_delta):
    """Eq 9: ``F = 1 + delta_out`` (no parameters)."""
    return one_plus_delta


def stellar_transform(one_plus_delta, w, mu, b):
    """Eq 8: ``F = ReLU(w (1 + delta_out)^mu - b)``, stellar mass in 1e10 Msun/h per cell."""
    return jax.nn.relu(w * positive_power(one_plus_delta + EPS, mu) - b)


def star_overdensity(pm: ParticleMesh, stellar_map):
    """``1 + delta_star``: the stellar map over its mean, floored at :data:`STAR_FLOOR`, renormalised.

    Independent of the stellar map's units: a map in Msun/h and the same map in 1e10 Msun/h give the
    same ``1 + delta_star``.
    """
    m = stellar_map / (pm.sum(stellar_map) / pm.ncells)
    m = jnp.maximum(m, STAR_FLOOR)
    return m / (pm.sum(m) / pm.ncells)


def filter_OI(pm: ParticleMesh, kIh, kIl, nuI, xi):
    """Eq 15: ``O_I(k) = exp(-kIh/k) exp(-k/kIl) k^nuI + xi``; ``O_I(0) = xi`` (``K0_VALUES``)."""
    return (
        pm.fourier_factor("depletion", lambda k: jnp.exp(-kIh / k - k / kIl + nuI * jnp.log(k)))
        + xi
    )


def hi_transform(pm: ParticleMesh, one_plus_delta, star, p: dict):
    """Eqs 13-15: ``F = ReLU(w ReLU(1 + delta_out + zs)^mu - D - b)``.

    ``D = ReLU(beta1 O_I[1 + delta_star] + eta) + beta2 (1 + delta_star)^gamma3``.
    ``p`` maps names (``w, mu, b, beta1, beta2, eta, gamma3, kIh, kIl, nuI, xi`` and optionally
    ``zs``) to physical values.
    """
    zs = p.get("zs", 0.0)
    filtered = pm.apply_fourier(star, filter_OI(pm, p["kIh"], p["kIl"], p["nuI"], p["xi"]))
    depletion = jax.nn.relu(p["beta1"] * filtered + p["eta"]) + p["beta2"] * positive_power(
        star + EPS, p["gamma3"]
    )
    base = jax.nn.relu(one_plus_delta + zs) + EPS
    return jax.nn.relu(p["w"] * positive_power(base, p["mu"]) - depletion - p["b"])
