"""The JERALD reference code's files, read and written exactly (issue 11, item 1).

Fixtures are written here as the reference writes them (``np.savetxt`` of its optimiser's vector,
in its order, signs and scalings, from ``JERALD/runJERALD.py`` and ``model.py`` of
maurorigo/JERALD), from known physical values; the maps they give are compared with the reference's
formulas evaluated independently with numpy. Tolerances are stated per test.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jerald_nbk.io import write_catalog, write_mesh
from jerald_nbk.io.paramfiles import (
    RefOptState,
    infer_ref_layers,
    is_ref_optstate,
    load_plaintext,
    optax_adam_state,
    read_ref_optstate,
    ref_layout,
    ref_optstate_from_optax,
    save_plaintext,
    write_ref_optstate,
)
from jerald_nbk.model.params import ParamTable, table
from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.pm import JaxEngine
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train.loop import Objective, TrainConfig, train
from jerald_nbk.train.schedule import paper_schedule

N, L = 16, 20.0

# -- the reference's layout, written out by hand from its code -------------------------------------

#: physical values of one DM/stellar layer: alpha, gamma, kh, kl, nu
LAYER = [(0.013, 0.7, 0.4, 6.0, -0.5), (-0.004, 1.1, 0.2, 9.0, 0.3)]
#: physical values of one HI layer: alpha1, gamma1, kh1, kl1, nu1, alpha2, gamma2, kh2, kl2, nu2
HI_LAYER = [
    (0.0021, 0.6, 0.3, 5.0, -0.2, 0.0007, 0.9, 0.5, 7.0, 0.1),
    (-0.0013, 1.2, 0.1, 4.0, 0.4, 0.0011, 0.4, 0.2, 3.0, -0.3),
]
#: stellar final values: mu, w, and the reference's b (our b = -b_ref)
ST_FINAL = {"mu": 1.3, "w": 0.7, "b_ref": -0.2}
#: HI final values in the reference's order (its b: ours = -b_ref)
HI_FINAL = {
    "mu": 1.2,
    "w": 0.9,
    "b_ref": -0.1,
    "beta1": 0.6,
    "kIh": 0.5,
    "kIl": 6.0,
    "nuI": 0.01,
    "beta2": 0.03,
    "gamma3": 0.8,
    "xi": 1.0,
    "eta": 0.02,
    "zs": -1e-3,
}


def reference_vector(target: str, layers: int) -> np.ndarray:
    """What the reference's optimiser holds (and ``np.savetxt`` writes) for the values above.

    Its model multiplies alpha by 1e-2 (DM, stellar) or 1e-3 (both HI terms): the file holds
    alpha / 1e-2 (1e-3).
    """
    vec = []
    if target == "hi":
        for i in range(layers):
            a1, g1, kh1, kl1, n1, a2, g2, kh2, kl2, n2 = HI_LAYER[i]
            vec += [a1 / 1e-3, g1, kh1, kl1, n1, a2 / 1e-3, g2, kh2, kl2, n2]
        vec += list(HI_FINAL.values())
        return np.array(vec)
    for i in range(layers):
        a, g, kh, kl, n = LAYER[i]
        vec += [a / 1e-2, g, kh, kl, n]
    if target == "stellar":
        vec += [ST_FINAL["mu"], ST_FINAL["w"], ST_FINAL["b_ref"]]
    return np.array(vec)


def expected_physical(target: str, layers: int) -> dict:
    """The same values in our names and conventions."""
    out = {}
    if target == "hi":
        for i in range(layers):
            for q, v in zip(
                ["alpha1", "gamma1", "kh1", "kl1", "nu1", "alpha2", "gamma2", "kh2", "kl2", "nu2"],
                HI_LAYER[i],
                strict=True,
            ):
                out[f"{q}_{i}"] = v
        f = dict(HI_FINAL)
        f["b"] = -f.pop("b_ref")
        return out | f
    for i in range(layers):
        for q, v in zip(["alpha", "gamma", "kh", "kl", "nu"], LAYER[i], strict=True):
            out[f"{q}_{i}"] = v
    if target == "stellar":
        out |= {"mu": ST_FINAL["mu"], "w": ST_FINAL["w"], "b": -ST_FINAL["b_ref"]}
    return out


CASES = [("dm", 1), ("dm", 2), ("stellar", 0), ("stellar", 2), ("hi", 0), ("hi", 2)]


@pytest.fixture(scope="module")
def pm():
    return JaxEngine(N, L, dtype="f8")


@pytest.fixture(scope="module")
def pos():
    return jnp.asarray(zeldovich_particles(N, L, seed=3, rms_disp=0.5, dtype=np.float64))


@pytest.fixture(scope="module")
def star():
    """A positive stellar-mass-like map (lognormal), in arbitrary units."""
    g = np.random.default_rng(5).normal(size=(N, N, N))
    return 3e-2 * np.exp(1.2 * g)


# -- layout ----------------------------------------------------------------------------------------


def test_layout_is_the_reference_codes():
    """Names and order from ``model.py``'s indexing (``params[Npot*i + j]``, then the finals)."""
    names = [s.ref_name for s in ref_layout(StageConfig("stellar", 2))]
    assert names == [
        *("alpha[0]", "gamma[0]", "kh[0]", "kl[0]", "nu[0]"),
        *("alpha[1]", "gamma[1]", "kh[1]", "kl[1]", "nu[1]"),
        *("mu", "w", "b"),
    ]
    hi = [s.ref_name for s in ref_layout(StageConfig("hi", 2, hi_shift=True))]
    layer = ["alpha1", "gamma1", "kh1", "kl1", "nu1", "alpha2", "gamma2", "kh2", "kl2", "nu2"]
    finals = ["mu", "w", "b", "beta1", "kIh", "kIl", "nuI", "beta2", "gamma3", "xi", "eta", "zs"]
    # per layer all ten values of that layer, then the next layer's
    assert hi == [f"{q}[0]" for q in layer] + [f"{q}[1]" for q in layer] + finals
    # factors: the sign flip of b only (our scalings are the reference's)
    for cfg in (StageConfig("stellar", 2), StageConfig("hi", 2, hi_shift=True)):
        f = {s.ref_name: s.factor for s in ref_layout(cfg)}
        assert f.pop("b") == -1.0 and set(f.values()) == {1.0}


