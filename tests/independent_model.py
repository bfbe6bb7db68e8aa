"""An independent, test-only implementation of the JERALD model (Rigo, Trotta & Viel 2025), with
hand-written reverse-mode gradients, in numpy + pmesh.

Written from the paper's equations and the spec (model.md) alone: it imports nothing from
``jerald_nbk``. The tests compare the package's forward maps, region losses and gradients with it
(``tests/test_independent_math.py``) and check its own gradients against finite differences of its
own forward map.

Conventions (model.md):

* positions in Mpc/h, periodic box; ``1 + delta = CIC paint of unit masses * Ncells / Nparticles``;
* ``r2c`` divides by the number of cells (k = 0 holds the mean), ``c2r`` does not (pmesh's own);
* ``f = (1 + delta + 1e-8)^gamma``;
* a displacement layer moves ``x -> x + readout(c2r(phi_k iD_d), x)`` with
  ``phi_k = alpha r2c(f) G(k)`` and the finite-difference gradient factor ``iD_d``;
  DM Green's function eq 7 ``exp(-kh/k) exp(-k/kl) k^nu``, stellar / HI eq 6
  ``exp(-(kh/k)^2) exp(-(k/kl)^2) k^nu``; ``G(0) = 0`` (the gradient factor vanishes there);
* HI layer (eq 12): ``phi_k = alpha1 r2c(f1(rho)) G1 - alpha2 r2c(f2(star)) G2`` (alpha2 > 0 pushes
  gas away from stars);
* stellar transform (eq 8) ``ReLU(w (1 + delta + 1e-8)^mu - b)``; HI transform (eqs 13-15)
  ``ReLU(w (ReLU(1 + delta + zs) + 1e-8)^mu - D - b)``,
  ``D = ReLU(beta1 c2r(O_I r2c(star)) + eta) + beta2 (star + 1e-8)^gamma3``,
  ``O_I = exp(-kIh/k) exp(-k/kIl) k^nuI + xi`` with ``O_I(0) = xi``;
* loss (eqs 10-11): ``mean_region |c2r(O_s r2c(F - F_ref))|^p`` with ``O_s = 1 + k^-n``,
  ``O_s(0) = 1``; p = 2 for DM, 1 otherwise;
* split: ``test = i, j, l < int(0.43 N)``, ``train = l >= int(0.5 N)`` outside test, validation the
  rest (LDL: test ``< int(0.44 N)``, validation ``i >= int(0.44 N), j, l < int(0.56 N)``).

Adjoints used by the backward pass: a real-to-real Fourier operator ``h -> c2r(K r2c(h))`` with a
Hermitian kernel K has adjoint ``g -> c2r(conj(K) r2c(g))`` (r2c's 1/Ncells and c2r's missing one
cancel); CIC paint and readout are each other's adjoints; the position derivative of a readout is
pmesh's ``readout(x, gradient=d)`` (per Mpc/h).
"""

from __future__ import annotations

import numpy as np
from pmesh.pm import ParticleMesh

#: epsilon inside every power of a density (model.md)
EPS = 1e-8

TRANSFORM_NAMES = {
    "dm": (),
    "stellar": ("w", "mu", "b"),
    "hi": ("w", "mu", "b", "beta1", "beta2", "eta", "gamma3", "kIh", "kIl", "nuI", "xi"),
}


def layer_names(target: str, i: int) -> list[str]:
    """Physical parameter names of displacement layer ``i`` (the package's naming)."""
    if target == "hi":
        return [f"{p}{t}_{i}" for t in ("1", "2") for p in ("alpha", "gamma", "kh", "kl", "nu")]
    return [f"{p}_{i}" for p in ("alpha", "gamma", "kh", "kl", "nu")]


def param_names(target: str, n_layers: int, hi_shift: bool = False) -> list[str]:
    """All physical parameter names of a target, in the package's order."""
    out = [n for i in range(n_layers) for n in layer_names(target, i)]
    out += list(TRANSFORM_NAMES[target])
    if target == "hi" and hi_shift:
        out.append("zs")
    return out


