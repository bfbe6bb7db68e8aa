"""File-level workflows shared by the command-line tools and the demo: read inputs, choose the
engine, train a stage, paint maps, measure them.

Every function here works on one process (JAX engine) and under ``mpiexec`` (pmesh engine, each
rank reading its share of the particles); outputs are written by rank 0, atomically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .geometry import BOX_RTOL, box_vector, mesh_vector
from .io.paramfiles import load_params, save_params
from .model.params import initial_amplitude, stellar_start
from .model.pipeline import Pipeline, Stage, StageConfig
from .pm import ParticleMesh, make_pm
from .train.loop import Objective, TrainConfig, TrainResult, train
from .train.validate import check_same_box
from .utils import root_only


def default_comm():
    """MPI.COMM_WORLD (one rank when not started by mpiexec)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def engine(Nmesh, BoxSize, dtype="f4", backend="auto", comm=None) -> ParticleMesh:
    """The particle-mesh engine: JAX on one rank, pmesh under MPI ("auto"), or as named."""
    comm = comm or default_comm()
    if backend == "auto":
        backend = "pmesh" if comm.size > 1 else "jax"
    if backend == "jax" and comm.size > 1:
        raise ValueError(
            f"the JAX engine runs on one process; this run has {comm.size} ranks: use "
            "backend='pmesh' (--backend pmesh on the command line)"
        )
    return make_pm(
        Nmesh, BoxSize, dtype=dtype, backend=backend, comm=comm if backend == "pmesh" else None
    )


def read_particles(path, pm: ParticleMesh, dataset="1"):
    """Positions of a FastPM/nbodykit catalog (this rank's share) as a JAX array, and its attrs.

    Raises a ValueError when the catalog's BoxSize disagrees with the engine's.
    """
    from .io import read_catalog

    cols, attrs = read_catalog(path, columns=("Position",), dataset=dataset, comm=pm.comm)
    if "BoxSize" in attrs:
        check_same_box(
            {"BoxSize": pm.BoxSize}, "the model", {"BoxSize": attrs["BoxSize"]}, f"catalog {path}"
        )
    return jnp.asarray(cols["Position"].astype(pm.dtype)), attrs


def read_map(path, pm: ParticleMesh, scale: float = 1.0):
    """This rank's part of a map file on the engine's mesh (divided by ``scale``), and its attrs.

    The header is read and checked first (Nmesh and BoxSize equal to the engine's); then each
    rank reads only the planes of its own slab (:func:`jerald_nbk.io.read_mesh_slab`), so that no
    rank holds the whole mesh. An error on any rank is raised on every rank.
    """
    from .io import read_mesh_slab

    _, attrs = read_mesh_slab(path, (slice(0, 0),), comm=pm.comm)  # the header only
    nmesh = tuple(int(n) for n in np.atleast_1d(attrs["Nmesh"]))
    if nmesh != tuple(pm.Nmesh):
        raise ValueError(f"map {path}: Nmesh {nmesh} != the model's Nmesh {tuple(pm.Nmesh)}")
    check_same_box(
        {"BoxSize": pm.BoxSize}, "the model", {"BoxSize": attrs["BoxSize"]}, f"map {path}"
    )
    slices = pm.local_slices("real") if hasattr(pm, "local_slices") else None
    arr, attrs = read_mesh_slab(path, slices, comm=pm.comm)
    arr = np.asarray(arr, dtype=pm.dtype) / scale
    return jnp.asarray(arr), attrs


def to_global(pm: ParticleMesh, local) -> np.ndarray:
    """The whole mesh as a numpy array (collective on the MPI engine)."""
    return pm.to_global(local) if hasattr(pm, "to_global") else np.asarray(local)


def box_of(attrs: dict, path) -> np.ndarray:
    """BoxSize from a file's attrs (:func:`jerald_nbk.geometry.box_vector`), or a clear error."""
    if "BoxSize" not in attrs:
        raise ValueError(f"{path}: no BoxSize attribute; pass --box-size")
    return box_vector(attrs["BoxSize"], f"{path}: attribute 'BoxSize'")


def load_stage(path, pm: ParticleMesh, expect: str | None = None) -> tuple[Stage, np.ndarray]:
    """A trained stage from its JSON parameter file, checked against the target and the mesh."""
    config, raw, prov = load_params(path)
    if expect is not None and config.target != expect:
        raise ValueError(f"parameter file {path}: target {config.target!r}, expected {expect!r}")
    where = f"parameter file {path}: provenance"
    for key, have, read in (("BoxSize", pm.BoxSize, box_vector), ("Nmesh", pm.Nmesh, mesh_vector)):
        if key in prov:
            want = read(prov[key], f"{where} {key}")
            if not np.allclose(want, np.asarray(have, dtype=float), rtol=BOX_RTOL):
                raise ValueError(
                    f"parameter file {path}: trained with {key} {want.tolist()}, used with {np.asarray(have).tolist()}"
                )
    return Stage(pm, config), raw


