"""The MPI engine (pmesh): parity with the single-process JAX engine, adjoints, gradients, MPI sizes.

Every check runs on one process (``pytest``) and on several (``mpiexec -n 2 python -m pytest
--with-mpi -m mpi``): the ``mpi`` variants split the particles over the ranks (rank r holds
particles r, r + size, ...; one test puts them all on rank 0) and compare the distributed result,
gathered, with :class:`JaxEngine` on the whole catalog. A subprocess test runs 4 ranks.

Tolerances (relative to the largest magnitude of the reference):

* float64 parity with JaxEngine, adjoint identity, mass conservation: 1e-12 (summation order only);
* float64 finite differences (central, step 1e-4 Mpc/h, particles >= 1e-3 cells from faces): 1e-6;
* float32 parity: 1e-5 (measured about 2e-7: summation order and the rounding of ``x * Nmesh / L``).

Collective operations are all issued before any assertion, so that a failure on one rank cannot
leave the other ranks waiting in a collective.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mpi4py import MPI

from jerald_nbk.pm import JaxEngine, fourier
from jerald_nbk.pm.pmesh_backend import PmeshEngine

COMM = MPI.COMM_WORLD

#: every check on one process, and again under mpiexec (2 ranks or more)
WORLDS = [
    pytest.param("serial", id="serial"),
    pytest.param("mpi", id="mpi", marks=pytest.mark.mpi(min_size=2)),
]

#: cubic, non-cubic, and odd sizes (pmesh's own k-grid is wrong for odd sizes; ours must not be)
MESHES = {
    "cubic": ((16, 16, 16), (100.0, 100.0, 100.0)),
    "noncubic": ((16, 12, 20), (100.0, 80.0, 120.0)),
    "odd": ((15, 13, 9), (90.0, 70.0, 50.0)),
}

RTOL = {"f8": 1e-12, "f4": 1e-5}


def position_gradient(pm, mesh, pos):
    """d/dx of the CIC-interpolated one-channel ``mesh`` at this rank's ``pos``, via readout's VJP.

    Each rank differentiates the sum of its own particles' values, so no allreduce is needed.
    """
    return jax.grad(lambda x: jnp.sum(pm.readout(mesh, x)))(jnp.asarray(pos))


def catalog(n, box, seed=0, nch=None):
    """Global particles, the same on every rank; some outside [0, L) (the engines wrap them)."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-0.5, 1.5, (n, 3)) * np.asarray(box)
    mass = rng.uniform(0.5, 1.5, n if nch is None else (n, nch))
    return pos, mass


def mine(x, comm=COMM):
    """This rank's share of a global per-particle array (round robin)."""
    return np.asarray(x)[comm.rank :: comm.size]


def allgather_particles(local, n, comm=COMM):
    """Reassemble a round-robin split per-particle array on every rank."""
    local = np.asarray(local)
    out = np.zeros((n,) + local.shape[1:], local.dtype)
    for r, part in enumerate(comm.allgather(local)):
        out[r :: comm.size] = part
    return out


def engines(name, dtype, fft="xla"):
    nmesh, box = MESHES[name]
    return PmeshEngine(nmesh, box, dtype=dtype, fft=fft), JaxEngine(nmesh, box, dtype=dtype)


