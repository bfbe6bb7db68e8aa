"""Recompute intermediates in the backward pass, after the cotangent is known.

A training step's memory peaks where the forward pass ends and the backward one begins: every mesh
a layer saves for its backward pass is alive there. :func:`recompute_in_backward` saves only a
function's inputs and recomputes the rest from them in the backward pass.

``jax.checkpoint`` does the same in principle, but XLA may schedule the recomputation into the
forward pass, where it holds the same meshes as before (an optimization barrier alone is removed
before scheduling). Here the saved inputs are tied to the cotangent (:func:`tied_to`): ``zero`` is
0 whatever the cotangent (``c - c`` is not folded away by XLA for floats; the ``where`` keeps a
non-finite element from turning every gradient into NaN), so the inputs are unchanged, but nothing
computed from them can run before the cotangent exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tied_to(after, *args) -> tuple:
    """``args`` unchanged in value, but computed only once ``after`` is (see the module docstring).

    Parameters
    ----------
    after : array or pytree of arrays
        What must exist first (a cotangent, or a result of the backward pass).
    *args : arrays

    Returns
    -------
    tuple
        ``args``, each plus a zero made from the first element of ``after``.
    """
    leaves = [x for x in jax.tree_util.tree_leaves(after) if getattr(x, "size", 0)]
    if not leaves:  # (an MPI rank may hold no plane of the mesh)
        return args
    c = jnp.real(leaves[0].reshape(-1)[0])
    zero = jnp.where(jnp.isfinite(c), c - c, jnp.zeros_like(c))
    return tuple(a + zero.astype(jnp.result_type(a)) for a in args)


def recompute_in_backward(fn, nondiff_argnums: tuple = (), tied: tuple | None = None):
    """``fn`` with a VJP that saves its inputs only and recomputes its intermediates.

    Parameters
    ----------
    fn : callable
        ``fn(*args)``; the arguments at ``nondiff_argnums`` are static (hashable, not
        differentiated), every other one is an array.
    nondiff_argnums : tuple of int
        Positions of the static arguments; they must come first.
    tied : tuple of bool, optional
        Which array arguments to tie to the cotangent (default: all): those the recomputed
        intermediates are made from. A tied input is a new array in the backward pass unless XLA
        fuses the tie into its consumers, so an input that is only read as it is (particle
        positions read by a kernel) is better left untied.

    Returns
    -------
    callable
        Same values as ``fn``; differentiable in the array arguments.
    """
    nstatic = len(nondiff_argnums)
    if tuple(nondiff_argnums) != tuple(range(nstatic)):
        raise ValueError(f"static arguments must come first, got positions {nondiff_argnums}")
    wrapped = jax.custom_vjp(fn, nondiff_argnums=tuple(nondiff_argnums))

    def fwd(*args):
        return fn(*args), args[nstatic:]

    def bwd(*rest):
        static, res, ct = rest[:nstatic], rest[nstatic], rest[nstatic + 1]
        keep = (True,) * len(res) if tied is None else tied
        late = iter(tied_to(ct, *(r for r, k in zip(res, keep, strict=True) if k)))
        args = tuple(next(late) if k else r for r, k in zip(res, keep, strict=True))
        _, vjp = jax.vjp(lambda *a: fn(*static, *a), *args)
        return vjp(ct)

    wrapped.defvjp(fwd, bwd)
    return wrapped
