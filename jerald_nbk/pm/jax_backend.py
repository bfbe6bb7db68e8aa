"""Single-process particle mesh in JAX: C++ CIC kernels via XLA FFI on CPU, pure JAX elsewhere.

The CIC operations carry hand-written VJPs (what is gathered from what is written next to each);
FFTs use ``jnp.fft`` whose own transposes are exact, wrapped in the normalisation of
:mod:`jerald_nbk.pm.fourier`.

Two kernels implement CIC:

* ``"cpp"``: ``src_cpp/cic.cpp`` through ``jax.ffi.ffi_call`` (CPU only); OpenMP threads,
  deterministic whatever the thread count.
* ``"jax"``: scatter-add / gather in pure JAX, over chunks of particles under ``lax.scan`` so that
  the (chunk, 8) index and weight arrays bound the memory. Runs on any device; the parity reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from . import fourier
from .base import ParticleMesh
from .remat import recompute_in_backward, tied_to

try:  # the extension is optional at import time so that GPU-only installs still work
    from .. import _cic
except ImportError:  # pragma: no cover - exercised only without the built extension
    _cic = None

_REGISTERED = False


def _register_ffi() -> bool:
    global _REGISTERED
    if _cic is None:
        return False
    if not _REGISTERED:
        for name, capsule in _cic.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        _REGISTERED = True
    return True


def set_num_threads(n: int) -> None:
    """Threads used by the C++ CIC kernels (0: OpenMP's default, i.e. ``OMP_NUM_THREADS``)."""
    if _cic is None:
        raise RuntimeError("the C++ extension jerald_nbk._cic is not built")
    _cic.set_num_threads(int(n))


def num_threads() -> int:
    """Threads used by the C++ CIC kernels (1 when the extension is missing)."""
    return 1 if _cic is None else int(_cic.max_threads())


#: the pure-JAX kernels' particles per chunk on a CPU and on an accelerator (:class:`JaxEngine`)
CPU_CHUNK = 1 << 18
GPU_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class CICConfig:
    """Static configuration of the CIC operations (hashable: a nondiff argument of custom_vjp)."""

    shape: tuple[int, int, int]
    scale: tuple[float, float, float]  # Nmesh / BoxSize per axis
    kernel: str  # "cpp" or "jax"
    chunk: int = 1 << 18


# ---------------------------------------------------------------------------------------------
# Kernel implementations: (N,3) positions, (N,C) weights, (Nx,Ny,Nz,C) meshes. Weights (and the
# position gradient's cotangent) may also be one (1, C) row shared by every particle: the C++
# kernels read it in place, so unit masses need no (N, 1) array of ones in a compiled step.


def _per_particle(a, n):
    """``a`` with one row per particle: a shared (1, C) row broadcast to (n, C)."""
    return jnp.broadcast_to(a, (n, a.shape[1])) if a.shape[0] == 1 and n != 1 else a


def _ffi_attrs(cfg: CICConfig) -> dict:
    return {k: np.float64(s) for k, s in zip(("sx", "sy", "sz"), cfg.scale, strict=True)}


def _corners(pos, cfg: CICConfig):
    """Flat cell indices (n, 8) and per-axis weights/derivative signs of the 8 CIC corners."""
    scale = jnp.asarray(cfg.scale, dtype=pos.dtype)
    u = pos * scale
    fl = jnp.floor(u)
    f = u - fl
    n = jnp.asarray(cfg.shape, dtype=jnp.int32)
    i0 = jnp.mod(fl.astype(jnp.int32), n)
    off = jnp.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=jnp.int32)
    idx = jnp.mod(i0[:, None, :] + off[None], n)  # (n, 8, 3)
    flat = (idx[..., 0] * cfg.shape[1] + idx[..., 1]) * cfg.shape[2] + idx[..., 2]
    w1 = jnp.where(off[None] == 1, f[:, None, :], 1 - f[:, None, :])  # (n, 8, 3)
    return flat, w1, off


