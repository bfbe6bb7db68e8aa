"""The command-line tools run as a user runs them: subprocesses of ``jerald``, ``jerald-ldl`` and
``jerald-ref`` (and ``mpiexec -n 2 jerald``) on tiny synthetic inputs (16^3 particles and meshes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jerald_nbk.io import read_mesh, write_catalog, write_mesh
from jerald_nbk.testing import zeldovich_particles

BIN = Path(sys.executable).parent
BOX = 20.0
N = 16
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "MPLBACKEND": "Agg",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
}


def _exe(name: str) -> list[str]:
    """The console script next to the interpreter, or ``python -m`` of its module."""
    path = BIN / name
    if path.exists():
        return [str(path)]
    module = {"jerald": "main", "jerald-ldl": "ldl", "jerald-ref": "ref"}[name]
    return [sys.executable, "-m", f"jerald_nbk.cli.{module}"]


def run(name: str, *args, ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command; with ``ok`` assert exit code 0 (showing its output otherwise)."""
    cmd = [*_exe(name), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    if ok:
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res


def _density(pos, n, box):
    """1 + delta of unit-mass particles by CIC (numpy, periodic)."""
    x = pos / (box / n) - 0.5
    i0 = np.floor(x).astype(int)
    f = x - i0
    out = np.zeros((n, n, n))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = (
                    (f[:, 0] if dx else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dz else 1 - f[:, 2])
                )
                idx = (i0 + [dx, dy, dz]) % n
                np.add.at(out, (idx[:, 0], idx[:, 1], idx[:, 2]), w)
    return out * n**3 / len(pos)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A FastPM-layout catalog (Position, Velocity) and DM, stellar, HI, n_e, T target maps."""
    d = tmp_path_factory.mktemp("cli_inputs")
    pos = zeldovich_particles(N, BOX, seed=1)
    vel = np.random.default_rng(0).normal(size=pos.shape).astype("f4")
    write_catalog(d / "cat", {"Position": pos, "Velocity": vel}, {"BoxSize": BOX, "redshift": 2.0})
    dm = _density(zeldovich_particles(N, BOX, seed=1, rms_disp=0.5), N, BOX).astype("f4")
    star = np.maximum(dm - 1.2, 0) * 0.3
    write_mesh(d / "dm", dm, BOX)
    write_mesh(d / "star", star, BOX)
    write_mesh(d / "hi", np.maximum(dm - 0.3 * star, 0) * 0.5, BOX)
    write_mesh(d / "ne", dm * 2e-5, BOX)
    write_mesh(d / "T", (dm + 0.1) ** 0.7 * 1e5, BOX)
    # bad inputs
    write_mesh(d / "star_box25", star, 25.0)
    nan = star.copy()
    nan[1, 2, 3] = np.nan
    write_mesh(d / "star_nan.npy", nan, BOX)
    np.savetxt(d / "seven.txt", np.ones(7))
    return d


def _metrics(path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln]


@pytest.fixture(scope="module")
def dm_run(inputs, tmp_path_factory):
    """``jerald train --target dm`` for 3 steps."""
    out = tmp_path_factory.mktemp("dm_run") / "dm"
    run(
        "jerald", "train", "--target", "dm", "--particles", inputs / "cat",
        "--target-map", inputs / "dm", "--layers", "1", "--steps", "3", "--out", out, "--quiet",
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ help, info


def test_help_of_every_command():
    res = run("jerald", "--help")
    for cmd in ("train", "paint", "power", "report", "make-target", "info", "suite", "demo"):
        assert cmd in res.stdout
    keys = {
        "train": ["--target", "--particles", "--target-map", "--steps", "--config", "--out"],
        "paint": ["--dm-params", "--stellar-params", "--hi-params", "--out"],
        "power": ["--labels", "--out"],
        "report": ["--pred", "--ref"],
        "make-target": ["--field", "--Nmesh"],
        "info": ["path"],
        "suite": ["--size", "--redshifts"],
        "demo": ["--steps", "--out"],
    }
    for cmd, words in keys.items():
        text = run("jerald", cmd, "--help").stdout
        for w in words:
            assert w in text, f"jerald {cmd} --help does not mention {w}"
    ldl = run("jerald-ldl", "--help").stdout
    for w in ("--FastPMpath", "--TNGpath", "--restore_ne", "--evaluateOnly", "--BoxSize", "Adam"):
        assert w in ldl
    ref = run("jerald-ref", "--help").stdout
    for w in ("--Nbodypath", "--refpath", "--Mstarpath", "--optpath", "--evalpath", "Adam"):
        assert w in ref


def test_info(inputs, dm_run):
    out = run("jerald", "info").stdout
    assert "jerald-nbk" in out and "jax" in out
    out = run("jerald", "info", inputs / "cat").stdout
    assert "catalog" in out and "4096 particles" in out
    out = run("jerald", "info", inputs / "dm").stdout
    assert "mesh (16, 16, 16)" in out
    out = run("jerald", "info", dm_run / "params.json").stdout
    assert "dm stage, 1 layers" in out and "alpha_0" in out


# ------------------------------------------------------------- train -> paint -> power -> report


def test_train_paint_power_report(inputs, dm_run, tmp_path):
    recs = _metrics(dm_run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2]
    doc = json.loads((dm_run / "params.json").read_text())
    assert doc["target"] == "dm" and len(doc["parameters"]) == 5
    assert doc["provenance"]["Nmesh"] == [N] * 3 and doc["provenance"]["BoxSize"] == [BOX] * 3
    assert set(doc["provenance"]["losses"]) >= {"train", "validation", "test"}

    paint = tmp_path / "paint"
    run(
        "jerald", "paint", "--particles", inputs / "cat", "--dm-params", dm_run / "params.json",
        "--out", paint, "--quiet",
    )  # fmt: skip
    dm_map, attrs = read_mesh(paint / "dm")
    assert dm_map.shape == (N,) * 3 and np.isclose(dm_map.mean(), 1.0, rtol=1e-4)

    pw = tmp_path / "power"
    run("jerald", "power", inputs / "dm", paint / "dm", inputs / "dm", "--labels",
        "truth,jerald,self", "--out", pw)  # fmt: skip
    doc = json.loads((pw / "power.json").read_text())
    assert set(doc) == {"jerald", "self"}
    r_self = np.array(doc["self"]["r"][1:], dtype=float)
    np.testing.assert_allclose(r_self, 1.0, rtol=1e-6)  # a map against itself: r = 1
    np.testing.assert_allclose(np.array(doc["self"]["ratio"][1:], dtype=float), 1.0, rtol=1e-6)
    r = np.array(doc["jerald"]["r"][1:], dtype=float)
    assert np.all(np.abs(r) <= 1 + 1e-6)
    assert (pw / "power.png").stat().st_size > 0

    rep = tmp_path / "report"
    run(
        "jerald", "report", "--pred", f"jerald={paint / 'dm'}", "--ref", inputs / "dm", "--out", rep
    )
    text = (rep / "report.md").read_text()
    assert "Figures of merit" in text and "jerald" in text
    assert (rep / "slices_jerald.png").exists() and (rep / "power.png").exists()


def test_paint_keeps_each_catalogs_columns_and_attrs(inputs, dm_run, tmp_path):
    """``jerald paint --save-particles`` over two catalogs: each improved catalog keeps its own
    input's Velocity and ID columns and redshift / cosmology attrs (they were dropped, issue 12
    item 6), and each map carries its catalog's redshift, cosmology and the scale factor."""
    from jerald_nbk.io import read_catalog

    pos = zeldovich_particles(N, BOX, seed=1)
    rng = np.random.default_rng(3)
    cats = {}
    for name, z in (("a", 2.0), ("b", 1.0)):
        cols = {
            "Position": pos,
            "Velocity": rng.normal(size=pos.shape).astype("f4"),
            "ID": rng.permutation(len(pos)).astype("u8"),
        }
        cosmo = {"Omega_m": 0.3089, "h": 0.6774, "name": f"sim {name}"}
        write_catalog(
            tmp_path / name / "cat", cols, {"BoxSize": BOX, "redshift": z, "cosmology": cosmo}
        )
        cats[name] = (cols, z, cosmo)
    out = tmp_path / "paint"
    run(
        "jerald", "paint", "--particles", tmp_path / "a" / "cat", tmp_path / "b" / "cat",
        "--dm-params", dm_run / "params.json", "--save-particles", "--out", out, "--quiet",
    )  # fmt: skip
    for name, (cols, z, cosmo) in cats.items():
        got, attrs = read_catalog(
            out / f"{name}_cat" / "improved", columns=("Position", "Velocity", "ID")
        )
        np.testing.assert_array_equal(got["Velocity"], cols["Velocity"])
        np.testing.assert_array_equal(got["ID"], cols["ID"])
        assert not np.array_equal(got["Position"], cols["Position"])  # the improved positions
        assert float(np.ravel(attrs["redshift"])[0]) == z and attrs["cosmology"] == cosmo
        _, mattrs = read_mesh(out / f"{name}_cat" / "dm")
        assert float(np.ravel(mattrs["redshift"])[0]) == z and mattrs["cosmology"] == cosmo
        assert np.isclose(float(np.ravel(mattrs["Time"])[0]), 1 / (1 + z))


