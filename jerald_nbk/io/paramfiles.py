"""Parameter files: jerald-nbk's JSON, and the LDL and JERALD reference plain-text files.

JSON (the native format) records names, physical and raw values, scalings, bounds, the stage
configuration and provenance (BoxSize, Nmesh, redshift, target, layers, smoothing n, steps, losses,
package version), so a file is self-describing and checked against the model it is loaded into.

Plain text (``np.savetxt``, one value per line):

* LDL (Dai & Seljak): per layer ``alpha, gamma, kh, kl, n``, then ``mu, b1, b0`` for targets with a
  final transform ``ReLU(b1 (1+delta)^mu + b0)``. LDL uses the eq-6 Green's function and unscaled
  values; ``b0 = -b`` in our eq-8 notation, ``b1 = w``.
* JERALD reference: the optimiser's raw (scaled) vector in the order of our parameter table
  (per layer ``alpha, gamma, kh, kl, nu``; then ``w, mu, b``; HI layers ``alpha1 .. nu1, alpha2 ..
  nu2`` then ``w, mu, b, beta1, beta2, eta, gamma3, kIh, kIl, nuI, xi`` and optionally ``zs``).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

from ..model.params import ParamTable, table
from ..utils import atomic_write, json_safe

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

    tab = ParamTable(table(config.target, config.n_layers, config.hi_shift))
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
    if comm is None or comm.rank == 0:
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
    if doc.get("format") != FORMAT:
        raise ValueError(
            f"parameter file {path}: format {doc.get('format')!r}, expected {FORMAT!r}"
        )
    try:
        config = StageConfig(**doc["config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"parameter file {path}: bad 'config' block ({err})") from None
    tab = ParamTable(table(config.target, config.n_layers, config.hi_shift))
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
    """Write a parameter vector as the LDL or JERALD reference scripts do (``np.savetxt``)."""
    tab = ParamTable(table(config.target, config.n_layers, config.hi_shift))
    vec = _to_plain(tab, config, np.asarray(raw, dtype=float), flavour)
    with atomic_write(path) as fh:
        np.savetxt(fh, vec)
    return Path(path)


def load_plaintext(path, config, flavour: str = "jerald") -> np.ndarray:
    """Read an LDL or JERALD reference plain-text file into a raw vector for ``config``.

    Raises a ValueError naming the file, the expected and found lengths and names when the file does
    not fit the model (the reference code's evaluate-only mode rejected valid files; this checks the
    length against the model actually configured).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    try:
        vec = np.atleast_1d(np.loadtxt(path, dtype=float))
    except ValueError as err:
        raise ValueError(
            f"parameter file {path}: not a plain-text list of numbers ({err})"
        ) from None
    tab = ParamTable(table(config.target, config.n_layers, config.hi_shift))
    names = _plain_names(tab, config, flavour)
    if vec.shape != (len(names),):
        raise ValueError(
            f"parameter file {path}: {vec.size} values, but a {flavour} {config.target} model with "
            f"{config.n_layers} layers has {len(names)} ({', '.join(names)})"
        )
    raw = _from_plain(tab, config, vec, flavour)
    tab.check_bounds(tab.to_physical(raw), where=str(path))
    return raw


def _plain_names(tab: ParamTable, config, flavour: str) -> list[str]:
    if flavour == "jerald":
        return list(tab.names)
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
        return raw
    _plain_names(tab, config, flavour)  # validates flavour/target
    p = tab.as_dict(raw)
    vec = []
    for i in range(config.n_layers):
        vec += [p[f"alpha_{i}"], p[f"gamma_{i}"], p[f"kh_{i}"], p[f"kl_{i}"], p[f"nu_{i}"]]
    if config.target == "stellar":
        vec += [p["mu"], p["w"], -p["b"]]
    return np.array(vec)


def _from_plain(tab: ParamTable, config, vec, flavour):
    if flavour == "jerald":
        return vec.copy()
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
