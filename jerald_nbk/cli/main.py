"""``jerald``: the command line of jerald-nbk.

Subcommands (``jerald <command> --help`` for each):

* ``demo``         build the demo suite, train DM -> stellar -> HI, paint, report (the README's job)
* ``suite``        build a reference suite (FastPM inputs + high-resolution truth maps)
* ``train``        train one stage (dm, stellar or hi) on a catalog and a target map
* ``paint``        paint DM / stellar / HI maps of a catalog with trained parameter files
* ``power``        power spectra, cross power and r(k) of maps, with a plot
* ``report``       figures of merit, plots and a Markdown report of maps against references
* ``make-target``  target maps from Gadget/AREPO/IllustrisTNG HDF5 snapshots
* ``info``         versions and engines, or what a file holds

Every command accepts ``--config FILE`` (JSON or TOML; keys are the long option names with
dashes or underscores) whose values are defaults that flags override. Under ``mpiexec -n N`` the
commands run on the pmesh engine, each rank reading its share of the particles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..model.params import TARGETS

EPILOG = "Run `jerald <command> --help` for a command's options. Docs: README.md."


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON or TOML file of option defaults (flags override)")
    p.add_argument(
        "--backend",
        choices=["auto", "jax", "pmesh"],
        default="auto",
        help="engine (auto: JAX on 1 rank, pmesh under mpiexec)",
    )
    p.add_argument(
        "--dtype",
        choices=["f4", "f8"],
        default="f4",
        help="float32 (default) or float64 (enables JAX's x64 mode itself)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or timings (results and the settings used still print)",
    )


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "training (defaults: the paper's for the target and redshift)",
        "With a redshift (--redshift, or a 'redshift' attribute of the catalog or target map) "
        "--layers, --loss and --smoothing-n default to the paper's values at the nearest of its "
        "redshifts 0, 2, 5 (z < 1 -> 0, 1 <= z <= 3.5 -> 2, z > 3.5 -> 5): layers 2, but 3 "
        "for stellar at z = 5; loss L2 for dm, L1 otherwise; smoothing n 1 for stellar at "
        "z = 0, 2, 0.7 for stellar at z = 5, 1 for hi at z = 5, else 0. Without a redshift: "
        "layers 2, the same loss, n 0. The settings used are printed.",
    )
    g.add_argument("--steps", type=int, default=500, help="Adam steps (default 500)")
    g.add_argument("--eta0", type=float, default=0.002, help="initial learning rate (eq 16)")
    g.add_argument("--eta-final", type=float, default=0.02, help="final learning rate (eq 16)")
    g.add_argument("--tau", type=float, default=100.0, help="schedule time scale in steps (eq 16)")
    g.add_argument(
        "--loss",
        choices=["L1", "L2", "auto"],
        default="auto",
        help="auto (default): the paper's, L2 for dm, L1 otherwise",
    )
    g.add_argument(
        "--smoothing-n",
        type=float,
        default=None,
        help="eq-11 smoothing exponent n (0: off; default: the paper's at the redshift, else 0)",
    )
    g.add_argument(
        "--split", choices=["paper", "ldl"], default="paper", help="train/validation/test regions"
    )
    g.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    g.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early stopping after this many steps without a better validation loss",
    )
    g.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh even if --out holds a checkpoint (its state is discarded)",
    )
    g.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even if the checkpoint's inputs or training options differ from these",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in --out that are not a jerald training run's (default: refuse)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``jerald`` parser (its sub-commands' parsers: :func:`_parsers`)."""
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, dict]:
    """The ``jerald`` parser and its sub-commands' parsers by name."""
    ap = argparse.ArgumentParser(
        prog="jerald",
        description="JERALD for nbodykit: learned displacement layers that turn FastPM particles into hydro-like DM, stellar-mass and HI maps.",
        epilog=EPILOG,
    )
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser(
        "demo",
        help="end-to-end demo on the embedded default",
        description="Build the demo suite (64^3 particles, 40 Mpc/h), train DM -> stellar -> HI at one redshift, paint the maps and write a report with power spectra, r(k), slices and training curves.",
    )
    _add_common(p)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument(
        "--size", default="demo", choices=["smoke", "demo", "bench", "paper"], help="suite size"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--redshift", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=200, help="Adam steps per stage")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="displacement layers per stage (default: the paper's, 2; 3 for stellar mass at z = 5)",
    )

    p = sub.add_parser(
        "suite",
        help="build a reference suite",
        description="FastPM inputs and high-resolution truth maps (DM, stellar mass, HI) from the same phases; see docs/reference-suite.md.",
    )
    _add_common(p)
    p.add_argument("--size", default="smoke", choices=["smoke", "demo", "bench", "paper"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--redshifts", default="5,2,0", help="comma-separated output redshifts")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching suite exists")

    p = sub.add_parser(
        "train",
        help="train one stage",
        description="Train the dm, stellar or hi stage on a particle catalog and a target map. Stellar and HI start from the DM-improved particles (--dm-params); HI also needs the trained stellar stage (--stellar-params). Several simulations: repeat --particles and --target-map (the first catalog goes with the first map, and so on); the loss is summed over the pairs.",
    )
    _add_common(p)
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument(
        "--particles",
        required=True,
        action="append",
        help="FastPM/nbodykit bigfile catalog with Position (Mpc/h); repeat it, with "
        "--target-map, to train on several simulations at once",
    )
    p.add_argument(
        "--dataset",
        default="auto",
        help="catalog dataset holding Position: auto (default: '1' as FastPM writes it, else the "
        "top level as nbodykit's catalog.save writes it), '1', or '' (top level)",
    )
    p.add_argument(
        "--target-map",
        required=True,
        action="append",
        help="target mesh (bigfile 'Field' or .npy); one per --particles, in the same order",
    )
    p.add_argument(
        "--target-scale",
        type=float,
        default=1.0,
        help="divide the target by this (e.g. the HI redshift constant)",
    )
    p.add_argument("--dm-params", help="trained DM parameter file (stellar, hi)")
    p.add_argument("--stellar-params", help="trained stellar parameter file (hi)")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="displacement layers (default: the paper's at the redshift, else 2)",
    )
    p.add_argument("--gradient-order", default="6", choices=["4", "6", "exact"])
    p.add_argument(
        "--hi-shift", action="store_true", help="HI: fit the shift zs inside eq 13's power"
    )
    p.add_argument(
        "--redshift",
        type=float,
        default=None,
        help="redshift of the inputs (default: the catalog's or target map's 'redshift' "
        "attribute): picks the paper's defaults and is recorded in the parameter file",
    )
    p.add_argument(
        "--out", required=True, help="output directory (params.json, metrics.jsonl, checkpoint.npz)"
    )
    _add_training(p)

    p = sub.add_parser(
        "paint",
        help="paint maps with trained parameters",
        description="Paint the DM (1+delta of the improved particles), stellar-mass and HI maps of one or many catalogs and write them as bigfile meshes (and the improved particles as a catalog). Many catalogs are painted with one compilation (one per particle count) and one progress bar; each gets its own sub-folder of --out.",
    )
    _add_common(p)
    p.add_argument(
        "--particles",
        required=True,
        nargs="+",
        metavar="CATALOG",
        help="FastPM/nbodykit bigfile catalog(s): one path, several paths, a quoted glob pattern "
        "('sims/seed*/fastpm_z2'), or @LIST, a text file of catalog paths (one a line; blank "
        "lines and # comments ignored; relative paths from LIST's folder). One plain path writes "
        "its maps into --out itself; several catalogs, a glob or @LIST write each catalog's maps "
        "into --out/NAME, NAME the catalog's folder name (with as many parent folder names, "
        "joined by '_', as make the names unique). All catalogs must have the same BoxSize",
    )
    p.add_argument(
        "--dataset",
        default="auto",
        help="catalog dataset holding Position: auto (default), '1' (FastPM) or '' (top level)",
    )
    p.add_argument(
        "--dm-params", help="DM parameter file (without it, the input particles are used)"
    )
    p.add_argument("--stellar-params")
    p.add_argument("--hi-params")
    p.add_argument("--Nmesh", type=int, help="default: from the parameter files")
    p.add_argument("--box-size", type=float, help="default: from the catalog")
    p.add_argument(
        "--save-particles", action="store_true", help="also write the DM-improved catalog"
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing paths in --out that are not jerald outputs (default: refuse)",
    )

    p = sub.add_parser(
        "power",
        help="power spectra and r(k)",
        description="P(k) of one map, or of several against the first (cross power, ratio, r(k)), as JSON and a PNG.",
    )
    p.add_argument(
        "maps", nargs="+", help="mesh files; the first is the reference when several are given"
    )
    p.add_argument("--labels", help="comma-separated labels")
    p.add_argument(
        "--dk", type=float, default=None, help="bin width in h/Mpc (default 2 pi / BoxSize)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--allow-negative",
        action="store_true",
        help="accept maps with negative cells (delta rather than 1 + delta or a mass)",
    )
    p.add_argument("--config")

    p = sub.add_parser(
        "report",
        help="fidelity report of maps against references",
        description="Figures of merit (k where |P/P_ref - 1| <= 0.1, 0.3; k where r >= 0.9, 0.7), power and slice plots, and report.md.",
    )
    p.add_argument(
        "--pred", action="append", required=True, help="LABEL=MAP: a predicted map (repeatable)"
    )
    p.add_argument("--ref", required=True, help="reference map")
    p.add_argument("--title", default="JERALD fidelity report")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--allow-negative",
        action="store_true",
        help="accept maps with negative cells (delta rather than 1 + delta or a mass)",
    )
    p.add_argument("--config")

    p = sub.add_parser(
        "make-target",
        help="target maps from hydro snapshots",
        description="CIC maps (dm, stellar, gas, nHI, ne, T) from Gadget/AREPO/IllustrisTNG HDF5 snapshots (one or many files), with units converted to Mpc/h.",
    )
    p.add_argument(
        "snapshots",
        nargs="+",
        help="HDF5 snapshot: one file, one chunk (snap_033.0.hdf5 finds its siblings), a "
        "directory, a quoted glob pattern, or every chunk file",
    )
    p.add_argument("--field", required=True, choices=["dm", "stellar", "gas", "nHI", "ne", "T"])
    p.add_argument("--Nmesh", type=int, required=True)
    p.add_argument("--units", default="auto", choices=["auto", "kpc/h", "Mpc/h"])
    p.add_argument("--out", required=True, help="output mesh (bigfile directory or .npy)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not a jerald output (default: refuse)",
    )
    p.add_argument("--config")

    p = sub.add_parser("info", help="versions, engines, or a file's contents")
    p.add_argument("path", nargs="?", help="a parameter file, mesh or catalog")
    p.add_argument("--config")
    return ap, dict(sub.choices)