@pytest.mark.parametrize("target,layers", CASES)
def test_reference_file_loads_to_the_physical_values(tmp_path, target, layers):
    vec = reference_vector(target, layers)
    path = tmp_path / f"{target}_Nmesh16_Nstep{layers}_n0.00_bestparam.txt"
    np.savetxt(path, vec)  # as the reference writes it
    n, shift = infer_ref_layers(vec.size, target, path)
    assert (n, shift) == (layers, target == "hi")
    cfg = StageConfig(target, layers, hi_shift=shift)
    raw = load_plaintext(path, cfg, "jerald")
    got = ParamTable(table(target, layers, shift)).as_dict(raw)
    want = expected_physical(target, layers)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-14, abs=1e-300), k
    # written back: the reference's numbers, exactly
    save_plaintext(tmp_path / "back.txt", cfg, raw, "jerald")
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "back.txt"), vec)


@pytest.mark.parametrize(
    "target,layers,shift",
    [
        ("dm", 1, False),
        ("dm", 3, False),
        ("stellar", 0, False),
        ("stellar", 2, False),
        ("hi", 1, True),
        ("hi", 2, False),
    ],
)
def test_write_read_round_trip_is_exact(tmp_path, target, layers, shift):
    tab = ParamTable(table(target, layers, shift))
    rng = np.random.default_rng(layers)
    raw = np.asarray(tab.project(jnp.asarray(tab.init_raw() + rng.normal(0, 0.3, len(tab)))))
    cfg = StageConfig(target, layers, hi_shift=shift)
    path = save_plaintext(tmp_path / "p.txt", cfg, raw, "jerald")
    np.testing.assert_array_equal(load_plaintext(path, cfg, "jerald"), raw)
    if target == "hi" and not shift:  # written with zs = 0, so that the reference can read it
        vals = np.loadtxt(path)
        assert vals.size == 10 * layers + 12 and vals[-1] == 0.0


