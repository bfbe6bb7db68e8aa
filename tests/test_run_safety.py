"""Runs that know what they are, exact resume from any kill point, interrupts, and writers that
never clobber what they did not create (issue 12, items 1-3).

Exactness: a run killed at any step (between checkpoints or on one, with or without early stopping)
and resumed ends with the same final and best parameters, best step, losses and history (timings
aside) as an uninterrupted run, compared with ``==`` (bit for bit).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jerald_nbk.io import read_mesh, write_catalog, write_mesh
from jerald_nbk.io.paramfiles import save_params
from jerald_nbk.model.pipeline import Stage, StageConfig
from jerald_nbk.pm import JaxEngine
from jerald_nbk.testing import zeldovich_particles
from jerald_nbk.train.loop import (
    Objective,
    RunMismatchError,
    TrainConfig,
    TrainingInterrupted,
    train,
)
from jerald_nbk.utils import (
    LOCK_NAME,
    OUTPUT_MARKER,
    ForeignOutputError,
    RunLockedError,
    StaleLockWarning,
    atomic_dir,
    atomic_write,
    run_lock,
)

N, L = 16, 20.0


@pytest.fixture(scope="module")
def pm():
    return JaxEngine(N, L, dtype="f8")


@pytest.fixture(scope="module")
def pos():
    return jnp.asarray(zeldovich_particles(N, L, seed=1, rms_disp=0.5, dtype=np.float64))


def _raw_of(stage, **phys):
    p = stage.table.as_dict(stage.table.init_raw())
    p.update(phys)
    return jnp.asarray(stage.table.to_raw(p))


@pytest.fixture(scope="module")
def problem(pm, pos):
    """A 1-layer DM stage and a planted target: (stage, target, objective factory)."""
    stage = Stage(pm, StageConfig("dm", 1))
    target = stage.forward(pos, _raw_of(stage, alpha_0=0.02, gamma_0=0.8))
    return stage, target


CONFIGS = {
    # plain: 14 steps, a checkpoint every 4 (kills fall between and on checkpoints)
    "plain": TrainConfig(steps=14, checkpoint_every=4, progress=False),
    # early stopping with a constant learning rate: stops after 16 of 60 steps here
    "patience": TrainConfig(
        steps=60, patience=4, eta0=0.05, eta_final=0.05, checkpoint_every=4, progress=False
    ),
}


@pytest.fixture(scope="module")
def objectives(problem, pos):
    stage, target = problem
    return {k: Objective(stage, pos, target, cfg) for k, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def uninterrupted(objectives, tmp_path_factory):
    out = {}
    for name, cfg in CONFIGS.items():
        out[name] = train(objectives[name], cfg, workdir=tmp_path_factory.mktemp(name))
    assert out["patience"].stopped_early and len(out["patience"].history) < 40
    assert not out["plain"].stopped_early
    return out


def _strip(history):
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


def assert_same_run(a, b):
    """Two TrainResults are the same run, bit for bit (timings aside)."""
    np.testing.assert_array_equal(a.raw, b.raw)
    np.testing.assert_array_equal(a.best_raw, b.best_raw)
    assert a.raw.dtype == b.raw.dtype and a.best_raw.dtype == b.best_raw.dtype
    assert a.best_step == b.best_step
    assert a.best_losses == b.best_losses
    assert a.stopped_early == b.stopped_early
    assert _strip(a.history) == _strip(b.history)
    for extra in ("final_losses", "final_step"):
        assert getattr(a, extra, None) == getattr(b, extra, None)


class Kill(Exception):
    """Stands for a kill: raised from the log callback after a step's record is written."""


def _kill_at(k):
    def log(rec):
        if rec["step"] == k:
            raise Kill

    return log


def _metrics_steps(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines]


# ------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize(
    "name,kills",
    [
        ("plain", [0]),
        ("plain", [2]),  # before the first checkpoint (resumes from the step-0 identity record)
        ("plain", [3]),  # just before the step-4 checkpoint is written
        ("plain", [4]),  # just after it
        ("plain", [6, 9]),  # killed twice
        ("plain", [13]),  # the last step
        ("patience", [1]),
        ("patience", [5]),
        ("patience", ["stop-2"]),  # two steps before early stopping
        ("patience", ["stop"]),  # the step that stops
    ],
)
def test_kill_anywhere_resumes_bit_identically(objectives, uninterrupted, tmp_path, name, kills):
    cfg, obj, full = CONFIGS[name], objectives[name], uninterrupted[name]
    last = len(full.history) - 1
    kills = [last if k == "stop" else last - 2 if k == "stop-2" else k for k in kills]
    for k in kills:
        with pytest.raises(Kill):
            train(obj, cfg, workdir=tmp_path, log=_kill_at(k))
        assert not (tmp_path / LOCK_NAME).exists()  # the lock goes with the process
    resumed = train(obj, cfg, workdir=tmp_path)
    assert not resumed.already_done
    assert_same_run(resumed, full)
    assert _metrics_steps(tmp_path) == list(range(len(full.history)))
    assert not list(tmp_path.glob(".*tmp"))