def parse(argv=None) -> argparse.Namespace:
    """Parse arguments: the command's defaults, then ``--config`` file values, then the flags.

    The merge is :func:`jerald_nbk.cli.common.parse_with_config` (config values count as given:
    an option that is required on the command line (``--particles``, ``--out``, ...) may come from
    the config file instead; flags override config values; a repeated flag replaces a config
    list). Unknown config keys and values of the wrong type are errors naming the file.
    """
    from .common import parse_with_config

    ap, commands = _parsers()
    argv = list(sys.argv[1:] if argv is None else argv)
    # the first word that is not an option is the command (the top level has only flags)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in commands:
        return ap.parse_args(argv)  # --version, --help, or argparse's error for a bad command
    args, cfg_path = parse_with_config(ap, argv, f"jerald {command}", commands[command])
    _check_ranges(args, argv, cfg_path)
    return args


def _check_ranges(args: argparse.Namespace, argv, cfg_path) -> None:
    """:func:`~jerald_nbk.cli.common.check_option_values`, as jerald's other usage errors: exit 1."""
    from .common import UsageError, check_option_values

    try:
        check_option_values(args, argv=argv, cfg_path=cfg_path)
    except UsageError as err:
        raise SystemExit(f"jerald {args.command}: {err}") from None


def _train_config(args):
    from .common import train_config

    return train_config(
        args,
        args.smoothing_n or 0.0,
        args.split,
        loss_p=None if args.loss == "auto" else int(args.loss[1]),
        patience=args.patience,
    )


