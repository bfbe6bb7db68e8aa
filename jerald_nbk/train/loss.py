"""Loss of eqs 10-11, the Fourier smoothing filter, and the train/validation/test split of the mesh."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..pm.base import ParticleMesh

#: the train/validation/test splits; cuts are fractions of the mesh per axis, applied to global
#: integer cell indices as the reference codes apply them: ``i < int(f * Nmesh)`` (``f * Nmesh``
#: rounded down), never ``i / Nmesh < f``, which keeps one more plane whenever ``f * Nmesh`` is not
#: an integer.
SPLITS = {
    # JERALD reference: test [0, 0.43)^3, train z >= 0.5, validation the rest (~50 / 42 / 8 %)
    "paper": {"test": 0.43, "train_z": 0.5},
    # LDL: test [0, 0.44)^3, validation x >= 0.44 & y < 0.56 & z < 0.56, train the rest
    "ldl": {"test": 0.44, "val_x": 0.44, "val_yz": 0.56},
}


def split_cuts(nmesh, kind: str = "paper") -> dict:
    """Integer plane indices of a split's cuts per axis: ``{name: (cx, cy, cz)}``, ``int(f * N)``.

    Parameters
    ----------
    nmesh : sequence of 3 ints
        Global mesh size per axis.
    kind : {"paper", "ldl"}
    """
    if kind not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {kind!r}")
    # int(f * n) in float64, as the reference codes compute it
    return {name: tuple(int(f * int(n)) for n in nmesh) for name, f in SPLITS[kind].items()}


def split_masks(pm: ParticleMesh, kind: str = "paper") -> dict:
    """Boolean masks ``train``, ``validation``, ``test`` on the local real mesh.

    ``kind="paper"``: test ``i, j, l < int(0.43 N)``, train ``l >= int(0.5 N)`` outside the test
    cube, validation the rest. ``kind="ldl"``: LDL's split, test ``i, j, l < int(0.44 N)``,
    validation ``i >= int(0.44 N), j < int(0.56 N), l < int(0.56 N)``, train the rest. The three
    masks are disjoint and cover the mesh.
    """
    i, j, l = pm.mesh_index()
    cuts = split_cuts(pm.Nmesh, kind)
    shape = jnp.broadcast_shapes(np.shape(i), np.shape(j), np.shape(l))
    tx, ty, tz = cuts["test"]
    test = (i < tx) & (j < ty) & (l < tz)
    if kind == "paper":
        train = (l >= cuts["train_z"][2]) & ~test
    else:
        val = (i >= cuts["val_x"][0]) & (j < cuts["val_yz"][1]) & (l < cuts["val_yz"][2])
        train = ~test & ~val
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
    return pm.fourier_factor("smoothing", lambda k: 1.0 + k ** (-n))


def mask_cells(pm: ParticleMesh, masks: dict, dtype=None) -> dict:
    """Cells in each region of ``masks`` (over every rank), as scalars of ``dtype``.

    The split is fixed for a run: :class:`~jerald_nbk.train.loop.Objective` counts once and
    passes the counts to :func:`masked_losses`, which would otherwise convert and sum every mask
    in every step (a mesh-sized temporary each).
    """
    dtype = dtype or pm.dtype
    return {name: jnp.asarray(pm.sum(m.astype(dtype)), dtype) for name, m in masks.items()}


def masked_losses(
    pm: ParticleMesh, F, F_ref, masks: dict, p: int = 2, filt=None, cells=None
) -> dict:
    """Eq 10 on each region: ``mean_region |O_s (F - F_ref)|^p``.

    The smoothing acts on the residual over the whole periodic box before masking, so it mixes
    values across region boundaries by up to the filter's width (the paper does the same; say so
    when quoting test losses). ``cells``: the regions' cell counts (:func:`mask_cells`), counted
    here when not given.
    """
    r = F - F_ref
    if filt is not None:
        r = pm.apply_fourier(r, filt)
    e = jnp.abs(r) ** p if p != 2 else r * r
    cells = cells if cells is not None else mask_cells(pm, masks, e.dtype)
    return {name: pm.sum(jnp.where(m, e, 0.0)) / cells[name] for name, m in masks.items()}


#: How the kept ("best") parameters are chosen among the training steps, by the score of each step:
#:
#: * ``"validation"``: the validation loss (the reference codes' rule);
#: * ``"smoothed-validation"``: the validation loss of the residual smoothed by a Gaussian of
#:   :data:`SELECTION_RADIUS_CELLS` cells. A halo that over-collapses moves mass inward within its
#:   own radius: the raw L2 residual of its few cells can dominate the validation loss (measured: 5
#:   cells carried 39% of it), while the smoothed residual, which sees mass in the wrong *place*
#:   rather than a profile slightly too steep, is barely changed;
#: * ``"train+validation"``: the loss over both regions, weighted by their cell counts.
SELECTION_RULES = ("validation", "smoothed-validation", "train+validation")

#: radius, in cells, of the Gaussian smoothing of the ``"smoothed-validation"`` rule
SELECTION_RADIUS_CELLS = 2.0


def selection_losses(pm: ParticleMesh, F, F_ref, masks: dict, p: int = 2, cells=None) -> dict:
    """Extra per-step scores used by the selection rules (no gradient needed).

    Returns ``{"validation_smoothed": mean_validation |G_R * (F - F_ref)|^p}`` with ``G_R`` a
    Gaussian of :data:`SELECTION_RADIUS_CELLS` cells (the smallest cell size of the mesh);
    ``cells`` as in :func:`masked_losses`.
    """
    from ..pm.fourier import gaussian_filter

    radius = SELECTION_RADIUS_CELLS * float(min(pm.cellsize))
    lowpass = pm.fourier_factor("lowpass", lambda k: gaussian_filter(k, radius, xp=jnp))
    r = pm.apply_fourier(F - F_ref, lowpass)
    e = jnp.abs(r) ** p if p != 2 else r * r
    m = masks["validation"]
    count = cells["validation"] if cells is not None else pm.sum(m.astype(e.dtype))
    return {"validation_smoothed": pm.sum(jnp.where(m, e, 0.0)) / count}


def selection_score(losses: dict, rule: str, fractions: dict | None = None) -> float:
    """Score of one step under a selection rule (lower is better); see :data:`SELECTION_RULES`.

    Parameters
    ----------
    losses : dict
        The step's losses: ``train``, ``validation`` and ``validation_smoothed``.
    rule : str
        One of :data:`SELECTION_RULES`.
    fractions : dict, optional
        Cell counts (or fractions) of the ``train`` and ``validation`` regions, for
        ``"train+validation"``.
    """
    if rule == "validation":
        return float(losses["validation"])
    if rule == "smoothed-validation":
        return float(losses["validation_smoothed"])
    if rule == "train+validation":
        f = fractions or {"train": 1.0, "validation": 1.0}
        n = f["train"] + f["validation"]
        return float((f["train"] * losses["train"] + f["validation"] * losses["validation"]) / n)
    raise ValueError(f"selection rule must be one of {SELECTION_RULES}, got {rule!r}")
