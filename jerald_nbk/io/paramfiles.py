"""Parameter files: jerald-nbk's JSON, the LDL and JERALD reference plain-text files, and the JERALD
reference's optimiser-state file.

JSON (the native format) records names, physical and raw values, scalings, bounds, the stage
configuration and provenance (BoxSize, Nmesh, redshift, target, layers, smoothing n, steps, losses,
package version), so a file is self-describing and checked against the model it is loaded into.

This module is the one place where the other codes' parameter orders, signs and scalings are
converted to and from ours.

LDL (Dai & Seljak), ``np.savetxt``, one value per line: per layer ``alpha, gamma, kh, kl, n``, then
``mu, b1, b0`` for targets with a final transform ``ReLU(b1 (1+delta)^mu + b0)``. LDL uses the eq-6
Green's function and unscaled values; ``b0 = -b`` in our eq-8 notation, ``b1 = w``.

JERALD reference (maurorigo/JERALD, ``JERALD/runJERALD.py`` and ``model.py``; flavour ``"jerald"``).
Facts read from its code (commit 96ca2f0):

* Files are ``np.savetxt`` of the optimiser's vector, one ``%.18e`` number a line, in
  ``--outpath``: ``{target}_Nmesh{N}_Nstep{S}_n{n:.2f}_bestparam.txt`` (rewritten during training
  whenever the validation loss improves, with the parameters of that step) and
  ``..._optstate.txt`` (written once, at the end), ``target`` being ``dm``, ``Mstar`` or ``HI``.
* Values are the optimiser's *raw* values: the model multiplies every displacement amplitude by
  1e-2 (DM and stellar layers) or 1e-3 (both HI terms) and uses every other value as it is. Our
  tables use the same scalings, so the raw alpha values coincide.
* DM: per layer ``alpha, gamma, kh, kl, nu`` (5 S values).
* Stellar mass: the layers, then ``mu, w, b`` with ``F = ReLU(w (rho + 1e-8)^mu + b)``: ``+b``, so
  ``b = -b_ref`` in our eq-8 form ``ReLU(w (1+delta)^mu - b)``. Its training starts from
  ``mu, w, b, 0``, a fourth final value that its model never reads (and that crashes its bounds
  loop); a file of 5 S + 4 values is read with that last value ignored.
* HI: per layer the ten values ``alpha1, gamma1, kh1, kl1, nu1, alpha2, gamma2, kh2, kl2, nu2``
  (the first layer's ten values, then the second layer's ten: grouped per layer, not all
  layers' ``alpha1 .. nu1`` first; its ``params[10 i + j]``); then
  ``mu, w, b, beta1, kIh, kIl, nuI, beta2, gamma3, xi, eta, zs`` with
  ``F = ReLU(w ReLU(rho + zs)^mu - D + b)``, ``D = ReLU(beta1 O_I[star] + eta) + beta2
  star^gamma3``: ``b = -b_ref`` here too. The model always reads ``zs`` (10 S + 12 values; its
  evaluate-only length check wants 10 S + 11 and so rejects its own files). We read 10 S + 12
  values; a model without the shift (``hi_shift=False``) accepts ``zs = 0`` or a file without it
  (10 S + 11), and is written with ``zs = 0`` so that the reference can read it.
* The alpha signs agree with ours: its DM-source kernels are ``-G`` and its stellar-source kernel
  ``+G`` (``G > 0``), times the gradient kernel ``-i k``: ``alpha > 0`` moves particles toward
  overdensities and ``alpha2 > 0`` away from stars, as in :mod:`jerald_nbk.model.layers`. No layer
  value changes sign.
* Its ReLU floors at 1e-12 instead of 0 (maps differ by at most 1e-12 per cell).
* Bounds: it clips ``kh, kl`` (>= 0, >= 0.1) of every layer and ``mu >= 0.1, w >= 1e-5,
  kIh >= 0, kIl >= 0.1`` at the start of every step, the same bounds as ours; ours also bound
  gamma, gamma3 and the powers of k. A parameter file outside our bounds is an error naming the
  file, the parameter and the bound.

Optimiser state ``..._optstate.txt`` (its ``Adam.save_state``)::

    mu
    <Adam first moments, one a line, in the file order and scaling above>
    nu
    <second moments, same layout>
    itr
    <steps taken, an integer>
    LR
    <the learning rate of the next step, LR(itr), repeated once per parameter>
    params
    <optional: the parameters after the last update, not yet clipped>

Its Adam (b1 0.9, b2 0.999, eps 1e-8, moments stored without bias correction, the rate of step
``t`` taken at ``LR(t)``) is optax's ``adam``: ``mu``, ``nu`` and ``itr`` are optax's
``ScaleByAdamState.mu, nu, count`` (and the schedule state's ``count``). Its reader skips the LR
lines, and starts from its initial values when ``params`` is absent.

Moments under a change of variables. If a file value is ``f = c r`` for our raw value ``r`` (``c``
is the sign flip times the ratio of the two scalings), the gradient is ``dL/df = (dL/dr) / c``, so
the first moment (an average of gradients) is ``m_f = m_r / c`` and the second (an average of
squared gradients) ``v_f = v_r / c^2``. Adam's step in ``f`` is then ``c`` times its step in ``r``
exactly when ``|c| = 1`` (up to eps), which holds for every parameter here (``c = -1`` for ``b``,
``+1`` otherwise): a run resumed across the two codes continues the same Adam trajectory.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import warnings
from pathlib import Path

import numpy as np

from ..model.params import ParamTable, table_for
from ..utils import atomic_write, json_safe, root_only

FORMAT = "jerald-nbk-params"
FORMAT_VERSION = 1


def save_params(path, config, raw, provenance: dict | None = None, comm=None) -> Path:
    """Write a stage's parameters as JSON (atomically; rank 0 only under MPI).

    Parameters
    ----------
    path : path-like
    config : StageConfig
        The stage's configuration (target, layers, gradient order, ...).
    raw : array
        Raw parameter vector.
    provenance : dict, optional
        BoxSize, Nmesh, redshift, smoothing n, steps, losses and anything else worth keeping.
    """
    from .. import __version__

    tab = table_for(config)
    raw = np.asarray(raw, dtype=float)
    if raw.shape != (len(tab),):
        raise ValueError(
            f"{path}: {len(tab)} parameters expected for {config.target}, got {raw.shape}"
        )
    phys = tab.to_physical(raw)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": config.target,
        "config": config.as_dict(),
        "parameters": [
            {
                "name": s.name,
                "value": float(v),
                "raw": float(r),
                "scale": s.scale,
                "lower": _finite_or_none(s.lower),
                "upper": _finite_or_none(s.upper),
                "doc": s.doc,
            }
            for s, v, r in zip(tab.specs, phys, raw, strict=True)
        ],
        "provenance": {
            "package_version": __version__,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **json_safe(provenance or {}),
        },
    }
    path = Path(path)
    with root_only(comm, f"writing {path}") as root:
        if root:
            with atomic_write(path) as fh:
                json.dump(doc, fh, indent=1)
                fh.write("\n")
    return path


def load_params(path):
    """Read a JSON parameter file.

    Returns
    -------
    config : StageConfig
    raw : numpy array
        Raw vector in the table's order.
    provenance : dict

    Raises
    ------
    ValueError
        Naming the file and what is wrong (format, names, count, bounds).
    """
    from ..model.pipeline import StageConfig

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"parameter file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"parameter file {path}: not valid JSON ({err})") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise ValueError(f"parameter file {path}: not a JSON text file ({err})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"parameter file {path}: expected a JSON object, found {doc!r:.60}")
    if doc.get("format") != FORMAT:
        raise ValueError(
            f"parameter file {path}: format {doc.get('format')!r}, expected {FORMAT!r}"
        )
    from ..train.validate import check_param_doc

    check_param_doc(doc, path)
    try:
        config = StageConfig(**doc["config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"parameter file {path}: bad 'config' block ({err})") from None
    tab = table_for(config)
    found = [p["name"] for p in doc.get("parameters", [])]
    if found != list(tab.names):
        raise ValueError(
            f"parameter file {path}: parameters {found} do not match the {config.target} model with "
            f"{config.n_layers} layers, which expects {list(tab.names)}"
        )
    phys = np.array([p["value"] for p in doc["parameters"]], dtype=float)
    tab.check_bounds(phys, where=str(path))
    return config, tab.to_raw(phys), doc.get("provenance", {})


def save_plaintext(path, config, raw, flavour: str = "jerald") -> Path:
    """Write a parameter vector as the LDL or JERALD reference scripts do (``np.savetxt``).

    ``flavour="jerald"`` writes the JERALD reference's order, signs and scalings (module docstring).
    """
    tab = _table(config)
    raw = np.asarray(raw, dtype=float)
    if raw.shape != (len(tab),):
        raise ValueError(
            f"{path}: {len(tab)} parameters expected for {config.target}, got {raw.shape}"
        )
    vec = _to_plain(tab, config, raw, flavour)
    with atomic_write(path) as fh:
        np.savetxt(fh, vec)
    return Path(path)


def load_plaintext(
    path, config, flavour: str = "jerald", *, Nmesh=None, BoxSize=None
) -> np.ndarray:
    """Read an LDL or JERALD reference plain-text file into a raw vector for ``config``.

    Parameters
    ----------
    path : path-like
    config : StageConfig
        The model the file is loaded into (its layers fix the expected length).
    flavour : {"jerald", "ldl"}
        Whose layout, and whose bounds: a file is checked against the bounds of the code that
        wrote it. ``"jerald"``: our bounds (the JERALD reference clips onto the same ones).
        ``"ldl"``: LDL's L-BFGS-B bounds (:data:`jerald_nbk.model.params.LDL_BOUNDS`), which
        allow values outside ours (``b1 = 0``, ``kl = 0.05``, ...): any vector LDL's optimiser
        can produce loads.
    Nmesh, BoxSize : optional
        ``"ldl"``: the mesh the file is used on, for LDL's upper bound of ``kh`` and ``kl``
        (``2 pi Nmesh / BoxSize``); without them that bound is not checked.

    Raises
    ------
    ValueError
        Naming the file, the expected and found lengths and names when the file does not fit the
        model (the reference code's evaluate-only mode rejected valid files; this checks the
        length against the model actually configured), or naming the parameter (in the file's
        own names) and its bound when a value is out of bounds.
    """
    path = Path(path)
    vec = _read_numbers(path)
    tab = _table(config)
    if flavour == "jerald":
        raw = _ref_to_ours(tab, config, vec, "value", f"parameter file {path}")
    else:
        names = _plain_names(tab, config, flavour)
        if vec.shape != (len(names),):
            raise ValueError(
                f"parameter file {path}: {vec.size} values, but a {flavour} {config.target} model "
                f"with {config.n_layers} layers has {len(names)} ({', '.join(names)})"
            )
        raw = _from_plain(tab, config, vec, flavour)
        _check_ldl_bounds(path, tab, config, raw, Nmesh, BoxSize)
        return raw
    tab.check_bounds(tab.to_physical(raw), where=str(path))
    return raw


#: LDL's file names of our parameters (without the layer index)
_LDL_NAMES = {"alpha": "alpha", "gamma": "gamma", "kh": "kh", "kl": "kl", "nu": "n", "mu": "mu"}


def _check_ldl_bounds(path, tab: ParamTable, config, raw, Nmesh, BoxSize) -> None:
    """Every value of an LDL file inside LDL's bounds, else a ValueError naming file and bound."""
    from ..model.params import LDL_BOUNDS, ldl_bounds

    if Nmesh is not None and BoxSize is not None:
        lower, upper = ldl_bounds(config.target, config.n_layers, Nmesh, BoxSize)
    else:  # no mesh: LDL's kh, kl upper bound (2 pi Nmesh / BoxSize) is left out
        lower, upper = ldl_bounds(config.target, config.n_layers, 1, 1.0)
        for i, name in enumerate(tab.names):
            if name.split("_")[0] in ("kh", "kl"):
                upper[i] = np.inf
    phys = tab.to_physical(np.asarray(raw, dtype=float))
    tol = 1e-6
    bad = []
    for name, v, lo, hi in zip(tab.names, phys, lower, upper, strict=True):
        if np.isfinite(v) and lo - tol * abs(lo) <= v <= hi + tol * abs(hi):
            continue
        base, _, layer = name.partition("_")
        if base == "w":
            shown = f"b1 = {v:g}"
        elif base == "b":
            shown = f"b0 = {-v:g}"
        else:
            shown = f"{_LDL_NAMES.get(base, base)}{'_' + layer if layer else ''} = {v:g}"
        src = LDL_BOUNDS[base][2]
        bad.append(f"{shown} not in [{lo:g}, {hi:g}] ({src})")
    if bad:
        raise ValueError(f"parameter file {path}: values outside LDL's bounds: {'; '.join(bad)}")