#: what ``jerald train`` writes into ``--out``
TRAIN_OUTPUTS = (
    "checkpoint.npz",
    "metrics.jsonl",
    "params.json",
    "params_final.json",
    "training.png",
    "parameters.png",
)


def _check_train_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` holding files with our names that are not a training run of ours.

    A directory with a readable jerald checkpoint is a run of ours (resumed or restarted as asked).
    Otherwise any of :data:`TRAIN_OUTPUTS` there is an error naming them, unless ``overwrite``.
    """
    from ..train.loop import is_checkpoint
    from ..utils import ForeignOutputError

    if not out.exists():
        return
    if not out.is_dir():
        raise ForeignOutputError(f"--out {out} is a file, not a directory; it is left untouched")
    ckpt = out / "checkpoint.npz"
    if ckpt.exists() and is_checkpoint(ckpt):
        return
    present = [out / n for n in TRAIN_OUTPUTS if (out / n).exists()]
    if present and not overwrite:
        raise ForeignOutputError(
            f"--out {out} holds {', '.join(map(str, present))} but no jerald training checkpoint: "
            "they are left untouched. Choose another --out, remove them, or pass --overwrite to "
            "replace them"
        )


def cmd_train(args) -> int:
    from ..train.loop import TrainingInterrupted

    if args.no_resume and args.force_resume:
        raise SystemExit("jerald train: --no-resume and --force-resume exclude each other")
    try:
        return _train(args)
    except TrainingInterrupted as err:
        print(f"jerald train: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print(
            f"jerald train: interrupted; the last checkpoint in {args.out} (if any) is kept: run "
            "the same command again to resume",
            file=sys.stderr,
        )
        return 130


def _train_inputs(args) -> dict:
    """What ``jerald train`` knows of its inputs: file fingerprints and settings (run identity)."""
    from ..train.loop import pair_label
    from ..utils import fingerprint_file

    n = len(args.particles)
    files = {}
    for i, (cat, tmap) in enumerate(zip(args.particles, args.target_map, strict=True)):
        files[f"particles file{pair_label(i, n)}"] = cat
        files[f"target map file{pair_label(i, n)}"] = tmap
    files |= {"dm params file": args.dm_params, "stellar params file": args.stellar_params}
    doc = {name: fingerprint_file(path) for name, path in files.items() if path}
    return doc | {"dataset": args.dataset, "target scale": args.target_scale}


def _apply_paper_defaults(args, *attrs) -> str:
    """Fill in ``args.layers``, ``args.smoothing_n`` and ``args.redshift`` as ``jerald train`` runs.

    Options the user gave are kept; the others take the paper's values for the target at the
    redshift (``--redshift``, else the first of ``attrs`` that records one; see
    :func:`jerald_nbk.workflow.paper_defaults`), or layers 2 and n 0 without a redshift.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``jerald train`` options (changed in place).
    *attrs : dict
        Attributes of the catalog and the target map, in that order.

    Returns
    -------
    str
        One line saying which settings run and where each comes from.
    """
    from .. import workflow as wf

    z = args.redshift if args.redshift is not None else wf.redshift_of(*attrs)
    args.redshift = z
    loss_p = wf.PAPER_LOSS[args.target] if args.loss == "auto" else int(args.loss[1])
    if z is None:
        paper, where = {"layers": 2, "smoothing_n": 0.0}, "no redshift: default"
        head = f"{args.target}, redshift unknown (give --redshift for the paper's settings)"
    else:
        d = wf.paper_defaults(args.target, z)
        paper, where = {"layers": d.n_layers, "smoothing_n": d.smoothing_n}, "paper"
        head = f"{args.target} at z = {z:g} (the paper's z = {d.paper_redshift:g})"
    notes = []
    for dest, flag in (("layers", "--layers"), ("smoothing_n", "--smoothing-n")):
        if getattr(args, dest) is None:
            setattr(args, dest, paper[dest])
            notes.append(where)
        else:
            notes.append(flag)
    loss_from = "paper" if args.loss == "auto" else "--loss"
    return (
        f"[jerald] {head}: layers {args.layers} ({notes[0]}), loss L{loss_p} ({loss_from}), "
        f"smoothing n {args.smoothing_n:g} ({notes[1]})"
    )


def _train(args) -> int:
    from .. import workflow as wf
    from ..train.validate import check_particles, check_target
    from ..utils import root_only, run_lock
    from .common import detect_dataset, mesh_of

    if len(args.particles) != len(args.target_map):
        raise ValueError(
            f"{len(args.particles)} --particles but {len(args.target_map)} --target-map: give one "
            "target map per catalog, in the same order"
        )
    # the first map's header gives the mesh (its values are read later, each rank its slab)
    nmesh, box = mesh_of(args.target_map[0])
    pm = wf.engine(nmesh, box, args.dtype, args.backend)
    positions, targets, found_z = [], [], []
    # every pair is read and checked (same Nmesh and BoxSize as the first map) before training
    for cat, tmap in zip(args.particles, args.target_map, strict=True):
        pos, cattrs = wf.read_particles(cat, pm, detect_dataset(cat, args.dataset))
        target_map, tattrs = wf.read_map(tmap, pm, args.target_scale)
        check_particles(pos, pm, f"catalog {cat}: Position")
        check_target(target_map, pm, args.target, f"map {tmap}")
        positions.append(pos)
        targets.append(target_map)
        found_z.append((wf.redshift_of(cattrs, tattrs), cat, tmap))
        if len(positions) == 1:
            first_attrs = (cattrs, tattrs)
    known = [(z, c, t) for z, c, t in found_z if z is not None]
    if args.redshift is None and any(abs(z - known[0][0]) > 1e-6 for z, _, _ in known):
        listed = "; ".join(f"{c} / {t}: z = {z:g}" for z, c, t in known)
        raise ValueError(
            f"the simulations record different redshifts ({listed}); train one redshift at a "
            "time, or pass --redshift to choose the settings"
        )
    settings = _apply_paper_defaults(args, *first_attrs)
    if pm.comm is None or pm.comm.rank == 0:
        print(settings, flush=True)
        if len(positions) > 1:
            print(f"[jerald] {len(positions)} simulations: the loss is their sum", flush=True)
    stars = None
    if args.target in ("stellar", "hi"):
        if not args.dm_params:
            print(
                "jerald train: no --dm-params: the stellar/HI stage starts from the raw input particles",
                file=sys.stderr,
            )
        else:
            dm, raw = wf.load_stage(args.dm_params, pm, "dm")
            positions = [dm.displace(x, raw) for x in positions]
    if args.target == "hi":
        if not args.stellar_params:
            raise SystemExit(
                "jerald train --target hi needs --stellar-params (the frozen stellar stage)"
            )
        st, raw = wf.load_stage(args.stellar_params, pm, "stellar")
        stars = [st.forward(x, raw) for x in positions]
    # one simulation is passed as arrays (the run's fingerprint keeps its one-pair names)
    one = len(positions) == 1
    pos = positions[0] if one else positions
    target_map = targets[0] if one else targets
    star = (stars[0] if one else stars) if stars is not None else None
    order = args.gradient_order if args.gradient_order == "exact" else int(args.gradient_order)
    prov = {
        "particles": str(args.particles[0]) if one else [str(c) for c in args.particles],
        "target_map": str(args.target_map[0]) if one else [str(t) for t in args.target_map],
        "target_scale": args.target_scale,
        "redshift": args.redshift,
        "dm_params": args.dm_params,
        "stellar_params": args.stellar_params,
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    with root_only(pm.comm, "fingerprinting the inputs", share=True) as root:
        if root:
            root.value = _train_inputs(args)
    inputs = root.value
    with run_lock(out, pm.comm, "--out"):
        with root_only(pm.comm, "checking --out") as root:
            if root:
                _check_train_out(out, args.overwrite)
        run = wf.train_stage(
            pm,
            args.target,
            pos,
            target_map,
            out,
            args.layers,
            _train_config(args),
            order,
            args.hi_shift,
            star=star,
            provenance=prov,
            resume=not args.no_resume,
            inputs=inputs,
            force_resume=args.force_resume,
            overwrite=args.overwrite,
        )
    if pm.comm is None or pm.comm.rank == 0:
        r = run.result
        print(
            f"[jerald] {args.target}: best validation loss {r.best_losses['validation']:.6g} at step {r.best_step}; "
            f"test loss {r.best_losses['test']:.6g}"
        )
        print(f"[jerald] parameters: {run.params_path}")
    return 0


#: units of the maps ``jerald paint`` writes (the stellar and HI maps have their targets' units)
MAP_UNITS = {"dm": "1+delta (DM mass)"}


def expand_catalogs(values) -> tuple[list[Path], bool]:
    """The catalogs ``jerald paint --particles`` names, and whether they are "many".

    Parameters
    ----------
    values : list of str
        Paths, glob patterns (expanded in sorted order when no such path exists) and ``@LIST``
        files of paths (one a line; blank lines and ``#`` comments ignored; relative paths from
        the list's folder).

    Returns
    -------
    catalogs : list of Path
    many : bool
        False only for one plain path (its maps go into ``--out`` itself).
    """
    import glob

    out: list[Path] = []
    many = len(values) > 1
    for value in values:
        value = str(value)
        if value.startswith("@"):
            listing = Path(value[1:])
            if not listing.is_file():
                raise FileNotFoundError(f"--particles {value}: list file {listing} does not exist")
            lines = [ln.split("#", 1)[0].strip() for ln in listing.read_text().splitlines()]
            found = [
                listing.parent / ln if not Path(ln).is_absolute() else Path(ln)
                for ln in lines
                if ln
            ]
            if not found:
                raise ValueError(f"--particles {value}: list file {listing} names no catalog")
            out += found
            many = True
        elif not Path(value).exists() and glob.has_magic(value):
            found = sorted(Path(m) for m in glob.glob(value))
            if not found:
                raise FileNotFoundError(f"--particles {value!r}: no catalog matches the pattern")
            out += found
            many = True
        else:
            out.append(Path(value))
    seen: dict = {}
    for path in out:
        key = path.resolve()
        if key in seen:
            raise ValueError(f"--particles: catalog {path} is given twice (also as {seen[key]})")
        seen[key] = path
    return out, many


def catalog_names(paths) -> list[str]:
    """One output sub-folder name per catalog: its folder name, with parents when not unique.

    ``a/seed1/fastpm`` and ``a/seed2/fastpm`` are ``seed1_fastpm`` and ``seed2_fastpm``.
    """
    parts = [Path(p).resolve().parts[1:] or ("catalog",) for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["_".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"--particles: cannot name the outputs of {list(map(str, paths))} apart")


def _catalog_size(path, dataset) -> int | None:
    """Rows of a catalog's Position column (from its header), or None if unreadable."""
    try:
        import bigfile

        with bigfile.File(str(path)) as ff:
            return int(ff[f"{dataset}/Position" if dataset else "Position"].size)
    except Exception:  # noqa: BLE001 - the read itself then says what is wrong
        return None


def _catalog_header(path, dataset, comm) -> dict:
    """A catalog's attributes without its columns (falls back on reading this rank's share)."""
    from ..io import catalogs, read_catalog

    reader = getattr(catalogs, "catalog_attrs", None)
    if reader is not None:
        return reader(path, dataset)
    return read_catalog(path, columns=("Position",), dataset=dataset, comm=comm)[1]


def cmd_paint(args) -> int:
    """``jerald paint``: the maps of one or many catalogs (see :func:`expand_catalogs`).

    Every catalog's header is read and every output checked before anything is painted: a
    catalog whose BoxSize differs from the first's (or ``--box-size``) is an error naming it, an
    output that is not ours is refused, and nothing is written. The pipeline is compiled once per
    particle count (catalogs are painted grouped by count; the progress output says when another
    count compiles); under MPI each rank reads and paints its share of every catalog.
    """
    import numpy as np

    from .. import workflow as wf
    from ..io import read_catalog, write_catalog
    from ..io.meshes import inherited_attrs
    from ..io.paramfiles import load_params
    from ..model.pipeline import TRACES
    from ..train.validate import check_same_box
    from ..utils import check_output, is_root
    from .common import detect_dataset, positions_from_columns, write_map

    files = [f for f in (args.dm_params, args.stellar_params, args.hi_params) if f]
    if not files:
        raise SystemExit(
            "jerald paint: give at least one of --dm-params, --stellar-params, --hi-params"
        )
    prov = load_params(files[0])[2]
    nmesh = args.Nmesh or prov.get("Nmesh")
    if nmesh is None:
        raise SystemExit(f"jerald paint: {files[0]} records no Nmesh; pass --Nmesh")
    catalogs, many = expand_catalogs(args.particles)
    comm = wf.default_comm()
    rcomm = comm if comm.size > 1 else None
    datasets = [detect_dataset(c, args.dataset) for c in catalogs]
    headers = [_catalog_header(c, d, rcomm) for c, d in zip(catalogs, datasets, strict=True)]
    first = catalogs[0]
    box = args.box_size or (headers[0].get("BoxSize") if "BoxSize" in headers[0] else None)
    box = box if box is not None else prov.get("BoxSize")
    if box is None:
        raise SystemExit(f"jerald paint: no BoxSize in {first} or {files[0]}; pass --box-size")
    pm = wf.engine(nmesh, box, args.dtype, args.backend)
    for path, attrs in zip(catalogs, headers, strict=True):  # every catalog before any paint
        check_same_box({"BoxSize": pm.BoxSize}, "the model", attrs, f"catalog {path}")
    out = Path(args.out)
    names = catalog_names(catalogs) if many else [""]
    outdirs = [out / n if n else out for n in names]
    pipe = wf.pipeline_from_files(pm, args.dm_params, args.stellar_params, args.hi_params)
    kinds = [k for k in TARGETS if getattr(pipe, k) is not None]
    kinds += ["improved"] if args.save_particles else []
    # every output is checked before any is written: a refusal leaves nothing partial behind
    for d in outdirs:
        if d.exists() and not d.is_dir():
            raise ValueError(f"--out {d} is a file, not a directory; it is left untouched")
        for name in kinds:
            check_output(d / name, args.overwrite)
    sizes = [_catalog_size(c, d) for c, d in zip(catalogs, datasets, strict=True)]
    # grouped by particle count (stable): one compilation per count
    order = sorted(range(len(catalogs)), key=lambda i: (sizes[i] is None, sizes[i] or 0))
    fn = pipe.maps_function(improved=args.save_particles)
    raws = {k: np.asarray(getattr(pipe, k)[1]) for k in TARGETS if getattr(pipe, k)}
    base = {
        "dm_params": args.dm_params,
        "stellar_params": args.stellar_params,
        "hi_params": args.hi_params,
        "model": "JERALD (jerald_nbk)",
        "command": " ".join(sys.argv),
    }
    root = is_root(pm.comm)
    bar = None
    if many and root and not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(catalogs), desc="paint", unit="catalog", file=sys.stderr)
    say = (bar.write if bar is not None else print) if root else (lambda *a, **k: None)
    traces0, last_n = TRACES["maps"], None  # last_n: the particle count last painted
    for i in order:
        path, dest = catalogs[i], outdirs[i]
        cols, cattrs = read_catalog(path, columns=("Position",), dataset=datasets[i], comm=rcomm)
        pos = positions_from_columns(cols.pop("Position"), cattrs, pm, path)
        traced, t0 = TRACES["maps"], time.perf_counter()
        res = fn(pos, raws)  # traces and compiles here, synchronously, when it must
        if TRACES["maps"] > traced and not args.quiet:
            again = " (recompiled: another particle count)" if last_n is not None else ""
            say(
                f"[jerald] compiled the pipeline for {len(pos)} particles in "
                f"{time.perf_counter() - t0:.1f} s{again}",
                file=sys.stderr,
            )
        last_n = len(pos)
        # what nbodykit users look for (redshift, Time, cosmology...): the catalog's, else the
        # parameter file's
        attrs = base | inherited_attrs(cattrs, prov) | {"particles": str(path)}
        for name in TARGETS:
            if name not in res:
                continue
            units = MAP_UNITS.get(name, "map units of the target it was trained on")
            write_map(
                pm,
                res[name],
                dest / name,
                attrs | {"map": name, "units": units, "BoxSize_units": "Mpc/h"},
                overwrite=args.overwrite,
            )
            if root and bar is None:
                print(f"[jerald] {name} map: {dest / name}")
        if args.save_particles:
            # the input's other columns (Velocity, ID...) and attrs (cosmology...) are kept
            write_catalog(
                dest / "improved",
                {"Position": np.asarray(res["improved"])},
                attrs | {"BoxSize": pm.BoxSize},
                comm=pm.comm,
                overwrite=args.overwrite,
                keep_from=path,
                keep_dataset=datasets[i],
            )
            if root and bar is None:
                print(f"[jerald] improved particles: {dest / 'improved'}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if many and root:
        n_compiled = TRACES["maps"] - traces0
        print(
            f"[jerald] {len(catalogs)} catalogs painted into {out}/<name> ({n_compiled} compilation(s))"
        )
    return 0


def _read_map_slab(path, comm, allow_negative: bool):
    """This rank's x slab of a map for spectra (``analysis.power.slab_slices``), its attrs and
    the whole mesh's shape; the values are checked on every rank and a bad cell anywhere stops
    every rank with its message."""
    import numpy as np

    from ..analysis.power import slab_slices
    from ..io import read_mesh_slab
    from ..train.validate import check_map_values
    from ..utils import raise_first

    _, head = read_mesh_slab(path, (slice(0, 0),), comm=comm)  # the header only
    nmesh = tuple(int(n) for n in np.atleast_1d(head["Nmesh"]))
    if len(nmesh) != 3:
        raise ValueError(f"map {path}: expected a 3-D mesh, found shape {nmesh}")
    arr, attrs = read_mesh_slab(path, slab_slices(nmesh, comm), comm=comm)
    error = None
    try:
        check_map_values(arr, f"map {path}", allow_negative)
    except ValueError as err:
        error = err
    raise_first(comm, error)
    return arr, attrs, nmesh


def cmd_power(args) -> int:
    """``jerald power``: spectra and figures of merit of maps; under MPI each rank reads and
    transforms only its x slab (pmesh's distributed FFT), and rank 0 writes the results."""
    from mpi4py import MPI

    from ..analysis.metrics import figures_of_merit
    from ..analysis.plots import plot_power_comparison
    from ..analysis.power import power_spectrum
    from ..train.validate import check_same_box
    from ..utils import atomic_write, json_safe, root_only

    comm = MPI.COMM_WORLD
    labels = args.labels.split(",") if args.labels else [Path(m).name for m in args.maps]
    if len(labels) != len(args.maps):
        raise SystemExit(f"jerald power: {len(labels)} labels for {len(args.maps)} maps")

    out = Path(args.out)
    maps = []
    for path in args.maps:
        arr, attrs, nmesh = _read_map_slab(path, comm, args.allow_negative)
        check_same_box(maps[0][1] if maps else attrs, f"map {args.maps[0]}", attrs, f"map {path}")
        maps.append((arr, attrs, nmesh))
    ref, rattrs, rshape = maps[0]
    box = rattrs["BoxSize"]
    doc = {}
    if len(maps) == 1:
        res = power_spectrum(ref, box, dk=args.dk, comm=comm)
        doc[labels[0]] = res.to_dict()
    else:
        results = {}
        for label, (m, _attrs, shape) in zip(labels[1:], maps[1:], strict=True):
            if shape != rshape:
                raise SystemExit(
                    f"jerald power: {label} has Nmesh {shape}, reference {labels[0]} {rshape}"
                )
            fom = figures_of_merit(m, ref, box, dk=args.dk, comm=comm)
            results[label] = fom
            doc[label] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in fom.items()}
        with root_only(comm if comm.size > 1 else None, "the power plot") as root:
            if root:
                plot_power_comparison(out / "power.png", results, title=f"against {labels[0]}")
                print(f"[jerald] plot: {out / 'power.png'}")
    with root_only(comm if comm.size > 1 else None, "writing power.json") as root:
        if root:
            with atomic_write(out / "power.json") as fh:
                json.dump(json_safe(doc), fh, indent=1)
            print(f"[jerald] spectra: {out / 'power.json'}")
    return 0


def cmd_report(args) -> int:
    """``jerald report``: figures of merit, spectra and slice plots against a reference map;
    under MPI each rank reads and transforms only its x slab, and rank 0 draws and writes."""
    from mpi4py import MPI

    from ..analysis.metrics import figures_of_merit
    from ..analysis.plots import plot_power_comparison, plot_slices
    from ..analysis.report import fom_table, write_report
    from ..train.validate import check_same_box
    from ..utils import root_only

    comm = MPI.COMM_WORLD
    ref, rattrs, rshape = _read_map_slab(args.ref, comm, args.allow_negative)
    box = rattrs["BoxSize"]
    out = Path(args.out)
    preds = []
    for item in args.pred:  # every input is checked before anything is written
        if "=" not in item:
            raise SystemExit(f"jerald report: --pred expects LABEL=MAP, got {item!r}")
        label, path = item.split("=", 1)
        m, mattrs, shape = _read_map_slab(path, comm, args.allow_negative)
        check_same_box(rattrs, f"map {args.ref}", mattrs, f"map {path}")
        if shape != rshape:
            raise ValueError(f"map {path}: Nmesh {list(shape)}, the reference's {list(rshape)}")
        preds.append((label, m))
    results, figs = {}, []
    for label, m in preds:
        results[label] = figures_of_merit(m, ref, box, comm=comm)
        png = plot_slices(
            out / f"slices_{label}.png", ref, m, box, labels=("reference", label), comm=comm
        )
        figs.append((f"{label} slices", png))
    with root_only(comm if comm.size > 1 else None, "the report") as root:
        if root:
            power_png = plot_power_comparison(out / "power.png", results)
            figs.insert(0, ("power spectra and r(k)", power_png))
            path = write_report(
                out / "report.md",
                [
                    {
                        "title": "Figures of merit (h/Mpc)",
                        "table": fom_table(results),
                        "figures": figs,
                    }
                ],
                title=args.title,
                provenance={
                    "reference": args.ref,
                    "predictions": ", ".join(args.pred),
                    "command": " ".join(sys.argv),
                },
            )
            print(f"[jerald] report: {path}")
    return 0


def cmd_make_target(args) -> int:
    """``jerald make-target``: paint a snapshot field and write it as a mesh (rank 0 writes).

    Every rank reads its share of the snapshot rows (:func:`jerald_nbk.io.snapshots.make_target`);
    the map goes to ``--out`` (bigfile directory, or ``.npy`` with a JSON sidecar) with the
    snapshot's redshift, cosmology, units and the files and formula that made it. Nothing is
    written when an input is refused, and an existing ``--out`` that is not a previous output of
    ours is left untouched unless ``--overwrite``.
    """
    from .. import workflow as wf
    from ..io.snapshots import write_target
    from ..utils import is_root

    if args.Nmesh <= 0:
        raise ValueError(f"--Nmesh: expected a positive number of cells, found {args.Nmesh}")
    comm = wf.default_comm()
    # one argument is read as the Python API reads it: a file, one chunk (its siblings are
    # found), a directory or a quoted glob pattern; several are the chunk files themselves
    snaps = args.snapshots[0] if len(args.snapshots) == 1 else args.snapshots
    write_target(
        args.out,
        snaps,
        args.field,
        args.Nmesh,
        comm=comm,
        units=args.units,
        overwrite=args.overwrite,
        extra={"command": " ".join(sys.argv)},
    )
    if is_root(comm):
        print(f"[jerald] {args.field} map ({args.Nmesh}^3): {args.out}")
    return 0


def cmd_suite(args) -> int:
    from ..suite.build import build_suite

    zs = [float(z) for z in args.redshifts.split(",") if z]
    paths = build_suite(
        args.out, args.size, args.seed, zs, progress=not args.quiet, force=args.force
    )
    if paths:
        print(f"[jerald] suite: {paths.get('manifest', args.out)}")
    return 0


def cmd_info(args) -> int:
    if args.path is None:
        import importlib.metadata as md

        from .. import __version__
        from ..pm.jax_backend import _cic, num_threads

        print(f"jerald-nbk {__version__}")
        for pkg in ("jax", "jaxlib", "optax", "pmesh", "nbodykit", "mpi4py", "bigfile", "numpy"):
            try:
                print(f"  {pkg:10s} {md.version(pkg)}")
            except md.PackageNotFoundError:
                print(f"  {pkg:10s} not installed")
        import jax

        print(
            f"  JAX device: {jax.default_backend()}; C++ CIC kernels: {'built' if _cic else 'missing'}, {num_threads()} threads"
        )
        return 0
    path = Path(args.path)
    if path.suffix == ".json":
        from ..io.paramfiles import load_params

        cfg, raw, prov = load_params(path)
        from ..model.params import table_for

        tab = table_for(cfg)
        print(
            f"{path}: {cfg.target} stage, {cfg.n_layers} layers, gradient order {cfg.gradient_order}"
        )
        for n, v in tab.as_dict(raw).items():
            print(f"  {n:10s} {v: .6g}")
        for k in ("BoxSize", "Nmesh", "redshift", "losses", "steps", "package_version"):
            if k in prov:
                print(f"  [{k}] {prov[k]}")
        return 0
    if (path / "Field").exists() or path.suffix == ".npy":
        from ..io import read_mesh

        arr, attrs = read_mesh(path)
        print(
            f"{path}: mesh {arr.shape} {arr.dtype}, mean {arr.mean():.6g}, min {arr.min():.6g}, max {arr.max():.6g}"
        )
        for k, v in attrs.items():
            print(f"  {k}: {v}")
        return 0
    from ..io import read_catalog

    for ds in ("1", None):
        try:
            cols, attrs = read_catalog(path, columns=("Position",), dataset=ds)
        except (ValueError, FileNotFoundError):
            continue
        print(f"{path}: catalog (dataset {ds or 'top level'}), {len(cols['Position'])} particles")
        for k, v in attrs.items():
            print(f"  {k}: {v}")
        return 0
    raise SystemExit(f"jerald info: {path} is not a parameter file, mesh or catalog")


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(
        args.out,
        size=args.size,
        seed=args.seed,
        redshift=args.redshift,
        steps=args.steps,
        layers=args.layers,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    if report is not None:
        print(f"[jerald] demo report: {report}")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "suite": cmd_suite,
    "train": cmd_train,
    "paint": cmd_paint,
    "power": cmd_power,
    "report": cmd_report,
    "make-target": cmd_make_target,
    "info": cmd_info,
}


def main(argv=None) -> int:
    """Entry point of ``jerald``."""
    args = parse(argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if not args.command:
        build_parser().print_help()
        return 2
    if getattr(args, "dtype", None) == "f8":
        # float64 meshes need JAX's x64 mode, switched on before any JAX array is created
        import jax

        jax.config.update("jax_enable_x64", True)
    from .common import run_command

    # input errors: one message and exit 1; an error on any MPI rank ends every rank
    return run_command(
        f"jerald {args.command}", COMMANDS[args.command], args, timed=args.command != "info"
    )


if __name__ == "__main__":
    sys.exit(main())
