"""``jerald-ldl``: the LDL.py command line (Dai & Seljak's Lagrangian Deep Learning) on jerald-nbk.

It accepts LDL.py's options and file conventions and drives the same engine as ``jerald``
(:mod:`jerald_nbk.workflow`): JAX on one process, pmesh under ``mpiexec``.

LDL semantics (docs: ``shared/spec/model.md``, "Original LDL differences"):

* every target uses the eq-6 Green's function and the 4th-order Fourier gradient; LDL's split
  (test ``[0, 0.44)^3``, validation ``x >= 0.44, y < 0.56, z < 0.56``, train the rest);
* ``dm`` is our DM stage (eq-6 Green's function, L2 loss); every other target is the stellar form,
  final transform ``ReLU(b1 (1+delta)^mu + b0)`` = our eq 8 with ``w = b1``, ``b = -b0`` (L1 loss);
* the tSZ / X-ray targets compose LDL's output ``M`` with a second field, as LDL.py does, and fit the
  composed map to the observable:

  ==========  =================================  ==========================================
  target      fitted map (model)                 compared with (target)
  ==========  =================================  ==========================================
  kSZ         ``M = n_e``                         ``n_e``
  tSZ_ne      ``M * T_true``                      ``n_e T``  (``M`` is ``n_e``)
  Xray_ne     ``M^2 * T_true^0.5``                ``n_e^2 T^0.5``
  tSZ_T       ``M * n_e,LDL``                     ``n_e T``  (``M`` is ``T``)
  Xray_T      ``M^0.5 * n_e,LDL^2``               ``n_e^2 T^0.5``
  ==========  =================================  ==========================================

  ``n_e`` is multiplied by ``--ne-scale`` (LDL: 1e5) and ``T`` by ``--T-scale`` (LDL: 1e-5) so
  that values are O(1); ``n_e,LDL`` is the frozen electron-density model of ``--restore_ne`` (a
  ``tSZ_ne`` / ``Xray_ne`` fit). ``T_true`` is the target temperature map. The written maps undo
  the scalings: ``kSZ`` is ``n_e * v_z`` (``v_z`` the mean z velocity of the FastPM particles per
  cell), ``tSZ`` is ``n_e T``, ``Xray`` is ``n_e^2 T^0.5``; ``tSZ_ne`` / ``Xray_ne`` write the
  predicted ``n_e``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

PROG = "jerald-ldl"
TARGETS = ("dm", "Mstar", "nHI", "kSZ", "tSZ_ne", "tSZ_T", "Xray_ne", "Xray_T")
#: (exponent of the model output, second field) of the composed targets (module docstring)
COMPOSED = {
    "tSZ_ne": (1.0, "T"),
    "Xray_ne": (2.0, "T^0.5"),
    "tSZ_T": (1.0, "ne_model"),
    "Xray_T": (0.5, "ne_model^2"),
}


class UsageError(ValueError):
    """A wrong or missing option (reported like an input error, exit code 2)."""


# --------------------------------------------------------------------------------------------
# helpers shared with jerald-ref
# --------------------------------------------------------------------------------------------


def detect_dataset(path, dataset: str = "auto"):
    """The catalog dataset holding ``Position``: ``"1"`` (FastPM) or None (top level).

    ``"auto"`` looks for ``1/Position`` then ``Position`` in the bigfile directory (LDL.py reads
    ``File(path)['Position']``, the top level; FastPM writes ``1/Position``).
    """
    if dataset != "auto":
        return dataset or None
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"catalog {p} does not exist")
    if (p / "1" / "Position").exists():
        return "1"
    if (p / "Position").exists():
        return None
    return "1"  # read_catalog then says what the file does hold


def read_positions(path, pm, dataset="auto"):
    """This rank's particle positions of a catalog, checked (finite, (N, 3), same BoxSize)."""
    from .. import workflow as wf
    from ..train.validate import check_particles

    ds = detect_dataset(path, dataset)
    pos, attrs = wf.read_particles(path, pm, ds)
    check_particles(pos, pm, f"catalog {path}: Position")
    return pos, attrs, ds