def test_config_values_flags_and_resume(inputs, tmp_path):
    """Config values are used (even for required options), flags override, reruns resume."""
    cfg = tmp_path / "train.json"
    cfg.write_text(
        json.dumps(
            {
                "target": "dm",
                "particles": str(inputs / "cat"),
                "target-map": str(inputs / "dm"),
                "layers": 1,
                "steps": 2,
                "checkpoint_every": 1,
                "quiet": True,
            }
        )
    )
    out = tmp_path / "run"
    run("jerald", "train", "--config", cfg, "--out", out)
    first = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in first] == [0, 1]  # steps=2 from the config
    doc = json.loads((out / "params.json").read_text())
    assert doc["provenance"]["train_config"]["steps"] == 2
    # the flag overrides the config; the same --out continues from the checkpoint at step 2
    run("jerald", "train", "--config", cfg, "--out", out, "--steps", "4")
    second = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in second] == [0, 1, 2, 3]
    assert second[:2] == first  # steps 0-1 were not recomputed (their timings are unchanged)
    doc = json.loads((out / "params.json").read_text())
    assert doc["provenance"]["train_config"]["steps"] == 4

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    res = run("jerald", "train", "--config", bad, "--out", out, ok=False)
    assert res.returncode != 0 and "stepz" in res.stderr


