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
    (d / "params_novalue.json").write_text(
        json.dumps({"format": "jerald-nbk-params", "target": "dm", "params": {"alpha": {}}})
    )
    (d / "params_strlayers.json").write_text(
        json.dumps({"target": "dm", "n_layers": "two", "params": []})
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
    farp[4]["Coordinates"][:7] = 1e9  # kpc/h: 1e6 Mpc/h in a 25 Mpc/h box
    write_snapshot(d / "snap_far", farp)
    return d


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
