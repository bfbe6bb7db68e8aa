"""Training one stage on several simulations at once (issue 14, item 4).

An :class:`~jerald_nbk.train.loop.Objective` given lists of input particles and target maps sums
the losses (and gradients) of its (input, target) pairs through the same compiled step as one
pair. The sums are checked against each pair's losses and gradient computed eagerly on its own
(``stage.forward`` and ``masked_losses`` op by op, ``jax.grad`` of that, no compiled or cached
function), and the run's identity (checkpoint fingerprint) covers every pair.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.pm import JaxEngine
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train import loop
from jerald_nbk.train.loop import Objective, RunMismatchError, TrainConfig, run_fingerprint, train
from jerald_nbk.train.loss import masked_losses, split_masks

N, L = 16, 25.0
CFG = TrainConfig(progress=False)


def _particles(seed, n=N):
    return jnp.asarray(zeldovich_particles(n, L, seed=seed, rms_disp=0.5, dtype=np.float64))


def _eager(stage, pos, target, raw, p, star=None):
    """One pair's region losses and train-loss gradient, eagerly (no jit, no shared function)."""
    pm = stage.pm
    masks = split_masks(pm, "paper")

    def losses(r):
        F = stage.forward(pos, r, star=star)
        return masked_losses(pm, F, target, masks, p)

    with jax.disable_jit():
        out = {k: float(v) for k, v in losses(raw).items()}
        g = np.asarray(jax.grad(lambda r: losses(r)["train"])(raw))
    return out, g


def _raw(stage):
    raw = stage.table.init_raw()
    raw[0] = 5.0  # a visible first-layer alpha
    return jnp.asarray(raw)


@pytest.fixture(scope="module")
def dm():
    pm = JaxEngine(N, L, dtype="f8")
    stage = Stage(pm, StageConfig("dm", 1))
    pos = [_particles(1), _particles(2)]
    targets = [pm.density(_particles(3)) * 1.1, pm.density(_particles(4)) * 0.9]
    return stage, pos, targets


def test_two_identical_pairs_give_twice_the_loss_and_gradient(dm):
    # catches: the pairs averaged instead of summed, or the second pair ignored
    stage, pos, targets = dm
    raw = _raw(stage)
    one = Objective(stage, pos[0], targets[0], CFG)
    two = Objective(stage, [pos[0], pos[0]], [targets[0], targets[0]], CFG)
    out1, g1 = one.value_and_grad(raw)
    out2, g2 = two.value_and_grad(raw)
    for k in ("train", "validation", "test", "validation_smoothed"):
        assert float(out2[k]) == pytest.approx(2 * float(out1[k]), rel=1e-12)
    np.testing.assert_allclose(np.asarray(g2), 2 * np.asarray(g1), rtol=1e-10)
    ref, gref = _eager(stage, pos[0], targets[0], raw, one.p)
    assert float(out2["train"]) == pytest.approx(2 * ref["train"], rel=1e-10)
    np.testing.assert_allclose(np.asarray(g2), 2 * gref, rtol=1e-8)


def test_two_different_pairs_sum_their_own_losses_and_gradients(dm):
    # catches: every pair computed with the first pair's particles or target (a pair's arrays
    # baked into the compiled step, or the loop reading the wrong entry)
    stage, pos, targets = dm
    raw = _raw(stage)
    cfg = TrainConfig(progress=False, loss_p=1)  # a configuration no other test compiles
    before = loop.TRACES["value_and_grad"]
    obj = Objective(stage, pos, targets, cfg)
    out, g = obj.value_and_grad(raw)
    out_b, _ = Objective(stage, pos[::-1], targets[::-1], cfg).value_and_grad(raw * 1.01)
    assert loop.TRACES["value_and_grad"] == before + 1  # one compile for every 2-pair objective
    refs = [_eager(stage, x, t, raw, obj.p) for x, t in zip(pos, targets, strict=True)]
    assert refs[0][0]["train"] != pytest.approx(refs[1][0]["train"], rel=1e-3)
    for k in ("train", "validation", "test"):
        assert float(out[k]) == pytest.approx(refs[0][0][k] + refs[1][0][k], rel=1e-10)
    np.testing.assert_allclose(np.asarray(g), refs[0][1] + refs[1][1], rtol=1e-8, atol=1e-12)
    assert obj.losses(raw)["train"] == pytest.approx(float(out["train"]), rel=1e-12)
    assert float(out_b["train"]) != float(out["train"])


