"""Training one stage: optax Adam with the eq-16 schedule, projection onto the bounds, metrics log,
atomic checkpoints, exact resume, best-by-validation parameters, optional early stopping.

Resume is exact: the checkpoint holds every piece of loop state (the raw parameters, Adam's state
with the schedule position, the step, the best parameters so far, the early-stopping counter, the
history; there is no random state), and every operation of a step is deterministic, so a run killed
at any step and resumed from its last checkpoint ends bit-identical to an uninterrupted one
(tested at several kill points, with and without early stopping).

A run knows what it is: its checkpoint, written before the first step, records the fingerprint of
its inputs, model, engine, configuration and start (initial parameters, continued step and
optimiser state; :func:`run_fingerprint`), and resuming anything else is refused with what differs
(:class:`RunMismatchError`). The work directory is locked while a run trains; SIGINT/SIGTERM save a
checkpoint at the current step and raise :class:`TrainingInterrupted`; a finished run is not
trained again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..model.pipeline import Stage
from ..utils import (
    ForeignOutputError,
    atomic_write,
    fault_point,
    fingerprint_array,
    is_root,
    json_safe,
    root_only,
    run_lock,
)
from .loss import (
    SELECTION_RULES,
    mask_cells,
    masked_losses,
    selection_losses,
    selection_score,
    smoothing_filter,
    split_masks,
)
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
        Early stopping: stop after this many steps without a better selection score.
    select : str
        How the kept parameters are chosen among the steps (:data:`loss.SELECTION_RULES`).
        Default ``"train+validation"``: measured on two seeds of an unseen 64^3, z = 3 suite
        (benchmarks/selection_rules.py, results/selection_rules.json), the validation loss alone
        kept step 193 of 500 on one seed (unseen-seed k_10pct 3.06 h/Mpc instead of 3.53), the
        smoothed validation loss kept step 124 on the other (same-seed 3.69 instead of 4.16),
        the loss over both regions kept the better step on both.
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
    select: str = "train+validation"
    progress: bool = True

    def p_for(self, target: str) -> int:
        if self.select not in SELECTION_RULES:
            raise ValueError(f"select must be one of {SELECTION_RULES}, got {self.select!r}")
        p = self.loss_p if self.loss_p is not None else (2 if target == "dm" else 1)
        if p not in (1, 2):
            raise ValueError(f"loss_p must be 1 or 2, got {p}")
        return p

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: compiled step functions shared by the Objectives of one static configuration (key: the model's
#: ``static_key()`` and the loss power), at most :data:`_STEP_CACHE_SIZE` configurations, the least
#: recently used dropped first
_STEP_CACHE: dict = {}
_STEP_CACHE_SIZE = 16

#: traces of the step functions by kind (``"value_and_grad"``, ``"losses"``): on an engine that
#: compiles, one trace is one compilation (both engines compile: :meth:`ParticleMesh.jit`)
TRACES: dict = {"value_and_grad": 0, "losses": 0}


def _model_key(model):
    """The model's ``static_key()``, or None (its functions are then not shared)."""
    key = getattr(model, "static_key", None)
    return None if key is None else key()


def _step_functions(model, p: int, jit) -> tuple:
    """``(value_and_grad, losses)`` of ``model``, both taking ``(raw, data)`` (see :class:`Objective`).

    ``model`` serves as a template: its arrays (a composed model's ``field2``) come from ``data``.
    The losses are summed over ``data["pairs"]`` (one (input, target) pair: the sum of one): each
    pair's value and gradient are computed in turn and added, the next pair starting once the
    previous gradient is done (an optimisation barrier), so that the step holds one pair's
    intermediate meshes at a time, not all of them.
    """

    def pair_losses(raw, pair, data):
        m = model.with_field2(data["field2"]) if "field2" in data else model
        F = m.forward(pair["pos"], raw, star=pair.get("star"), density0=pair["density0"])
        # in units of the map's amplitude (see Objective): unit-free losses and gradients
        F, target = F / data["unit"], pair["target"] / data["unit"]
        cells = data.get("cells")
        out = masked_losses(m.pm, F, target, data["masks"], p, data.get("filt"), cells)
        out |= selection_losses(m.pm, F, target, data["masks"], p, cells)
        return out["train"], out

    def summed(fn, raw, data):
        """``fn(raw, pair, data)`` -> (value, out dict) or ((value, out), grad), summed over pairs."""
        total = None
        for pair in data["pairs"]:
            if total is not None:  # the next pair waits for the previous one's result
                total, pair = jax.lax.optimization_barrier((total, pair))
            res = fn(raw, pair, data)
            total = res if total is None else jax.tree_util.tree_map(jnp.add, total, res)
        return total

    def value_and_grad(raw, data):
        TRACES["value_and_grad"] += 1
        return summed(jax.value_and_grad(pair_losses, has_aux=True), raw, data)

    def losses_only(raw, data):
        TRACES["losses"] += 1
        return summed(pair_losses, raw, data)[1]

    return jit(value_and_grad), jit(losses_only)