@dataclasses.dataclass
class StageRun:
    """What :func:`train_stage` produced."""

    result: TrainResult
    params_path: Path
    outdir: Path
    stage: Stage


def train_stage(
    pm: ParticleMesh,
    target: str,
    pos,
    target_map,
    outdir,
    n_layers: int = 2,
    train_config: TrainConfig | None = None,
    gradient_order=6,
    hi_shift: bool = False,
    green: str | None = None,
    star=None,
    provenance: dict | None = None,
    resume: bool = True,
    **run,
) -> StageRun:
    """Train one stage on in-memory inputs, writing params, metrics and checkpoints to ``outdir``.

    ``pos`` are the stage's input particles (for stellar and HI: the DM-improved ones), ``star``
    the frozen stellar map for HI. Several simulations: ``pos``, ``target_map`` (and ``star``) as
    lists, one entry per simulation; the losses are summed over them
    (:class:`~jerald_nbk.train.loop.Objective`) and the initial amplitude is the targets' mean. Writes ``params.json`` (best by validation),
    ``params_final.json``, ``metrics.jsonl``, ``checkpoint.npz``, ``training.png`` and
    ``parameters.png``. ``run``: keywords of :func:`fit_stage` (``inputs``, ``force_resume``,
    ``overwrite``, ``opt_state0``, ``start_step``).
    """
    cfg = train_config or TrainConfig()
    amplitude, b_init = 1.0, 0.0
    if target in ("stellar", "hi"):
        maps = target_map if isinstance(target_map, list | tuple) else [target_map]
        total = sum(float(pm.sum(m)) for m in maps) / len(maps)
        amplitude = initial_amplitude(total, pm.ncells)
    if target == "stellar" and amplitude > 1e-30:
        # w and b start at the target's occupancy and mean (params.stellar_start); w's start is
        # also the unit in which the optimiser sees w and b
        amplitude, b_init = _stellar_start(pm, pos, maps, amplitude)
    config = StageConfig(target, n_layers, gradient_order, hi_shift, green, amplitude=amplitude)
    stage = Stage(pm, config, b_init=b_init)
    return fit_stage(
        stage, pos, target_map, outdir, cfg, star=star, provenance=provenance, resume=resume, **run
    )


def _stellar_start(pm: ParticleMesh, pos, maps, target_mean: float) -> tuple[float, float]:
    """:func:`~jerald_nbk.model.params.stellar_start` on the stage's input particles and targets."""
    sims = pos if isinstance(pos, list | tuple) else [pos]
    xs = [pm.density(p) for p in sims]
    cells = pm.ncells * len(xs)
    nonempty = sum(float(pm.sum(jnp.where(m > 0, 1.0, 0.0))) for m in maps) / (
        pm.ncells * len(maps)
    )

    def above(q):
        return sum(float(pm.sum(jnp.where(x > q, 1.0, 0.0))) for x in xs) / cells

    def excess(q):
        return sum(float(pm.sum(jnp.maximum(x - q, 0.0))) for x in xs) / cells

    return stellar_start(above, excess, nonempty, target_mean)


def fit_stage(
    stage: Stage,
    pos,
    target_map,
    outdir,
    train_config: TrainConfig,
    raw0=None,
    star=None,
    provenance: dict | None = None,
    resume: bool = True,
    *,
    inputs: dict | None = None,
    force_resume: bool = False,
    overwrite: bool = False,
    opt_state0=None,
    start_step: int = 0,
) -> StageRun:
    """Train a given stage from ``raw0`` (default: its table's initial values) and write the run.

    ``pos``, ``target_map`` and ``star`` may be lists (several simulations, losses summed; see
    :class:`~jerald_nbk.train.loop.Objective`).

    Writes ``params.json`` (best by validation), ``params_final.json`` (the last step's parameters
    with their own losses), ``metrics.jsonl``, ``checkpoint.npz``, ``training.png`` and
    ``parameters.png`` (every parameter against step) to ``outdir``. The inputs are checked before
    anything is written. ``inputs``, ``force_resume``, ``overwrite``, ``opt_state0`` and
    ``start_step`` are passed to :func:`jerald_nbk.train.train`.
    """
    pm, cfg, outdir = stage.pm, train_config, Path(outdir)
    obj = Objective(stage, pos, target_map, cfg, star=star)
    res = train(
        obj,
        cfg,
        raw0=raw0,
        workdir=outdir,
        resume=resume,
        inputs=inputs,
        force_resume=force_resume,
        overwrite=overwrite,
        opt_state0=opt_state0,
        start_step=start_step,
    )
    prov = {
        "BoxSize": pm.BoxSize.tolist(),
        "Nmesh": list(pm.Nmesh),
        "target": stage.config.target,
        "layers": stage.config.n_layers,
        "smoothing_n": cfg.smoothing_n,
        "steps": len(res.history),
        "best_step": res.best_step,
        "losses": res.best_losses,
        "train_config": cfg.as_dict(),
        "engine": pm.describe(),
        **(provenance or {}),
    }
    path = save_params(outdir / "params.json", stage.config, res.best_raw, prov, comm=pm.comm)
    # the final parameters carry their own losses (evaluated after the last update), not the kept
    # step's
    final = {"final": True, "final_step": res.final_step, "losses": res.final_losses}
    save_params(outdir / "params_final.json", stage.config, res.raw, prov | final, comm=pm.comm)
    with root_only(pm.comm, f"plotting into {outdir}") as root:
        if root and res.history:
            from .analysis.plots import plot_parameter_trajectories, plot_training_curves

            plot_training_curves(
                outdir / "training.png", res.history, title=f"{stage.config.target} stage"
            )
            tab = stage.table
            plot_parameter_trajectories(
                outdir / "parameters.png",
                res.history,
                {n: (lo, hi) for n, lo, hi in zip(tab.names, tab.lower, tab.upper, strict=True)},
                title=f"{stage.config.target} stage: parameters (physical values) against step",
            )
    return StageRun(res, path, outdir, stage)