def infer_ref_layers(n_values: int, target: str, path) -> tuple[int, bool]:
    """Layers (and HI shift) of a JERALD reference vector of ``n_values`` (parameters or moments).

    DM ``5 S``; stellar ``5 S + 3`` (or ``+ 4``, the reference's unused fourth final value); HI
    ``10 S + 12`` (with ``zs``: shift) or ``10 S + 11`` (without). Raises a ValueError naming the
    file and the lengths a valid file may have.
    """
    n = int(n_values)
    if target == "dm":
        ok, s, shift = n > 0 and n % 5 == 0, n // 5, False
        want = "5*Nstep values (5, 10, 15, ...)"
    elif target == "stellar":
        extra = n % 5 == 4
        ok, s, shift = n >= 3 and n % 5 in (3, 4), (n - (4 if extra else 3)) // 5, False
        want = "5*Nstep + 3 values (3, 8, 13, ...; + 4 with the reference's unused last value)"
    elif target == "hi":
        shift = n % 10 == 2
        base = 12 if shift else 11
        ok, s = n >= base and n % 10 in (1, 2), (n - base) // 10
        want = "10*Nstep + 12 values (12, 22, 32, ...; + 11 without the shift zs)"
    else:
        raise ValueError(f"target must be dm, stellar or hi, got {target!r}")
    if not ok:
        raise ValueError(
            f"parameter file {path}: {n} values; a JERALD reference {target} file has {want}"
        )
    return s, shift


