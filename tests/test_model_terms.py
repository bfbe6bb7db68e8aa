"""Every term of the model learns (issue 10): a finite, non-zero gradient for every parameter of
every target at its initial value, every parameter moving in a short training, finite maps, losses
and gradients at the corners of the bounds, the one k = 0 policy and a stellar floor that does not
depend on the stellar map's units.

Inputs are the smoke reference suite (FastPM particles and high-resolution truth maps at z = 2),
on the JAX engine in float64.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jerald_nbk.model import transforms
from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.pm import JaxEngine
from jerald_nbk.pm.fourier import K0_VALUES
from jerald_nbk.train.loop import Objective, TrainConfig, train

Z = 2.0


@pytest.fixture(scope="module")
def smoke(smoke_suite):
    """Engine, FastPM particles and truth maps (dm, stellar, hi) of the smoke suite at z = 2."""
    from jerald_nbk.workflow import read_map, read_particles

    paths = smoke_suite["paths"]
    pm = JaxEngine(32, 25.0, dtype="f8")
    pos, _ = read_particles(paths["fastpm_z2"], pm)
    maps = {t: read_map(paths[f"truth_{t}_z2"], pm)[0] for t in ("dm", "stellar", "hi")}
    return pm, jnp.asarray(pos, dtype=jnp.float64), maps


def _w_init(pm, target_map) -> float:
    return max(float(pm.sum(target_map)) / pm.ncells, 1e-5)


#: (id, StageConfig kwargs, target map, composed (index, second field) for jerald-ldl targets)
CASES = [
    ("dm-2", {"target": "dm", "n_layers": 2}, "dm", None),
    ("stellar-2", {"target": "stellar", "n_layers": 2}, "stellar", None),
    ("stellar-3", {"target": "stellar", "n_layers": 3}, "stellar", None),
    ("hi-2", {"target": "hi", "n_layers": 2}, "hi", None),
    ("hi-2-zs", {"target": "hi", "n_layers": 2, "hi_shift": True}, "hi", None),
    ("hi-0", {"target": "hi", "n_layers": 0}, "hi", None),
    # jerald-ldl: LDL's eq-6 Green's function and 4th-order gradient for every target
    ("ldl-dm", {"target": "dm", "n_layers": 2, "gradient_order": 4, "green": "sm"}, "dm", None),
    (
        "ldl-Mstar",
        {"target": "stellar", "n_layers": 2, "gradient_order": 4, "green": "sm"},
        "stellar",
        None,
    ),
    (
        "ldl-tSZ_ne",
        {"target": "stellar", "n_layers": 1, "gradient_order": 4, "green": "sm"},
        "hi",
        (1.0, "dm"),
    ),
    (
        "ldl-Xray_ne",
        {"target": "stellar", "n_layers": 1, "gradient_order": 4, "green": "sm"},
        "hi",
        (2.0, "dm"),
    ),
]


def _stage(smoke, kwargs, target_name, composed):
    pm, pos, maps = smoke
    target = maps[target_name]
    cfg = StageConfig(**kwargs)
    w = 1.0 if cfg.target == "dm" else _w_init(pm, target)
    if composed is None:
        # the training path (workflow.train_stage): the map's amplitude sets w's start and unit
        stage = Stage(pm, StageConfig(**kwargs, amplitude=w))
    else:
        from jerald_nbk.model.composed import make_composed_stage

        index, field = composed
        field2 = maps[field]
        # the composed map F^index * field2 starts at the target's mean, as jerald-ldl starts it
        w = (_w_init(pm, target) / _w_init(pm, field2)) ** (1 / index)
        stage = make_composed_stage(pm, cfg, index, field2, w)
    star = maps["stellar"] if cfg.target == "hi" else None
    n = 1.0 if cfg.target != "dm" else 0.0
    return stage, pos, target, star, TrainConfig(steps=12, smoothing_n=n, progress=False)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_parameter_has_a_gradient_at_the_start(smoke, case):
    stage, pos, target, star, cfg = _stage(smoke, *case[1:])
    obj = Objective(stage, pos, target, cfg, star=star)
    raw0 = stage.table.project(jnp.asarray(stage.table.init_raw()))
    losses, g = obj.value_and_grad(raw0)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), dict(zip(stage.table.names, g, strict=True))
    # non-zero, and not a rounding-level remnant of an exact zero
    dead = [
        n for n, v in zip(stage.table.names, g, strict=True) if not abs(v) > 1e-12 * np.abs(g).max()
    ]
    assert not dead, f"{case[0]}: no gradient at the initial point for {dead}"
    assert np.isfinite(losses["train"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_short_training_moves_every_parameter(smoke, case):
    stage, pos, target, star, cfg = _stage(smoke, *case[1:])
    obj = Objective(stage, pos, target, cfg, star=star)
    res = train(obj, cfg)
    tab = stage.table
    start = tab.to_physical(np.asarray(tab.project(jnp.asarray(tab.init_raw()))))
    end = tab.to_physical(res.raw)
    frozen, on_bound = [], []
    for n, a, b, lo, hi in zip(tab.names, start, end, tab.lower, tab.upper, strict=True):
        if a != b:
            continue
        if b in (lo, hi):
            on_bound.append(n)  # resting on a bound, where the projection holds it
        else:
            frozen.append(n)
    assert not frozen, f"{case[0]}: never moved in {cfg.steps} steps: {frozen}"
    # a parameter may start on a bound and stay there, but that must be deliberate: none do now
    assert not on_bound, f"{case[0]}: held on a bound for the whole run: {on_bound}"
    assert res.history[-1]["train"] < res.history[0]["train"]


def _corners(tab, n: int, seed: int):
    """Parameter sets with every bounded parameter at a bound or its initial value."""
    rng = np.random.default_rng(seed)
    init = tab.to_physical(tab.init_raw())
    choices = [
        [v for v in (lo, hi) if np.isfinite(v)] or [x0]
        for x0, lo, hi in zip(init, tab.lower, tab.upper, strict=True)
    ]
    yield np.array([c[0] for c in choices])  # all lower bounds
    yield np.array([c[-1] for c in choices])  # all upper bounds
    for _ in range(n):
        yield np.array([rng.choice([*c, x0]) for c, x0 in zip(choices, init, strict=True)])


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("dm-2", "stellar-2", "hi-2-zs")])
def test_corners_of_the_bounds_give_finite_maps_losses_and_gradients(smoke, case):
    stage, pos, target, star, cfg = _stage(smoke, *case[1:])
    obj = Objective(stage, pos, target, cfg, star=star)
    tab = stage.table
    for phys in itertools.islice(_corners(tab, 6, seed=3), 8):
        raw = jnp.asarray(tab.to_raw(phys))
        F = stage.forward(pos, raw, star=star)
        losses, g = obj.value_and_grad(raw)
        where = dict(zip(tab.names, phys, strict=True))
        assert np.all(np.isfinite(np.asarray(F))), where
        assert all(np.isfinite(v) for v in losses.values()), (losses, where)
        assert np.all(np.isfinite(np.asarray(g))), (dict(zip(tab.names, g, strict=True)), where)


def test_depletion_filter_at_k0_is_xi_and_never_overflows():
    pm = JaxEngine(16, 10.0, dtype="f8")
    # kIh -> 0 with nuI < 0: a floored k (1e-8) would give (1e-8)^-4.5 = 1e36 at k = 0
    O = np.asarray(transforms.filter_OI(pm, 0.0, 8.0, -4.5, 0.25))
    assert np.all(np.isfinite(O))
    assert O[0, 0, 0] == 0.25
    assert O.max() < 1e3  # the fundamental mode, k = 2 pi / 10: k^-4.5 ~ 8, not 1e36
    assert K0_VALUES["green"] == 0.0 and K0_VALUES["smoothing"] == 1.0


def test_hi_map_does_not_depend_on_the_stellar_map_units(smoke):
    """The stellar floor is relative to the map's mean: Msun/h and 1e10 Msun/h give one HI map."""
    pm, pos, maps = smoke
    stage = Stage(pm, StageConfig("hi", 1), w_init=_w_init(pm, maps["hi"]))
    raw = jnp.asarray(stage.table.init_raw())
    a = np.asarray(stage.forward(pos, raw, star=maps["stellar"]))
    b = np.asarray(stage.forward(pos, raw, star=maps["stellar"] * 1e10))
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(a).max())
    # and the stellar map of the smoke suite has empty cells, where the floor acts
    assert np.mean(np.asarray(maps["stellar"]) == 0) > 0.1


