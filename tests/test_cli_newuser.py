"""``jerald`` as a new user first runs it (issue 11, item 4): catalogs saved by nbodykit,
``--dtype f8``, the paper's per-target, per-redshift defaults (printed), and ``--quiet`` that hides
progress bars but not results. Commands run as subprocesses on 16^3 inputs for 1-2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jerald_nbk import workflow as wf
from jerald_nbk.io import read_mesh, write_catalog, write_mesh
from jerald_nbk.testing import zeldovich_particles

BIN = Path(sys.executable).parent
BOX = 20.0
N = 16
# no jax_enable_x64 in the environment: ``--dtype f8`` must switch it on by itself
ENV = {
    **{k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"},
    "JAX_PLATFORMS": "cpu",
    "MPLBACKEND": "Agg",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
}


def run(*args, ok: bool = True, prog: str = "jerald") -> subprocess.CompletedProcess:
    """Run ``prog ARGS``; with ``ok`` assert exit code 0 (showing its output otherwise)."""
    exe = BIN / prog
    module = {"jerald": "main", "jerald-ref": "ref"}[prog]
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", f"jerald_nbk.cli.{module}"]
    cmd += [str(a) for a in args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    if ok:
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res


def _density(pos, n, box):
    """1 + delta of unit-mass particles by nearest-grid-point assignment (numpy, periodic)."""
    idx = np.floor(pos / (box / n)).astype(int) % n
    out = np.zeros((n, n, n))
    np.add.at(out, (idx[:, 0], idx[:, 1], idx[:, 2]), 1.0)
    return out * n**3 / len(pos)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A catalog saved by nbodykit (top level), one in FastPM's layout, DM/stellar/HI maps."""
    from nbodykit.lab import ArrayCatalog

    d = tmp_path_factory.mktemp("newuser")
    pos = zeldovich_particles(N, BOX, seed=3)
    ArrayCatalog({"Position": pos}, BoxSize=BOX, redshift=2.0).save(str(d / "nbk_cat"))
    write_catalog(d / "fastpm_cat", {"Position": pos}, {"BoxSize": BOX, "redshift": 2.0})
    dm = _density(zeldovich_particles(N, BOX, seed=3, rms_disp=0.5), N, BOX).astype("f4")
    star = np.maximum(dm - 1.2, 0) * 0.3
    write_mesh(d / "dm", dm, BOX)
    write_mesh(d / "star", star, BOX)
    write_mesh(d / "hi", np.maximum(dm - 0.3 * star, 0) * 0.5 + 0.01, BOX)
    return d


def _provenance(run_dir) -> dict:
    return json.loads((Path(run_dir) / "params.json").read_text())["provenance"]


# ------------------------------------------------------- nbodykit catalogs, --quiet keeps results


def test_nbodykit_catalog_train_and_paint_quiet(inputs, tmp_path):
    """A catalog written by ``catalog.save(path)`` (columns at the top level) needs no option;
    ``--quiet`` hides the progress bars but the training summary and the written maps print."""
    assert (inputs / "nbk_cat" / "Position").exists()  # nbodykit's layout, not FastPM's "1/"
    out = tmp_path / "dm"
    res = run(
        "train", "--target", "dm", "--particles", inputs / "nbk_cat", "--target-map",
        inputs / "dm", "--layers", "1", "--steps", "2", "--out", out, "--quiet",
    )  # fmt: skip
    assert "best validation loss" in res.stdout and "test loss" in res.stdout
    assert f"parameters: {out / 'params.json'}" in res.stdout
    assert "step/s" not in res.stderr and "%|" not in res.stderr  # no progress bar
    assert "dataset" not in res.stderr
    assert _provenance(out)["redshift"] == 2.0

    maps = tmp_path / "maps"
    res = run(
        "paint", "--particles", inputs / "nbk_cat", "--dm-params", out / "params.json",
        "--out", maps, "--quiet",
    )  # fmt: skip
    assert f"dm map: {maps / 'dm'}" in res.stdout
    arr, _ = read_mesh(maps / "dm")
    assert arr.shape == (N,) * 3 and np.isclose(arr.mean(), 1.0, rtol=1e-4)

    # the same particles in FastPM's layout paint the same map
    maps2 = tmp_path / "maps2"
    run(
        "paint", "--particles", inputs / "fastpm_cat", "--dm-params", out / "params.json",
        "--out", maps2, "--quiet",
    )  # fmt: skip
    np.testing.assert_array_equal(read_mesh(maps2 / "dm")[0], arr)