def test_finished_run_does_nothing_and_says_so(objectives, uninterrupted, tmp_path, capfd):
    cfg, obj = CONFIGS["patience"], objectives["patience"]
    train(obj, cfg, workdir=tmp_path)
    ckpt = (tmp_path / "checkpoint.npz").read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    capfd.readouterr()
    again = train(obj, cfg, workdir=tmp_path)
    assert again.already_done
    assert "already stopped early" in capfd.readouterr().err
    assert_same_run(again, uninterrupted["patience"])
    assert (tmp_path / "checkpoint.npz").read_bytes() == ckpt  # nothing rewritten
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    # an early-stopped run stays stopped even with more steps asked for
    more = TrainConfig(**{**cfg.as_dict(), "steps": 500})
    assert train(obj, more, workdir=tmp_path).already_done


def test_more_steps_continue_a_finished_run(problem, pos, tmp_path):
    stage, target = problem
    long = TrainConfig(steps=10, checkpoint_every=3, progress=False)
    short = TrainConfig(**{**long.as_dict(), "steps": 6})
    obj = Objective(stage, pos, target, long)
    full = train(obj, long, workdir=tmp_path / "full")
    first = train(obj, short, workdir=tmp_path / "ext")
    assert len(first.history) == 6
    extended = train(obj, long, workdir=tmp_path / "ext")
    assert_same_run(extended, full)
    with pytest.raises(RunMismatchError, match="at step 10, beyond steps=6"):
        train(obj, TrainConfig(**{**long.as_dict(), "steps": 6, "patience": None}),
              workdir=tmp_path / "ext")  # fmt: skip