def test_pairs_of_different_particle_counts_and_hi_stellar_maps():
    # catches: pairs stacked into one array (fails for other particle counts), or one stellar map
    # used for every HI pair
    pm = JaxEngine(N, L, dtype="f8")
    stage = Stage(pm, StageConfig("hi", 1))
    pos = [_particles(1), _particles(2, n=12)]
    stars = [pm.density(_particles(5)) + 0.1, pm.density(_particles(6)) + 0.2]
    targets = [pm.density(_particles(3)), pm.density(_particles(4)) * 2]
    raw = jnp.asarray(stage.table.init_raw())
    obj = Objective(stage, pos, targets, CFG, star=stars)
    out, g = obj.value_and_grad(raw)
    refs = [
        _eager(stage, x, t, raw, obj.p, star=s) for x, t, s in zip(pos, targets, stars, strict=True)
    ]
    assert float(out["train"]) == pytest.approx(refs[0][0]["train"] + refs[1][0]["train"], 1e-10)
    np.testing.assert_allclose(np.asarray(g), refs[0][1] + refs[1][1], rtol=1e-8, atol=1e-12)


def test_mismatched_lists_are_refused(dm):
    stage, pos, targets = dm
    with pytest.raises(ValueError, match="2 input particle sets, 1 target maps"):
        Objective(stage, pos, targets[:1], CFG)
    with pytest.raises(ValueError, match="both be arrays"):
        Objective(stage, pos, targets[0], CFG)
    with pytest.raises(ValueError, match="target 2"):
        Objective(stage, pos, [targets[0], targets[1][:4]], CFG)


def test_fingerprint_covers_every_pair_and_one_pair_keeps_its_names(dm, tmp_path):
    # catches: a resumed run silently continuing on another second simulation
    stage, pos, targets = dm
    one = run_fingerprint(Objective(stage, pos[0], targets[0], CFG), CFG)
    assert sorted(one["inputs"]) == ["particles", "target"]  # older checkpoints still match
    fp = run_fingerprint(Objective(stage, pos, targets, CFG), CFG)
    assert sorted(fp["inputs"]) == ["particles 1", "particles 2", "target 1", "target 2"]
    cfg = TrainConfig(steps=2, progress=False, checkpoint_every=1)
    train(Objective(stage, pos, targets, cfg), cfg, workdir=tmp_path)
    other = [targets[0], targets[1] * 1.5]
    more = TrainConfig(steps=3, progress=False, checkpoint_every=1)
    with pytest.raises(RunMismatchError, match="target 2"):
        train(Objective(stage, pos, other, more), more, workdir=tmp_path)


class _Kill(Exception):
    pass


def test_two_pair_run_resumes_exactly(dm, tmp_path):
    # catches: resume state that depends on the pair count (e.g. a pair dropped on reload)
    stage, pos, targets = dm
    cfg = TrainConfig(steps=5, progress=False, checkpoint_every=1)
    full = train(Objective(stage, pos, targets, cfg), cfg, workdir=tmp_path / "full")

    def kill(rec):
        if rec["step"] == 2:
            raise _Kill

    with pytest.raises(_Kill):
        train(Objective(stage, pos, targets, cfg), cfg, workdir=tmp_path / "cut", log=kill)
    resumed = train(Objective(stage, pos, targets, cfg), cfg, workdir=tmp_path / "cut")
    np.testing.assert_array_equal(resumed.raw, full.raw)
    np.testing.assert_array_equal(resumed.best_raw, full.best_raw)
    assert [r["train"] for r in resumed.history] == [r["train"] for r in full.history]


