"""Displacement layers (paper eqs 1-2, 4-7 and 12) and their Green's functions.

A layer moves particles by ``S = alpha * grad(G * f(delta))`` read out at the particles (eq 1-2):
CIC paint -> power law -> r2c -> Green's function -> gradient (the engine's: a real-space stencil
or Fourier factors) -> 3-channel readout, added to the positions. This module builds the potential
(:func:`fourier_source`, :func:`fourier_sources`); the engine paints, takes the gradient and moves
the particles (:meth:`ParticleMesh.displace`, which may differentiate the whole layer at once).

Sign convention (pinned by a test): the Green's functions are positive and the gradient is the true
one (Fourier factor ``+i k``), so ``alpha > 0`` moves particles toward overdensities, as gravity does
for ``alpha = 4 pi G rho``, ``gamma = 1``, ``nu = -2``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..pm.base import ParticleMesh
from ..pm.remat import tied_to

#: keeps ``(1 + delta + EPS)^gamma`` and its gradient finite in empty cells (model.md)
EPS = 1e-8


def positive_power(x, p):
    """``x ** p`` for ``x > 0`` as ``exp(p log x)``, which XLA vectorises on a CPU.

    A power with a traced exponent compiles to one scalar ``powf`` call per element (and its
    derivative to another): at 128^3, 4.5% of a 1-layer DM training step. ``exp`` and ``log``
    are vector loops. Relative difference to ``x ** p``: a few float32 ulps times ``|p log x|``.
    """
    return jnp.exp(p * jnp.log(x))


def green_exponential(pm: ParticleMesh, kh, kl, nu):
    """Eq 7 (JERALD's DM form): ``exp(-kh/k) exp(-k/kl) k^nu``; 0 at k = 0 (:data:`fourier.K0_VALUES`)."""
    return pm.fourier_factor("green", lambda k: jnp.exp(-kh / k - k / kl + nu * jnp.log(k)))


def green_gaussian(pm: ParticleMesh, kh, kl, nu):
    """Eq 6 (LDL's form; stellar mass and HI): ``exp(-(kh/k)^2) exp(-(k/kl)^2) k^nu``; 0 at k = 0."""
    return pm.fourier_factor(
        "green", lambda k: jnp.exp(-((kh / k) ** 2) - (k / kl) ** 2 + nu * jnp.log(k))
    )


#: the Green's functions by the shape of their cut-offs (eq 7: exponential, eq 6: Gaussian)
GREENS = {"exponential": green_exponential, "gaussian": green_gaussian}

#: the first release's keys, named after the target that first used each form; still read from
#: parameter files and accepted as arguments (:func:`green_name`)
GREEN_ALIASES = {"dm": "exponential", "sm": "gaussian"}


def green_name(kind: str) -> str:
    """The key of :data:`GREENS` for ``kind`` (a key, or an alias of :data:`GREEN_ALIASES`).

    Parameters
    ----------
    kind : str
        ``"exponential"`` (eq 7), ``"gaussian"`` (eq 6), or their old names ``"dm"``, ``"sm"``.

    Returns
    -------
    str
        ``"exponential"`` or ``"gaussian"``.

    Raises
    ------
    ValueError
        For any other value, naming the accepted ones.
    """
    name = GREEN_ALIASES.get(kind, kind)
    if name not in GREENS:
        accepted = ", ".join(repr(k) for k in (*GREENS, *GREEN_ALIASES))
        raise ValueError(f"Green's function kind must be one of {accepted}, got {kind!r}")
    return name


def power_source(one_plus_delta, gamma):
    """``f(delta) = (1 + delta + EPS)^gamma`` (eq 2)."""
    return positive_power(one_plus_delta + EPS, gamma)


def fourier_source(pm: ParticleMesh, rho, gamma, alpha, kh, kl, nu, green="exponential"):
    """``alpha G(k) FFT[f(delta)]``: a layer's potential in Fourier space (eqs 1-2, 6-7).

    Same values as ``alpha * pm.r2c(power_source(rho, gamma)) * GREENS[green](pm, kh, kl, nu)``;
    its backward pass recomputes the power law, the forward FFT and the Green's function from
    ``rho`` and the five scalars once the cotangent is known (:mod:`jerald_nbk.pm.remat`), instead
    of keeping up to seven meshes of intermediates alive from the forward pass to the end of the
    backward one (where a training step's memory peaks): one more FFT and a few elementwise passes
    per layer for, at 32^3, a compiled 1-layer DM step's temporaries of 52 instead of 80 bytes per
    particle (2-layer DM 91 instead of 141, 2-layer HI 123 instead of 196). ``alpha`` is applied
    in Fourier space, so that the displacement itself needs not be kept for alpha's gradient.
    """
    return fourier_sources(pm, [(rho, gamma, alpha, kh, kl, nu, green, 1)])


def fourier_sources(pm: ParticleMesh, terms):
    """A signed sum of :func:`fourier_source` terms, whose backward passes run one after another.

    Parameters
    ----------
    pm : ParticleMesh
    terms : sequence of (rho, gamma, alpha, kh, kl, nu, green, sign)
        ``sign`` is +1 or -1 (eq 12's stellar term is subtracted).

    Returns
    -------
    complex mesh
        ``sum sign * fourier_source(pm, rho, gamma, alpha, kh, kl, nu, green)``.

    Notes
    -----
    Every term's recomputation is tied to the previous term's gradient, so that XLA does not
    recompute two terms' intermediates at once (it did for the two sources of an HI layer, where
    the step's memory peaked).
    """
    greens = tuple(green_name(t[6]) for t in terms)
    signs = tuple(float(t[7]) for t in terms)
    # in the mesh's dtype: float64 parameters (JAX's x64 mode with a float32 engine) would
    # otherwise make every mesh of the layer and of its backward pass float64
    args = []
    for rho, *scalars, _green, _sign in terms:
        args += [rho] + [jnp.asarray(x, dtype=jnp.result_type(rho)) for x in scalars]
    return _fourier_sources(pm, greens, signs, *args)


_TERM = 6  # arrays per term of _fourier_sources: rho, gamma, alpha, kh, kl, nu


def _source_term(pm, green, sign, rho, gamma, alpha, kh, kl, nu):
    return (sign * alpha) * pm.r2c(power_source(rho, gamma)) * GREENS[green](pm, kh, kl, nu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fourier_sources(pm, greens, signs, *args):
    out = 0
    for t, (green, sign) in enumerate(zip(greens, signs, strict=True)):
        out = out + _source_term(pm, green, sign, *args[_TERM * t : _TERM * (t + 1)])
    return out


def _fourier_sources_fwd(pm, greens, signs, *args):
    return _fourier_sources(pm, greens, signs, *args), args


def _fourier_sources_bwd(pm, greens, signs, args, ct):
    grads, after = [], ct
    for t, (green, sign) in enumerate(zip(greens, signs, strict=True)):
        term_args = tied_to(after, *args[_TERM * t : _TERM * (t + 1)])
        _, vjp = jax.vjp(functools.partial(_source_term, pm, green, sign), *term_args)
        g = vjp(ct)
        grads += g
        after = g[0]
    return tuple(grads)


_fourier_sources.defvjp(_fourier_sources_fwd, _fourier_sources_bwd)


def displacement_layer(
    pm: ParticleMesh, pos, alpha, gamma, kh, kl, nu, green="exponential", order=6, density=None
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
    green : {"exponential", "gaussian"}
        Eq 7 (JERALD's dark matter) or eq 6 (stellar mass, HI; LDL for every target); the old
        names ``"dm"`` and ``"sm"`` are accepted (:func:`green_name`).
    order : {4, 6, "exact"}
        Finite-difference order of the gradient.
    density : real mesh, optional
        ``pm.density(pos)`` if already known (the first layer's input particles do not depend on
        the parameters, so training paints them once instead of at every step).
    """

    def source(rho, *scalars):
        return fourier_source(pm, rho, *scalars, green)

    return pm.displace(pos, source, (gamma, alpha, kh, kl, nu), order, density)


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

    def source(rho, star, p1, p2):
        (a1, g1, kh1, kl1, nu1), (a2, g2, kh2, kl2, nu2) = p1, p2
        terms = [
            (rho, g1, a1, kh1, kl1, nu1, "gaussian", 1),
            (star, g2, a2, kh2, kl2, nu2, "gaussian", -1),
        ]
        return fourier_sources(pm, terms)

    return pm.displace(pos, source, (star, tuple(p1), tuple(p2)), order, density)
