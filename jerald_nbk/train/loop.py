"""Training one stage: optax Adam with the eq-16 schedule, projection onto the bounds, metrics log,
atomic checkpoints, exact resume, best-by-validation parameters, optional early stopping.

Resume is exact: the checkpoint holds the raw parameters, Adam's state, the step and the best
parameters so far, and every operation of a step is deterministic, so an interrupted run resumed
from its checkpoint ends with the same parameters as an uninterrupted one (tested).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..model.pipeline import Stage
from ..utils import atomic_write, is_root
from .loss import masked_losses, smoothing_filter, split_masks
from .schedule import paper_schedule
from .validate import check_particles, check_target


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one stage's training; defaults are the paper's.

    Attributes
    ----------
    steps : int
        Adam steps (paper: up to ~500).
    eta0, eta_final, tau : float
        Eq-16 learning-rate schedule.
    loss_p : int or None
        1 (L1) or 2 (L2); None picks the paper's: 2 for DM, 1 for stellar and HI.
    smoothing_n : float
        Exponent of the eq-11 filter (0: off). Paper: 1 for stellar z=0,2 and HI z=5, 0.7 stellar z=5.
    split : {"paper", "ldl"}
        Train/validation/test regions.
    checkpoint_every : int
        Steps between checkpoints (0: never).
    patience : int or None
        Early stopping: stop after this many steps without a better validation loss.
    progress : bool
        Show a progress bar (rank 0 only).
    """

    steps: int = 500
    eta0: float = 0.002
    eta_final: float = 0.02
    tau: float = 100.0
    loss_p: int | None = None
    smoothing_n: float = 0.0
    split: str = "paper"
    checkpoint_every: int = 25
    patience: int | None = None
    progress: bool = True

    def p_for(self, target: str) -> int:
        p = self.loss_p if self.loss_p is not None else (2 if target == "dm" else 1)
        if p not in (1, 2):
            raise ValueError(f"loss_p must be 1 or 2, got {p}")
        return p

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Objective:
    """Losses of one stage on its target map, in every region, and the train-loss gradient.

    Parameters
    ----------
    stage : Stage
    pos : (N, 3) array
        Input particles (for stellar and HI: the DM-improved ones).
    target : real mesh
        Reference map on the engine's local mesh.
    config : TrainConfig
    star : real mesh, optional
        HI: the frozen stellar map.
    """

    def __init__(self, stage: Stage, pos, target, config: TrainConfig, star=None):
        pm = stage.pm
        check_particles(pos, pm, "input particles")
        check_target(target, pm, stage.config.target, f"{stage.config.target} target")
        if stage.config.target == "hi":
            if star is None:
                raise ValueError("the HI stage needs the frozen stellar map (star=...)")
            check_target(star, pm, "stellar", "stellar map for the HI stage")
        self.stage, self.pm = stage, pm
        self.pos, self.target, self.star = pos, target, star
        self.p = config.p_for(stage.config.target)
        self.masks = split_masks(pm, config.split)
        self.filt = smoothing_filter(pm, config.smoothing_n)

        # The input particles do not depend on the parameters: paint them once, not every step.
        self.density0 = pm.density(pos)

        def losses(raw):
            F = stage.forward(self.pos, raw, star=self.star, density0=self.density0)
            out = masked_losses(pm, F, self.target, self.masks, self.p, self.filt)
            return out["train"], out

        self._value_and_grad = pm.jit(jax.value_and_grad(losses, has_aux=True))
        self._losses = pm.jit(lambda raw: losses(raw)[1])

    def value_and_grad(self, raw):
        """``(losses by region, gradient of the train loss)`` at raw parameters."""
        (_, out), g = self._value_and_grad(raw)
        return out, g

    def losses(self, raw) -> dict:
        """Losses by region (no gradient)."""
        return {k: float(v) for k, v in self._losses(raw).items()}


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`: final and best-by-validation raw parameters, and the history."""

    raw: np.ndarray
    best_raw: np.ndarray
    best_step: int
    best_losses: dict
    history: list
    stopped_early: bool = False
    #: the optimiser's state after the last update (e.g. to write the JERALD reference's optstate)
    opt_state: object = None


def _opt(config: TrainConfig):
    return optax.adam(paper_schedule(config.eta0, config.eta_final, config.tau))


def _save_checkpoint(path: Path, step, raw, opt_state, best, comm=None):
    if not is_root(comm):
        return
    leaves = jax.tree_util.tree_leaves(opt_state)
    arrays = {f"opt_{i}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays.update(
        step=np.int64(step),
        raw=np.asarray(raw),
        best_raw=np.asarray(best["raw"]),
        best_step=np.int64(best["step"]),
        best_losses=np.array(json.dumps(best["losses"])),
    )
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **arrays)


def _load_checkpoint(path: Path, opt_state_template):
    with np.load(path) as z:
        leaves, treedef = jax.tree_util.tree_flatten(opt_state_template)
        new = [jnp.asarray(z[f"opt_{i}"], dtype=np.asarray(x).dtype) for i, x in enumerate(leaves)]
        opt_state = jax.tree_util.tree_unflatten(treedef, new)
        best = {
            "raw": np.array(z["best_raw"]),
            "step": int(z["best_step"]),
            "losses": json.loads(str(z["best_losses"])),
        }
        return int(z["step"]), np.array(z["raw"]), opt_state, best


def _given_opt_state(template, given):
    """``given`` (None: ``template``) checked against ``template``'s structure, in its dtypes."""
    if given is None:
        return template
    leaves, treedef = jax.tree_util.tree_flatten(template)
    new, new_def = jax.tree_util.tree_flatten(given)
    same = new_def == treedef
    if not same or any(np.shape(a) != np.shape(b) for a, b in zip(leaves, new, strict=True)):
        raise ValueError(f"opt_state0 {new_def} does not match the optimiser's state {treedef}")
    new = [jnp.asarray(b, dtype=np.asarray(a).dtype) for a, b in zip(leaves, new, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def train(
    objective: Objective,
    config: TrainConfig,
    raw0=None,
    workdir: str | os.PathLike | None = None,
    resume: bool = True,
    log=None,
    opt_state0=None,
    start_step: int = 0,
) -> TrainResult:
    """Fit one stage with Adam (eq 16), projecting onto the bounds after every step.

    Parameters
    ----------
    objective : Objective
    config : TrainConfig
    raw0 : array, optional
        Starting raw parameters (default: the table's initial values).
    workdir : path, optional
        Where ``checkpoint.npz`` and ``metrics.jsonl`` go; with ``resume`` an existing checkpoint
        there is continued from.
    log : callable, optional
        Called with each step's record (dict), e.g. for a custom display.
    opt_state0 : optax state, optional
        Adam state to continue from instead of a fresh one (the structure of ``opt.init``; e.g.
        the JERALD reference's optstate via :func:`jerald_nbk.io.paramfiles.optax_adam_state`).
        A checkpoint resumed from ``workdir`` takes precedence.
    start_step : int
        Steps already taken before ``raw0`` / ``opt_state0`` (the run ends at ``config.steps``).

    Returns
    -------
    TrainResult
        ``best_raw`` are the parameters with the lowest validation loss seen (evaluated before
        each update and once after the last).
    """
    stage = objective.stage
    comm = stage.pm.comm
    dtype = stage.pm.dtype
    raw = jnp.asarray(stage.table.init_raw() if raw0 is None else raw0, dtype=dtype)
    raw = stage.table.project(raw)
    opt = _opt(config)
    opt_state = opt.init(raw)
    start = 0
    if opt_state0 is not None or start_step:  # continue given Adam moments and step count
        opt_state, start = _given_opt_state(opt_state, opt_state0), int(start_step)
    best = {"raw": np.asarray(raw), "step": -1, "losses": {"validation": float("inf")}}
    history: list[dict] = []
    ckpt = metrics = None
    if workdir is not None:
        workdir = Path(workdir)
        if is_root(comm):
            workdir.mkdir(parents=True, exist_ok=True)
        ckpt, metrics = workdir / "checkpoint.npz", workdir / "metrics.jsonl"
        if resume and ckpt.exists():
            start, raw_np, opt_state, best = _load_checkpoint(ckpt, opt_state)
            raw = jnp.asarray(raw_np, dtype=dtype)
            if metrics.exists():  # drop records past the checkpoint: they will be recomputed
                kept = [
                    ln
                    for ln in metrics.read_text().splitlines()
                    if ln and json.loads(ln)["step"] < start
                ]
                history = [json.loads(ln) for ln in kept]
                if is_root(comm):
                    with atomic_write(metrics, "w") as fh:
                        fh.write("".join(ln + "\n" for ln in kept))
        elif is_root(comm) and metrics.exists():
            metrics.unlink()

    bar = _progress(config, start, comm)
    since_best = 0
    stopped = False
    schedule = paper_schedule(config.eta0, config.eta_final, config.tau)
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        losses, g = objective.value_and_grad(raw)
        losses = {k: float(v) for k, v in losses.items()}
        if not np.all(np.isfinite(np.asarray(g))) or not np.isfinite(losses["train"]):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (losses {losses}); "
                f"parameters {stage.table.as_dict(raw)}"
            )
        if losses["validation"] < best["losses"]["validation"]:
            best = {"raw": np.asarray(raw), "step": step, "losses": losses}
            since_best = 0
        else:
            since_best += 1
        updates, opt_state = opt.update(g, opt_state, raw)
        raw = stage.table.project(optax.apply_updates(raw, updates))
        rec = {
            "step": step,
            "lr": float(schedule(step)),
            **losses,
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        if metrics is not None and is_root(comm):
            with open(metrics, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if log is not None:
            log(rec)
        if bar is not None:
            bar.set_postfix(
                train=f"{losses['train']:.4g}",
                val=f"{losses['validation']:.4g}",
                lr=f"{rec['lr']:.4f}",
            )
            bar.update(1)
        done = step + 1
        if (
            ckpt is not None
            and config.checkpoint_every
            and (done % config.checkpoint_every == 0 or done == config.steps)
        ):
            _save_checkpoint(ckpt, done, raw, opt_state, best, comm)
        if config.patience is not None and since_best >= config.patience:
            stopped = True
            break
    if bar is not None:
        bar.close()
    final = objective.losses(raw)
    if final["validation"] < best["losses"]["validation"]:
        best = {"raw": np.asarray(raw), "step": start + len(history), "losses": final}
    return TrainResult(
        np.asarray(raw),
        np.asarray(best["raw"]),
        best["step"],
        best["losses"],
        history,
        stopped,
        opt_state=opt_state,
    )


def _progress(config: TrainConfig, start: int, comm):
    if not config.progress or not is_root(comm):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps,
        initial=start,
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    )
