"""``jerald paint`` over many catalogs and ``jerald train`` on several simulations (issue 14,
items 3 and 4), run as a user runs them.

Painting runs in this process (``jerald_nbk.cli.main.main``) so that compilations can be counted
(:data:`jerald_nbk.model.pipeline.TRACES`); each catalog's maps are checked against painting that
catalog alone and the DM map against an independent numpy CIC of the improved particles. The MPI
run and the training runs are subprocesses (``mpiexec -n 2 jerald``, ``jerald train``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_cli import BIN, BOX, ENV, N, _density, _exe, _metrics, run  # noqa: E402

from jerald_nbk.cli.main import main  # noqa: E402
from jerald_nbk.io import read_catalog, read_mesh, write_catalog, write_mesh  # noqa: E402
from jerald_nbk.io.paramfiles import save_params  # noqa: E402
from jerald_nbk.model import pipeline  # noqa: E402
from jerald_nbk.model.params import table_for  # noqa: E402
from jerald_nbk.model.pipeline import StageConfig  # noqa: E402
from jerald_nbk.testing import zeldovich_particles  # noqa: E402

MAPS = ("dm", "stellar", "hi")


def _cic(pos, n, box):
    """1 + delta of unit-mass particles by CIC, mesh points at ``i * box / n`` (nbodykit's
    convention), in numpy, periodic."""
    x = np.asarray(pos, dtype=float) / (box / n)
    i0 = np.floor(x).astype(int)
    f = x - i0
    out = np.zeros((n, n, n))
    for corner in np.ndindex(2, 2, 2):
        w = np.prod([f[:, a] if c else 1 - f[:, a] for a, c in enumerate(corner)], axis=0)
        idx = (i0 + corner) % n
        np.add.at(out, (idx[:, 0], idx[:, 1], idx[:, 2]), w)
    return out * n**3 / len(pos)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Three 16^3 catalogs ``sims/seed{1,2,3}/cat``, a 12^3 one, one of another box, and
    DM (visible alpha), stellar and HI parameter files."""
    d = tmp_path_factory.mktemp("many")
    cats = []
    for seed in (1, 2, 3):
        path = d / "sims" / f"seed{seed}" / "cat"
        pos = zeldovich_particles(N, BOX, seed=seed, rms_disp=0.7)
        write_catalog(path, {"Position": pos}, {"BoxSize": BOX, "redshift": 2.0})
        cats.append(path)
    small = d / "small" / "cat"
    write_catalog(small, {"Position": zeldovich_particles(12, BOX, seed=4)}, {"BoxSize": BOX})
    other_box = d / "box25" / "cat"
    write_catalog(other_box, {"Position": zeldovich_particles(N, 25.0, seed=5)}, {"BoxSize": 25.0})
    params = {}
    prov = {"BoxSize": [BOX] * 3, "Nmesh": [N] * 3}
    for kind in MAPS:
        cfg = StageConfig(kind, 1, amplitude=1.0)
        raw = table_for(cfg).init_raw()
        if kind == "dm":
            raw[0] = 3.0  # a visible first-layer alpha: the particles move
        params[kind] = save_params(d / f"{kind}.json", cfg, raw, prov)
    return {"dir": d, "cats": cats, "small": small, "other_box": other_box, "params": params}


def _paint(params, *particles, out, extra=()) -> int:
    return main(
        [
            "paint", "--particles", *map(str, particles), "--dm-params", str(params["dm"]),
            "--stellar-params", str(params["stellar"]), "--hi-params", str(params["hi"]),
            "--out", str(out), "--save-particles", *extra,
        ]
    )  # fmt: skip


