"""The model on the MPI engine: loss and gradient of every stage equal the single-process JAX
engine's (float64, 1e-10 relative), with the particles split over the ranks.

Runs on one process (pmesh engine on one rank) under ``pytest`` and on two under
``mpiexec -n 2 python -m pytest --with-mpi -m mpi``; the pmesh engine's step runs eagerly and
compiled (:meth:`PmeshEngine.jit`, as the training loop calls it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mpi4py import MPI

from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.pm import JaxEngine, PmeshEngine
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train.loss import masked_losses, smoothing_filter, split_masks

COMM = MPI.COMM_WORLD
N, L = 16, 20.0


def _loss_and_grad(pm, stage, pos, target, star, raw, compiled=False):
    masks = split_masks(pm)
    filt = smoothing_filter(pm, 1.0)

    def f(r):
        F = stage.forward(pos, r, star=star)
        out = masked_losses(
            pm, F, target, masks, p=1 if stage.config.target != "dm" else 2, filt=filt
        )
        return out["train"], out

    vg = jax.value_and_grad(f, has_aux=True)
    (val, out), g = (pm.jit(vg) if compiled else vg)(raw)
    return float(val), {k: float(v) for k, v in out.items()}, np.asarray(g)


@pytest.mark.parametrize(
    "cfg",
    [StageConfig("dm", 2), StageConfig("stellar", 1), StageConfig("hi", 1, hi_shift=True)],
    ids=["dm", "stellar", "hi"],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "ranks",
    [pytest.param(1, id="1rank"), pytest.param(2, id="mpi", marks=pytest.mark.mpi(min_size=2))],
)
def test_stage_loss_and_gradient_match_single_process(cfg, ranks, compiled):
    if ranks == 1 and COMM.size > 1:
        pytest.skip("the single-rank variant runs without mpiexec")
    pos = zeldovich_particles(N, L, seed=5, rms_disp=0.6, dtype=np.float64)
    rng = np.random.default_rng(0)
    target = rng.uniform(0.0, 2.0, (N, N, N))
    jp = JaxEngine(N, L, dtype="f8")
    star_full = np.asarray(jp.density(pos)) * 0.5 + 0.1
    stage_j = Stage(jp, cfg)
    raw = stage_j.table.init_raw()
    raw = raw + 0.05 * rng.normal(size=raw.shape) * (np.abs(raw) + 0.5)
    raw = np.asarray(stage_j.table.project(jnp.asarray(raw)))
    ref = _loss_and_grad(
        jp, stage_j, jnp.asarray(pos), jnp.asarray(target), jnp.asarray(star_full), jnp.asarray(raw)
    )

    pp = PmeshEngine(N, L, dtype="f8", comm=COMM)
    mine = pos[COMM.rank :: COMM.size]  # any split of the particles over the ranks
    star = pp.to_local(star_full) if cfg.target == "hi" else None
    got = _loss_and_grad(
        pp,
        Stage(pp, cfg),
        jnp.asarray(mine),
        pp.to_local(target),
        star,
        jnp.asarray(raw),
        compiled,
    )
    assert got[0] == pytest.approx(ref[0], rel=1e-10)
    for k in ("train", "validation", "test"):
        assert got[1][k] == pytest.approx(ref[1][k], rel=1e-10)
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-8, atol=1e-12 * np.abs(ref[2]).max())