def test_signal_saves_a_checkpoint_at_the_current_step(objectives, uninterrupted, tmp_path):
    cfg, obj = CONFIGS["plain"], objectives["plain"]
    handler = signal.getsignal(signal.SIGINT)

    def sigint_at_5(rec):
        if rec["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        train(obj, cfg, workdir=tmp_path, log=sigint_at_5)
    err = info.value
    assert err.exit_status == 130 and err.step == 6  # step 5 completes, then the run stops
    assert "SIGINT" in str(err) and str(tmp_path / "checkpoint.npz") in str(err)
    with np.load(tmp_path / "checkpoint.npz") as z:
        assert int(z["step"]) == 6  # between checkpoints (every 4): written for the interrupt
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    assert_same_run(train(obj, cfg, workdir=tmp_path), uninterrupted["plain"])

    def sigterm_at_0(rec):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        train(obj, cfg, log=sigterm_at_0)  # no workdir: nothing to save, still a clean stop
    assert info.value.exit_status == 143 and info.value.checkpoint is None


# ------------------------------------------------------------------------------ run identity


def test_resuming_another_run_is_refused_with_what_differs(problem, pos, pm, tmp_path):
    stage, target = problem
    cfg = TrainConfig(steps=4, checkpoint_every=2, progress=False)
    with pytest.raises(Kill):
        train(Objective(stage, pos, target, cfg), cfg, workdir=tmp_path, log=_kill_at(2))

    other_target = target * 1.01
    with pytest.raises(RunMismatchError, match=r"inputs target: shape \[16, 16, 16\]") as info:
        train(Objective(stage, pos, other_target, cfg), cfg, workdir=tmp_path)
    msg = str(info.value)
    assert "--no-resume" in msg and "--force-resume" in msg and str(tmp_path) in msg

    faster = TrainConfig(**{**cfg.as_dict(), "eta0": 0.01, "steps": 9, "progress": True})
    with pytest.raises(RunMismatchError, match="training eta0: 0.002 in the checkpoint, 0.01 now"):
        train(Objective(stage, pos, target, faster), faster, workdir=tmp_path)

    two = Stage(pm, StageConfig("dm", 2))
    with pytest.raises(RunMismatchError, match="cannot be continued") as info:
        train(Objective(two, pos, target, cfg), cfg, workdir=tmp_path, force_resume=True)
    assert "model n_layers: 1 in the checkpoint, 2 now" in str(info.value)

    # the caller's own description of the inputs is compared too (paths are not)
    with pytest.raises(RunMismatchError, match="inputs target map file: absent in the checkpoint"):
        train(Objective(stage, pos, target, cfg), cfg, workdir=tmp_path,
              inputs={"target map file": {"path": "a", "sha256": "0" * 32}})  # fmt: skip

    # where it starts is part of what it is: other initial parameters make another run
    moved = np.asarray(stage.table.init_raw(), dtype=np.float32)
    moved[0] *= 0.5
    with pytest.raises(RunMismatchError, match="start parameters: "):
        train(Objective(stage, pos, target, cfg), cfg, moved, workdir=tmp_path)

    # continue anyway: a warning, then the new identity is recorded
    with pytest.warns(RuntimeWarning, match="continuing anyway"):
        res = train(Objective(stage, pos, other_target, cfg), cfg, workdir=tmp_path,
                    force_resume=True)  # fmt: skip
    assert len(res.history) == 4
    # afresh: resume=False discards the state
    res = train(Objective(stage, pos, target, faster), faster, workdir=tmp_path, resume=False)
    assert len(res.history) == 9 and _metrics_steps(tmp_path) == list(range(9))


def test_a_resume_that_names_no_start_continues_the_checkpoints(problem, pos, tmp_path):
    # `jerald-ref --optpath <train dir>` resumes without knowing the first run's initial values
    stage, target = problem
    cfg = TrainConfig(steps=4, checkpoint_every=2, progress=False)
    moved = np.asarray(stage.table.init_raw(), dtype=np.float32)
    moved[0] *= 0.5
    with pytest.raises(Kill):
        train(Objective(stage, pos, target, cfg), cfg, moved, workdir=tmp_path, log=_kill_at(2))
    res = train(Objective(stage, pos, target, cfg), cfg, workdir=tmp_path)
    assert [r["step"] for r in res.history] == [0, 1, 2, 3]
    assert res.history[0]["params"][stage.table.names[0]] == pytest.approx(
        stage.table.as_dict(moved)[stage.table.names[0]]
    )


def test_a_checkpoint_without_a_start_record_still_resumes(problem, pos, tmp_path):
    # checkpoints written before a run's start was part of its record: nothing to compare
    stage, target = problem
    cfg = TrainConfig(steps=4, checkpoint_every=2, progress=False)
    with pytest.raises(Kill):
        train(Objective(stage, pos, target, cfg), cfg, workdir=tmp_path, log=_kill_at(2))
    ckpt = tmp_path / "checkpoint.npz"
    with np.load(ckpt) as z:
        arrays = dict(z)
    record = json.loads(arrays["fingerprint"].tobytes().decode())
    assert "parameters" in record.pop("start")
    arrays["fingerprint"] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    np.savez(ckpt, **arrays)
    res = train(Objective(stage, pos, target, cfg), cfg, workdir=tmp_path)
    assert [r["step"] for r in res.history] == [0, 1, 2, 3]


def test_foreign_or_broken_files_in_workdir(problem, pos, tmp_path):
    stage, target = problem
    cfg = TrainConfig(steps=2, progress=False)
    obj = Objective(stage, pos, target, cfg)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text("my notes\n")
    with pytest.raises(ForeignOutputError, match="metrics.jsonl exists but .* no checkpoint"):
        train(obj, cfg, workdir=tmp_path / "a")
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == "my notes\n"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint.npz").write_bytes(b"PK\x03\x04 truncated")
    for resume in (True, False):
        with pytest.raises(ForeignOutputError, match="checkpoint .*checkpoint.npz is unreadable"):
            train(obj, cfg, workdir=tmp_path / "b", resume=resume)
    assert len(train(obj, cfg, workdir=tmp_path / "b", overwrite=True).history) == 2


# ------------------------------------------------------------------------------ lock


def test_second_run_is_locked_out_and_stale_locks_are_taken_over(problem, pos, tmp_path):
    stage, target = problem
    cfg = TrainConfig(steps=2, progress=False)
    obj = Objective(stage, pos, target, cfg)
    tmp_path.mkdir(exist_ok=True)
    lock = tmp_path / LOCK_NAME
    live = os.getppid()  # a live process on this host that is not us
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live, "since": "earlier"}))
    with pytest.raises(RunLockedError, match=f"host {socket.gethostname()}, pid {live}"):
        train(obj, cfg, workdir=tmp_path)
    assert not (tmp_path / "checkpoint.npz").exists()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    with pytest.warns(StaleLockWarning, match=f"pid {gone.pid}"):
        assert len(train(obj, cfg, workdir=tmp_path).history) == 2
    assert not lock.exists()

    # a lock of another host cannot be checked: refused, naming the file to delete
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunLockedError, match=f"delete {lock}"):
        train(obj, cfg, workdir=tmp_path)