def pipeline_from_files(pm: ParticleMesh, dm=None, stellar=None, hi=None) -> Pipeline:
    """A :class:`Pipeline` from parameter files (any may be None)."""
    return Pipeline(
        dm=load_stage(dm, pm, "dm") if dm else None,
        stellar=load_stage(stellar, pm, "stellar") if stellar else None,
        hi=load_stage(hi, pm, "hi") if hi else None,
    )


#: the redshifts at which the paper trained JERALD (sec. III)
PAPER_REDSHIFTS = (0.0, 2.0, 5.0)

#: the paper's per-target, per-redshift settings (sec. III): ``{target: {z: (layers,
#: smoothing n)}}`` with the eq-11 smoothing exponent n (0: no smoothing). The one table of them:
#: :func:`paper_defaults` reads it for ``jerald``, ``jerald-ref`` and the demo.
PAPER_SETTINGS = {
    "dm": {0.0: (2, 0.0), 2.0: (2, 0.0), 5.0: (2, 0.0)},
    "stellar": {0.0: (2, 1.0), 2.0: (2, 1.0), 5.0: (3, 0.7)},
    "hi": {0.0: (2, 0.0), 2.0: (2, 0.0), 5.0: (2, 1.0)},
}

#: the paper's loss power per target (eq 10): L2 for DM, L1 for stellar mass and HI (the same rule
#: as :meth:`jerald_nbk.train.TrainConfig.p_for` with ``loss_p=None``)
PAPER_LOSS = {"dm": 2, "stellar": 1, "hi": 1}


def paper_redshift(redshift: float) -> float:
    """The paper's redshift (0, 2 or 5) whose settings apply at ``redshift``: the nearest one.

    Redshifts below 1 map to 0, from 1 up to 3.5 to 2, above 3.5 to 5; a redshift exactly halfway
    (1 or 3.5) takes the lower one.

    Parameters
    ----------
    redshift : float

    Returns
    -------
    float
        One of :data:`PAPER_REDSHIFTS`.
    """
    z = float(redshift)
    if not np.isfinite(z):
        raise ValueError(f"redshift {redshift!r} is not a finite number")
    return min(PAPER_REDSHIFTS, key=lambda zp: (abs(zp - z), zp))


@dataclasses.dataclass(frozen=True)
class PaperDefaults:
    """The paper's settings of one target at one redshift (:func:`paper_defaults`).

    Attributes
    ----------
    target : {"dm", "stellar", "hi"}
    redshift : float
        The redshift asked for.
    paper_redshift : float
        The paper's redshift whose settings these are (:func:`paper_redshift`).
    n_layers : int
        Displacement layers.
    smoothing_n : float
        Eq-11 smoothing exponent (0: off).
    loss_p : int
        1 (L1) or 2 (L2).
    """

    target: str
    redshift: float
    paper_redshift: float
    n_layers: int
    smoothing_n: float
    loss_p: int