@pytest.mark.parametrize(
    "doc,expect",
    [
        ({"stepz": 3}, "unknown options ['stepz']"),
        ({"steps": 2.7}, "option --steps: expected an integer, found 2.7"),
        ({"steps": True}, "option --steps: expected an integer, found True"),
        ({"eta0": "fast"}, "option --eta0: expected a number, found 'fast'"),
        (
            {"target": "gas"},
            "option --target: expected one of ['dm', 'stellar', 'hi'], found 'gas'",
        ),
        ({"quiet": "yes"}, "option --quiet: expected true or false, found 'yes'"),
        ({"layers": [1, 2]}, "option --layers: expected one value, found the list [1, 2]"),
    ],
)
def test_config_unknown_key_or_wrong_type_names_the_file(tmp_path, doc, expect):
    """The config loader (cli/common.parse_with_config) refuses an unknown key or a value of the
    wrong type with one message naming the command, the file, the option and what it found
    (a float step count was truncated, and unknown keys were ignored, by earlier versions)."""
    from jerald_nbk.cli.main import parse

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(doc))
    argv = ["train", "--config", str(cfg), "--target", "dm", "--particles", "c"]
    with pytest.raises(SystemExit) as err:
        parse([*argv, "--target-map", "m", "--out", "o"])
    assert str(err.value.code).startswith(f"jerald train: config file {cfg}: ")
    assert expect in str(err.value.code)