def positions_from_columns(position, attrs: dict, pm, path):
    """Checked positions on the engine from an already-read ``Position`` column (this rank's rows).

    The catalog's BoxSize must equal the model's; positions must be a finite (N, 3) array.
    """
    import jax.numpy as jnp

    from ..train.validate import check_particles, check_same_box

    if "BoxSize" in attrs:
        check_same_box({"BoxSize": pm.BoxSize}, "the model", attrs, f"catalog {path}")
    pos = jnp.asarray(np.asarray(position).astype(pm.dtype))
    check_particles(pos, pm, f"catalog {path}: Position")
    return pos


def read_target(path, pm, kind: str, scale: float = 1.0):
    """A target map file on the engine's mesh, checked (shape, BoxSize, finite, >= 0)."""
    from .. import workflow as wf
    from ..train.validate import check_target

    local, attrs = wf.read_map(path, pm, scale)
    check_target(local, pm, kind, f"map {path}")
    return local, attrs


def mesh_of(path) -> tuple[tuple, np.ndarray]:
    """(Nmesh, BoxSize) recorded in a mesh file (bigfile or .npy)."""
    from ..io import read_mesh

    _, attrs = read_mesh(path)
    return tuple(int(n) for n in attrs["Nmesh"]), np.asarray(attrs["BoxSize"], dtype=float)


def infer_layers(n_values: int, target: str, path, hi_shift=None) -> tuple[int, bool]:
    """Number of layers (and HI shift) that a flat parameter vector of ``n_values`` implies.

    DM ``5 S``; stellar ``5 S + 3``; HI ``10 S + 11`` (``+ 1`` with the shift ``zs``). Raises a
    ValueError naming the file and the lengths a valid file may have.
    """
    if target == "dm":
        ok, s, shift = n_values % 5 == 0 and n_values > 0, n_values // 5, False
        want = "5*Nstep (5, 10, 15, ...)"
    elif target == "stellar":
        ok, s, shift = n_values % 5 == 3, (n_values - 3) // 5, False
        want = "5*Nstep + 3 (3, 8, 13, ...)"
    else:
        shift = n_values % 10 == 2 if hi_shift is None else hi_shift
        base = 12 if shift else 11
        ok, s = n_values >= base and (n_values - base) % 10 == 0, (n_values - base) // 10
        want = "10*Nstep + 11 (21, 31, ...) or, with the shift zs, 10*Nstep + 12"
    if not ok:
        raise ValueError(
            f"parameter file {path}: {n_values} values; a {target} parameter file has {want}"
        )
    return s, shift


def load_plain_or_json(path, target: str, flavour: str, pm, order, green=None, nstep=None):
    """A stage from a plain-text (``flavour`` "ldl"/"jerald") or jerald-nbk JSON parameter file.

    Plain-text files carry no configuration: the number of layers is inferred from the length
    (checked against ``nstep`` when given) and the gradient order / Green's function are the
    command's. JSON files carry their own configuration and are checked against the mesh.

    Returns
    -------
    stage : Stage
    raw : numpy array
    """
    from .. import workflow as wf
    from ..io.paramfiles import load_plaintext
    from ..model.pipeline import Stage, StageConfig

    path = Path(path)
    if path.suffix == ".json":
        return wf.load_stage(path, pm, target)
    if not path.exists():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    try:
        n_values = np.atleast_1d(np.loadtxt(path, dtype=float)).size
    except ValueError as err:
        raise ValueError(
            f"parameter file {path}: not a plain-text list of numbers ({err})"
        ) from None
    layers, shift = infer_layers(n_values, target, path)
    if nstep is not None and layers != nstep:
        per = {"dm": "5*Nstep", "stellar": "5*Nstep + 3", "hi": "10*Nstep + 11 (or + 12)"}[target]
        raise ValueError(
            f"parameter file {path}: {n_values} values = {layers} layers, but --Nstep {nstep} "
            f"expects {per}; drop --Nstep to use the file's {layers} layers"
        )
    config = StageConfig(target, layers, order, shift, green)
    raw = load_plaintext(path, config, flavour)
    return Stage(pm, config), raw


def safe_power(x, p: float):
    """``x^p`` for ``x >= 0`` with a finite gradient at ``x = 0`` (0 there), any ``p > 0``."""
    import jax.numpy as jnp

    if p == 1:
        return x
    pos = x > 0
    return jnp.where(pos, jnp.where(pos, x, 1.0) ** p, 0.0)