# -- the JERALD reference's layout ---------------------------------------------------------------

#: the reference's scaling of the displacement amplitudes (its value = physical / scale)
REF_ALPHA_SCALE = {"dm": 1e-2, "stellar": 1e-2, "hi": 1e-3}
_LAYER_ORDER = ("alpha", "gamma", "kh", "kl", "nu")
#: final values after the layers: (reference name, our name, sign: reference = sign * ours)
_REF_FINAL = {
    "dm": (),
    "stellar": (("mu", "mu", 1.0), ("w", "w", 1.0), ("b", "b", -1.0)),
    "hi": (
        ("mu", "mu", 1.0),
        ("w", "w", 1.0),
        ("b", "b", -1.0),
        ("beta1", "beta1", 1.0),
        ("kIh", "kIh", 1.0),
        ("kIl", "kIl", 1.0),
        ("nuI", "nuI", 1.0),
        ("beta2", "beta2", 1.0),
        ("gamma3", "gamma3", 1.0),
        ("xi", "xi", 1.0),
        ("eta", "eta", 1.0),
        ("zs", "zs", 1.0),
    ),
}
#: parameters the reference clips onto their bounds at the start of every step (its bounds and
#: ours agree on these); base names, without layer index and source number
_REF_CLIPPED = ("kh", "kl", "mu", "w", "kIh", "kIl")


