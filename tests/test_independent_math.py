"""Every equation of the package checked against an independent implementation.

``tests/independent_model.py`` is a second JERALD model written from the paper and model.md in
numpy + pmesh with hand-written adjoints; it imports nothing from ``jerald_nbk``. Here:

1. its own gradients are checked against central finite differences of its own forward map;
2. the package's forward maps, region losses and train-loss gradients (both engines, float64) are
   compared with it for several random parameter sets per target (DM, stellar, HI with and without
   the shift ``zs``), 2 layers each;
3. the train / validation / test split is checked against cell counts derived by hand;
4. the sign conventions (alpha > 0 attracts; alpha2 > 0 pushes HI away from stars) are pinned on
   the reference side.

Inputs are synthetic (not the smoke suite, to keep the file fast on 2 cores): Zel'dovich
particles on a 32^3 mesh in a 25 Mpc/h box (seed 1, 0.5 cell rms displacement); targets made from
the density of other seeds (2 and 3): DM ``1 + delta``, a stellar map with empty cells, a positive
HI map, and a frozen stellar map for HI in units whose mean is far from 1 (so that the stellar floor's
convention matters).

Metrics (float64):

* maps: ``max |F_pkg - F_ref| / max |F_ref| <= 1e-6``;
* losses: relative ``1e-6``;
* gradients: in the package's raw units (``dL/draw = dL/dphys * scale``), per component
  ``|g_pkg - g_ref| <= 1e-6 * ||g_ref||_2`` (the gradient's norm: components that are tiny compared
  with it cannot move the optimiser) and, where ``|g_ref_i| >= 1e-3 ||g_ref||``, also
  ``<= 1e-5 |g_ref_i|``.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest
from independent_model import ReferenceModel, layer_names, param_names, split_masks

from jerald_nbk.model import transforms
from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.pm import JaxEngine, make_pm
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train.loop import Objective, TrainConfig
from jerald_nbk.train.loss import split_masks as pkg_split_masks

N, L = 32, 25.0
CELL = L / N
#: the package's stellar floor, relative to the stellar map's mean (1e-8 of the mean)
STAR_FLOOR_REL = 1e-8

#: the cases: (target, hi_shift, loss p, smoothing n)
CASES = {
    "dm": ("dm", False, 2, 0.0),
    "stellar": ("stellar", False, 1, 1.0),
    "hi": ("hi", False, 1, 1.0),
    "hi_zs": ("hi", True, 1, 1.0),
}
SEEDS = (11, 12, 13)


# ---------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def ref():
    return ReferenceModel(N, L, order=6, star_floor_rel=STAR_FLOOR_REL)


@pytest.fixture(scope="module")
def data(ref):
    pos = zeldovich_particles(N, L, 1, rms_disp=0.5, dtype=np.float64)
    rho2 = ref.density(zeldovich_particles(N, L, 2, rms_disp=0.5, dtype=np.float64))
    rho3 = ref.density(zeldovich_particles(N, L, 3, rms_disp=0.6, dtype=np.float64))
    stellar_target = 0.3 * np.maximum(rho2**1.5 - 0.8, 0.0)
    star_map = 1e3 * np.maximum(rho3**1.5 - 1.0, 0.0)  # mean ~1e3, many empty cells
    assert (star_map == 0).mean() > 0.2 and (stellar_target == 0).mean() > 0.2
    return {
        "pos": pos,
        "targets": {
            "dm": rho2,
            "stellar": stellar_target,
            "hi": 0.5 * (rho2 + 0.1) ** 0.7,
        },
        "star_map": star_map,
    }


@pytest.fixture(scope="module")
def engines():
    return {
        "jax": JaxEngine(N, L, dtype="f8"),
        "pmesh": make_pm(N, L, dtype="f8", backend="pmesh"),
    }


def draw_params(ref, target, hi_shift, seed, pos, star_map, n_layers=2):
    """Random physical parameters inside the bounds.

    Shapes are drawn uniformly (gamma in [0.3, 1.7], kh in [0, 1], kl in [1, 10], nu in [-3, 3]);
    each alpha is then set so that its term alone displaces the particles by 0.15-0.6 cells rms
    (random sign), whatever the drawn shape does to the kernel's amplitude.
    """
    rng = np.random.default_rng(seed)
    kind = "dm" if target == "dm" else "sm"
    star = None if star_map is None else ref.star_overdensity(star_map)
    p: dict[str, float] = {}
    x = np.asarray(pos, dtype=float)
    for i in range(n_layers):
        names = layer_names(target, i)
        groups = [names[:5], names[5:]] if target == "hi" else [names]
        terms = []
        for t, nm in enumerate(groups):
            g, kh, kl, nu = (
                rng.uniform(0.3, 1.7),
                rng.uniform(0.0, 1.0),
                rng.uniform(1.0, 10.0),
                rng.uniform(-3.0, 3.0),
            )
            src = star if t == 1 else None
            _, c = ref.layer_forward(x, [(1.0, g, kh, kl, nu, src)], kind)
            rms = np.sqrt(np.mean(np.sum(c["s"] ** 2, axis=1)))
            a = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 1.2) * 0.5 * CELL / rms
            p.update(zip(nm, (a, g, kh, kl, nu), strict=True))
            terms.append((-a if t == 1 else a, g, kh, kl, nu, src))
        x, _ = ref.layer_forward(x, terms, kind)
    if target == "stellar":
        w = rng.uniform(0.5, 2.0)
        p.update(w=w, mu=rng.uniform(0.6, 1.6), b=w * rng.uniform(0.2, 0.8))
    elif target == "hi":
        OI, _ = ref.filter_OI(kIh := rng.uniform(0.1, 1.0), kIl := rng.uniform(1.0, 10.0),
                              nuI := rng.uniform(-3.0, 3.0), 0.0)  # fmt: skip
        spread = np.std(ref.fourier(star, OI))
        xi = rng.uniform(-0.3, 0.3)
        p.update(
            w=rng.uniform(0.5, 2.0),
            mu=rng.uniform(0.6, 1.6),
            b=rng.uniform(-0.3, 0.3),
            beta1=rng.uniform(0.3, 1.0) / (spread + abs(xi)),
            beta2=rng.uniform(-0.05, 0.1),
            eta=rng.uniform(-0.3, 0.3),
            gamma3=rng.uniform(0.3, 1.7),
            kIh=kIh,
            kIl=kIl,
            nuI=nuI,
            xi=xi,
        )
        if hi_shift:
            p["zs"] = rng.uniform(-0.3, 0.5)
    return {n: float(p[n]) for n in param_names(target, n_layers, hi_shift)}


# ---------------------------------------------------------------------------------------------
# 1a. the reference's own adjoint against its own finite differences


@pytest.mark.parametrize("case", list(CASES))
def test_reference_adjoint_matches_its_finite_differences(ref, data, case):
    """Hand-written reverse mode vs central differences (step 1e-8 * max(|p|, 1e-2)), float64.

    Compared per parameter as ``dL/dp * s_p`` (s_p = max(|p|, 1e-2), the loss change per relative
    change of p) against the largest such value: tolerance 1e-6 (measured 1e-8-3e-8). The step is
    that small on purpose: the L1 loss, the ReLUs and CIC are piecewise smooth, and one kink inside
    the step changes a central difference by ~1e-4 of the gradient (seen at steps >= 1e-6).
    """
    target, shift, p, n = CASES[case]
    star = data["star_map"] if target == "hi" else None
    params = draw_params(ref, target, shift, SEEDS[0], data["pos"], star)
    args = (target, params, data["pos"], data["targets"][target], 2, p, n, star)
    _, g, _ = ref.loss_and_grad(*args)
    fd = ref.finite_difference(*args, rel_step=1e-8)
    s = {k: max(abs(v), 1e-2) for k, v in params.items()}
    scale = max(abs(g[k]) * s[k] for k in params)
    err = {k: abs(g[k] - fd[k]) * s[k] / scale for k in params}
    assert set(g) == set(params)
    assert max(err.values()) < 1e-6, {k: (g[k], fd[k], err[k]) for k in params}
    # every parameter does something here (no parameter stuck behind a ReLU)
    assert min(abs(g[k]) * s[k] for k in params) > 1e-6 * scale, g


# ---------------------------------------------------------------------------------------------
# 1b. the package against the reference


@pytest.fixture(scope="module")
def package(engines, data):
    """``evaluate(engine, case, params) -> (F, losses, dL/draw, scale)``: one compiled stage and
    objective per (engine, case), reused for every parameter set."""
    built = {}

    def evaluate(engine, case, params):
        if (engine, case) not in built:
            target, shift, _, n = CASES[case]
            pm = engines[engine]
            stage = Stage(pm, StageConfig(target, 2, hi_shift=shift))
            pos = jnp.asarray(data["pos"])
            star = jnp.asarray(data["star_map"]) if target == "hi" else None
            obj = Objective(
                stage,
                pos,
                jnp.asarray(data["targets"][target]),
                TrainConfig(smoothing_n=n, split="paper", progress=False),
                star=star,
            )
            fwd = pm.jit(lambda raw: stage.forward(pos, raw, star=star))
            built[(engine, case)] = (stage, obj, fwd)
        stage, obj, fwd = built[(engine, case)]
        assert list(stage.table.names) == list(params), "parameter names / order differ"
        raw = jnp.asarray(stage.table.to_raw(params))
        losses, g = obj.value_and_grad(raw)
        F = np.asarray(fwd(raw))
        return F, {k: float(v) for k, v in losses.items()}, np.asarray(g), stage.table.scale

    return evaluate


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("engine", ["jax", "pmesh"])
def test_package_matches_reference(ref, data, package, engine, case, seed):
    target, shift, p, n = CASES[case]
    star = data["star_map"] if target == "hi" else None
    F_ref_map = data["targets"][target]
    params = draw_params(ref, target, shift, seed, data["pos"], star)
    losses, g, F = ref.loss_and_grad(target, params, data["pos"], F_ref_map, 2, p, n, star)
    t0 = time.perf_counter()
    F_pkg, losses_pkg, g_raw, scale = package(engine, case, params)
    dt = time.perf_counter() - t0
    g_ref = np.array([g[k] for k in params]) * scale  # dL/draw
    map_err = np.max(np.abs(F_pkg - F)) / np.max(np.abs(F))
    loss_err = {k: abs(losses_pkg[k] - losses[k]) / abs(losses[k]) for k in losses}
    norm = np.linalg.norm(g_ref)
    abs_err = np.abs(g_raw - g_ref)
    big = np.abs(g_ref) >= 1e-3 * norm
    rel_big = abs_err[big] / np.abs(g_ref[big])
    report = (
        f"{engine} {case} seed {seed} ({dt:.1f}s): map {map_err:.2e}, losses "
        + ", ".join(f"{k} {v:.2e}" for k, v in loss_err.items())
        + f", gradient max|d|/|g| {abs_err.max() / norm:.2e}, max rel (big) {rel_big.max():.2e}; "
        + "; ".join(
            f"{k}: {a:.6e} vs {b:.6e}"
            for k, a, b, e in zip(params, g_raw, g_ref, abs_err, strict=True)
            if e > 1e-6 * norm
        )
    )
    print(report)
    assert map_err < 1e-6, report
    assert loss_err["train"] < 1e-6, report
    assert abs_err.max() < 1e-6 * norm, report
    assert rel_big.max() < 1e-5, report
    assert loss_err["validation"] < 1e-6 and loss_err["test"] < 1e-6, report


#: edge cases, one parameter set each: (target, n_layers, gradient order, overrides)
#: kIh = 0 (its lower bound) makes the k = 0 value of O_I matter: O_I(0) must be xi, whatever nuI
#: (the exp * k^nuI part is a large-scale cut-off, 0 at k = 0); and the LDL 4th-order gradient.
EDGE = {
    "hi_transform_kIh0_nuI-2.5": ("hi", 0, 6, {"kIh": 0.0, "nuI": -2.5}),
    "hi_transform_kIh0_nuI0": ("hi", 0, 6, {"kIh": 0.0, "nuI": 0.0}),
    "hi_kIh0_nuI1.5": ("hi", 2, 6, {"kIh": 0.0, "nuI": 1.5}),
    "stellar_order4": ("stellar", 2, 4, {}),
    "dm_order4": ("dm", 2, 4, {}),
}


@pytest.mark.parametrize("engine", ["jax", "pmesh"])
@pytest.mark.parametrize("edge", list(EDGE))
def test_package_matches_reference_edge_cases(data, engines, engine, edge):
    target, n_layers, order, over = EDGE[edge]
    ref = ReferenceModel(N, L, order=order, star_floor_rel=STAR_FLOOR_REL)
    p, n = (2, 0.0) if target == "dm" else (1, 1.0)
    star_map = data["star_map"] if target == "hi" else None
    params = draw_params(ref, target, False, 21, data["pos"], star_map, n_layers)
    params.update(over)
    if target == "hi":  # depletion filter of order 1 whatever the overrides did to its amplitude
        OI, _ = ref.filter_OI(params["kIh"], params["kIl"], params["nuI"], params["xi"])
        params["beta1"] = 0.6 / np.std(ref.fourier(ref.star_overdensity(star_map), OI))
    F_ref_map = data["targets"][target]
    losses, g, F = ref.loss_and_grad(
        target, params, data["pos"], F_ref_map, n_layers, p, n, star_map
    )
    assert 0.3 < (F > 0).mean()  # not a degenerate all-zero map

    pm = engines[engine]
    stage = Stage(pm, StageConfig(target, n_layers, gradient_order=order))
    assert list(stage.table.names) == list(params)
    raw = jnp.asarray(stage.table.to_raw(params))
    pos = jnp.asarray(data["pos"])
    star = None if star_map is None else jnp.asarray(star_map)
    cfg = TrainConfig(smoothing_n=n, progress=False)
    obj = Objective(stage, pos, jnp.asarray(F_ref_map), cfg, star=star)
    losses_pkg, g_raw = obj.value_and_grad(raw)
    F_pkg = np.asarray(stage.forward(pos, raw, star=star))
    g_ref = np.array([g[k] for k in params]) * stage.table.scale
    g_raw = np.asarray(g_raw)
    map_err = np.max(np.abs(F_pkg - F)) / np.max(np.abs(F))
    grad_err = np.max(np.abs(g_raw - g_ref)) / np.linalg.norm(g_ref)
    report = f"{engine} {edge}: map {map_err:.2e}, gradient {grad_err:.2e}"
    assert map_err < 1e-6, report
    assert grad_err < 1e-6, report
    for k in losses:
        assert float(losses_pkg[k]) == pytest.approx(losses[k], rel=1e-6), report


# ---------------------------------------------------------------------------------------------
# 2. the split


#: hand-derived cell counts (train, validation, test):
#: paper, N = 32: int(0.43*32) = int(13.76) = 13 -> test 13^3 = 2197; int(0.5*32) = 16 ->
#:   train = 32*32*16 = 16384 (l >= 16 never meets l < 13); validation 32768 - 2197 - 16384 = 14187.
#: paper, N = 30: int(12.9) = 12 -> test 1728; train 30*30*15 = 13500; validation
#:   27000 - 1728 - 13500 = 11772.
#: ldl, N = 32: int(0.44*32) = int(14.08) = 14 -> test 14^3 = 2744; int(0.56*32) = int(17.92) = 17
#:   -> validation (32-14)*17*17 = 5202; train 32768 - 2744 - 5202 = 24822.
#: ldl, N = 30: int(13.2) = 13 -> test 2197; int(16.8) = 16 -> validation 17*16*16 = 4352;
#:   train 27000 - 2197 - 4352 = 20451.
SPLIT_COUNTS = {
    ("paper", 32): (16384, 14187, 2197),
    ("paper", 30): (13500, 11772, 1728),
    ("ldl", 32): (24822, 5202, 2744),
    ("ldl", 30): (20451, 4352, 2197),
}


@pytest.mark.parametrize("kind, nmesh", list(SPLIT_COUNTS))
def test_reference_split_counts(kind, nmesh):
    m = split_masks((nmesh,) * 3, kind)
    assert (
        tuple(int(m[r].sum()) for r in ("train", "validation", "test"))
        == SPLIT_COUNTS[(kind, nmesh)]
    )
    total = m["train"].astype(int) + m["validation"] + m["test"]
    assert np.all(total == 1)


@pytest.mark.parametrize("engine", ["jax", "pmesh"])
@pytest.mark.parametrize("kind, nmesh", list(SPLIT_COUNTS))
def test_package_split_matches_hand_counts(engine, kind, nmesh):
    pm = make_pm(nmesh, 25.0, dtype="f8", backend=engine)
    masks = {k: np.asarray(v) for k, v in pkg_split_masks(pm, kind).items()}
    counts = tuple(int(masks[r].sum()) for r in ("train", "validation", "test"))
    assert counts == SPLIT_COUNTS[(kind, nmesh)]
    mine = split_masks((nmesh,) * 3, kind)
    for r in mine:
        np.testing.assert_array_equal(np.broadcast_to(masks[r], mine[r].shape), mine[r])


# ---------------------------------------------------------------------------------------------
# 3. conventions and signs, reference side (and the package's stellar floor)


def test_reference_fourier_conventions(ref):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N,) * 3)
    ak = ref.r2c(a)
    assert ak[0, 0, 0].real == pytest.approx(a.mean(), abs=1e-14)  # r2c divides by Ncells
    np.testing.assert_allclose(ref.c2r(ak), a, atol=1e-12)  # c2r does not
    # finite-difference gradients of a plane wave along each axis: Taylor expansion in w = kH,
    # 6th order (45 sin w - 9 sin 2w + sin 3w) / 30 = w (1 - w^6 / 140 + O(w^8)),
    # 4th order (8 sin w - sin 2w) / 6 = w (1 - w^4 / 30 + O(w^6))
    x = (np.arange(N) + 0.0) * CELL
    k = 2 * np.pi / L
    w = k * CELL
    for model, factor, err in ((ref, 1 - w**6 / 140, w**8), (ReferenceModel(N, L, order=4), 1 - w**4 / 30, w**6)):  # fmt: skip
        for axis in range(3):
            shape = [1, 1, 1]
            shape[axis] = N
            wave = np.broadcast_to(np.sin(k * x).reshape(shape), (N,) * 3)
            d = model.c2r(model.r2c(wave) * model.iD[axis])
            line = np.moveaxis(d, axis, 0)[:, 0, 0]
            np.testing.assert_allclose(line, k * factor * np.cos(k * x), rtol=0, atol=err * k)
    # CIC: unit-mass particles on the cell corners paint 1 + delta = 1 exactly
    g = (np.indices((N,) * 3).reshape(3, -1).T + 0.0) * CELL
    np.testing.assert_allclose(ref.density(g), 1.0, atol=1e-12)


def test_reference_alpha_positive_increases_density_variance(ref, data):
    """Gravity-like DM layer (gamma 1, kh 0, kl 10, nu -2): alpha > 0 clusters, alpha < 0 smooths."""
    pos = data["pos"]
    v0 = np.var(ref.density(pos))
    out = {}
    for a in (1.0, -1.0):
        x, _ = ref.layer_forward(pos, [(a, 1.0, 0.0, 10.0, -2.0, None)], "dm")
        out[a] = np.var(ref.density(x))
        assert 0.05 < np.sqrt(np.mean((x - pos) ** 2)) / CELL < 2  # a sensible displacement
    assert out[1.0] > 1.05 * v0 > 1.05 * out[-1.0]


def test_reference_alpha2_pushes_gas_away_from_stars(ref, data):
    """HI layer with only the stellar term (alpha1 = 0, alpha2 > 0) and one stellar peak at the
    centre: particles near it move outwards, and the stellar field at the particles decreases."""
    pos = data["pos"]
    c = np.full(3, L / 2)
    grid = (np.indices((N,) * 3) + 0.0) * CELL
    r2 = sum((grid[d] - c[d]) ** 2 for d in range(3))
    peak = np.exp(-r2 / (2 * (2.5) ** 2))
    star = ref.star_overdensity(peak)
    a2 = 5.0
    terms = [(0.0, 1.0, 0.0, 10.0, -2.0, None), (-a2, 1.0, 0.0, 10.0, -2.0, star)]
    x, cache = ref.layer_forward(pos, terms, "sm")
    d = pos - c
    near = np.sqrt(np.sum(d**2, axis=1)) < 6.0
    radial = np.sum(cache["s"][near] * d[near], axis=1)
    assert np.mean(np.sqrt(np.sum(cache["s"] ** 2, axis=1))) > 0.01 * CELL
    assert (radial > 0).mean() > 0.95
    assert ref.readout(star, x)[near].mean() < ref.readout(star, pos)[near].mean()


@pytest.mark.parametrize("engine", ["jax", "pmesh"])
def test_package_stellar_floor_is_relative_to_the_mean(ref, data, engines, engine):
    """``1 + delta_star`` of a map with empty cells, in units whose mean is ~1e3 and ~1e-7: the
    package's floor is STAR_FLOOR_REL of the map's mean (so the result does not depend on units)."""
    pm = engines[engine]
    for unit in (1.0, 1e-10):
        m = data["star_map"] * unit
        mine = ref.star_overdensity(m)
        pkg = np.asarray(transforms.star_overdensity(pm, jnp.asarray(m)))
        np.testing.assert_allclose(pkg, mine, rtol=1e-12, atol=1e-12 * STAR_FLOOR_REL)
