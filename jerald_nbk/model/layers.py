"""Displacement layers (paper eqs 1-2, 4-7 and 12) and their Green's functions.

A layer moves particles by ``S = alpha * grad(G * f(delta))`` read out at the particles (eq 1-2):
CIC paint -> power law -> r2c -> Green's function x gradient kernel -> 3 c2r -> 3-channel readout.

Sign convention (pinned by a test): the Green's functions are positive and the gradient is the true
one (Fourier factor ``+i k``), so ``alpha > 0`` moves particles toward overdensities, as gravity does
for ``alpha = 4 pi G rho``, ``gamma = 1``, ``nu = -2``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..pm.base import ParticleMesh

#: keeps ``(1 + delta + EPS)^gamma`` and its gradient finite in empty cells (model.md)
EPS = 1e-8


def green_dm(pm: ParticleMesh, kh, kl, nu):
    """Eq 7: ``exp(-kh/k) exp(-k/kl) k^nu``; 0 at k = 0 (:data:`fourier.K0_VALUES`)."""
    return pm.fourier_factor("green", lambda k: jnp.exp(-kh / k - k / kl) * k**nu)


def green_sm(pm: ParticleMesh, kh, kl, nu):
    """Eq 6 (LDL's form, stellar mass and HI): ``exp(-(kh/k)^2) exp(-(k/kl)^2) k^nu``; 0 at k = 0."""
    return pm.fourier_factor("green", lambda k: jnp.exp(-((kh / k) ** 2) - (k / kl) ** 2) * k**nu)


GREENS = {"dm": green_dm, "sm": green_sm}


def power_source(one_plus_delta, gamma):
    """``f(delta) = (1 + delta + EPS)^gamma`` (eq 2)."""
    return (one_plus_delta + EPS) ** gamma


def potential_displacement(pm: ParticleMesh, pos, phik, order=6):
    """``grad(phi)`` at the particles for a potential given in Fourier space: (N, 3)."""
    comps = [pm.c2r(phik * d) for d in pm.gradient_kernels(order)]
    return pm.readout(jnp.stack(comps, axis=-1), pos)


def displacement_layer(
    pm: ParticleMesh, pos, alpha, gamma, kh, kl, nu, green="dm", order=6, density=None
):
    """One layer, eq 1-2: returns the new positions ``x + alpha grad(G f(delta))(x)``.

    Parameters
    ----------
    pm : ParticleMesh
        The engine (JAX or pmesh).
    pos : (N, 3) array
        Particle positions, Mpc/h (not wrapped: the CIC kernels are periodic).
    alpha, gamma, kh, kl, nu : scalars
        Physical layer parameters.
    green : {"dm", "sm"}
        Eq 7 (dark matter) or eq 6 (stellar mass, HI).
    order : {4, 6, "exact"}
        Finite-difference order of the gradient.
    density : real mesh, optional
        ``pm.density(pos)`` if already known (the first layer's input particles do not depend on
        the parameters, so training paints them once instead of at every step).
    """
    src = power_source(pm.density(pos) if density is None else density, gamma)
    phik = pm.r2c(src) * GREENS[green](pm, kh, kl, nu)
    return pos + alpha * potential_displacement(pm, pos, phik, order)


def hi_layer(pm: ParticleMesh, pos, star, p1, p2, order=6, density=None):
    """HI displacement layer, eq 12, with the stellar-source term of opposite sign.

    ``S = alpha1 grad(G1 f1(delta)) - alpha2 grad(G2 f2(delta_star))``: ``alpha2 > 0`` pushes gas
    away from stars, as galactic winds do (the reference code's convention). Both potentials are
    summed in Fourier space so that one set of 3 inverse FFTs and one readout serves both.

    Parameters
    ----------
    star : real mesh
        ``1 + delta_star``: the frozen stellar map, floored and divided by its mean.
    p1, p2 : tuples (alpha, gamma, kh, kl, nu)
        Physical parameters of the DM-source and stellar-source terms.
    density : real mesh, optional
        ``pm.density(pos)`` if already known (see :func:`displacement_layer`).
    """
    a1, g1, kh1, kl1, nu1 = p1
    a2, g2, kh2, kl2, nu2 = p2
    rho = pm.density(pos) if density is None else density
    phik = a1 * pm.r2c(power_source(rho, g1)) * green_sm(pm, kh1, kl1, nu1)
    phik = phik - a2 * pm.r2c(power_source(star, g2)) * green_sm(pm, kh2, kl2, nu2)
    return pos + potential_displacement(pm, pos, phik, order)