def test_run_lock_nests_and_removes_a_directory_it_created(tmp_path):
    d = tmp_path / "new"
    with run_lock(d) as lock, run_lock(d):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not d.exists()  # created by the lock, left empty: removed again


# ------------------------------------------------------------------------------ writers


def test_writers_refuse_what_they_did_not_write(tmp_path):
    user = tmp_path / "m"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(ForeignOutputError, match=f"{user} exists and is not a jerald-nbk output"):
        write_mesh(user, np.ones((4, 4, 4)), 1.0)
    with pytest.raises(ForeignOutputError, match=str(user)):
        write_catalog(user, {"Position": np.zeros((3, 3), "f4")}, {"BoxSize": 1.0})
    assert sorted(os.listdir(user)) == ["thesis.tex"]
    assert (user / "thesis.tex").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporaries

    # our output is replaced; with a file added by someone it is not
    ours = tmp_path / "ours"
    write_mesh(ours, np.zeros((4, 4, 4)), 1.0)
    assert (ours / OUTPUT_MARKER).is_file()
    write_mesh(ours, np.ones((4, 4, 4)), 2.0)
    assert read_mesh(ours)[1]["BoxSize"][0] == 2.0
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(ForeignOutputError, match=f"holds {ours / 'notes.txt'}"):
        write_mesh(ours, np.ones((4, 4, 4)), 3.0)
    # overwrite=True replaces anything
    write_mesh(user, np.ones((4, 4, 4)), 1.0, overwrite=True)
    assert not (user / "thesis.tex").exists() and read_mesh(user)[0].shape == (4, 4, 4)
    # an empty directory is not worth an error
    (tmp_path / "empty").mkdir()
    write_catalog(tmp_path / "empty", {"Position": np.zeros((3, 3), "f4")}, {"BoxSize": 1.0})

    # .npy: a user's array (no sidecar of ours) is kept
    npy = tmp_path / "a.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(ForeignOutputError, match=f"{npy} exists and is not a jerald-nbk output"):
        write_mesh(npy, np.ones((4, 4, 4)), 1.0)
    np.testing.assert_array_equal(np.load(npy), np.arange(3))
    write_mesh(tmp_path / "b.npy", np.ones((4, 4, 4)), 1.0)
    write_mesh(tmp_path / "b.npy", np.zeros((4, 4, 4)), 1.0)  # ours: replaced


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_mesh(tmp_path / "m", np.ones((4, 4, 4)), 1.0)
        write_mesh(tmp_path / "m.npy", np.ones((4, 4, 4)), 1.0)
        with atomic_write(tmp_path / "f.json") as fh:
            fh.write("{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    for path in [tmp_path / "m", tmp_path / "d", *(tmp_path / "m").rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    for path in (tmp_path / "m.npy", tmp_path / "m.npy.json", tmp_path / "f.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# ------------------------------------------------------------------------------ the commands

BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "MPLBACKEND": "Agg",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
}


def _jerald(*args) -> list[str]:
    exe = BIN / "jerald"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "jerald_nbk.cli.main"]
    return [*head, *map(str, args)]


def _run(*args, umask=None, ok=True):
    res = subprocess.run(
        _jerald(*args),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        umask=-1 if umask is None else umask,
    )
    if ok:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, pm, pos):
    d = tmp_path_factory.mktemp("inputs")
    p = np.asarray(pos, dtype="f4")
    write_catalog(d / "cat", {"Position": p}, {"BoxSize": L, "redshift": 2.0})
    stage = Stage(pm, StageConfig("dm", 1))
    write_mesh(d / "dm", np.asarray(stage.forward(pos, _raw_of(stage, alpha_0=0.02)), "f4"), L)
    save_params(d / "dm.json", StageConfig("dm", 1), _raw_of(stage, alpha_0=0.01),
                {"Nmesh": N, "BoxSize": L})  # fmt: skip
    return d


