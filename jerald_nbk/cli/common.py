"""Command-line helpers shared by ``jerald``, ``jerald-ldl`` and ``jerald-ref``.

Reading and checking the inputs (catalogs, target maps, parameter files), writing maps, messages
on rank 0, the common engine options and the error handling of every command. Each command
module (:mod:`.main`, :mod:`.ldl`, :mod:`.ref`) holds only its own command and imports these.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


class UsageError(ValueError):
    """A wrong or missing option (reported like an input error, exit code 2)."""


#: defaults of the Adam options (the paper's eq-16 schedule)
ADAM_DEFAULTS = {"eta0": 0.002, "eta_final": 0.02, "tau": 100.0, "checkpoint_every": 25}


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
    """This rank's particle positions of a catalog, checked (finite, (N, 3), same BoxSize).

    Returns
    -------
    pos : (N, 3) JAX array
    attrs : dict
        The catalog's attributes.
    dataset : str or None
        The dataset read (:func:`detect_dataset`).
    """
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
    """A target map file on the engine's mesh, checked (shape, BoxSize, finite, >= 0).

    Parameters
    ----------
    path : path-like
        Bigfile mesh or ``.npy``.
    pm : ParticleMesh
    kind : str
        What the map is, for messages.
    scale : float
        The map is divided by it.
    """
    from .. import workflow as wf
    from ..train.validate import check_target

    local, attrs = wf.read_map(path, pm, scale)
    check_target(local, pm, kind, f"map {path}")
    return local, attrs


def mesh_of(path) -> tuple[tuple, np.ndarray]:
    """(Nmesh, BoxSize) recorded in a 3-D mesh file (bigfile or .npy), its values left unread.

    Raises
    ------
    ValueError
        Naming the file: not a 3-D mesh (a 2-D slice, say), or what :func:`read_mesh` refuses.
    """
    from ..io import read_mesh_slab

    _, attrs = read_mesh_slab(path, (slice(0, 0),))  # no plane: the header and its checks only
    nmesh = tuple(int(n) for n in attrs["Nmesh"])
    if len(nmesh) != 3:
        raise ValueError(f"map {path}: expected a 3-D mesh, found Nmesh {list(nmesh)}")
    return nmesh, np.asarray(attrs["BoxSize"], dtype=float)


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

    Parameters
    ----------
    path : path-like
        ``.json`` (jerald-nbk) or plain text (``np.savetxt``).
    target : {"dm", "stellar", "hi"}
        Our model the file is loaded into.
    flavour : {"ldl", "jerald"}
        Whose plain-text layout and bounds (:func:`jerald_nbk.io.paramfiles.load_plaintext`);
        ``"ldl"`` files are checked against LDL's bounds on ``pm``'s mesh.
    pm : ParticleMesh
    order : {4, 6, "exact"}
        Gradient order of a plain-text file's model.
    green : {"exponential", "gaussian"}, optional
        Green's function of a plain-text file's model.
    nstep : int, optional
        Layers the file must have (``--Nstep``).

    Returns
    -------
    stage : Stage
    raw : numpy array
    """
    from .. import workflow as wf
    from ..io.paramfiles import load_plaintext, plain_length
    from ..model.pipeline import Stage, StageConfig

    path = Path(path)
    if path.suffix == ".json":
        return wf.load_stage(path, pm, target)
    n_values = plain_length(path)
    layers, shift = infer_layers(n_values, target, path)
    if nstep is not None and layers != nstep:
        per = {"dm": "5*Nstep", "stellar": "5*Nstep + 3", "hi": "10*Nstep + 11 (or + 12)"}[target]
        raise ValueError(
            f"parameter file {path}: {n_values} values = {layers} layers, but --Nstep {nstep} "
            f"expects {per}; drop --Nstep to use the file's {layers} layers"
        )
    config = StageConfig(target, layers, order, shift, green)
    if flavour == "ldl":
        raw = load_plaintext(path, config, flavour, Nmesh=pm.Nmesh, BoxSize=pm.BoxSize)
    else:
        raw = load_plaintext(path, config, flavour)
    return Stage(pm, config), raw


