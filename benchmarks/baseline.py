"""The baseline of the training-step benchmarks: one DM displacement layer's loss and gradient,
written the straightforward way LDL computes it, with numpy and pmesh only (no JAX).

Forward (pmesh conventions: r2c divides by the cell count, c2r does not)::

    rho = paint(x) Nc/N;  f = (rho + eps)^gamma;  fk = r2c(f)
    phi_d = c2r(fk G iD_d);  s_d = readout(phi_d, x);  x' = x + alpha s
    F = paint(x') Nc/N;  L = sum_train (F - F_ref)^2 / N_train

Backward, by hand: every Fourier multiplier M is its own kind of adjoint (conj(M)), paint and
readout are each other's adjoints, and the gradient of CIC readout gives the position derivative.
Used by the benchmarks (speed baseline) and by a test (gradient parity with the JAX model).
"""

from __future__ import annotations

import numpy as np


class NumpyPmeshDMLayer:
    """Loss and gradient of a 1-layer DM model w.r.t. (alpha, gamma, kh, kl, nu), numpy + pmesh.

    Parameters
    ----------
    pos : (N, 3) array
        Input particles, Mpc/h.
    target : (Nmesh,)*3 array
        Reference 1 + delta.
    train_mask : boolean array like target
    Nmesh, BoxSize : mesh and box
    dtype : "f4" or "f8"
    """

    def __init__(self, pos, target, train_mask, Nmesh, BoxSize, dtype="f4", order=6):
        from pmesh.pm import ParticleMesh

        self.ppm = ParticleMesh(Nmesh=[Nmesh] * 3, BoxSize=BoxSize, dtype=dtype, resampler="cic")
        self.pos = np.asarray(pos, dtype=dtype)
        self.n = len(self.pos)
        self.nc = float(Nmesh) ** 3
        self.target = self.ppm.create(type="real", value=np.asarray(target))
        self.mask = np.asarray(train_mask)
        self.nmask = self.mask.sum()
        c = self.ppm.create(type="complex")
        kvec = [np.asarray(k, dtype=float) for k in c.x]
        k2 = sum(k**2 for k in kvec)
        self.nonzero = k2 > 0
        self.k = np.sqrt(np.where(self.nonzero, k2, 1.0))
        h = BoxSize / Nmesh
        w = [k * h for k in kvec]
        if order != 6:
            raise ValueError("the baseline implements the 6th-order gradient only")
        self.iD = [1j * (45 * np.sin(x) - 9 * np.sin(2 * x) + np.sin(3 * x)) / (30 * h) for x in w]

    def _density(self, x):
        return self.ppm.paint(x, mass=1.0) * (self.nc / self.n)

    def loss_and_grad(self, alpha, gamma, kh, kl, nu, eps=1e-8):
        """Train loss and its gradient with respect to the 5 physical parameters."""
        ppm, x = self.ppm, self.pos
        k, nz = self.k, self.nonzero
        G = np.where(nz, np.exp(-kh / k - k / kl) * k**nu, 0.0)
        rho = self._density(x)
        base = rho.value + eps
        f = ppm.create(type="real", value=base**gamma)
        fk = f.r2c()
        s = np.empty_like(x)
        for d in range(3):
            phi = (fk * (G * self.iD[d])).c2r()
            s[:, d] = phi.readout(x)
        x2 = x + alpha * s
        F = self._density(x2)
        r = F.value - self.target.value
        loss = float((r[self.mask] ** 2).sum() / self.nmask)

        # dL/dF, then dL/dx' through the paint (readout of dL/dF with the CIC gradient)
        gF = ppm.create(type="real", value=np.where(self.mask, 2 * r / self.nmask, 0.0))
        gx2 = np.stack([gF.readout(x2, gradient=d) for d in range(3)], axis=1)
        gx2 *= self.nc / self.n  # pmesh's CIC gradient is already per Mpc/h
        g_alpha = float((gx2 * s).sum())
        # dL/dphi_d = paint of alpha dL/dx'_d at x; then back through the multipliers
        M = None
        for d in range(3):
            gphi = ppm.paint(x, mass=alpha * gx2[:, d]).r2c()
            term = gphi * np.conj(self.iD[d])
            M = term if M is None else M + term
        # the adjoint of f -> c2r(H r2c(f)) is g -> c2r(conj(H) r2c(g)): r2c's 1/Nc and c2r cancel
        gf = (M * G).c2r().value
        g_gamma = float((gf * f.value * np.log(base)).sum())
        dG = {
            "kh": np.where(nz, -G / k, 0.0),
            "kl": np.where(nz, G * k / kl**2, 0.0),
            "nu": np.where(nz, G * np.log(k), 0.0),
        }
        gk = {n: float(((M * v).c2r().value * f.value).sum()) for n, v in dG.items()}
        return loss, np.array([g_alpha, g_gamma, gk["kh"], gk["kl"], gk["nu"]])