def test_paint_keeps_a_users_directory_and_follows_the_umask(cli_inputs, tmp_path):
    out = tmp_path / "D"
    (out / "dm").mkdir(parents=True)
    (out / "dm" / "mine.txt").write_text("keep me")
    paint = ["paint", "--particles", cli_inputs / "cat", "--dm-params", cli_inputs / "dm.json",
             "--out", out, "--quiet", "--save-particles"]  # fmt: skip
    res = _run(*paint, ok=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert str(out / "dm") in res.stderr and "--overwrite" in res.stderr
    assert sorted(os.listdir(out)) == ["dm"]  # nothing partial: 'improved' was not written either
    assert sorted(os.listdir(out / "dm")) == ["mine.txt"]
    assert (out / "dm" / "mine.txt").read_text() == "keep me"

    _run(*paint, "--overwrite", umask=0o027)
    assert read_mesh(out / "dm")[0].shape == (N, N, N)
    for path in [out / "dm", out / "improved", *(out / "dm").rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~0o027
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    _run(*paint)  # our own outputs are replaced without --overwrite


def _train_cmd(d, out, steps):
    return ["train", "--target", "dm", "--particles", d / "cat", "--target-map", d / "dm",
            "--layers", "1", "--steps", steps, "--checkpoint-every", "1000", "--out", out,
            "--quiet"]  # fmt: skip


def _params(path):
    doc = json.loads(Path(path).read_text())
    return [p["raw"] for p in doc["parameters"]], doc["provenance"]["best_step"]


def test_train_sigint_then_resume_equals_an_uninterrupted_run(cli_inputs, tmp_path):
    steps = 150  # ~30 ms each here: the interrupt comes long before the end
    out = tmp_path / "cut"
    proc = subprocess.Popen(
        _jerald(*_train_cmd(cli_inputs, out, steps)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("jerald train:")]
    assert len(lines) == 1 and "SIGINT" in lines[0] and "resume" in lines[0], stderr
    with np.load(out / "checkpoint.npz") as z:
        done = int(z["step"])
    assert 3 <= done < steps and _metrics_steps(out) == list(range(done))
    assert not (out / LOCK_NAME).exists()

    # resuming with another input is refused, saying what differs and how to go on
    res = _run(*_train_cmd(cli_inputs, out, steps), "--target-scale", "2", ok=False)
    assert res.returncode == 1 and "target scale: 1.0 in the checkpoint, 2.0 now" in res.stderr
    assert "--no-resume" in res.stderr and "Traceback" not in res.stderr

    _run(*_train_cmd(cli_inputs, out, steps))  # resumes
    full = tmp_path / "full"
    _run(*_train_cmd(cli_inputs, full, steps))
    for name in ("params.json", "params_final.json"):
        assert _params(out / name) == _params(full / name)
    strip = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
             for x in (out / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    ref = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
           for x in (full / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert strip == ref

    # the same command again: nothing to do, and it says so
    before = (out / "checkpoint.npz").read_bytes()
    res = _run(*_train_cmd(cli_inputs, out, steps))
    assert "nothing to do" in res.stderr
    assert (out / "checkpoint.npz").read_bytes() == before
    assert _params(out / "params.json") == _params(full / "params.json")


def test_train_refuses_a_foreign_out_and_a_held_lock(cli_inputs, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "params.json").write_text('{"mine": 1}')
    res = _run(*_train_cmd(cli_inputs, out, 2), ok=False)
    assert res.returncode == 1 and str(out / "params.json") in res.stderr
    assert "--overwrite" in res.stderr and (out / "params.json").read_text() == '{"mine": 1}'
    assert sorted(os.listdir(out)) == ["params.json"]

    (out / LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"})
    )
    res = _run(*_train_cmd(cli_inputs, out, 2), "--overwrite", ok=False)
    assert res.returncode == 1 and f"pid {os.getpid()}" in res.stderr
    assert "Traceback" not in res.stderr
    (out / LOCK_NAME).unlink()
    _run(*_train_cmd(cli_inputs, out, 2), "--overwrite")
    assert "mine" not in (out / "params.json").read_text()


def test_atomic_write_leaves_no_temporary_when_its_folder_is_moved_mid_write(tmp_path):
    """The folder renamed away while a file is written (a user moving a run's --out): the write
    fails (the output is not where it was asked for) and its temporary goes with it; the old
    cleanup unlinked by path and left the temporary in the moved folder."""
    from jerald_nbk.utils import atomic_write

    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(OSError):
        with atomic_write(out / "checkpoint.npz", "wb") as fh:
            fh.write(b"partial")
            out.rename(tmp_path / "moved")
            out.write_text("not a directory\n")
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == []
    assert out.read_text() == "not a directory\n"
