"""JERALD as vmad operators, for models written in vmad (LDL, fastpm-python's adjoint models).

`vmad <https://github.com/rainwoodman/vmad>`_ is the automatic-differentiation library LDL is written
in. This module wraps the JERALD building blocks as vmad operators whose forward pass and adjoints
are ours: each operator calls the JAX function of :mod:`jerald_nbk.model` (or the engine's CIC
kernels) and its ``jax.vjp`` / ``jax.jvp``. A vmad model can call them next to vmad's own operators
and get gradients with ``tape.get_vjp()`` as usual.

Reverse mode (``vjp``) is exact everywhere. Forward mode (``jvp``) is exact where the JAX function
supports it (the final transforms and :data:`pow` / :data:`relu`; :data:`hi_transform` on the JAX
engine); through the CIC kernels (:data:`displacement`, :data:`paint`, :data:`readout`) and the
pmesh engine's FFTs, which define reverse-mode adjoints only, it raises ``NotImplementedError``.

Operators
---------
:data:`displacement`
    One displacement layer (eq 1-2) with the eq 7 (``green="exponential"``) or eq 6 (``green="gaussian"``)
    Green's function: ``X1 = displacement(X, alpha, gamma, kh, kl, nu, pm=pm, green="gaussian")``.
:data:`stellar_transform`
    Eq 8: ``F = stellar_transform(rho, w, mu, b)``.
:data:`hi_transform`
    Eqs 13-15: ``F = hi_transform(rho, star, param, pm=pm)``, ``param`` ordered as
    :data:`HI_PARAMS`.
:data:`paint`, :data:`readout`
    CIC paint and readout on a JERALD engine (``X`` is this rank's particles: no ``decompose`` /
    ``exchange`` needed, the MPI engine routes particles itself).
:data:`pow`, :data:`relu`
    What LDL needs and vmad 0.0.2 lacks: ``x ** p`` with an array exponent (vmad 0.0.2's ``pow``
    raises "truth value of an array is ambiguous" on ``(delta + 1e-8) ** gamma`` when ``gamma``
    is broadcast to the mesh, as LDL does), and the ReLU that LDL defines itself.

Engines and meshes
------------------
``pm`` is a JERALD engine (:func:`jerald_nbk.pm.make_pm`): ``backend="jax"`` (one process) or
``backend="pmesh"`` (MPI). Meshes may be numpy arrays or pmesh ``RealField`` s; on the pmesh engine
the operators that make a mesh return a ``RealField`` of ``pm.ppm`` (the engine's
``pmesh.pm.ParticleMesh``), so vmad's ``vmad.lib.fastpm`` operators (``r2c``, ``c2r``,
``apply_transfer``...) can take it; on the JAX engine they return numpy arrays. Every mesh is
the local part on this rank.

MPI convention (vmad's): the gradient an operator returns for a scalar parameter is this rank's
contribution. Pass replicated parameters through ``vmad.lib.mpi.allbcast`` (as LDL does), whose
adjoint sums the contributions over the ranks.

Examples
--------
>>> from vmad import Builder
>>> from vmad.lib import linalg
>>> from jerald_nbk import vmad as jv
>>> from jerald_nbk.pm import make_pm
>>> pm = make_pm(32, 25.0)
>>> with Builder() as m:
...     p = m.input("p")                                  # alpha, gamma, kh, kl, nu, w, mu, b
...     a, g, kh, kl, nu, w, mu, b = (linalg.take(p, i, axis=0) for i in range(8))
...     X1 = jv.displacement(X, a, g, kh, kl, nu, pm=pm, green="gaussian")
...     rho = jv.paint(X1, 1.0, pm=pm) * (pm.ncells / len(X))
...     m.output(F=jv.stellar_transform(rho, w, mu, b))
>>> F, tape = m.compute(init=dict(p=p0), vout="F", return_tape=True)
>>> grad = tape.get_vjp().compute(init=dict(_F=dF), vout="_p")
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from vmad import operator
from vmad.core.operator import ZeroGradient

from .model import layers, transforms

__all__ = [
    "HI_PARAMS",
    "displacement",
    "stellar_transform",
    "hi_transform",
    "paint",
    "readout",
    "pow",
    "relu",
]

#: order of the entries of :data:`hi_transform`'s ``param`` vector (``zs`` may be left out: 0)
HI_PARAMS = ("w", "mu", "b", "beta1", "beta2", "eta", "gamma3", "kIh", "kIl", "nuI", "xi", "zs")


# -- conversions between vmad's values (numpy, pmesh fields) and JAX --------------------------
def _value(x):
    """The plain array of ``x`` (a pmesh field's local slab, or ``x`` itself)."""
    return np.asarray(x.value) if hasattr(x, "pm") and hasattr(x, "value") else np.asarray(x)


def _to_jax(x):
    return jnp.asarray(_value(x))


def _like(result, template=None, pm=None):
    """``result`` as numpy, a pmesh field when ``template`` is one or ``pm`` is the pmesh engine.

    0-d results come back as numpy scalars.
    """
    arr = np.asarray(result)
    if arr.ndim == 0:
        return arr[()]
    if hasattr(template, "pm") and hasattr(template, "value"):
        return template.pm.create(type="real", value=arr)
    if getattr(pm, "name", None) == "pmesh" and tuple(arr.shape) == tuple(pm.local_real_shape):
        return pm.ppm.create(type="real", value=arr)
    return arr


def _tangent(t, primal):
    """A JAX tangent for ``primal`` from vmad's ``t`` (vmad passes a zero for inputs not varied)."""
    p = _to_jax(primal)
    if ZeroGradient.is_zero(t):
        return jnp.zeros_like(p)
    return jnp.broadcast_to(_to_jax(t).astype(p.dtype), p.shape)


def _apl(fn, args, out_template=None, pm=None):
    """Run ``fn`` on ``args`` with :func:`jax.vjp`: the value (vmad types) and the pullback."""
    y, back = jax.vjp(fn, *(_to_jax(a) for a in args))
    return _like(y, out_template, pm), back


def _vjp(back, _y, args):
    """The pullback applied to vmad's cotangent ``_y``: one gradient per input, typed like it."""
    ct = _to_jax(_y)
    return tuple(_like(g, a) for g, a in zip(back(ct), args, strict=True))


def _jvp(fn, args, tangents, out_template=None, pm=None):
    primals = tuple(_to_jax(a) for a in args)
    tans = tuple(_tangent(t, a) for t, a in zip(tangents, args, strict=True))
    try:
        _, y_ = jax.jvp(fn, primals, tans)
    except TypeError as err:
        if "custom_vjp" not in str(err):
            raise
        raise NotImplementedError(
            "forward mode (jvp) is not available through JERALD's CIC kernels and the pmesh "
            "engine's FFTs, which define their reverse-mode adjoints only; use the tape's vjp "
            "(tape.get_vjp(), as LDL does)"
        ) from err
    return _like(y_, out_template, pm)


# -- the displacement layer ------------------------------------------------------------------
def _layer_fn(pm, green, order):
    def fn(x, alpha, gamma, kh, kl, nu):
        return layers.displacement_layer(pm, x, alpha, gamma, kh, kl, nu, green=green, order=order)

    return fn


@operator
class displacement:
    """One JERALD displacement layer, eq 1-2: ``X1 = X + alpha grad(G f(delta))(X)``.

    Parameters
    ----------
    x : (N, 3) ndarray
        This rank's particle positions, Mpc/h.
    alpha, gamma, kh, kl, nu : scalars
        Physical layer parameters (differentiable).
    pm : jerald_nbk.pm.ParticleMesh
        The engine; ``1 + delta`` is painted on it from the particles of every rank.
    green : {"exponential", "gaussian"} (or the old "dm", "sm")
        Eq 7 ``exp(-kh/k) exp(-k/kl) k^nu`` or eq 6 ``exp(-(kh/k)^2) exp(-(k/kl)^2) k^nu``.
    order : {4, 6, "exact"}
        Finite-difference order of the gradient (as :func:`jerald_nbk.model.layers.displacement_layer`).

    Returns
    -------
    y : (N, 3) ndarray
        The displaced positions.
    """

    ain = {
        "x": "ndarray",
        "alpha": "*",
        "gamma": "*",
        "kh": "*",
        "kl": "*",
        "nu": "*",
    }
    aout = {"y": "ndarray"}

    def apl(node, x, alpha, gamma, kh, kl, nu, pm, green="exponential", order=6):
        green = layers.green_name(green)
        y, back = _apl(_layer_fn(pm, green, order), (x, alpha, gamma, kh, kl, nu))
        return dict(y=y, back=back)

    def vjp(node, _y, back, x, alpha, gamma, kh, kl, nu):
        g = _vjp(back, _y, (x, alpha, gamma, kh, kl, nu))
        return dict(zip(("_x", "_alpha", "_gamma", "_kh", "_kl", "_nu"), g, strict=True))

    def jvp(node, x_, alpha_, gamma_, kh_, kl_, nu_, x, alpha, gamma, kh, kl, nu, pm, green, order):
        tans = (x_, alpha_, gamma_, kh_, kl_, nu_)
        y_ = _jvp(_layer_fn(pm, green, order), (x, alpha, gamma, kh, kl, nu), tans)
        return dict(y_=y_)


# -- the final transforms --------------------------------------------------------------------
@operator
class stellar_transform:
    """Eq 8: ``F = ReLU(w (1 + delta + EPS)^mu - b)``, stellar mass per cell.

    Parameters
    ----------
    x : mesh (ndarray or pmesh RealField)
        ``1 + delta`` of the displaced particles (local slab).
    w, mu, b : scalars
        Physical parameters (differentiable).

    Returns
    -------
    y : mesh, the same type as ``x``
    """

    ain = {"x": "RealField", "w": "*", "mu": "*", "b": "*"}
    aout = {"y": "RealField"}

    def apl(node, x, w, mu, b):
        y, back = _apl(transforms.stellar_transform, (x, w, mu, b), out_template=x)
        return dict(y=y, back=back)

    def vjp(node, _y, back, x, w, mu, b):
        g = _vjp(back, _y, (x, w, mu, b))
        return dict(zip(("_x", "_w", "_mu", "_b"), g, strict=True))

    def jvp(node, x_, w_, mu_, b_, x, w, mu, b):
        y_ = _jvp(transforms.stellar_transform, (x, w, mu, b), (x_, w_, mu_, b_), out_template=x)
        return dict(y_=y_)


def _hi_fn(pm):
    def fn(x, star, param):
        p = {name: param[i] for i, name in enumerate(HI_PARAMS[: param.shape[0]])}
        return transforms.hi_transform(pm, x, star, p)

    return fn


def _check_hi_param(param):
    n = np.shape(_value(param))
    if n not in ((len(HI_PARAMS) - 1,), (len(HI_PARAMS),)):
        raise ValueError(
            f"hi_transform's param must hold {len(HI_PARAMS) - 1} or {len(HI_PARAMS)} values "
            f"({', '.join(HI_PARAMS)}), got shape {n}"
        )


@operator
class hi_transform:
    """Eqs 13-15: ``F = ReLU(w ReLU(1 + delta + zs)^mu - D - b)`` with the stellar depletion ``D``.

    Parameters
    ----------
    x : mesh (ndarray or pmesh RealField)
        ``1 + delta`` of the displaced particles (local slab).
    star : mesh
        ``1 + delta_star``: the stellar map over its mean, floored
        (:func:`jerald_nbk.model.transforms.star_overdensity`). Differentiable.
    param : (11,) or (12,) ndarray
        Physical parameters in the order of :data:`HI_PARAMS` (``zs`` = 0 when left out).
    pm : jerald_nbk.pm.ParticleMesh
        The engine (the depletion filter ``O_I`` is applied in Fourier space).

    Returns
    -------
    y : mesh, the same type as ``x``
    """

    ain = {"x": "RealField", "star": "RealField", "param": "ndarray"}
    aout = {"y": "RealField"}

    def apl(node, x, star, param, pm):
        _check_hi_param(param)
        y, back = _apl(_hi_fn(pm), (x, star, param), out_template=x, pm=pm)
        return dict(y=y, back=back)

    def vjp(node, _y, back, x, star, param):
        g = _vjp(back, _y, (x, star, param))
        return dict(zip(("_x", "_star", "_param"), g, strict=True))

    def jvp(node, x_, star_, param_, x, star, param, pm):
        y_ = _jvp(_hi_fn(pm), (x, star, param), (x_, star_, param_), out_template=x, pm=pm)
        return dict(y_=y_)


# -- CIC paint and readout ---------------------------------------------------------------------
@operator
class paint:
    """CIC-paint this rank's particles on the engine's mesh: ``mesh[c] = sum_p mass_p W(x_p - c)``.

    Parameters
    ----------
    x : (N, 3) ndarray
        This rank's positions, Mpc/h (the MPI engine routes them to their slabs itself).
    mass : scalar or (N,) ndarray
        One mass for every particle, or one each (differentiable).
    pm : jerald_nbk.pm.ParticleMesh
        The engine.

    Returns
    -------
    mesh : local real mesh (a pmesh RealField on the pmesh engine, numpy otherwise)
    """

    ain = {"x": "ndarray", "mass": "*"}
    aout = {"mesh": "RealField"}

    def apl(node, x, mass, pm):
        mesh, back = _apl(lambda x, m: pm.paint(x, m), (x, mass), pm=pm)
        return dict(mesh=mesh, back=back)

    def vjp(node, _mesh, back, x, mass):
        _x, _mass = _vjp(back, _mesh, (x, mass))
        return dict(_x=_x, _mass=_mass)

    def jvp(node, x_, mass_, x, mass, pm):
        return dict(mesh_=_jvp(lambda x, m: pm.paint(x, m), (x, mass), (x_, mass_), pm=pm))


@operator
class readout:
    """CIC-interpolate a mesh at this rank's particles (the adjoint of :data:`paint`).

    Parameters
    ----------
    mesh : local real mesh (ndarray or pmesh RealField)
    x : (N, 3) ndarray
        This rank's positions, Mpc/h.
    pm : jerald_nbk.pm.ParticleMesh
        The engine.

    Returns
    -------
    value : (N,) ndarray
    """

    ain = {"mesh": "RealField", "x": "ndarray"}
    aout = {"value": "ndarray"}

    def apl(node, mesh, x, pm):
        value, back = _apl(pm.readout, (mesh, x))
        return dict(value=value, back=back)

    def vjp(node, _value, back, mesh, x):
        _mesh, _x = _vjp(back, _value, (mesh, x))
        return dict(_mesh=_mesh, _x=_x)

    def jvp(node, mesh_, x_, mesh, x, pm):
        return dict(value_=_jvp(pm.readout, (mesh, x), (mesh_, x_)))


# -- what LDL needs and vmad 0.0.2 lacks -------------------------------------------------------
def _unbroadcast(g, shape):
    """Sum ``g`` down to ``shape`` (the adjoint of numpy broadcasting)."""
    g = np.asarray(g)
    if g.shape == tuple(shape):
        return g
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g.reshape(shape)


@operator
class pow:  # noqa: A001 (vmad's name for the operator)
    """``y = x1 ** x2`` for any broadcastable ``x1`` and ``x2`` (scalars or arrays).

    vmad 0.0.2's ``pow`` evaluates ``x2 != 1`` as a Python bool, which raises for an array exponent
    (LDL's ``(delta + 1e-8) ** broadcast_to(gamma, shape)``); its exponent gradient is also not
    reduced to the exponent's shape. This one takes ``x1 > 0`` where ``x2`` is differentiated
    (``d/dx2 = y log x1``), and gives each input a gradient of its own shape.
    """

    ain = {"x1": "*", "x2": "*"}
    aout = {"y": "*"}

    def apl(node, x1, x2):
        a, p = _value(x1), _value(x2)
        return dict(y=_like(a**p, x1), s1=np.shape(a), s2=np.shape(p))

    def vjp(node, _y, x1, x2, s1, s2):
        a, p, g = _value(x1), _value(x2), _value(_y)
        with np.errstate(divide="ignore", invalid="ignore"):
            d1 = g * p * a ** (p - 1)
            d2 = g * a**p * np.log(np.where(a > 0, a, 1.0))
        return dict(_x1=_like(_unbroadcast(d1, s1), x1), _x2=_unbroadcast(d2, s2))

    def jvp(node, x1_, x2_, x1, x2):
        a, p = _value(x1), _value(x2)
        y_ = 0.0
        if not ZeroGradient.is_zero(x1_):
            y_ = y_ + _value(x1_) * p * a ** (p - 1)
        if not ZeroGradient.is_zero(x2_):
            y_ = y_ + _value(x2_) * a**p * np.log(np.where(a > 0, a, 1.0))
        return dict(y_=_like(y_, x1))


@operator
class relu:
    """``max(x, 0)`` elementwise, with gradient 0 where ``x <= 0`` (LDL's ``ReLU``)."""

    ain = {"x": "*"}
    aout = {"y": "*"}

    def apl(node, x):
        return dict(y=_like(np.maximum(_value(x), 0), x))

    def vjp(node, _y, x):
        return dict(_x=_like(np.where(_value(x) > 0, _value(_y), 0), x))

    def jvp(node, x_, x):
        return dict(y_=_like(np.where(_value(x) > 0, _value(x_), 0), x))