def paper_defaults(target: str, redshift: float) -> PaperDefaults:
    """The paper's layers, smoothing exponent and loss for ``target`` at ``redshift``.

    Read from :data:`PAPER_SETTINGS` at the nearest of the paper's redshifts
    (:func:`paper_redshift`): 2 layers, but 3 for stellar mass at z = 5; smoothing n = 1 for
    stellar mass at z = 0, 2 and HI at z = 5, 0.7 for stellar mass at z = 5, else 0; L2 loss for
    DM, L1 otherwise.

    Parameters
    ----------
    target : {"dm", "stellar", "hi"}
    redshift : float

    Returns
    -------
    PaperDefaults
    """
    if target not in PAPER_SETTINGS:
        raise ValueError(f"target {target!r}: expected one of {sorted(PAPER_SETTINGS)}")
    zp = paper_redshift(redshift)
    layers, n = PAPER_SETTINGS[target][zp]
    return PaperDefaults(target, float(redshift), zp, layers, n, PAPER_LOSS[target])


def redshift_of(*attrs: dict) -> float | None:
    """The redshift recorded in file attributes (the first that records one), or None.

    Looks for ``redshift`` (jerald suite, nbodykit), ``Redshift`` (Gadget/TNG headers), then the
    scale factor ``ScalingFactor`` / ``Time`` as FastPM writes it (``z = 1/a - 1``).

    Parameters
    ----------
    *attrs : dict
        Attributes of a catalog, a map, ... in order of precedence.

    Returns
    -------
    float or None
    """
    for a in attrs:
        for key in ("redshift", "Redshift"):
            if key in a:
                return float(np.ravel(a[key])[0])
        for key in ("ScalingFactor", "Time"):
            if key in a and float(np.ravel(a[key])[0]) > 0:
                return 1.0 / float(np.ravel(a[key])[0]) - 1.0
    return None


def paper_settings(target: str, redshift: float, steps: int = 500, progress: bool = True):
    """The paper's per-target settings (sec. III) as (layers, TrainConfig).

    See :func:`paper_defaults`. The TrainConfig's ``loss_p`` is left None, which picks the same
    paper's loss (:data:`PAPER_LOSS`).

    Parameters
    ----------
    target : {"dm", "stellar", "hi"}
    redshift : float
        Mapped to the nearest of the paper's 0, 2, 5.
    steps : int
    progress : bool

    Returns
    -------
    layers : int
    config : TrainConfig
    """
    d = paper_defaults(target, redshift)
    return d.n_layers, TrainConfig(steps=steps, smoothing_n=d.smoothing_n, progress=progress)


@dataclasses.dataclass
class PipelineRun:
    """The three trained stages of :func:`train_pipeline` and the maps they make.

    ``maps``: the maps of the (first) simulation trained on.
    """

    runs: dict
    maps: dict


def train_pipeline(
    pm: ParticleMesh,
    pos,
    targets,
    outdir,
    redshift: float,
    steps: int = 500,
    layers: int | None = None,
    progress: bool = True,
    provenance: dict | None = None,
) -> PipelineRun:
    """Train DM -> stellar -> HI in order, each with the earlier stages frozen (paper fig 1).

    ``targets`` maps ``dm``, ``stellar``, ``hi`` to local target meshes. Stage ``t`` is written to
    ``outdir / f"train_{t}"``. ``layers`` overrides the paper's layer counts. Several
    simulations: ``pos`` a list of particle arrays and ``targets`` a list of such dicts, one per
    simulation; every stage is fitted to all of them, its loss summed over them
    (:func:`train_stage` with lists).
    """
    outdir = Path(outdir)
    prov = {"redshift": redshift, **(provenance or {})}
    many = isinstance(pos, list | tuple)
    sims = list(pos) if many else [pos]
    tmaps = list(targets) if many else [targets]
    if len(tmaps) != len(sims):
        raise ValueError(f"{len(sims)} particle sets but {len(tmaps)} target sets")

    def one_or_all(items):
        return items if many else items[0]

    def settings(t):
        nl, cfg = paper_settings(t, redshift, steps, progress)
        return (layers or nl), cfg

    def fit(t, inputs, star=None):
        nl, cfg = settings(t)
        maps = one_or_all([m[t] for m in tmaps])
        star = None if star is None else one_or_all(star)
        return train_stage(
            pm, t, one_or_all(inputs), maps, outdir / f"train_{t}", nl, cfg, star=star,
            provenance=prov,
        )  # fmt: skip

    runs = {"dm": fit("dm", sims)}
    improved = [runs["dm"].stage.displace(p, runs["dm"].result.best_raw) for p in sims]
    runs["stellar"] = fit("stellar", improved)
    stellar = runs["stellar"]
    star = [stellar.stage.forward(x, stellar.result.best_raw) for x in improved]
    runs["hi"] = fit("hi", improved, star=star)
    return PipelineRun(runs, apply_pipeline(runs, sims[0]))


def apply_pipeline(runs: dict, pos) -> dict:
    """Maps ``dm``, ``stellar``, ``hi`` (local meshes) of trained stages applied to particles."""
    pipe = Pipeline(**{t: (run.stage, run.result.best_raw) for t, run in runs.items()})
    return pipe.maps(pos)