def region_losses(pm, stage, pos, target, cfg, raw, star=None) -> dict:
    """Loss of ``raw`` on the train, validation and test regions (no training).

    Parameters
    ----------
    pm : ParticleMesh
    stage : Stage or ComposedModel
    pos : (N, 3) array
        Input particles.
    target : real mesh
    cfg : TrainConfig
        Loss power, smoothing and split.
    raw : array
    star : real mesh, optional
        HI: the frozen stellar map.
    """
    from ..train.loop import Objective

    return Objective(stage, pos, target, cfg, star=star).losses(raw)


def map_path(path, fmt: str = "bigfile") -> Path:
    """The file a map of ``path`` is written to: ``path`` (bigfile) or ``path.npy``."""
    path = Path(path)
    return path.with_name(path.name + ".npy") if fmt == "npy" else path


def write_map(pm, local, path, attrs: dict, fmt: str = "bigfile", overwrite: bool = False) -> Path:
    """Write a local mesh as one whole-mesh file (bigfile dir or ``.npy``), atomically.

    On the MPI engine every rank writes its own slab (:func:`jerald_nbk.io.write_mesh_slab`):
    no rank assembles the mesh. An existing path that is not a previous output of ours is an
    error unless ``overwrite``.
    """
    from ..io import write_mesh_slab

    path = map_path(path, fmt)
    local = np.asarray(local)
    shape = tuple(int(n) for n in pm.Nmesh)
    if hasattr(pm, "local_slices"):
        slices = pm.local_slices("real")
    else:
        slices = tuple(slice(0, n) for n in shape)
    comm = getattr(pm, "comm", None)
    write_mesh_slab(path, local, slices, shape, pm.BoxSize, attrs, comm=comm, overwrite=overwrite)
    return path


def check_outputs(
    comm,
    outdir,
    flag: str,
    maps=(),
    files=(),
    train_dir=None,
    overwrite: bool = False,
) -> None:
    """Refuse, before anything is computed or written, outputs that would fail or clobber.

    Parameters
    ----------
    comm : MPI communicator or None
        Rank 0 checks; every rank raises its error.
    outdir : path-like
        The output directory (``--save``, ``--outpath``): it, or its first existing ancestor, must
        be a directory.
    flag : str
        The option naming ``outdir``, for messages.
    maps : paths
        Map outputs (bigfile directories or ``.npy``): an existing one must be a previous output
        of ours (:func:`jerald_nbk.io.meshes.check_mesh_output`) unless ``overwrite``.
    files : paths
        Plain files rewritten in place (parameter and optimiser-state files, as the original
        scripts rewrite them): an existing one must be a regular file.
    train_dir : path-like, optional
        A training directory: an existing one must be a directory (its content is checked by
        :func:`jerald_nbk.train.train`: a run of ours, or an error).
    overwrite : bool

    Raises
    ------
    ForeignOutputError
        Naming the path, why it is refused, and what to do.
    """
    from ..io.meshes import check_mesh_output
    from ..utils import ForeignOutputError, root_only

    def check():
        out = Path(outdir)
        anc = out
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise ForeignOutputError(
                f"{flag} {out}: Not a directory: {anc} is a file, the outputs cannot go there "
                f"(it is left untouched); choose another {flag}"
            )
        for m in maps:
            check_mesh_output(m, overwrite)
        for f in (*files, *([train_dir] if train_dir is not None else [])):
            f = Path(f)
            want_dir = train_dir is not None and f == Path(train_dir)
            if os.path.lexists(f) and (f.is_dir() != want_dir or f.is_symlink()):
                what = "a directory" if want_dir else "a regular file"
                raise ForeignOutputError(
                    f"output {f} exists and is not {what}: it is left untouched; remove it or "
                    f"choose another {flag}"
                )

    with root_only(comm, f"checking {flag} {outdir}") as root:
        if root:
            check()