def test_config_merge_defaults_config_then_flags(tmp_path):
    """defaults | config | command line: a config value fills a required option and is typed
    ("5" -> 5), a flag replaces it (a repeated option's list too), the rest keep defaults."""
    from jerald_nbk.cli.main import parse

    cfg = tmp_path / "cfg.toml"
    cfg.write_text('target = "dm"\nparticles = ["a", "b"]\ntarget-map = ["m", "n"]\nsteps = "5"\n')
    args = parse(["train", "--config", str(cfg), "--out", "o"])
    assert (args.target, args.particles, args.target_map) == ("dm", ["a", "b"], ["m", "n"])
    assert args.steps == 5 and args.eta0 == 0.002 and args.layers is None and not args.quiet
    args = parse(["train", "--config", str(cfg), "--out", "o", "--particles", "c", "--steps", "7"])
    assert args.particles == ["c"] and args.target_map == ["m", "n"] and args.steps == 7


# ------------------------------------------------------------------------------------ bad inputs


def _bad_cases(d: Path, out: Path):
    train = ["jerald", "train", "--target", "stellar", "--particles", d / "cat", "--steps", "2"]
    return {
        "box mismatch": (
            [*train, "--target-map", d / "star_box25", "--out", out],
            [str(d / "cat"), "BoxSize", "20", "25"],
        ),
        "missing dataset": (
            [*train, "--dataset", "2", "--target-map", d / "star", "--out", out],
            [str(d / "cat"), "no dataset '2'"],
        ),
        "NaN target": (
            [*train, "--target-map", d / "star_nan.npy", "--out", out],
            [str(d / "star_nan.npy"), "non-finite"],
        ),
        "ldl wrong length": (
            [
                "jerald-ldl",
                "--target",
                "Mstar",
                "--FastPMpath",
                d / "cat",
                "--BoxSize",
                BOX,
                "--TNGpath",
                d / "star",
                "--save",
                out,
                "--evaluateOnly",
                "--restore",
                d / "seven.txt",
            ],
            [str(d / "seven.txt"), "7 values", "5*Nstep + 3"],
        ),  # fmt: skip
        "ref wrong length": (
            [
                "jerald-ref",
                "--target",
                "dm",
                "--Nbodypath",
                d / "cat",
                "--refpath",
                d / "dm",
                "--outpath",
                out,
                "--evalpath",
                d / "seven.txt",
            ],
            [str(d / "seven.txt"), "7 values", "5*Nstep"],
        ),  # fmt: skip
        "ldl box default 205": (
            [
                "jerald-ldl",
                "--target",
                "Mstar",
                "--FastPMpath",
                d / "cat",
                "--TNGpath",
                d / "star",
                "--save",
                out,
                "--steps",
                "2",
            ],
            [str(d / "cat"), "205", "--BoxSize"],
        ),  # fmt: skip
    }


@pytest.mark.parametrize(
    "case",
    [
        "box mismatch",
        "missing dataset",
        "NaN target",
        "ldl wrong length",
        "ref wrong length",
        "ldl box default 205",
    ],
)
def test_bad_input_fails_cleanly(inputs, tmp_path, case):
    out = tmp_path / "out"
    cmd, words = _bad_cases(inputs, out)[case]
    res = run(*cmd, ok=False)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in res.stderr, f"{case}: {w!r} not in {res.stderr!r}"
    assert not out.exists(), f"{case}: output written: {list(out.rglob('*'))}"


# ------------------------------------------------------------------------------------ jerald-ldl


