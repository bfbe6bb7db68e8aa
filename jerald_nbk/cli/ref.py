"""``jerald-ref``: the JERALD reference script's command line (Rigo, Trotta & Viel) on jerald-nbk.

It accepts the reference script's options and files (``JERALD/runJERALD.py`` of maurorigo/JERALD)
and drives the same engine as ``jerald`` (:mod:`jerald_nbk.workflow`): JAX on one process, pmesh
under ``mpiexec``. ``docs/migrating.md`` maps every option and file.

JERALD semantics: eq-7 Green's function for DM, eq 6 for stellar mass and HI, 6th-order Fourier
gradient, the paper's split, Adam with the eq-16 schedule. Differences from the reference script:
``--steps`` (default 500; the script hard-coded 10); the HI normalisation constant is
``--target-scale`` (default: the script's 4e-13, 4e-11, 1e-8 at z = 0, 2, 5; any redshift works
when it is given); ``--n`` defaults to the paper's value for the target and redshift; evaluation
accepts any parameter file whose length fits the target (layers inferred; the script rejected
valid HI files and crashed on stellar ones); the test loss is reported.

Files in ``--outpath`` (``STEM = {target}_Nmesh{N}_Nstep{S}_n{n:.2f}``, the script's names):

* ``STEM_bestparam.txt``: best-by-validation parameters in the reference's own plain-text layout
  (order, signs and scalings of :mod:`jerald_nbk.io.paramfiles`, flavour ``"jerald"``): the script
  reads it with ``--evalpath`` / ``--improvepath``, and so does this command; and
  ``STEM_bestparam.json`` (jerald-nbk's self-describing JSON, for ``jerald paint`` / ``jerald info``);
* ``STEM_optstate.txt``: the reference's optimiser-state file (Adam moments, step count, learning
  rate, final parameters), written at the end of training as the script does; ``--optpath`` of
  either program continues from it;
* ``STEM_map``: the predicted map (bigfile mesh, dataset ``Field``; ``.npy`` with
  ``--map-format npy``). HI maps are multiplied back by ``--target-scale`` (the units of
  ``--refpath``; the script wrote them in its normalised units);
* ``STEM_train/``: the training run, ``checkpoint.npz`` (parameters, Adam state, step, best so
  far), ``metrics.jsonl``, ``params.json``, ``training.png``.

Before anything is computed, the outputs are checked: a map path holding something we did not
write, or a directory where a file goes, is an error naming it (``--overwrite`` replaces it);
the parameter and optimiser-state files are rewritten as the script rewrites them. Maps carry
BoxSize, Nmesh, the catalog's redshift (and scale factor ``Time``) and cosmology, units, the model,
the parameter file and the command. Option values of the wrong sign (``--steps -5``,
``--eta0 0``, ``--redshift -2``) are usage errors.

``--optpath`` takes the reference's ``*_optstate.txt`` (the Adam moments and step count continue;
the parameters are those in its ``params`` section, else the initial values, as the script does),
our ``STEM_train/`` directory or its ``checkpoint.npz`` (exact resume), or a parameter file
(``.txt`` / ``.json``) to start from with a fresh Adam. ``--steps`` counts all steps, those already
taken included: an optstate at ``itr = 10`` with ``--steps 500`` runs steps 10 to 499.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from .common import (
    UsageError,
    add_engine_options,
    check_option_values,
    check_outputs,
    fmt_losses,
    map_path,
    mesh_of,
    positions_from_columns,
    read_target,
    region_losses,
    run_command,
    say,
    train_config,
    write_map,
)

PROG = "jerald-ref"
STAGE = {"dm": "dm", "Mstar": "stellar", "HI": "hi"}
#: the reference script's HI normalisation constants and initial shifts zs, by redshift
HI_SCALE = {0.0: 4e-13, 2.0: 4e-11, 5.0: 1e-8}
HI_SHIFT0 = {0.0: 0.0, 2.0: -1e-3, 5.0: -0.04}


def _by_z(table: dict, z):
    if z is None:
        return None
    for zz, v in table.items():
        if abs(zz - z) < 1e-6:
            return v
    return None


def paper_smoothing(target: str, z) -> float:
    """The paper's smoothing exponent n of a reference target at redshift ``z``.

    Read from the one table of the paper's settings (:func:`jerald_nbk.workflow.paper_defaults`,
    the nearest of the paper's redshifts 0, 2, 5): Mstar 1, 0.7 at z = 5; HI 1 at z = 5, else 0;
    DM 0. Without a redshift (``z`` None): the z = 0 and 2 values (Mstar 1, HI and DM 0).

    Parameters
    ----------
    target : {"dm", "Mstar", "HI"}
    z : float or None

    Returns
    -------
    float
    """
    from ..workflow import paper_defaults

    return paper_defaults(STAGE[target], 0.0 if z is None else z).smoothing_n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "JERALD with the reference script's options and file names, on the jerald-nbk "
            "engine. Optimiser: Adam with the paper's eq-16 schedule (--steps, default 500; "
            "the reference script hard-coded 10 steps)."
        ),
        epilog=(
            "Outputs in --outpath: {target}_Nmesh{N}_Nstep{S}_n{n:.2f}_bestparam.txt (the "
            "reference's plain text) and _bestparam.json (jerald JSON), _optstate.txt (the "
            "reference's optimiser state), _map (the predicted map), _train/ (checkpoint and "
            "metrics). --optpath resumes from _optstate.txt or _train/. Details: docs/migrating.md "
            "and jerald_nbk.cli.ref's docstring."
        ),
    )
    ap.add_argument("--target", choices=list(STAGE), default="dm", help="target field")
    ap.add_argument("--Nbodypath", required=True, help="N-body (FastPM) particle catalog")
    ap.add_argument(
        "--improvepath",
        help="DM parameter file (JERALD plain text or jerald JSON) that improves the particles",
    )
    ap.add_argument("--refpath", help="reference (target) map: bigfile mesh or .npy")
    ap.add_argument(
        "--Mstarpath",
        help="HI: the stellar-mass map (bigfile mesh or .npy, as the reference script reads) or "
        "the trained stellar parameter file (.txt / .json), run on the improved particles",
    )
    ap.add_argument("--Nmesh", type=int, help="mesh resolution (default: the reference map's)")
    ap.add_argument("--BoxSize", type=float, help="box size, Mpc/h (default: the catalog's)")
    ap.add_argument(
        "--Nstep",
        type=int,
        default=None,
        help="displacement layers (default 2; with --evalpath, inferred from the file)",
    )
    ap.add_argument(
        "--n",
        type=float,
        default=None,
        help="smoothing exponent (default: the paper's at the nearest of its redshifts 0, 2, 5; "
        "Mstar 1, 0.7 at z=5; HI 1 at z=5; else 0)",
    )
    ap.add_argument("--outpath", required=True, help="output directory")
    ap.add_argument(
        "--optpath",
        help="resume: the reference's *_optstate.txt (Adam moments, step and parameters "
        "continue), a training directory (STEM_train/) or its checkpoint.npz; or a parameter "
        "file (.txt / .json) to start from",
    )
    ap.add_argument(
        "--evalpath", help="no training: evaluate this parameter file (write the map, losses)"
    )
    ap.add_argument("--redshift", type=float, help="redshift (HI scaling, paper defaults)")
    ap.add_argument("--steps", type=int, default=500, help="Adam steps (default 500)")
    ap.add_argument(
        "--target-scale",
        type=float,
        help="HI: divide the reference map by this (default by --redshift: 4e-13, 4e-11, 1e-8 "
        "at z = 0, 2, 5)",
    )
    ap.add_argument(
        "--no-hi-shift",
        action="store_true",
        help="HI: no shift zs inside eq 13's power (the script always fits it)",
    )
    add_engine_options(ap)
    return ap


def _is_mesh(path) -> bool:
    p = Path(path)
    return p.suffix == ".npy" or p.is_dir()


def _checkpoint_of(optpath) -> Path | None:
    """The checkpoint file an --optpath names, or None when it names a parameter file."""
    p = Path(optpath)
    if p.is_dir():
        ck = p / "checkpoint.npz"
        if not ck.exists():
            raise FileNotFoundError(f"--optpath {p}: no checkpoint.npz in this directory")
        return ck
    if p.suffix == ".npz":
        if not p.exists():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        return p
    return None


def _check_readable(path: Path) -> None:
    """A checkpoint given to --optpath must be one of ours, readable (checked before any work)."""
    from ..train.loop import is_checkpoint

    if not is_checkpoint(path):
        raise ValueError(
            f"checkpoint {path} is unreadable or not a jerald-nbk checkpoint (truncated by a "
            "full disk or a copy cut short?): resume from an intact copy, or start afresh "
            "without --optpath (a parameter file given to --optpath starts from its values)"
        )


def _check_checkpoint(path: Path, n_params: int) -> None:
    _check_readable(path)
    with np.load(path) as z:
        shape = tuple(z["raw"].shape)
    if shape != (n_params,):
        raise ValueError(
            f"checkpoint {path}: {shape[0] if shape else 0} parameters, the model has {n_params} "
            "(different target, --Nstep or HI shift?)"
        )


def _nstep_mismatch(path, n_values: int, layers: int, nstep: int, target: str) -> ValueError:
    per = {"dm": "5*Nstep", "stellar": "5*Nstep + 3", "hi": "10*Nstep + 12 (or + 11)"}[target]
    return ValueError(
        f"parameter file {path}: {n_values} values = {layers} layers, but --Nstep {nstep} "
        f"expects {per}; drop --Nstep to use the file's {layers} layers"
    )


def load_ref_stage(path, target: str, pm, order, nstep=None):
    """A stage from a JERALD reference file (plain text, or the ``params`` of an optstate) or JSON.

    Plain-text files carry no configuration: the number of layers (and the HI shift) follow from
    the length (checked against ``nstep`` when given); order, signs and scalings are the
    reference's (:mod:`jerald_nbk.io.paramfiles`).

    Returns
    -------
    stage : Stage
    raw : numpy array
    """
    from .. import workflow as wf
    from ..io.paramfiles import infer_ref_layers, is_ref_optstate, load_plaintext, plain_length
    from ..model.pipeline import Stage, StageConfig

    path = Path(path)
    if path.suffix == ".json":
        return wf.load_stage(path, pm, target)
    if not path.exists():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    if is_ref_optstate(path):
        stage, state = load_ref_optstate(path, target, pm, order, nstep)
        if state.raw is None:
            raise ValueError(f"optimiser-state file {path} has no 'params' section to evaluate")
        return stage, state.raw
    n_values = plain_length(path)
    layers, shift = infer_ref_layers(n_values, target, path)
    if nstep is not None and layers != nstep:
        raise _nstep_mismatch(path, n_values, layers, nstep, target)
    config = StageConfig(target, layers, order, shift)
    return Stage(pm, config), load_plaintext(path, config, "jerald")


def load_ref_optstate(path, target: str, pm, order, nstep=None):
    """A stage and its :class:`~jerald_nbk.io.paramfiles.RefOptState` from a reference optstate."""
    from ..io.paramfiles import infer_ref_layers, read_ref_optstate, ref_optstate_length
    from ..model.pipeline import Stage, StageConfig

    n_values = ref_optstate_length(path)
    layers, shift = infer_ref_layers(n_values, target, path)
    if nstep is not None and layers != nstep:
        raise _nstep_mismatch(path, n_values, layers, nstep, target)
    config = StageConfig(target, layers, order, shift)
    return Stage(pm, config), read_ref_optstate(path, config)


def _initial_raw(stage, z):
    """The table's initial values, with the reference's initial HI shift zs for the redshift."""
    raw0 = stage.table.init_raw()
    if stage.config.hi_shift:
        raw0[stage.table.index["zs"]] = _by_z(HI_SHIFT0, z) or 0.0
    return raw0


def cmd_ref(args) -> int:
    """Run ``jerald-ref`` (train or evaluate one target); see the module docstring."""
    from .. import workflow as wf
    from ..io import read_catalog
    from ..io.paramfiles import (
        OPTSTATE_SUFFIX,
        is_ref_optstate,
        optax_adam_state,
        ref_optstate_from_optax,
        save_params,
        save_plaintext,
        write_ref_optstate,
    )
    from ..model.params import initial_amplitude
    from ..model.pipeline import Stage, StageConfig
    from ..train.schedule import paper_schedule
    from ..utils import root_only

    t, st = args.target, STAGE[args.target]
    check_option_values(args)
    if not args.evalpath and not args.refpath:
        raise UsageError("training needs the reference map: --refpath MAP (or --evalpath FILE)")
    if t == "HI" and not args.Mstarpath:
        raise UsageError("--target HI needs --Mstarpath (stellar-mass map or parameter file)")
    if args.evalpath and args.optpath:
        raise UsageError("--evalpath and --optpath exclude each other")
    if args.dtype == "f8":  # float64 meshes need JAX's x64 mode, before any JAX array exists
        import jax

        jax.config.update("jax_enable_x64", True)

    # mesh and box: options, else the reference map (Nmesh) and the catalog (BoxSize)
    from .common import detect_dataset

    # the catalog is read once (this rank's share): its header gives the default BoxSize
    comm = wf.default_comm()
    ds = detect_dataset(args.Nbodypath, args.dataset)
    cols, cattrs = read_catalog(
        args.Nbodypath, ("Position",), dataset=ds, comm=comm if comm.size > 1 else None
    )
    nmesh = box = None
    if args.refpath:
        nmesh, mbox = mesh_of(args.refpath)
        box = mbox
        if args.Nmesh is not None and (args.Nmesh,) * 3 != nmesh:
            raise ValueError(f"map {args.refpath}: Nmesh {list(nmesh)} != --Nmesh {args.Nmesh}")
    elif args.Nmesh is not None:
        nmesh = (args.Nmesh,) * 3
    else:
        raise UsageError("no --refpath: pass --Nmesh")
    if args.BoxSize is not None:
        box = args.BoxSize
    elif "BoxSize" in cattrs:
        box = cattrs["BoxSize"]
    elif box is None:
        raise UsageError(f"catalog {args.Nbodypath} records no BoxSize: pass --BoxSize")
    pm = wf.engine(nmesh, box, args.dtype, args.backend)
    z = args.redshift if args.redshift is not None else cattrs.get("redshift")
    z = None if z is None else float(z)
    n = args.n if args.n is not None else paper_smoothing(t, z)
    scale = 1.0
    if t == "HI":
        scale = args.target_scale or _by_z(HI_SCALE, z)
        if scale is None:
            if not args.evalpath:
                raise UsageError(
                    f"HI at redshift {z}: no default normalisation; pass --target-scale "
                    "(the reference divides by 4e-13, 4e-11, 1e-8 at z = 0, 2, 5)"
                )
            scale = 1.0

    # parameter files first: a bad one fails before anything is read in bulk or written
    order = 6
    evaluated = start = optstate = None
    if args.evalpath:
        evaluated = load_ref_stage(args.evalpath, st, pm, order, nstep=args.Nstep)
    elif args.optpath and _checkpoint_of(args.optpath) is None:
        if is_ref_optstate(args.optpath):
            optstate = load_ref_optstate(args.optpath, st, pm, order, nstep=args.Nstep)
        else:
            start = load_ref_stage(args.optpath, st, pm, order, nstep=args.Nstep)
    elif args.optpath:
        _check_readable(_checkpoint_of(args.optpath))
    improve = load_ref_stage(args.improvepath, "dm", pm, order) if args.improvepath else None
    star_stage = None
    if t == "HI" and not _is_mesh(args.Mstarpath):
        star_stage = load_ref_stage(args.Mstarpath, "stellar", pm, order)

    if evaluated is not None:
        config = evaluated[0].config
    elif start is not None:
        config = start[0].config
    elif optstate is not None:
        config = optstate[0].config
    else:
        shift = t == "HI" and not args.no_hi_shift
        config = StageConfig(st, args.Nstep or 2, order, shift)
    nstep = config.n_layers
    out = Path(args.outpath)
    stem = f"{t}_Nmesh{nmesh[0]}_Nstep{nstep}_n{n:.2f}"
    training = evaluated is None
    check_outputs(
        comm if comm.size > 1 else None,
        out,
        "--outpath",
        maps=[map_path(out / f"{stem}_map", args.map_format)],
        files=[out / f"{stem}{s}" for s in ("_bestparam.txt", "_bestparam.json", OPTSTATE_SUFFIX)]
        if training
        else [],
        train_dir=out / f"{stem}_train" if training else None,
        overwrite=args.overwrite,
    )

    # inputs
    pos = positions_from_columns(cols["Position"], cattrs, pm, args.Nbodypath)
    del cols
    if improve is not None:
        say(pm, f"[{PROG}] improving the particles with {args.improvepath}")
        pos = improve[0].displace(pos, improve[1])
    star = None
    if t == "HI":
        if star_stage is not None:
            star = star_stage[0].forward(pos, star_stage[1])
        else:
            star, _ = read_target(args.Mstarpath, pm, "stellar")
    target = None
    if args.refpath:
        target, _ = read_target(args.refpath, pm, "dm" if t == "dm" else t, scale)

    w_init = 1.0
    if st != "dm" and target is not None:
        # the shared rule (the target's mean per cell), kept within the reference's bound w >= 1e-5
        w_init = max(initial_amplitude(float(pm.sum(target)), pm.ncells), 1e-5)
    stage = Stage(pm, config, w_init=w_init)
    cfg = train_config(args, n, "paper")
    prov = {
        "command": " ".join([PROG, *sys.argv[1:]]),
        "Nbodypath": str(args.Nbodypath),
        "improvepath": args.improvepath,
        "refpath": args.refpath,
        "Mstarpath": args.Mstarpath,
        "redshift": z,
        "target_scale": scale,
    }

    if evaluated is not None:
        raw = evaluated[1]
        if target is not None:
            losses = region_losses(pm, stage, pos, target, cfg, raw, star=star)
            say(pm, f"[{PROG}] {t} losses of {args.evalpath}: {fmt_losses(losses)}")
        source = str(args.evalpath)
    else:
        workdir = out / f"{stem}_train"
        raw0, resume = None, False
        if start is not None:
            raw0 = start[1]
        elif optstate is not None:
            raw0 = optstate[1].raw
            if raw0 is None:  # the reference starts from its initial values then
                raw0 = _initial_raw(stage, z)
        elif args.optpath:
            ck = _checkpoint_of(args.optpath)
            _check_checkpoint(ck, stage.n_params())
            resume = True
            dest = workdir / "checkpoint.npz"
            with root_only(pm.comm, f"copying {ck} to {dest}") as root:
                if root and ck.resolve() != dest.resolve():
                    workdir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ck, dest)
                    src_metrics = ck.parent / "metrics.jsonl"
                    if src_metrics.exists():
                        shutil.copyfile(src_metrics, workdir / "metrics.jsonl")
        elif config.hi_shift:
            raw0 = _initial_raw(stage, z)
        say(pm, f"[{PROG}] training {t} ({nstep} layers, {args.steps} Adam steps) -> {workdir}")
        if optstate is not None:
            ost = optstate[1]
            say(
                pm,
                f"[{PROG}] continuing the Adam state of {args.optpath} at step {ost.step}"
                + ("" if ost.step < args.steps else f" (>= --steps {args.steps}: no step left)"),
            )
            lr = float(paper_schedule(cfg.eta0, cfg.eta_final, cfg.tau)(ost.step))
            if ost.lr is not None and not np.isclose(ost.lr, lr, rtol=1e-5):
                say(
                    pm,
                    f"[{PROG}] note: {args.optpath} records the learning rate {ost.lr:g}, the "
                    f"schedule (--eta0, --eta-final, --tau) gives {lr:g} at step {ost.step}; "
                    "using the schedule's",
                )
            # continue the reference's Adam moments and step count
            continued = {
                "provenance": prov | {"start_step": ost.step},
                "resume": False,
                "opt_state0": optax_adam_state(ost),
                "start_step": ost.step,
            }
        else:
            continued = {"provenance": prov, "resume": resume}
        res = wf.fit_stage(
            stage, pos, target, workdir, cfg, raw0, star=star, overwrite=args.overwrite, **continued
        ).result
        raw = res.best_raw
        say(
            pm,
            f"[{PROG}] best validation loss at step {res.best_step}: {fmt_losses(res.best_losses)}",
        )
        txt, js = out / f"{stem}_bestparam.txt", out / f"{stem}_bestparam.json"
        record = prov | {
            "BoxSize": pm.BoxSize.tolist(),
            "Nmesh": list(pm.Nmesh),
            "target": st,
            "layers": nstep,
            "smoothing_n": n,
            "steps": len(res.history),
            "best_step": res.best_step,
            "losses": res.best_losses,
        }
        opt_txt = out / f"{stem}{OPTSTATE_SUFFIX}"
        with root_only(pm.comm, f"writing {txt}") as root:
            if root:
                save_plaintext(txt, config, raw, flavour="jerald")
                if res.opt_state is not None:
                    final = ref_optstate_from_optax(res.opt_state, raw=res.raw)
                    final.lr = float(paper_schedule(cfg.eta0, cfg.eta_final, cfg.tau)(final.step))
                    write_ref_optstate(opt_txt, config, final)
        save_params(js, config, raw, record, comm=pm.comm)
        say(pm, f"[{PROG}] parameters: {txt} and {js}; optimiser state: {opt_txt}")
        source = str(txt)

    pred = stage.forward(pos, raw, star=star) * (scale if t == "HI" else 1.0)
    from ..io.meshes import inherited_attrs

    attrs = {
        **inherited_attrs({"redshift": z} if z is not None else None, cattrs),
        "target": t,
        "parameters": source,
        "model": f"JERALD (Rigo, Trotta & Viel), {PROG} of jerald_nbk",
        "command": " ".join([PROG, *sys.argv[1:]]),
        "units": {"dm": "1+delta (DM mass)", "Mstar": "the reference map's units"}.get(
            t, "the reference map's units (HI: multiplied back by target_scale)"
        ),
        "BoxSize_units": "Mpc/h",
    }
    if t == "HI":
        attrs["target_scale"] = scale
    mpath = write_map(pm, pred, out / f"{stem}_map", attrs, args.map_format, args.overwrite)
    say(pm, f"[{PROG}] map: {mpath}")
    return 0


def main(argv=None) -> int:
    """Entry point of ``jerald-ref``."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, cmd_ref, args)


if __name__ == "__main__":
    sys.exit(main())