def relerr(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def away_from_faces(pos, pm, margin=1e-3):
    """Mask of particles at least `margin` cells from every cell face (for finite differences)."""
    u = np.asarray(pos) * (np.array(pm.Nmesh) / pm.BoxSize)
    f = u - np.floor(u)
    return np.all((f > margin) & (f < 1 - margin), axis=1)


# ---------------------------------------------------------------------------------------------
# Layouts of the local slabs.


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_kvec_and_mesh_index_match_global_grids(world, mesh):
    pp, _ = engines(mesh, "f8")
    nmesh, box = MESHES[mesh]
    kx, ky, kz = (np.asarray(k) for k in pp.kvec())
    cshape = pp.local_complex_shape
    local_k = np.stack([np.broadcast_to(k, cshape) for k in (kx, ky, kz)], -1)
    glob_k = pp.to_global(local_k, "complex")
    ii = [np.asarray(i) for i in pp.mesh_index()]
    local_i = np.stack([np.broadcast_to(i, pp.local_real_shape) for i in ii], -1)
    glob_i = pp.to_global(local_i)
    # every rank's slab covers a distinct block: the blocks tile the mesh
    cells = pp.sum(jnp.ones(pp.local_real_shape))
    ref_k = fourier.kvectors(nmesh, box)
    for d in range(3):
        np.testing.assert_array_equal(glob_k[..., d], np.broadcast_to(ref_k[d], glob_k.shape[:3]))
    expect_i = np.stack(np.meshgrid(*[np.arange(n) for n in nmesh], indexing="ij"), -1)
    np.testing.assert_array_equal(glob_i, expect_i)
    assert int(cells) == int(np.prod(nmesh))
    assert pp.kvec()[0].dtype == np.float64 and pp.mesh_index()[0].dtype == np.int32


# ---------------------------------------------------------------------------------------------
# Forward parity with JaxEngine: the distributed result, gathered, equals JaxEngine on all particles.


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", ["f8", "f4"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_paint_parity(world, dtype, mesh):
    pp, jp = engines(mesh, dtype)
    pos, mass = catalog(3000, pp.BoxSize, seed=1)
    _, mass2 = catalog(3000, pp.BoxSize, seed=2, nch=2)
    got_unit = pp.to_global(pp.paint(mine(pos)))
    got_mass = pp.to_global(pp.paint(mine(pos), mine(mass)))
    got_ch = pp.to_global(pp.paint(mine(pos), mine(mass2)))
    assert got_unit.shape == pp.Nmesh and got_ch.shape == pp.Nmesh + (2,)
    assert relerr(got_unit, jp.paint(pos)) < RTOL[dtype]
    assert relerr(got_mass, jp.paint(pos, mass)) < RTOL[dtype]
    assert relerr(got_ch, jp.paint(pos, mass2)) < RTOL[dtype]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", ["f8", "f4"])
@pytest.mark.parametrize("mesh", ["cubic", "noncubic"])
def test_readout_and_gradient_parity(world, dtype, mesh):
    pp, jp = engines(mesh, dtype)
    pos, _ = catalog(3000, pp.BoxSize, seed=3)
    rng = np.random.default_rng(4)
    field = rng.normal(size=pp.Nmesh + (3,)).astype(dtype)
    vals = pp.readout(pp.to_local(field[..., 0]), mine(pos))
    vals3 = pp.readout(pp.to_local(field), mine(pos))
    grad = position_gradient(pp, pp.to_local(field[..., 0]), mine(pos))
    assert vals.shape == (len(mine(pos)),) and vals3.shape == (len(mine(pos)), 3)
    assert grad.shape == (len(mine(pos)), 3)
    assert relerr(vals, mine(jp.readout(field[..., 0], pos))) < RTOL[dtype]
    assert relerr(vals3, mine(jp.readout(field, pos))) < RTOL[dtype]
    # both in 1/(Mpc/h): pmesh's gradient=d applies the affine scale Nmesh / L
    assert relerr(grad, mine(position_gradient(jp, field[..., 0], pos))) < RTOL[dtype]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("fft", ["xla", "pfft"])
@pytest.mark.parametrize("dtype", ["f8", "f4"])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_fft_parity(world, dtype, mesh, fft):
    # both FFT routes: XLA's 1-D FFTs with all-to-alls between slabs (default), and pmesh's pfft
    pp, jp = engines(mesh, dtype, fft)
    rng = np.random.default_rng(5)
    field = rng.normal(size=pp.Nmesh + (2,)).astype(dtype)
    ck = pp.r2c(pp.to_local(field))
    ck1 = pp.r2c(pp.to_local(field[..., 1]))
    got_ck = pp.to_global(ck, "complex")
    got_ck1 = pp.to_global(ck1, "complex")
    # c2r of JaxEngine's spectrum, and of an arbitrary (not Hermitian) half-layout array: both FFT
    # libraries do the complex transforms first and the 1-D c2r along z last
    ref_ck = np.asarray(jp.r2c(field))
    noise = (rng.normal(size=ref_ck.shape) + 1j * rng.normal(size=ref_ck.shape)).astype(
        ref_ck.dtype
    )
    back = pp.to_global(pp.c2r(pp.to_local(ref_ck, "complex")))
    back_noise = pp.to_global(pp.c2r(pp.to_local(noise[..., 0], "complex")))
    assert got_ck.dtype == ref_ck.dtype
    assert relerr(got_ck, ref_ck) < RTOL[dtype]
    assert relerr(got_ck1, ref_ck[..., 1]) < RTOL[dtype]
    assert relerr(back, field) < RTOL[dtype] * 10  # round trip: two transforms
    assert relerr(back_noise, jp.c2r(noise[..., 0])) < RTOL[dtype] * 10


@pytest.mark.mpi(min_size=2)
def test_particles_all_on_one_rank():
    # "any subset": rank 0 holds every particle, the others none
    pp, jp = engines("noncubic", "f8")
    pos, mass = catalog(2000, pp.BoxSize, seed=6)
    local_pos = pos if COMM.rank == 0 else np.zeros((0, 3))
    local_mass = mass if COMM.rank == 0 else np.zeros(0)
    painted = pp.paint(local_pos, local_mass)
    ref = np.asarray(jp.paint(pos, mass))
    got = pp.to_global(painted)
    vals = pp.readout(painted, local_pos)
    loss, (gpos, gmass) = jax.value_and_grad(
        lambda p, m: pp.sum(pp.readout(pp.paint(p, m), p) ** 2), argnums=(0, 1)
    )(jnp.asarray(local_pos), jnp.asarray(local_mass))
    ref_loss, (ref_gpos, ref_gmass) = jax.value_and_grad(
        lambda p, m: jnp.sum(jp.readout(jp.paint(p, m), p) ** 2), argnums=(0, 1)
    )(jnp.asarray(pos), jnp.asarray(mass))
    assert relerr(got, ref) < 1e-12
    assert vals.shape == (len(local_pos),) and gpos.shape == (len(local_pos), 3)
    assert abs(float(loss) - float(ref_loss)) < 1e-12 * float(ref_loss)
    if COMM.rank == 0:
        assert relerr(vals, jp.readout(ref, pos)) < 1e-12
        assert relerr(gpos, ref_gpos) < 1e-12 and relerr(gmass, ref_gmass) < 1e-12


# ---------------------------------------------------------------------------------------------
# Adjoints and gradients.


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", ["f8", "f4"])
def test_adjoint_identity_and_mass_conservation(world, dtype):
    # <paint(x, m), f> = <m, readout(f, x)>, both sides global sums over ranks
    pp, _ = engines("noncubic", dtype)
    pos, mass = catalog(3000, pp.BoxSize, seed=7)
    rng = np.random.default_rng(8)
    f = pp.to_local(rng.normal(size=pp.Nmesh).astype(dtype))
    painted = pp.paint(mine(pos), mine(mass))
    lhs = float(pp.sum(painted * f))
    rhs = float(pp.sum(jnp.asarray(mine(mass), dtype) * pp.readout(f, mine(pos))))
    total_mesh = float(pp.sum(painted))
    total_mass = float(pp.sum(mine(mass)))
    density_mean = float(pp.sum(pp.density(mine(pos)))) / pp.ncells
    scale = float(pp.sum(jnp.abs(painted * f)))
    assert abs(lhs - rhs) < RTOL[dtype] * 10 * scale
    assert abs(total_mesh - total_mass) < RTOL[dtype] * total_mass
    assert abs(total_mass - mass.sum()) < RTOL[dtype] * mass.sum()
    assert abs(density_mean - 1.0) < RTOL[dtype]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("fft", ["xla", "pfft"])
@pytest.mark.parametrize("mesh", ["cubic", "noncubic", "odd"])
def test_vjp_parity_each_operation(world, mesh, fft):
    # every backward rule against JaxEngine's with random cotangents (complex ones not Hermitian)
    pp, jp = engines(mesh, "f8", fft)
    n = 2000
    pos, mass = catalog(n, pp.BoxSize, seed=9, nch=2)
    rng = np.random.default_rng(10)
    field = rng.normal(size=pp.Nmesh + (2,))
    ct_mesh = rng.normal(size=pp.Nmesh + (2,))
    ct_part = rng.normal(size=(n, 2))
    cshape = jp.r2c(field).shape
    ct_c = rng.normal(size=cshape) + 1j * rng.normal(size=cshape)
    cfield = rng.normal(size=cshape) + 1j * rng.normal(size=cshape)

    _, vjp = jax.vjp(pp.paint, jnp.asarray(mine(pos)), jnp.asarray(mine(mass)))
    paint_pos, paint_mass = vjp(pp.to_local(ct_mesh))
    _, vjp = jax.vjp(pp.readout, pp.to_local(field), jnp.asarray(mine(pos)))
    read_mesh, read_pos = vjp(jnp.asarray(mine(ct_part)))
    read_mesh = pp.to_global(read_mesh)
    _, vjp = jax.vjp(pp.r2c, pp.to_local(field))
    (r2c_bar,) = vjp(pp.to_local(ct_c, "complex"))
    r2c_bar = pp.to_global(r2c_bar)
    _, vjp = jax.vjp(pp.c2r, pp.to_local(cfield, "complex"))
    (c2r_bar,) = vjp(pp.to_local(ct_mesh))
    c2r_bar = pp.to_global(c2r_bar, "complex")

    _, vjp = jax.vjp(jp.paint, jnp.asarray(pos), jnp.asarray(mass))
    ref_paint_pos, ref_paint_mass = vjp(jnp.asarray(ct_mesh))
    _, vjp = jax.vjp(jp.readout, jnp.asarray(field), jnp.asarray(pos))
    ref_read_mesh, ref_read_pos = vjp(jnp.asarray(ct_part))
    _, vjp = jax.vjp(jp.r2c, jnp.asarray(field))
    (ref_r2c_bar,) = vjp(jnp.asarray(ct_c))
    _, vjp = jax.vjp(jp.c2r, jnp.asarray(cfield))
    (ref_c2r_bar,) = vjp(jnp.asarray(ct_mesh))

    assert relerr(paint_pos, mine(ref_paint_pos)) < 1e-12
    assert relerr(paint_mass, mine(ref_paint_mass)) < 1e-12
    assert relerr(read_mesh, ref_read_mesh) < 1e-12
    assert relerr(read_pos, mine(ref_read_pos)) < 1e-12
    assert relerr(r2c_bar, ref_r2c_bar) < 1e-12
    assert relerr(c2r_bar, ref_c2r_bar) < 1e-12


def smoothing_loss(eng, pos, mass, radius=6.0):
    """sum over particles of (Gaussian-smoothed painted field read back at the particles)^2."""
    kernel = fourier.gaussian_filter(eng.knorm(), radius, xp=jnp)
    smooth = eng.c2r(eng.r2c(eng.paint(pos, mass)) * kernel)
    return eng.sum(eng.readout(smooth, pos) ** 2)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mesh", ["cubic", "noncubic"])
def test_loss_gradient_matches_jax_engine(world, mesh):
    pp, jp = engines(mesh, "f8")
    n = 3000
    pos, mass = catalog(n, pp.BoxSize, seed=11)
    grad = jax.value_and_grad(lambda p, m: smoothing_loss(pp, p, m), argnums=(0, 1))
    ref_grad = jax.value_and_grad(lambda p, m: smoothing_loss(jp, p, m), argnums=(0, 1))
    loss, (gpos, gmass) = grad(jnp.asarray(mine(pos)), jnp.asarray(mine(mass)))
    ref_loss, (ref_gpos, ref_gmass) = ref_grad(jnp.asarray(pos), jnp.asarray(mass))
    assert abs(float(loss) - float(ref_loss)) < 1e-12 * float(ref_loss)
    assert relerr(gpos, mine(ref_gpos)) < 1e-12
    assert relerr(gmass, mine(ref_gmass)) < 1e-12


@pytest.mark.parametrize("world", WORLDS)
def test_loss_gradient_finite_differences(world):
    pp, _ = engines("noncubic", "f8")
    n = 1500
    pos, mass = catalog(n, pp.BoxSize, seed=12)
    loss, (gpos, gmass) = jax.value_and_grad(lambda p, m: smoothing_loss(pp, p, m), argnums=(0, 1))(
        jnp.asarray(mine(pos)), jnp.asarray(mine(mass))
    )
    gpos_all = allgather_particles(gpos, n)
    gmass_all = allgather_particles(gmass, n)
    # the same particle ids on every rank; its owner perturbs it, every rank evaluates the loss
    ids = np.flatnonzero(away_from_faces(pos, pp))[:4]
    h = 1e-4  # Mpc/h: far below the 1e-3-cell margin, far above float64 round-off of the loss
    fd_pos, fd_mass = np.zeros((len(ids), 3)), np.zeros(len(ids))
    for a, gid in enumerate(ids):
        for d in range(4):  # three position components, then the mass
            vals = []
            for sign in (1, -1):
                p, m = pos.copy(), mass.copy()
                if d < 3:
                    p[gid, d] += sign * h
                else:
                    m[gid] += sign * h
                vals.append(float(smoothing_loss(pp, mine(p), mine(m))))
            deriv = (vals[0] - vals[1]) / (2 * h)
            if d < 3:
                fd_pos[a, d] = deriv
            else:
                fd_mass[a] = deriv
    assert len(ids) == 4
    np.testing.assert_allclose(gpos_all[ids], fd_pos, rtol=1e-6, atol=1e-6 * np.abs(fd_pos).max())
    np.testing.assert_allclose(gmass_all[ids], fd_mass, rtol=1e-6)
    assert float(loss) > 0


# ---------------------------------------------------------------------------------------------
# MPI plumbing.


@pytest.mark.parametrize("world", WORLDS)
def test_sum_count_and_their_gradients(world):
    pp, _ = engines("cubic", "f8")
    x = jnp.arange(5.0) + COMM.rank
    total, grad = jax.value_and_grad(lambda v: pp.sum(v) ** 2)(x)
    expect = sum(float(np.sum(np.arange(5.0) + r)) for r in range(COMM.size))
    count = pp.count(np.zeros((3 + COMM.rank, 3)))
    assert float(total) == expect**2
    # the cotangent passes through unchanged on each rank: d(S^2)/dx_local = 2 S
    np.testing.assert_array_equal(np.asarray(grad), np.full(5, 2 * expect))
    assert count == sum(3 + r for r in range(COMM.size))
    assert pp.comm is COMM


@pytest.mark.parametrize("world", WORLDS)
def test_layout_made_once_per_positions_and_freed(world):
    # Bug caught: a layout rebuilt for every paint/readout (or hashed from the positions' bytes), or
    # leaked after a compiled step. One set of positions, painted and read out (and both
    # differentiated), needs one layout; moved positions need a second; the compiled step frees both.
    pp, _ = engines("cubic", "f8")
    pos, mass = catalog(1000, pp.BoxSize, seed=13)
    p, m = jnp.asarray(mine(pos)), jnp.asarray(mine(mass))
    pp.paint(p, m)
    pp.readout(pp.paint(p), p)
    after_same = pp.n_decompose
    pp.paint(p + 1.0)  # new positions (a new array)
    after_moved = pp.n_decompose

    def step(q, w):
        def loss(q, w):
            x = q + 0.1 * pp.readout(pp.paint(q, w), q)[:, None]
            return pp.sum(pp.readout(pp.paint(x, w), x) ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1))(q, w)

    compiled = pp.jit(step)
    per_call = []
    for q in (p, p, p - 1.0):
        before = pp.n_decompose
        compiled(q, m)
        per_call.append(pp.n_decompose - before)
    live = len(pp._layouts)
    # the argument's layout is made before the call and kept (reused by the eager one of p,
    # reused at the second call, made for the new positions p - 1); the moved particles' layout is
    # made inside each call and freed when it returns. One rank: no layout at all.
    expect = [0, 0, [0, 0, 0]] if COMM.size == 1 else [1, 2, [1, 1, 2]]
    assert [after_same, after_moved, per_call] == expect
    assert live == (0 if COMM.size == 1 else 3)  # p, p + 1 and p - 1; none of the steps'


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("where", ["split", "all_on_rank0"])
def test_compiled_step_matches_jax_engine(world, where):
    # Bug caught: the compiled engine disagreeing with the eager one or with JaxEngine, a rank with
    # no particles skipping a collective inside jit (different programs per rank), or the step
    # recompiling at every call.
    pp, jp = engines("noncubic", "f8")
    n = 2000
    pos, mass = catalog(n, pp.BoxSize, seed=21)
    if where == "split":
        p, m = mine(pos), mine(mass)
    else:
        p = pos if COMM.rank == 0 else np.zeros((0, 3))
        m = mass if COMM.rank == 0 else np.zeros(0)
    traces = []

    def vg(eng):
        def f(q, w):
            traces.append(1)
            return jax.value_and_grad(lambda q, w: smoothing_loss(eng, q, w), argnums=(0, 1))(q, w)

        return f

    step = pp.jit(vg(pp))
    loss, (gpos, gmass) = step(jnp.asarray(p), jnp.asarray(m))
    loss2, (gpos2, _) = step(jnp.asarray(p) + 0.5, jnp.asarray(m))  # same shapes: no new trace
    eager_loss, (eager_gpos, _) = vg(pp)(jnp.asarray(p), jnp.asarray(m))
    ref_loss, (ref_gpos, ref_gmass) = vg(jp)(jnp.asarray(pos), jnp.asarray(mass))
    ref_loss2, (ref_gpos2, _) = vg(jp)(jnp.asarray(pos) + 0.5, jnp.asarray(mass))
    gpos_all = allgather_particles(gpos, n) if where == "split" else None
    if where != "split":
        gpos_all = COMM.bcast(np.asarray(gpos) if COMM.rank == 0 else None)
    assert len(traces) == 4  # the compiled step traced once for two calls; 1 eager, 2 reference
    assert abs(float(loss) - float(ref_loss)) < 1e-12 * float(ref_loss)
    assert abs(float(loss2) - float(ref_loss2)) < 1e-12 * float(ref_loss2)
    assert abs(float(eager_loss) - float(loss)) < 1e-13 * float(loss)
    assert relerr(gpos_all, ref_gpos) < 1e-12
    if where == "split" or COMM.rank == 0:
        assert relerr(gmass, mine(ref_gmass) if where == "split" else ref_gmass) < 1e-12
        assert relerr(gpos2, mine(ref_gpos2) if where == "split" else ref_gpos2) < 1e-12
        assert relerr(eager_gpos, gpos) < 1e-12


