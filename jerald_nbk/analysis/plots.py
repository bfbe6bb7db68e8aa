"""Figures (PNG, matplotlib Agg): power-spectrum comparisons, slices, training curves.

Every function writes its file atomically (:func:`jerald_nbk.utils.atomic_write`) and returns the
path. matplotlib is imported inside the functions, with the non-interactive Agg backend, so that
importing :mod:`jerald_nbk.analysis` stays cheap and works without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..geometry import box_vector
from ..utils import atomic_write
from .metrics import relative_difference_map

__all__ = ["plot_power_comparison", "plot_slices", "plot_training_curves", "project_slab"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def plot_power_comparison(path, results: Mapping[str, Mapping], title: str | None = None) -> Path:
    """P(k) of several maps against a reference, their ratio and their r(k).

    Parameters
    ----------
    path : str or Path
        Output PNG.
    results : mapping of label to dict
        Each value as returned by :func:`.metrics.figures_of_merit` for one predicted map against
        the same reference (keys ``k``, ``power_pred``, ``power_ref``, ``ratio``, ``r``). The
        reference spectrum is drawn from the first entry. Example: ``{"JERALD": fom_model,
        "FastPM": fom_fastpm}``.
    title : str, optional

    Returns
    -------
    Path of the PNG.
    """
    if not results:
        raise ValueError("plot_power_comparison: no results to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(
        3, 1, figsize=(6, 8), sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]}
    )
    first = next(iter(results.values()))
    k_ref = np.asarray(first["k"])
    good = np.isfinite(k_ref) & (k_ref > 0)
    axes[0].loglog(k_ref[good], np.asarray(first["power_ref"])[good], "k-", lw=2, label="reference")
    for label, res in results.items():
        k = np.asarray(res["k"])
        sel = np.isfinite(k) & (k > 0)
        p = np.asarray(res["power_pred"])[sel]
        (line,) = axes[0].loglog(k[sel], np.where(p > 0, p, np.nan), "--", label=label)
        axes[1].semilogx(k[sel], np.asarray(res["ratio"])[sel], color=line.get_color())
        axes[2].semilogx(k[sel], np.asarray(res["r"])[sel], color=line.get_color())
    axes[0].set_ylabel(r"$P(k)$ [$(h^{-1}\mathrm{Mpc})^3$]")
    axes[0].legend(fontsize="small")
    axes[1].axhspan(0.9, 1.1, color="0.85", label=r"$\pm 10\%$")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel(r"$P/P_\mathrm{ref}$")
    axes[1].legend(fontsize="small", loc="lower left")
    axes[2].axhline(1.0, color="k", lw=0.8)
    for thr in (0.9, 0.7):
        axes[2].axhline(thr, color="0.6", lw=0.8, ls=":")
    axes[2].set_ylabel(r"$r(k)$")
    axes[2].set_xlabel(r"$k$ [$h\,\mathrm{Mpc}^{-1}$]")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def project_slab(
    field, BoxSize, thickness: float, axis: int = 2, start: float = 0.0, comm=None
) -> np.ndarray | None:
    """Mean of a mesh over a slab ``[start, start + thickness)`` Mpc/h along ``axis``.

    Parameters
    ----------
    field : array_like, shape (Nx, Ny, Nz)
    BoxSize : float or sequence of 3 floats
        Mpc/h.
    thickness, start : float
        Slab thickness and lower edge in Mpc/h, rounded to whole cells (at least one); the slab
        wraps around the periodic box.
    axis : int
        Projection axis.
    comm : MPI communicator, optional
        With more than one rank, ``field`` is this rank's x slab (planes in rank order, e.g.
        :func:`jerald_nbk.analysis.power.slab_slices`): rank 0 receives the 2-D map, the other
        ranks return None. No rank holds the 3-D mesh.

    Returns
    -------
    numpy.ndarray, the 2D map of the two remaining axes (in their order).
    """
    from .power import _global_shape

    arr = np.asarray(field)
    shape = _global_shape(arr, comm) if arr.ndim == 3 else arr.shape
    box = box_vector(BoxSize, "project_slab", ndim=len(shape))
    n = shape[axis]
    cell = box[axis] / n
    first = int(np.floor(start / cell + 0.5))
    count = int(min(n, max(1, round(thickness / cell))))
    idx = (first + np.arange(count)) % n
    if comm is None or comm.size == 1:
        return np.take(arr, idx, axis=axis).mean(axis=axis)
    from mpi4py import MPI

    if axis == 0:  # the slab's planes lie on some ranks: add their sums on rank 0
        x0 = comm.exscan(arr.shape[0]) or 0
        mine = idx[(idx >= x0) & (idx < x0 + arr.shape[0])] - x0
        part = np.asarray(arr[mine].sum(axis=0), dtype=np.float64)
        total = np.zeros_like(part) if comm.rank == 0 else None
        comm.Reduce(part, total, op=MPI.SUM, root=0)
        return None if comm.rank else total / count
    parts = comm.gather(np.take(arr, idx, axis=axis).mean(axis=axis), root=0)
    return None if comm.rank else np.concatenate(parts, axis=0)


def plot_slices(
    path,
    ref,
    pred,
    BoxSize,
    thickness: float = 2.0,
    axis: int = 2,
    start: float = 0.0,
    clip: float = 0.5,
    smooth: float = 0.2,
    labels: Sequence[str] = ("reference", "prediction"),
    title: str | None = None,
    log: bool | None = None,
    comm=None,
) -> Path:
    """Reference, prediction and relative difference, projected over a slab.

    Parameters
    ----------
    path : str or Path
        Output PNG.
    ref, pred : array_like, shape (Nx, Ny, Nz)
        Reference and predicted meshes.
    BoxSize : float or sequence of 3 floats
        Mpc/h.
    thickness, axis, start : float, int, float
        The slab: ``thickness`` Mpc/h along ``axis`` from ``start`` Mpc/h.
    clip, smooth : float
        Relative-difference settings, see :func:`.metrics.relative_difference_map`; its 3D map
        is averaged over the same slab.
    labels : pair of str
    title : str, optional
    log : bool, optional
        Logarithmic colour scale for the maps; default when both projected maps are positive.
    comm : MPI communicator, optional
        With more than one rank, ``ref`` and ``pred`` are this rank's x slabs; the projections
        are put together on rank 0, which alone draws the figure.

    Returns
    -------
    Path of the PNG.
    """
    box = box_vector(BoxSize, "plot_slices")
    ref_p = project_slab(ref, box, thickness, axis, start, comm)
    pred_p = project_slab(pred, box, thickness, axis, start, comm)
    rel = relative_difference_map(pred, ref, box, clip, smooth, comm)
    diff = project_slab(rel, box, thickness, axis, start, comm)
    if ref_p is None:  # not rank 0
        return Path(path)
    plt = _pyplot()
    from matplotlib.colors import LogNorm, Normalize

    both = np.concatenate([ref_p.ravel(), pred_p.ravel()])
    if log is None:
        log = bool(np.all(both > 0))
    if log:
        pos = both[both > 0]
        lo, hi = (np.percentile(pos, 1), pos.max()) if pos.size else (1e-3, 1.0)
        norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.001))
    else:
        lo, hi = np.percentile(both, [1, 99.9])
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    dmax = float(np.nanpercentile(np.abs(diff), 99)) or 1.0
    dmax = min(dmax, 2.0)

    others = [i for i in range(3) if i != axis]
    extent = (0, box[others[1]], 0, box[others[0]])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    for ax, img, lab in zip(axes[:2], (ref_p, pred_p), labels, strict=True):
        im = ax.imshow(img, origin="lower", extent=extent, norm=norm, cmap="magma")
        ax.set_title(lab)
    fig.colorbar(im, ax=axes[:2].tolist(), shrink=0.8)
    im = axes[2].imshow(diff, origin="lower", extent=extent, cmap="RdBu_r", vmin=-dmax, vmax=dmax)
    axes[2].set_title("(pred - ref) / ref")
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    names = "xyz"
    for ax in axes:
        ax.set_xlabel(f"{names[others[1]]} [Mpc/h]")
        ax.set_ylabel(f"{names[others[0]]} [Mpc/h]")
    fig.suptitle(
        (title + "\n" if title else "")
        + f"slab {names[axis]} in [{start:g}, {start + thickness:g}) Mpc/h",
        fontsize="medium",
    )
    return _save(fig, path)


def plot_training_curves(path, history: Sequence[Mapping], title: str | None = None) -> Path:
    """Train / validation / test loss and learning rate against optimisation step.

    Parameters
    ----------
    path : str or Path
        Output PNG.
    history : sequence of dict
        One entry per step with keys ``step`` and any of ``train``, ``validation``, ``test``,
        ``lr`` (missing or None values are skipped, e.g. a test loss evaluated every few steps).
    title : str, optional

    Returns
    -------
    Path of the PNG.
    """
    if not history:
        raise ValueError("plot_training_curves: empty history")
    plt = _pyplot()

    def series(key):
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        return np.array(pts, dtype=float).reshape(-1, 2)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    positive = True
    for key, style in (("train", "-"), ("validation", "--"), ("test", ":")):
        s = series(key)
        if len(s):
            ax.plot(s[:, 0], s[:, 1], style, label=key, marker="." if len(s) < 30 else None)
            positive &= bool(np.all(s[:, 1] > 0))
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr = series("lr")
    if len(lr):
        ax2 = ax.twinx()
        ax2.plot(lr[:, 0], lr[:, 1], color="0.5", lw=0.8, label="learning rate")
        ax2.set_ylabel("learning rate", color="0.4")
    ax.legend(loc="upper right", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_parameter_trajectories(
    path,
    history: Sequence[Mapping],
    bounds: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> Path:
    """Every parameter against optimisation step, one small panel each.

    A parameter that never moves (a dead term of the model) shows as a flat line and its panel
    title says ``frozen``; a parameter resting on a bound has the bound drawn and its title says
    ``at bound``.

    Parameters
    ----------
    path : str or Path
        Output PNG.
    history : sequence of dict
        One entry per step with keys ``step`` and ``params`` (physical values by name), as written
        to ``metrics.jsonl`` by :func:`jerald_nbk.train.train`.
    bounds : mapping name -> (lower, upper), optional
        Physical bounds (infinite ones are not drawn).
    title : str, optional

    Returns
    -------
    Path of the PNG.
    """
    rows = [h for h in history if h.get("params")]
    if not rows:
        raise ValueError("plot_parameter_trajectories: no step records parameters")
    names = list(rows[0]["params"])
    steps = np.array([h["step"] for h in rows], dtype=float)
    plt = _pyplot()
    ncol = min(6, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(2.1 * ncol, 1.6 * nrow + 0.4), squeeze=False, sharex=True
    )
    for ax, name in zip(axes.flat, names, strict=False):
        v = np.array([h["params"].get(name, np.nan) for h in rows], dtype=float)
        ax.plot(steps, v, lw=1.0)
        status = ""
        lo, hi = (bounds or {}).get(name, (-np.inf, np.inf))
        for b in (lo, hi):
            if b is not None and np.isfinite(b):
                ax.axhline(b, color="0.6", ls="--", lw=0.7)
                if np.isclose(v[-1], b, rtol=1e-5, atol=1e-12):
                    status = " (at bound)"
        if np.all(v == v[0]):
            status = " (frozen)"
        ax.set_title(name + status, fontsize=8, color="C3" if status == " (frozen)" else "k")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
