"""Every script in examples/ runs at smoke size on the smoke suite, and writes what it says.

The scripts are run as a user runs them (a subprocess, paths on the command line; the MPI one
under ``mpiexec -n 2``). Parameter files come from ``examples/train_stages.py`` itself, trained for
a few steps: that is the first example checked. Assertions are on the files and the printed
results, not only the exit status.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nbodykit")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
Z = "2"  # one of the smoke suite's redshifts (conftest.SMOKE_REDSHIFTS)

pytestmark = pytest.mark.slow


def run(script, *args, mpi: int = 0, timeout: int = 600) -> str:
    """Run an example; its stdout (a failure shows its stderr)."""
    cmd = [sys.executable, str(EXAMPLES / script), *map(str, args)]
    if mpi:
        cmd = ["timeout", "120", str(Path(sys.executable).parent / "mpiexec"), "-n", str(mpi), *cmd]
    env = os.environ | {"MPLBACKEND": "Agg"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def suite(smoke_suite):
    return Path(smoke_suite["dir"])


@pytest.fixture(scope="module")
def trained(suite, tmp_path_factory):
    """examples/train_stages.py for 3 steps a stage: the parameter files of the other examples."""
    out = tmp_path_factory.mktemp("train")
    stdout = run("train_stages.py", "--suite", suite, "--redshift", Z, "--steps", 3, "--out", out)
    return out, stdout


def test_train_stages(trained):
    from jerald_nbk.io.paramfiles import load_params

    out, stdout = trained
    for target in ("dm", "stellar", "hi"):
        config, raw, prov = load_params(out / target / "params.json")
        assert config.target == target
        assert prov["steps"] == 3 and prov["Nmesh"] == [32, 32, 32]
        assert (out / target / "metrics.jsonl").read_text().count("\n") >= 3
        assert f"{target}: best step" in stdout
    assert "alpha_0" in stdout  # the physical parameter values are printed


def test_improve_catalog_power(suite, trained, tmp_path):
    from nbodykit.lab import FFTPower

    out = tmp_path / "power.json"
    stdout = run(
        "improve_catalog_power.py",
        *("--catalog", suite / f"fastpm_z{Z}", "--dm-params", trained[0] / "dm" / "params.json"),
        *("--out", out),
    )
    power = FFTPower.load(str(out)).power
    rows = [line.split() for line in stdout.splitlines()[1:] if line.strip()[:1].isdigit()]
    assert len(rows) == len(power["k"]) >= 10
    table = np.array(rows, dtype=float)
    good = power["modes"] > 1
    # the printed JERALD column is the saved result; the layers changed the power
    np.testing.assert_allclose(table[good, 2], power["power"].real[good], rtol=1e-3)
    assert np.any(np.abs(table[good, 2] / table[good, 1] - 1) > 1e-4)


def test_stellar_hi_cross(suite, trained, tmp_path):
    from jerald_nbk.io import read_mesh

    stdout = run(
        "stellar_hi_cross.py",
        *("--catalog", suite / f"fastpm_z{Z}", "--params", trained[0], "--out", tmp_path),
    )
    k, r = np.loadtxt(tmp_path / "r_stellar_hi.txt", unpack=True)
    assert len(k) >= 10 and np.all(np.isfinite(r)) and np.all(np.abs(r) <= 1 + 1e-5)
    assert stdout.count("r_stellar,HI") == len(k)
    for name in ("stellar", "hi"):
        arr, attrs = read_mesh(tmp_path / name)
        assert arr.shape == (32, 32, 32)
        assert np.isclose(arr.mean(dtype=np.float64), 1.0, rtol=1e-4)  # saved as 1 + delta
    assert "stellar mass in the box" in stdout


def test_paint_many(suite, trained, tmp_path):
    from jerald_nbk.io import read_mesh

    cats = [suite / f"fastpm_z{Z}", suite / "fastpm_z0"]
    stdout = run("paint_many.py", "--params", trained[0], "--out", tmp_path, *cats)
    assert f"painted {len(cats)} catalogs" in stdout
    for i in range(len(cats)):
        for name in ("dm", "stellar", "hi"):
            arr, attrs = read_mesh(tmp_path / f"sim{i:03d}" / name)
            assert arr.shape == (32, 32, 32) and np.all(np.isfinite(arr))
        dm, _ = read_mesh(tmp_path / f"sim{i:03d}" / "dm")
        np.testing.assert_allclose(dm.mean(dtype=np.float64), 1.0, rtol=1e-5)
    a, _ = read_mesh(tmp_path / "sim000" / "stellar")
    b, _ = read_mesh(tmp_path / "sim001" / "stellar")
    assert not np.allclose(a, b)  # two different catalogs, two different maps


def test_mpi_paint_power(suite, trained, tmp_path):
    args = ("--catalog", suite / f"fastpm_z{Z}", "--params", trained[0])
    stdout = run("mpi_paint_power.py", *args, "--out", tmp_path / "mpi", mpi=2)
    assert "2 ranks, engine pmesh, 32768 particles" in stdout
    run("mpi_paint_power.py", *args, "--out", tmp_path / "serial")
    mpi = json.loads((tmp_path / "mpi" / "power.json").read_text())
    one = json.loads((tmp_path / "serial" / "power.json").read_text())
    assert (mpi["ranks"], one["ranks"], one["backend"]) == (2, 1, "jax")
    for key in ("power_dm", "power_stellar"):
        a, b = np.array(mpi[key][1:]), np.array(one[key][1:])  # bin 0: k = 0 alone
        np.testing.assert_allclose(a, b, rtol=2e-3, err_msg=key)


def test_migrate_ldl(suite, trained, tmp_path):
    """An LDL run's plain-text files (written here in LDL's layout) paint and become JSON."""
    from jerald_nbk.io.paramfiles import load_params, save_plaintext
    from jerald_nbk.model.pipeline import StageConfig

    ldl = {}
    for target in ("dm", "stellar"):
        config, raw, _ = load_params(trained[0] / target / "params.json")
        ldl[target] = save_plaintext(
            tmp_path / f"{target}_param.txt",
            StageConfig(target, config.n_layers, 4, False, "sm"),  # LDL's model
            raw,
            "ldl",
        )
    stdout = run(
        "migrate_ldl.py",
        *("--catalog", suite / f"fastpm_z{Z}", "--Nmesh", 32, "--out", tmp_path / "json"),
        *("--ldl-dm", ldl["dm"], "--ldl-stellar", ldl["stellar"]),
    )
    assert "JSON and LDL files paint the same map: True" in stdout
    config, _, prov = load_params(tmp_path / "json" / "stellar.json")
    assert (config.gradient_order, config.green, prov["Nmesh"]) == (4, "gaussian", [32, 32, 32])
