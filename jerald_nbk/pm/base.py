"""The seam between the model and the particle-mesh engines.

The model (``jerald_nbk.model``) is written once against :class:`ParticleMesh`. Two engines
implement it:

* :class:`jerald_nbk.pm.jax_backend.JaxEngine`: one process, whole mesh, C++ CIC kernels through XLA
  FFI on CPU, a pure-JAX scatter/gather path on GPU;
* :class:`jerald_nbk.pm.pmesh_backend.PmeshEngine`: MPI, each rank holds its particles and a slab of
  the mesh; compiled too, with its distributed operations (particle layouts and exchanges, pfft
  FFTs, the C++ CIC kernels on each slab) in ordered callbacks.

Arrays crossing the seam are JAX arrays. Real meshes are the *local* part of the mesh (the whole
mesh on the JAX engine), optionally with a trailing channel axis; complex meshes are the local part
of the rfft layout. :meth:`kvec` and :meth:`mesh_index` describe those local layouts, so elementwise
Fourier kernels, masks and reductions written against them run on both engines.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np

from ..geometry import box_vector, mesh_vector
from . import fourier


class ParticleMesh(abc.ABC):
    """Particle-mesh operations with exact adjoints, on a periodic box.

    Parameters
    ----------
    Nmesh : int or sequence of 3 ints
        Mesh cells per axis (non-cubic allowed).
    BoxSize : float or sequence of 3 floats
        Box size per axis in Mpc/h.
    dtype : {"f4", "f8"}
        Real dtype of meshes and positions (float32 by default; float64 needs ``jax_enable_x64``).
    """

    #: name of the engine, recorded with results ("jax" or "pmesh")
    name: str = "?"

    def __init__(self, Nmesh, BoxSize, dtype="f4"):
        nmesh = mesh_vector(Nmesh, "the engine's Nmesh")
        box = box_vector(BoxSize, "the engine's BoxSize")
        self.Nmesh = tuple(int(n) for n in nmesh)
        self.BoxSize = np.array(box, dtype=float)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        if self.dtype == np.float64:
            import jax

            if not jax.config.read("jax_enable_x64"):
                raise ValueError(
                    "float64 meshes need jax_enable_x64: call "
                    "jax.config.update('jax_enable_x64', True) before creating arrays"
                )

    # -- geometry -----------------------------------------------------------------------------
    @property
    def ncells(self) -> int:
        """Total number of cells of the (global) mesh."""
        return int(np.prod(self.Nmesh))

    @property
    def cellsize(self) -> np.ndarray:
        """Cell size per axis, Mpc/h."""
        return self.BoxSize / np.array(self.Nmesh)

    @property
    def comm(self):
        """MPI communicator (``None`` for single-process engines)."""
        return None

    @abc.abstractmethod
    def kvec(self) -> tuple:
        """k-vector components (h/Mpc) broadcastable to the local complex mesh."""

    def knorm(self):
        """|k| of the local complex mesh, k = 0 replaced by :data:`fourier.K_FLOOR`."""
        import jax.numpy as jnp

        return fourier.knorm(self.kvec(), xp=jnp)

    def fourier_factor(self, kind: str, fn):
        """``fn(|k|)`` on the local complex mesh with the k = 0 value of :data:`fourier.K0_VALUES`."""
        import jax.numpy as jnp

        return fourier.fourier_factor(self.kvec(), kind, fn, xp=jnp)

    def gradient_kernels(self, order=6) -> tuple:
        """The three Fourier gradient factors ``1j D(k_i)`` (see :func:`fourier.gradient_kernel`)."""
        import jax.numpy as jnp

        return tuple(
            fourier.gradient_kernel(k, float(h), order=order, xp=jnp)
            for k, h in zip(self.kvec(), self.cellsize, strict=True)
        )

    def gradient_mesh(self, phik, order=6):
        """The gradient of a potential given in Fourier space, as a real 3-channel mesh (..., 3).

        ``c2r(phik * 1j D(k_i))`` for each axis (:meth:`gradient_kernels`): three inverse FFTs.
        Engines that hold the whole mesh may take the finite differences in real space instead
        (one inverse FFT; the same values to rounding).
        """
        import jax.numpy as jnp

        return jnp.stack([self.c2r(phik * d) for d in self.gradient_kernels(order)], axis=-1)

    def readout_gradient(self, phik, pos, order=6):
        """:meth:`gradient_mesh` read out at the particles: (N, 3).

        Engines may avoid keeping the 3-channel gradient mesh for the backward pass.
        """
        return self.readout(self.gradient_mesh(phik, order), pos)

    def displace(self, pos, source, args=(), order=6, density=None):
        """A displacement layer (eq 1): ``pos + grad(phi)(pos)``, ``phi`` from the particles' density.

        Parameters
        ----------
        pos : (N, 3) array
            Particle positions.
        source : callable
            ``source(rho, *args)``: the potential in Fourier space, from ``rho = 1 + delta``.
        args : tuple
            Its other (differentiable) arguments: a layer's parameters, a frozen map.
        order : {4, 6, "exact"}
            Order of the gradient (:meth:`gradient_kernels`).
        density : real mesh, optional
            ``self.density(pos)`` if already known.

        Returns
        -------
        (N, 3) array
            The displaced positions. Engines may take the whole backward pass at once (the
            position cotangents of the paint, of the readout and of ``pos`` itself in one pass).
        """
        rho = self.density(pos) if density is None else density
        return pos + self.readout_gradient(source(rho, *args), pos, order)

    @abc.abstractmethod
    def mesh_index(self) -> tuple:
        """Global integer cell indices (i, j, l) broadcastable to the local real mesh."""

    # -- operations ---------------------------------------------------------------------------
    @abc.abstractmethod
    def paint(self, pos, mass=None):
        """CIC-paint particles: ``mesh[c] = sum_p mass_p W(x_p - c)``.

        ``mass`` may be None (unit masses), shape (N,), or (N, C) for a C-channel mesh. The total of
        the mesh equals the total mass. Differentiable in ``pos`` and ``mass``.
        """

    @abc.abstractmethod
    def readout(self, mesh, pos):
        """CIC-interpolate ``mesh`` (local real, optional trailing channels) at ``pos``.

        Returns (N,) or (N, C). The exact adjoint of :meth:`paint`; differentiable in both inputs.
        """

    @abc.abstractmethod
    def r2c(self, mesh):
        """Forward FFT of a real mesh, divided by the number of cells (k = 0 holds the mean)."""

    @abc.abstractmethod
    def c2r(self, cmesh):
        """Inverse FFT (not divided), so ``c2r(r2c(f)) == f``."""

    def sum(self, x):
        """Global sum of a (local) array over all ranks; differentiable."""
        import jax.numpy as jnp

        return jnp.sum(x)

    def replicated(self, x):
        """Mark ``x`` (e.g. the model parameters) as the same on every rank.

        The identity in value. On the MPI engine its gradient is summed over the ranks, because
        each rank's backward pass only sees the uses of ``x`` on its own particles and mesh slab.
        Model code passes every replicated differentiable input through it.
        """
        return x

    def count(self, pos) -> int:
        """Global number of particles."""
        return int(pos.shape[0])

    def static_key(self):
        """Hashable key of everything a compiled function may bake in from this engine, or None.

        Two engines with equal keys compute the same thing from the same inputs, so a function
        compiled against one may be reused with the other (:class:`~jerald_nbk.train.loop.Objective`
        and :meth:`~jerald_nbk.model.pipeline.Pipeline.maps_many` cache their compiled functions by
        it). None (the default, and the MPI engine's): nothing is shared between engine objects.
        """
        return None

    def jit(self, fn: Callable) -> Callable:
        """``fn`` compiled (``jax.jit``; the MPI engine's also frees its particle layouts)."""
        import jax

        return jax.jit(fn)

    def _weights(self, pos, mass):
        """(N, C) particle weights of :meth:`paint`: unit masses, a scalar, (N,) or (N, C) ``mass``."""
        import jax.numpy as jnp

        n = pos.shape[0]
        if mass is None:
            return jnp.ones((n, 1), self.dtype)
        mass = jnp.asarray(mass).astype(self.dtype)
        if mass.ndim == 0:  # one mass for every particle
            return jnp.full((n, 1), mass, self.dtype)
        w = mass[:, None] if mass.ndim == 1 else mass
        if w.ndim != 2 or w.shape[0] != n:
            raise ValueError(
                f"mass has {w.shape[0]} entries for {n} particles (mass shape {mass.shape})"
            )
        return w

    def density(self, pos):
        """``1 + delta`` of unit-mass particles: CIC paint times ``ncells / N_total``."""
        return self.paint(pos) * (self.ncells / self.count(pos))

    def apply_fourier(self, mesh, kernel):
        """``c2r(kernel * r2c(mesh))`` for a kernel broadcastable to the local complex mesh."""
        return self.c2r(self.r2c(mesh) * kernel)

    def describe(self) -> dict:
        """Configuration of this engine, for provenance records."""
        return {
            "backend": self.name,
            "Nmesh": list(self.Nmesh),
            "BoxSize": self.BoxSize.tolist(),
            "dtype": self.dtype.name,
        }
