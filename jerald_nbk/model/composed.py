"""Composed models: a stage's map raised to a power and multiplied by a fixed field.

LDL's tSZ and X-ray fits (Dai & Seljak, ``LDL.py`` / ``model.py``'s ``smoothed_residue``) compare
``F^index * field2`` with the observable, ``F`` being the map of an ordinary LDL model and
``field2`` a fixed map (the true temperature, or the frozen electron-density model)::

    F = LDL(param, X, pm, Nstep, baryon)
    if index != 1: F = F ** index
    if field2 is not None: F = F * field2

:class:`ComposedModel` holds a :class:`~jerald_nbk.model.pipeline.Stage` and ``(index, field2)``
and exposes what training and evaluation use of a stage, by *calling* the stage's public methods
(it does not subclass :class:`Stage`, so a change of :meth:`Stage.forward`'s internals cannot
break it):

* ``table`` (names, scalings, initial values, bounds; may carry other bounds than the stage's,
  e.g. LDL's: :func:`jerald_nbk.model.params.ldl_table`), ``pm``, ``config``, ``n_params()``;
* ``forward(pos, raw, star=None, density0=None)``: the composed map (what
  :class:`~jerald_nbk.train.loop.Objective` fits);
* ``base(pos, raw, star=None, density0=None)``: the stage's own map ``F``;
* ``displace(pos, raw, density0=None)``: the stage's displaced particles.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np

from .params import ParamTable
from .pipeline import Stage


def safe_power(x, p: float):
    """``x^p`` for ``x >= 0`` with a finite gradient at ``x = 0`` (0 there), any ``p > 0``.

    Parameters
    ----------
    x : array
        Non-negative values (a ReLU output).
    p : float
        Exponent; ``p = 1`` returns ``x`` itself.
    """
    if p == 1:
        return x
    pos = x > 0
    return jnp.where(pos, jnp.where(pos, x, 1.0) ** p, 0.0)


class ComposedModel:
    """``stage(pos, raw)^index * field2``: a stage's map composed with a fixed field.

    Parameters
    ----------
    stage : Stage
        The underlying model; its parameters (and parameter files) are the composed model's.
    index : float
        Power of the stage's map (LDL: 1 for tSZ, 2 for X-ray's ``n_e``, 0.5 for its ``T``).
    field2 : real mesh, optional
        Fixed factor on the engine's local mesh (None: 1).
    specs : sequence of ParamSpec, optional
        The parameter table to train with: same names and scalings as the stage's, other bounds
        or initial values allowed (e.g. LDL's bounds). Default: the stage's table.
    """

    def __init__(self, stage: Stage, index: float = 1.0, field2=None, specs=None):
        if not index > 0:
            raise ValueError(f"index must be > 0, got {index}")
        self.stage = stage
        self.index = float(index)
        self.field2 = field2
        if specs is None:
            self.table = stage.table
        else:
            tab = ParamTable(specs)
            if tab.names != stage.table.names or not np.array_equal(tab.scale, stage.table.scale):
                raise ValueError(
                    f"the composed model's table {list(tab.names)} (scales {tab.scale.tolist()}) "
                    f"does not match the stage's {list(stage.table.names)} "
                    f"(scales {stage.table.scale.tolist()})"
                )
            self.table = tab

    @property
    def pm(self):
        """The stage's engine."""
        return self.stage.pm

    @property
    def config(self):
        """The stage's :class:`~jerald_nbk.model.pipeline.StageConfig`."""
        return self.stage.config

    def n_params(self) -> int:
        """Number of parameters (the stage's)."""
        return len(self.table)

    def with_field2(self, field2) -> ComposedModel:
        """The same model (same stage, index and table) with another fixed factor.

        Parameters
        ----------
        field2 : real mesh or None
            The new factor (None: 1). A compiled training step passes it as an argument.
        """
        out = copy.copy(self)
        out.field2 = field2
        return out

    def static_key(self):
        """Hashable key of what a compiled step bakes in from this model (``field2`` excluded).

        None when the stage's :meth:`~jerald_nbk.model.pipeline.Stage.static_key` is None.
        """
        inner = self.stage.static_key()
        return None if inner is None else (type(self), inner, self.index)

    def base(self, pos, raw, star=None, density0=None):
        """The stage's own map ``F`` (see :meth:`Stage.forward`)."""
        return self.stage.forward(pos, raw, star=star, density0=density0)

    def forward(self, pos, raw, star=None, density0=None):
        """The composed map ``F^index * field2`` on the local mesh.

        Parameters
        ----------
        pos : (N, 3) array
            Input particles.
        raw : array
            Raw parameter vector.
        star : real mesh, optional
            Passed to the stage (HI stages).
        density0 : real mesh, optional
            ``pm.density(pos)`` if already known.
        """
        out = safe_power(self.base(pos, raw, star=star, density0=density0), self.index)
        return out if self.field2 is None else out * self.field2

    def displace(self, pos, raw, density0=None):
        """The stage's displaced particles (see :meth:`Stage.displace`)."""
        return self.stage.displace(pos, raw, density0=density0)


def make_composed_stage(
    pm, config, index: float = 1.0, field2=None, w_init: float = 1.0, specs=None
) -> ComposedModel:
    """A :class:`ComposedModel` of a new :class:`Stage` (``pm``, ``config``, ``w_init``).

    Parameters
    ----------
    pm : ParticleMesh
    config : StageConfig
    index : float
        Power of the stage's map.
    field2 : real mesh, optional
        Fixed factor (None: 1).
    w_init : float
        Initial ``w`` of the stage's final transform.
    specs : sequence of ParamSpec, optional
        The table to train with (default: the stage's).
    """
    return ComposedModel(Stage(pm, config, w_init=w_init), index, field2, specs)


__all__ = ["ComposedModel", "make_composed_stage", "safe_power"]
