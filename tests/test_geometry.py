"""jerald_nbk.geometry: the one reader of BoxSize / Nmesh and the one wrap into the box."""

import numpy as np
import pytest

from jerald_nbk.geometry import box_vector, mesh_vector, wrap_positions


def test_box_vector_broadcasts_and_names_the_source():
    assert box_vector(80, "x").tolist() == [80.0, 80.0, 80.0]
    assert box_vector([1, 2], "x", ndim=2).tolist() == [1.0, 2.0]
    # bug caught: a bad value reported without saying which file or argument it came from
    with pytest.raises(ValueError, match=r"catalog run/z0: BoxSize must be positive and finite"):
        box_vector([80.0, -1.0, 80.0], "catalog run/z0")
    with pytest.raises(ValueError, match=r"the arg: BoxSize must be positive and finite.*nan"):
        box_vector(float("nan"), "the arg")
    with pytest.raises(ValueError, match=r"the arg: BoxSize must be a number or 3 numbers"):
        box_vector((1.0, 2.0), "the arg")


def test_mesh_vector_refuses_what_int_conversion_would_truncate():
    assert mesh_vector([64.0, 64, 32], "x").tolist() == [64, 64, 32]
    assert mesh_vector(8, "x").dtype == np.int64
    # bug caught: np.asarray(64.5, dtype=int) is 64, a silently different mesh
    with pytest.raises(ValueError, match=r"params\.json: Nmesh must be whole numbers >= 1"):
        mesh_vector(64.5, "params.json")
    with pytest.raises(ValueError, match="Nmesh must be whole numbers >= 1"):
        mesh_vector(0, "x")


@pytest.mark.parametrize("dtype", ["f4", "f8"])
def test_wrap_positions_stays_below_the_box(dtype):
    L = 25.0
    # -1e-17 mod 25 rounds to 25.0 in float64 (and -1e-9 to 25.0 in float32): the bug is a
    # coordinate equal to L, outside [0, L)
    tiny = -1e-17 if dtype == "f8" else -1e-9
    pos = np.array([[tiny, 26.0, 3.0], [np.nextafter(np.float32(L), 0), -1.0, 50.0]], dtype=dtype)
    assert np.mod(pos[0, 0], pos.dtype.type(L)) == L  # the case this helper exists for
    out = wrap_positions(pos, L)
    assert out.dtype == pos.dtype
    assert np.all((out >= 0) & (out < L))
    expect = np.array([[0.0, 1.0, 3.0], [np.nextafter(np.float32(L), 0), 24.0, 0.0]])
    np.testing.assert_allclose(out, expect.astype(dtype), rtol=0, atol=0)
    # per-axis boxes
    out = wrap_positions(np.array([[11.0, 11.0, 11.0]]), [10.0, 20.0, 5.0])
    assert out.tolist() == [[1.0, 11.0, 1.0]]


def test_check_same_box_compares_nmesh_as_whole_numbers():
    """Nmesh is read by mesh_vector and compared exactly: BoxSize's relative tolerance let
    2^20 and 2^20 + 1 cells pass as the same mesh, and a malformed Nmesh was not named."""
    from jerald_nbk.train.validate import check_same_box

    check_same_box({"Nmesh": 64}, "the model", {"Nmesh": [64.0, 64.0, 64.0]}, "map m")
    with pytest.raises(ValueError, match=r"map m Nmesh 1048577 != the model Nmesh 1048576"):
        check_same_box({"Nmesh": 2**20}, "the model", {"Nmesh": 2**20 + 1}, "map m")
    with pytest.raises(ValueError, match=r"map m: Nmesh must be whole numbers >= 1"):
        check_same_box({"Nmesh": 64}, "the model", {"Nmesh": [64, 64, 0]}, "map m")
