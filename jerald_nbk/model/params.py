"""Parameter tables: names, scalings, initial values and bounds of every JERALD target.

One table per target is the single place where a parameter is defined. The optimiser works on
*raw* values, ``physical = raw * scale``: the scales make every raw value O(1) (the reference code
multiplies alpha by 1e-2, and by 1e-3 in the HI layers). Bounds are on physical values and are
enforced by projection after every optimiser step.

Per-layer names carry the layer index: ``alpha_0, gamma_0, kh_0, kl_0, nu_0, alpha_1, ...``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..geometry import box_vector, mesh_vector

TARGETS = ("dm", "stellar", "hi")

#: bound on the powers of k (``nu`` of every Green's function, ``nuI`` of eq 15): LDL's (-4.5, 4.5).
#: Beyond it ``k^nu`` spans more than 10 decades between the fundamental mode and the Nyquist
#: frequency of a 512^3 mesh, and float32 maps lose the modes that matter.
NU_MAX = 4.5


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One learnable parameter: physical value = raw * ``scale``; bounds are physical."""

    name: str
    init: float
    scale: float = 1.0
    lower: float = -math.inf
    upper: float = math.inf
    doc: str = ""


def _layer(i: int, alpha_scale: float, suffix: str = "", what: str = "") -> list[ParamSpec]:
    # Initial values: a weak, nearly local layer (LDL starts every layer at alpha=1e-3,
    # gamma=0.5, kh=1, kl=8, n=0). gamma bounds are LDL's (0.05, 2).
    s = f"{suffix}_{i}"
    return [
        ParamSpec(f"alpha{s}", 1e-3, alpha_scale, doc=f"displacement amplitude{what} (Mpc/h)^2"),
        ParamSpec(f"gamma{s}", 0.5, 1.0, 0.05, 2.0, doc=f"power of 1+delta{what}"),
        ParamSpec(
            f"kh{s}", 1.0, 1.0, 0.0, doc=f"large-scale cut of the Green's function{what} (h/Mpc)"
        ),
        ParamSpec(
            f"kl{s}", 8.0, 1.0, 0.1, doc=f"small-scale cut of the Green's function{what} (h/Mpc)"
        ),
        ParamSpec(
            f"nu{s}", 0.0, 1.0, -NU_MAX, NU_MAX, doc=f"power of k in the Green's function{what}"
        ),
    ]


def dm_layer_names(i: int) -> list[str]:
    """Names of the 5 parameters of DM / stellar displacement layer ``i``."""
    return [p.name for p in _layer(i, 1.0)]


def hi_layer_names(i: int) -> list[str]:
    """Names of the 10 parameters of HI displacement layer ``i`` (DM-source term, then stellar)."""
    return [p.name for p in _layer(i, 1.0, "1")] + [p.name for p in _layer(i, 1.0, "2")]


