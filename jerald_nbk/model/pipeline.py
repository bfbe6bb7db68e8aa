"""The JERALD pipeline (paper fig 1): DM layers -> improved particles -> stellar map; improved
particles + frozen stellar map -> HI map.

A :class:`Stage` is one target's model: its parameter table and its forward function, written once
against :class:`~jerald_nbk.pm.base.ParticleMesh` so that it runs on either engine. A
:class:`Pipeline` chains trained stages; each stage is trained with the earlier ones frozen.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..pm.base import ParticleMesh
from . import layers, transforms
from .params import ParamTable, dm_layer_names, hi_layer_names, table


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
    green : {"dm", "sm"} or None
        Green's function of the layers; default eq 7 for DM, eq 6 otherwise (LDL uses eq 6 for all).
    """

    target: str
    n_layers: int = 2
    gradient_order: int | str = 6
    hi_shift: bool = False
    green: str | None = None

    @property
    def green_kind(self) -> str:
        return self.green or ("dm" if self.target == "dm" else "sm")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Stage:
    """One target's model: parameters and forward map.

    Parameters
    ----------
    pm : ParticleMesh
        Engine (its Nmesh/BoxSize define the output mesh).
    config : StageConfig
    w_init : float
        Initial amplitude of the final transform (stellar/HI); see :func:`params.table`.
    """

    def __init__(self, pm: ParticleMesh, config: StageConfig, w_init: float = 1.0):
        self.pm = pm
        self.config = config
        self.table = ParamTable(table(config.target, config.n_layers, config.hi_shift, w_init))

    def _phys(self, raw):
        # the parameters are replicated over MPI ranks: their gradient is summed over the ranks
        raw = self.pm.replicated(raw)
        return dict(zip(self.table.names, self.table.to_physical(raw), strict=True))

    def displace(self, pos, raw, density0=None):
        """Positions after this stage's displacement layers.

        ``density0``: ``pm.density(pos)`` if already known (saves the first layer's paint).
        """
        p = self._phys(jnp.asarray(raw))
        cfg, pm = self.config, self.pm
        if cfg.target == "hi":
            raise ValueError("HI layers need the stellar map: use forward(pos, raw, star=...)")
        for i in range(cfg.n_layers):
            a, g, kh, kl, nu = (p[n] for n in dm_layer_names(i))
            pos = layers.displacement_layer(
                pm,
                pos,
                a,
                g,
                kh,
                kl,
                nu,
                cfg.green_kind,
                cfg.gradient_order,
                density0 if i == 0 else None,
            )
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
        for i in range(cfg.n_layers):
            names = hi_layer_names(i)
            p1 = tuple(p[n] for n in names[:5])
            p2 = tuple(p[n] for n in names[5:])
            pos = layers.hi_layer(
                pm, pos, star, p1, p2, cfg.gradient_order, density0 if i == 0 else None
            )
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