def _shared_step_functions(model, p: int) -> tuple:
    """:func:`_step_functions` of ``model``, cached by its static configuration when it has one."""
    key = _model_key(model)
    if key is None:
        return _step_functions(model, p, model.pm.jit)
    key = (key, p)
    fns = _STEP_CACHE.pop(key, None)
    if fns is None:
        template = model.with_field2(None) if hasattr(model, "with_field2") else model
        fns = _step_functions(template, p, model.pm.jit)
    _STEP_CACHE[key] = fns  # (re)inserted last: the most recently used
    while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        del _STEP_CACHE[next(iter(_STEP_CACHE))]
    return fns


def _as_pairs(pos, target, star) -> tuple[list, list, list]:
    """``pos``, ``target``, ``star`` as equal-length lists (one array each: lists of one)."""
    many = isinstance(pos, list | tuple)
    if isinstance(target, list | tuple) != many:
        raise ValueError(
            "pos and target must both be arrays (one simulation) or both lists of arrays "
            f"(several), found {type(pos).__name__} and {type(target).__name__}"
        )
    positions = list(pos) if many else [pos]
    targets = list(target) if many else [target]
    if star is None:
        stars = [None] * len(positions)
    else:
        stars = list(star) if isinstance(star, list | tuple) else [star]
    if not positions:
        raise ValueError("no (input, target) pair: give at least one simulation")
    if not len(positions) == len(targets) == len(stars):
        raise ValueError(
            f"{len(positions)} input particle sets, {len(targets)} target maps and "
            f"{len(stars)} stellar maps: expected one of each per simulation"
        )
    return positions, targets, stars


def pair_label(i: int, n: int) -> str:
    """How messages and fingerprints name pair ``i`` of ``n``: ``""`` for one, else `` i+1``."""
    return "" if n == 1 else f" {i + 1}"


