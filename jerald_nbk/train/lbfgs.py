"""L-BFGS-B with bounds, the optimiser of LDL (Dai & Seljak), on an :class:`Objective`.

LDL (``LDL.py`` of biweidai/LDL) fits with ``scipy.optimize.minimize(loss, x0,
method="L-BFGS-B", jac=loss.derivative, bounds=bounds, options={"maxiter": 2000})``, where
``loss`` (its ``MemoizeJac``) computes the training loss, its gradient and the validation loss at
every point the optimiser asks for, and keeps the point with the lowest validation loss seen so
far (``best_x``; rewriting the ``*_bestparam.txt`` file each time it improves). The result is that
best point, not scipy's last iterate.

:func:`fit_lbfgsb` does the same with scipy's ``minimize(method="L-BFGS-B", jac=True)`` and the
exact JAX gradient of :meth:`Objective.value_and_grad`: ``fun`` returns ``(loss, gradient)`` in
float64, the validation loss of every evaluated point (line-search trials included, as in LDL) is
compared with the best so far, and ``on_best`` is called whenever it improves.

scipy rather than jaxopt: scipy is already a dependency, its L-BFGS-B is the Fortran code LDL
ran (same bounds handling, same stopping rules), and our objective is one JAX-jitted
``value_and_grad`` already, so nothing is gained from an optimiser traced by JAX; jaxopt is in
maintenance mode and would be a new dependency.
"""

from __future__ import annotations

import math
import sys
import time

import jax.numpy as jnp
import numpy as np

from .loop import Objective, TrainResult


def raw_bounds(table) -> tuple[np.ndarray, np.ndarray]:
    """A parameter table's physical bounds as bounds on the raw vector (``physical / scale``).

    Parameters
    ----------
    table : ParamTable
    """
    return table.lower / table.scale, table.upper / table.scale


def fit_lbfgsb(
    objective: Objective,
    raw0=None,
    lower=None,
    upper=None,
    maxiter: int = 2000,
    *,
    maxfun: int | None = None,
    on_best=None,
    log=None,
    progress: bool = False,
) -> TrainResult:
    """Minimise the training loss with L-BFGS-B inside bounds; keep the best validation point.

    Parameters
    ----------
    objective : Objective
        The loss of one stage (or composed model) on its target.
    raw0 : array, optional
        Start (raw values); default the table's initial values. Clipped onto the bounds first, as
        scipy's L-BFGS-B does.
    lower, upper : arrays, optional
        Bounds on the *raw* vector (``-inf`` / ``inf`` or NaN-free arrays); default the
        objective's table (:func:`raw_bounds`).
    maxiter : int
        L-BFGS-B iterations at most (LDL: 2000).
    maxfun : int, optional
        Function evaluations at most (scipy's default: 15000).
    on_best : callable, optional
        ``on_best(raw, evaluation, losses)`` each time the validation loss improves (LDL rewrites
        its ``*_bestparam.txt`` there).
    log : callable, optional
        Called with each evaluation's record (dict).
    progress : bool
        A progress bar over the iterations (rank 0 only).

    Returns
    -------
    TrainResult
        ``raw``: scipy's last iterate; ``best_raw``, ``best_step``, ``best_losses``: the
        evaluated point with the lowest validation loss (``best_step`` counts evaluations from 0);
        ``history``: one record per evaluation (``step`` = evaluation, ``iteration``, losses,
        ``params``); ``final_step``: iterations done; ``opt_state``: scipy's ``OptimizeResult``.

    Raises
    ------
    FloatingPointError
        A non-finite loss or gradient at an evaluated point (naming the parameters).
    ValueError
        Bounds or start of the wrong length, or a lower bound above an upper bound.
    """
    from scipy.optimize import minimize

    from ..utils import is_root

    stage = objective.stage
    tab, dtype, comm = stage.table, stage.pm.dtype, stage.pm.comm
    lo_t, hi_t = raw_bounds(tab)
    lower = lo_t if lower is None else np.asarray(lower, dtype=float)
    upper = hi_t if upper is None else np.asarray(upper, dtype=float)
    x0 = tab.init_raw() if raw0 is None else np.asarray(raw0, dtype=float)
    n = len(tab)
    for name, arr in (("raw0", x0), ("lower", lower), ("upper", upper)):
        if arr.shape != (n,):
            raise ValueError(
                f"{name}: {n} values expected ({', '.join(tab.names)}), got {arr.shape}"
            )
    if np.any(lower > upper):
        bad = [
            f"{nm}: {a:g} > {b:g}"
            for nm, a, b in zip(tab.names, lower, upper, strict=True)
            if a > b
        ]
        raise ValueError(f"lower bound above upper bound: {'; '.join(bad)}")
    x0 = np.clip(x0, lower, upper)
    bounds = [
        (None if math.isinf(a) else float(a), None if math.isinf(b) else float(b))
        for a, b in zip(lower, upper, strict=True)
    ]

    history: list[dict] = []
    best = {"raw": x0.copy(), "step": -1, "losses": {"validation": math.inf}}
    state = {"iteration": 0, "x": None, "value": None}
    bar = None
    if progress and is_root(comm):
        from tqdm.auto import tqdm

        bar = tqdm(total=maxiter, desc="L-BFGS-B", unit="it", file=sys.stderr, dynamic_ncols=True)

    def fun(x):
        x = np.asarray(x, dtype=float)
        if state["x"] is not None and np.array_equal(x, state["x"]):
            return state["value"]
        t0 = time.perf_counter()
        losses, g = objective.value_and_grad(jnp.asarray(x, dtype=dtype))
        losses = {k: float(v) for k, v in losses.items()}
        g = np.asarray(g, dtype=np.float64)
        if not (np.isfinite(losses["train"]) and np.all(np.isfinite(g))):
            raise FloatingPointError(
                f"non-finite loss or gradient at L-BFGS-B evaluation {len(history)} "
                f"(losses {losses}); parameters {tab.as_dict(x)}"
            )
        step = len(history)
        rec = {
            "step": step,
            "iteration": state["iteration"],
            **losses,
            "seconds": time.perf_counter() - t0,
            "params": tab.as_dict(x),
        }
        history.append(rec)
        if losses["validation"] < best["losses"]["validation"]:
            best.update(raw=x.copy(), step=step, losses=losses)
            if on_best is not None:
                on_best(x.copy(), step, losses)
        if log is not None:
            log(rec)
        state.update(x=x.copy(), value=(losses["train"], g))
        return state["value"]

    def callback(*_args, **_kw):
        state["iteration"] += 1
        if bar is not None:
            last = history[-1]
            bar.set_postfix(train=f"{last['train']:.4g}", val=f"{last['validation']:.4g}")
            bar.update(1)

    options = {"maxiter": int(maxiter)}
    if maxfun is not None:
        options["maxfun"] = int(maxfun)
    try:
        res = minimize(
            fun, x0, method="L-BFGS-B", jac=True, bounds=bounds, callback=callback, options=options
        )
    finally:
        if bar is not None:
            bar.close()
    final = objective.losses(jnp.asarray(res.x, dtype=dtype))
    return TrainResult(
        np.asarray(res.x, dtype=float),
        np.asarray(best["raw"]),
        int(best["step"]),
        dict(best["losses"]),
        history,
        False,
        final_losses=final,
        final_step=int(res.nit),
        opt_state=res,
    )


__all__ = ["fit_lbfgsb", "raw_bounds"]
