"""MPI particle mesh on pmesh: each rank holds its own particles and one slab of the mesh.

Every operation is a ``jax.custom_vjp`` whose forward and backward rules call pmesh through
``jax.pure_callback`` (numpy in, numpy out). pmesh does the work and the communication:

* paint / readout route the particles to the ranks whose slab their CIC window touches with a
  *layout* (``pm.decompose(pos, smoothing=1 cell)``; ``layout.exchange`` sends positions and weights,
  ``layout.gather(..., mode="sum")`` adds the ghosts' partial results back on the owning rank);
* the FFTs are pfft's, in pmesh's normalisation which is also ours (:mod:`jerald_nbk.pm.fourier`).

What each backward rule gathers from what is written next to it. The callbacks hold MPI
collectives, so every rank must run them in the same order: the engine runs eagerly
(:meth:`PmeshEngine.jit` does not compile) and each callback's result is waited for before the next
operation is dispatched (see the JAX note in the engineering notes).

Layouts are expensive (a sort and an all-to-all of the particles) and belong to one set of
positions, so they are cached under a hash of the positions' bytes; a cached layout is used only if
every rank has it, because ``decompose`` is collective.
"""

from __future__ import annotations

import collections
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from ..utils import fault_point
from . import fourier
from .base import ParticleMesh

#: half-width of the CIC window in cells: the ghost margin of a layout (pmesh's ``0.5 * support``)
_CIC_SMOOTHING = 1.0