def test_paint_many_catalogs_compiles_once_and_matches_each_alone(many, tmp_path, capsys):
    # catches: a recompilation per catalog, every catalog painted with the first's particles,
    # outputs of one catalog written over another's
    listing = tmp_path / "catalogs.txt"
    rel = [Path("sims") / c.parent.name / "cat" for c in many["cats"][1:]]
    listing.write_text(f"# two of them\n{rel[0]}\n\n{rel[1]}  # the third\n")
    shutil.copy(listing, many["dir"] / "catalogs.txt")
    pipeline._MAPS_CACHE.clear()  # whatever other tests compiled: start from nothing
    before = pipeline.TRACES["maps"]
    out = tmp_path / "maps"
    assert _paint(many["params"], many["cats"][0], f"@{many['dir'] / 'catalogs.txt'}", out=out) == 0
    assert pipeline.TRACES["maps"] - before == 1  # one compilation for the three catalogs
    err = capsys.readouterr()
    assert "3 catalogs painted" in err.out and "1 compilation(s)" in err.out
    assert sorted(p.name for p in out.iterdir()) == ["seed1_cat", "seed2_cat", "seed3_cat"]
    maps = {}
    for cat in many["cats"]:
        sub = out / f"{cat.parent.name}_cat"
        alone = tmp_path / f"alone_{cat.parent.name}"
        assert _paint(many["params"], cat, out=alone) == 0  # one plain path: maps in --out
        for kind in MAPS:
            got, attrs = read_mesh(sub / kind)
            ref, _ = read_mesh(alone / kind)
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
            assert attrs["particles"] == str(cat)
            maps[(cat.parent.name, kind)] = got
        # the DM map is the CIC density of the improved particles (independent numpy CIC)
        x = read_catalog(sub / "improved")[0]["Position"]
        moved = np.abs(x - read_catalog(cat)[0]["Position"]).max()
        assert moved > 1e-3
        np.testing.assert_allclose(maps[(cat.parent.name, "dm")], _cic(x, N, BOX), atol=2e-5)
    assert not np.allclose(maps[("seed1", "hi")], maps[("seed2", "hi")])


def test_paint_glob_says_when_another_particle_count_recompiles(many, tmp_path, capsys):
    d = many["dir"]
    pipeline._MAPS_CACHE.clear()  # compiled by the other tests: start from nothing
    before = pipeline.TRACES["maps"]
    out = tmp_path / "maps"
    pattern = str(d / "sims" / "seed*" / "cat")
    assert _paint(many["params"], pattern, many["small"], out=out) == 0
    assert pipeline.TRACES["maps"] - before == 2  # 16^3 and 12^3: grouped, one compile each
    err = capsys.readouterr().err
    assert err.count("compiled the pipeline") == 2 and "recompiled" in err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["seed1_cat", "seed2_cat", "seed3_cat", "small_cat"]
    small = tmp_path / "small_alone"
    assert _paint(many["params"], many["small"], out=small) == 0
    np.testing.assert_allclose(
        read_mesh(out / "small_cat" / "hi")[0], read_mesh(small / "hi")[0], rtol=1e-6, atol=1e-7
    )


def test_paint_refuses_another_box_or_a_foreign_output_before_writing(many, tmp_path, capsys):
    # catches: a catalog of another box painted on the first's mesh; a map clobbered halfway
    out = tmp_path / "maps"
    rc = _paint(many["params"], *many["cats"], many["other_box"], out=out)
    assert rc != 0
    err = capsys.readouterr().err
    assert f"catalog {many['other_box']}" in err and "BoxSize 25" in err
    assert not out.exists()  # nothing written
    foreign = out / "seed3_cat" / "stellar"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    assert _paint(many["params"], *many["cats"], out=out) != 0
    assert "left untouched" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["seed3_cat"]
    assert (foreign / "notes.txt").read_text() == "mine"
    assert _paint(many["params"], str(many["dir"] / "nothing*"), out=out) != 0
    assert "no catalog matches" in capsys.readouterr().err