#: the smallest value an option may take: > bound ("gt") or >= bound ("ge"), by dest name
OPTION_RANGES = {
    "eta0": ("gt", 0),
    "eta_final": ("gt", 0),
    "tau": ("gt", 0),
    "checkpoint_every": ("ge", 0),  # 0: a checkpoint at the end only
    "Nmesh": ("gt", 0),
    "Nstep": ("gt", 0),
    "BoxSize": ("gt", 0),
    "ne_scale": ("gt", 0),
    "T_scale": ("gt", 0),
    "target_scale": ("gt", 0),
    "steps": ("ge", 0),
    "n": ("ge", 0),
    "snapNum": ("ge", 0),
    "redshift": ("gt", -1),
    # jerald's own
    "patience": ("gt", 0),
    "layers": ("gt", 0),
    "box_size": ("gt", 0),
    "dk": ("gt", 0),
    "smoothing_n": ("ge", 0),
}


def check_option_values(args, dests=None, argv=None, cfg_path=None) -> None:
    """Refuse option values of the wrong sign (a negative step count, a zero box...).

    The one range check of the three commands (:data:`OPTION_RANGES`).

    Parameters
    ----------
    args : argparse.Namespace
    dests : iterable of str, optional
        The options to check (default: every one of :data:`OPTION_RANGES` that ``args`` has);
        unset options (None) pass.
    argv : list of str, optional
        The command line: a bad value not given on it came from ``cfg_path``.
    cfg_path : str or Path, optional
        The config file the values were read from (``jerald --config``), named in the message.

    Raises
    ------
    UsageError
        Naming the option (``--`` + its dest with ``-`` for ``_``; ``--Nmesh`` as spelled), the
        config file when the value came from it, the expected range and the value found.
    """
    for dest in dests if dests is not None else OPTION_RANGES:
        v = getattr(args, dest, None)
        if v is None or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        how, bound = OPTION_RANGES[dest]
        ok = np.isfinite(v) and (v > bound if how == "gt" else v >= bound)
        if not ok:
            want = f"a value {'>' if how == 'gt' else '>='} {bound:g}"
            flag = "--" + dest.replace("_", "-")
            given = argv is None or any(a == flag or a.startswith(flag + "=") for a in argv)
            src = f"config file {cfg_path}: " if cfg_path and not given else ""
            raise UsageError(f"{src}option {flag}: expected {want}, found {v:g}")


def say(pm, msg: str, err: bool = False) -> None:
    """Print on rank 0 only."""
    from ..utils import is_root

    if is_root(pm.comm if pm is not None else None):
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def fmt_losses(losses: dict) -> str:
    """``"train L, validation L, test L"`` (6 significant digits) of a losses dict."""
    return ", ".join(f"{k} {losses[k]:.6g}" for k in ("train", "validation", "test") if k in losses)


