"""The JERALD pipeline (paper fig 1): DM layers -> improved particles -> stellar map; improved
particles + frozen stellar map -> HI map.

A :class:`Stage` is one target's model: its parameter table and its forward function, written once
against :class:`~jerald_nbk.pm.base.ParticleMesh` so that it runs on either engine. A
:class:`Pipeline` chains trained stages; each stage is trained with the earlier ones frozen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..pm.base import ParticleMesh
from . import layers, transforms
from .layers import green_name
from .params import dm_layer_names, hi_layer_names, table_for

#: :class:`Stage`'s ``remat`` on the JAX engine when not given. Off: measured (issue 14), the
#: rematerialised layers do not lower the step's peak (compiled temporaries at 64^3: 1-layer DM
#: 80.5 -> 82.9 B/particle, 2-layer DM 140.8 -> 140.8, HI 196 -> 200; 1-layer DM step's peak RSS
#: at 128^3: 189 -> 203 B/particle), the peak being in the backward pass, and add a layer forward.
REMAT_DEFAULT = False


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Configuration of one stage.

    Attributes
    ----------
    target : {"dm", "stellar", "hi"}
    n_layers : int
        Displacement layers (paper: 2; 3 for stellar mass at z = 5).
    gradient_order : {4, 6, "exact"}
        Fourier finite-difference order of the gradients (JERALD: 6, LDL: 4).
    hi_shift : bool
        HI: fit the reference code's shift ``zs`` in eq 13.
    green : {"exponential", "gaussian"} or None
        Green's function of the layers by the shape of its cut-offs: default eq 7 (exponential)
        for DM, eq 6 (Gaussian) otherwise (LDL uses eq 6 for all). The first release's names
        ``"dm"`` and ``"sm"`` are accepted and stored as the new ones.
    amplitude : float
        The target map's amplitude (mean per cell): the initial ``w`` and the unit in which the
        optimiser sees the terms in the map's units (:func:`params.table`). 1: unscaled, as the
        reference codes' optimisers and files have it.
    """

    target: str
    n_layers: int = 2
    gradient_order: int | str = 6
    hi_shift: bool = False
    green: str | None = None
    amplitude: float = 1.0

    def __post_init__(self):
        if self.green is not None:
            object.__setattr__(self, "green", green_name(self.green))

    @property
    def green_kind(self) -> str:
        """The Green's function the layers use: :attr:`green`, or the target's default."""
        return self.green or ("exponential" if self.target == "dm" else "gaussian")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Stage:
    """One target's model: parameters and forward map.

    Parameters
    ----------
    pm : ParticleMesh
        Engine (its Nmesh/BoxSize define the output mesh).
    config : StageConfig
    w_init : float, optional
        Initial ``w`` of the final transform (stellar/HI); default ``config.amplitude``
        (:func:`params.table`).
    b_init : float
        Stellar: initial threshold ``b`` of eq 8 (:func:`params.stellar_start`); default 0.
    remat : bool or None
        Rematerialise each displacement layer in the backward pass (``jax.checkpoint``): the
        gradient keeps only each layer's input instead of its meshes, and recomputes the layer's
        forward pass. Same values, less memory, one more layer forward per step. None (default):
        :data:`REMAT_DEFAULT` on the JAX engine, off on the MPI engine.
        Not part of the run fingerprint: it does not change what a step computes.
    """

    def __init__(
        self,
        pm: ParticleMesh,
        config: StageConfig,
        w_init: float | None = None,
        remat: bool | None = None,
        b_init: float = 0.0,
    ):
        self.pm = pm
        self.config = config
        self.table = table_for(config, w_init, b_init)
        if remat is None:
            remat = REMAT_DEFAULT and pm.static_key() is not None
        self.remat = bool(remat)

    def static_key(self):
        """Hashable key of what a compiled forward pass bakes in from this stage, or None.

        ``(engine key, config, parameter names and scales, remat)``: two stages with equal keys
        compute the same map from the same particles and parameters, so a function compiled for
        one serves the other (see :meth:`ParticleMesh.static_key`). None when the engine shares
        nothing (MPI) or for a subclass (which may hold arrays; it may override this).
        """
        pm_key = self.pm.static_key()
        if pm_key is None or type(self) is not Stage:
            return None
        scales = tuple(float(x) for x in self.table.scale)
        return (pm_key, self.config, self.table.names, scales, self.remat)

    def _layer(self, fn):
        """``fn`` (one displacement layer), rematerialised in the backward pass if ``remat``."""
        return jax.checkpoint(fn) if self.remat else fn

    def _phys(self, raw):
        # the parameters are replicated over MPI ranks: their gradient is summed over the ranks
        raw = self.pm.replicated(raw)
        # in the engine's dtype: the float64 scales would otherwise make a float32 engine's
        # meshes float64 under JAX's x64 mode (twice the memory, not what production runs)
        phys = jnp.asarray(self.table.to_physical(raw), dtype=self.pm.dtype)
        return dict(zip(self.table.names, phys, strict=True))

    def displace(self, pos, raw, density0=None):
        """Positions after this stage's displacement layers.

        ``density0``: ``pm.density(pos)`` if already known (saves the first layer's paint).
        """
        p = self._phys(jnp.asarray(raw))
        cfg, pm = self.config, self.pm
        if cfg.target == "hi":
            raise ValueError("HI layers need the stellar map: use forward(pos, raw, star=...)")

        def layer(x, prm, density):
            return layers.displacement_layer(
                pm, x, *prm, cfg.green_kind, cfg.gradient_order, density
            )

        layer = self._layer(layer)
        for i in range(cfg.n_layers):
            prm = tuple(p[n] for n in dm_layer_names(i))
            pos = layer(pos, prm, density0 if i == 0 else None)
        return pos

    def forward(self, pos, raw, star=None, density0=None):
        """The predicted map F on the local mesh (eqs 9, 8 or 13).

        Parameters
        ----------
        pos : (N, 3) array
            Input particles (for stellar and HI: the DM-improved particles).
        raw : array
            Raw parameter vector of this stage.
        star : real mesh, optional
            HI only: the frozen stellar map (in its own units; it is normalised here).
        density0 : real mesh, optional
            ``pm.density(pos)`` if already known (training computes it once).
        """
        cfg, pm = self.config, self.pm
        raw = jnp.asarray(raw)
        if cfg.target == "dm":
            return transforms.dm_transform(pm.density(self.displace(pos, raw, density0)))
        p = self._phys(raw)
        if cfg.target == "stellar":
            x = self.displace(pos, raw, density0)
            if cfg.n_layers == 0 and density0 is not None:
                return transforms.stellar_transform(density0, p["w"], p["mu"], p["b"])
            return transforms.stellar_transform(pm.density(x), p["w"], p["mu"], p["b"])
        if star is None:
            raise ValueError("the HI stage needs the stellar map (star=...) from the stellar stage")
        star = transforms.star_overdensity(pm, star)

        def layer(x, star, p1, p2, density):
            return layers.hi_layer(pm, x, star, p1, p2, cfg.gradient_order, density)

        layer = self._layer(layer)
        for i in range(cfg.n_layers):
            names = hi_layer_names(i)
            p1 = tuple(p[n] for n in names[:5])
            p2 = tuple(p[n] for n in names[5:])
            pos = layer(pos, star, p1, p2, density0 if i == 0 else None)
        rho = density0 if (cfg.n_layers == 0 and density0 is not None) else pm.density(pos)
        return transforms.hi_transform(pm, rho, star, p)

    def n_params(self) -> int:
        return len(self.table)