@dataclasses.dataclass(frozen=True)
class RefSlot:
    """One line of a JERALD reference file.

    ``ref_name``: the reference's name (layer index in brackets); ``name``: our parameter, or None
    when our model lacks it (HI ``zs`` without the shift: written as 0); ``factor``: reference
    value = ``factor`` * our raw value (the sign flip times the ratio of the scalings; +-1 here).
    """

    ref_name: str
    name: str | None
    factor: float


def ref_layout(config) -> list[RefSlot]:
    """The lines of a JERALD reference parameter (or moment) file for ``config``, in order."""
    tab = _table(config)
    a_scale = REF_ALPHA_SCALE[config.target]
    slots: list[RefSlot] = []

    def add(ref_name, name, ref_scale=1.0, sign=1.0):
        if name is None or name not in tab.index:
            slots.append(RefSlot(ref_name, None, 1.0))
        else:
            slots.append(RefSlot(ref_name, name, sign * tab.scale[tab.index[name]] / ref_scale))

    terms = ("1", "2") if config.target == "hi" else ("",)
    for i in range(config.n_layers):
        for t in terms:
            for q in _LAYER_ORDER:
                add(f"{q}{t}[{i}]", f"{q}{t}_{i}", a_scale if q == "alpha" else 1.0)
    for ref_name, name, sign in _REF_FINAL[config.target]:
        add(ref_name, name, 1.0, sign)
    return slots


