"""Compile once, run many (issue 14, item 3): particles, targets, masks and fixed fields are
arguments of the compiled training step and of the compiled pipeline maps, so new simulations of
the same shapes do not recompile, and what they compute is theirs, not the first one's.

Compilations are counted by :data:`jerald_nbk.train.loop.TRACES` (one trace of a jitted function
is one compilation) and by the jitted functions' own cache sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jerald_nbk.model.composed import make_composed_stage
from jerald_nbk.model.pipeline import Pipeline, Stage, StageConfig
from jerald_nbk.pm import JaxEngine
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train import loop
from jerald_nbk.train.loop import Objective, TrainConfig
from jerald_nbk.train.loss import masked_losses, selection_losses, split_masks

N, L = 16, 25.0
CFG = TrainConfig(progress=False)


def _particles(seed, dtype=np.float64):
    return jnp.asarray(zeldovich_particles(N, L, seed=seed, rms_disp=0.5, dtype=dtype))


def _eager_losses(stage, pos, target, raw, star=None, p=2):
    """The losses computed eagerly, without any compiled or cached function."""
    pm = stage.pm
    masks = split_masks(pm, "paper")
    F = stage.forward(pos, raw, star=star, density0=pm.density(pos))
    out = masked_losses(pm, F, target, masks, p)
    out |= selection_losses(pm, F, target, masks, p)
    return {k: float(v) for k, v in out.items()}


def _raw(stage):
    raw = stage.table.init_raw()
    raw[0] = 5.0  # a visible first-layer alpha
    return jnp.asarray(raw)


def test_two_simulations_of_the_same_shapes_compile_once():
    pm = JaxEngine(N, L, dtype="f8")
    pos1, pos2 = _particles(1), _particles(2)
    stage1 = Stage(pm, StageConfig("dm", 1))
    stage2 = Stage(JaxEngine(N, L, dtype="f8"), StageConfig("dm", 1))  # another engine, same mesh
    target1 = pm.density(_particles(3)) * 1.1
    target2 = pm.density(_particles(4)) * 0.9
    before = dict(loop.TRACES)
    obj1 = Objective(stage1, pos1, target1, CFG)
    obj2 = Objective(stage2, pos2, target2, CFG)
    raw = _raw(stage1)
    out1, g1 = obj1.value_and_grad(raw)
    out2, g2 = obj2.value_and_grad(raw)
    out2b, _ = obj2.value_and_grad(raw * 1.01)
    assert loop.TRACES["value_and_grad"] - before["value_and_grad"] == 1
    assert obj1._value_and_grad is obj2._value_and_grad
    assert obj2._value_and_grad._cache_size() == 1
    # each Objective computes with its own particles and target
    for obj, pos, target, out in ((obj1, pos1, target1, out1), (obj2, pos2, target2, out2)):
        ref = _eager_losses(obj.stage, pos, target, raw)
        for k, v in ref.items():
            assert float(out[k]) == pytest.approx(v, rel=1e-10)
        assert obj.losses(raw)["train"] == pytest.approx(ref["train"], rel=1e-10)
    assert float(out1["train"]) != pytest.approx(float(out2["train"]), rel=1e-3)
    assert not np.allclose(np.asarray(g1), np.asarray(g2))
    assert float(out2b["train"]) != float(out2["train"])
    assert loop.TRACES["losses"] - before["losses"] == 1


def test_other_shapes_or_configurations_compile_again():
    pm = JaxEngine(N, L, dtype="f8")
    stage = Stage(pm, StageConfig("dm", 1))
    target = pm.density(_particles(3))
    raw = _raw(stage)
    Objective(stage, _particles(1), target, CFG).value_and_grad(raw)
    before = loop.TRACES["value_and_grad"]
    # another particle count: the same cached function traces again (jit's own cache)
    fewer = _particles(1)[: N**3 // 2]
    Objective(stage, fewer, target, CFG).value_and_grad(raw)
    assert loop.TRACES["value_and_grad"] == before + 1
    # another layer count: another function
    two = Stage(pm, StageConfig("dm", 2))
    Objective(two, _particles(1), target, CFG).value_and_grad(jnp.asarray(two.table.init_raw()))
    assert loop.TRACES["value_and_grad"] == before + 2


def test_hi_stage_takes_its_stellar_map_as_an_argument():
    pm = JaxEngine(N, L, dtype="f8")
    stage = Stage(pm, StageConfig("hi", 1))
    pos = _particles(1)
    star1 = pm.density(_particles(5)) + 0.1
    star2 = pm.density(_particles(6)) + 0.1
    target = pm.density(_particles(3))
    raw = jnp.asarray(stage.table.init_raw())
    before = loop.TRACES["value_and_grad"]
    outs = []
    for star in (star1, star2):
        obj = Objective(stage, pos, target, CFG, star=star)
        out, _ = obj.value_and_grad(raw)
        ref = _eager_losses(stage, pos, target, raw, star=star, p=obj.p)
        assert float(out["train"]) == pytest.approx(ref["train"], rel=1e-10)
        outs.append(float(out["train"]))
    assert loop.TRACES["value_and_grad"] == before + 1
    assert outs[0] != pytest.approx(outs[1], rel=1e-6)


def test_composed_model_field2_is_an_argument():
    pm = JaxEngine(N, L, dtype="f8")
    cfg = StageConfig("stellar", 1)
    pos = _particles(1)
    target = pm.density(_particles(3))
    fields = [pm.density(_particles(s)) + 0.5 for s in (7, 8)]
    before = loop.TRACES["value_and_grad"]
    outs = []
    for field2 in fields:
        model = make_composed_stage(pm, cfg, 2.0, field2)
        raw = jnp.asarray(model.table.init_raw())
        obj = Objective(model, pos, target, CFG)
        out, _ = obj.value_and_grad(raw)
        F = model.forward(pos, raw)  # eager, with this model's own field2
        ref = masked_losses(pm, F, target, split_masks(pm), obj.p)["train"]
        assert float(out["train"]) == pytest.approx(float(ref), rel=1e-10)
        outs.append(float(out["train"]))
    assert loop.TRACES["value_and_grad"] == before + 1
    assert outs[0] != pytest.approx(outs[1], rel=1e-6)


def test_remat_gives_the_same_losses_and_gradient():
    pm = JaxEngine(N, L, dtype="f8")
    pos, target = _particles(1), pm.density(_particles(3))
    res = []
    for remat in (False, True):
        stage = Stage(pm, StageConfig("dm", 2), remat=remat)
        out, g = Objective(stage, pos, target, CFG).value_and_grad(_raw(stage))
        res.append((float(out["train"]), np.asarray(g)))
    assert res[0][0] == pytest.approx(res[1][0], rel=1e-12)
    np.testing.assert_allclose(res[0][1], res[1][1], rtol=1e-9, atol=1e-14)


def test_pipeline_maps_many_compiles_once_and_matches_maps():
    pm = JaxEngine(N, L, dtype="f8")
    dm = Stage(pm, StageConfig("dm", 1))
    st = Stage(pm, StageConfig("stellar", 1))
    hi = Stage(pm, StageConfig("hi", 1))
    pipe = Pipeline(
        dm=(dm, _raw(dm)),
        stellar=(st, jnp.asarray(st.table.init_raw())),
        hi=(hi, jnp.asarray(hi.table.init_raw())),
    )
    catalogs = [_particles(s) for s in (1, 2, 3)]
    got = list(pipe.maps_many(iter(catalogs)))
    assert pipe.maps_function()._cache_size() == 1
    assert len(got) == 3
    for pos, maps in zip(catalogs, got, strict=True):
        ref = pipe.maps(pos)
        assert set(maps) == {"dm", "stellar", "hi"}
        for k in ref:
            np.testing.assert_allclose(np.asarray(maps[k]), np.asarray(ref[k]), rtol=1e-9)
    assert not np.allclose(np.asarray(got[0]["hi"]), np.asarray(got[1]["hi"]))
    # another pipeline of the same configuration (other parameters) shares the compiled function
    other = Pipeline(dm=(Stage(JaxEngine(N, L, dtype="f8"), StageConfig("dm", 1)), _raw(dm) * 0.5))
    fn = other.maps_function()
    next(other.maps_many([catalogs[0]]))
    assert fn._cache_size() == 1
    assert fn is Pipeline(dm=(dm, _raw(dm))).maps_function()
    assert jax.tree_util.tree_structure(got[0]) == jax.tree_util.tree_structure(ref)