@pytest.mark.parametrize("rule", ["validation", "smoothed-validation", "train+validation"])
def test_kept_step_is_the_best_under_the_selection_rule(smoke, rule, tmp_path):
    """The kept parameters are those of the step the rule scores lowest; params_final.json
    reports the final parameters' own losses, not the kept step's."""
    import json

    from jerald_nbk.train.loss import selection_score
    from jerald_nbk.workflow import fit_stage

    pm, pos, maps = smoke
    stage = Stage(pm, StageConfig("dm", 1))
    cfg = TrainConfig(steps=6, progress=False, select=rule, eta0=0.05, eta_final=0.05)
    run = fit_stage(stage, pos, maps["dm"], tmp_path / rule, cfg)
    res = run.result
    cells = {k: float(m.sum()) for k, m in Objective(stage, pos, maps["dm"], cfg).masks.items()}
    scores = [selection_score(h, rule, cells) for h in res.history]
    scores.append(selection_score(res.final_losses, rule, cells))
    assert res.best_step == int(np.argmin(scores))
    final = json.loads((tmp_path / rule / "params_final.json").read_text())["provenance"]
    assert final["losses"]["train"] == pytest.approx(res.final_losses["train"], rel=1e-12)
    assert final["final_step"] == cfg.steps
    with pytest.raises(ValueError, match="select must be one of"):
        TrainConfig(select="median").p_for("dm")