def test_ldl_train_and_evaluate_round_trip(inputs, tmp_path):
    from jerald_nbk.io.paramfiles import load_plaintext
    from jerald_nbk.model.pipeline import StageConfig

    save = tmp_path / "ldl"
    common = ["--FastPMpath", inputs / "cat", "--BoxSize", BOX, "--snapNum", "33", "--save", save]
    common += ["--quiet"]
    run("jerald-ldl", "--target", "dm", "--TNGDarkpath", inputs / "dm", "--Nstep", "1",
        "--steps", "2", *common)  # fmt: skip
    dm_txt = save / "dm_snap033_Nmesh16_Nstep1_n1.00_bestparam.txt"
    assert dm_txt.exists() and (save / "dm_snap033_Nmesh16_Nstep1_n1.00_map" / "Field").exists()
    assert np.loadtxt(dm_txt).shape == (5,)
    load_plaintext(dm_txt, StageConfig("dm", 1, 4, green="sm"), flavour="ldl")

    improve = ["--improveFastPM", dm_txt]
    res = run("jerald-ldl", "--target", "Mstar", "--TNGpath", inputs / "star", "--steps", "3",
              *improve, *common)  # fmt: skip
    stem = "Mstar_snap033_Nmesh16_Nstep2_n1.00"
    txt = save / f"{stem}_bestparam.txt"
    vec = np.loadtxt(txt)
    assert vec.shape == (13,)  # 5 per layer, then mu, b1, b0
    raw = load_plaintext(txt, StageConfig("stellar", 2, 4, green="sm"), flavour="ldl")
    assert raw.shape == (13,) and vec[-2] > 0  # b1 = w > 0
    trained = read_mesh(save / f"{stem}_map")[0]
    best = res.stdout.split("best validation loss at step")[1].split(":", 1)[1].splitlines()[0]

    # evaluate-only: the same map and the same losses; a 3-layer file is accepted (inferred)
    shutil.rmtree(save / f"{stem}_map")
    res = run("jerald-ldl", "--target", "Mstar", "--TNGpath", inputs / "star", "--evaluateOnly",
              "--restore", txt, *improve, *common)  # fmt: skip
    assert best.strip() in res.stdout
    np.testing.assert_allclose(read_mesh(save / f"{stem}_map")[0], trained, rtol=1e-5, atol=1e-7)
    three = tmp_path / "three.txt"
    np.savetxt(three, np.concatenate([vec[:5], vec[:10], vec[-3:]]))
    res = run("jerald-ldl", "--target", "Mstar", "--evaluateOnly", "--restore", three,
              "--Nmesh", N, *common)  # fmt: skip
    assert (save / "Mstar_snap033_Nmesh16_Nstep3_n1.00_map").exists()


def test_ldl_two_stage_tsz(inputs, tmp_path):
    save = tmp_path / "ldl"
    common = ["--FastPMpath", inputs / "cat", "--BoxSize", BOX, "--save", save, "--quiet"]
    maps = ["--TNGpath", inputs / "ne", inputs / "T", "--steps", "2", "--Nstep", "1"]
    # internal scales whose product is not 1 (LDL's 1e5 and 1e-5 cancel in n_e T, so a map that
    # forgot to undo both would pass): a missing or doubled undo is then off by 1e2 or more
    common += ["--ne-scale", "1e4", "--T-scale", "1e-6"]
    run("jerald-ldl", "--target", "tSZ_ne", *maps, *common)
    ne_txt = save / "tSZ_ne_snap099_Nmesh16_Nstep1_n1.00_bestparam.txt"
    assert np.loadtxt(ne_txt).shape == (8,)
    ne_map = read_mesh(save / "tSZ_ne_snap099_Nmesh16_Nstep1_n1.00_map")[0]
    res = run("jerald-ldl", "--target", "tSZ_T", "--restore_ne", ne_txt, *maps, *common)
    assert (save / "tSZ_T_snap099_Nmesh16_Nstep1_n1.00_bestparam.txt").exists()
    tsz = read_mesh(save / "tSZ_snap099_Nmesh16_Nstep1_n1.00_map")[0]
    assert np.all(np.isfinite(tsz)) and np.all(tsz >= 0)
    # n_e T in the input units: both fits start at the target's mean amplitude and take 2 small
    # steps, so the means agree to well within the factor 1e2 a unit slip would cause
    truth = read_mesh(inputs / "ne")[0] * read_mesh(inputs / "T")[0]
    assert tsz.mean() == pytest.approx(truth.mean(), rel=0.3)
    assert ne_map.mean() == pytest.approx(read_mesh(inputs / "ne")[0].mean(), rel=0.3)
    # the second stage needs the first
    res = run("jerald-ldl", "--target", "Xray_T", *maps, *common, ok=False)
    assert res.returncode != 0 and "--restore_ne" in res.stderr


