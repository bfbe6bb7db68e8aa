"""MPI particle mesh on pmesh: each rank holds its own particles and one slab of the mesh.

The engine compiles: :meth:`PmeshEngine.jit` is ``jax.jit`` (plus freeing the step's particle
layouts when it returns), so a whole training step is one XLA program. The elementwise Fourier work
between the operations fuses in XLA; only the distributed operations leave it, each through one
*ordered* ``jax.experimental.io_callback``. Ordered callbacks run in program order on every rank,
whatever the particle counts (which differ between ranks, and so do the compiled programs), so the
MPI collectives inside them match up; plain ``pure_callback`` under ``jit`` gives no such order.

* **Layouts.** The mesh is cut into x slabs (pmesh's domain with a ``[ranks, 1]`` process mesh). A
  *layout* routes each particle to the rank(s) whose slab its CIC window touches: the owner of its
  lower cell plane and, when the upper plane is on the next rank, a ghost copy there. It is built
  once per set of positions by one callback that returns a small integer *handle*: every paint and
  readout at those positions, and their adjoints, take the handle as an input (so data dependence
  orders them too) and reuse the routed positions, exchanging only weights (one ``Alltoallv``) and
  gathering results back (one ``Alltoallv``, ghosts summed onto their particles). Inside a traced
  function the handle is found again from the positions' own tracer (no hashing of their bytes).
  Handles made during a :meth:`~PmeshEngine.jit` call are freed when it returns; eager calls keep
  the :attr:`~PmeshEngine.layout_cache` most recent.
* **Local CIC.** On each rank the C++ kernels (``jerald_nbk._cic``, the JAX engine's) paint and read
  the routed particles on the slab padded by one ghost plane.
* **FFTs** (``fft="xla"``, the default) are XLA's 1-D FFTs on each rank's slab: along z and y on
  the x slab, one all-to-all (a callback) to y slabs, along x there; the inverse the other way.
  Complex meshes live on y slabs: every x, this rank's y range, the halved z axis. The all-to-alls
  are permutations, each the other's adjoint, so JAX differentiates the FFTs itself. Measured
  against pmesh's pfft on the same slabs in ``benchmarks/mpi_engine.py`` (``docs/scaling.md``);
  ``fft="pfft"`` keeps pfft (pmesh's transposed complex layout), in pmesh's normalisation, which
  is also ours (:mod:`jerald_nbk.pm.fourier`).

On one rank nothing is distributed: the operations are the JAX engine's own (C++ CIC through XLA
FFI, ``jnp.fft``), with no callback at all.

What each backward rule gathers from what is written next to it; the rules compute only the
cotangents of inputs that carry a derivative (symbolic zeros, as in the JAX engine).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental import io_callback

from ..utils import fault_point
from . import fourier
from .base import ParticleMesh

_TOKEN = jax.ShapeDtypeStruct((1,), np.int8)


def _callback(fn, result_shape, *args):
    """``fn`` (numpy in, numpy out) as an ordered ``io_callback`` when traced; called directly
    (on this thread, its result made a JAX array) when every argument is concrete.

    Eagerly, JAX would run the callback on one of XLA's threads and hand it arguments whose copies
    may still be queued; reading one waits for a thread that the callback itself holds when the
    process is bound to one core (``mpiexec -bind-to core``): a deadlock, seen at 256^3. Called
    directly, the calls follow the program's order, as the ordered callbacks do under ``jit``.

    A one-element token output keeps every traced callback alive on every rank: XLA may replace
    an operation whose outputs are all empty by a constant, and a rank holding no particles would
    then skip a readout, and with it the collectives the other ranks wait in.
    """
    if not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(args)):
        out = fn(*(np.asarray(a) for a in args))
        return jax.tree_util.tree_map(
            lambda o, s: jnp.asarray(np.asarray(o, dtype=s.dtype).reshape(s.shape)),
            out,
            result_shape,
        )

    def with_token(*a):
        return fn(*a), np.zeros(1, np.int8)

    out, _ = io_callback(with_token, (result_shape, _TOKEN), *args, ordered=True)
    return out


def _alltoallv(comm, send, counts, recv_counts, out=None):
    """Exchange the rows of ``send`` (grouped by destination, ``counts`` rows each).

    The received rows are written into ``out`` (C-contiguous, ``recv_counts.sum()`` rows) when
    given, else into a new array; returns it.
    """
    row = int(np.prod(send.shape[1:], dtype=np.int64))
    recv = np.empty((int(recv_counts.sum()),) + send.shape[1:], send.dtype) if out is None else out
    sdis = np.concatenate([[0], np.cumsum(counts)[:-1]]) * row
    rdis = np.concatenate([[0], np.cumsum(recv_counts)[:-1]]) * row
    comm.Alltoallv([send, (counts * row, sdis)], [recv, (recv_counts * row, rdis)])
    return recv


class _Layout:
    """Where this rank's particles go, and the particles this rank holds for it (routed).

    The rows held here are, in order: every local particle, in its own order (a particle whose
    slab is another rank's keeps its row with a zero weight, so that no row of the common case is
    gathered by index); the *extra* rows, ghost copies of local particles whose CIC window
    reaches into this rank's first plane from the previous rank's slab (rare); then the rows
    received from the other ranks (particles of this slab held there, and their ghosts). A ghost
    is the copy of a particle in a slab's last plane, for the next slab's first plane.

    Attributes
    ----------
    n : int
        Local particles.
    away : int64 array
        The local particles whose slab is another rank's (their rows here carry zero weight).
    extra_src : int64 array
        The particle of each extra row.
    foreign_src : int64 array
        The particle of each row sent to another rank, in destination order.
    counts, recv_counts : int64 arrays
        Rows sent to / received from each rank (0 for this rank).
    active : bool
        Whether any rank sends a row to another (the same on every rank: the exchanges and
        gathers are collective, all ranks call them or none).
    upos : (M, 3) array
        Positions of the rows held here: x in cells from the padded slab's first (ghost) plane
        (for the zero-weight rows, from their own slab's: any finite value does), y and z in
        Mpc/h.
    """

    __slots__ = (
        "n", "away", "extra_src", "foreign_src", "counts", "recv_counts", "upos", "active"
    )  # fmt: skip

    def exchange(self, comm, data):
        """Rows of ``data`` (one per local particle) for the rows held here."""
        data = np.asarray(data)
        n, ne = self.n, self.extra_src.size
        out = np.empty((self.upos.shape[0],) + data.shape[1:], data.dtype)
        out[:n] = data
        out[self.away] = 0
        out[n : n + ne] = data[self.extra_src]
        if self.active:
            sent = np.ascontiguousarray(data[self.foreign_src])
            _alltoallv(comm, sent, self.counts, self.recv_counts, out=out[n + ne :])
        return out

    def gather(self, comm, values):
        """Partial results of the rows held here, summed back onto the local particles."""
        n, ne = self.n, self.extra_src.size
        out = np.array(values[:n])
        out[self.away] = 0
        if ne:
            np.add.at(out, self.extra_src, values[n : n + ne])
        if self.active:
            back = np.ascontiguousarray(values[n + ne :])
            back = _alltoallv(comm, back, self.recv_counts, self.counts)
            np.add.at(out, self.foreign_src, back)
        return out


# ---------------------------------------------------------------------------------------------
# Differentiable distributed operations (more than one rank). ``eng`` (a PmeshEngine) is a static
# argument; ``h`` is a layout handle (int32 scalar); meshes carry a trailing channel axis, particle
# weights are (N, C). The VJPs use symbolic zeros: the forward rule records which inputs carry a
# derivative and the backward rule calls only the kernels whose cotangent is needed (in a JERALD
# layer the input positions are constants, so the first readout's position cotangent is never
# computed).


def _layout_handle(eng, pos):
    """Handle of the layout of ``pos`` (one collective callback; not differentiable)."""
    return _callback(eng._np_layout, jax.ShapeDtypeStruct((), np.int32), jax.lax.stop_gradient(pos))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _paint(eng, h, pos, w):
    """Paint (N, C) weights of the particles of layout ``h`` (at ``pos``) onto the local slab."""
    shape = jax.ShapeDtypeStruct(eng.local_real_shape + (w.shape[1],), eng.dtype)
    return _callback(eng._np_paint, shape, h, w)


def _paint_fwd(eng, h, pos, w):
    out = _paint(eng, h.value, pos.value, w.value)
    return out, (h.value, w.value, pos.perturbed, w.perturbed)


def _paint_bwd(eng, res, ct):
    # Weights: the cotangent mesh read out at the particles (paint is linear in w).
    # Positions: w_p times the gradient of the cotangent mesh interpolated at x_p.
    # Both from one callback when both are needed: one exchange of w, one gather.
    h, w, d_pos, d_w = res
    if isinstance(ct, SymbolicZero) or not (d_pos or d_w):
        return None, None, None
    ct = ct.astype(eng.dtype)
    n = w.shape[0]
    vals = jax.ShapeDtypeStruct(w.shape, eng.dtype)
    grad = jax.ShapeDtypeStruct((n, 3), eng.dtype)
    if d_pos and d_w:
        w_bar, pos_bar = _callback(eng._np_readout_and_grad, (vals, grad), h, ct, w)
        return None, pos_bar, w_bar
    if d_pos:
        return None, _callback(eng._np_grad, grad, h, ct, w), None
    return None, None, _callback(eng._np_readout, vals, h, ct)


_paint.defvjp(_paint_fwd, _paint_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _readout(eng, h, mesh, pos):
    """Interpolate the local (..., C) slab at the particles of layout ``h``: (N, C)."""
    shape = jax.ShapeDtypeStruct((pos.shape[0], mesh.shape[-1]), eng.dtype)
    return _callback(eng._np_readout, shape, h, mesh)


def _readout_fwd(eng, h, mesh, pos):
    out = _readout(eng, h.value, mesh.value, pos.value)
    keep = mesh.value if pos.perturbed else None  # the mesh is needed only for the positions
    return out, (h.value, keep, mesh.perturbed, pos.perturbed)


def _readout_bwd(eng, res, ct):
    # Mesh: the cotangents painted back at the particles (paint is readout's adjoint).
    # Positions: the cotangent-weighted gradient of the interpolated mesh.
    h, mesh, d_mesh, d_pos = res
    if isinstance(ct, SymbolicZero) or not (d_mesh or d_pos):
        return None, None, None
    ct = ct.astype(eng.dtype)
    mshape = jax.ShapeDtypeStruct(eng.local_real_shape + (ct.shape[1],), eng.dtype)
    grad = jax.ShapeDtypeStruct((ct.shape[0], 3), eng.dtype)
    if d_mesh and d_pos:
        mesh_bar, pos_bar = _callback(eng._np_paint_and_grad, (mshape, grad), h, mesh, ct)
        return None, mesh_bar, pos_bar
    if d_pos:
        return None, None, _callback(eng._np_grad, grad, h, mesh, ct)
    return None, _callback(eng._np_paint, mshape, h, ct), None


_readout.defvjp(_readout_fwd, _readout_bwd, symbolic_zeros=True)


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
    # k_z = 0 and Nyquist (w = 1). The conjugate and the division fuse in XLA.
    shape = jax.ShapeDtypeStruct(eng.local_real_shape + (ct.shape[-1],), eng.dtype)
    v = jnp.conj(ct.astype(eng.complex_dtype)) * eng._inv_hermitian_weight[..., None]
    return (_callback(eng._np_c2r_scaled, shape, v),)


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
    # dL/dRe - i dL/dIm) v_bar_k = w_k sum_x g(x) e^{ikx} = w_k conj(pmesh c2r_vjp(g))_k, with
    # pmesh's c2r_vjp(g) = r2c(g) * Ntot; the conjugate and the weights fuse in XLA.
    shape = jax.ShapeDtypeStruct(eng.local_complex_shape + (ct.shape[-1],), eng.complex_dtype)
    v = _callback(eng._np_r2c, shape, ct.astype(eng.dtype))
    return (jnp.conj(v) * (eng._hermitian_weight * eng.ncells)[..., None],)


_c2r.defvjp(_c2r_fwd, _c2r_bwd)


# The FFTs of ``fft="xla"``: XLA's own 1-D transforms on each rank's slab, with one all-to-all
# between them that moves the (partly transformed) mesh from x slabs to y slabs or back. The
# all-to-alls are permutations of the mesh's elements: each one's adjoint is the other, and JAX
# differentiates the FFTs itself (as on the JAX engine).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _to_yslabs(eng, a):
    """(nxl, Ny, Nzh, C) x slab -> (Nx, nyl, Nzh, C) y slab (all-to-all)."""
    send = jnp.concatenate([a[:, y0:y1].reshape(-1) for y0, y1 in eng._yranges])
    nch = a.shape[-1]
    size = eng.Nmesh[0] * eng._ny_local * a.shape[2] * nch
    recv = _callback(
        functools.partial(eng._np_alltoall, "xy", a.shape[2] * nch),
        jax.ShapeDtypeStruct((size,), a.dtype),
        send,
    )
    return recv.reshape(eng.Nmesh[0], eng._ny_local, a.shape[2], nch)


def _to_yslabs_fwd(eng, a):
    return _to_yslabs(eng, a), None


def _to_yslabs_bwd(eng, _, ct):
    return (_to_xslabs(eng, ct),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _to_xslabs(eng, b):
    """(Nx, nyl, Nzh, C) y slab -> (nxl, Ny, Nzh, C) x slab (all-to-all)."""
    nzh, nch = b.shape[2], b.shape[3]
    nxl = eng.local_real_shape[0]
    recv = _callback(
        functools.partial(eng._np_alltoall, "yx", nzh * nch),
        jax.ShapeDtypeStruct((nxl * eng.Nmesh[1] * nzh * nch,), b.dtype),
        b.reshape(-1),
    )
    parts, start = [], 0
    for y0, y1 in eng._yranges:
        n = nxl * (y1 - y0) * nzh * nch
        parts.append(recv[start : start + n].reshape(nxl, y1 - y0, nzh, nch))
        start += n
    return jnp.concatenate(parts, axis=1)


def _to_xslabs_fwd(eng, b):
    return _to_xslabs(eng, b), None


def _to_xslabs_bwd(eng, _, ct):
    return (_to_yslabs(eng, ct),)


_to_yslabs.defvjp(_to_yslabs_fwd, _to_yslabs_bwd)
_to_xslabs.defvjp(_to_xslabs_fwd, _to_xslabs_bwd)


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
    """MPI-distributed particle mesh on pmesh, compiled by XLA.

    Each rank passes its own particles (any subset of the catalog; positions need not be in the
    slab nor wrapped into the box) and holds the local slab of every mesh: real meshes have shape
    :attr:`local_real_shape` (plus an optional channel axis), complex meshes
    :attr:`local_complex_shape` (every x, this rank's y range and the halved z axis; with
    ``fft="pfft"`` the local part of pmesh's transposed rfft layout). :meth:`kvec`,
    :meth:`mesh_index` and :meth:`local_slices` describe those local layouts. Real meshes are cut
    into x slabs (pmesh's process mesh ``[ranks, 1]``), complex ones into y slabs, so there can be
    at most ``min(Nmesh[0], Nmesh[1])`` ranks.

    Parameters
    ----------
    Nmesh, BoxSize, dtype
        See :class:`~jerald_nbk.pm.base.ParticleMesh`.
    comm : mpi4py.MPI.Comm, optional
        Communicator (default ``MPI.COMM_WORLD``). All ranks of it must call every operation, and
        every function made by :meth:`jit`, in the same order.
    layout_cache : int
        Particle layouts kept between *eager* calls (least recently used first out); those made
        inside a :meth:`jit` function are freed when it returns.
    fft : {"xla", "pfft"}
        Distributed FFTs from XLA's 1-D FFTs and all-to-alls (default), or pmesh's pfft.

    Notes
    -----
    Compile with :meth:`jit`, not ``jax.jit`` directly: it also waits for the step and frees its
    layouts before returning (``jax.jit`` works too, but its layouts stay until evicted and MPI
    calls made right after it may overlap its callbacks). Do not ``vmap`` the operations. The C++
    CIC kernels use ``OMP_NUM_THREADS`` threads per rank.

    Examples
    --------
    >>> pm = PmeshEngine(32, 100.0)                  # under mpiexec, on every rank
    >>> mine = catalog[comm.rank::comm.size]     # any split of the particles
    >>> delta = pm.density(mine)                 # local slab of 1 + delta
    >>> pm.sum(delta) / pm.ncells                # 1.0 on every rank
    """

    name = "pmesh"

    def __init__(self, Nmesh, BoxSize, dtype="f4", comm=None, layout_cache=4, fft="xla"):
        super().__init__(Nmesh, BoxSize, dtype)
        import pmesh.pm

        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self._comm = comm
        if fft not in ("xla", "pfft"):
            raise ValueError(f"fft must be 'xla' or 'pfft', got {fft!r}")
        #: FFT implementation: XLA's 1-D FFTs and all-to-alls ("xla") or pmesh's pfft ("pfft")
        self.fft = fft
        if comm.size > min(self.Nmesh[:2]):
            raise ValueError(
                f"PmeshEngine cuts the mesh into x slabs (and y slabs in Fourier space): "
                f"{comm.size} ranks need Nmesh[0] and Nmesh[1] >= {comm.size}, got Nmesh "
                f"{self.Nmesh}"
            )
        self.ppm = pmesh.pm.ParticleMesh(
            Nmesh=list(self.Nmesh),
            BoxSize=self.BoxSize,
            dtype=self.dtype,
            comm=comm,
            np=[comm.size, 1],
        )
        real = self.ppm.create(type="real")
        cplx = self.ppm.create(type="complex")
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
        nx, ny, nz = self.Nmesh
        size, rank = comm.size, comm.rank
        #: y ranges of the ranks' complex slabs (``fft="xla"``)
        self._yranges = [(r * ny // size, (r + 1) * ny // size) for r in range(size)]
        y0, y1 = self._yranges[rank]
        self._ny_local = y1 - y0
        self._nx_all = np.array(
            [int(s.stop) - int(s.start) for s in comm.allgather(self._real_slices[0])]
        )
        if fft == "xla" and size > 1:
            # complex meshes: every x, this rank's y range, the halved z axis
            self.local_complex_shape = (nx, y1 - y0, nz // 2 + 1)
            self._complex_slices = (slice(0, nx), slice(y0, y1), slice(0, nz // 2 + 1))
            cidx = (
                np.arange(nx).reshape(-1, 1, 1),
                np.arange(y0, y1).reshape(1, -1, 1),
                np.arange(nz // 2 + 1).reshape(1, 1, -1),
            )

        # k from the global indices with fourier's own tables rather than pmesh's ``field.x``:
        # pmesh folds index n >= N // 2 to n - N, which is wrong for odd N (n = (N-1)/2 is
        # positive) and gives the last, halved axis a negative Nyquist k (rfftfreq: positive).
        lx, ly, lz = self.BoxSize
        self._kvec = (
            jnp.asarray(fourier.fftfreq_k(nx, lx).astype(self.dtype)[cidx[0]]),
            jnp.asarray(fourier.fftfreq_k(ny, ly).astype(self.dtype)[cidx[1]]),
            jnp.asarray(fourier.rfftfreq_k(nz, lz).astype(self.dtype)[cidx[2]]),
        )
        # times the inverse rfft counts each stored mode (the k_z = 0 and Nyquist planes hold
        # their own conjugates; every other stored mode stands for two)
        iz = cidx[2]
        weight = np.where((iz == 0) | (2 * iz == nz), 1.0, 2.0).astype(self.dtype)
        self._hermitian_weight = jnp.asarray(weight)
        self._inv_hermitian_weight = jnp.asarray((1.0 / weight).astype(self.dtype))

        # x slabs: the first plane of every rank's slab, and the owner of every plane
        x0 = int(self._real_slices[0].start)
        self._x0 = np.array(comm.allgather(x0), dtype=np.int64)
        stops = np.array(comm.allgather(int(self._real_slices[0].stop)), dtype=np.int64)
        owner = np.empty(nx, dtype=np.int64)
        for r, (a, b) in enumerate(zip(self._x0, stops, strict=True)):
            owner[a:b] = r
        self._plane_owner = owner
        #: planes whose upper neighbour belongs to another rank
        self._slab_end = owner != np.roll(owner, -1)
        #: C++ CIC on the slab padded by one ghost plane in front: x in cells, y and z in Mpc/h
        self._pad_shape = (self.local_real_shape[0] + 1,) + self.local_real_shape[1:]
        self._local_scale = (1.0, float(ny / ly), float(nz / lz))

        self._layouts: collections.OrderedDict = collections.OrderedDict()
        self._layout_cache = int(layout_cache)
        self._next_handle = 0
        self._jit_depth = 0
        # positions (array or tracer) -> layout handle, while a function is traced or run
        self._handles: dict = {}
        #: number of layouts built (``decompose`` calls), for tests and profiling
        self.n_decompose = 0

        self._local = None
        if comm.size == 1:  # nothing to distribute: the JAX engine's operations, no callback
            from .jax_backend import JaxEngine

            self._local = JaxEngine(self.Nmesh, self.BoxSize, dtype=self.dtype)

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

    # -- layouts ------------------------------------------------------------------------------
    def _handle(self, pos):
        """The layout handle of ``pos``: made once per positions object, then found again.

        Keyed by the positions' own object (a tracer inside a traced function, an array outside),
        which the table keeps alive so that its id is not reused; cleared when a :meth:`jit`
        function returns.
        """
        traced = isinstance(pos, jax.core.Tracer)
        entry = self._handles.get(id(pos))
        hit = entry is not None and entry[0] is pos
        if hit and traced:
            return entry[1]
        inner = pos
        while traced and not hit and isinstance(getattr(inner, "primal", None), jax.core.Tracer):
            # differentiated positions: their primal (the outer tracer) may have a layout
            inner = inner.primal
            entry = self._handles.get(id(inner))
            if entry is not None and entry[0] is inner:
                self._handles[id(pos)] = (pos, entry[1])
                return entry[1]
        if not traced:
            # eager: the layout must still be cached, on every rank (building one is collective)
            from mpi4py import MPI

            hit = hit and int(entry[1]) in self._layouts
            if self._comm.allreduce(hit, op=MPI.LAND):
                self._layouts.move_to_end(int(entry[1]))
                return entry[1]
        handle = _layout_handle(self, pos)
        if traced != isinstance(handle, jax.core.Tracer):
            return handle  # constant positions inside a traced function: not kept
        if self._jit_depth == 0 and not isinstance(pos, jax.core.Tracer):
            # eager: keep only the handles whose layouts are still cached
            self._handles = {
                k: v
                for k, v in self._handles.items()
                if isinstance(v[1], jax.core.Tracer) or int(v[1]) in self._layouts
            }
        self._handles[id(pos)] = (pos, handle)
        return handle

    def _np_layout(self, pos):
        """Route this rank's particles to the slab(s) their CIC window touches (collective)."""
        from .. import _cic

        pos = np.ascontiguousarray(pos, dtype=self.dtype)
        n = pos.shape[0]
        nx, rank = self.Nmesh[0], self._comm.rank
        scale_x = float(nx / self.BoxSize[0])
        # every particle's row (x in cells from its owner's padded slab's ghost plane), the
        # particles of other slabs and those in a slab's last plane: one C++ pass
        local, away, ghost = _cic.slab_rows(
            pos, scale_x, self._plane_owner, self._x0, self._slab_end, rank
        )
        # the few particles of other slabs and the ghosts, redone in numpy as the C++ did them:
        # the owner of the particle's plane, and of the plane after it (a ghost's destination,
        # where its x is its fraction: 0..1 cells from that slab's ghost plane)
        ug = pos[ghost, 0] * np.float64(scale_x)
        flg = np.floor(ug)
        own1 = self._plane_owner[(flg.astype(np.int64) + 1) % nx]
        ug -= flg
        ghost_home = own1 == rank
        layout = _Layout()
        layout.n = n
        layout.away = away
        layout.extra_src = ghost[ghost_home]
        # rows sent: particles of other slabs, ghost copies for other ranks; by destination
        gaway = np.flatnonzero(~ghost_home)
        i_away = np.floor(pos[away, 0] * np.float64(scale_x)).astype(np.int64) % nx
        dest = np.concatenate([self._plane_owner[i_away], own1[gaway]])
        src = np.concatenate([away, ghost[gaway]])
        xs = np.concatenate([local[away, 0], ug[gaway]])
        order = np.argsort(dest, kind="stable")
        layout.foreign_src = src[order]
        counts = np.bincount(dest, minlength=self._comm.size).astype(np.int64)
        matrix = np.empty((self._comm.size, counts.size), np.int64)  # [from, to]
        self._comm.Allgather(counts, matrix)
        recv_counts = np.ascontiguousarray(matrix[:, rank])
        layout.counts, layout.recv_counts = counts, recv_counts
        layout.active = bool(matrix.any())
        ne = layout.extra_src.size
        upos = np.empty((n + ne + int(recv_counts.sum()), 3), self.dtype)
        upos[:n] = local
        upos[n : n + ne, 0] = ug[ghost_home]
        upos[n : n + ne, 1:] = pos[layout.extra_src, 1:]
        if layout.active:
            send = np.empty((order.size, 3), self.dtype)
            send[:, 0] = xs[order]
            send[:, 1:] = pos[layout.foreign_src, 1:]
            _alltoallv(self._comm, send, counts, recv_counts, out=upos[n + ne :])
        layout.upos = upos
        handle = self._next_handle
        self._next_handle = (handle + 1) % (2**31 - 1)
        self._layouts[handle] = layout
        if self._jit_depth == 0:
            while len(self._layouts) > max(self._layout_cache, 1):
                self._layouts.popitem(last=False)
        self.n_decompose += 1
        return np.int32(handle)

    def _get_layout(self, h):
        h = int(h)
        layout = self._layouts.get(h)
        if layout is None:
            raise RuntimeError(
                f"particle layout {h} was freed (rank {self._comm.rank}): an eager gradient used "
                f"more than layout_cache={self._layout_cache} sets of positions; raise layout_cache"
            )
        self._layouts.move_to_end(h)
        return layout

    def _free_layouts(self, first):
        """Drop the layouts made since handle ``first`` and the traced positions' handles."""
        for h in [h for h in self._layouts if h >= first]:
            del self._layouts[h]
        self._handles = {
            k: v for k, v in self._handles.items() if not isinstance(v[1], jax.core.Tracer)
        }

    # -- numpy kernels (run inside the callbacks; all collective) ------------------------------
    def _pad(self, mesh):
        """The local slab behind one zero ghost plane (the C++ kernels' padded slab)."""
        out = np.zeros((mesh.shape[0] + 1,) + mesh.shape[1:], self.dtype)
        out[1:] = mesh
        return out

    def _local_paint(self, layout, lw):
        from .. import _cic

        mesh = _cic.paint(layout.upos, lw, self._pad_shape, self._local_scale)
        return np.ascontiguousarray(mesh[1:])  # plane 0 is the ghost (the previous rank's)

    def _local_grad(self, layout, padded, lg):
        from .. import _cic

        grad = _cic.readout_vjp_pos(padded, layout.upos, lg, self._local_scale)
        grad[:, 0] *= self.dtype.type(self.Nmesh[0] / self.BoxSize[0])  # x was in cells
        return grad

    def _np_paint(self, h, w):
        layout = self._get_layout(h)
        lw = layout.exchange(self._comm, np.asarray(w, self.dtype))
        return self._local_paint(layout, lw)

    def _np_readout(self, h, mesh):
        from .. import _cic

        layout = self._get_layout(h)
        vals = _cic.readout(self._pad(np.asarray(mesh)), layout.upos, self._local_scale)
        return layout.gather(self._comm, vals)

    def _np_grad(self, h, mesh, g):
        """``sum_c g[p, c] d/dx readout(mesh[..., c])(x_p)``: (N, 3)."""
        layout = self._get_layout(h)
        lg = layout.exchange(self._comm, np.asarray(g, self.dtype))
        grad = self._local_grad(layout, self._pad(np.asarray(mesh)), lg)
        return layout.gather(self._comm, grad)

    def _np_readout_and_grad(self, h, mesh, g):
        """Readout (N, C) of ``mesh`` and its g-weighted position gradient (N, 3)."""
        from .. import _cic

        layout = self._get_layout(h)
        lg = layout.exchange(self._comm, np.asarray(g, self.dtype))
        padded = self._pad(np.asarray(mesh))
        vals = _cic.readout(padded, layout.upos, self._local_scale)
        grad = self._local_grad(layout, padded, lg)
        both = layout.gather(self._comm, np.concatenate([vals, grad], axis=1))
        return np.ascontiguousarray(both[:, : vals.shape[1]]), np.ascontiguousarray(both[:, -3:])

    def _np_paint_and_grad(self, h, mesh, g):
        """Paint of weights ``g`` (local mesh) and the g-weighted gradient of ``mesh`` (N, 3)."""
        layout = self._get_layout(h)
        lg = layout.exchange(self._comm, np.asarray(g, self.dtype))
        painted = self._local_paint(layout, lg)
        grad = self._local_grad(layout, self._pad(np.asarray(mesh)), lg)
        return painted, layout.gather(self._comm, grad)

    def _field(self, value, kind="real"):
        return self.ppm.create(type=kind, value=value)

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

    def _np_c2r_scaled(self, cmesh):
        """``c2r / ncells`` (pmesh's ``r2c_vjp``)."""
        out = self._np_c2r(cmesh)
        out *= self.dtype.type(1.0 / self.ncells)
        return out

    def _np_alltoall(self, kind, row, send):
        """x slabs -> y slabs (``kind="xy"``) or back, of a flattened (partly FFT'd) mesh.

        ``row``: elements per (x, y) pair (the z length times the channels).
        """
        rank = self._comm.rank
        ny = np.array([y1 - y0 for y0, y1 in self._yranges], dtype=np.int64)
        nx = self._nx_all.astype(np.int64)
        if kind == "xy":  # to rank s: my x planes, its y rows
            counts, recv_counts = nx[rank] * ny * row, nx * ny[rank] * row
        else:
            counts, recv_counts = nx * ny[rank] * row, nx[rank] * ny * row
        send = np.ascontiguousarray(send)
        recv = np.empty(int(recv_counts.sum()), send.dtype)
        sdis = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rdis = np.concatenate([[0], np.cumsum(recv_counts)[:-1]])
        self._comm.Alltoallv([send, (counts, sdis)], [recv, (recv_counts, rdis)])
        return recv

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
        if self._local is not None:
            return self._local.paint(pos, mass)
        w = self._weights(pos, mass)
        mesh = _paint(self, self._handle(pos), pos, w)
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
        if self._local is not None:
            return self._local.readout(mesh, pos)
        single = mesh.ndim == 3
        vals = _readout(self, self._handle(pos), mesh[..., None] if single else mesh, pos)
        return vals[:, 0] if single else vals

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
        if self._local is not None:
            return self._local.r2c(mesh)
        single = mesh.ndim == 3
        mesh = mesh[..., None] if single else mesh
        if self.fft == "pfft":
            out = _r2c(self, mesh)
        else:
            a = jnp.fft.fft(jnp.fft.rfft(mesh, axis=2), axis=1)
            out = jnp.fft.fft(_to_yslabs(self, a), axis=0) * fourier.r2c_scale(self.ncells)
            out = out.astype(self.complex_dtype)
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
        if self._local is not None:
            return self._local.c2r(cmesh)
        single = cmesh.ndim == 3
        cmesh = cmesh[..., None] if single else cmesh
        if self.fft == "pfft":
            out = _c2r(self, cmesh)
        else:
            a = jnp.fft.ifft(_to_xslabs(self, jnp.fft.ifft(cmesh, axis=0)), axis=1)
            out = jnp.fft.irfft(a, n=self.Nmesh[2], axis=2) * fourier.c2r_scale(self.ncells)
            out = out.astype(self.dtype)
        return out[..., 0] if single else out

    def replicated(self, x):
        """Mark ``x`` as held identically by every rank: its gradient is summed over the ranks."""
        if self._local is not None:
            return jnp.asarray(x)
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
        if self._local is not None:
            return jnp.sum(jnp.asarray(x))
        return _allsum(self, jnp.asarray(x))

    def count(self, pos) -> int:
        """Global number of particles (allreduce of the local counts)."""
        return int(self._comm.allreduce(int(np.shape(pos)[0])))

    def jit(self, fn):
        """``jax.jit(fn)`` that waits for its result and frees the particle layouts it made.

        Every rank must call the compiled function the same number of times, in the same order
        with the other collective operations (as every operation of this engine). Arguments that
        are JAX arrays of shape (N, 3) in the engine's dtype are taken for particle positions:
        their layouts are made before the call and kept between calls (JAX arrays are immutable),
        so a training step's input particles are routed once, not at every step.

        Parameters
        ----------
        fn : callable
            A function of JAX arrays (pytrees) written against this engine.

        Returns
        -------
        callable with ``fn``'s signature; its results are computed when it returns.
        """
        if self._local is not None:
            return jax.jit(fn)

        def traced(handles, args, kwargs):
            # the positions passed as arguments come with their layouts (made before the call)
            leaves = jax.tree_util.tree_leaves((args, kwargs))
            for x, h in zip(leaves, handles, strict=True):
                if h is not None:
                    self._handles[id(x)] = (x, h)
            return fn(*args, **kwargs)

        compiled = jax.jit(traced)

        @functools.wraps(fn)
        def step(*args, **kwargs):
            # Positions passed as arguments (JAX arrays of shape (N, 3) in the engine's dtype;
            # immutable, so their identity is their content) keep their layout between calls:
            # the training loop's input particles are routed once, not at every step.
            leaves = jax.tree_util.tree_leaves((args, kwargs))
            handles = tuple(self._handle(x) if self._positions(x) else None for x in leaves)
            first = self._next_handle
            self._jit_depth += 1
            try:
                out = compiled(handles, args, kwargs)
                jax.block_until_ready(out)
                jax.effects_barrier()
            finally:
                self._jit_depth -= 1
                if self._jit_depth == 0:
                    self._free_layouts(first)
            return out

        step.compiled = compiled
        return step

    def _positions(self, x) -> bool:
        """Whether an argument of a :meth:`jit` function is taken for particle positions."""
        return (
            isinstance(x, jax.Array)
            and not isinstance(x, jax.core.Tracer)
            and x.ndim == 2
            and x.shape[1] == 3
            and x.dtype == self.dtype
        )

    def describe(self):
        """Configuration of this engine, for provenance records (adds ranks and process mesh)."""
        import pmesh

        from .jax_backend import num_threads

        return super().describe() | {
            "ranks": int(self._comm.size),
            "procmesh": [int(n) for n in self.ppm.np],
            "pmesh": getattr(pmesh, "__version__", "?"),
            "threads": num_threads(),
            "compiled": True,
        }
