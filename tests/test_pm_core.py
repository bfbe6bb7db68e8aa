"""The single-process particle-mesh core: CIC kernels, FFT conventions, adjoints and gradients.

Tolerances: float64 identities to 1e-10 relative; float64 finite differences (central, step 1e-6
Mpc/h, far from cell faces) to 1e-6 relative; float32 C++ vs pure-JAX parity to 1e-5 relative
(different summation order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jerald_nbk import _cic
from jerald_nbk.pm import JaxEngine, fourier
from jerald_nbk.pm.base import ParticleMesh
from jerald_nbk.pm.jax_backend import set_num_threads

KERNELS = ["cpp", "jax"]


def random_particles(n, box, seed=0, dtype=np.float64, spread=1.0):
    rng = np.random.default_rng(seed)
    # some particles outside [0, L) on purpose: the kernels must wrap them
    return (rng.uniform(-0.2, 1.2, (n, 3)) * np.asarray(box) * spread).astype(dtype)


def position_gradient(pm, mesh, pos):
    """d/dx of the CIC-interpolated one-channel ``mesh`` at ``pos`` (N, 3), through readout's VJP."""
    return jax.grad(lambda x: jnp.sum(pm.readout(mesh, x)))(jnp.asarray(pos))


def away_from_faces(pos, pm, margin=1e-3):
    """Mask of particles at least `margin` cells from every cell face (for finite differences)."""
    u = pos * (np.array(pm.Nmesh) / pm.BoxSize)
    f = u - np.floor(u)
    return np.all((f > margin) & (f < 1 - margin), axis=1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_single_particle_weights(kernel):
    pm = JaxEngine(8, 8.0, dtype="f8", kernel=kernel)  # 1 Mpc/h cells
    x = np.array([[2.25, 7.5, 0.75]])  # fractions 0.25, 0.5, 0.75; the y pair wraps 7 -> 0
    mesh = np.asarray(pm.paint(x, np.array([2.0])))
    expect = np.zeros((8, 8, 8))
    for i, wx in ((2, 0.75), (3, 0.25)):
        for j, wy in ((7, 0.5), (0, 0.5)):
            for k, wz in ((0, 0.25), (1, 0.75)):
                expect[i, j, k] = 2.0 * wx * wy * wz
    np.testing.assert_allclose(mesh, expect, rtol=0, atol=1e-14)


def test_cpp_extension_numpy_entry_points():
    # The extension alone, no JAX: a particle at a cell corner puts all its mass in that cell, and
    # readout of a constant mesh returns the constant.
    pos = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    w = np.array([[3.0], [8.0]])
    mesh = _cic.paint(pos, w, (4, 4, 4), (1.0, 1.0, 1.0))
    assert mesh.shape == (4, 4, 4, 1)
    assert mesh[1, 2, 3, 0] == 3.0
    np.testing.assert_allclose(mesh[:2, :2, :2, 0], np.ones((2, 2, 2)), rtol=1e-15)
    vals = _cic.readout(np.full((4, 4, 4, 2), 5.0), pos, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(vals, 5.0, rtol=1e-15)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        _cic.paint(np.zeros((3, 2)), np.zeros((3, 1)), (4, 4, 4), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("nmesh,box", [(16, 50.0), ((16, 12, 20), (40.0, 30.0, 55.0))])
def test_mass_conservation_and_wrapping(kernel, nmesh, box):
    pm = JaxEngine(nmesh, box, dtype="f8", kernel=kernel)
    pos = random_particles(5000, box)
    m = np.random.default_rng(1).uniform(0.5, 2.0, 5000)
    mesh = pm.paint(pos, m)
    assert mesh.shape == pm.Nmesh
    np.testing.assert_allclose(float(mesh.sum()), m.sum(), rtol=1e-12)
    # shifting every particle by a whole box changes nothing
    np.testing.assert_allclose(pm.paint(pos + np.asarray(box), m), mesh, rtol=1e-10, atol=1e-12)
    assert float(jnp.mean(pm.density(pos))) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("channels", [None, 3])
def test_adjoint_identity(kernel, channels):
    # <paint(x, m), f> = <m, readout(f, x)> for any m, f: readout is paint's exact adjoint.
    pm = JaxEngine((12, 16, 10), (30.0, 40.0, 25.0), dtype="f8", kernel=kernel)
    rng = np.random.default_rng(2)
    pos = random_particles(3000, pm.BoxSize)
    shape = (3000,) if channels is None else (3000, channels)
    m = rng.normal(size=shape)
    f = rng.normal(size=pm.Nmesh + (() if channels is None else (channels,)))
    lhs = float(jnp.vdot(pm.paint(pos, m), f))
    rhs = float(jnp.vdot(m, pm.readout(f, pos)))
    assert lhs == pytest.approx(rhs, rel=1e-10)


@pytest.mark.parametrize("dtype,rtol", [("f4", 1e-5), ("f8", 1e-12)])
def test_cpp_matches_pure_jax(dtype, rtol):
    cpp = JaxEngine((16, 12, 20), (40.0, 30.0, 55.0), dtype=dtype, kernel="cpp")
    ref = JaxEngine((16, 12, 20), (40.0, 30.0, 55.0), dtype=dtype, kernel="jax", chunk=777)
    pos = random_particles(20000, cpp.BoxSize, dtype=np.dtype(dtype))
    rng = np.random.default_rng(3)
    m = rng.uniform(0, 1, (20000, 2)).astype(dtype)
    a, b = cpp.paint(pos, m), ref.paint(pos, m)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))
    f = rng.normal(size=cpp.Nmesh + (2,)).astype(dtype)
    np.testing.assert_allclose(cpp.readout(f, pos), ref.readout(f, pos), rtol=rtol, atol=rtol * 5)
    g = rng.normal(size=cpp.Nmesh).astype(dtype)
    np.testing.assert_allclose(
        position_gradient(cpp, g, pos),
        position_gradient(ref, g, pos),
        rtol=rtol,
        atol=rtol * 50,
    )


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_pure_jax_chunk_default_follows_the_device(monkeypatch, backend):
    # on a GPU the pure-JAX kernels are the only ones and run fastest in big chunks
    # (benchmarks/results/gpu.json); on a CPU they are the parity path, kept small
    from jerald_nbk.pm import jax_backend

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    pm = JaxEngine(16, 40.0, kernel="jax")
    want = jax_backend.GPU_CHUNK if backend == "gpu" else jax_backend.CPU_CHUNK
    assert pm._cfg.chunk == want
    assert JaxEngine(16, 40.0, kernel="jax", chunk=777)._cfg.chunk == 777


def test_paint_independent_of_thread_count():
    pm = JaxEngine(32, 100.0, kernel="cpp")
    pos = random_particles(100000, 100.0, dtype=np.float32)
    try:
        set_num_threads(1)
        one = np.asarray(pm.paint(pos))
        set_num_threads(2)
        two = np.asarray(pm.paint(pos))
    finally:
        set_num_threads(0)
    assert np.array_equal(one, two)  # bitwise: same summation order per cell


@pytest.mark.parametrize("kernel", KERNELS)
def test_readout_position_gradient_matches_finite_differences(kernel):
    pm = JaxEngine((16, 12, 20), (40.0, 30.0, 55.0), dtype="f8", kernel=kernel)
    rng = np.random.default_rng(4)
    f = rng.normal(size=pm.Nmesh)
    pos = random_particles(400, pm.BoxSize)
    pos = pos[away_from_faces(pos, pm, 1e-3)]
    grad = np.asarray(position_gradient(pm, f, pos))
    h = 1e-6
    for d in range(3):
        e = np.zeros(3)
        e[d] = h
        fd = (np.asarray(pm.readout(f, pos + e)) - np.asarray(pm.readout(f, pos - e))) / (2 * h)
        np.testing.assert_allclose(grad[:, d], fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", KERNELS)
def test_vjps_match_finite_differences(kernel):
    # A scalar through every differentiable input of paint, readout, r2c and c2r:
    # L = sum(readout(c2r(K r2c(paint(x, m))), x)^2) + <readout(g, x), m>.
    pm = JaxEngine((12, 10, 14), (30.0, 25.0, 35.0), dtype="f8", kernel=kernel)
    rng = np.random.default_rng(5)
    pos = random_particles(300, pm.BoxSize)
    pos = pos[away_from_faces(pos, pm, 2e-3)]
    m = rng.uniform(0.5, 1.5, len(pos))
    g = jnp.asarray(rng.normal(size=pm.Nmesh))
    kern = jnp.exp(-(pm.knorm() ** 2)) * pm.gradient_kernels(6)[0]

    def loss(x, mass, mesh):
        phi = pm.c2r(kern * pm.r2c(pm.paint(x, mass)))
        return jnp.sum(pm.readout(phi, x) ** 2) + jnp.vdot(pm.readout(mesh, x), mass)

    gx, gm, gg = jax.grad(loss, argnums=(0, 1, 2))(pos, m, g)
    h = 1e-6
    rng2 = np.random.default_rng(6)
    for _ in range(6):  # random directions in each input
        dx = rng2.normal(size=pos.shape)
        fd = (loss(pos + h * dx, m, g) - loss(pos - h * dx, m, g)) / (2 * h)
        assert float(jnp.vdot(gx, dx)) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
        dm = rng2.normal(size=m.shape)
        fd = (loss(pos, m + h * dm, g) - loss(pos, m - h * dm, g)) / (2 * h)
        assert float(jnp.vdot(gm, dm)) == pytest.approx(float(fd), rel=1e-6)
        dg = rng2.normal(size=g.shape)
        fd = (loss(pos, m, g + h * dg) - loss(pos, m, g - h * dg)) / (2 * h)
        assert float(jnp.vdot(gg, dg)) == pytest.approx(float(fd), rel=1e-6)


def _smooth_source(pm):
    """A layer's potential from ``rho`` and two scalars, smooth in all three."""
    k2 = pm.knorm() ** 2

    def source(rho, a, b):
        return a * pm.r2c(rho**2 + b * rho) * jnp.exp(-k2)

    return source


@pytest.mark.parametrize("density_given", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_displace_matches_its_composition(kernel, density_given):
    # JaxEngine.displace takes the layer's backward pass in one particle pass (its position
    # cotangent: the identity's, the gradient readout's and the density paint's); the generic
    # ParticleMesh.displace composes density, readout_gradient and the sum. Same values and VJPs.
    pm = JaxEngine((12, 10, 14), (30.0, 25.0, 35.0), dtype="f8", kernel=kernel)
    source = _smooth_source(pm)
    pos = jnp.asarray(random_particles(500, pm.BoxSize, seed=7))
    rho = pm.density(pos) if density_given else None
    ct = jnp.asarray(np.random.default_rng(8).normal(size=pos.shape))

    def run(displace, x, a, b, r):
        return displace(x, source, (a, b), 6, r if density_given else None)

    outs = []
    for displace in (pm.displace, lambda *a: ParticleMesh.displace(pm, *a)):
        y, vjp = jax.vjp(lambda x, a, b, r, d=displace: run(d, x, a, b, r), pos, 0.7, 0.3, rho)
        outs.append((y, *vjp(ct)))
    for fused, composed in zip(*outs, strict=True):
        if composed is None:  # the density's cotangent when the layer paints it itself
            assert fused is None
            continue
        scale = float(jnp.max(jnp.abs(composed)))
        assert scale > 0
        np.testing.assert_allclose(fused, composed, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("kernel", KERNELS)
def test_displace_position_gradient_matches_finite_differences(kernel):
    pm = JaxEngine((12, 10, 14), (30.0, 25.0, 35.0), dtype="f8", kernel=kernel)
    source = _smooth_source(pm)
    pos = random_particles(400, pm.BoxSize, seed=9)
    pos = jnp.asarray(pos[away_from_faces(pos, pm, 2e-3)])
    w = jnp.asarray(np.random.default_rng(10).normal(size=pos.shape))

    def loss(x):
        return jnp.vdot(jnp.sin(pm.displace(x, source, (40.0, 0.3), 6)), w)

    gx = jax.grad(loss)(pos)
    h = 1e-6
    rng = np.random.default_rng(11)
    for _ in range(4):
        dx = rng.normal(size=pos.shape)
        fd = (loss(pos + h * dx) - loss(pos - h * dx)) / (2 * h)
        assert float(jnp.vdot(gx, dx)) == pytest.approx(float(fd), rel=1e-6)


def test_fft_normalisation_and_round_trip():
    pm = JaxEngine((16, 12, 20), (40.0, 30.0, 55.0), dtype="f8")
    f = jnp.asarray(np.random.default_rng(7).normal(size=pm.Nmesh)) + 3.0
    fk = pm.r2c(f)
    assert fk.shape == (16, 12, 11)
    assert complex(fk[0, 0, 0]) == pytest.approx(float(f.mean()), rel=1e-12)  # k=0 holds the mean
    np.testing.assert_allclose(pm.c2r(fk), f, rtol=1e-12)  # with k=0 above: both scales pinned


@pytest.mark.parametrize("order,tol", [(4, 5e-3), (6, 5e-4), ("exact", 1e-12)])
def test_plane_wave_gradient(order, tol):
    # f = sin(k x) with k = 2 pi m / L: r2c puts -i/2 at +m; the gradient is k cos(k x) up to the
    # finite-difference error of order (k H)^order.
    pm = JaxEngine((32, 8, 8), (64.0, 16.0, 16.0), dtype="f8")
    m = 2
    kx = 2 * np.pi * m / 64.0
    x = (np.arange(32) * 2.0).reshape(-1, 1, 1)
    f = jnp.asarray(np.broadcast_to(np.sin(kx * x), pm.Nmesh))
    fk = pm.r2c(f)
    assert complex(fk[m, 0, 0]) == pytest.approx(-0.5j, abs=1e-12)
    assert float(jnp.abs(fk).sum()) == pytest.approx(1.0, rel=1e-10)  # +m and -m only
    dfdx = pm.c2r(fk * pm.gradient_kernels(order)[0])
    expect = np.broadcast_to(kx * np.cos(kx * x), pm.Nmesh)
    np.testing.assert_allclose(dfdx, expect, atol=tol * kx)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("order,tol", [(4, 5e-3), (6, 5e-4), ("exact", 1e-12)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gradient_mesh_plane_wave(order, tol, axis, kernel):
    # pm.gradient_mesh (the JAX engine takes orders 4 and 6 in real space) on f = sin(k x_axis):
    # the gradient is k cos(k x_axis) along that axis, up to O((k H)^order), and 0 along the others
    shape = [8, 8, 8]
    shape[axis] = 32
    box = [16.0, 16.0, 16.0]
    box[axis] = 64.0
    pm = JaxEngine(tuple(shape), tuple(box), dtype="f8", kernel=kernel)
    k = 2 * np.pi * 2 / 64.0
    x = (np.arange(32) * 2.0).reshape([-1 if a == axis else 1 for a in range(3)])
    f = jnp.asarray(np.broadcast_to(np.sin(k * x), pm.Nmesh))
    grad = np.asarray(pm.gradient_mesh(pm.r2c(f), order))
    assert grad.shape == (*pm.Nmesh, 3)
    np.testing.assert_allclose(
        grad[..., axis], np.broadcast_to(k * np.cos(k * x), pm.Nmesh), atol=tol * k
    )
    for other in {0, 1, 2} - {axis}:
        np.testing.assert_allclose(grad[..., other], 0.0, atol=1e-12)


def _numpy_fd_gradient(f, cells, order):
    # test-only: the central differences written from their coefficients (LDL's 4th order,
    # JERALD's 6th order, model.md), by np.roll
    c = {4: [(1, 8 / 12), (2, -1 / 12)], 6: [(1, 45 / 60), (2, -9 / 60), (3, 1 / 60)]}[order]
    return np.stack(
        [
            sum(w * (np.roll(f, -n, a) - np.roll(f, n, a)) for n, w in c) / h
            for a, h in enumerate(cells)
        ],
        axis=-1,
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("order", [4, 6])
@pytest.mark.parametrize(
    "nmesh", [(12, 10, 14), (4, 5, 3)]
)  # (4, 5, 3): stencils wider than the box
def test_gradient_mesh_real_space_matches_stencil_and_fourier(order, kernel, nmesh):
    # the JAX engine's real-space gradient against (a) the stencil written with numpy and (b) the
    # Fourier factor of ParticleMesh.gradient_mesh (3 inverse FFTs), on an anisotropic random mesh
    pm = JaxEngine(nmesh, (30.0, 40.0, 21.0), dtype="f8", kernel=kernel)
    rng = np.random.default_rng(11)
    f = rng.normal(size=pm.Nmesh)
    fk = pm.r2c(jnp.asarray(f))
    got = np.asarray(pm.gradient_mesh(fk, order))
    np.testing.assert_allclose(
        got, _numpy_fd_gradient(f, pm.cellsize, order), rtol=1e-12, atol=1e-12
    )
    via_fourier = np.asarray(ParticleMesh.gradient_mesh(pm, fk, order))
    np.testing.assert_allclose(got, via_fourier, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("order", [4, 6, "exact"])
def test_gradient_mesh_adjoint_identity(order, kernel):
    # <G f, g> = <f, G^T g> with G^T from JAX's VJP (the real-space stencil has a hand-written
    # adjoint): in float64 to rounding, on a real mesh f (through r2c, whose own transpose is
    # checked above)
    pm = JaxEngine((12, 10, 14), (30.0, 40.0, 21.0), dtype="f8", kernel=kernel)
    rng = np.random.default_rng(12)
    f = jnp.asarray(rng.normal(size=pm.Nmesh))
    g = jnp.asarray(rng.normal(size=(*pm.Nmesh, 3)))
    out, vjp = jax.vjp(lambda x: pm.gradient_mesh(pm.r2c(x), order), f)
    (ft,) = vjp(g)
    assert float(jnp.vdot(out, g)) == pytest.approx(float(jnp.vdot(f, ft)), rel=1e-12)
    # and the transpose equals the numpy stencil's own transpose, -sum_i D_i g_i, for 4 and 6
    if order != "exact":
        expect = -sum(
            _numpy_fd_gradient(np.asarray(g[..., a]), pm.cellsize, order)[..., a] for a in range(3)
        )
        np.testing.assert_allclose(ft, expect, rtol=1e-10, atol=1e-10)


def test_gradient_kernels_tend_to_ik():
    k = np.linspace(1e-4, 0.05, 20)
    for order in (4, 6, "exact"):
        d = fourier.gradient_kernel(k, 1.0, order=order)
        np.testing.assert_allclose(d.imag, k, rtol=1e-4)
        assert np.all(d.real == 0)


def test_readout_interpolates_linearly():
    # Readout of a field linear in x (within one period) between two cell centres is linear.
    pm = JaxEngine((8, 4, 4), (8.0, 4.0, 4.0), dtype="f8")
    f = np.broadcast_to(np.arange(8.0).reshape(-1, 1, 1), pm.Nmesh)
    x = np.array([[2.0, 1.0, 1.0], [2.3, 1.5, 2.5], [5.75, 0.2, 3.9]])
    np.testing.assert_allclose(pm.readout(f, x), [2.0, 2.3, 5.75], rtol=1e-14)


def test_paint_and_readout_inside_jit():
    pm = JaxEngine(16, 20.0, dtype="f4")
    pos = random_particles(1000, 20.0, dtype=np.float32)
    pos = pos[away_from_faces(pos, pm, 1e-2)]

    @jax.jit
    def f(x):
        return jnp.sum(pm.readout(pm.density(x), x))

    val = f(jnp.asarray(pos))
    assert val.dtype == jnp.float32
    assert float(val) == pytest.approx(float(jnp.sum(pm.readout(pm.density(pos), pos))), rel=1e-6)
    # the jitted float32 gradient (both paths: paint's and readout's position cotangents) against
    # a float64 central difference along a random direction
    grad = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(pos)), np.float64)
    pm8 = JaxEngine(16, 20.0, dtype="f8")
    x8 = pos.astype(np.float64)
    d = np.random.default_rng(8).normal(size=x8.shape)
    h = 1e-5  # Mpc/h: the particles stay >= 1e-2 cells (0.0125 Mpc/h) from every face

    def f8(x):
        return float(jnp.sum(pm8.readout(pm8.density(x), x)))

    fd = (f8(x8 + h * d) - f8(x8 - h * d)) / (2 * h)
    assert np.vdot(grad, d) == pytest.approx(fd, rel=1e-3)


def test_bad_inputs():
    pm = JaxEngine(8, 10.0)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        pm.paint(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="3 entries for 5 particles"):
        pm.paint(np.zeros((5, 3)), np.ones(3))
    with pytest.raises(ValueError, match="Nmesh"):
        pm.readout(np.zeros((4, 4, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="BoxSize must be positive"):
        JaxEngine(8, -1.0)
    with pytest.raises(ValueError, match="kernel"):
        JaxEngine(8, 1.0, kernel="gpu")


def test_scalar_mass_paints_like_a_constant_array():
    pm = JaxEngine(8, 10.0, dtype="f8")
    pos = random_particles(100, 10.0)
    np.testing.assert_allclose(pm.paint(pos, 2.5), pm.paint(pos, np.full(100, 2.5)), rtol=1e-14)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_shared_row_of_weights_is_every_particles_row(kernel):
    """Unit masses are painted from one (1, C) row of weights (no (N, 1) array of ones in the
    step): paint, the position gradient of paint and of a weighted readout, and the gradient of
    the shared row itself (the sum over particles) equal those of the (N, C) row-per-particle
    weights, on both kernels (float64, 1e-12)."""
    from jerald_nbk.pm.jax_backend import cic_paint, cic_readout

    pm = JaxEngine(8, 10.0, dtype="f8", kernel=kernel)
    pos = jnp.asarray(random_particles(500, 10.0, seed=3))
    row = jnp.asarray([[0.7, -1.3]])
    full = jnp.broadcast_to(row, (500, 2)) + 0.0  # a real (N, 2) array
    cfg = pm._cfg
    np.testing.assert_allclose(cic_paint(pos, row, cfg), cic_paint(pos, full, cfg), rtol=1e-12)
    mesh = jnp.asarray(np.random.default_rng(4).random((8, 8, 8, 2)))

    def loss(x, w):
        return jnp.sum(cic_paint(x, w, cfg) * mesh) + jnp.sum(cic_readout(mesh, x, cfg) * w)

    g_row = jax.grad(loss, argnums=(0, 1))(pos, row)
    g_full = jax.grad(loss, argnums=(0, 1))(pos, full)
    np.testing.assert_allclose(g_row[0], g_full[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g_row[1], g_full[1].sum(axis=0, keepdims=True), rtol=1e-12)
    # the engine's unit-mass paint and density are those of explicit unit masses
    ones = jnp.ones(500)
    np.testing.assert_allclose(pm.paint(pos), pm.paint(pos, ones), rtol=1e-12)
    d_unit = jax.grad(lambda x: jnp.sum(pm.paint(x) * mesh[..., 0]))(pos)
    d_ones = jax.grad(lambda x: jnp.sum(pm.paint(x, ones) * mesh[..., 0]))(pos)
    np.testing.assert_allclose(d_unit, d_ones, rtol=1e-12, atol=1e-12)


def test_first_release_engine_names_still_import_with_a_warning():
    import jerald_nbk
    from jerald_nbk import pm as pm_pkg

    with pytest.warns(DeprecationWarning, match="renamed JaxEngine"):
        old = pm_pkg.JaxPM
    assert old is pm_pkg.JaxEngine
    with pytest.warns(DeprecationWarning, match="renamed JaxEngine"):
        assert jerald_nbk.JaxPM is pm_pkg.JaxEngine
    with pytest.warns(DeprecationWarning, match="renamed PmeshEngine"):
        assert pm_pkg.PmeshPM is pm_pkg.PmeshEngine