def make_composed_stage(pm, config, index: float = 1.0, field2=None, w_init: float = 1.0):
    """A :class:`~jerald_nbk.model.pipeline.Stage` whose output is ``F^index * field2``.

    LDL's tSZ and X-ray fits compare such a composed map with the observable (module docstring);
    the parameters (and files) are those of the underlying stage.
    """
    from ..model.pipeline import Stage

    class ComposedStage(Stage):
        def base(self, pos, raw, star=None, density0=None):
            return Stage.forward(self, pos, raw, star=star, density0=density0)

        def forward(self, pos, raw, star=None, density0=None):
            out = safe_power(self.base(pos, raw, star=star, density0=density0), index)
            return out if field2 is None else out * field2

    return ComposedStage(pm, config, w_init=w_init)


def region_losses(pm, stage, pos, target, cfg, raw, star=None) -> dict:
    """Loss of ``raw`` on the train, validation and test regions (no training)."""
    from ..train.loop import Objective

    return Objective(stage, pos, target, cfg, star=star).losses(raw)


def write_map(pm, local, path, attrs: dict, fmt: str = "bigfile") -> Path:
    """Write a local mesh as a whole-mesh file (rank 0, atomically): bigfile dir or ``.npy``."""
    from .. import workflow as wf
    from ..io import write_mesh
    from ..utils import is_root

    path = Path(path)
    if fmt == "npy":
        path = path.with_name(path.name + ".npy")
    full = wf.to_global(pm, local)
    if is_root(pm.comm):
        write_mesh(path, np.asarray(full), pm.BoxSize, attrs)
    if pm.comm is not None:
        pm.comm.Barrier()
    return path


def say(pm, msg: str, err: bool = False) -> None:
    """Print on rank 0 only."""
    from ..utils import is_root

    if is_root(pm.comm if pm is not None else None):
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def fmt_losses(losses: dict) -> str:
    return ", ".join(f"{k} {losses[k]:.6g}" for k in ("train", "validation", "test") if k in losses)