def split_masks(nmesh, kind: str = "paper") -> dict:
    """Boolean train / validation / test masks of a (global) mesh of shape ``nmesh``."""
    nx, ny, nz = (int(n) for n in nmesh)
    i = np.arange(nx).reshape(-1, 1, 1)
    j = np.arange(ny).reshape(1, -1, 1)
    l = np.arange(nz).reshape(1, 1, -1)  # noqa: E741
    shape = (nx, ny, nz)
    if kind == "paper":
        test = (i < int(0.43 * nx)) & (j < int(0.43 * ny)) & (l < int(0.43 * nz))
        train = (l >= int(0.5 * nz)) & ~test
    elif kind == "ldl":
        test = (i < int(0.44 * nx)) & (j < int(0.44 * ny)) & (l < int(0.44 * nz))
        val = (i >= int(0.44 * nx)) & (j < int(0.56 * ny)) & (l < int(0.56 * nz))
        train = ~test & ~val
    else:
        raise ValueError(kind)
    test = np.broadcast_to(test, shape)
    train = np.broadcast_to(train, shape)
    return {"train": train, "validation": ~train & ~test, "test": test}


class ReferenceModel:
    """JERALD forward maps, region losses and hand-derived gradients on a cubic or non-cubic mesh.

    Parameters
    ----------
    nmesh : int or 3 ints
    boxsize : float or 3 floats (Mpc/h)
    order : {4, 6}
        Finite-difference order of the Fourier gradient.
    star_floor_rel : float
        Floor of the stellar map before normalisation, as a fraction of the raw map's mean:
        ``star = max(m, star_floor_rel * mean(m)) / mean(max(m, star_floor_rel * mean(m)))``.
    """

    def __init__(self, nmesh, boxsize, order: int = 6, star_floor_rel: float = 1e-8):
        self.nmesh = np.broadcast_to(np.asarray(nmesh, dtype=int), (3,)).copy()
        self.box = np.broadcast_to(np.asarray(boxsize, dtype=float), (3,)).copy()
        self.star_floor_rel = star_floor_rel
        self.ppm = ParticleMesh(
            Nmesh=list(self.nmesh), BoxSize=list(self.box), dtype="f8", resampler="cic"
        )
        self.ncells = float(np.prod(self.nmesh))
        # k-grid of the rfft layout, from numpy (angular wavenumbers, h/Mpc)
        nx, ny, nz = self.nmesh
        kx = 2 * np.pi * np.fft.fftfreq(nx, d=self.box[0] / nx)
        ky = 2 * np.pi * np.fft.fftfreq(ny, d=self.box[1] / ny)
        kz = 2 * np.pi * np.fft.rfftfreq(nz, d=self.box[2] / nz)
        self.kvec = (kx.reshape(-1, 1, 1), ky.reshape(1, -1, 1), kz.reshape(1, 1, -1))
        k2 = self.kvec[0] ** 2 + self.kvec[1] ** 2 + self.kvec[2] ** 2
        self.nonzero = k2 > 0
        self.k = np.sqrt(np.where(self.nonzero, k2, 1.0))  # k = 0 evaluated at 1, then masked
        self.cshape = (nx, ny, nz // 2 + 1)
        if order == 6:
            fd = lambda w, h: (45 * np.sin(w) - 9 * np.sin(2 * w) + np.sin(3 * w)) / (30 * h)  # noqa: E731
        elif order == 4:
            fd = lambda w, h: (8 * np.sin(w) - np.sin(2 * w)) / (6 * h)  # noqa: E731
        else:
            raise ValueError(f"order must be 4 or 6, got {order}")
        cells = self.box / self.nmesh
        self.iD = [1j * fd(kv * h, h) for kv, h in zip(self.kvec, cells, strict=True)]

    # -- primitives (pmesh) -----------------------------------------------------------------
    def _wrap(self, x):
        return np.mod(x, self.box)

    def paint(self, x, mass=1.0) -> np.ndarray:
        return np.array(self.ppm.paint(self._wrap(x), mass=mass).value)

    def readout(self, a, x) -> np.ndarray:
        return np.asarray(self.ppm.create(type="real", value=a).readout(self._wrap(x)))

    def readout_grad(self, a, x) -> np.ndarray:
        """d/dx_e of the CIC interpolation of ``a`` at x: (N, 3), per Mpc/h."""
        f = self.ppm.create(type="real", value=a)
        xw = self._wrap(x)
        return np.stack([np.asarray(f.readout(xw, gradient=e)) for e in range(3)], axis=1)

    def r2c(self, a) -> np.ndarray:
        return np.array(self.ppm.create(type="real", value=a).r2c().value)

    def c2r(self, ck) -> np.ndarray:
        return np.array(self.ppm.create(type="complex", value=ck).c2r().value)

    def fourier(self, a, kernel) -> np.ndarray:
        return self.c2r(self.r2c(a) * kernel)

    def density(self, x) -> np.ndarray:
        return self.paint(x) * (self.ncells / len(x))

    # -- kernels ----------------------------------------------------------------------------
    def green(self, kind: str, kh, kl, nu):
        """Green's function (eq 7 ``kind="dm"``, eq 6 ``kind="sm"``) and its parameter derivatives."""
        k, nz = self.k, self.nonzero
        if kind == "dm":
            G = np.exp(-kh / k - k / kl) * k**nu
            d = {"kh": -G / k, "kl": G * k / kl**2}
        elif kind == "sm":
            G = np.exp(-((kh / k) ** 2) - (k / kl) ** 2) * k**nu
            d = {"kh": -2 * kh * G / k**2, "kl": 2 * G * k**2 / kl**3}
        else:
            raise ValueError(kind)
        d["nu"] = G * np.log(k)
        G = np.where(nz, G, 0.0)
        return G, {n: np.where(nz, v, 0.0) for n, v in d.items()}

    def filter_OI(self, kIh, kIl, nuI, xi):
        """Eq 15 ``O_I`` with ``O_I(0) = xi``, and its parameter derivatives."""
        k, nz = self.k, self.nonzero
        E = np.where(nz, np.exp(-kIh / k - k / kIl) * k**nuI, 0.0)
        d = {
            "kIh": np.where(nz, -E / k, 0.0),
            "kIl": np.where(nz, E * k / kIl**2, 0.0),
            "nuI": np.where(nz, E * np.log(k), 0.0),
            "xi": np.ones(self.cshape),
        }
        return E + xi, d

    def smoothing(self, n: float):
        """Eq 11 ``O_s = 1 + k^-n`` with ``O_s(0) = 1``; None for n = 0."""
        if n == 0:
            return None
        return np.where(self.nonzero, 1.0 + self.k ** (-float(n)), 1.0)

    def star_overdensity(self, stellar_map) -> np.ndarray:
        m = np.asarray(stellar_map, dtype=float)
        m = np.maximum(m, self.star_floor_rel * m.mean())
        return m / m.mean()

    # -- displacement layers ------------------------------------------------------------------
    def _layer_terms(self, target, params, i, star):
        """The layer's potential terms: (coefficient, gamma, kh, kl, nu, source or None for rho)."""
        if target == "hi":
            n = layer_names("hi", i)
            p1 = [params[x] for x in n[:5]]
            p2 = [params[x] for x in n[5:]]
            return [(p1[0], *p1[1:], None), (-p2[0], *p2[1:], star)]
        a, g, kh, kl, nu = (params[x] for x in layer_names(target, i))
        return [(a, g, kh, kl, nu, None)]

    def layer_forward(self, x, terms, kind):
        """``x + readout(c2r(phi_k iD_d), x)`` with ``phi_k = sum_t c_t r2c(f_t) G_t``."""
        rho = self.density(x)
        phik = np.zeros(self.cshape, complex)
        cache = {"x": x, "rho": rho, "terms": []}
        for c, g, kh, kl, nu, src in terms:
            base = (rho if src is None else src) + EPS
            f = base**g
            G, dG = self.green(kind, kh, kl, nu)
            phik = phik + c * self.r2c(f) * G
            cache["terms"].append(dict(c=c, g=g, base=base, f=f, G=G, dG=dG, own=src is None))
        cache["phi"] = [self.c2r(phik * D) for D in self.iD]
        s = np.stack([self.readout(p, x) for p in cache["phi"]], axis=1)
        cache["s"] = s
        return x + s, cache

    def layer_backward(self, cache, gxn):
        """Reverse pass of one layer: (dL/dx, [dict of term gradients: c, gamma, kh, kl, nu])."""
        x = cache["x"]
        gx = gxn.copy()
        # s_d = readout(phi_d, x): the position dependence of the readout ...
        for d, phi in enumerate(cache["phi"]):
            gx += gxn[:, d : d + 1] * self.readout_grad(phi, x)
        # ... and the potential: dL/dphi_d = paint(x, gxn_d), through conj(iD_d)
        M = sum(self.r2c(self.paint(x, gxn[:, d])) * np.conj(D) for d, D in enumerate(self.iD))
        grho = np.zeros_like(cache["rho"])
        out = []
        for t in cache["terms"]:
            A = self.c2r(M * t["G"])  # dL/d(c f)
            gf = t["c"] * A
            g = {
                "c": float(np.sum(A * t["f"])),
                "gamma": float(np.sum(gf * t["f"] * np.log(t["base"]))),
            }
            for n, dG in t["dG"].items():
                g[n] = float(t["c"] * np.sum(t["f"] * self.c2r(M * dG)))
            out.append(g)
            if t["own"]:  # the source is rho(x): f = base^gamma
                grho += gf * t["g"] * t["base"] ** (t["g"] - 1)
        gx += (self.ncells / len(x)) * self.readout_grad(grho, x)
        return gx, out

    # -- final transforms ---------------------------------------------------------------------
    def transform_forward(self, target, rho, params, star):
        if target == "dm":
            return rho, None
        if target == "stellar":
            base = rho + EPS
            P = base ** params["mu"]
            Z = params["w"] * P - params["b"]
            return np.maximum(Z, 0.0), dict(base=base, P=P, Z=Z)
        p = params
        zs = p.get("zs", 0.0)
        OI, dOI = self.filter_OI(p["kIh"], p["kIl"], p["nuI"], p["xi"])
        sk = self.r2c(star)
        filt = self.c2r(sk * OI)
        A = p["beta1"] * filt + p["eta"]
        S3 = (star + EPS) ** p["gamma3"]
        D = np.maximum(A, 0.0) + p["beta2"] * S3
        inner = rho + zs
        base = np.maximum(inner, 0.0) + EPS
        P = base ** p["mu"]
        Z = p["w"] * P - D - p["b"]
        cache = dict(sk=sk, dOI=dOI, filt=filt, A=A, S3=S3, inner=inner, base=base, P=P, Z=Z)
        return np.maximum(Z, 0.0), cache

    def transform_backward(self, target, params, star, cache, gF):
        """(dL/drho, dict of transform parameter gradients)."""
        if target == "dm":
            return gF, {}
        p = params
        gZ = np.where(cache["Z"] > 0, gF, 0.0)
        P, base = cache["P"], cache["base"]
        g = {
            "w": float(np.sum(gZ * P)),
            "mu": float(np.sum(gZ * p["w"] * P * np.log(base))),
            "b": float(-np.sum(gZ)),
        }
        dP = gZ * p["w"] * p["mu"] * base ** (p["mu"] - 1)
        if target == "stellar":
            return dP, g
        gD = -gZ
        g["beta2"] = float(np.sum(gD * cache["S3"]))
        g["gamma3"] = float(np.sum(gD * p["beta2"] * cache["S3"] * np.log(star + EPS)))
        gA = np.where(cache["A"] > 0, gD, 0.0)
        g["beta1"] = float(np.sum(gA * cache["filt"]))
        g["eta"] = float(np.sum(gA))
        gfilt = gA * p["beta1"]
        for n, dO in cache["dOI"].items():
            g[n] = float(np.sum(gfilt * self.c2r(cache["sk"] * dO)))
        grho = np.where(cache["inner"] > 0, dP, 0.0)
        if "zs" in p:
            g["zs"] = float(np.sum(grho))
        return grho, g

    # -- the model ------------------------------------------------------------------------------
    def _check(self, target, params, n_layers, star):
        names = param_names(target, n_layers, "zs" in params)
        if set(params) != set(names):
            raise ValueError(f"parameters {sorted(params)} != {sorted(names)}")
        if target == "hi" and star is None:
            raise ValueError("HI needs the stellar map")

    def forward(self, target, params, pos, n_layers, stellar_map=None, _cache=None):
        """Predicted map F of ``target`` ("dm", "stellar", "hi") from input particles ``pos``."""
        self._check(target, params, n_layers, stellar_map)
        kind = "dm" if target == "dm" else "sm"
        star = None if stellar_map is None else self.star_overdensity(stellar_map)
        x = np.asarray(pos, dtype=float)
        layers = []
        for i in range(n_layers):
            x, c = self.layer_forward(x, self._layer_terms(target, params, i, star), kind)
            layers.append(c)
        rho = self.density(x)
        F, tc = self.transform_forward(target, rho, params, star)
        if _cache is not None:
            _cache.update(layers=layers, x=x, tcache=tc, star=star, kind=kind)
        return F

    def region_losses(self, F, F_ref, p: int, n: float = 0.0, kind: str = "paper"):
        """Eq 10 per region, and the residual r_s (after smoothing)."""
        Os = self.smoothing(n)
        r = F - F_ref
        rs = r if Os is None else self.fourier(r, Os)
        e = np.abs(rs) ** p
        masks = split_masks(self.nmesh, kind)
        return {k: float(e[m].sum() / m.sum()) for k, m in masks.items()}, rs, masks

    def loss_and_grad(
        self, target, params, pos, F_ref, n_layers, p, n=0.0, stellar_map=None, split="paper"
    ):
        """Region losses and the gradient of the train loss w.r.t. every physical parameter.

        Returns ``(losses dict, gradient dict by parameter name, F)``.
        """
        cache: dict = {}
        F = self.forward(target, params, pos, n_layers, stellar_map, _cache=cache)
        losses, rs, masks = self.region_losses(F, F_ref, p, n, split)
        m = masks["train"]
        if p == 2:
            grs = np.where(m, 2 * rs, 0.0) / m.sum()
        elif p == 1:
            grs = np.where(m, np.sign(rs), 0.0) / m.sum()
        else:
            raise ValueError(p)
        Os = self.smoothing(n)
        gF = grs if Os is None else self.fourier(grs, Os)  # O_s is real and even: self-adjoint
        star = cache["star"]
        grho, grad = self.transform_backward(target, params, star, cache["tcache"], gF)
        x = cache["x"]
        gx = (self.ncells / len(x)) * self.readout_grad(grho, x)
        for i in reversed(range(n_layers)):
            gx, terms = self.layer_backward(cache["layers"][i], gx)
            names = layer_names(target, i)
            groups = [names[:5], names[5:]] if target == "hi" else [names]
            for t, (gt, nm) in enumerate(zip(terms, groups, strict=True)):
                sign = -1.0 if t == 1 else 1.0  # HI: coefficient of the stellar term is -alpha2
                grad[nm[0]] = sign * gt["c"]
                for key, name in zip(("gamma", "kh", "kl", "nu"), nm[1:], strict=True):
                    grad[name] = gt[key]
        return losses, grad, F

    def train_loss(self, target, params, pos, F_ref, n_layers, p, n=0.0, stellar_map=None):
        F = self.forward(target, params, pos, n_layers, stellar_map)
        return self.region_losses(F, F_ref, p, n)[0]["train"]

    def finite_difference(
        self, target, params, pos, F_ref, n_layers, p, n=0.0, stellar_map=None, rel_step=1e-6
    ):
        """Central finite differences of the train loss, step ``rel_step * max(|value|, 1e-2)``."""
        out = {}
        for name, v in params.items():
            h = rel_step * max(abs(v), 1e-2)
            lo, hi = dict(params), dict(params)
            lo[name], hi[name] = v - h, v + h
            f_hi = self.train_loss(target, hi, pos, F_ref, n_layers, p, n, stellar_map)
            f_lo = self.train_loss(target, lo, pos, F_ref, n_layers, p, n, stellar_map)
            out[name] = (f_hi - f_lo) / (2 * h)
        return out
