"""Collective failure under ``mpiexec -n 2`` (issue 13, item 4).

An error on any rank must end every rank within 30 s with a non-zero exit and the failing rank's
message, and leave no partial output. Each test runs a command under ``timeout 60 mpiexec -n 2``
on tiny inputs (16^3, 2 steps): the five everyday mistakes that used to hang, and a fault injected
on one rank only (rank 1, then rank 0) through the test-only hook ``JERALD_TEST_FAULT`` (see
:func:`jerald_nbk.utils.fault_point`) while reading, training, writing and painting.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jerald_nbk.io import write_catalog, write_mesh
from jerald_nbk.testing import zeldovich_particles

BIN = Path(sys.executable).parent
BOX = 20.0
N = 16
LIMIT = 30.0  # seconds within which every rank must have ended
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "MPLBACKEND": "Agg",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "JERALD_MPI_GRACE": "3",  # a rank failing alone aborts the others 3 s after (default 5)
}
ENV.pop("JERALD_TEST_FAULT", None)


def _mpiexec() -> str | None:
    exe = BIN / "mpiexec"
    return str(exe) if exe.exists() else shutil.which("mpiexec")


pytestmark = pytest.mark.skipif(
    _mpiexec() is None or shutil.which("timeout") is None, reason="no mpiexec or timeout"
)


def _exe(name: str) -> list[str]:
    path = BIN / name
    if path.exists():
        return [str(path)]
    module = {"jerald": "main", "jerald-ldl": "ldl", "jerald-ref": "ref"}[name]
    return [sys.executable, "-m", f"jerald_nbk.cli.{module}"]


def _cmd(name: str, *args) -> list[str]:
    return ["timeout", "60", _mpiexec(), "-n", "2", *_exe(name), *map(str, args)]


def mpirun(
    name: str, *args, fault: str | None = None, cwd=None
) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``timeout 60 mpiexec -n 2 NAME ARGS`` (with ``JERALD_TEST_FAULT=fault``); (result, s)."""
    env = dict(ENV)
    if fault:
        env["JERALD_TEST_FAULT"] = fault
    t0 = time.perf_counter()
    res = subprocess.run(_cmd(name, *args), capture_output=True, text=True, env=env, cwd=cwd)
    return res, time.perf_counter() - t0


def assert_failed(res, seconds: float, *messages: str) -> str:
    """Non-zero exit, not the timeout's, within :data:`LIMIT`, with every message in the output."""
    out = res.stdout + res.stderr
    assert res.returncode not in (0, 124, 137), (
        f"exit {res.returncode} after {seconds:.1f} s:\n{out}"
    )
    assert seconds < LIMIT, f"took {seconds:.1f} s:\n{out}"
    for msg in messages:
        assert msg in out, f"{msg!r} not in the output:\n{out}"
    print(f"every rank ended in {seconds:.1f} s (exit {res.returncode})")
    return out