@dataclasses.dataclass
class Pipeline:
    """Trained stages chained as in the paper's fig 1. Any stage may be missing (None)."""

    dm: tuple[Stage, np.ndarray] | None = None
    stellar: tuple[Stage, np.ndarray] | None = None
    hi: tuple[Stage, np.ndarray] | None = None

    def improve(self, pos):
        """DM-improved positions (the input unchanged when there is no DM stage)."""
        if self.dm is None:
            return jnp.asarray(pos)
        stage, raw = self.dm
        return stage.displace(pos, raw)

    def maps(self, pos, improved=None) -> dict:
        """All maps the pipeline can make from FastPM positions: ``dm``, ``stellar``, ``hi``.

        ``improved`` may pass the already computed :meth:`improve` of ``pos``.
        """
        x = self.improve(pos) if improved is None else improved
        out = {}
        if self.dm is not None:
            out["dm"] = self.dm[0].pm.density(x)
        if self.stellar is not None:
            out["stellar"] = self.stellar[0].forward(x, self.stellar[1])
        if self.hi is not None:
            if "stellar" not in out:
                raise ValueError("the HI stage needs a stellar stage in the pipeline")
            out["hi"] = self.hi[0].forward(x, self.hi[1], star=out["stellar"])
        return out

    def _stages(self) -> dict:
        return {k: v for k, v in (("dm", self.dm), ("stellar", self.stellar), ("hi", self.hi)) if v}

    def maps_function(self, improved: bool = False):
        """:meth:`maps` compiled once: ``f(pos, raws) -> maps``, ``raws`` a dict of raw vectors.

        The positions and the stages' parameters are arguments, so one compilation serves every
        catalog with the same particle count (and every pipeline whose stages have the same
        static configuration: the compiled function is cached by their
        :meth:`Stage.static_key`). On the MPI engine it is compiled per pipeline (not shared
        between engine objects). Each trace (each compilation) is counted in :data:`TRACES` ``["maps"]``.

        Parameters
        ----------
        improved : bool
            Also return the DM-improved positions (:meth:`improve`) under ``"improved"``.
        """
        stages = self._stages()
        if not stages:
            raise ValueError("the pipeline has no stage")
        keys = (tuple((k, s.static_key()) for k, (s, _) in stages.items()), bool(improved))
        if any(key is None for _, key in keys[0]):
            own = self.__dict__.setdefault("_maps_fns", {})  # this pipeline's own functions
            if keys[1] not in own:
                own[keys[1]] = _maps_function(stages, improved)
            return own[keys[1]]
        fn = _MAPS_CACHE.pop(keys, None) or _maps_function(stages, improved)
        _MAPS_CACHE[keys] = fn
        while len(_MAPS_CACHE) > _MAPS_CACHE_SIZE:
            del _MAPS_CACHE[next(iter(_MAPS_CACHE))]
        return fn

    def maps_many(self, catalogs: Iterable) -> Iterator[dict]:
        """The maps of many catalogs, one compilation for all: yields one :meth:`maps` dict each.

        Parameters
        ----------
        catalogs : iterable of (N, 3) arrays
            FastPM positions (Mpc/h), consumed lazily (a generator reading one file at a time
            holds one catalog in memory). Each particle count compiles once.

        Yields
        ------
        dict
            ``{"dm", "stellar", "hi"}`` maps (those the pipeline can make) of each catalog, as
            JAX arrays on the engine's local mesh; they are computed asynchronously, so reading
            one (e.g. ``np.asarray``) waits for it while the next catalog is being read.

        Examples
        --------
        >>> for i, maps in enumerate(pipeline.maps_many(np.load(f) for f in files)):
        ...     np.save(f"hi_{i}.npy", np.asarray(maps["hi"]))
        """
        fn = self.maps_function()
        raws = {k: jnp.asarray(raw) for k, (_, raw) in self._stages().items()}
        for pos in catalogs:
            yield fn(jnp.asarray(pos), raws)


#: compiled :meth:`Pipeline.maps` functions by the stages' static keys (least recently used
#: dropped first beyond :data:`_MAPS_CACHE_SIZE`)
_MAPS_CACHE: dict = {}
_MAPS_CACHE_SIZE = 8

#: traces of the compiled :meth:`Pipeline.maps_function` functions: one trace is one compilation
#: (both engines compile: :meth:`ParticleMesh.jit`)
TRACES: dict = {"maps": 0}


def _maps_function(stages: dict, improved: bool = False):
    """``f(pos, raws) -> maps`` for the stages ``{name: (Stage, raw)}`` (their raws unused)."""

    def maps(pos, raws):
        TRACES["maps"] += 1
        pipe = Pipeline(**{k: (stage, raws[k]) for k, (stage, _) in stages.items()})
        x = pipe.improve(pos)
        out = pipe.maps(pos, improved=x)
        if improved:
            out["improved"] = x
        return out

    return next(iter(stages.values()))[0].pm.jit(maps)