@pytest.mark.parametrize(
    "ranks",
    [pytest.param(1, id="1rank"), pytest.param(2, id="mpi", marks=pytest.mark.mpi(min_size=2))],
)
def test_two_pairs_on_the_mpi_engine_match_the_jax_engine(ranks):
    # catches: a pair's share on one rank paired with another pair's (ranks holding different
    # particle counts per simulation), or the pairs' sum broken on the engine that runs eagerly
    from mpi4py import MPI

    from jerald_nbk.pm import PmeshEngine

    comm = MPI.COMM_WORLD
    if ranks == 1 and comm.size > 1:
        pytest.skip("the single-rank variant runs without mpiexec")
    jp = JaxEngine(N, L, dtype="f8")
    cfg = StageConfig("hi", 1)
    pos = [np.asarray(_particles(1)), np.asarray(_particles(2, n=12))]
    stars = [np.asarray(jp.density(_particles(5))) + 0.1, np.asarray(jp.density(_particles(6)))]
    stars[1] = stars[1] * 0.5 + 0.2
    targets = [np.asarray(jp.density(_particles(3))), np.asarray(jp.density(_particles(4))) * 2]
    stage = Stage(jp, cfg)
    raw = jnp.asarray(stage.table.init_raw())
    conf = TrainConfig(progress=False, smoothing_n=1.0)
    ref = Objective(stage, [jnp.asarray(x) for x in pos], targets, conf, star=stars)
    ref_out, ref_g = ref.value_and_grad(raw)

    pp = PmeshEngine(N, L, dtype="f8", comm=comm)
    # unequal shares: the first simulation strided over the ranks, the second in blocks
    mine = [pos[0][comm.rank :: comm.size], np.array_split(pos[1], comm.size)[comm.rank]]
    obj = Objective(
        Stage(pp, cfg),
        [jnp.asarray(x) for x in mine],
        [pp.to_local(t) for t in targets],
        conf,
        star=[pp.to_local(s) for s in stars],
    )
    out, g = obj.value_and_grad(raw)
    for k in ("train", "validation", "test"):
        assert float(out[k]) == pytest.approx(float(ref_out[k]), rel=1e-10)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-8, atol=1e-12)
    fp = run_fingerprint(obj, conf)
    assert "particles 2" in fp["inputs"] and "stellar map 2" in fp["inputs"]


def test_pipeline_on_two_simulations_pairs_each_with_its_own_inputs(tmp_path):
    """workflow.train_pipeline with lists fits every stage to both simulations, each stage's
    pair i built from simulation i: the DM-improved particles of sim i and, for HI, sim i's own
    stellar map from the trained stellar stage. Checked through the checkpoints' fingerprints of
    every pair's inputs (computed here from the trained stages). Catches a star or an input of
    one simulation paired with the other's target, or a simulation dropped after the DM stage."""
    import json as _json

    from jerald_nbk.utils import fingerprint_array
    from jerald_nbk.workflow import train_pipeline

    pm = JaxEngine(N, L, dtype="f8")
    sims = [_particles(s) for s in (3, 4)]
    truths = []
    for s in (13, 14):
        rho = pm.density(_particles(s))
        truths.append({"dm": rho, "stellar": jnp.maximum(rho - 1.5, 0.0), "hi": rho**1.2})
    run = train_pipeline(pm, sims, truths, tmp_path, 2.0, steps=2, layers=1, progress=False)
    dm, st = run.runs["dm"], run.runs["stellar"]
    improved = [dm.stage.displace(p, dm.result.best_raw) for p in sims]
    stars = [st.stage.forward(x, st.result.best_raw) for x in improved]
    expect = {
        "dm": {"particles": sims, "target": [t["dm"] for t in truths]},
        "stellar": {"particles": improved, "target": [t["stellar"] for t in truths]},
        "hi": {"particles": improved, "target": [t["hi"] for t in truths], "stellar map": stars},
    }
    for t, arrays in expect.items():
        with np.load(tmp_path / f"train_{t}" / "checkpoint.npz") as z:
            found = _json.loads(bytes(z["fingerprint"]).decode())["inputs"]
        for name, per_sim in arrays.items():
            for i, a in enumerate(per_sim):
                assert found[f"{name} {i + 1}"] == fingerprint_array(a), (t, name, i)
    # the maps returned are the first simulation's
    np.testing.assert_allclose(
        run.maps["hi"],
        run.runs["hi"].stage.forward(improved[0], run.runs["hi"].result.best_raw, star=stars[0]),
        rtol=1e-12,
    )