def run_command(prog: str, fn, args) -> int:
    """Run ``fn(args)``; input errors become one message naming the problem and exit code 1."""
    t0 = time.perf_counter()
    try:
        rc = fn(args)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError, OSError) as err:
        msg = str(err)
        if isinstance(err, KeyError):
            msg = f"missing entry {msg}"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1
    if not getattr(args, "quiet", False):
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            print(f"[{prog}] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rc


def add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine and optimiser (jerald-nbk additions)")
    g.add_argument(
        "--backend",
        choices=["auto", "jax", "pmesh"],
        default="auto",
        help="engine (auto: JAX on 1 rank, pmesh under mpiexec)",
    )
    g.add_argument("--dtype", choices=["f4", "f8"], default="f4", help="float32 or float64")
    g.add_argument("--eta0", type=float, default=0.002, help="initial Adam learning rate (eq 16)")
    g.add_argument("--eta-final", type=float, default=0.02, help="final learning rate (eq 16)")
    g.add_argument("--tau", type=float, default=100.0, help="schedule time scale (steps)")
    g.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    g.add_argument("--dataset", default="auto", help="catalog dataset: auto, '1' or '' (top level)")
    g.add_argument(
        "--map-format",
        choices=["bigfile", "npy"],
        default="bigfile",
        help="output map: bigfile mesh directory (dataset Field, as nbodykit's FieldMesh.save) "
        "or NAME.npy with a JSON sidecar",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config(args, smoothing_n: float, split: str):
    from ..train.loop import TrainConfig

    return TrainConfig(
        steps=args.steps,
        eta0=args.eta0,
        eta_final=args.eta_final,
        tau=args.tau,
        smoothing_n=smoothing_n,
        split=split,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )


# --------------------------------------------------------------------------------------------
# jerald-ldl
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "LDL (Dai & Seljak) with LDL.py's options and files, on the jerald-nbk engine.\n\n"
            "Differences from LDL.py: the optimiser is Adam with the paper's eq-16 schedule "
            "(--steps, default 500), not L-BFGS-B; the box size is an option (--BoxSize, LDL "
            "hard-codes 205 Mpc/h); target maps are mesh files (bigfile 'Field' or .npy, e.g. "
            "from `jerald make-target`), not TNG snapshot directories; --evaluateOnly accepts any "
            "parameter file whose length fits the target (the layers are inferred from it)."
        ),
        epilog=(
            "Files: parameters are plain text (np.savetxt; per layer alpha, gamma, kh, kl, n, then "
            "mu, b1, b0) named {target}_snap{snap:03d}_Nmesh{N}_Nstep{S}_n{n:.2f}_bestparam.txt in "
            "--save; the map is ..._map next to it (tSZ_T writes tSZ_snap..._map, Xray_T "
            "Xray_snap..._map). The training run (metrics.jsonl, checkpoint.npz, params.json) goes "
            "to ..._train/. Composed tSZ/X-ray targets: see the module docstring of "
            "jerald_nbk.cli.ldl."
        ),
    )
    ap.add_argument("--target", choices=TARGETS, default="Mstar", help="target field (LDL's)")
    ap.add_argument(
        "--FastPMpath", required=True, help="FastPM particles: bigfile catalog with Position"
    )
    ap.add_argument(
        "--improveFastPM",
        help="DM parameter file (LDL plain text, 5*Nstep values, or jerald JSON) that improves "
        "the particles first",
    )
    ap.add_argument(
        "--TNGpath",
        nargs="+",
        metavar="MAP",
        help="hydro target map(s) (bigfile mesh or .npy): Mstar, nHI: the map; kSZ: the n_e map; "
        "tSZ_*, Xray_*: the n_e map then the temperature map",
    )
    ap.add_argument("--TNGDarkpath", help="dark-matter target map (1+delta) for --target dm")
    ap.add_argument(
        "--snapNum", type=int, default=99, help="snapshot number (file names only; default 99)"
    )
    ap.add_argument(
        "--Nmesh", type=int, help="mesh resolution (default: the target map's; needed without one)"
    )
    ap.add_argument(
        "--Nstep",
        type=int,
        default=None,
        help="displacement layers (default 2; with --evaluateOnly, inferred from the file)",
    )
    ap.add_argument("--n", type=float, default=1.0, help="smoothing exponent n (eq 11; default 1)")
    ap.add_argument("--save", required=True, help="output directory")
    ap.add_argument(
        "--restore", help="parameter file to start from; with --evaluateOnly, the one to evaluate"
    )
    ap.add_argument(
        "--restore_ne",
        help="the n_e fit (tSZ_ne / Xray_ne parameter file) that tSZ_T / Xray_T compose with",
    )
    ap.add_argument(
        "--evaluateOnly",
        action="store_true",
        help="no training: paint the map of --restore, write it, report losses if maps are given",
    )
    ap.add_argument(
        "--BoxSize", type=float, default=205.0, help="box size in Mpc/h (default 205, LDL's)"
    )
    ap.add_argument(
        "--steps", type=int, default=500, help="Adam steps (default 500; LDL: L-BFGS-B)"
    )
    ap.add_argument("--ne-scale", type=float, default=1e5, help="n_e multiplier (LDL: 1e5)")
    ap.add_argument(
        "--T-scale", type=float, default=1e-5, help="temperature multiplier (LDL: 1e-5)"
    )
    ap.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in ..._train/"
    )
    add_engine_options(ap)
    return ap


def ldl_stem(target: str, snap: int, nmesh: int, nstep: int, n: float) -> str:
    """LDL.py's file stem: ``{target}_snap{snap:03d}_Nmesh{N}_Nstep{S}_n{n:.2f}``."""
    return f"{target}_snap{snap:03d}_Nmesh{nmesh}_Nstep{nstep}_n{n:.2f}"


def _check_maps(args) -> None:
    """Map options present and of the right count for the target (training needs them)."""
    t = args.target
    if t == "dm":
        if not args.TNGDarkpath and not args.TNGpath:
            raise UsageError("--target dm needs the DM target map: --TNGDarkpath MAP")
        return
    got = len(args.TNGpath or [])
    want = 1 if t in ("Mstar", "nHI", "kSZ") else 2
    what = "the target map" if want == 1 else "the n_e map and the temperature map"
    if got != want and (got or not args.evaluateOnly):
        raise UsageError(f"--target {t} needs {what}: --TNGpath with {want} path(s), got {got}")