def no_leftovers(root: Path) -> None:
    """No temporary of our atomic writers (``.NAME.XXXX.tmp``) under ``root``."""
    tmps = [p for p in root.rglob(".*.tmp")]
    assert not tmps, f"temporaries left behind: {tmps}"


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
    """A catalog, a DM target map, a trained DM parameter file (1 process) and a regular file."""
    d = tmp_path_factory.mktemp("mpi_fail_inputs")
    pos = zeldovich_particles(N, BOX, seed=1)
    vel = np.random.default_rng(0).normal(size=pos.shape).astype("f4")
    write_catalog(d / "cat", {"Position": pos, "Velocity": vel}, {"BoxSize": BOX, "redshift": 2.0})
    dm = _density(zeldovich_particles(N, BOX, seed=1, rms_disp=0.5), N, BOX).astype("f4")
    write_mesh(d / "dm", dm, BOX)
    (d / "afile").write_text("not a directory\n")
    res = subprocess.run(
        [*_exe("jerald"), "train", "--target", "dm", "--particles", d / "cat", "--target-map",
         d / "dm", "--layers", "1", "--steps", "2", "--out", d / "dmrun", "--quiet"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return d


def _train_args(d: Path, out, *extra) -> list:
    return ["train", "--target", "dm", "--particles", d / "cat", "--target-map", d / "dm",
            "--layers", "1", "--steps", "2", "--out", out, "--quiet", *extra]  # fmt: skip


def _paint_args(d: Path, out) -> list:
    return ["paint", "--dm-params", d / "dmrun" / "params.json", "--particles", d / "cat",
            "--dataset", "1", "--save-particles", "--out", out, "--quiet"]  # fmt: skip


def _untouched(afile: Path) -> None:
    assert afile.is_file() and afile.read_text() == "not a directory\n"


# ------------------------------------------------------------------------------ everyday mistakes


def test_train_out_under_a_file(inputs):
    res, s = mpirun("jerald", *_train_args(inputs, inputs / "afile" / "x"))
    assert_failed(res, s, "Not a directory")
    _untouched(inputs / "afile")
    no_leftovers(inputs)


def test_paint_save_particles_under_a_file(inputs):
    res, s = mpirun("jerald", *_paint_args(inputs, inputs / "afile" / "x"))
    assert_failed(res, s, "Not a directory")
    _untouched(inputs / "afile")
    no_leftovers(inputs)


def test_ldl_evaluate_only_save_under_a_file(inputs):
    res, s = mpirun(
        "jerald-ldl", "--target", "dm", "--FastPMpath", inputs / "cat", "--BoxSize", BOX,
        "--evaluateOnly", "--restore", inputs / "dmrun" / "params.json", "--Nmesh", N,
        "--save", inputs / "afile" / "x", "--quiet",
    )  # fmt: skip
    assert_failed(res, s, "Not a directory")
    _untouched(inputs / "afile")
    no_leftovers(inputs)


def test_ref_optpath_outpath_under_a_file(inputs):
    res, s = mpirun(
        "jerald-ref", "--target", "dm", "--Nbodypath", inputs / "cat", "--refpath", inputs / "dm",
        "--Nstep", "1", "--steps", "3", "--optpath", inputs / "dmrun",
        "--outpath", inputs / "afile" / "x", "--quiet",
    )  # fmt: skip
    assert_failed(res, s, "Not a directory")
    _untouched(inputs / "afile")
    no_leftovers(inputs)


def test_train_out_replaced_by_a_file_mid_run(inputs, tmp_path):
    out = tmp_path / "run"
    args = _train_args(inputs, out, "--checkpoint-every", "1")
    args[args.index("--steps") + 1] = "400"
    env = dict(ENV)
    t0 = time.perf_counter()
    proc = subprocess.Popen(_cmd("jerald", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    try:
        metrics = out / "metrics.jsonl"
        while time.perf_counter() - t0 < 50:  # wait for the first steps
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the run wrote no step in 50 s")
        out.rename(tmp_path / "moved")
        out.write_text("not a directory\n")
        t1 = time.perf_counter()
        stdout, stderr = proc.communicate(timeout=90)
        seconds = time.perf_counter() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    # which write meets the file first decides the OS's words: appending to run/metrics.jsonl
    # gives "Not a directory", making the folder run again (the checkpoint writer) "File exists"
    text = assert_failed(res, seconds, str(out))
    assert "Not a directory" in text or "File exists" in text, text
    assert out.read_text() == "not a directory\n"
    no_leftovers(tmp_path)


# ------------------------------------------------------------------------------ injected faults


@pytest.mark.parametrize(
    "where, rank", [("read", 1), ("read", 0), ("step", 1), ("step", 0), ("write", 0)]
)
def test_fault_in_training(inputs, tmp_path, where, rank):
    """A fault on one rank while reading the catalog, at a training step, or writing the run.

    Training writes on rank 0 only (a fault in writing on rank 1 is :func:`test_fault_in_paint`'s).
    """
    out = tmp_path / "run"
    res, s = mpirun("jerald", *_train_args(inputs, out), fault=f"{where}:{rank}")
    assert_failed(res, s, f"injected fault at {where!r} on rank {rank}")
    assert not (out / "params.json").exists()
    assert not (out / ".jerald.lock").exists()
    no_leftovers(tmp_path)


@pytest.mark.parametrize("rank", [1, 0])
@pytest.mark.parametrize("where", ["paint", "write"])
def test_fault_in_paint(inputs, tmp_path, where, rank):
    """A fault on one rank while painting the maps, or writing them and the particles."""
    out = tmp_path / "maps"
    res, s = mpirun("jerald", *_paint_args(inputs, out), fault=f"{where}:{rank}")
    assert_failed(res, s, f"injected fault at {where!r} on rank {rank}")
    assert not (out / "improved").exists()
    if where == "paint" or rank == 0:  # the first write (the map, rank 0) or before any
        assert not (out / "dm").exists()
    no_leftovers(tmp_path)