def _ref_to_ours(tab: ParamTable, config, vec, kind: str, where: str) -> np.ndarray:
    """Our raw-space vector from a reference vector (``kind``: value, m1 or m2 for moments).

    ``where`` names the file in errors ("parameter file PATH").
    """
    layout = ref_layout(config)
    n, vec = len(layout), np.asarray(vec, dtype=float)
    ok = [n]
    if config.target == "stellar":
        ok.append(n + 1)
    if config.target == "hi" and not config.hi_shift:
        ok.append(n - 1)
    if vec.shape not in [(k,) for k in ok]:
        what = {"value": "values", "m1": "first moments", "m2": "second moments"}[kind]
        raise ValueError(
            f"{where}: {vec.size} {what}, but a jerald {config.target} model with "
            f"{config.n_layers} layers has {' or '.join(map(str, ok))} "
            f"({', '.join(s.ref_name for s in layout)})"
        )
    if vec.size == n + 1:  # the reference's unused fourth stellar value
        vec = vec[:n]
    elif vec.size == n - 1:  # HI without zs
        vec = np.append(vec, 0.0)
    out = np.empty(len(tab))
    for v, slot in zip(vec, layout, strict=True):
        if slot.name is None:
            if kind == "value" and v != 0.0:
                raise ValueError(
                    f"{where}: {slot.ref_name} = {v:g}, but the {config.target} "
                    f"model has no {slot.ref_name} (load it with the HI shift, hi_shift=True)"
                )
            continue
        f = slot.factor
        out[tab.index[slot.name]] = {"value": v / f, "m1": v * f, "m2": v * f * f}[kind]
    return out


def _ours_to_ref(tab: ParamTable, config, arr, kind: str) -> np.ndarray:
    """A reference vector from our raw-space vector (inverse of :func:`_ref_to_ours`)."""
    arr = np.asarray(arr, dtype=float)
    out = []
    for slot in ref_layout(config):
        if slot.name is None:
            out.append(0.0)
            continue
        v, f = arr[tab.index[slot.name]], slot.factor
        out.append({"value": v * f, "m1": v / f, "m2": v / (f * f)}[kind])
    return np.array(out)


# -- the JERALD reference's optimiser state --------------------------------------------------------

#: the suffix of the reference's optimiser-state file (after ``{target}_Nmesh{N}_Nstep{S}_n{n:.2f}``)
OPTSTATE_SUFFIX = "_optstate.txt"
_OPT_SECTIONS = ("mu", "nu", "itr", "LR", "params")