def cmd_ldl(args) -> int:
    """Run ``jerald-ldl`` (train or evaluate one LDL target); see the module docstring."""
    import jax.numpy as jnp

    from .. import workflow as wf
    from ..io.paramfiles import save_plaintext
    from ..model.pipeline import StageConfig
    from ..utils import is_root

    t = args.target
    _check_maps(args)
    if t in ("tSZ_T", "Xray_T") and not args.restore_ne:
        raise UsageError(
            f"--target {t} needs --restore_ne (the n_e parameter file of the first fit)"
        )
    if args.evaluateOnly and not args.restore:
        raise UsageError("--evaluateOnly needs --restore (the parameter file to evaluate)")

    # the mesh: from the first target map, else --Nmesh
    maps = ([args.TNGDarkpath] if args.TNGDarkpath else []) if t == "dm" else []
    maps += list(args.TNGpath or []) if t != "dm" or not maps else []
    if maps:
        nmesh, _ = mesh_of(maps[0])
        if args.Nmesh is not None and (args.Nmesh,) * 3 != nmesh:
            raise ValueError(f"map {maps[0]}: Nmesh {list(nmesh)} != --Nmesh {args.Nmesh}")
    elif args.Nmesh is None:
        raise UsageError("no target map: pass --Nmesh")
    else:
        nmesh = (args.Nmesh,) * 3
    pm = wf.engine(nmesh, args.BoxSize, args.dtype, args.backend)
    order, green = 4, "sm"
    stage_target = "dm" if t == "dm" else "stellar"

    # parameter files first (cheap, and bad ones must fail before anything is written)
    restored = None
    if args.restore:
        # the layers are the file's (checked against --Nstep when it is given)
        restored = load_plain_or_json(
            args.restore, stage_target, "ldl", pm, order, green, args.Nstep
        )
    nstep = restored[0].config.n_layers if restored else (args.Nstep or 2)
    improve = ne_stage = None
    if args.improveFastPM:
        improve = load_plain_or_json(args.improveFastPM, "dm", "ldl", pm, order, green)
    if t in ("tSZ_T", "Xray_T"):
        ne_stage = load_plain_or_json(args.restore_ne, "stellar", "ldl", pm, order, green)

    # inputs
    try:
        pos, cattrs, ds = read_positions(args.FastPMpath, pm, args.dataset)
    except ValueError as err:
        if "BoxSize" in str(err):
            raise ValueError(f"{err} (set the box size with --BoxSize)") from None
        raise
    raw_pos = pos
    vel = None
    if t == "kSZ":
        from ..io import read_catalog

        cols, _ = read_catalog(args.FastPMpath, ("Velocity",), dataset=ds, comm=pm.comm)
        vel = np.asarray(cols["Velocity"], dtype=pm.dtype)
    if improve is not None:
        say(pm, f"[{PROG}] improving the particles with {args.improveFastPM}")
        pos = improve[0].displace(pos, improve[1])
    ne_model = None
    if ne_stage is not None:
        ne_model = ne_stage[0].forward(pos, ne_stage[1])

    target = field2 = None
    if t == "dm" and (args.TNGDarkpath or args.TNGpath):
        path = args.TNGDarkpath or args.TNGpath[0]
        target, _ = read_target(path, pm, "dm")
    elif t in ("Mstar", "nHI") and args.TNGpath:
        target, _ = read_target(args.TNGpath[0], pm, "stellar")
    elif t == "kSZ" and args.TNGpath:
        target, _ = read_target(args.TNGpath[0], pm, "n_e", 1.0 / args.ne_scale)
    elif t in COMPOSED and args.TNGpath:
        ne, _ = read_target(args.TNGpath[0], pm, "n_e", 1.0 / args.ne_scale)
        temp, _ = read_target(args.TNGpath[1], pm, "temperature", 1.0 / args.T_scale)
        target = ne * temp if t.startswith("tSZ") else ne**2 * jnp.sqrt(temp)
        if t.endswith("_ne"):
            field2 = temp if t == "tSZ_ne" else jnp.sqrt(temp)
        w_src = ne if t.endswith("_ne") else temp
    if t in ("tSZ_T", "Xray_T"):
        field2 = ne_model if t == "tSZ_T" else ne_model**2

    # the model
    index = COMPOSED.get(t, (1.0, None))[0]
    if t == "dm":
        w_init = 1.0
    elif target is not None:
        src = w_src if t in COMPOSED else target
        w_init = max(float(pm.sum(src)) / pm.ncells, 1e-5)
    else:
        w_init = 1.0
    config = StageConfig(stage_target, nstep, order, False, green)
    if restored is not None and restored[0].config != config:
        config = restored[0].config  # a JSON file with its own configuration
    stage = make_composed_stage(pm, config, index, field2, w_init)
    cfg = train_config(args, args.n, "ldl")
    out = Path(args.save)
    stem = ldl_stem(t, args.snapNum, nmesh[0], nstep, args.n)
    prov = {
        "command": " ".join([PROG, *sys.argv[1:]]),
        "ldl_target": t,
        "FastPMpath": str(args.FastPMpath),
        "improveFastPM": args.improveFastPM,
        "TNGpath": args.TNGpath,
        "TNGDarkpath": args.TNGDarkpath,
        "restore": args.restore,
        "restore_ne": args.restore_ne,
        "redshift": cattrs.get("redshift"),
    }

    if args.evaluateOnly:
        raw = restored[1]
        if target is not None:
            losses = region_losses(pm, stage, pos, target, cfg, raw)
            say(pm, f"[{PROG}] {t} losses of {args.restore}: {fmt_losses(losses)}")
        else:
            say(pm, f"[{PROG}] no target map given: map written without losses")
    else:
        raw0 = restored[1] if restored is not None else None
        workdir = out / f"{stem}_train"
        say(pm, f"[{PROG}] training {t} ({nstep} layers, {args.steps} Adam steps) -> {workdir}")
        res = wf.fit_stage(
            stage, pos, target, workdir, cfg, raw0, provenance=prov, resume=args.resume
        ).result
        raw = res.best_raw
        say(
            pm,
            f"[{PROG}] best validation loss at step {res.best_step}: {fmt_losses(res.best_losses)}",
        )
        ppath = out / f"{stem}_bestparam.txt"
        if is_root(pm.comm):
            save_plaintext(ppath, stage.config, raw, flavour="ldl")
        say(pm, f"[{PROG}] parameters: {ppath}")

    # the map LDL.py writes
    model = stage.base(pos, raw)
    attrs = {"target": t, "parameters": str(args.restore if args.evaluateOnly else ppath)}
    name = stem
    if t == "kSZ":
        # v_z: mean z velocity of the (unimproved) FastPM particles per cell, as LDL.py does
        ones = pm.paint(raw_pos)
        vz = pm.paint(raw_pos, jnp.asarray(vel[:, 2]))
        vz = jnp.where(ones > 0, vz / jnp.where(ones > 0, ones, 1.0), 0.0)
        model = model / args.ne_scale * vz
        attrs["units"] = "n_e * v_z (n_e in the input map's units, v_z in the catalog's)"
    elif t in ("tSZ_ne", "Xray_ne"):
        model = model / args.ne_scale
        attrs["units"] = "n_e (input map units)"
    elif t == "tSZ_T":
        model = model * ne_model / (args.ne_scale * args.T_scale)
        name = ldl_stem("tSZ", args.snapNum, nmesh[0], nstep, args.n)
        attrs["units"] = "n_e T (input map units)"
    elif t == "Xray_T":
        model = safe_power(model / args.T_scale, 0.5) * (ne_model / args.ne_scale) ** 2
        name = ldl_stem("Xray", args.snapNum, nmesh[0], nstep, args.n)
        attrs["units"] = "n_e^2 T^0.5 (input map units)"
    mpath = write_map(pm, model, out / f"{name}_map", attrs, args.map_format)
    say(pm, f"[{PROG}] map: {mpath}")
    return 0


def main(argv=None) -> int:
    """Entry point of ``jerald-ldl``."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, cmd_ldl, args)


if __name__ == "__main__":
    sys.exit(main())