def run_command(prog: str, fn, args, timed: bool = True) -> int:
    """Run ``fn(args)``; input errors become one message naming the problem and exit code 1.

    The one runner of the three commands: under MPI it installs the excepthook that ends every
    rank on any rank's error, and (``timed``, unless ``args.quiet``) rank 0 prints the wall time.
    A :class:`UsageError` exits with 2.
    """
    from ..utils import error_exit, install_mpi_excepthook

    install_mpi_excepthook()  # under mpiexec: an error on any rank ends every rank
    t0 = time.perf_counter()
    try:
        rc = fn(args)
    except UsageError as err:
        return error_exit(f"{prog}: error: {err}", 2)
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError, OSError) as err:
        msg = str(err)
        if isinstance(err, KeyError):
            msg = f"missing entry {msg}"
        return error_exit(f"{prog}: error: {msg}", 1)
    if timed and not getattr(args, "quiet", False):
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            print(f"[{prog}] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rc


def add_engine_options(p: argparse.ArgumentParser, adam_defaults: bool = True) -> None:
    """Add the engine, Adam-schedule and output options shared by the commands.

    Parameters
    ----------
    p : argparse.ArgumentParser
    adam_defaults : bool
        False: the Adam options (``--eta0``, ``--eta-final``, ``--tau``, ``--checkpoint-every``)
        default to None, so that a command whose default optimiser is not Adam can refuse them
        when they would be ignored (and fill in :data:`ADAM_DEFAULTS` otherwise).
    """
    d = ADAM_DEFAULTS if adam_defaults else dict.fromkeys(ADAM_DEFAULTS)
    only = "" if adam_defaults else "; --optimizer adam only"
    g = p.add_argument_group("engine and optimiser (jerald-nbk additions)")
    g.add_argument(
        "--backend",
        choices=["auto", "jax", "pmesh"],
        default="auto",
        help="engine (auto: JAX on 1 rank, pmesh under mpiexec)",
    )
    g.add_argument("--dtype", choices=["f4", "f8"], default="f4", help="float32 or float64")
    g.add_argument(
        "--eta0",
        type=float,
        default=d["eta0"],
        help=f"initial Adam learning rate (eq 16; default 0.002{only})",
    )
    g.add_argument(
        "--eta-final",
        type=float,
        default=d["eta_final"],
        help=f"final learning rate (eq 16; default 0.02{only})",
    )
    g.add_argument(
        "--tau",
        type=float,
        default=d["tau"],
        help=f"schedule time scale (steps; default 100{only})",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=d["checkpoint_every"],
        help=f"steps between checkpoints (default 25, 0: at the end only{only})",
    )
    g.add_argument("--dataset", default="auto", help="catalog dataset: auto, '1' or '' (top level)")
    g.add_argument(
        "--map-format",
        choices=["bigfile", "npy"],
        default="bigfile",
        help="output map: bigfile mesh directory (dataset Field, as nbodykit's FieldMesh.save) "
        "or NAME.npy with a JSON sidecar",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output map (or training directory) that is not a previous output of "
        "ours; without it such a path is an error and is left untouched",
    )


def train_config(args, smoothing_n: float, split: str, **extra):
    """The :class:`~jerald_nbk.train.loop.TrainConfig` of the parsed options (every command's).

    Parameters
    ----------
    args : argparse.Namespace
        With ``steps``, ``eta0``, ``eta_final``, ``tau``, ``checkpoint_every``, ``quiet``.
    smoothing_n : float
        Eq-11 exponent.
    split : {"paper", "ldl"}
    **extra
        Further :class:`TrainConfig` fields a command has options for (``jerald``: ``loss_p``,
        ``patience``).
    """
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
        **extra,
    )


# ---------------------------------------------------------------------------- config files