@dataclasses.dataclass
class RefOptState:
    """Adam's state in *our* raw parameters and table order (converted from/to the reference's).

    Attributes
    ----------
    mu, nu : numpy arrays
        Adam's first and second moments, without bias correction (optax's ``mu``, ``nu``).
    step : int
        Adam steps taken (the reference's ``itr``, optax's ``count``).
    lr : float or None
        The learning rate of the next step recorded in the file (informative: on resume the rate
        comes from the schedule at ``step``).
    raw : numpy array or None
        The parameters, when the file has them.
    """

    mu: np.ndarray
    nu: np.ndarray
    step: int
    lr: float | None = None
    raw: np.ndarray | None = None


def is_ref_optstate(path) -> bool:
    """True when ``path`` is a file whose first non-blank line is ``mu`` (a reference optstate)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    return line.strip() == "mu"
    except (OSError, UnicodeDecodeError):
        return False
    return False


def _parse_optstate(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"optimiser-state file {path} does not exist")
    sections: dict[str, list[float]] = {}
    current = None
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        word = line.strip()
        if not word:
            continue
        if word in _OPT_SECTIONS:
            if word in sections:
                raise ValueError(f"optimiser-state file {path}: line {lineno}: second '{word}'")
            current = sections.setdefault(word, [])
            continue
        if current is None:
            raise ValueError(
                f"optimiser-state file {path}: line {lineno}: {word!r} before the first "
                "section (the reference's files start with a line 'mu')"
            )
        try:
            current.append(float(word))
        except ValueError:
            raise ValueError(
                f"optimiser-state file {path}: line {lineno}: {word!r} is neither a number nor "
                f"one of {', '.join(_OPT_SECTIONS)}"
            ) from None
    missing = [s for s in ("mu", "nu", "itr") if s not in sections]
    if missing:
        raise ValueError(
            f"optimiser-state file {path}: no section {', '.join(missing)} (a JERALD reference "
            "optstate has 'mu', 'nu', 'itr', optionally 'LR' and 'params')"
        )
    return {k: np.array(v, dtype=float) for k, v in sections.items()}


def ref_optstate_length(path) -> int:
    """Number of parameters of a reference optimiser-state file (the length of its ``mu``)."""
    return int(_parse_optstate(Path(path))["mu"].size)


def read_ref_optstate(path, config) -> RefOptState:
    """Read the JERALD reference's ``*_optstate.txt`` into our raw space for ``config``.

    The parameters, when present, are those after the reference's last update, which it clips only
    at the start of the next step: the values it clips (``kh, kl, mu, w, kIh, kIl``) are clipped
    here as it would; any other value out of our bounds is an error naming the file and the bound.

    Raises
    ------
    ValueError
        Naming the file: a missing section, lengths that differ or fit no model of ``config``'s
        target and layers, a non-integer step, non-finite or negative second moments.
    """
    path = Path(path)
    sec = _parse_optstate(path)
    tab = _table(config)
    n = sec["mu"].size
    for key in ("nu", "params"):
        if key in sec and sec[key].size != n:
            raise ValueError(
                f"optimiser-state file {path}: {n} first moments but {sec[key].size} values "
                f"in '{key}'"
            )
    itr = sec["itr"]
    if itr.size != 1 or not float(itr[0]).is_integer() or itr[0] < 0:
        raise ValueError(
            f"optimiser-state file {path}: 'itr' must be one integer >= 0, found {itr.tolist()}"
        )
    for key in ("mu", "nu", "params"):
        if key in sec and not np.all(np.isfinite(sec[key])):
            raise ValueError(f"optimiser-state file {path}: non-finite values in '{key}'")
    if np.any(sec["nu"] < 0):
        raise ValueError(f"optimiser-state file {path}: negative second moments in 'nu'")
    where = f"optimiser-state file {path}"
    mu = _ref_to_ours(tab, config, sec["mu"], "m1", where)
    nu = _ref_to_ours(tab, config, sec["nu"], "m2", where)
    raw = None
    if "params" in sec:
        raw = _ref_to_ours(tab, config, sec["params"], "value", where)
        for i, name in enumerate(tab.names):
            base = name.split("_")[0]
            base = base[:-1] if base[-1:] in "12" and base[:-1] in ("kh", "kl") else base
            if base in _REF_CLIPPED:
                lo, hi = tab.lower[i] / tab.scale[i], tab.upper[i] / tab.scale[i]
                raw[i] = min(max(raw[i], lo), hi)
        tab.check_bounds(tab.to_physical(raw), where=str(path))
    lr = float(sec["LR"][0]) if sec.get("LR") is not None and sec["LR"].size else None
    return RefOptState(mu, nu, int(itr[0]), lr, raw)


def write_ref_optstate(path, config, state: RefOptState) -> Path:
    """Write ``state`` as the JERALD reference's ``*_optstate.txt`` (its order, signs, scalings).

    The learning rate is written once per parameter, as the reference does; the ``LR`` section is
    left out when ``state.lr`` is None, ``params`` when ``state.raw`` is None.
    """
    tab = _table(config)
    for key in ("mu", "nu") + (("raw",) if state.raw is not None else ()):
        arr = np.asarray(getattr(state, key))
        if arr.shape != (len(tab),):
            raise ValueError(
                f"{path}: {len(tab)} values expected in {key} for {config.target} with "
                f"{config.n_layers} layers, got {arr.shape}"
            )
    mu = _ours_to_ref(tab, config, state.mu, "m1")
    with atomic_write(path) as fh:
        fh.write("mu\n")
        np.savetxt(fh, mu)
        fh.write("nu\n")
        np.savetxt(fh, _ours_to_ref(tab, config, state.nu, "m2"))
        fh.write(f"itr\n{int(state.step)}\n")
        if state.lr is not None:
            fh.write("LR\n")
            np.savetxt(fh, np.full(mu.size, float(state.lr)))
        if state.raw is not None:
            fh.write("params\n")
            np.savetxt(fh, _ours_to_ref(tab, config, state.raw, "value"))
    return Path(path)


def _adam_part(opt_state):
    """The ``ScaleByAdamState`` inside an optax state (exactly one)."""
    import optax

    found = []

    def walk(s):
        if isinstance(s, optax.ScaleByAdamState):
            found.append(s)
        elif isinstance(s, (tuple, list)):
            for x in s:
                walk(x)

    walk(opt_state)
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimiser state, found {len(found)}")
    return found[0]


def optax_adam_state(state: RefOptState, template=None):
    """An optax ``adam`` state holding ``state``'s moments and step count.

    ``template``: an initial state of the optimiser that will continue (e.g. ``opt.init(raw)``);
    its ``ScaleByAdamState`` gets ``mu, nu, count = step`` and every other ``count`` (the
    learning-rate schedule's) ``step``, each in the template's dtype. Without a template, the
    structure of ``optax.adam(schedule)``: ``(ScaleByAdamState, ScaleByScheduleState)``.
    """
    import jax.numpy as jnp
    import optax

    if template is None:
        template = optax.adam(lambda count: 0.0).init(jnp.zeros(np.shape(state.mu)))
    _adam_part(template)  # exactly one

    def fill(s):
        if isinstance(s, optax.ScaleByAdamState):
            if np.shape(s.mu) != np.shape(state.mu):
                raise ValueError(
                    f"optimiser state for {np.shape(s.mu)} parameters, moments for "
                    f"{np.shape(state.mu)}"
                )
            return optax.ScaleByAdamState(
                count=jnp.asarray(state.step, dtype=jnp.asarray(s.count).dtype),
                mu=jnp.asarray(state.mu, dtype=jnp.asarray(s.mu).dtype),
                nu=jnp.asarray(state.nu, dtype=jnp.asarray(s.nu).dtype),
            )
        if isinstance(s, tuple) and hasattr(s, "_fields"):
            if "count" in s._fields:
                return s._replace(count=jnp.asarray(state.step, dtype=jnp.asarray(s.count).dtype))
            return s
        if isinstance(s, (tuple, list)):
            return type(s)(fill(x) for x in s)
        return s

    return fill(template)


def ref_optstate_from_optax(opt_state, lr: float | None = None, raw=None) -> RefOptState:
    """Adam's moments and step count of an optax ``adam`` state, with ``lr`` and ``raw``."""
    adam = _adam_part(opt_state)
    return RefOptState(
        np.asarray(adam.mu, dtype=float),
        np.asarray(adam.nu, dtype=float),
        int(np.asarray(adam.count)),
        None if lr is None else float(lr),
        None if raw is None else np.asarray(raw, dtype=float),
    )


# -- helpers ---------------------------------------------------------------------------------------


def plain_length(path) -> int:
    """Number of values in a plain-text parameter file (``np.savetxt`` layout, one a line).

    Raises FileNotFoundError or a ValueError naming the file when it is missing, empty, or holds
    anything but one column of numbers; the length then says how many layers the file's model has.
    """
    return int(_read_numbers(Path(path)).size)


def _table(config) -> ParamTable:
    return table_for(config)


def _read_numbers(path: Path) -> np.ndarray:
    """The values of a plain-text parameter file: one column (or one row) of numbers."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"parameter file {path}: expected a plain-text file, found a directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            vec = np.loadtxt(path, dtype=float, ndmin=1)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"parameter file {path}: not a plain-text list of numbers ({err})"
        ) from None
    if vec.size == 0:
        raise ValueError(f"parameter file {path}: expected one number a line, found no values")
    if vec.ndim != 1:
        raise ValueError(
            f"parameter file {path}: expected one number a line (np.savetxt of a vector), found "
            f"{vec.shape[0]} lines of {vec.shape[1]} numbers"
        )
    return vec


def _plain_names(tab: ParamTable, config, flavour: str) -> list[str]:
    if flavour == "jerald":
        return [s.ref_name for s in ref_layout(config)]
    if flavour != "ldl":
        raise ValueError(f"flavour must be 'jerald' or 'ldl', got {flavour!r}")
    if config.target == "hi":
        raise ValueError(
            "LDL has no HI model of this form (its nHI target uses the stellar-like model)"
        )
    names = []
    for i in range(config.n_layers):
        names += [f"alpha_{i}", f"gamma_{i}", f"kh_{i}", f"kl_{i}", f"n_{i}"]
    if config.target == "stellar":
        names += ["mu", "b1", "b0"]
    return names


def _to_plain(tab: ParamTable, config, raw, flavour):
    if flavour == "jerald":
        return _ours_to_ref(tab, config, raw, "value")
    _plain_names(tab, config, flavour)  # validates flavour/target
    p = tab.as_dict(raw)
    vec = []
    for i in range(config.n_layers):
        vec += [p[f"alpha_{i}"], p[f"gamma_{i}"], p[f"kh_{i}"], p[f"kl_{i}"], p[f"nu_{i}"]]
    if config.target == "stellar":
        vec += [p["mu"], p["w"], -p["b"]]
    return np.array(vec)


def _from_plain(tab: ParamTable, config, vec, flavour):
    phys = {}
    for i in range(config.n_layers):
        a, g, kh, kl, n = vec[5 * i : 5 * i + 5]
        phys |= {f"alpha_{i}": a, f"gamma_{i}": g, f"kh_{i}": kh, f"kl_{i}": kl, f"nu_{i}": n}
    if config.target == "stellar":
        mu, b1, b0 = vec[-3:]
        phys |= {"mu": mu, "w": b1, "b": -b0}
    return tab.to_raw(phys)


def _finite_or_none(x: float):
    return float(x) if np.isfinite(x) else None