def test_stellar_extra_reference_value_is_ignored(tmp_path):
    """The reference's stellar start vector has a fourth, unused final value (5 S + 4)."""
    vec = np.append(reference_vector("stellar", 1), 0.0)
    np.savetxt(tmp_path / "s.txt", vec)
    assert infer_ref_layers(vec.size, "stellar", "s.txt") == (1, False)
    raw = load_plaintext(tmp_path / "s.txt", StageConfig("stellar", 1), "jerald")
    np.testing.assert_array_equal(
        raw, load_plaintext(_save(tmp_path / "t.txt", vec[:-1]), StageConfig("stellar", 1))
    )


def _save(path, vec):
    np.savetxt(path, vec)
    return path


# -- maps against the reference's formulas ---------------------------------------------------------


def test_stellar_map_is_the_reference_formula(tmp_path, pm, pos):
    """F = ReLU(w (rho + 1e-8)^mu + b) (the reference's, plus sign) on the painted density.

    0 layers, so that the transform (where the order and sign live) is compared on its own. The
    reference's ReLU floors at 1e-12: absolute tolerance 1e-11.
    """
    path = _save(tmp_path / "Mstar.txt", reference_vector("stellar", 0))
    cfg = StageConfig("stellar", *infer_ref_layers(3, "stellar", path))
    raw = load_plaintext(path, cfg)
    F = np.asarray(Stage(pm, cfg).forward(pos, raw))
    rho = np.asarray(pm.density(pos))
    mu, w, b = ST_FINAL["mu"], ST_FINAL["w"], ST_FINAL["b_ref"]
    ref = np.maximum(w * (rho + 1e-8) ** mu + b, 0.0)
    assert (ref == 0).mean() > 0.05 and (ref > 0).mean() > 0.3  # both branches of the ReLU
    np.testing.assert_allclose(F, ref, rtol=1e-12, atol=1e-11)
    # the old (wrong) reading, w, mu, b in our order and sign, gives another map
    wrong = np.maximum(mu * (rho + 1e-8) ** w - b, 0.0)
    assert np.abs(wrong - ref).max() > 0.1


def _kgrid(n, box):
    k1 = 2 * np.pi * np.fft.fftfreq(n, box / n)
    kz = 2 * np.pi * np.fft.rfftfreq(n, box / n)
    kx, ky, kz = np.meshgrid(k1, k1, kz, indexing="ij")
    return np.sqrt(kx**2 + ky**2 + kz**2)


def test_hi_map_is_the_reference_formula(tmp_path, pm, pos, star):
    """F = ReLU(w ReLU(rho + zs)^mu - D + b), D = ReLU(beta1 O_I[star] + eta) + beta2 star^gamma3.

    O_I(k) = exp(-k/kIl - kIh/k) k^nuI + xi with k = 0 replaced by 1e-8 (the reference's; with
    kIh > 0 the k = 0 value is xi, as ours); star = the stellar map over its mean (it floors at
    1e-12, ours relative 1e-8: no cell is that low here). 0 layers: the transform alone.
    Tolerance: relative 1e-7, absolute 5e-8 (ours adds 1e-8 to the bases of the powers).
    """
    path = _save(tmp_path / "HI.txt", reference_vector("hi", 0))
    layers, shift = infer_ref_layers(12, "hi", path)
    cfg = StageConfig("hi", layers, hi_shift=shift)
    raw = load_plaintext(path, cfg)
    F = np.asarray(Stage(pm, cfg).forward(pos, raw, star=jnp.asarray(star)))

    p = HI_FINAL
    rho = np.asarray(pm.density(pos))
    s = star / star.mean()
    k = _kgrid(N, L)
    k = np.where(k == 0, 1e-8, k)
    O = np.exp(-k / p["kIl"] - p["kIh"] / k) * k ** p["nuI"] + p["xi"]
    filtered = np.fft.irfftn(np.fft.rfftn(s) * O, s=s.shape, axes=(0, 1, 2))
    D = np.maximum(p["beta1"] * filtered + p["eta"], 0) + p["beta2"] * s ** p["gamma3"]
    ref = np.maximum(p["w"] * np.maximum(rho + p["zs"], 0) ** p["mu"] - D + p["b_ref"], 0)
    assert (ref == 0).mean() > 0.05 and (ref > 0).mean() > 0.3
    np.testing.assert_allclose(F, ref, rtol=1e-7, atol=5e-8)


