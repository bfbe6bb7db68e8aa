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
    _drop_in_inputs(d, dm, pos)
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


# ------------------------------------------------------------- jerald-ldl and jerald-ref inputs


def _drop_in_inputs(d: Path, dm: np.ndarray, pos: np.ndarray) -> None:
    """The files of the drop-in commands' table: LDL and JERALD-reference parameter files,
    optimiser states, checkpoints, stellar / n_e / T maps, TNG-layout snapshots."""
    from jerald_nbk.io.paramfiles import RefOptState, save_plaintext, write_ref_optstate
    from jerald_nbk.model.params import ParamTable, ldl_table, table
    from jerald_nbk.model.pipeline import StageConfig

    star = (np.maximum(dm - 1.2, 0) * 0.3).astype("f4")
    write_mesh(d / "star", star, BOX)
    write_mesh(d / "star_box25", star, 25.0)
    for name, value in (("nan", np.nan), ("inf", np.inf), ("neg", -1.0)):
        bad = star.copy()
        bad[1, 2, 3] = value
        write_mesh(d / f"star_{name}.npy", bad, BOX)
    write_mesh(d / "ne", dm * 2e-5, BOX)
    write_mesh(d / "T", (dm + 0.1) ** 0.7 * 1e5, BOX)
    write_mesh(d / "T_n8", ((dm + 0.1) ** 0.7 * 1e5)[::2, ::2, ::2], BOX)
    write_catalog(d / "cat_box25", {"Position": pos}, {"BoxSize": 25.0, "redshift": 2.0})
    # LDL plain text (Mstar, 1 layer: 8 values) and its malformed shapes
    cfg = StageConfig("stellar", 1, 4, False, "sm")
    tab = ParamTable(ldl_table("stellar", 1, (N,) * 3, BOX, 1.0))
    lo, hi = tab.lower / tab.scale, tab.upper / tab.scale  # inside LDL's bounds at 16^3, 20 Mpc/h
    init = np.clip(tab.init_raw(), np.where(lo < 0, lo * 0.99, lo * 1.01), hi * 0.99)
    save_plaintext(d / "ldl_mstar.txt", cfg, init, flavour="ldl")
    good = np.loadtxt(d / "ldl_mstar.txt")
    np.savetxt(d / "ldl_seven.txt", good[:7])
    np.savetxt(d / "ldl_columns.txt", good.reshape(4, 2))
    nan = good.copy()
    nan[2] = np.nan
    np.savetxt(d / "ldl_nan.txt", nan)
    (d / "ldl_words.txt").write_text("alpha 0.1\ngamma 1\n")
    (d / "ldl_empty.txt").write_text("")
    (d / "params_strvalue.json").write_text(
        json.dumps(
            {
                "format": "jerald-nbk-params",
                "format_version": 1,
                "config": {"target": "dm", "n_layers": 1},
                "parameters": [{"name": "alpha_0", "value": "big"}],
            }
        )
    )
    # the JERALD reference's files: DM, 1 layer (5 values), its optimiser state
    dcfg = StageConfig("dm", 1, 6)
    dtab = ParamTable(table("dm", 1))
    save_plaintext(d / "ref_dm.txt", dcfg, dtab.init_raw(), flavour="jerald")
    raw = dtab.init_raw()
    state = RefOptState(np.full(raw.size, 1e-3), np.full(raw.size, 1e-6), 4, 0.002, raw)
    write_ref_optstate(d / "ref_dm_optstate.txt", dcfg, state)
    lines = (d / "ref_dm_optstate.txt").read_text().splitlines(keepends=True)
    (d / "optstate_truncated.txt").write_text("".join(lines[: len(lines) // 2]))
    text = (d / "ref_dm_optstate.txt").read_text()  # 7 values a section: no DM model has 7
    for sec in ("mu", "nu", "params"):
        text = text.replace(f"{sec}\n", f"{sec}\n1e-7\n1e-7\n", 1)
    (d / "optstate_size.txt").write_text(text)
    np.savez(d / "ckpt_full.npz", raw=raw, step=np.int64(3))
    blob = (d / "ckpt_full.npz").read_bytes()
    (d / "ckpt_truncated.npz").write_bytes(blob[: len(blob) // 2])
    (d / "ckpt_full.npz").unlink()
    # TNG-layout snapshots (kpc/h, a 20 Mpc/h box): negative stellar mass, a units mistake
    for name, edit in (("tng_negmass", "mass"), ("tng_units", "units")):
        parts = particles(box=BOX * 1000.0)
        if edit == "mass":
            parts[4]["Masses"][3] = -1.0
        else:
            parts[1]["Coordinates"][:7] = 1e9
        (d / name).mkdir()
        write_snapshot(d / name / "snap_099", parts, box=BOX * 1000.0)
    (d / "a_file").write_text("a regular file, not a directory\n")


#: (id, arguments, exit status, text stderr must hold); ``{d}``: the inputs, ``{out}``: --save
LDL = "--FastPMpath {d}/cat --BoxSize 20 --Nmesh 16 --Nstep 1 --quiet"
LDL_CASES = [
    # parameter files of every shape
    ("restore-json-list", f"{LDL} --restore {{d}}/params_list.json --evaluateOnly", 1,
     "params_list.json"),
    ("restore-json-no-value", f"{LDL} --restore {{d}}/params_novalue.json --evaluateOnly", 1,
     "params_novalue.json"),
    ("restore-json-str-value", f"{LDL} --restore {{d}}/params_strvalue.json --evaluateOnly", 1,
     "parameters[0].value"),
    ("restore-json-n-layers-str", f"{LDL} --restore {{d}}/params_strlayers.json --evaluateOnly",
     1, "config.n_layers"),
    ("restore-wrong-length", f"{LDL} --restore {{d}}/ldl_seven.txt --evaluateOnly", 1,
     "ldl_seven.txt"),
    ("restore-columns", f"{LDL} --restore {{d}}/ldl_columns.txt --evaluateOnly", 1,
     "ldl_columns.txt"),
    ("restore-words", f"{LDL} --restore {{d}}/ldl_words.txt --evaluateOnly", 1, "ldl_words.txt"),
    ("restore-empty", f"{LDL} --restore {{d}}/ldl_empty.txt --evaluateOnly", 1, "ldl_empty.txt"),
    ("restore-nan", f"{LDL} --restore {{d}}/ldl_nan.txt --evaluateOnly", 1, "ldl_nan.txt"),
    ("restore-missing", f"{LDL} --restore {{d}}/none.txt --evaluateOnly", 1, "none.txt"),
    ("improve-json-list", f"{LDL} --improveFastPM {{d}}/params_list.json --TNGpath {{d}}/star",
     1, "params_list.json"),
    # option values of the wrong type or sign
    ("steps-negative", f"{LDL} --TNGpath {{d}}/star --steps -5", 2, "--steps"),
    ("eta0-negative", f"{LDL} --TNGpath {{d}}/star --optimizer adam --eta0 -1", 2, "--eta0"),
    ("tau-zero", f"{LDL} --TNGpath {{d}}/star --optimizer adam --tau 0", 2, "--tau"),
    ("nmesh-float", f"{LDL} --TNGpath {{d}}/star --Nmesh 2.5", 2, "--Nmesh"),
    ("nmesh-negative", f"{LDL} --TNGpath {{d}}/star --Nmesh -16", 2, "--Nmesh"),
    ("nstep-zero", "--FastPMpath {d}/cat --BoxSize 20 --Nstep 0 --TNGpath {d}/star", 2,
     "--Nstep"),
    ("boxsize-negative", "--FastPMpath {d}/cat --BoxSize -20 --TNGpath {d}/star", 2,
     "--BoxSize"),
    ("smoothing-negative", f"{LDL} --TNGpath {{d}}/star --n -1", 2, "--n"),
    ("ne-scale-zero", f"{LDL} --target kSZ --TNGpath {{d}}/ne --ne-scale 0", 2, "--ne-scale"),
    # maps
    ("target-2d", f"{LDL} --TNGpath {{d}}/map2d", 1, "map2d"),
    ("target-nan", f"{LDL} --TNGpath {{d}}/star_nan.npy", 1, "star_nan.npy"),
    ("target-inf", f"{LDL} --TNGpath {{d}}/star_inf.npy", 1, "star_inf.npy"),
    ("target-negative", f"{LDL} --TNGpath {{d}}/star_neg.npy", 1, "star_neg.npy"),
    ("target-box-mismatch", f"{LDL} --TNGpath {{d}}/star_box25", 1, "star_box25"),
    ("catalog-box-mismatch", "--FastPMpath {d}/cat_box25 --BoxSize 20 --Nstep 1 --TNGpath "
     "{d}/star", 1, "cat_box25"),
    ("target-nmesh-option", f"{LDL} --TNGpath {{d}}/star --Nmesh 8", 1, "star"),
    ("two-maps-nmesh-mismatch", f"{LDL} --target tSZ_ne --TNGpath {{d}}/ne {{d}}/T_n8", 1,
     "T_n8"),
    # positions and masses
    ("positions-units", f"{LDL} --FastPMpath {{d}}/cat_units --TNGpath {{d}}/star", 1,
     "cat_units"),
    ("tng-positions-units", "--TNGDarkpath {d}/tng_units --BoxSize 20 --Nstep 1 --TNGpath "
     "{d}/star --snapNum 99", 1, "Coordinates"),
    ("tng-negative-mass", f"{LDL} --TNGpath {{d}}/tng_negmass --snapNum 99", 1, "Masses"),
    # outputs
    ("save-under-a-file", f"{LDL} --restore {{d}}/ldl_mstar.txt --evaluateOnly", 1, "a_file"),
    ("save-map-not-ours", f"{LDL} --restore {{d}}/ldl_mstar.txt --evaluateOnly", 1,
     "Mstar_snap099_Nmesh16_Nstep1_n1.00_map"),
    # clean
    ("clean-evaluate", f"{LDL} --restore {{d}}/ldl_mstar.txt --evaluateOnly --TNGpath {{d}}/star",
     0, "losses"),
    ("clean-map-not-ours-overwrite",
     f"{LDL} --restore {{d}}/ldl_mstar.txt --evaluateOnly --overwrite", 0, "map"),
    ("clean-train", f"{LDL} --TNGpath {{d}}/star --steps 1", 0, "best validation loss"),
    ("clean-positions-far-warns", f"{LDL} --FastPMpath {{d}}/cat_far --TNGpath {{d}}/star "
     "--restore {d}/ldl_mstar.txt --evaluateOnly", 0, "more than one box length"),
]  # fmt: skip

REF = "--Nbodypath {d}/cat --quiet"
REF_CASES = [
    # parameter files and optimiser states of every shape
    ("eval-json-list", f"{REF} --evalpath {{d}}/params_list.json --Nmesh 16", 1,
     "params_list.json"),
    ("eval-json-no-value", f"{REF} --evalpath {{d}}/params_novalue.json --Nmesh 16", 1,
     "params_novalue.json"),
    ("eval-json-str-value", f"{REF} --evalpath {{d}}/params_strvalue.json --Nmesh 16", 1,
     "parameters[0].value"),
    ("eval-json-n-layers-str", f"{REF} --evalpath {{d}}/params_strlayers.json --Nmesh 16", 1,
     "config.n_layers"),
    ("eval-wrong-length", f"{REF} --evalpath {{d}}/ldl_seven.txt --Nmesh 16", 1,
     "ldl_seven.txt"),
    ("eval-columns", f"{REF} --evalpath {{d}}/ldl_columns.txt --Nmesh 16 --target Mstar", 1,
     "ldl_columns.txt"),
    ("eval-words", f"{REF} --evalpath {{d}}/ldl_words.txt --Nmesh 16", 1, "ldl_words.txt"),
    ("eval-empty", f"{REF} --evalpath {{d}}/ldl_empty.txt --Nmesh 16", 1, "ldl_empty.txt"),
    ("eval-nstep-mismatch", f"{REF} --evalpath {{d}}/ref_dm.txt --Nmesh 16 --Nstep 2", 1,
     "ref_dm.txt"),
    ("improve-json-no-value", f"{REF} --improvepath {{d}}/params_novalue.json --refpath "
     "{d}/dm", 1, "params_novalue.json"),
    ("optstate-truncated", f"{REF} --optpath {{d}}/optstate_truncated.txt --refpath {{d}}/dm", 1,
     "optstate_truncated.txt"),
    ("optstate-wrong-size", f"{REF} --optpath {{d}}/optstate_size.txt --refpath {{d}}/dm", 1,
     "optstate_size.txt"),
    ("checkpoint-truncated", f"{REF} --optpath {{d}}/ckpt_truncated.npz --refpath {{d}}/dm", 1,
     "ckpt_truncated.npz"),
    # option values of the wrong type or sign
    ("steps-negative", f"{REF} --refpath {{d}}/dm --steps -5", 2, "--steps"),
    ("steps-float", f"{REF} --refpath {{d}}/dm --steps 2.7", 2, "--steps"),
    ("eta0-negative", f"{REF} --refpath {{d}}/dm --eta0 -1", 2, "--eta0"),
    ("checkpoint-every-negative", f"{REF} --refpath {{d}}/dm --checkpoint-every -1", 2,
     "--checkpoint-every"),
    ("nmesh-zero", f"{REF} --evalpath {{d}}/ref_dm.txt --Nmesh 0", 2, "--Nmesh"),
    ("nstep-negative", f"{REF} --refpath {{d}}/dm --Nstep -1", 2, "--Nstep"),
    ("boxsize-zero", f"{REF} --refpath {{d}}/dm --BoxSize 0", 2, "--BoxSize"),
    ("target-scale-negative", f"{REF} --target HI --refpath {{d}}/star --Mstarpath {{d}}/star "
     "--target-scale -1", 2, "--target-scale"),
    ("redshift-below-minus-one", f"{REF} --refpath {{d}}/dm --redshift -2", 2, "--redshift"),
    # maps
    ("refpath-2d", f"{REF} --refpath {{d}}/map2d", 1, "map2d"),
    ("refpath-nan", f"{REF} --refpath {{d}}/dm_nan.npy", 1, "dm_nan.npy"),
    ("refpath-inf", f"{REF} --refpath {{d}}/dm_inf.npy", 1, "dm_inf.npy"),
    ("refpath-negative", f"{REF} --refpath {{d}}/dm_neg.npy", 1, "dm_neg.npy"),
    ("refpath-box-mismatch", f"{REF} --refpath {{d}}/dm_box25", 1, "dm_box25"),
    ("refpath-nmesh-option", f"{REF} --refpath {{d}}/dm --Nmesh 8", 1, "--Nmesh"),
    ("mstar-map-nmesh-mismatch", f"{REF} --target HI --refpath {{d}}/star --Mstarpath "
     "{d}/T_n8 --target-scale 1", 1, "T_n8"),
    ("mstar-map-negative", f"{REF} --target HI --refpath {{d}}/star --Mstarpath "
     "{d}/star_neg.npy --target-scale 1", 1, "star_neg.npy"),
    # positions
    ("positions-units", "--Nbodypath {d}/cat_units --refpath {d}/dm --quiet", 1, "cat_units"),
    # outputs
    ("outpath-under-a-file", f"{REF} --evalpath {{d}}/ref_dm.txt --Nmesh 16", 1, "a_file"),
    ("outpath-map-not-ours", f"{REF} --evalpath {{d}}/ref_dm.txt --Nmesh 16", 1,
     "dm_Nmesh16_Nstep1_n0.00_map"),
    # clean
    ("clean-evaluate", f"{REF} --evalpath {{d}}/ref_dm.txt --refpath {{d}}/dm", 0, "losses"),
    ("clean-map-not-ours-overwrite", f"{REF} --evalpath {{d}}/ref_dm.txt --Nmesh 16 --overwrite",
     0, "map"),
    ("clean-train", f"{REF} --refpath {{d}}/dm --Nstep 1 --steps 2", 0, "best validation loss"),
    ("clean-optstate", f"{REF} --optpath {{d}}/ref_dm_optstate.txt --refpath {{d}}/dm --steps 6",
     0, "continuing the Adam state"),
    ("clean-positions-far-warns", "--Nbodypath {d}/cat_far --evalpath {d}/ref_dm.txt --refpath "
     "{d}/dm --quiet", 0, "more than one box length"),
]  # fmt: skip

#: what a case puts at the output location first: the map path taken by a foreign directory, or
#: the output directory under a regular file
_SETUP = {
    "map-not-ours": "foreign",
    "under-a-file": "under-file",
}


def _setup(case_id: str, tmp_path: Path, map_name: str) -> Path:
    """The output directory of a case, after putting there what the case needs."""
    kind = next((v for k, v in _SETUP.items() if k in case_id), None)
    if kind == "under-file":
        (tmp_path / "a_file").write_text("mine\n")
        return tmp_path / "a_file" / "out"
    out = tmp_path / "out"
    if kind == "foreign":
        (out / map_name).mkdir(parents=True)
        (out / map_name / "notes.txt").write_text("my own notes\n")
    return out


def _check_case(prog, flag, map_name, inputs, tmp_path, case_id, arguments, status, names):
    """Run one case; assert status, message, no traceback, nothing changed outside the output,
    nothing partial left (on an error the whole output location is as it was)."""
    out = _setup(case_id, tmp_path, map_name)
    before_inputs, before_out = _tree(inputs), _tree(tmp_path)
    args = arguments.format(d=inputs).split()
    res = run(prog, *args, flag, out, ok=False)
    text = f"{res.stdout}\n{res.stderr}"
    assert res.returncode == status, text
    assert "Traceback" not in res.stderr, res.stderr
    assert names in (res.stderr if status else text), text
    assert _tree(inputs) == before_inputs  # nothing outside the output location changed
    if status:
        assert "error" in res.stderr
        assert _tree(tmp_path) == before_out, sorted(_tree(tmp_path))  # nothing partial left
        assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    else:
        assert any(p.name.endswith(("_map", "_map.npy")) for p in out.iterdir())


@pytest.mark.parametrize(
    ("case_id", "arguments", "status", "names"),
    [pytest.param(c[0], *c[1:], id=c[0]) for c in LDL_CASES],
)
def test_bad_input_table_ldl(inputs, tmp_path, case_id, arguments, status, names):
    """``jerald-ldl``: the same promises as ``jerald`` (see :func:`test_bad_input_table`)."""
    name = "Mstar_snap099_Nmesh16_Nstep1_n1.00_map"
    _check_case("jerald-ldl", "--save", name, inputs, tmp_path, case_id, arguments, status, names)


@pytest.mark.parametrize(
    ("case_id", "arguments", "status", "names"),
    [pytest.param(c[0], *c[1:], id=c[0]) for c in REF_CASES],
)
def test_bad_input_table_ref(inputs, tmp_path, case_id, arguments, status, names):
    """``jerald-ref``: the same promises as ``jerald`` (see :func:`test_bad_input_table`)."""
    name = "dm_Nmesh16_Nstep1_n0.00_map"
    _check_case(
        "jerald-ref", "--outpath", name, inputs, tmp_path, case_id, arguments, status, names
    )


# --------------------------------------------- a torn metrics.jsonl and a truncated checkpoint


def test_ref_torn_metrics_and_truncated_checkpoint(inputs, tmp_path):
    """A ``jerald-ref`` run killed while writing: a torn last line in ``metrics.jsonl`` is dropped
    on resume (the log is rebuilt from the checkpoint: every line parses, steps 0..3 once each);
    a truncated ``checkpoint.npz`` is an error naming the file and saying how to recover, with
    or without ``--optpath``, and leaves the directory as it was."""
    out = tmp_path / "out"
    args = ["--Nbodypath", inputs / "cat", "--refpath", inputs / "dm", "--Nstep", "1",
            "--quiet", "--outpath", out]  # fmt: skip
    run("jerald-ref", *args, "--steps", "2")
    work = out / "dm_Nmesh16_Nstep1_n0.00_train"
    with open(work / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "lr": 0.00')  # killed mid-line
    res = run("jerald-ref", *args, "--steps", "4", "--optpath", work)
    lines = (work / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [0, 1, 2, 3], res.stderr

    ckpt = work / "checkpoint.npz"
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 3])
    before = _tree(tmp_path)
    for extra in (["--optpath", str(work)], []):
        res = run("jerald-ref", *args, "--steps", "6", *extra, ok=False)
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        assert str(ckpt) in res.stderr  # names the file
        assert "afresh" in res.stderr or "--overwrite" in res.stderr  # says how to recover
        assert _tree(tmp_path) == before  # nothing replaced, nothing partial


# ------------------------------------------------------------ what the drop-in maps carry


def test_drop_in_maps_carry_metadata(inputs, tmp_path):
    """``jerald-ldl`` and ``jerald-ref`` maps carry what nbodykit users look for: BoxSize, Nmesh,
    the catalog's redshift (and the scale factor), units, the model, the parameter file and the
    command (they carried only the target and the parameter file before)."""
    run("jerald-ref", "--Nbodypath", inputs / "cat", "--evalpath", inputs / "ref_dm.txt",
        "--Nmesh", N, "--quiet", "--outpath", tmp_path / "ref")  # fmt: skip
    run("jerald-ldl", "--FastPMpath", inputs / "cat", "--BoxSize", BOX, "--Nmesh", N,
        "--restore", inputs / "ldl_mstar.txt", "--evaluateOnly", "--quiet",
        "--save", tmp_path / "ldl")  # fmt: skip
    for path, prog, model, params in (
        (tmp_path / "ref" / "dm_Nmesh16_Nstep1_n0.00_map", "jerald-ref", "JERALD", "ref_dm.txt"),
        (tmp_path / "ldl" / "Mstar_snap099_Nmesh16_Nstep1_n1.00_map", "jerald-ldl", "LDL",
         "ldl_mstar.txt"),
    ):  # fmt: skip
        _, attrs = read_mesh(path)
        np.testing.assert_allclose(attrs["BoxSize"], [BOX] * 3)
        assert list(attrs["Nmesh"]) == [N] * 3
        assert attrs["redshift"] == 2.0 and attrs["Time"] == pytest.approx(1 / 3)
        assert attrs["BoxSize_units"] == "Mpc/h" and attrs["units"]
        assert model in attrs["model"] and attrs["command"].startswith(prog)
        assert attrs["parameters"].endswith(params)