def table(
    target: str,
    n_layers: int,
    hi_shift: bool = False,
    w_init: float | None = None,
    amplitude: float = 1.0,
    b_init: float = 0.0,
) -> list[ParamSpec]:
    """The parameter table of a target.

    Parameters
    ----------
    target : {"dm", "stellar", "hi"}
        DM: ``5 n_layers`` parameters (eq 2, 7); stellar: ``5 n_layers + 3`` (eq 2, 6, 8);
        HI: ``10 n_layers + 11`` (eq 12-15), ``+1`` with ``hi_shift``.
    n_layers : int
        Number of displacement layers (0 allowed for stellar and HI: transform only).
    hi_shift : bool
        HI only: the reference code's per-redshift shift ``zs`` inside the power,
        ``ReLU(1 + delta + zs)^mu``.
    w_init : float, optional
        Initial ``w`` of the final transform (default: ``amplitude``).
    amplitude : float
        The target map's amplitude (its mean per cell, :func:`initial_amplitude`): the unit in
        which the optimiser sees ``w`` and ``b`` (HI: also ``beta1``, ``beta2``, ``eta``), and
        ``w``'s lower bound is ``1e-5 amplitude``. 1 for maps already normalised to O(1) and for
        the reference codes' files, whose optimisers work on unscaled values.
    b_init : float
        Stellar only: initial threshold ``b`` of eq 8, in the map's units (default 0, model.md's
        value). :func:`stellar_start` gives the one that starts the map at the target's
        occupancy.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if n_layers < 0 or (target == "dm" and n_layers < 1):
        raise ValueError(f"n_layers must be >= {1 if target == 'dm' else 0}, got {n_layers}")
    # Terms in the map's units (w, b; HI also beta1, beta2, eta) are optimised in units of the
    # map's amplitude: Adam's steps are absolute in raw units (0.002-0.02), so a stellar map in
    # 1e10 Msun/h with a mean of 5e-5 per cell (z = 5) had w pushed onto its bound in one step and
    # the fitted map collapsed to zero. w's positivity bound is relative for the same reason.
    a = float(amplitude)
    if not (np.isfinite(a) and a > 0):
        raise ValueError(f"amplitude must be a positive number, got {amplitude!r}")
    w_init = a if w_init is None else float(w_init)
    w_min = 1e-5 * a
    out: list[ParamSpec] = []
    if target in ("dm", "stellar"):
        for i in range(n_layers):
            out += _layer(i, 1e-2)
    else:
        for i in range(n_layers):
            out += _layer(i, 1e-3, "1", " (DM source)") + _layer(i, 1e-3, "2", " (stellar source)")
    if target == "stellar":
        out += [
            ParamSpec("w", w_init, a, w_min, doc="amplitude of the stellar transform (eq 8)"),
            ParamSpec("mu", 1.0, 1.0, 0.1, doc="power of 1+delta in eq 8"),
            # b starts at b_init (stellar_start: the target's occupancy), not model.md's 0: a sparse
            # target (0.6% of cells non-empty at z = 5) needs b ~ 20 w, and Adam moves b by about
            # the learning rate per step, so from 0 it never got there (72% non-empty after 100
            # steps, benchmarks/results/fidelity.json, z = 5).
            ParamSpec("b", float(b_init), a, doc="threshold of eq 8"),
        ]
    elif target == "hi":
        # Initial values keep every term of eqs 13-15 alive (non-zero gradient for each parameter):
        # - beta1 = 0.6 w and xi = 1 (the JERALD reference's 0.6 and 1, in units of the map's
        #   amplitude w): beta1 O_I[1 + delta_star] + eta is then positive in almost every cell, so
        #   the ReLU of eq 14 passes gradients to beta1, eta, kIh, kIl, nuI and xi. With beta1 = eta
        #   = 0 (our first release) the ReLU sat at its kink with zero gradient and those six
        #   parameters never moved.
        # - beta2 = 0.05 w: gamma3's gradient is proportional to beta2 (the reference starts at 0,
        #   which freezes gamma3).
        # - eta = 0 and b = 0: their gradients are the counts of active cells, non-zero.
        out += [
            ParamSpec("w", w_init, a, w_min, doc="amplitude of the HI transform (eq 13)"),
            ParamSpec("mu", 1.0, 1.0, 0.1, doc="power of 1+delta in eq 13"),
            ParamSpec("b", 0.0, a, doc="threshold of eq 13"),
            ParamSpec(
                "beta1", 0.6 * w_init, a, doc="depletion around stars, filtered term (eq 14)"
            ),
            ParamSpec("beta2", 0.05 * w_init, a, doc="local stellar conversion term (eq 14)"),
            ParamSpec("eta", 0.0, a, doc="offset inside the depletion ReLU (eq 14)"),
            ParamSpec("gamma3", 1.0, 1.0, 0.05, 2.0, doc="power of 1+delta_star (eq 14)"),
            ParamSpec("kIh", 1.0, 1.0, 0.0, doc="large-scale cut of O_I (eq 15, h/Mpc)"),
            ParamSpec("kIl", 8.0, 1.0, 0.1, doc="small-scale cut of O_I (eq 15, h/Mpc)"),
            ParamSpec("nuI", 0.0, 1.0, -NU_MAX, NU_MAX, doc="power of k in O_I (eq 15)"),
            ParamSpec("xi", 1.0, 1.0, doc="constant of O_I (eq 15)"),
        ]
        if hi_shift:
            out.append(ParamSpec("zs", 0.0, 1.0, doc="shift inside the power of eq 13"))
    return out


def initial_amplitude(target_sum: float, ncells: int) -> float:
    """The one initial-value rule of the final transforms: the target's mean per cell.

    model.md starts ``w`` at the mean target per particle; per *cell* is what makes eq 8 (mu = 1,
    b = 0, mean 1 + delta = 1) reproduce the target's mean, and the two agree for N^3 particles on
    an N^3 mesh, the paper's setting. Floored at a tiny positive value for an all-zero map.
    """
    return max(float(target_sum) / int(ncells), 1e-30)


def stellar_start(density_above, mean_excess, occupancy: float, target_mean: float):
    """Initial ``w`` and ``b`` of eq 8 that start the map at the target's occupancy and mean.

    With ``mu = 1`` and ``x = 1 + delta`` of the stage's input, the threshold ``q`` is the
    ``(1 - occupancy)`` quantile of ``x`` (the fraction of cells with ``x > q`` is the fraction of
    non-empty target cells), and ``w`` makes the mean of ``ReLU(w x - b)`` the target's:
    ``w0 = target_mean / mean(ReLU(x - q))``, ``b0 = w0 q``. A target with every cell non-empty
    (or a density emptier than the target) gives ``q = 0``: ``b0 = 0`` and ``w0`` the target's
    mean over the mean of ``x``, model.md's start.

    Parameters
    ----------
    density_above : callable
        ``q -> fraction of cells (of all simulations) with x > q``; global under MPI.
    mean_excess : callable
        ``q -> mean over cells of ReLU(x - q)``; global under MPI.
    occupancy : float
        Fraction of the target's cells that are non-empty, in (0, 1].
    target_mean : float
        The target's mean per cell (> 0).

    Returns
    -------
    (w0, b0) : tuple of float
    """
    occ = float(occupancy)
    if not (0.0 < occ <= 1.0) or not (np.isfinite(target_mean) and target_mean > 0):
        raise ValueError(
            f"stellar_start: occupancy {occupancy!r} must be in (0, 1] and target mean "
            f"{target_mean!r} positive"
        )
    q = 0.0
    if density_above(0.0) > occ:
        lo, hi = 0.0, 1.0
        while density_above(hi) > occ:  # bracket: the fraction falls to 0 above the densest cell
            lo, hi = hi, 2.0 * hi
        for _ in range(60):  # bisection to float precision of the bracket
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if density_above(mid) > occ else (lo, mid)
        q = hi
    excess = float(mean_excess(q))
    if not excess > 0:
        raise ValueError(f"stellar_start: the input density has no cell above {q}")
    w0 = float(target_mean) / excess
    return w0, w0 * q


def table_for(config, w_init: float | None = None, b_init: float = 0.0) -> ParamTable:
    """The :class:`ParamTable` of a stage configuration (target, layers, shift, amplitude)."""
    return ParamTable(
        table(
            config.target,
            config.n_layers,
            config.hi_shift,
            w_init,
            getattr(config, "amplitude", 1.0),
            b_init,
        )
    )


class ParamTable:
    """A target's parameters as one flat raw vector, with names, scalings and bounds.

    Parameters
    ----------
    specs : sequence of ParamSpec
        Usually from :func:`table`.
    """

    def __init__(self, specs: Sequence[ParamSpec]):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")
        self.specs = tuple(specs)
        self.names = tuple(names)
        self.index = {n: i for i, n in enumerate(names)}
        self.scale = np.array([s.scale for s in specs], dtype=float)
        self.lower = np.array([s.lower for s in specs], dtype=float)
        self.upper = np.array([s.upper for s in specs], dtype=float)

    def __len__(self) -> int:
        return len(self.specs)

    def init_raw(self) -> np.ndarray:
        """Raw initial vector (physical initial values divided by the scales)."""
        return np.array([s.init for s in self.specs], dtype=float) / self.scale

    def to_physical(self, raw):
        """Physical values of a raw vector (works on numpy and JAX arrays)."""
        return raw * self.scale

    def to_raw(self, physical) -> np.ndarray:
        """Raw vector of physical values given as an array or a name -> value mapping."""
        if isinstance(physical, Mapping):
            missing = [n for n in self.names if n not in physical]
            extra = [n for n in physical if n not in self.index]
            if missing or extra:
                raise ValueError(
                    f"parameter names do not match the table: missing {missing}, unexpected {extra}"
                )
            physical = [physical[n] for n in self.names]
        physical = np.asarray(physical, dtype=float)
        if physical.shape != (len(self),):
            raise ValueError(
                f"expected {len(self)} parameters ({', '.join(self.names)}), got {physical.shape[0] if physical.ndim else 0}"
            )
        return physical / self.scale

    def project(self, raw):
        """Clip a raw vector onto the bounds (the projection applied after each step)."""
        import jax.numpy as jnp

        lo = jnp.asarray(self.lower / self.scale, dtype=raw.dtype)
        hi = jnp.asarray(self.upper / self.scale, dtype=raw.dtype)
        return jnp.clip(raw, lo, hi)

    def check_bounds(self, physical, where: str = "") -> None:
        """Raise a ValueError naming every parameter outside its bounds.

        A parameter projected onto a bound in float32 lands up to one float32 rounding (~6e-8
        relative) beyond it, so bounds are checked to a relative 1e-6.
        """
        physical = np.asarray(physical, dtype=float)
        tol = 1e-6
        bad = [
            f"{n}={v:g} not in [{lo:g}, {hi:g}]"
            for n, v, lo, hi in zip(self.names, physical, self.lower, self.upper, strict=True)
            if not (lo - tol * abs(lo) <= v <= hi + tol * abs(hi)) or not np.isfinite(v)
        ]
        if bad:
            raise ValueError(
                f"parameters out of bounds{' in ' + where if where else ''}: {'; '.join(bad)}"
            )

    def as_dict(self, raw) -> dict[str, float]:
        """Physical values by name."""
        return {
            n: float(v)
            for n, v in zip(self.names, np.asarray(self.to_physical(np.asarray(raw))), strict=True)
        }


# --------------------------------------------------------------------------------------------
# LDL's bounds (Dai & Seljak's LDL.py), for jerald-ldl
# --------------------------------------------------------------------------------------------

#: LDL's L-BFGS-B bounds, by our parameter name (without the layer index): ``(lower, upper,
#: source)``; ``None`` is unbounded. ``"k_max"`` is ``2 pi Nmesh / BoxSize`` (see
#: :func:`ldl_bounds`). Source: ``LDL.py`` of biweidai/LDL (commit f62f3a6), the ``bounds`` list
#: passed to ``scipy.optimize.minimize(method="L-BFGS-B")``::
#:
#:     bounds = [(None, None), (0.05, 2), (0.03, 2*np.pi*args.Nmesh/205.),
#:               (0.03, 2*np.pi*args.Nmesh/205.), (-4.5, 4.5)] * args.Nstep
#:     if baryon:
#:         bounds += [(0.1, None), (0., None), (None, None)]
#:
#: in LDL's order ``alpha, gamma, kh, kl, n`` per layer, then ``mu, b1, b0``
#: (``b1 = w``, ``b0 = -b`` here; 205 is LDL's hard-coded BoxSize in Mpc/h).
LDL_BOUNDS: dict[str, tuple[float | None, float | str | None, str]] = {
    "alpha": (None, None, "LDL.py bounds[5 i]: (None, None)"),
    "gamma": (0.05, 2.0, "LDL.py bounds[5 i + 1]: (0.05, 2)"),
    "kh": (0.03, "k_max", "LDL.py bounds[5 i + 2]: (0.03, 2 pi Nmesh / 205)"),
    "kl": (0.03, "k_max", "LDL.py bounds[5 i + 3]: (0.03, 2 pi Nmesh / 205)"),
    "nu": (-4.5, 4.5, "LDL.py bounds[5 i + 4]: (-4.5, 4.5) (LDL's n)"),
    "mu": (0.1, None, "LDL.py bounds[5 Nstep]: (0.1, None)"),
    "w": (0.0, None, "LDL.py bounds[5 Nstep + 1]: (0, None) (LDL's b1)"),
    "b": (None, None, "LDL.py bounds[5 Nstep + 2]: (None, None) (LDL's b0 = -b)"),
}


def ldl_k_max(Nmesh, BoxSize) -> float:
    """LDL's upper bound of ``kh`` and ``kl``: ``2 pi Nmesh / BoxSize`` (h/Mpc).

    LDL's mesh and box are cubic; for a non-cubic mesh or box the largest of the three axes'
    values is used (the loosest bound, so no file valid on any axis is refused).

    Parameters
    ----------
    Nmesh : int or 3 ints
    BoxSize : float or 3 floats
        Mpc/h (LDL hard-codes 205).
    """
    n = mesh_vector(Nmesh, "LDL's k bound").astype(float)
    box = box_vector(BoxSize, "LDL's k bound")
    return float(np.max(2.0 * np.pi * n / box))


def ldl_bounds(target: str, n_layers: int, Nmesh, BoxSize) -> tuple[np.ndarray, np.ndarray]:
    """LDL's bounds on the physical parameters of a jerald-ldl model, in our table's order.

    Parameters
    ----------
    target : {"dm", "stellar"}
        ``dm`` (LDL's ``baryon=False``: the layers only) or ``stellar`` (every other LDL
        target: the layers, then ``w, mu, b`` in our order).
    n_layers : int
        Displacement layers (LDL's ``Nstep``).
    Nmesh, BoxSize
        The mesh, for the upper bound of ``kh`` and ``kl`` (:func:`ldl_k_max`).

    Returns
    -------
    lower, upper : numpy arrays
        Physical bounds, ``-inf`` / ``inf`` where LDL has none; the sources are in
        :data:`LDL_BOUNDS`.
    """
    if target not in ("dm", "stellar"):
        raise ValueError(
            f"LDL's models are 'dm' and 'stellar' (all baryon targets), got {target!r}"
        )
    k_max = ldl_k_max(Nmesh, BoxSize)
    lower, upper = [], []
    for spec in table(target, n_layers):
        lo, hi, _ = LDL_BOUNDS[spec.name.split("_")[0]]
        lower.append(-math.inf if lo is None else float(lo))
        upper.append(math.inf if hi is None else k_max if hi == "k_max" else float(hi))
    return np.array(lower), np.array(upper)


def ldl_table(target: str, n_layers: int, Nmesh, BoxSize, w_init: float = 1.0) -> list[ParamSpec]:
    """Our parameter table of an LDL model with LDL's bounds instead of ours.

    Names, scalings and initial values are those of :func:`table`; only the bounds differ (see
    :data:`LDL_BOUNDS`: e.g. ``w >= 0`` where ours is ``w >= 1e-5``, ``kl >= 0.03`` where ours is
    ``kl >= 0.1``), so that any vector LDL's optimiser can produce loads and trains.

    Parameters
    ----------
    target, n_layers, Nmesh, BoxSize
        As for :func:`ldl_bounds`.
    w_init : float
        Initial ``w`` (LDL's ``b1``) of the stellar form.
    """
    lower, upper = ldl_bounds(target, n_layers, Nmesh, BoxSize)
    specs = table(target, n_layers, w_init=w_init)
    return [
        dataclasses.replace(s, lower=float(lo), upper=float(hi))
        for s, lo, hi in zip(specs, lower, upper, strict=True)
    ]
