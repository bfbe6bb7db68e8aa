"""Loss of eqs 10-11, the Fourier smoothing filter, and the train/validation/test split of the mesh."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..pm.base import ParticleMesh

#: the paper's split (fractions of the box per axis, on global mesh indices):
#: test = [0, 0.43)^3, train = z >= 0.5, validation = the rest (~50 / 42 / 8 %).
SPLITS = ("paper", "ldl")


def split_masks(pm: ParticleMesh, kind: str = "paper") -> dict:
    """Boolean masks ``train``, ``validation``, ``test`` on the local real mesh.

    ``kind="paper"``: test ``[0, 0.43)^3``, train ``z >= 0.5`` outside the test cube, validation the
    rest. ``kind="ldl"``: LDL's split, test ``[0, 0.44)^3``, validation ``x >= 0.44, y < 0.56,
    z < 0.56``, train the rest. The three masks are disjoint and cover the mesh.
    """
    i, j, l = pm.mesh_index()
    n = np.array(pm.Nmesh, dtype=float)
    fx, fy, fz = (i + 0.0) / n[0], (j + 0.0) / n[1], (l + 0.0) / n[2]
    shape = jnp.broadcast_shapes(fx.shape, fy.shape, fz.shape)
    if kind == "paper":
        test = (fx < 0.43) & (fy < 0.43) & (fz < 0.43)
        train = (fz >= 0.5) & ~test
    elif kind == "ldl":
        test = (fx < 0.44) & (fy < 0.44) & (fz < 0.44)
        val = (fx >= 0.44) & (fy < 0.56) & (fz < 0.56)
        train = ~test & ~val
    else:
        raise ValueError(f"split must be one of {SPLITS}, got {kind!r}")
    test = jnp.broadcast_to(test, shape)
    train = jnp.broadcast_to(train, shape)
    return {"train": train, "validation": ~train & ~test, "test": test}


def smoothing_filter(pm: ParticleMesh, n: float):
    """Eq 11: ``O_s(k) = 1 + (k / 1 h/Mpc)^(-n)``, with weight exactly 1 at k = 0.

    (The reference code floors k = 0 to 1e-8 before this test and so weights the mean ~1e8^n.)
    Returns None for ``n == 0`` (no smoothing).
    """
    if n == 0:
        return None
    kvec = pm.kvec()
    k2 = kvec[0] ** 2 + kvec[1] ** 2 + kvec[2] ** 2
    nonzero = k2 > 0
    k = jnp.sqrt(jnp.where(nonzero, k2, 1.0))
    return jnp.where(nonzero, 1.0 + k ** (-n), 1.0)


def masked_losses(pm: ParticleMesh, F, F_ref, masks: dict, p: int = 2, filt=None) -> dict:
    """Eq 10 on each region: ``mean_region |O_s (F - F_ref)|^p``.

    The smoothing acts on the residual over the whole periodic box before masking, so it mixes
    values across region boundaries by up to the filter's width (the paper does the same; say so
    when quoting test losses).
    """
    r = F - F_ref
    if filt is not None:
        r = pm.apply_fourier(r, filt)
    e = jnp.abs(r) ** p if p != 2 else r * r
    out = {}
    for name, m in masks.items():
        out[name] = pm.sum(jnp.where(m, e, 0.0)) / pm.sum(m.astype(e.dtype))
    return out