# -- the optimiser-state file ------------------------------------------------------------------------


def _adam_after(raw, steps=3, seed=0):
    """An optax adam state after a few updates with random gradients (non-trivial moments)."""
    opt = optax.adam(paper_schedule())
    state = opt.init(jnp.asarray(raw))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        _, state = opt.update(jnp.asarray(rng.normal(size=raw.shape)), state, jnp.asarray(raw))
    return opt, state


@pytest.mark.parametrize(
    "target,layers,shift", [("dm", 2, False), ("stellar", 1, False), ("hi", 2, True)]
)
def test_optstate_round_trip_of_an_optax_state(tmp_path, target, layers, shift):
    cfg = StageConfig(target, layers, hi_shift=shift)
    tab = ParamTable(table(target, layers, shift))
    raw = tab.init_raw() * 1.1
    opt, state = _adam_after(raw)
    ost = ref_optstate_from_optax(state, lr=0.0021, raw=raw)
    assert ost.step == 3
    path = write_ref_optstate(tmp_path / "x_optstate.txt", cfg, ost)
    assert is_ref_optstate(path) and not is_ref_optstate(
        save_plaintext(tmp_path / "p.txt", cfg, raw)
    )

    # the file as the reference's Adam.save_state writes it
    lines = path.read_text().splitlines()
    n = len(tab)
    assert lines[0] == "mu" and lines[n + 1] == "nu" and lines[2 * n + 2] == "itr"
    assert lines[2 * n + 3] == "3" and lines[2 * n + 4] == "LR" and lines[3 * n + 5] == "params"
    m_file = np.array(lines[1 : n + 1], dtype=float)
    v_file = np.array(lines[n + 2 : 2 * n + 2], dtype=float)
    lr_file = np.array(lines[2 * n + 5 : 3 * n + 5], dtype=float)
    np.testing.assert_array_equal(lr_file, np.full(n, 0.0021))
    layout = ref_layout(cfg)
    mu, nu = np.asarray(state[0].mu), np.asarray(state[0].nu)
    for j, slot in enumerate(layout):
        i = tab.index[slot.name]
        sign = -1.0 if slot.ref_name == "b" else 1.0  # moments of b flip sign, nu does not
        assert m_file[j] == sign * mu[i] and v_file[j] == nu[i]

    back = read_ref_optstate(path, cfg)
    assert back.step == 3 and back.lr == 0.0021
    np.testing.assert_array_equal(back.raw, raw)
    new = optax_adam_state(back, template=opt.init(jnp.asarray(raw)))
    for a, b in zip(jax_leaves(new), jax_leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_reference_optstate_reads(tmp_path):
    """A file in the reference's layout (stellar, 1 layer, its 5 S + 4 vector); params unclipped.

    The reference clips kl >= 0.1 only at the start of its next step, so its saved parameters can
    sit below: read as it would clip them.
    """
    vec = np.append(reference_vector("stellar", 1), 0.0)
    vec[3] = 0.05  # kl[0] below the reference's (and our) bound 0.1
    m = np.arange(1.0, 10.0) * 0.01
    v = np.arange(1.0, 10.0) * 1e-4
    path = tmp_path / "Mstar_Nmesh16_Nstep1_n1.00_optstate.txt"
    with open(path, "w") as f:  # Adam.save_state
        f.write("mu\n")
        np.savetxt(f, m)
        f.write("nu\n")
        np.savetxt(f, v)
        f.write("itr\n10\nLR\n")
        np.savetxt(f, np.full(9, 0.0029))
        f.write("params\n")
        np.savetxt(f, vec)
    cfg = StageConfig("stellar", 1)
    st = read_ref_optstate(path, cfg)
    tab = ParamTable(table("stellar", 1))
    # ours: alpha gamma kh kl nu w mu b; the reference's: alpha gamma kh kl nu mu w b (0)
    np.testing.assert_array_equal(st.mu, [0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.06, -0.08])
    np.testing.assert_array_equal(st.nu, v[[0, 1, 2, 3, 4, 6, 5, 7]])
    assert st.step == 10 and st.lr == 0.0029
    p = tab.as_dict(st.raw)
    assert p["kl_0"] == 0.1 and p["b"] == -ST_FINAL["b_ref"] and p["w"] == ST_FINAL["w"]
    # without params (the reference then starts from its initial values)
    text = path.read_text()
    (tmp_path / "noparams.txt").write_text(text[: text.index("params")])
    assert read_ref_optstate(tmp_path / "noparams.txt", cfg).raw is None


@pytest.mark.parametrize("target,layers,shift", [("stellar", 1, False), ("hi", 1, True)])
def test_resumed_run_from_optstate_equals_straight_run(
    tmp_path, pm, pos, star, target, layers, shift
):
    """2 steps straight == 1 step, reference optstate written and read, 1 more step: exactly."""
    stage = Stage(pm, StageConfig(target, layers, hi_shift=shift))
    kw = {"star": jnp.asarray(star)} if target == "hi" else {}
    truth = stage.table.init_raw() * 1.2
    tgt = stage.forward(pos, jnp.asarray(truth), **kw)
    obj = Objective(stage, pos, tgt, TrainConfig(), **kw)

    def cfg(steps):
        return TrainConfig(steps=steps, progress=False, checkpoint_every=0)

    straight = train(obj, cfg(2))
    first = train(obj, cfg(1))
    ost = ref_optstate_from_optax(first.opt_state, lr=float(paper_schedule()(1)), raw=first.raw)
    path = write_ref_optstate(tmp_path / "o_optstate.txt", stage.config, ost)
    back = read_ref_optstate(path, stage.config)
    resumed = train(
        obj,
        cfg(2),
        raw0=back.raw,
        opt_state0=optax_adam_state(back),
        start_step=back.step,
    )
    assert [r["step"] for r in resumed.history] == [1]
    np.testing.assert_array_equal(resumed.raw, straight.raw)
    for a, b in zip(jax_leaves(resumed.opt_state), jax_leaves(straight.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.raw, straight.raw)


# -- errors ------------------------------------------------------------------------------------------


def test_errors_name_the_file(tmp_path):
    p7 = _save(tmp_path / "seven.txt", np.ones(7))
    with pytest.raises(ValueError, match=r"seven.txt: 7 values; a JERALD reference dm file has 5"):
        infer_ref_layers(7, "dm", p7)
    with pytest.raises(ValueError, match=r"seven.txt: 7 values; .* stellar file has 5\*Nstep \+ 3"):
        infer_ref_layers(7, "stellar", p7)
    with pytest.raises(ValueError, match=r"seven.txt: 7 values; .* hi file has 10\*Nstep \+ 12"):
        infer_ref_layers(7, "hi", p7)
    with pytest.raises(
        ValueError,
        match=r"seven.txt: 7 values, but a jerald stellar model with 1 layers has 8 or 9",
    ):
        load_plaintext(p7, StageConfig("stellar", 1))

    vec = reference_vector("stellar", 1)
    vec[1] = 3.0  # gamma beyond our bound 2 (the reference does not bound gamma)
    bad = _save(tmp_path / "gamma.txt", vec)
    with pytest.raises(
        ValueError, match=r"out of bounds in .*gamma.txt: gamma_0=3 not in \[0.05, 2\]"
    ):
        load_plaintext(bad, StageConfig("stellar", 1))
    vec = reference_vector("stellar", 1)
    vec[6] = 0.0  # w below 1e-5
    with pytest.raises(ValueError, match=r"w.txt: w=0 not in \[1e-05, inf\]"):
        load_plaintext(_save(tmp_path / "w.txt", vec), StageConfig("stellar", 1))
    zs = _save(tmp_path / "zs.txt", reference_vector("hi", 1))  # zs = -1e-3
    with pytest.raises(ValueError, match=r"zs.txt: zs = -0.001, but the hi model has no zs"):
        load_plaintext(zs, StageConfig("hi", 1, hi_shift=False))


def test_optstate_errors_name_the_file(tmp_path):
    cfg = StageConfig("dm", 1)
    good = RefOptState(np.ones(5) * 0.1, np.ones(5) * 0.01, 4, 0.002, np.array([1, 1, 1, 8, 0.0]))
    path = write_ref_optstate(tmp_path / "o.txt", cfg, good)
    text = path.read_text()

    def bad(name, content, match, config=cfg):
        p = tmp_path / name
        p.write_text(content)
        with pytest.raises(ValueError, match=match):
            read_ref_optstate(p, config)

    bad("noitr.txt", text[: text.index("itr")], r"noitr.txt: no section itr")
    bad("short.txt", text.replace("mu\n", "mu\n1.0\n", 1), r"short.txt: 6 first moments but 5")
    bad("words.txt", text.replace("itr\n4", "itr\nfour"), r"words.txt: line \d+: 'four'")
    bad("frac.txt", text.replace("itr\n4", "itr\n4.5"), r"frac.txt: 'itr' must be one integer")
    bad(
        "layers.txt",
        text,
        r"layers.txt: 5 first moments, but a jerald dm model with 2 layers has 10",
        StageConfig("dm", 2),
    )
    lines = text.splitlines()
    i = lines.index("params")
    lines[i + 2] = "3.0"  # gamma
    bad("gamma.txt", "\n".join(lines) + "\n", r"gamma.txt: gamma_0=3 not in \[0.05, 2\]")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_ref_optstate(tmp_path / "nope.txt", cfg)


# -- the command line ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref_inputs")
    p = zeldovich_particles(N, L, seed=1)
    write_catalog(d / "cat", {"Position": p}, {"BoxSize": L, "redshift": 2.0})
    dm = np.asarray(JaxEngine(N, L, dtype="f8").density(jnp.asarray(p, dtype=jnp.float64)))
    write_mesh(d / "dm", (dm**1.1).astype("f4"), L)
    return d


def _ref(*argv) -> None:
    from jerald_nbk.cli.ref import main

    assert main([str(a) for a in argv]) == 0


def test_cli_resumes_from_the_reference_optstate(cli_inputs, tmp_path):
    """jerald-ref: 2 steps == 1 step, then --optpath its _optstate.txt and --steps 2 (exactly).

    Also: the optstate is written next to the parameter file, and --evalpath reads the reference
    file it wrote.
    """
    common = ["--target", "dm", "--Nbodypath", cli_inputs / "cat", "--refpath", cli_inputs / "dm"]
    common += ["--Nstep", "1", "--quiet", "--checkpoint-every", "0"]
    stem = "dm_Nmesh16_Nstep1_n0.00"
    _ref(*common, "--outpath", tmp_path / "a", "--steps", "2")
    _ref(*common, "--outpath", tmp_path / "b", "--steps", "1")
    opt_b = tmp_path / "b" / f"{stem}_optstate.txt"
    assert is_ref_optstate(opt_b) and read_ref_optstate(opt_b, StageConfig("dm", 1)).step == 1
    _ref(*common, "--outpath", tmp_path / "c", "--steps", "2", "--optpath", opt_b)
    a = (tmp_path / "a" / f"{stem}_optstate.txt").read_text()
    c = (tmp_path / "c" / f"{stem}_optstate.txt").read_text()
    assert a == c and "itr\n2\n" in a
    _ref(
        *common[:6],
        "--outpath",
        tmp_path / "ev",
        "--evalpath",
        tmp_path / "a" / f"{stem}_bestparam.txt",
        "--quiet",
    )
    assert (tmp_path / "ev" / f"{stem}_map" / "Field").exists()