# ------------------------------------------------------------------------------------ --dtype f8


def test_dtype_f8_train_and_paint(inputs, tmp_path):
    """``--dtype f8`` works without the user touching JAX's configuration."""
    out = tmp_path / "dm"
    run(
        "train", "--target", "dm", "--particles", inputs / "fastpm_cat", "--target-map",
        inputs / "dm", "--layers", "1", "--steps", "2", "--out", out, "--quiet", "--dtype", "f8",
    )  # fmt: skip
    assert _provenance(out)["engine"]["dtype"] == "float64"
    maps = tmp_path / "maps"
    res = run(
        "paint", "--particles", inputs / "nbk_cat", "--dm-params", out / "params.json",
        "--out", maps, "--quiet", "--dtype", "f8",
    )  # fmt: skip
    assert "jax_enable_x64" not in res.stderr
    arr, _ = read_mesh(maps / "dm")
    assert arr.dtype == np.float64 and np.isclose(arr.mean(), 1.0, rtol=1e-10)


def test_dtype_f8_jerald_ref(inputs, tmp_path):
    """``jerald-ref --dtype f8`` also switches on x64 by itself."""
    out = tmp_path / "ref"
    run(
        "--target", "dm", "--Nbodypath", inputs / "nbk_cat", "--refpath", inputs / "dm",
        "--outpath", out, "--Nstep", "1", "--steps", "1", "--dtype", "f8", "--quiet",
        prog="jerald-ref",
    )  # fmt: skip
    (train_dir,) = out.glob("*_train")
    assert _provenance(train_dir)["engine"]["dtype"] == "float64"
    (ref_map,) = out.glob("*_map")
    assert read_mesh(ref_map)[0].dtype == np.float64


# -------------------------------------------------------------------- the paper's defaults, shown


@pytest.mark.slow
def test_paper_defaults_applied_and_printed(inputs, tmp_path):
    """Stellar at z = 2 (the catalog's redshift) and z = 5, HI at z = 5: the paper's settings
    run, and the command says which."""
    st2, st5, hi5 = tmp_path / "st2", tmp_path / "st5", tmp_path / "hi5"
    common = ("--particles", inputs / "nbk_cat", "--steps", "1", "--quiet")
    res = run(
        "train", "--target", "stellar", "--target-map", inputs / "star", "--out", st2, *common
    )
    assert (
        "[jerald] stellar at z = 2 (the paper's z = 2): layers 2 (paper), loss L1 (paper), "
        "smoothing n 1 (paper)"
    ) in res.stdout
    prov = _provenance(st2)
    assert (prov["layers"], prov["smoothing_n"], prov["redshift"]) == (2, 1.0, 2.0)

    res = run(
        "train", "--target", "stellar", "--target-map", inputs / "star", "--out", st5,
        "--redshift", "5", *common,
    )  # fmt: skip
    assert (
        "[jerald] stellar at z = 5 (the paper's z = 5): layers 3 (paper), loss L1 (paper), "
        "smoothing n 0.7 (paper)"
    ) in res.stdout
    prov = _provenance(st5)
    assert (prov["layers"], prov["smoothing_n"], prov["redshift"]) == (3, 0.7, 5.0)

    res = run(
        "train", "--target", "hi", "--target-map", inputs / "hi", "--out", hi5,
        "--stellar-params", st5 / "params.json", "--redshift", "4.2", "--layers", "1", *common,
    )  # fmt: skip
    assert (
        "[jerald] hi at z = 4.2 (the paper's z = 5): layers 1 (--layers), loss L1 (paper), "
        "smoothing n 1 (paper)"
    ) in res.stdout
    prov = _provenance(hi5)
    assert (prov["layers"], prov["smoothing_n"]) == (1, 1.0)