def _wait(tree):
    """Block until the concrete arrays of ``tree`` are computed (no-op on tracers).

    An eager callback that holds MPI collectives must finish before the next one (or a direct MPI
    call such as :meth:`PmeshEngine.count`) starts, whatever JAX's dispatch does.
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        if not isinstance(leaf, jax.core.Tracer):
            leaf.block_until_ready()
    return tree


_TOKEN = jax.ShapeDtypeStruct((1,), np.int8)


def _callback(fn, result_shape, *args):
    """``jax.pure_callback`` followed by :func:`_wait`, on every rank whatever its particle count.

    XLA replaces an operation whose outputs are all empty by a constant, so a rank holding no
    particles would skip a readout callback, and with it the collectives the other ranks wait in.
    A one-element token output keeps every callback alive.
    """

    def with_token(*a):
        return fn(*a), np.zeros(1, np.int8)

    out, _ = jax.pure_callback(with_token, (result_shape, _TOKEN), *args)
    return _wait(out)


# ---------------------------------------------------------------------------------------------
# Differentiable operations. ``eng`` (a PmeshEngine) is a static argument; meshes carry a trailing
# channel axis, particle weights are (N, C).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _paint(eng, pos, w):
    """Paint (N, C) weights at local (N, 3) positions onto the local (..., C) slab."""
    shape = jax.ShapeDtypeStruct(eng.local_real_shape + (w.shape[1],), eng.dtype)
    return _callback(eng._np_paint, shape, pos, w)


def _paint_fwd(eng, pos, w):
    return _paint(eng, pos, w), (pos, w)


def _paint_bwd(eng, res, ct):
    # Weights: the cotangent mesh read out at the particles (paint is linear in w).
    # Positions: w_p times the gradient of the cotangent mesh interpolated at x_p.
    # One callback, one exchange of (pos, w) and one gather of both results.
    pos, w = res
    shapes = (
        jax.ShapeDtypeStruct(w.shape, eng.dtype),
        jax.ShapeDtypeStruct(pos.shape, eng.dtype),
    )
    w_bar, pos_bar = _callback(eng._np_readout_and_grad, shapes, ct.astype(eng.dtype), pos, w)
    return pos_bar, w_bar


_paint.defvjp(_paint_fwd, _paint_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _readout(eng, mesh, pos):
    """Interpolate the local (..., C) slab at local (N, 3) positions: (N, C)."""
    shape = jax.ShapeDtypeStruct((pos.shape[0], mesh.shape[-1]), eng.dtype)
    return _callback(eng._np_readout, shape, mesh, pos)


def _readout_fwd(eng, mesh, pos):
    return _readout(eng, mesh, pos), (mesh, pos)


def _readout_bwd(eng, res, ct):
    # Mesh: the cotangents painted back at the particles (paint is readout's adjoint).
    # Positions: the cotangent-weighted gradient of the interpolated mesh.
    mesh, pos = res
    shapes = (
        jax.ShapeDtypeStruct(mesh.shape, eng.dtype),
        jax.ShapeDtypeStruct(pos.shape, eng.dtype),
    )
    mesh_bar, pos_bar = _callback(eng._np_paint_and_grad, shapes, mesh, pos, ct.astype(eng.dtype))
    return mesh_bar, pos_bar


_readout.defvjp(_readout_fwd, _readout_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _r2c(eng, mesh):
    """Forward FFT / ncells of the local (..., C) real slab: the local (..., C) complex slab."""
    shape = jax.ShapeDtypeStruct(eng.local_complex_shape + (mesh.shape[-1],), eng.complex_dtype)
    return _callback(eng._np_r2c, shape, mesh)


def _r2c_fwd(eng, mesh):
    return _r2c(eng, mesh), None


def _r2c_bwd(eng, _, ct):
    # x_bar(x) = Re sum_{k in half layout} ct_k e^{-ikx} / N: pmesh's ``r2c_vjp`` (c2r / N) of
    # conj(ct) / w, where the inverse rfft counts each stored mode w = 2 times except the planes
    # k_z = 0 and Nyquist (w = 1); see _np_r2c_vjp.
    shape = jax.ShapeDtypeStruct(eng.local_real_shape + (ct.shape[-1],), eng.dtype)
    return (_callback(eng._np_r2c_vjp, shape, ct.astype(eng.complex_dtype)),)


_r2c.defvjp(_r2c_fwd, _r2c_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _c2r(eng, cmesh):
    """Inverse FFT (not divided) of the local (..., C) complex slab: the local real slab."""
    shape = jax.ShapeDtypeStruct(eng.local_real_shape + (cmesh.shape[-1],), eng.dtype)
    return _callback(eng._np_c2r, shape, cmesh)


def _c2r_fwd(eng, cmesh):
    return _c2r(eng, cmesh), None


def _c2r_bwd(eng, _, ct):
    # out(x) = sum_{k in half layout} w_k Re(v_k e^{ikx}), so (JAX's complex cotangent
    # dL/dRe - i dL/dIm) v_bar_k = w_k sum_x g(x) e^{ikx} = w_k conj(pmesh c2r_vjp(g))_k.
    shape = jax.ShapeDtypeStruct(eng.local_complex_shape + (ct.shape[-1],), eng.complex_dtype)
    return (_callback(eng._np_c2r_vjp, shape, ct.astype(eng.dtype)),)


_c2r.defvjp(_c2r_fwd, _c2r_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _allsum(eng, x):
    """Sum of ``x`` over all its elements and all ranks."""
    local = jnp.sum(x)
    return _callback(eng._np_allreduce, jax.ShapeDtypeStruct((), local.dtype), local)


def _allsum_fwd(eng, x):
    return _allsum(eng, x), x


def _allsum_bwd(eng, x, ct):
    # Every rank computes the same loss from the same global sum, so d(loss)/d(x_local) is the
    # cotangent itself: it passes through unchanged (no reduction, or it would count N_ranks times).
    return (jnp.broadcast_to(ct, x.shape).astype(x.dtype),)


_allsum.defvjp(_allsum_fwd, _allsum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _replicated(eng, x):
    """Identity on a value every rank holds (the model parameters)."""
    return x


def _replicated_fwd(eng, x):
    return x, None


def _replicated_bwd(eng, _, ct):
    # Each rank's backward pass only sees the parameter's uses on its own particles and slab: the
    # gradient of the (global) loss is the sum of those partial cotangents over the ranks.
    shape = jax.ShapeDtypeStruct(ct.shape, ct.dtype)
    return (_callback(eng._np_allreduce_array, shape, ct),)


_replicated.defvjp(_replicated_fwd, _replicated_bwd)


class PmeshEngine(ParticleMesh):
    """MPI-distributed particle mesh on pmesh.

    Each rank passes its own particles (any subset of the catalog; positions need not be in the
    slab nor wrapped into the box) and holds the local slab of every mesh: real meshes have shape
    :attr:`local_real_shape` (plus an optional channel axis), complex meshes
    :attr:`local_complex_shape` (the local part of pmesh's transposed rfft layout).
    :meth:`kvec` and :meth:`mesh_index` describe those local layouts.

    Parameters
    ----------
    Nmesh, BoxSize, dtype
        See :class:`~jerald_nbk.pm.base.ParticleMesh`.
    comm : mpi4py.MPI.Comm, optional
        Communicator (default ``MPI.COMM_WORLD``). All ranks of it must call every operation, in
        the same order.
    layout_cache : int
        How many particle layouts (domain decompositions) to keep, least recently used first out.

    Notes
    -----
    Run eagerly: :meth:`jit` returns the function unchanged, because XLA may reorder the callbacks
    that hold MPI collectives. Do not ``vmap`` the operations.

    Examples
    --------
    >>> pm = PmeshEngine(32, 100.0)                  # under mpiexec, on every rank
    >>> mine = catalog[comm.rank::comm.size]     # any split of the particles
    >>> delta = pm.density(mine)                 # local slab of 1 + delta
    >>> pm.sum(delta) / pm.ncells                # 1.0 on every rank
    """

    name = "pmesh"

    def __init__(self, Nmesh, BoxSize, dtype="f4", comm=None, layout_cache=4):
        super().__init__(Nmesh, BoxSize, dtype)
        import pmesh.pm

        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self._comm = comm
        self.pm = pmesh.pm.ParticleMesh(
            Nmesh=list(self.Nmesh), BoxSize=self.BoxSize, dtype=self.dtype, comm=comm
        )
        real = self.pm.create(type="real")
        cplx = self.pm.create(type="complex")
        #: shape of the local slab of a real mesh
        self.local_real_shape = tuple(int(n) for n in real.value.shape)
        #: shape of the local part of a complex mesh
        self.local_complex_shape = tuple(int(n) for n in cplx.value.shape)
        #: complex dtype matching :attr:`dtype`
        self.complex_dtype = np.dtype(cplx.value.dtype)
        self._real_slices = tuple(real.slices)
        self._complex_slices = tuple(cplx.slices)
        self._real_index = tuple(np.asarray(i) for i in real.i)
        cidx = tuple(np.asarray(i) for i in cplx.i)

        # k from the global indices with fourier's own tables rather than pmesh's ``field.x``:
        # pmesh folds index n >= N // 2 to n - N, which is wrong for odd N (n = (N-1)/2 is
        # positive) and gives the last, halved axis a negative Nyquist k (rfftfreq: positive).
        nx, ny, nz = self.Nmesh
        lx, ly, lz = self.BoxSize
        self._kvec = (
            jnp.asarray(fourier.fftfreq_k(nx, lx).astype(self.dtype)[cidx[0]]),
            jnp.asarray(fourier.fftfreq_k(ny, ly).astype(self.dtype)[cidx[1]]),
            jnp.asarray(fourier.rfftfreq_k(nz, lz).astype(self.dtype)[cidx[2]]),
        )
        # times the inverse rfft counts each stored mode (the k_z = 0 and Nyquist planes hold
        # their own conjugates; every other stored mode stands for two)
        iz = cidx[2]
        self._hermitian_weight = np.where((iz == 0) | (2 * iz == nz), 1.0, 2.0).astype(self.dtype)
        self._layouts: collections.OrderedDict = collections.OrderedDict()
        self._layout_cache = int(layout_cache)
        #: number of ``decompose`` calls made (cache misses), for tests and profiling
        self.n_decompose = 0

    # -- geometry -----------------------------------------------------------------------------
    @property
    def comm(self):
        """The MPI communicator."""
        return self._comm

    def kvec(self):
        """k-vector components (h/Mpc) broadcastable to the local complex mesh.

        Returns
        -------
        tuple of 3 JAX arrays, ``k_i = 2 pi n_i / BoxSize_i`` at the global indices of the local
        part of the rfft layout (as :func:`jerald_nbk.pm.fourier.kvectors`).
        """
        return self._kvec

    def mesh_index(self):
        """Global integer cell indices (i, j, l) broadcastable to the local real mesh.

        Returns
        -------
        tuple of 3 int32 JAX arrays.
        """
        return tuple(jnp.asarray(i.astype(np.int32)) for i in self._real_index)

    def local_slices(self, kind="real"):
        """Slices of the global mesh held by this rank.

        Parameters
        ----------
        kind : {"real", "complex"}
            Real mesh or complex (rfft layout) mesh.

        Returns
        -------
        tuple of 3 slices: ``global_mesh[slices]`` is the local part.
        """
        if kind == "real":
            return self._real_slices
        if kind == "complex":
            return self._complex_slices
        raise ValueError(f"kind must be 'real' or 'complex', got {kind!r}")

    def to_local(self, full, kind="real"):
        """The local part of a global mesh (the same global array on every rank).

        Parameters
        ----------
        full : array, shape Nmesh (real) or (Nx, Ny, Nz//2+1) (complex), optional channels
        kind : {"real", "complex"}

        Returns
        -------
        JAX array of the local slab.
        """
        return jnp.asarray(np.asarray(full)[self.local_slices(kind)])

    def to_global(self, local, kind="real"):
        """Assemble the whole mesh on every rank from the local parts (collective).

        Parameters
        ----------
        local : array, the local slab (optional trailing channel axis)
        kind : {"real", "complex"}

        Returns
        -------
        numpy array of the global mesh.
        """
        local = np.asarray(local)
        sl = self.local_slices(kind)
        nx, ny, nz = self.Nmesh
        shape = (nx, ny, nz if kind == "real" else nz // 2 + 1)
        full = np.zeros(shape + local.shape[3:], local.dtype)
        for rsl, part in self._comm.allgather((sl, local)):
            full[rsl] = part
        return full

    # -- numpy kernels (run inside the callbacks; all collective) ------------------------------
    def _layout(self, pos):
        """The cached layout of ``pos`` (None on one rank: every particle is local)."""
        if self._comm.size == 1:
            return None
        from mpi4py import MPI

        key = (pos.shape, pos.dtype.str, hashlib.blake2b(pos.tobytes(), digest_size=16).digest())
        # decompose is collective: use the cache only if every rank has its positions in it
        if self._comm.allreduce(key in self._layouts, op=MPI.LAND):
            self._layouts.move_to_end(key)
            return self._layouts[key]
        layout = self.pm.decompose(pos, smoothing=_CIC_SMOOTHING)
        self.n_decompose += 1
        self._layouts[key] = layout
        while len(self._layouts) > max(self._layout_cache, 1):
            self._layouts.popitem(last=False)
        return layout

    def _route(self, pos, *data):
        """Send positions (and per-particle data) to the ranks whose slab they touch."""
        pos = np.ascontiguousarray(pos, dtype=self.dtype)
        data = tuple(np.ascontiguousarray(d, dtype=self.dtype) for d in data)
        layout = self._layout(pos)
        if layout is None:
            return None, (pos,) + data
        if not data:
            return layout, (layout.exchange(pos),)
        return layout, layout.exchange(pos, *data)

    def _gather(self, layout, values):
        """Sum the ghosts' partial results back onto the particles' own ranks."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if layout is None:
            return values
        return np.asarray(layout.gather(values, mode="sum"), dtype=self.dtype)

    def _field(self, value, kind="real"):
        return self.pm.create(type=kind, value=value)

    def _local_paint(self, lpos, lw, out):
        for c in range(lw.shape[1]):
            out[..., c] = self.pm.paint(lpos, mass=np.ascontiguousarray(lw[:, c])).value
        return out

    def _local_grad(self, mesh, lpos, lg):
        """``sum_c g[p, c] d/dx readout(mesh[..., c])(x_p)`` over the local slab: (M, 3)."""
        grad = np.zeros((lpos.shape[0], 3), self.dtype)
        for c in range(mesh.shape[-1]):
            field = self._field(mesh[..., c])
            for d in range(3):
                # pmesh applies the affine scale: d/dx in 1/(Mpc/h), like readout_gradient
                grad[:, d] += field.readout(lpos, gradient=d) * lg[:, c]
        return grad

    def _np_paint(self, pos, w):
        layout, (lpos, lw) = self._route(pos, w)
        out = np.empty(self.local_real_shape + (lw.shape[1],), self.dtype)
        return self._local_paint(lpos, lw, out)

    def _np_readout(self, mesh, pos):
        layout, (lpos,) = self._route(pos)
        vals = np.empty((lpos.shape[0], mesh.shape[-1]), self.dtype)
        for c in range(mesh.shape[-1]):
            vals[:, c] = self._field(mesh[..., c]).readout(lpos)
        return self._gather(layout, vals)

    def _np_readout_and_grad(self, mesh, pos, g):
        """Readout (N, C) of ``mesh`` and its g-weighted position gradient (N, 3)."""
        layout, (lpos, lg) = self._route(pos, g)
        vals = np.empty((lpos.shape[0], mesh.shape[-1]), self.dtype)
        for c in range(mesh.shape[-1]):
            vals[:, c] = self._field(mesh[..., c]).readout(lpos)
        grad = self._local_grad(mesh, lpos, lg)
        return self._gather(layout, vals), self._gather(layout, grad)

    def _np_paint_and_grad(self, mesh, pos, g):
        """Paint of weights ``g`` (local mesh) and the g-weighted gradient of ``mesh`` (N, 3)."""
        layout, (lpos, lg) = self._route(pos, g)
        painted = self._local_paint(lpos, lg, np.empty(mesh.shape, self.dtype))
        grad = self._local_grad(mesh, lpos, lg)
        return painted, self._gather(layout, grad)

    def _np_r2c(self, mesh):
        out = np.empty(self.local_complex_shape + (mesh.shape[-1],), self.complex_dtype)
        for c in range(mesh.shape[-1]):
            out[..., c] = self._field(mesh[..., c]).r2c().value
        return out

    def _np_c2r(self, cmesh):
        out = np.empty(self.local_real_shape + (cmesh.shape[-1],), self.dtype)
        for c in range(cmesh.shape[-1]):
            out[..., c] = self._field(cmesh[..., c], "complex").c2r().value
        return out

    def _np_r2c_vjp(self, ct):
        out = np.empty(self.local_real_shape + (ct.shape[-1],), self.dtype)
        for c in range(ct.shape[-1]):
            v = self._field(np.conj(ct[..., c]) / self._hermitian_weight, "complex")
            out[..., c] = v.r2c_vjp().value  # c2r(v) / Ntot
        return out

    def _np_c2r_vjp(self, g):
        out = np.empty(self.local_complex_shape + (g.shape[-1],), self.complex_dtype)
        for c in range(g.shape[-1]):
            v = self._field(g[..., c]).c2r_vjp()  # r2c(g) * Ntot
            out[..., c] = np.conj(v.value) * self._hermitian_weight
        return out

    def _np_allreduce(self, x):
        from mpi4py import MPI

        x = np.ascontiguousarray(x).reshape(1)
        out = np.empty_like(x)
        self._comm.Allreduce(x, out, op=MPI.SUM)
        return out.reshape(())

    def _np_allreduce_array(self, x):
        from mpi4py import MPI

        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        self._comm.Allreduce(x, out, op=MPI.SUM)
        return out

    # -- operations ---------------------------------------------------------------------------
    def _as_pos(self, pos):
        pos = jnp.asarray(pos)
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise ValueError(f"positions must have shape (N, 3), got {pos.shape}")
        return pos.astype(self.dtype)

    def _as_mesh(self, mesh, shape, dtype, what):
        mesh = jnp.asarray(mesh)
        if mesh.ndim not in (3, 4) or tuple(mesh.shape[:3]) != shape:
            raise ValueError(
                f"{what} mesh shape {mesh.shape} does not start with the local {what} shape {shape} "
                f"(rank {self._comm.rank} of {self._comm.size}, Nmesh {self.Nmesh})"
            )
        return mesh.astype(dtype)

    def paint(self, pos, mass=None):
        """CIC-paint this rank's particles; returns the local slab of the global painted mesh.

        Parameters
        ----------
        pos : (N, 3) array
            Positions of this rank's particles, Mpc/h (periodic; not necessarily wrapped).
        mass : None, (N,) or (N, C) array
            Unit masses, one weight per particle, or C channels.

        Returns
        -------
        JAX array of shape :attr:`local_real_shape` (plus (C,) for (N, C) masses).
        """
        fault_point("paint")
        pos = self._as_pos(pos)
        w = self._weights(pos, mass)
        mesh = _paint(self, pos, w)
        return mesh[..., 0] if mass is None or jnp.ndim(mass) <= 1 else mesh

    def readout(self, mesh, pos):
        """CIC-interpolate the (distributed) mesh at this rank's particles.

        Parameters
        ----------
        mesh : local real slab, optional trailing channel axis
        pos : (N, 3) array of this rank's positions, Mpc/h

        Returns
        -------
        JAX array (N,) or (N, C).
        """
        pos = self._as_pos(pos)
        mesh = self._as_mesh(mesh, self.local_real_shape, self.dtype, "real")
        single = mesh.ndim == 3
        vals = _readout(self, mesh[..., None] if single else mesh, pos)
        return vals[:, 0] if single else vals

    def readout_gradient(self, mesh, pos):
        """d/dx of the CIC-interpolated one-channel mesh at this rank's particles.

        Parameters
        ----------
        mesh : local real slab (one channel)
        pos : (N, 3) array of this rank's positions, Mpc/h

        Returns
        -------
        JAX array (N, 3) in 1/(Mpc/h); piecewise constant, not differentiable.
        """
        pos = self._as_pos(pos)
        mesh = self._as_mesh(mesh, self.local_real_shape, self.dtype, "real")
        if mesh.ndim != 3:
            raise ValueError(f"readout_gradient takes a one-channel mesh, got shape {mesh.shape}")
        ones = jnp.ones((pos.shape[0], 1), self.dtype)
        shapes = (
            jax.ShapeDtypeStruct((pos.shape[0], 1), self.dtype),
            jax.ShapeDtypeStruct((pos.shape[0], 3), self.dtype),
        )
        _, grad = _callback(self._np_readout_and_grad, shapes, mesh[..., None], pos, ones)
        return jax.lax.stop_gradient(grad)

    def r2c(self, mesh):
        """Forward FFT of the distributed real mesh, divided by the number of cells.

        Parameters
        ----------
        mesh : local real slab, optional trailing channel axis

        Returns
        -------
        JAX complex array of shape :attr:`local_complex_shape` (plus channels).
        """
        mesh = self._as_mesh(mesh, self.local_real_shape, self.dtype, "real")
        single = mesh.ndim == 3
        out = _r2c(self, mesh[..., None] if single else mesh)
        return out[..., 0] if single else out

    def c2r(self, cmesh):
        """Inverse FFT (not divided) of the distributed complex mesh: ``c2r(r2c(f)) == f``.

        Parameters
        ----------
        cmesh : local complex part, optional trailing channel axis

        Returns
        -------
        JAX array of shape :attr:`local_real_shape` (plus channels).
        """
        cmesh = self._as_mesh(cmesh, self.local_complex_shape, self.complex_dtype, "complex")
        single = cmesh.ndim == 3
        out = _c2r(self, cmesh[..., None] if single else cmesh)
        return out[..., 0] if single else out

    def replicated(self, x):
        """Mark ``x`` as held identically by every rank: its gradient is summed over the ranks."""
        return _replicated(self, jnp.asarray(x))

    def sum(self, x):
        """Global sum of a local array over all ranks (allreduce); differentiable.

        Parameters
        ----------
        x : array (any shape), this rank's part

        Returns
        -------
        JAX scalar, the same on every rank.
        """
        return _allsum(self, jnp.asarray(x))

    def count(self, pos) -> int:
        """Global number of particles (allreduce of the local counts)."""
        return int(self._comm.allreduce(int(np.shape(pos)[0])))

    def jit(self, fn):
        """Return ``fn`` unchanged: the MPI engine runs eagerly, callbacks in program order."""
        return fn

    def describe(self):
        """Configuration of this engine, for provenance records (adds ranks and process mesh)."""
        import pmesh

        return super().describe() | {
            "ranks": int(self._comm.size),
            "procmesh": [int(n) for n in self.pm.np],
            "pmesh": getattr(pmesh, "__version__", "?"),
        }