# ------------------------------------------------------------------------------------ jerald-ref


def test_ref_train_evaluate_resume(inputs, tmp_path):
    from jerald_nbk.io.paramfiles import load_params, load_plaintext

    out = tmp_path / "ref"
    common = ["--Nbodypath", inputs / "cat", "--outpath", out, "--quiet", "--steps", "2"]
    run("jerald-ref", "--target", "dm", "--refpath", inputs / "dm", "--Nstep", "1", *common)
    dm_txt = out / "dm_Nmesh16_Nstep1_n0.00_bestparam.txt"
    cfg, raw, prov = load_params(out / "dm_Nmesh16_Nstep1_n0.00_bestparam.json")
    assert cfg.gradient_order == 6 and cfg.green_kind == "exponential"
    np.testing.assert_allclose(load_plaintext(dm_txt, cfg, flavour="jerald"), raw, rtol=1e-12)
    assert (out / "dm_Nmesh16_Nstep1_n0.00_map" / "Field").exists()

    run("jerald-ref", "--target", "Mstar", "--refpath", inputs / "star", "--improvepath", dm_txt,
        *common)  # fmt: skip
    st_txt = out / "Mstar_Nmesh16_Nstep2_n1.00_bestparam.txt"  # paper's n = 1 at z = 2
    assert np.loadtxt(st_txt).shape == (13,)

    hi = ["--target", "HI", "--refpath", inputs / "hi", "--improvepath", dm_txt, "--Mstarpath",
          st_txt, "--target-scale", "1"]  # fmt: skip
    run("jerald-ref", *hi, *common)
    stem = "HI_Nmesh16_Nstep2_n0.00"
    hi_txt = out / f"{stem}_bestparam.txt"
    assert np.loadtxt(hi_txt).shape == (32,)  # 10*2 + 11 + the shift zs
    # evaluate-only accepts the 32-value file (the reference script wanted 31)
    res = run("jerald-ref", *hi, "--Nbodypath", inputs / "cat", "--outpath", tmp_path / "ev",
              "--evalpath", hi_txt)  # fmt: skip
    assert "losses of" in res.stdout and (tmp_path / "ev" / f"{stem}_map" / "Field").exists()
    # --optpath resumes from the training directory: steps 2, 3 follow 0, 1
    first = (out / f"{stem}_train" / "metrics.jsonl").read_text().splitlines()
    run("jerald-ref", *hi, *common[:-2], "--steps", "4", "--optpath", out / f"{stem}_train")
    second = (out / f"{stem}_train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in second] == [0, 1, 2, 3] and second[:2] == first


# ------------------------------------------------------------------------------------ MPI


@pytest.mark.slow
def test_mpiexec_train_matches_single_process(inputs, dm_run, tmp_path):
    """``mpiexec -n 2 jerald train`` (pmesh engine) gives the single-process (JAX) losses.

    Tolerance: relative 1e-5 on every step's losses (float32 meshes; the two engines sum in
    different orders).
    """
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec")
    out = tmp_path / "mpi"
    cmd = [str(mpiexec), "-n", "2", *_exe("jerald"), "train", "--target", "dm", "--particles",
           str(inputs / "cat"), "--target-map", str(inputs / "dm"), "--layers", "1", "--steps",
           "3", "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    # one wall-time line, from rank 0 (jerald had its own runner, which printed it on every rank)
    assert res.stderr.count("[jerald train] done in") == 1, res.stderr
    serial, mpi = _metrics(dm_run / "metrics.jsonl"), _metrics(out / "metrics.jsonl")
    assert [r["step"] for r in mpi] == [r["step"] for r in serial]
    for a, b in zip(serial, mpi, strict=True):
        for k in ("train", "validation", "test"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (k, a, b)
    doc = json.loads((out / "params.json").read_text())
    assert doc["provenance"]["engine"]["backend"] == "pmesh"


@pytest.mark.slow
@pytest.mark.parametrize("n_maps", [1, 3])
def test_mpiexec_power_matches_single_process(inputs, tmp_path, n_maps):
    """``mpiexec -n 2 jerald power``: each rank reads its x slab and pmesh transforms them; the
    spectra and figures of merit equal one process's (float32 maps, transforms in float64:
    1e-10 relative), and only rank 0 writes."""
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec")
    maps = [str(inputs / m) for m in ("dm", "hi", "star")[:n_maps]]
    docs = []
    for launcher in ([], [str(mpiexec), "-n", "2"]):
        out = tmp_path / ("mpi" if launcher else "serial")
        cmd = [*launcher, *_exe("jerald"), "power", *maps, "--out", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count("[jerald] spectra:") == 1, res.stdout
        docs.append(json.loads((out / "power.json").read_text()))
    serial, mpi = docs
    assert set(serial) == set(mpi) and len(serial) == max(1, n_maps - 1)
    for label in serial:
        for key, value in serial[label].items():
            if isinstance(value, list) and value and isinstance(value[0], (int, float)):
                a = np.array(value, dtype=float)
                b = np.array(mpi[label][key], dtype=float)
                np.testing.assert_allclose(b, a, rtol=1e-10, atol=0, err_msg=f"{label} {key}")


@pytest.mark.slow
def test_mpiexec_report_matches_single_process(inputs, tmp_path):
    """``mpiexec -n 2 jerald report`` (slabs on each rank, figures drawn by rank 0): the same
    table of figures of merit as one process, and the same figures."""
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec")
    tables = []
    for launcher in ([], [str(mpiexec), "-n", "2"]):
        out = tmp_path / ("mpi" if launcher else "serial")
        cmd = [*launcher, *_exe("jerald"), "report", "--ref", str(inputs / "dm"), "--pred",
               f"hi={inputs / 'hi'}", "--pred", f"self={inputs / 'dm'}", "--out", str(out)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count("[jerald] report:") == 1, res.stdout
        text = (out / "report.md").read_text()
        rows = [line for line in text.splitlines() if line.startswith("|")]
        tables.append(rows[: rows.index("| item | value |")])  # not the provenance (date, --out)
        assert {p.name for p in out.glob("*.png")} == {
            "power.png",
            "slices_hi.png",
            "slices_self.png",
        }
    assert tables[0] and tables[0] == tables[1]


@pytest.mark.parametrize(
    "where,option,value,expect",
    [
        ("flag", "--layers", "0", "option --layers: expected a value > 0, found 0"),
        ("flag", "--patience", "0", "option --patience: expected a value > 0, found 0"),
        ("config", "smoothing-n", -1, "option --smoothing-n: expected a value >= 0, found -1"),
        ("config", "eta0", 0, "option --eta0: expected a value > 0, found 0"),
    ],
)
def test_option_ranges_one_table_for_the_three_commands(tmp_path, where, option, value, expect):
    """jerald checks its option values with the drop-in commands' table (cli/common.OPTION_RANGES;
    it had its own copy, which refused --checkpoint-every 0, the end-only checkpoint that
    jerald-ref accepts and TrainConfig supports), naming the config file when the value came
    from it."""
    from jerald_nbk.cli.main import parse

    argv = ["train", "--target", "dm", "--particles", "c", "--target-map", "m", "--out", "o"]
    if where == "flag":
        argv += [option, value]
    else:
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps({option: value}))
        argv += ["--config", str(cfg)]
    with pytest.raises(SystemExit) as err:
        parse(argv)
    src = f"config file {tmp_path / 'cfg.json'}: " if where == "config" else ""
    assert str(err.value.code) == f"jerald train: {src}{expect}"
    assert parse([*argv[:9], "--checkpoint-every", "0"]).checkpoint_every == 0