def config_file_arg(argv) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config X`` or ``--config=X``), if any."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def load_config(path, prog: str) -> dict:
    """A JSON or TOML config file as a dict of option names (dashes turned into underscores).

    Parameters
    ----------
    path : path-like
        ``.toml`` is read as TOML, anything else as JSON.
    prog : str
        The command, for messages.

    Raises
    ------
    SystemExit
        Naming the file: missing, unparsable, or not a table of options.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{prog}: config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            cfg = tomllib.loads(text)
        else:
            import json

            cfg = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error becomes one clear message
        raise SystemExit(f"{prog}: config file {path}: cannot parse ({err})") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"{prog}: config file {path}: expected a table of options")
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def parser_options(parser: argparse.ArgumentParser) -> dict:
    """The options of a (sub)command's parser by their ``dest``, help excluded.

    The one place that reads argparse's list of actions (argparse has no public accessor).
    """
    actions = parser._actions  # noqa: SLF001
    return {a.dest: a for a in actions if a.dest != argparse.SUPPRESS and a.dest != "help"}


def _is_append(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)  # noqa: SLF001


def typed_config(cfg: dict, options: dict, path, prog: str) -> dict:
    """Config values checked against their options' types and choices, as a flag's would be.

    An unknown key is an error naming it and the file. A string is converted by the option's
    type (``"5"`` for ``--steps``); any other value must already have the type: ``steps: 2.7`` or
    ``steps: "many"`` is an error naming the file, the option, what it expects and what it found.
    Options given repeatedly (``--particles``) take a list (one value is a list of one).

    Parameters
    ----------
    cfg : dict
        :func:`load_config`'s result.
    options : dict
        :func:`parser_options` of the command's parser.
    path : path-like
        The config file, for messages.
    prog : str
        The command, for messages.

    Returns
    -------
    dict
        The values, typed, by ``dest``.

    Raises
    ------
    SystemExit
        With the message.
    """
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        known = ", ".join(sorted(options))
        raise SystemExit(
            f"{prog}: config file {path}: unknown options {unknown} (the options of {prog} are "
            f"{known})"
        )
    out = {}
    for dest, v in cfg.items():
        action = options[dest]
        name = action.option_strings[0] if action.option_strings else dest
        where = f"{prog}: config file {path}: option {name}"
        if action.nargs == 0:  # a flag (store_true)
            if not isinstance(v, bool):
                raise SystemExit(f"{where}: expected true or false, found {v!r}")
            out[dest] = v
            continue
        many = action.nargs in ("+", "*") or _is_append(action)
        values = v if isinstance(v, list) and many else [v]
        if isinstance(v, list) and not many:
            raise SystemExit(f"{where}: expected one value, found the list {v!r}")
        typed = [_typed_value(x, action, where) for x in values]
        out[dest] = typed if many else typed[0]
    return out


def _typed_value(v, action: argparse.Action, where: str):
    """One config value as its option's type, checked against its choices."""
    kind = action.type
    if kind in (int, float):
        # a float option takes an integer too; neither takes a bool (an int subclass)
        want, accepted = ("an integer", int) if kind is int else ("a number", int | float)
        if isinstance(v, str):
            try:
                v = kind(v)
            except ValueError:
                raise SystemExit(f"{where}: expected {want}, found {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, accepted):
            raise SystemExit(f"{where}: expected {want}, found {v!r}")
        v = kind(v)
    elif kind is None and v is not None and not isinstance(v, str):
        raise SystemExit(f"{where}: expected a string, found {v!r}")
    if action.choices is not None and v not in action.choices:
        raise SystemExit(f"{where}: expected one of {list(action.choices)}, found {v!r}")
    return v


def parse_with_config(
    parser: argparse.ArgumentParser,
    argv,
    prog: str,
    command_parser: argparse.ArgumentParser | None = None,
) -> tuple[argparse.Namespace, str | None]:
    """Parse ``argv`` as the parser's defaults, then a ``--config`` file's values, then the flags.

    A plain merge: ``defaults | config | command line``. The command line is parsed with every
    option unset unless given, so that a flag replaces the config's value (a repeated option's
    list too, rather than extending it); an option required on the command line may come from
    the config file instead. The config is checked first (:func:`typed_config`).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser that reads ``argv``.
    argv : list of str
    prog : str
        The command, for messages (``"jerald train"``).
    command_parser : argparse.ArgumentParser, optional
        The sub-command's parser whose options the config sets (default: ``parser``).

    Returns
    -------
    args : argparse.Namespace
    config_path : str or None
        The config file read, if any.
    """
    options = parser_options(command_parser or parser)
    path = config_file_arg(argv)
    cfg = typed_config(load_config(path, prog), options, path, prog) if path else {}
    defaults = {}
    for dest, action in options.items():
        d = action.default
        if isinstance(d, str) and callable(action.type):
            d = action.type(d)  # as argparse converts a string default
        defaults[dest] = d
    saved = {dest: (a.default, a.required) for dest, a in options.items()}
    try:
        for dest, action in options.items():
            action.default = argparse.SUPPRESS  # absent from the result unless given
            if dest in cfg:
                action.required = False
        given = vars(parser.parse_args(argv))
    finally:
        for dest, action in options.items():
            action.default, action.required = saved[dest]
    return argparse.Namespace(**(defaults | cfg | given)), path