def _chunked(arrays, chunk):
    """Pad the particle axis to a multiple of ``chunk`` (with zeros) and split it into chunks."""
    n = arrays[0].shape[0]
    nchunk = max(1, -(-n // chunk))
    size = min(chunk, n) if nchunk == 1 else chunk
    pad = nchunk * size - n
    out = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    return [a.reshape((nchunk, size) + a.shape[1:]) for a in out], n


def _paint_impl(pos, w, cfg: CICConfig):
    nch = w.shape[1]
    if cfg.kernel == "cpp":
        out = jax.ShapeDtypeStruct(cfg.shape + (nch,), pos.dtype)
        return jax.ffi.ffi_call("jerald_cic_paint", out)(pos, w, **_ffi_attrs(cfg))
    w = _per_particle(w, pos.shape[0])
    (pc, wc), _ = _chunked([pos, w], cfg.chunk)  # padded particles carry zero weight

    def body(mesh, xs):
        p, ww = xs
        flat, w1, _ = _corners(p, cfg)
        k = jnp.prod(w1, axis=-1)  # (n, 8)
        vals = k[..., None] * ww[:, None, :]
        return mesh.at[flat.reshape(-1)].add(vals.reshape(-1, nch)), None

    mesh0 = jnp.zeros((int(np.prod(cfg.shape)), nch), pos.dtype)
    mesh, _ = jax.lax.scan(body, mesh0, (pc, wc))
    return mesh.reshape(cfg.shape + (nch,))


def _readout_impl(mesh, pos, cfg: CICConfig):
    nch = mesh.shape[-1]
    if cfg.kernel == "cpp":
        out = jax.ShapeDtypeStruct((pos.shape[0], nch), pos.dtype)
        return jax.ffi.ffi_call("jerald_cic_readout", out)(mesh, pos, **_ffi_attrs(cfg))
    (pc,), n = _chunked([pos], cfg.chunk)
    flat_mesh = mesh.reshape(-1, nch)

    def body(_, p):
        flat, w1, _ = _corners(p, cfg)
        k = jnp.prod(w1, axis=-1)
        return None, jnp.einsum("nk,nkc->nc", k, flat_mesh[flat])

    _, vals = jax.lax.scan(body, None, pc)
    return vals.reshape(-1, nch)[:n]


def _readout_vjp_pos_impl(mesh, pos, g, cfg: CICConfig):
    """``out[p, d] = sum_c g[p, c] d/dx_d readout(mesh[..., c])(x_p)``."""
    if cfg.kernel == "cpp":
        out = jax.ShapeDtypeStruct((pos.shape[0], 3), pos.dtype)
        return jax.ffi.ffi_call("jerald_cic_readout_vjp_pos", out)(mesh, pos, g, **_ffi_attrs(cfg))
    nch = mesh.shape[-1]
    (pc, gc), n = _chunked([pos, _per_particle(g, pos.shape[0])], cfg.chunk)
    flat_mesh = mesh.reshape(-1, nch)
    scale = jnp.asarray(cfg.scale, dtype=pos.dtype)

    def body(_, xs):
        p, gg = xs
        flat, w1, off = _corners(p, cfg)
        v = jnp.einsum("nkc,nc->nk", flat_mesh[flat], gg)  # (n, 8)
        sign = jnp.where(off == 1, 1.0, -1.0).astype(p.dtype)  # (8, 3)
        grads = []
        for d in range(3):
            others = [w1[..., e] for e in range(3) if e != d]
            grads.append(jnp.sum(v * sign[None, :, d] * others[0] * others[1], axis=1))
        return None, jnp.stack(grads, axis=-1) * scale

    _, out = jax.lax.scan(body, None, (pc, gc))
    return out.reshape(-1, 3)[:n]


# ---------------------------------------------------------------------------------------------
# Differentiable operations.


# The VJPs use symbolic zeros: the forward rule learns which inputs carry a derivative
# (``.perturbed``) and the backward rule skips the kernels whose cotangent nobody needs. In a JERALD
# layer the input positions are constants of the parameters, so the position cotangents of the
# first readout would otherwise cost a full kernel pass for nothing.


def _zero_if(flag, make):
    return make() if flag else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cic_paint(pos, w, cfg: CICConfig):
    """Paint (N, C) weights at (N, 3) positions onto an (Nx, Ny, Nz, C) mesh."""
    return _paint_impl(pos, w, cfg)


def _cic_paint_fwd(pos, w, cfg):
    out = _paint_impl(pos.value, w.value, cfg)
    return out, (pos.value, w.value, pos.perturbed, w.perturbed)


def _cic_paint_bwd(cfg, res, ct):
    # Weights: the cotangent mesh read out at the particles (paint is linear in w).
    # Positions: w_p times the gradient of the cotangent mesh interpolated at x_p.
    pos, w, d_pos, d_w = res
    if isinstance(ct, SymbolicZero):
        return None, None
    ct = ct.astype(pos.dtype)

    def w_bar():
        vals = _readout_impl(ct, pos, cfg)
        return vals.sum(axis=0, keepdims=True) if w.shape[0] != vals.shape[0] else vals

    return (
        _zero_if(d_pos, lambda: _readout_vjp_pos_impl(ct, pos, w, cfg)),
        _zero_if(d_w, w_bar),
    )


cic_paint.defvjp(_cic_paint_fwd, _cic_paint_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cic_readout(mesh, pos, cfg: CICConfig):
    """Interpolate an (Nx, Ny, Nz, C) mesh at (N, 3) positions: (N, C)."""
    return _readout_impl(mesh, pos, cfg)


def _cic_readout_fwd(mesh, pos, cfg):
    out = _readout_impl(mesh.value, pos.value, cfg)
    return out, (mesh.value, pos.value, mesh.perturbed, pos.perturbed)


def _cic_readout_bwd(cfg, res, ct):
    # Mesh: the cotangents painted back at the particles (paint is readout's adjoint).
    # Positions: the cotangent-weighted gradient of the interpolated mesh.
    mesh, pos, d_mesh, d_pos = res
    if isinstance(ct, SymbolicZero):
        return None, None
    ct = ct.astype(pos.dtype)
    return (
        _zero_if(d_mesh, lambda: _paint_impl(pos, ct, cfg)),
        _zero_if(d_pos, lambda: _readout_vjp_pos_impl(mesh, pos, ct, cfg)),
    )


cic_readout.defvjp(_cic_readout_fwd, _cic_readout_bwd, symbolic_zeros=True)


def _fd_apply(x, cells, order, kernel, adjoint):
    """The real-space gradient stencil (``adjoint``: its adjoint, ``-sum_i D_i x_i``)."""
    if kernel == "cpp":
        weights = fourier.FD_WEIGHTS[order]
        attrs = {f"h{ax}": np.float64(h) for ax, h in zip("xyz", cells, strict=True)}
        attrs |= {f"c{t + 1}": np.float64(c) for t, c in enumerate((weights + (0.0,) * 3)[:3])}
        attrs["taps"] = np.int64(len(weights))
        shape = x.shape[:3] if adjoint else x.shape + (3,)
        target = "jerald_fd_gradient_adjoint" if adjoint else "jerald_fd_gradient"
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, x.dtype))(x, **attrs)
    if adjoint:
        adj = sum(
            fourier.fd_derivative(x[..., a], a, h, order, xp=jnp) for a, h in enumerate(cells)
        )
        return (-adj).astype(x.dtype)
    return fourier.fd_gradient(x, cells, order, xp=jnp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _fd_gradient(f, cells, order, kernel):
    """:func:`fourier.fd_gradient` with its adjoint written as a stencil too (``_fd_apply``).

    The C++ kernels take each in one pass over the mesh. In jax.numpy, the shifts along the last
    axis are slices of one padded copy (:func:`fourier.fd_derivative`); differentiated by JAX, they
    would transpose into one zero-padded mesh per term (six at order 6) before being summed.
    """
    return _fd_apply(f, cells, order, kernel, adjoint=False)


def _fd_gradient_fwd(f, cells, order, kernel):
    return _fd_gradient(f, cells, order, kernel), None


def _fd_gradient_bwd(cells, order, kernel, _, ct):
    return (_fd_apply(ct, cells, order, kernel, adjoint=True),)


_fd_gradient.defvjp(_fd_gradient_fwd, _fd_gradient_bwd)


def _readout_fd_gradient_impl(cells, order, cfg, phi, pos):
    return cic_readout(_fd_gradient(phi, cells, order, cfg.kernel), pos, cfg)


#: ``_readout_fd_gradient(cells, order, cfg, phi, pos)``: the real-space gradient of ``phi`` read
#: out at ``pos``, (N, 3). Its backward pass keeps ``phi`` (one channel) instead of the 3-channel
#: gradient mesh and recomputes the stencil from it once the cotangent is known (:mod:`remat`).
#: Only ``phi`` is tied to the cotangent: a tied copy of the positions would be one more (N, 3)
#: array.
_readout_fd_gradient = recompute_in_backward(
    _readout_fd_gradient_impl, nondiff_argnums=(0, 1, 2), tied=(True, False)
)


def _displace_impl(grad, pos, cfg: CICConfig):
    """``pos + readout(grad, pos)`` for a 3-channel ``grad``: one pass of the C++ kernel."""
    if cfg.kernel == "cpp":
        out = jax.ShapeDtypeStruct(pos.shape, pos.dtype)
        return jax.ffi.ffi_call("jerald_cic_displace", out)(grad, pos, **_ffi_attrs(cfg))
    return pos + _readout_impl(grad, pos, cfg)


def _displace_vjp_impl(grad, unit, pos, ct, cfg: CICConfig):
    """``ct + ct . grad readout(grad) + grad readout(unit)`` at ``pos``: one pass in C++.

    ``unit`` (Nx, Ny, Nz, 1) is the cotangent of a unit-mass paint at ``pos``, ``grad``
    (Nx, Ny, Nz, 3) the mesh read out at ``pos`` and ``ct`` (N, 3) the cotangent of the result.
    """
    if cfg.kernel == "cpp":
        out = jax.ShapeDtypeStruct(pos.shape, pos.dtype)
        call = jax.ffi.ffi_call("jerald_cic_displace_vjp", out)
        return call(grad, unit, pos, ct, **_ffi_attrs(cfg))
    ones = jnp.ones((1, 1), pos.dtype)
    return (
        ct + _readout_vjp_pos_impl(grad, pos, ct, cfg) + _readout_vjp_pos_impl(unit, pos, ones, cfg)
    )


# A whole displacement layer (ParticleMesh.displace) as one differentiable operation, so that its
# backward pass can take the position cotangent's three terms (the layer's identity, the gradient
# readout's and the density paint's, all at the same positions) in one particle pass instead of
# two passes and a sum of three (N, 3) arrays. The gradient mesh is not kept: the backward pass
# recomputes it from the potential once the source's backward pass is done (remat.tied_to), so
# the 3-channel mesh is never alive together with the source's intermediates. ``painted`` (``rho``
# None): the layer paints the density of ``pos`` itself; else ``rho`` is an input of its own.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _displace(pm, source, order, painted, pos, rho, args):
    return _displace_fwd(pm, source, order, painted, pos, rho, args)[0]


def _density_norm(pm, pos):
    return pm.ncells / pos.shape[0]  # ParticleMesh.density: paint x ncells / N


def _displace_fwd(pm, source, order, painted, pos, rho, args):
    cfg = pm._cfg
    if painted:
        rho = _paint_impl(pos, jnp.ones((1, 1), pos.dtype), cfg)[..., 0] * _density_norm(pm, pos)
    phik, source_vjp = jax.vjp(source, rho, *args)
    phi = pm.c2r(phik)
    grad = _fd_apply(phi, pm._cells, order, cfg.kernel, adjoint=False)
    return _displace_impl(grad, pos, cfg), (pos, phi, source_vjp)


def _displace_bwd(pm, source, order, painted, res, ct):
    pos, phi, source_vjp = res
    cfg = pm._cfg
    ct = ct.astype(pos.dtype)
    # the potential's cotangent: the readout's adjoint (paint), the stencil's, the c2r's
    phi_ct = _fd_apply(_paint_impl(pos, ct, cfg), pm._cells, order, cfg.kernel, adjoint=True)
    (phik_ct,) = jax.linear_transpose(pm.c2r, jax.eval_shape(pm.r2c, phi))(phi_ct)
    rho_ct, *args_ct = source_vjp(phik_ct)
    (phi,) = tied_to(rho_ct, phi)  # the gradient mesh only once the source's backward pass is done
    grad = _fd_apply(phi, pm._cells, order, cfg.kernel, adjoint=False)
    if not painted:
        return ct + _readout_vjp_pos_impl(grad, pos, ct, cfg), rho_ct, tuple(args_ct)
    unit = (rho_ct * _density_norm(pm, pos)).astype(pos.dtype)[..., None]
    return _displace_vjp_impl(grad, unit, pos, ct, cfg), None, tuple(args_ct)


_displace.defvjp(_displace_fwd, _displace_bwd)


class JaxEngine(ParticleMesh):
    """Single-process particle mesh on JAX (CPU or GPU).

    Parameters
    ----------
    Nmesh, BoxSize, dtype
        See :class:`~jerald_nbk.pm.base.ParticleMesh`.
    kernel : {"auto", "cpp", "jax"}
        CIC implementation: the C++ FFI kernels (CPU only), pure JAX scatter/gather, or the C++
        kernels when the default device is a CPU and the extension is built.
    chunk : int or None
        Particles per chunk of the pure-JAX kernel (bounds its temporary memory). ``None``:
        :data:`GPU_CHUNK` on a GPU (the fastest of 2^18, 2^22 and 2^24 for a 256^3 step on an
        H200, ``benchmarks/results/gpu.json``: 8.5 ms against 11.4 ms at 2^18), else
        :data:`CPU_CHUNK` (the CPU's kernels are the C++ ones; the pure-JAX path is its parity
        check, where a small chunk keeps the temporaries small).

    Examples
    --------
    >>> pm = JaxEngine(32, 100.0)
    >>> pos = jax.random.uniform(jax.random.key(0), (1000, 3)) * 100.0
    >>> delta = pm.density(pos)          # 1 + delta, mean 1
    >>> dk = pm.r2c(delta)               # k = 0 mode == mean == 1
    """

    name = "jax"

    def __init__(self, Nmesh, BoxSize, dtype="f4", kernel="auto", chunk=None):
        super().__init__(Nmesh, BoxSize, dtype)
        if chunk is None:
            chunk = CPU_CHUNK if jax.default_backend() == "cpu" else GPU_CHUNK
        if kernel == "auto":
            kernel = "cpp" if jax.default_backend() == "cpu" and _register_ffi() else "jax"
        elif kernel == "cpp":
            if not _register_ffi():
                raise RuntimeError(
                    "kernel='cpp' needs the C++ extension jerald_nbk._cic (make install)"
                )
            if jax.default_backend() != "cpu":
                raise RuntimeError(
                    f"kernel='cpp' runs on the CPU only; the default JAX device is "
                    f"{jax.default_backend()!r}: use kernel='jax'"
                )
        elif kernel != "jax":
            raise ValueError(f"kernel must be 'auto', 'cpp' or 'jax', got {kernel!r}")
        self.kernel = kernel
        scale = tuple(float(n / b) for n, b in zip(self.Nmesh, self.BoxSize, strict=True))
        self._cfg = CICConfig(self.Nmesh, scale, kernel, int(chunk))
        self._cells = tuple(float(h) for h in self.cellsize)  # of the gradient stencil (hashable)
        self._kvec = tuple(
            jnp.asarray(k) for k in fourier.kvectors(self.Nmesh, self.BoxSize, self.dtype)
        )

    def kvec(self):
        return self._kvec

    def static_key(self):
        """``(class, Nmesh, BoxSize, dtype, CIC configuration)``: see :meth:`ParticleMesh.static_key`."""
        return (type(self), self.Nmesh, tuple(self.BoxSize.tolist()), self.dtype.str, self._cfg)

    def mesh_index(self):
        nx, ny, nz = self.Nmesh
        return (
            jnp.arange(nx).reshape(-1, 1, 1),
            jnp.arange(ny).reshape(1, -1, 1),
            jnp.arange(nz).reshape(1, 1, -1),
        )

    def _as_pos(self, pos):
        pos = jnp.asarray(pos)
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise ValueError(f"positions must have shape (N, 3), got {pos.shape}")
        return pos.astype(self.dtype)

    def paint(self, pos, mass=None):
        pos = self._as_pos(pos)
        # unit masses: one shared row of weights (no (N, 1) array of ones in a compiled step)
        w = jnp.ones((1, 1), self.dtype) if mass is None else self._weights(pos, mass)
        mesh = cic_paint(pos, w, self._cfg)
        return mesh[..., 0] if mass is None or jnp.ndim(mass) <= 1 else mesh

    def readout(self, mesh, pos):
        pos = self._as_pos(pos)
        mesh = jnp.asarray(mesh).astype(self.dtype)
        single = mesh.ndim == 3
        if mesh.shape[:3] != self.Nmesh:
            raise ValueError(f"mesh shape {mesh.shape[:3]} != Nmesh {self.Nmesh}")
        vals = cic_readout(mesh[..., None] if single else mesh, pos, self._cfg)
        return vals[:, 0] if single else vals

    def r2c(self, mesh):
        return jnp.fft.rfftn(mesh, axes=(0, 1, 2)) * fourier.r2c_scale(self.ncells)

    def c2r(self, cmesh):
        out = jnp.fft.irfftn(cmesh, s=self.Nmesh, axes=(0, 1, 2)) * fourier.c2r_scale(self.ncells)
        return out.astype(self.dtype)

    def gradient_mesh(self, phik, order=6):
        """See :meth:`ParticleMesh.gradient_mesh`; orders 4 and 6 in real space.

        One inverse FFT and the stencil of :func:`fourier.fd_derivative` per axis instead of three
        inverse FFTs (and, in the backward pass, one forward FFT instead of three): the two are
        the same linear map, since the Fourier factor is the stencil's transform.
        """
        if order not in fourier.FD_WEIGHTS:
            return super().gradient_mesh(phik, order)
        return _fd_gradient(self.c2r(phik), self._cells, order, self.kernel)

    def readout_gradient(self, phik, pos, order=6):
        """See :meth:`ParticleMesh.readout_gradient`; orders 4 and 6 in real space.

        The backward pass keeps the potential (one channel) instead of its 3-channel gradient
        and recomputes the stencil once the cotangent is known.
        """
        if order not in fourier.FD_WEIGHTS:
            return super().readout_gradient(phik, pos, order)
        phi = self.c2r(phik)
        return _readout_fd_gradient(self._cells, order, self._cfg, phi, self._as_pos(pos))

    def displace(self, pos, source, args=(), order=6, density=None):
        """See :meth:`ParticleMesh.displace`; its backward pass in one particle pass.

        The position cotangent of the paint, of the gradient readout and of ``pos`` itself is one
        pass of the C++ kernel (``jerald_cic_displace_vjp``) instead of two and a sum of three
        (N, 3) arrays; the forward pass adds the readout to ``pos`` in the same pass. Neither the
        gradient mesh nor the source's intermediates are kept for the backward pass. With
        ``density`` given, its cotangent is returned to whoever painted it (a training step's
        first layer, whose positions are constants, paints them once). With the exact gradient,
        the composition of :meth:`ParticleMesh.displace`.
        """
        if order not in fourier.FD_WEIGHTS:
            return super().displace(pos, source, args, order, density)
        rho = None if density is None else jnp.asarray(density).astype(self.dtype)
        return _displace(self, source, order, rho is None, self._as_pos(pos), rho, tuple(args))

    def describe(self):
        return super().describe() | {"kernel": self.kernel, "threads": num_threads()}