@pytest.mark.mpi(min_size=2)
def test_stack_proof_pmesh_paint_r2c_same_under_1_and_2_ranks():
    # Foundation issue: pmesh paint + r2c give the same field under 1 rank and under >= 2 ranks.
    nmesh, box = MESHES["noncubic"]
    pos, mass = catalog(3000, box, seed=14)
    many = PmeshEngine(nmesh, box, dtype="f8", comm=COMM)
    one = PmeshEngine(nmesh, box, dtype="f8", comm=MPI.COMM_SELF)  # every rank alone, all particles
    dk_many = many.to_global(many.r2c(many.paint(mine(pos), mine(mass))), "complex")
    dk_one = np.asarray(one.r2c(one.paint(pos, mass)))
    assert many.describe()["ranks"] == COMM.size and one.describe()["ranks"] == 1
    assert relerr(dk_many, dk_one) < 1e-12


def test_serial_engine_details():
    pp = PmeshEngine((16, 12, 20), (100.0, 80.0, 120.0), dtype="f4", comm=MPI.COMM_SELF)
    desc = pp.describe()
    compiled = pp.jit(lambda x: pp.sum(pp.paint(x)))
    assert float(compiled(jnp.full((5, 3), 7.5))) == 5.0  # one rank: plain jax.jit
    assert desc["backend"] == "pmesh" and desc["ranks"] == 1 and desc["dtype"] == "float32"
    assert pp.local_real_shape == (16, 12, 20) and pp.local_complex_shape == (16, 12, 11)
    with pytest.raises(ValueError, match="local real shape"):
        pp.readout(jnp.zeros((8, 12, 20)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        pp.paint(jnp.zeros((4, 2)))
    assert pp.paint(np.full((5, 3), 7.5)).dtype == jnp.float32
    assert pp.r2c(jnp.zeros((16, 12, 20))).dtype == jnp.complex64


# ---------------------------------------------------------------------------------------------
# Four ranks, in a subprocess (pytest itself runs on one process or under mpiexec -n 2).

FOUR_RANK_SCRIPT = """
import sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI
sys.path.insert(0, {tests!r})
from test_pmesh_backend import catalog, engines, mine, relerr, smoothing_loss, allgather_particles

comm = MPI.COMM_WORLD
pp, jp = engines("noncubic", "f8")
assert list(pp.ppm.np) == [4, 1], pp.ppm.np  # x slabs
n = 3000
pos, mass = catalog(n, pp.BoxSize, seed=15)
painted = pp.paint(mine(pos), mine(mass))
errs = {{}}
errs["paint"] = relerr(pp.to_global(painted), jp.paint(pos, mass))
errs["r2c"] = relerr(pp.to_global(pp.r2c(painted), "complex"), jp.r2c(jp.paint(pos, mass)))
field = np.random.default_rng(16).normal(size=pp.Nmesh)
errs["c2r"] = relerr(pp.to_global(pp.c2r(pp.r2c(pp.to_local(field)))), field)
errs["readout"] = relerr(allgather_particles(pp.readout(pp.to_local(field), mine(pos)), n),
                         jp.readout(field, pos))
grad = jax.value_and_grad(lambda p, m: smoothing_loss(pp, p, m), argnums=(0, 1))
loss, (gp, gm) = grad(jnp.asarray(mine(pos)), jnp.asarray(mine(mass)))
ref_loss, (rgp, rgm) = jax.value_and_grad(
    lambda p, m: smoothing_loss(jp, p, m), argnums=(0, 1))(jnp.asarray(pos), jnp.asarray(mass))
errs["loss"] = abs(float(loss) - float(ref_loss)) / float(ref_loss)
errs["grad_pos"] = relerr(allgather_particles(gp, n), rgp)
errs["grad_mass"] = relerr(allgather_particles(gm, n), rgm)
closs, (cgp, cgm) = pp.jit(grad)(jnp.asarray(mine(pos)), jnp.asarray(mine(mass)))
errs["compiled_loss"] = abs(float(closs) - float(ref_loss)) / float(ref_loss)
errs["compiled_grad_pos"] = relerr(allgather_particles(cgp, n), rgp)
errs["compiled_grad_mass"] = relerr(allgather_particles(cgm, n), rgm)
worst = comm.allreduce(max(errs.values()), op=MPI.MAX)
if comm.rank == 0:
    print("RANKS", comm.size, "ERRORS", errs, "WORST", worst, flush=True)
sys.exit(0 if worst < 1e-12 else 3)
"""


def _mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


@pytest.mark.slow
def test_four_ranks_match_jax_engine(tmp_path):
    if COMM.size > 1:
        pytest.skip("launches its own mpiexec; run from a single-process pytest")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec next to the interpreter nor on PATH")
    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "four_ranks.py"
    script.write_text(textwrap.dedent(FOUR_RANK_SCRIPT).format(tests=tests))
    env = dict(os.environ)
    # the package from this checkout, one thread per rank on a small machine
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [mpiexec, "-n", "4", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=str(tmp_path),
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "RANKS 4" in proc.stdout, proc.stdout
    print(proc.stdout.strip(), f"({elapsed:.1f} s)")


BOUND_SCRIPT = """
import sys
import numpy as np
import jax.numpy as jnp
from mpi4py import MPI
from jerald_nbk.pm import PmeshEngine

comm = MPI.COMM_WORLD
pm = PmeshEngine(32, 100.0, dtype="f4", comm=comm)
rng = np.random.default_rng(comm.rank)
pos = jnp.asarray(rng.uniform(0.0, 100.0, ({n}, 3)).astype(np.float32))
eager = float(pm.sum(pm.density(pos)))
compiled = float(pm.jit(lambda p: pm.sum(pm.density(p)))(pos))
if comm.rank == 0:
    print("SUMS", eager, compiled, flush=True)
"""


@pytest.mark.slow
def test_eager_and_compiled_paint_of_many_particles_on_ranks_bound_to_cores(tmp_path):
    # Eagerly, JAX ran each callback on one of XLA's threads with arguments whose host copies
    # could still be queued; a rank bound to one core (mpiexec -bind-to core) then waited for
    # itself. 8M particles per rank were enough (2M were not): the run hung until killed.
    if COMM.size > 1:
        pytest.skip("launches its own mpiexec; run from a single-process pytest")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores to bind two ranks to")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec next to the interpreter nor on PATH")
    script = tmp_path / "bound.py"
    script.write_text(BOUND_SCRIPT.format(n=8_000_000))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    try:
        proc = subprocess.run(
            [mpiexec, "-bind-to", "core", "-n", "2", sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=str(tmp_path),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("mpiexec -bind-to core -n 2: the paint of 8M particles per rank hung")
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    sums = [float(v) for v in proc.stdout.split("SUMS", 1)[1].split()[:2]]
    # 1 + delta has mean 1: its sum over the 32^3 cells is their number, eager and compiled
    assert sums == pytest.approx([32.0**3, 32.0**3], rel=1e-5)