def _train_args(target, redshift=None, **given) -> argparse.Namespace:
    base = {"layers": None, "smoothing_n": None, "loss": "auto"}
    return argparse.Namespace(target=target, redshift=redshift, **(base | given))


@pytest.mark.parametrize(
    ("target", "z", "layers", "n", "loss"),
    [
        ("dm", 0.0, 2, 0.0, 2),
        ("dm", 5.0, 2, 0.0, 2),
        ("stellar", 0.0, 2, 1.0, 1),
        ("stellar", 2.0, 2, 1.0, 1),
        ("stellar", 5.0, 3, 0.7, 1),
        ("hi", 0.0, 2, 0.0, 1),
        ("hi", 2.0, 2, 0.0, 1),
        ("hi", 5.0, 2, 1.0, 1),
    ],
)
def test_paper_table(target, z, layers, n, loss):
    d = wf.paper_defaults(target, z)
    assert (d.n_layers, d.smoothing_n, d.loss_p, d.paper_redshift) == (layers, n, loss, z)
    nl, cfg = wf.paper_settings(target, z, steps=3)
    assert (nl, cfg.smoothing_n, cfg.p_for(target)) == (layers, n, loss)


def test_redshifts_between_map_to_the_nearest():
    got = [wf.paper_redshift(z) for z in (0.0, 0.5, 0.99, 1.0, 1.01, 3.0, 3.5, 3.51, 5.0, 8.0)]
    assert got == [0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 5.0, 5.0, 5.0]
    assert wf.paper_defaults("stellar", 4.0).smoothing_n == 0.7
    with pytest.raises(ValueError, match="finite"):
        wf.paper_redshift(float("nan"))


def test_jerald_ref_uses_the_same_table():
    from jerald_nbk.cli.ref import STAGE, paper_smoothing

    for t, stage in STAGE.items():
        for z in (0.0, 0.7, 2.0, 3.0, 4.0, 5.0, 6.0):
            assert paper_smoothing(t, z) == wf.paper_defaults(stage, z).smoothing_n
    assert paper_smoothing("Mstar", None) == 1.0 and paper_smoothing("HI", None) == 0.0


def test_redshift_of_attrs():
    assert wf.redshift_of({}, {"redshift": np.array([2.0])}) == 2.0
    assert wf.redshift_of({"Redshift": 5.0}, {"redshift": 2.0}) == 5.0
    assert np.isclose(wf.redshift_of({"Time": 0.5}), 1.0)  # fastpm-python: the scale factor
    assert np.isclose(wf.redshift_of({"ScalingFactor": 1 / 6}), 5.0)
    assert wf.redshift_of({"BoxSize": 20.0}) is None


def test_overrides_and_no_redshift_are_said():
    from jerald_nbk.cli.main import _apply_paper_defaults

    args = _train_args("stellar", 5.0, layers=1, smoothing_n=0.0, loss="L2")
    line = _apply_paper_defaults(args, {})
    assert "layers 1 (--layers), loss L2 (--loss), smoothing n 0 (--smoothing-n)" in line
    assert (args.layers, args.smoothing_n) == (1, 0.0)

    args = _train_args("stellar")
    line = _apply_paper_defaults(args, {"BoxSize": 20.0}, {})
    assert "redshift unknown" in line and "--redshift" in line
    assert (args.layers, args.smoothing_n, args.redshift) == (2, 0.0, None)

    args = _train_args("hi")
    _apply_paper_defaults(args, {"BoxSize": 20.0}, {"redshift": 5.0})  # the target map's
    assert (args.layers, args.smoothing_n, args.redshift) == (2, 1.0, 5.0)