def test_mpiexec_paint_many_matches_single_process(many, tmp_path):
    """``mpiexec -n 2 jerald paint`` over the catalogs: each rank reads and paints its share.

    Tolerance: 1e-5 relative (float32 meshes; the two engines sum in different orders).
    """
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec")
    p = many["params"]
    serial, mpi = tmp_path / "serial", tmp_path / "mpi"
    args = ["paint", "--particles", *map(str, many["cats"]), "--dm-params", str(p["dm"]),
            "--stellar-params", str(p["stellar"]), "--hi-params", str(p["hi"]), "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(serial)]) == 0
    cmd = [str(mpiexec), "-n", "2", *_exe("jerald"), *args, "--out", str(mpi)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for cat in many["cats"]:
        for kind in MAPS:
            a = read_mesh(serial / f"{cat.parent.name}_cat" / kind)[0]
            b = read_mesh(mpi / f"{cat.parent.name}_cat" / kind)[0]
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


# ------------------------------------------------------------------ training on several sims


@pytest.fixture(scope="module")
def targets(many):
    d = many["dir"]
    paths = []
    for seed in (1, 2):
        dm = _density(zeldovich_particles(N, BOX, seed=seed, rms_disp=0.9), N, BOX).astype("f4")
        write_mesh(d / f"dm_target{seed}", dm, BOX, {"redshift": 2.0})
        paths.append(d / f"dm_target{seed}")
    return paths


def _train(out, cats, maps, *extra, ok=True):
    pairs = [
        a for c, m in zip(cats, maps, strict=True) for a in ("--particles", c, "--target-map", m)
    ]
    return run("jerald", "train", "--target", "dm", *pairs, "--layers", "1", "--steps", "1",
               "--out", out, "--quiet", *extra, ok=ok)  # fmt: skip


def test_train_on_two_simulations_sums_their_losses(many, targets, tmp_path):
    # catches: the second --particles/--target-map silently dropped (argparse keeps the last),
    # or pairs matched out of order
    cats = many["cats"][:2]
    one = []
    for i, (c, t) in enumerate(zip(cats, targets, strict=True)):
        _train(tmp_path / f"one{i}", [c], [t])
        one.append(_metrics(tmp_path / f"one{i}" / "metrics.jsonl"))
    out = tmp_path / "two"
    res = _train(out, cats, targets)
    assert "2 simulations" in res.stdout
    two = _metrics(out / "metrics.jsonl")
    for k in ("train", "validation", "test"):  # step 0: the same initial parameters
        assert two[0][k] == pytest.approx(one[0][0][k] + one[1][0][k], rel=1e-5)
    crossed = tmp_path / "crossed"
    _train(crossed, cats, targets[::-1])
    assert _metrics(crossed / "metrics.jsonl")[0]["train"] != pytest.approx(two[0]["train"], 1e-4)
    doc = json.loads((out / "params.json").read_text())
    assert doc["provenance"]["particles"] == [str(c) for c in cats]
    # the run's identity names both pairs' files: another second map is another run
    other = tmp_path / "dm_other"
    write_mesh(other, read_mesh(targets[1])[0] * 1.1, BOX, {"redshift": 2.0})
    res = _train(out, cats, [targets[0], other], "--steps", "2", ok=False)
    assert res.returncode != 0 and "target map file 2" in res.stderr
    # resumed with the same pairs: continues (steps 0 and 1 kept, step 1 computed)
    _train(out, cats, targets, "--steps", "2")
    assert [r["step"] for r in _metrics(out / "metrics.jsonl")] == [0, 1]


def test_train_pairs_must_match_and_flags_replace_config_lists(many, targets, tmp_path):
    res = run("jerald", "train", "--target", "dm", "--particles", many["cats"][0], "--particles",
              many["cats"][1], "--target-map", targets[0], "--out", tmp_path / "bad2", ok=False)  # fmt: skip
    assert res.returncode != 0 and "2 --particles but 1 --target-map" in res.stderr
    assert not (tmp_path / "bad2").exists()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"particles": [str(c) for c in many["cats"][:2]],
                               "target-map": [str(t) for t in targets]}))  # fmt: skip
    out = tmp_path / "from_cfg"
    res = run("jerald", "train", "--config", cfg, "--target", "dm", "--layers", "1", "--steps",
              "1", "--out", out, "--quiet")  # fmt: skip
    assert "2 simulations" in res.stdout
    out1 = tmp_path / "flag_wins"
    res = run("jerald", "train", "--config", cfg, "--target", "dm", "--layers", "1", "--steps",
              "1", "--out", out1, "--quiet", "--particles", many["cats"][2], "--target-map",
              targets[0])  # fmt: skip
    assert "2 simulations" not in res.stdout
    doc = json.loads((out1 / "params.json").read_text())
    assert doc["provenance"]["particles"] == str(many["cats"][2])
