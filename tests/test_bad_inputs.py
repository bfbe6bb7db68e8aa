"""Bad inputs, as a user gives them: a table of command lines, each run as a subprocess.

Every case asserts the exit status, that the message names the file (or option) at fault, that
stderr holds no traceback, that nothing outside ``--out`` changed and that nothing partial is
left in ``--out``. Clean cases (exit 0) are in the same table. ``jerald make-target`` is also run
on synthetic Gadget/TNG snapshots and its map checked against the Python API's.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_cli import BOX, N, _density, run  # noqa: E402
from test_snapshots import particles, write_snapshot  # noqa: E402

from jerald_nbk.io import read_mesh, write_catalog, write_mesh  # noqa: E402
from jerald_nbk.io.snapshots import make_target  # noqa: E402
from jerald_nbk.testing import zeldovich_particles  # noqa: E402


def _tree(root: Path) -> dict:
    """Every file under ``root`` (relative path -> sha1 of its content)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------- the inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small (16^3) catalogs, maps, parameter files, configs and snapshots, good and bad."""
    d = tmp_path_factory.mktemp("bad_inputs")
    pos = zeldovich_particles(N, BOX, seed=1)
    vel = np.random.default_rng(0).normal(size=pos.shape).astype("f4")
    attrs = {"BoxSize": BOX, "redshift": 2.0}
    write_catalog(d / "cat", {"Position": pos, "Velocity": vel}, attrs)
    dm = _density(zeldovich_particles(N, BOX, seed=1, rms_disp=0.5), N, BOX).astype("f4")
    write_mesh(d / "dm", dm, BOX)
    write_mesh(d / "dm2", dm * 1.01 + 0.01, BOX)
    write_mesh(d / "dm_box25", dm, 25.0)
    write_mesh(d / "dm_n8", dm[::2, ::2, ::2], BOX)
    write_mesh(d / "map2d", dm[0], BOX)
    for name, value in (("nan", np.nan), ("inf", np.inf), ("neg", -1.0)):
        bad = dm.copy()
        bad[1, 2, 3] = value
        write_mesh(d / f"dm_{name}.npy", bad, BOX)
    # positions: a few one to ten box lengths away (warned), and 1e7 Mpc/h (refused)
    near = pos.copy()
    near[:5] += 3 * BOX
    write_catalog(d / "cat_far", {"Position": near}, attrs)
    units = pos.copy()
    units[:100] = 1e7
    write_catalog(d / "cat_units", {"Position": units}, attrs)
    # parameter files
    (d / "params_list.json").write_text("[1, 2, 3]")
    head = {"format": "jerald-nbk-params", "format_version": 1}
    (d / "params_novalue.json").write_text(
        json.dumps(
            {**head, "config": {"target": "dm", "n_layers": 1}, "parameters": [{"name": "a"}]}
        )
    )
    (d / "params_strlayers.json").write_text(
        json.dumps({**head, "config": {"target": "dm", "n_layers": "two"}, "parameters": []})
    )
    # configs
    (d / "steps_float.json").write_text(json.dumps({"steps": 2.7}))
    (d / "steps_str.toml").write_text('steps = "many"\n')
    # snapshots (Gadget/TNG layout, kpc/h)
    snap = d / "snap"
    snap.mkdir()
    write_snapshot(snap / "snap_033", particles())
    chunks = d / "chunks"
    chunks.mkdir()
    write_snapshot(chunks / "snap_033", particles(), nchunks=2)
    negm = particles()
    negm[4]["Masses"][3] = -1.0
    write_snapshot(d / "snap_negmass", negm)
    farp = particles()
    farp[4]["Coordinates"][:7] += 3 * 25000.0  # three box lengths away: wrapped, with a warning
    write_snapshot(d / "snap_far", farp)
    unitp = particles()
    unitp[4]["Coordinates"][:7] = 1e9  # kpc/h: 1e6 Mpc/h in a 25 Mpc/h box
    write_snapshot(d / "snap_units", unitp)
    return d


#: (id, command, arguments ({d}: the inputs, {out}: --out), exit status, text stderr must hold)
CASES = [
    # parameter files of any malformed shape
    (
        "params-list",
        "paint",
        "--particles {d}/cat --dm-params {d}/params_list.json",
        1,
        "params_list.json",
    ),
    (
        "params-no-value",
        "paint",
        "--particles {d}/cat --dm-params {d}/params_novalue.json",
        1,
        "'value'",
    ),
    (
        "params-n-layers-str",
        "paint",
        "--particles {d}/cat --dm-params {d}/params_strlayers.json",
        1,
        "config.n_layers",
    ),
    (
        "params-missing",
        "paint",
        "--particles {d}/cat --dm-params {d}/nothing.json",
        1,
        "nothing.json",
    ),
    # option values of the wrong type or sign
    (
        "steps-negative",
        "train",
        "--target dm --particles {d}/cat --target-map {d}/dm --steps -5",
        1,
        "--steps",
    ),
    (
        "patience-negative",
        "train",
        "--target dm --particles {d}/cat --target-map {d}/dm --patience -2",
        1,
        "--patience",
    ),
    (
        "eta0-negative",
        "train",
        "--target dm --particles {d}/cat --target-map {d}/dm --eta0 -1",
        1,
        "--eta0",
    ),
    (
        "config-steps-float",
        "train",
        "--config {d}/steps_float.json --target dm --particles {d}/cat --target-map {d}/dm",
        1,
        "steps_float.json",
    ),
    (
        "config-steps-str",
        "train",
        "--config {d}/steps_str.toml --target dm --particles {d}/cat --target-map {d}/dm",
        1,
        "steps_str.toml",
    ),
    ("nmesh-zero", "make-target", "{d}/snap/snap_033.hdf5 --field dm --Nmesh 0", 1, "--Nmesh"),
    # maps
    ("train-2d-map", "train", "--target dm --particles {d}/cat --target-map {d}/map2d", 1, "map2d"),
    (
        "train-box-mismatch",
        "train",
        "--target dm --particles {d}/cat --target-map {d}/dm_box25",
        1,
        "BoxSize",
    ),
    ("power-nan", "power", "{d}/dm_nan.npy", 1, "dm_nan.npy"),
    ("power-inf", "power", "{d}/dm {d}/dm_inf.npy", 1, "dm_inf.npy"),
    ("power-negative", "power", "{d}/dm_neg.npy", 1, "dm_neg.npy"),
    ("power-box-mismatch", "power", "{d}/dm {d}/dm_box25", 1, "dm_box25"),
    ("power-nmesh-mismatch", "power", "{d}/dm {d}/dm_n8", 1, "dm_n8"),
    ("report-nan", "report", "--ref {d}/dm --pred a={d}/dm_nan.npy", 1, "dm_nan.npy"),
    ("report-nan-ref", "report", "--ref {d}/dm_inf.npy --pred a={d}/dm2", 1, "dm_inf.npy"),
    ("report-box-mismatch", "report", "--ref {d}/dm --pred a={d}/dm_box25", 1, "dm_box25"),
    # positions and masses
    (
        "positions-units",
        "train",
        "--target dm --particles {d}/cat_units --target-map {d}/dm --steps 1",
        1,
        "cat_units",
    ),
    (
        "snapshot-units",
        "make-target",
        "{d}/snap_units.hdf5 --field stellar --Nmesh 16",
        1,
        "snap_units.hdf5",
    ),
    (
        "snapshot-negative-mass",
        "make-target",
        "{d}/snap_negmass.hdf5 --field stellar --Nmesh 16",
        1,
        "snap_negmass.hdf5",
    ),
    ("snapshot-missing", "make-target", "{d}/snap/none.hdf5 --field dm --Nmesh 16", 1, "none.hdf5"),
    # clean: these run and write --out
    ("clean-power", "power", "{d}/dm {d}/dm2", 0, ""),
    ("clean-power-negative-allowed", "power", "{d}/dm_neg.npy --allow-negative", 0, ""),
    ("clean-report", "report", "--ref {d}/dm --pred a={d}/dm2", 0, ""),
    (
        "clean-make-target",
        "make-target",
        "{d}/snap/snap_033.hdf5 --field stellar --Nmesh 16",
        0,
        "",
    ),
    (
        "clean-snapshot-far-warns",
        "make-target",
        "{d}/snap_far.hdf5 --field stellar --Nmesh 16",
        0,
        "more than one box length",
    ),
]


@pytest.mark.parametrize(
    ("command", "arguments", "status", "names"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_bad_input_table(inputs, tmp_path, command, arguments, status, names):
    """Exit status, a message naming the file, no traceback, nothing changed outside --out."""
    out = tmp_path / "out"
    before = _tree(inputs)
    args = arguments.format(d=inputs).split()
    res = run("jerald", command, *args, "--out", out, ok=False)
    assert res.returncode == status, f"{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert names in res.stderr, res.stderr
    assert _tree(inputs) == before  # nothing outside --out changed
    if status:
        assert "error" in res.stderr or "expected" in res.stderr
        # nothing partial left: no --out, and no temporary sibling of it
        assert not out.exists(), sorted(os.listdir(tmp_path))
        assert sorted(os.listdir(tmp_path)) == []
    else:
        assert out.exists()


# ------------------------------------------------------------------ make-target from the shell


@pytest.mark.parametrize("field", ["dm", "stellar", "nHI", "T"])
@pytest.mark.parametrize("layout", ["single", "chunk", "glob", "every_chunk"])
def test_make_target_command_equals_python_api(inputs, tmp_path, field, layout):
    """``jerald make-target`` writes the map :func:`make_target` paints, with its metadata."""
    single = inputs / "snap" / "snap_033.hdf5"
    chunks = sorted((inputs / "chunks").glob("snap_033.*.hdf5"))
    args = {
        "single": [single],
        "chunk": [chunks[0]],
        "glob": [inputs / "chunks" / "snap_033.*.hdf5"],
        "every_chunk": chunks,
    }[layout]
    out = tmp_path / "map"
    res = run("jerald", "make-target", *args, "--field", field, "--Nmesh", N, "--out", out)
    assert str(out) in res.stdout
    arr, attrs = read_mesh(out)
    ref, ref_attrs = make_target(single, field, N)
    np.testing.assert_allclose(arr, ref, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(attrs["BoxSize"], [25.0] * 3)
    assert list(attrs["Nmesh"]) == [N] * 3
    assert attrs["redshift"] == ref_attrs["redshift"] == 2.0
    assert attrs["field"] == field and attrs["units"] == ref_attrs["units"]
    assert attrs["input_length_units"] == "kpc/h"
    assert attrs["cosmology"]["h"] == pytest.approx(0.6774)
    assert "make-target" in attrs["command"]