class Objective:
    """Losses of one stage on its target maps, in every region, and the train-loss gradient.

    Compile once, run many: the particles, targets, masks, filter and (HI) stellar maps are
    *arguments* of the compiled functions (:attr:`data`), not constants baked into them, and the
    compiled functions are shared by every Objective of the same static configuration (engine
    mesh and box, stage configuration and parameter scales, loss power): a new simulation, a
    resumed run or another target of the same shapes reuses the compiled step. On the MPI engine
    (no ``static_key``) each Objective compiles its own step, once.

    Several simulations: ``pos`` and ``target`` (and ``star``) may be lists, one entry per
    (input, target) pair, e.g. several hydro boxes; every loss is then the sum of the pairs'
    losses, and the gradient the sum of their gradients. One pair is the list of one: the same
    compiled code path (:func:`_step_functions`). Pairs may have different particle counts; all
    share the stage's mesh, box, masks and loss unit.

    Parameters
    ----------
    stage : Stage or ComposedModel
        The model (anything with ``pm``, ``config``, ``table`` and ``forward``).
    pos : (N, 3) array, or list of them
        Input particles (for stellar and HI: the DM-improved ones), one set per simulation.
    target : real mesh, or list of them
        Reference maps on the engine's local mesh, in the order of ``pos``.
    config : TrainConfig
    star : real mesh, or list of them, optional
        HI: the frozen stellar maps, in the order of ``pos``.

    Attributes
    ----------
    stage, pm, p, pos, target, star : as given (``p``: the loss power of ``config``)
    n_pairs : int
        Number of (input, target) pairs.
    pairs : list of dict
        Per pair: ``pos``, ``target``, ``star`` (or None) and ``density0``.
    masks : dict
        ``train``, ``validation`` and ``test`` masks of ``config.split``.
    filt : complex mesh or None
        The eq-11 smoothing filter (None without smoothing).
    density0 : real mesh, or list of them
        ``pm.density(pos)`` of each pair, painted once (a list when ``pos`` is).
    unit : float
        The map's amplitude (``stage.config.amplitude``): every loss is that of ``F / unit``
        against ``target / unit``, i.e. in units of ``amplitude^p``.
    data : dict
        The arrays passed to the compiled functions: ``pairs`` (a tuple of dicts of ``pos``,
        ``target``, ``density0`` and, for HI, ``star``), ``masks``, ``unit`` and, when present,
        ``filt`` and a composed model's ``field2``. Built once here: replacing an attribute
        afterwards does not change what is computed (make a new Objective: it reuses the compiled
        step).
    """

    def __init__(self, stage: Stage, pos, target, config: TrainConfig, star=None):
        pm = stage.pm
        positions, targets, stars = _as_pairs(pos, target, star)
        n, kind = len(positions), stage.config.target
        for i, (x, t, st) in enumerate(zip(positions, targets, stars, strict=True)):
            label = pair_label(i, n)
            check_particles(x, pm, f"input particles{label}")
            check_target(t, pm, kind, f"{kind} target{label}")
            if kind == "hi":
                if st is None:
                    raise ValueError("the HI stage needs the frozen stellar map (star=...)")
                check_target(st, pm, "stellar", f"stellar map for the HI stage{label}")
        self.stage, self.pm = stage, pm
        self.pos, self.target, self.star = pos, target, star
        self.n_pairs = n
        self.p = config.p_for(kind)
        self.masks = split_masks(pm, config.split)
        self.filt = smoothing_filter(pm, config.smoothing_n)

        # The input particles do not depend on the parameters: paint them once, not every step.
        self.pairs = [
            {"pos": x, "target": t, "star": st, "density0": pm.density(x)}
            for x, t, st in zip(positions, targets, stars, strict=True)
        ]
        many = isinstance(pos, list | tuple)
        self.density0 = [q["density0"] for q in self.pairs] if many else self.pairs[0]["density0"]

        # Losses are measured in units of the map's amplitude (StageConfig.amplitude, 1 for DM
        # and unscaled models): with the amplitude as the unit of w and b as well, a map and the
        # same map in other units train identically, and raw gradients stay O(1) instead of
        # falling below Adam's epsilon (1e-8) for maps in small units (n_HI in cm^-3, 1e-11).
        self.unit = float(getattr(stage.config, "amplitude", 1.0))
        pairs = []
        for q in self.pairs:
            arrays = {
                "pos": jnp.asarray(q["pos"]),
                "target": jnp.asarray(q["target"]),
                "density0": q["density0"],
            }
            if q["star"] is not None:
                arrays["star"] = jnp.asarray(q["star"])
            pairs.append(arrays)
        data = {
            "pairs": tuple(pairs),
            "masks": self.masks,
            "cells": mask_cells(pm, self.masks),
            "unit": jnp.asarray(self.unit, dtype=pm.dtype),
        }
        if self.filt is not None:
            data["filt"] = self.filt
        if getattr(stage, "field2", None) is not None:
            data["field2"] = jnp.asarray(stage.field2)
        self.data = data
        self._value_and_grad, self._losses = _shared_step_functions(stage, self.p)

    def value_and_grad(self, raw):
        """``(losses by region, gradient of the train loss)`` at raw parameters, summed over pairs."""
        (_, out), g = self._value_and_grad(raw, self.data)
        return out, g

    def losses(self, raw) -> dict:
        """Losses by region (no gradient), summed over pairs."""
        return {k: float(v) for k, v in self._losses(raw, self.data).items()}


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`: final and best-by-validation raw parameters, and the history."""

    raw: np.ndarray
    best_raw: np.ndarray
    best_step: int
    best_losses: dict
    history: list
    stopped_early: bool = False
    #: losses of the final parameters (``raw``), evaluated after the last update
    final_losses: dict | None = None
    #: number of updates behind ``raw``
    final_step: int = 0
    #: True when the run in the work directory had already finished: nothing was trained
    already_done: bool = False
    #: the optimiser's state after the last update (e.g. to write the JERALD reference's optstate)
    opt_state: object = None


def _opt(config: TrainConfig):
    return optax.adam(paper_schedule(config.eta0, config.eta_final, config.tau))


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :func:`train` between two steps, after it saved a checkpoint.

    Attributes
    ----------
    signum : int
        The signal (``signal.SIGINT`` or ``signal.SIGTERM``).
    step : int
        Steps done (and saved, when there is a checkpoint).
    checkpoint : Path or None
        The checkpoint written at ``step``; None without a ``workdir``.
    exit_status : int
        ``128 + signum``: 130 for SIGINT, 143 for SIGTERM (the shell convention).
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None = None):
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        self.exit_status = 128 + self.signum
        name = signal.Signals(self.signum).name
        if checkpoint is None:
            saved = "no workdir, nothing saved"
        else:
            saved = f"checkpoint {checkpoint} saved; run the same command again to resume"
        super().__init__(f"{name}: training stopped after step {step} ({saved})")


class RunMismatchError(ValueError):
    """The checkpoint in the work directory belongs to another run (inputs, model or config)."""


#: TrainConfig fields that do not change what a step computes: left out of the run fingerprint
#: (``steps`` may be extended when resuming).
RESUMABLE_FIELDS = ("steps", "progress", "checkpoint_every")
CHECKPOINT_FORMAT = "jerald_nbk.checkpoint/2"
_CKPT_KEYS = ("step", "raw", "opt_0")


def run_fingerprint(
    objective: Objective,
    config: TrainConfig,
    inputs: dict | None = None,
    start: dict | None = None,
) -> dict:
    """What a training run is: its inputs, model, engine and training configuration.

    Parameters
    ----------
    objective : Objective
        Its input particles, target map and (HI) stellar map are fingerprinted by content
        (:func:`jerald_nbk.utils.fingerprint_array`; under MPI one fingerprint per rank's share),
        those of every pair when it has several (``particles 2``, ``target 2``, ...).
    config : TrainConfig
        Every field except :data:`RESUMABLE_FIELDS`.
    inputs : dict, optional
        What the caller knows of the inputs, e.g. ``{"particles": fingerprint_file(path), ...}``
        (:func:`jerald_nbk.utils.fingerprint_file`) and settings such as a target scale. Entries
        named ``path`` are recorded but not compared.
    start : dict, optional
        Where the run starts: its initial parameters, and the step count and optimiser state it
        continues (``{"given": True, "parameters": {...}, "step": 0, "optimiser state": None}``);
        ``given`` False when the caller named none of them (the defaults), in which case a resume
        continues whatever the checkpoint started from (:func:`fingerprint_differences`).

    Returns
    -------
    dict
        JSON-able ``{"inputs", "model", "engine", "training", "start"}``.
    """
    stage, pm = objective.stage, objective.stage.pm
    arrays = {}
    for i, pair in enumerate(objective.pairs):
        label = pair_label(i, len(objective.pairs))
        arrays[f"particles{label}"] = pair["pos"]
        arrays[f"target{label}"] = pair["target"]
        if pair["star"] is not None:
            arrays[f"stellar map{label}"] = pair["star"]
    found = {name: fingerprint_array(a) for name, a in arrays.items()}
    if pm.comm is not None and pm.comm.size > 1:
        shares = pm.comm.allgather(found)
        found = {name: [s[name] for s in shares] for name in found}
    doc = {
        "inputs": {**found, **(inputs or {})},
        "model": {**dataclasses.asdict(stage.config), "parameters": list(stage.table.names)},
        "engine": {k: v for k, v in pm.describe().items() if k != "threads"},
        "training": {k: v for k, v in config.as_dict().items() if k not in RESUMABLE_FIELDS},
        "start": start or {},
    }
    return json.loads(json.dumps(json_safe(doc)))


def _without_paths(value):
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k != "path"}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return value


def _short(value) -> str:
    """A fingerprint or setting in a few words, for messages."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"{len(value)} rank shares"
    if isinstance(value, dict) and "sha256" in value:
        bits = [str(value["path"])] if "path" in value else []
        if "shape" in value:
            bits.append(f"shape {value['shape']} {value.get('dtype', '')}, sum {value.get('sum')}")
        if "size" in value:
            bits.append(f"{value['size']} bytes")
        return ", ".join(bits + [f"content {value['sha256'][:8]}"])
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """What differs between two :func:`run_fingerprint` records, one line per item.

    Parameters
    ----------
    old, new : dict
        The checkpoint's record and the current run's.

    Returns
    -------
    list of str
        ``"<section> <item>: <old> in the checkpoint, <new> now"``; empty when they agree.
    """
    out = []
    for section in ("inputs", "model", "engine", "training", "start"):
        a, b = old.get(section, {}), new.get(section, {})
        if section == "start":
            # compared when the new run names its start (a resume that does not continues the
            # checkpoint's), and only if the checkpoint recorded one (older versions did not)
            if section not in old or not b.get("given", True):
                continue
            a, b = ({k: v for k, v in x.items() if k != "given"} for x in (a, b))
        for key in sorted(set(a) | set(b)):
            if key not in a:
                out.append(f"{section} {key}: absent in the checkpoint, {_short(b[key])} now")
            elif key not in b:
                out.append(f"{section} {key}: {_short(a[key])} in the checkpoint, absent now")
            elif _without_paths(a[key]) != _without_paths(b[key]):
                out.append(
                    f"{section} {key}: {_short(a[key])} in the checkpoint, {_short(b[key])} now"
                )
    return out


def _json_bytes(obj) -> np.ndarray:
    def scalar(o):
        if hasattr(o, "item"):
            return o.item()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return np.frombuffer(json.dumps(obj, default=scalar).encode(), dtype=np.uint8)


def _from_json_bytes(arr) -> object:
    return json.loads(np.asarray(arr, dtype=np.uint8).tobytes().decode())


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray | jax.Array)


def _save_checkpoint(
    path: Path,
    step,
    raw,
    opt_state,
    best,
    comm=None,
    *,
    since_best: int = 0,
    stopped: bool = False,
    history=(),
    fingerprint: dict | None = None,
):
    """Write every piece of loop state (``best`` is stored as it is, whatever its keys)."""
    with root_only(comm, f"writing {path}") as root:
        if root:
            _write_checkpoint(
                path, step, raw, opt_state, best, since_best, stopped, history, fingerprint
            )


def _write_checkpoint(path, step, raw, opt_state, best, since_best, stopped, history, fingerprint):
    leaves = jax.tree_util.tree_leaves(opt_state)
    arrays = {f"opt_{i}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays.update({f"best_{k}": np.asarray(v) for k, v in best.items() if _is_array(v)})
    arrays.update(
        format=np.array(CHECKPOINT_FORMAT),
        step=np.int64(step),
        raw=np.asarray(raw),
        best_json=_json_bytes({k: v for k, v in best.items() if not _is_array(v)}),
        since_best=np.int64(since_best),
        stopped=np.bool_(stopped),
        history=_json_bytes(list(history)),
        fingerprint=_json_bytes(fingerprint),
        finished=np.bool_(False),
    )
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **arrays)


class _CheckpointUnreadable(ValueError):
    pass


def _read_npz(path: Path) -> dict:
    """All arrays of a checkpoint, or :class:`_CheckpointUnreadable` naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: np.array(z[k]) for k in z.files}
    except Exception as err:  # noqa: BLE001 - zip, pickle, OS and format errors alike
        raise _CheckpointUnreadable(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {err})"
        ) from None
    missing = [k for k in _CKPT_KEYS if k not in data]
    if missing:
        raise _CheckpointUnreadable(
            f"checkpoint {path} is not a jerald-nbk checkpoint (no {missing})"
        )
    return data


def _load_checkpoint(path: Path, opt_state_template) -> dict:
    """The loop state of a checkpoint: step, raw, opt_state, best, since_best, stopped, history,
    fingerprint (None for checkpoints of older versions), finished and the stored result."""
    z = _read_npz(path)
    leaves, treedef = jax.tree_util.tree_flatten(opt_state_template)
    try:
        new = [jnp.asarray(z[f"opt_{i}"], dtype=np.asarray(x).dtype) for i, x in enumerate(leaves)]
    except KeyError:
        raise _CheckpointUnreadable(
            f"checkpoint {path}: the optimiser state does not match this optimiser"
        ) from None
    state = {
        "step": int(z["step"]),
        "raw": np.array(z["raw"]),
        "opt_state": jax.tree_util.tree_unflatten(treedef, new),
        "fingerprint": None,
        "finished": False,
        "result": None,
    }
    if "format" not in z:  # written before runs knew what they were
        return state
    best = _from_json_bytes(z["best_json"])
    best.update({k[5:]: z[k] for k in z if k.startswith("best_") and k != "best_json"})
    state.update(
        best=best,
        since_best=int(z["since_best"]),
        stopped=bool(z["stopped"]),
        history=_from_json_bytes(z["history"]),
        fingerprint=_from_json_bytes(z["fingerprint"]),
        finished=bool(z["finished"]),
    )
    if state["finished"]:
        plain = _from_json_bytes(z["result_json"])
        arrays = {k[7:]: z[k] for k in z if k.startswith("result_") and k != "result_json"}
        state["result"] = {**plain, **arrays}
    return state


#: TrainResult fields a finished checkpoint does not store: they are its loop state
_RESULT_FROM_STATE = ("history", "already_done", "opt_state")


def _mark_finished(path: Path, result: TrainResult, comm=None) -> None:
    """Add the run's result to its final checkpoint: a re-run then has nothing to do."""
    with root_only(comm, f"writing {path}") as root:
        if root:
            _write_finished(path, result)


def _write_finished(path: Path, result: TrainResult) -> None:
    data = _read_npz(path)
    plain = {}
    for f in dataclasses.fields(TrainResult):
        if f.name in _RESULT_FROM_STATE:
            continue
        value = getattr(result, f.name)
        if _is_array(value):
            data[f"result_{f.name}"] = np.asarray(value)
        else:
            try:
                _json_bytes(value)
            except (TypeError, ValueError):
                continue  # not storable: a re-run recomputes the end instead of reusing it
            plain[f.name] = value
    data["result_json"] = _json_bytes(plain)
    data["finished"] = np.bool_(True)
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **data)


def _say(comm, text: str) -> None:
    if is_root(comm):
        print(text, file=sys.stderr, flush=True)


def _open_run(
    ckpt: Path, metrics: Path, opt_state, fingerprint, config, resume, force, overwrite, comm=None
):
    """Decide how a run in ``ckpt.parent`` starts: the checkpoint's state, None (afresh), or a
    finished run's :class:`TrainResult`. Refuses what it must not resume or replace."""
    workdir = ckpt.parent
    state = None
    if ckpt.exists():
        try:
            state = _load_checkpoint(ckpt, opt_state)
        except _CheckpointUnreadable as err:
            if not overwrite:
                raise ForeignOutputError(
                    f"{err}: delete it to start afresh, or pass overwrite=True (--overwrite on "
                    "the command line) to replace it"
                ) from None
    elif metrics.exists() and not overwrite:
        raise ForeignOutputError(
            f"{metrics} exists but {workdir} holds no checkpoint: it is not a jerald-nbk training "
            "directory (or one of an older version). Choose another output directory, delete it, "
            "or pass overwrite=True (--overwrite on the command line)"
        )
    if state is None or not resume:
        return None
    afresh = "start afresh with resume=False (jerald train --no-resume), which discards its state"
    if state["fingerprint"] is None:
        raise RunMismatchError(
            f"checkpoint {ckpt} does not record which run it belongs to (an older version wrote "
            f"it): {afresh}, or use another output directory"
        )
    diffs = fingerprint_differences(state["fingerprint"], fingerprint)
    if diffs:
        same_params = (
            state["fingerprint"]["model"].get("parameters") == fingerprint["model"]["parameters"]
        )
        head = f"the run in {workdir} is not the one asked for:\n  " + "\n  ".join(diffs) + "\n"
        if not force or not same_params:
            anyway = (
                ", or continue anyway with force_resume=True (jerald train --force-resume)"
                if same_params
                else " (its parameters differ: it cannot be continued)"
            )
            raise RunMismatchError(f"{head}{afresh}, use another output directory{anyway}")
        warnings.warn(f"{head}continuing anyway (force_resume)", RuntimeWarning, stacklevel=4)
    step = state["step"]
    if step > config.steps and not state["stopped"]:
        raise RunMismatchError(
            f"checkpoint {ckpt} is at step {step}, beyond steps={config.steps}: ask for at least "
            f"{step} steps to continue it, or {afresh}"
        )
    if state["finished"] and (state["stopped"] or step >= config.steps):
        names = {f.name for f in dataclasses.fields(TrainResult)}
        loop_state = {"history": state["history"], "opt_state": state["opt_state"]}
        try:
            result = TrainResult(
                **state["result"],
                **{k: v for k, v in loop_state.items() if k in names},
                already_done=True,
            )
        except TypeError:  # stored by a version with other result fields: recompute the end
            return state
        how = "stopped early" if state["stopped"] else "finished"
        _say(
            comm,
            f"[jerald] the run in {workdir} already {how} at step {step}: nothing to do "
            "(resume=False / --no-resume trains it again)",
        )
        return result
    return state


def is_checkpoint(path) -> bool:
    """True when ``path`` is a readable jerald-nbk training checkpoint (of any version).

    Parameters
    ----------
    path : str or Path
    """
    try:
        _read_npz(Path(path))
    except _CheckpointUnreadable:
        return False
    return True


class _InterruptGuard:
    """SIGINT/SIGTERM handlers that only raise a flag; the loop acts on it between steps.

    Installed only in the main thread. A second signal while the flag is up acts at once
    (KeyboardInterrupt for SIGINT, the previous handler for SIGTERM).
    """

    def __init__(self, comm=None):
        self.comm = comm
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError, OSError):
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        self.restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    def pending(self) -> int | None:
        """The signal received (on any rank: collective under MPI), or None."""
        sig = self.signum
        if self.comm is not None and self.comm.size > 1:
            sig = max(s or 0 for s in self.comm.allgather(sig)) or None
        return sig

    def restore(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()

    def __exit__(self, *exc) -> None:
        self.restore()


def train(
    objective: Objective,
    config: TrainConfig,
    raw0=None,
    workdir: str | os.PathLike | None = None,
    resume: bool = True,
    log=None,
    *,
    inputs: dict | None = None,
    force_resume: bool = False,
    overwrite: bool = False,
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
        Where ``checkpoint.npz`` and ``metrics.jsonl`` go. The directory is locked for the run
        (:func:`jerald_nbk.utils.run_lock`: a second run into it fails naming the first's host and
        pid). The checkpoint records the run's fingerprint (:func:`run_fingerprint`) from the
        start, every loop state, and at the end the result.
    resume : bool
        Continue from the checkpoint in ``workdir``: it must belong to the same run (else
        :class:`RunMismatchError` says what differs); ``config.steps`` may be larger than before.
        A run that had finished (all steps, or stopped early) is not trained again: its stored
        result is returned with ``already_done`` set. False starts afresh.
    log : callable, optional
        Called with each step's record (dict), e.g. for a custom display.
    inputs : dict, optional
        The caller's description of the inputs (paths, file fingerprints, settings), recorded in
        the fingerprint and compared on resume; see :func:`run_fingerprint`.
    force_resume : bool
        Resume even if the inputs, engine or training configuration differ (with a warning).
    overwrite : bool
        Replace a ``checkpoint.npz`` that is unreadable or not ours, or a ``metrics.jsonl``
        without a checkpoint (by default they are an error and left untouched).
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

    Raises
    ------
    TrainingInterrupted
        SIGINT or SIGTERM arrived: the checkpoint is written at the current step first.
    RunMismatchError
        The checkpoint belongs to another run.
    jerald_nbk.utils.RunLockedError
        Another live process trains into ``workdir``.
    jerald_nbk.utils.ForeignOutputError
        ``workdir`` holds files that are not a training run of ours.
    """
    comm = objective.stage.pm.comm
    with contextlib.ExitStack() as stack:
        if workdir is not None:
            stack.enter_context(run_lock(workdir, comm, "training directory"))
        guard = stack.enter_context(_InterruptGuard(comm))
        res = _train(
            objective,
            config,
            raw0,
            workdir,
            resume,
            log,
            guard=guard,
            inputs=inputs,
            force_resume=force_resume,
            overwrite=overwrite,
            opt_state0=opt_state0,
            start_step=start_step,
        )
        if workdir is not None and not res.already_done:
            _mark_finished(Path(workdir) / "checkpoint.npz", res, comm)
        return res


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


def _train(
    objective: Objective,
    config: TrainConfig,
    raw0=None,
    workdir: str | os.PathLike | None = None,
    resume: bool = True,
    log=None,
    *,
    guard: _InterruptGuard | None = None,
    inputs: dict | None = None,
    force_resume: bool = False,
    overwrite: bool = False,
    opt_state0=None,
    start_step: int = 0,
) -> TrainResult:
    """The loop of :func:`train` (which holds the lock and the signal handlers around it)."""
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
    since_best = 0
    stopped = False
    ckpt = metrics = None
    start_record = {
        "given": raw0 is not None or opt_state0 is not None or bool(start_step),
        "parameters": stage.table.as_dict(raw),
        "step": start,
        "optimiser state": None
        if opt_state0 is None
        else [fingerprint_array(np.asarray(a)) for a in jax.tree_util.tree_leaves(opt_state)],
    }
    fingerprint = run_fingerprint(objective, config, inputs, start_record)
    if workdir is not None:
        workdir = Path(workdir)
        ckpt, metrics = workdir / "checkpoint.npz", workdir / "metrics.jsonl"
        state = _open_run(
            ckpt, metrics, opt_state, fingerprint, config, resume, force_resume, overwrite, comm
        )
        if isinstance(state, TrainResult):
            return state
        if state is not None:
            start, opt_state, best = state["step"], state["opt_state"], state["best"]
            since_best, stopped, history = state["since_best"], state["stopped"], state["history"]
            raw = jnp.asarray(state["raw"], dtype=dtype)
        else:  # the run's identity goes on disk before its first step
            _save_checkpoint(ckpt, start, raw, opt_state, best, comm, fingerprint=fingerprint)
        with root_only(comm, f"writing {metrics}") as root:
            if root:  # records past the checkpoint are dropped: they will be recomputed
                with atomic_write(metrics, "w") as fh:
                    fh.write("".join(json.dumps(rec) + "\n" for rec in history))

    fractions = {k: float(v) for k, v in objective.data["cells"].items()}

    def score(losses: dict) -> float:
        if not np.isfinite(losses.get("validation", np.inf)):  # the initial "no best yet"
            return np.inf
        return selection_score(losses, config.select, fractions)

    bar = _progress(config, start, comm)
    schedule = paper_schedule(config.eta0, config.eta_final, config.tau)
    for step in range(start, start if stopped else config.steps):
        fault_point("step")
        t0 = time.perf_counter()
        losses, g = objective.value_and_grad(raw)
        losses = {k: float(v) for k, v in losses.items()}
        if not np.all(np.isfinite(np.asarray(g))) or not np.isfinite(losses["train"]):
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (losses {losses}); "
                f"parameters {stage.table.as_dict(raw)}"
            )
        if score(losses) < score(best["losses"]):
            best = {"raw": np.asarray(raw), "step": step, "losses": losses}
            since_best = 0
        else:
            since_best += 1
        params = stage.table.as_dict(raw)  # the values these losses belong to
        updates, opt_state = opt.update(g, opt_state, raw)
        raw = stage.table.project(optax.apply_updates(raw, updates))
        rec = {
            "step": step,
            "lr": float(schedule(step)),
            **losses,
            "seconds": time.perf_counter() - t0,
            "params": params,
        }
        history.append(rec)
        if metrics is not None:
            with root_only(comm, f"writing {metrics}") as root:
                if root:
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
        stopped = config.patience is not None and since_best >= config.patience
        signum = guard.pending() if guard is not None else None
        if ckpt is not None and (
            stopped
            or signum
            or done == config.steps
            or (config.checkpoint_every and done % config.checkpoint_every == 0)
        ):
            _save_checkpoint(
                ckpt,
                done,
                raw,
                opt_state,
                best,
                comm,
                since_best=since_best,
                stopped=stopped,
                history=history,
                fingerprint=fingerprint,
            )
        if stopped:
            break
        if signum:
            raise TrainingInterrupted(signum, done, ckpt)
    if bar is not None:
        bar.close()
    final = objective.losses(raw)
    last = history[-1]["step"] + 1 if history else start  # history holds resumed steps too
    if score(final) < score(best["losses"]):
        best = {"raw": np.asarray(raw), "step": last, "losses": final}
    if last >= 20 and best["step"] < 0.5 * last and is_root(comm):
        warnings.warn(
            f"the kept parameters are those of step {best['step']} of {last} (selection rule "
            f"{config.select!r}): check the training curves; a few cells of the validation region "
            f"can dominate its loss (see loss.SELECTION_RULES), or training diverged",
            stacklevel=2,
        )
    return TrainResult(
        np.asarray(raw),
        np.asarray(best["raw"]),
        best["step"],
        best["losses"],
        history,
        stopped,
        final_losses=final,
        final_step=last,
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