def test_stellar_fit_does_not_depend_on_the_map_units(smoke, tmp_path):
    """A stellar map in 1e10 Msun/h at high z has a mean of ~1e-5 per cell: Adam's absolute steps
    (0.002-0.02) used to push w onto its bound in one step and the map collapsed to zero. With the
    amplitude as the unit of w and b, the same map in units 1e5 times smaller trains to the same
    map, scaled."""
    from jerald_nbk.workflow import train_stage

    pm, pos, maps = smoke
    cfg = TrainConfig(steps=8, smoothing_n=1.0, progress=False)
    runs = [
        train_stage(pm, "stellar", pos, maps["stellar"] * u, tmp_path / f"u{u:g}", 1, cfg)
        for u in (1.0, 1e-5)
    ]
    maps_out = [np.asarray(r.stage.forward(pos, r.result.raw)) for r in runs]
    assert maps_out[0].max() > 0
    np.testing.assert_allclose(
        maps_out[1] * 1e5, maps_out[0], rtol=1e-6, atol=1e-9 * maps_out[0].max()
    )
    w = [r.stage.table.as_dict(r.result.raw)["w"] for r in runs]
    assert w[1] * 1e5 == pytest.approx(w[0], rel=1e-6)


def test_stellar_start_analytic_uniform_density():
    """x uniform on [0, 1]: the fraction above q is 1 - q and the mean of ReLU(x - q) is
    (1 - q)^2 / 2, so an occupancy of 1/4 needs q = 3/4, w0 = m / (1/32) and b0 = w0 q."""
    from jerald_nbk.model.params import stellar_start

    m = 3e-5  # a z = 5 stellar map's mean in 1e10 Msun/h per cell
    w0, b0 = stellar_start(
        lambda q: max(1.0 - q, 0.0), lambda q: max(1.0 - q, 0.0) ** 2 / 2, 0.25, m
    )
    assert w0 == pytest.approx(32 * m, rel=1e-9)
    assert b0 == pytest.approx(0.75 * 32 * m, rel=1e-9)
    # every cell occupied (or an input emptier than the target): model.md's start, b = 0
    w0, b0 = stellar_start(lambda q: max(1.0 - q, 0.0), lambda q: max(0.5 - q, 0.0), 1.0, m)
    assert (w0, b0) == (pytest.approx(2 * m), 0.0)
    with pytest.raises(ValueError, match="occupancy"):
        stellar_start(lambda q: 1.0, lambda q: 1.0, 0.0, m)


def test_stellar_training_starts_at_the_target_occupancy_and_mean(smoke, tmp_path):
    """The stellar stage starts with b at the (1 - occupancy) quantile of its input density (in
    units of w), not at 0: with b = 0 every cell with a particle is non-empty, while a sparse
    target (z = 5: 0.6% of cells) needs b ~ 20 w, which Adam, moving b by about the learning rate
    per step, never reached. Checked with numpy's quantile on the smoke suite, through
    train_stage: the starting map has the target's non-empty fraction and mean."""
    from jerald_nbk.workflow import train_stage

    pm, pos, maps = smoke
    target = np.asarray(maps["stellar"])
    occupancy = np.mean(target > 0)
    assert occupancy < 0.5  # a sparse target, where b = 0 would be far off
    cfg = TrainConfig(steps=1, progress=False)
    run = train_stage(pm, "stellar", pos, maps["stellar"], tmp_path / "st", 0, cfg)
    start = run.stage.table.as_dict(run.stage.table.init_raw())
    x = np.asarray(pm.density(pos))
    # independent of the bisection: numpy's quantile, to within the gap between sorted cells
    xs = np.sort(x.ravel())
    i = int(round((1 - occupancy) * xs.size))
    assert xs[i - 2] <= start["b"] / start["w"] <= xs[i + 1]
    start_map = np.maximum(start["w"] * x ** start["mu"] - start["b"], 0.0)
    assert abs(np.mean(start_map > 0) - occupancy) <= 2 / x.size
    assert np.mean(start_map) == pytest.approx(np.mean(target), rel=1e-6)
    # and the starting w is the unit the optimiser sees w and b in
    assert run.stage.config.amplitude == pytest.approx(start["w"], rel=1e-12)
