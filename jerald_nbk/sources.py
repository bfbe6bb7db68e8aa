"""nbodykit adapters: JERALD-improved particle catalogs and JERALD maps as nbodykit sources.

* :class:`JeraldCatalog` is a :class:`nbodykit.base.catalog.CatalogSource` whose ``Position`` column
  holds the DM-improved positions of any input catalog with a ``Position`` column (a FastPM
  ``BigFileCatalog``, an ``ArrayCatalog``, ...). Every other column of the input passes through.
* :class:`JeraldMesh` is a :class:`nbodykit.base.mesh.MeshSource` painting the DM (``1 + delta`` of
  the improved particles), stellar-mass or HI map predicted from a catalog.

Both work with the rest of nbodykit (``to_mesh``, ``FFTPower``, ``save``, ``apply``, ...). Under MPI
(communicator with more than one rank) the model runs on the pmesh engine
(:class:`jerald_nbk.pm.pmesh_backend.PmeshPM`): each rank displaces its own rows of the catalog and
holds one slab of the mesh, the same slab as nbodykit's own ``pm`` (checked; a different layout is
redistributed). With one rank the single-process JAX engine runs.

Importing this module imports nbodykit (slow); ``import jerald_nbk`` does not import it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
from nbodykit.base.catalog import CatalogSource
from nbodykit.base.mesh import MeshSource

from .utils import atomic_dir

__all__ = ["JeraldCatalog", "JeraldMesh"]

#: relative tolerance when comparing box sizes from different sources of truth
_BOX_RTOL = 1e-6


# --------------------------------------------------------------------------------------------
# helpers


def _vec3(value, dtype=float) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=dtype), (3,)).copy()


def _agree(name: str, candidates: list[tuple[str, object]], integer: bool = False):
    """The value of ``name`` that every present candidate agrees on (None if none present).

    Raises
    ------
    ValueError
        Naming the two sources and their values when two candidates disagree.
    """
    present = [(label, v) for label, v in candidates if v is not None]
    if not present:
        return None
    label0, v0 = present[0]
    ref = _vec3(v0, int if integer else float)
    for label, v in present[1:]:
        vec = _vec3(v, int if integer else float)
        same = np.array_equal(vec, ref) if integer else np.allclose(vec, ref, rtol=_BOX_RTOL)
        if not same:
            raise ValueError(
                f"{name} mismatch: {label0} has {name} {ref.tolist()}, "
                f"but {label} has {name} {vec.tolist()}"
            )
    return ref


def _resolve_comm(comm, source):
    if comm is None:
        comm = getattr(source, "comm", None)
    if comm is None:
        from nbodykit import CurrentMPIComm

        comm = CurrentMPIComm.get()
    return comm


def _engine(Nmesh, BoxSize, dtype, backend: str, comm):
    """A particle-mesh engine for this communicator (``auto``: pmesh with > 1 rank, else JAX)."""
    from .pm import make_pm

    if backend == "auto":
        backend = "pmesh" if comm.size > 1 else "jax"
    if backend == "jax" and comm.size > 1:
        raise ValueError(
            f"backend='jax' runs on one process, but the communicator has {comm.size} ranks: "
            "use backend='pmesh' or 'auto'"
        )
    return make_pm(Nmesh, BoxSize, dtype=dtype, backend=backend, comm=comm)


class _StageSpec:
    """A stage given as a parameter-file path or as ``(Stage, raw)``, before it is built."""

    def __init__(self, spec, what: str):
        from .model.pipeline import Stage

        self.what = what
        self.stage = None
        self.path = None
        if isinstance(spec, str | os.PathLike):
            from .io.paramfiles import load_params

            self.path = Path(spec)
            self.config, self.raw, self.provenance = load_params(self.path)
            self.label = f"parameter file {self.path}"
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], Stage):
            self.stage, raw = spec
            self.raw = np.asarray(raw, dtype=float)
            self.config = self.stage.config
            self.provenance = {}
            self.label = f"{what} stage"
        else:
            raise TypeError(
                f"{what} parameters must be a parameter-file path or a (Stage, raw) tuple, "
                f"got {type(spec).__name__}"
            )
        if self.config.target != what:
            raise ValueError(
                f"{self.label} holds a {self.config.target!r} model, expected {what!r}"
            )

    def geometry(self):
        """``(label, Nmesh, BoxSize)`` this stage was trained / built at (None when unknown)."""
        if self.stage is not None:
            return self.label, self.stage.pm.Nmesh, self.stage.pm.BoxSize
        return self.label, self.provenance.get("Nmesh"), self.provenance.get("BoxSize")

    def build(self, engine):
        """``(Stage, raw)`` on ``engine`` (a given Stage keeps its own engine, checked)."""
        from .model.pipeline import Stage

        if self.stage is None:
            return Stage(engine, self.config), self.raw
        pm = self.stage.pm
        if tuple(pm.Nmesh) != tuple(engine.Nmesh) or not np.allclose(pm.BoxSize, engine.BoxSize):
            raise ValueError(
                f"{self.label}: its engine has Nmesh {list(pm.Nmesh)}, BoxSize "
                f"{pm.BoxSize.tolist()}, the source needs Nmesh {list(engine.Nmesh)}, BoxSize "
                f"{engine.BoxSize.tolist()}"
            )
        if engine.comm is not None and engine.comm.size > 1 and pm.comm is None:
            raise ValueError(
                f"{self.label} runs on the single-process engine {pm.name!r}, but the catalog is "
                f"split over {engine.comm.size} ranks: build the stage on PmeshPM, or pass a "
                "parameter file"
            )
        return self.stage, self.raw

    def describe(self) -> dict:
        return {
            "params": str(self.path) if self.path is not None else "<in memory>",
            "layers": int(self.config.n_layers),
            "config": json.dumps(self.config.as_dict()),
        }


def _source_geometry(source):
    attrs = getattr(source, "attrs", {}) or {}
    return attrs.get("Nmesh"), attrs.get("BoxSize")


def _local_positions(source, dtype) -> np.ndarray:
    if "Position" not in source:
        raise ValueError(
            f"input catalog {type(source).__name__} has no 'Position' column "
            f"(columns: {sorted(source.columns)})"
        )
    pos = np.asarray(source["Position"].compute(), dtype=dtype)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"input catalog Position has shape {pos.shape}, expected (N, 3)")
    return pos


def _provenance_attrs(engine, stages: dict) -> dict:
    from . import __version__

    out = {
        "jerald.version": __version__,
        "jerald.backend": engine.name,
        "jerald.Nmesh": np.array(engine.Nmesh, dtype="i8"),
        "jerald.BoxSize": np.array(engine.BoxSize, dtype="f8"),
    }
    for name, spec in stages.items():
        if spec is None:
            continue
        for key, value in spec.describe().items():
            out[f"jerald.{name}.{key}"] = value
    return out


# --------------------------------------------------------------------------------------------
# catalog


class JeraldCatalog(CatalogSource):
    """A catalog whose ``Position`` column holds the JERALD DM-improved positions.

    Parameters
    ----------
    source : CatalogSource
        Any nbodykit catalog with a ``Position`` column (Mpc/h), e.g. ``BigFileCatalog(path,
        dataset="1")`` of a FastPM run. Its other columns pass through unchanged.
    params : path-like, ``(Stage, raw)`` or Pipeline
        The trained DM stage: a JSON parameter file (:func:`jerald_nbk.io.paramfiles.save_params`),
        a built stage with its raw vector, or a :class:`~jerald_nbk.model.pipeline.Pipeline`
        (its ``dm`` stage is used).
    comm : MPI communicator, optional
        Default: the source's. Each rank displaces its own rows of the source.
    BoxSize : float or 3 floats, optional
        Mpc/h. Default from the parameter file's provenance and the source's ``attrs``; every value
        given (argument, parameter file, catalog) must agree.
    Nmesh : int or 3 ints, optional
        Mesh of the displacement layers; default from the parameter file (and the catalog's
        ``attrs['Nmesh']`` if present), which must agree with the argument.
    backend : {"auto", "jax", "pmesh"}
        Engine; ``auto`` is pmesh with more than one rank, JAX otherwise.
    dtype : {"f4", "f8"}
        Precision of the model (the column keeps the source's Position dtype).
    wrap : bool
        Wrap the improved positions into ``[0, BoxSize)`` (default; the layers move particles
        across the periodic boundary).

    Attributes
    ----------
    attrs : dict
        The source's attrs, plus ``BoxSize`` and ``Nmesh`` (so ``to_mesh()`` needs no arguments)
        and provenance: ``jerald.version``, ``jerald.backend``, ``jerald.Nmesh``,
        ``jerald.BoxSize``, ``jerald.dm.params`` (the file), ``jerald.dm.layers``,
        ``jerald.dm.config``.
    engine : ParticleMesh
        The engine the layers ran on.

    Examples
    --------
    >>> from nbodykit.lab import BigFileCatalog, FFTPower
    >>> cat = JeraldCatalog(BigFileCatalog("fastpm/fpm_1.0000", dataset="1"), "dm_params.json")
    >>> power = FFTPower(cat.to_mesh(resampler="cic", compensated=True), mode="1d").power
    """

    def __init__(
        self,
        source,
        params,
        comm=None,
        BoxSize=None,
        Nmesh=None,
        backend: str = "auto",
        dtype: str = "f4",
        wrap: bool = True,
    ):
        from .model.pipeline import Pipeline

        comm = _resolve_comm(comm, source)
        if getattr(source, "comm", comm).size != comm.size:
            raise ValueError(
                f"the source catalog lives on {source.comm.size} ranks, comm has {comm.size}"
            )
        if isinstance(params, Pipeline):
            if params.dm is None:
                raise ValueError("the Pipeline given as params has no DM stage")
            params = params.dm
        spec = _StageSpec(params, "dm")
        src_nmesh, src_box = _source_geometry(source)
        plabel, p_nmesh, p_box = spec.geometry()
        box = _agree(
            "BoxSize",
            [("the BoxSize argument", BoxSize), (plabel, p_box), ("the input catalog", src_box)],
        )
        nmesh = _agree(
            "Nmesh",
            [("the Nmesh argument", Nmesh), (plabel, p_nmesh), ("the input catalog", src_nmesh)],
            integer=True,
        )
        if box is None or nmesh is None:
            raise ValueError(
                f"{'BoxSize' if box is None else 'Nmesh'} is not given and neither {plabel} nor "
                "the input catalog records it: pass it"
            )
        if spec.stage is not None and spec.stage.pm.comm is not None:
            engine = spec.stage.pm
        else:
            engine = _engine(nmesh, box, dtype, backend, comm)
        stage, raw = spec.build(engine)
        self.engine = stage.pm

        pos = _local_positions(source, stage.pm.dtype)
        improved = np.asarray(stage.displace(pos, raw), dtype=np.float64)
        if wrap:
            improved = np.mod(improved, box)
        src_dtype = source["Position"].dtype
        self._improved = improved.astype(src_dtype if src_dtype.kind == "f" else np.float64)
        self._source = source
        self._passthrough = [
            c for c in source.columns if c != "Position" and not source[c].is_default
        ]
        self._size = len(self._improved)
        if self._size != source.size:
            raise RuntimeError(f"{self._size} improved positions for {source.size} rows")

        self.attrs.update(getattr(source, "attrs", {}))
        self.attrs["BoxSize"] = np.array(box, dtype="f8")
        self.attrs["Nmesh"] = np.array(nmesh, dtype="i8")
        self.attrs.update(_provenance_attrs(self.engine, {"dm": spec}))
        CatalogSource.__init__(self, comm)

    @property
    def hardcolumns(self):
        """``Position`` (improved) and every non-default column of the input."""
        if self.base is not None:
            return self.base.hardcolumns
        return sorted(["Position", *self._passthrough])

    def get_hardcolumn(self, col):
        """The improved ``Position``, or the input catalog's column (dask arrays)."""
        if col == "Position":
            return self.make_column(self._improved)
        if col in self._passthrough:
            return self.make_column(self._source[col])
        return CatalogSource.get_hardcolumn(self, col)

    def save(self, output, *args, **kwargs):
        """``CatalogSource.save`` into a temporary directory renamed onto ``output`` at the end."""
        with atomic_dir(output, self.comm) as tmp:
            CatalogSource.save(self, str(tmp), *args, **kwargs)


# --------------------------------------------------------------------------------------------
# mesh

TARGETS = ("dm", "stellar", "hi")


class JeraldMesh(MeshSource):
    """The DM, stellar-mass or HI map that JERALD predicts from a catalog, as a MeshSource.

    Parameters
    ----------
    source : CatalogSource
        Input particles (``Position`` in Mpc/h): FastPM output, or already improved positions
        (e.g. a :class:`JeraldCatalog`) with ``dm=None``.
    dm, stellar, hi : path-like or ``(Stage, raw)``, optional
        Trained stages (JSON parameter files or built stages). ``dm=None`` paints the input
        positions as they are. ``target="stellar"`` needs ``stellar``; ``target="hi"`` needs
        ``stellar`` and ``hi`` (the HI model uses the frozen stellar map).
    target : {"dm", "stellar", "hi"}
        Which map: ``1 + delta`` of the (improved) particles, stellar mass (1e10 Msun/h per cell) or
        the HI map in the units of the HI training target.
    Nmesh, BoxSize : optional
        Default from the parameter files' provenance and the source's attrs (all must agree).
    comm : MPI communicator, optional
        Default: the source's.
    backend : {"auto", "jax", "pmesh"}
        As in :class:`JeraldCatalog`.
    dtype : {"f4", "f8"}
        Mesh and model precision.

    Notes
    -----
    The map is computed once, at the first ``compute()`` / ``to_real_field()``, and cached; views
    made by ``apply`` share it. On the pmesh engine the local slab is nbodykit's own slab of the
    mesh when the two layouts agree (same Nmesh, BoxSize, dtype and communicator: the usual case);
    otherwise the mesh is redistributed (an allgather, with a warning).
    """

    def __init__(
        self,
        source,
        dm=None,
        stellar=None,
        hi=None,
        target: str = "dm",
        Nmesh=None,
        BoxSize=None,
        comm=None,
        backend: str = "auto",
        dtype: str = "f4",
    ):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target in ("stellar", "hi") and stellar is None:
            raise ValueError(f"target={target!r} needs the stellar parameters (stellar=...)")
        if target == "hi" and hi is None:
            raise ValueError("target='hi' needs the HI parameters (hi=...)")
        comm = _resolve_comm(comm, source)
        specs = {
            "dm": None if dm is None else _StageSpec(dm, "dm"),
            "stellar": None
            if stellar is None or target == "dm"
            else _StageSpec(stellar, "stellar"),
            "hi": None if hi is None or target != "hi" else _StageSpec(hi, "hi"),
        }
        src_nmesh, src_box = _source_geometry(source)
        geo = [s.geometry() for s in specs.values() if s is not None]
        box = _agree(
            "BoxSize",
            [("the BoxSize argument", BoxSize)]
            + [(lab, b) for lab, _, b in geo]
            + [("the input catalog", src_box)],
        )
        nmesh = _agree(
            "Nmesh",
            [("the Nmesh argument", Nmesh)]
            + [(lab, n) for lab, n, _ in geo]
            + [("the input catalog", src_nmesh)],
            integer=True,
        )
        if box is None or nmesh is None:
            raise ValueError(
                f"{'BoxSize' if box is None else 'Nmesh'} is not given and neither the parameter "
                "files nor the input catalog record it: pass it"
            )
        given = [s.stage.pm for s in specs.values() if s is not None and s.stage is not None]
        if given and given[0].comm is not None:
            engine = given[0]
        else:
            engine = _engine(nmesh, box, dtype, backend, comm)
        self.engine = engine
        self._stages = {k: (None if s is None else s.build(engine)) for k, s in specs.items()}
        self._source = source
        self._target = target
        self._local = None

        MeshSource.__init__(self, comm, nmesh, box, np.dtype(dtype))
        self.attrs.update(_provenance_attrs(engine, specs))
        self.attrs["target"] = target
        self.attrs["units"] = {
            "dm": "1+delta",
            "stellar": "1e10 Msun/h per cell",
            "hi": "HI training-target units",
        }[target]
        redshift = next(
            (s.provenance["redshift"] for s in specs.values() if s and "redshift" in s.provenance),
            None,
        )
        if redshift is not None:
            self.attrs["redshift"] = float(redshift)

    def __repr__(self):
        return f"JeraldMesh(target={self._target!r}, Nmesh={list(self.pm.Nmesh)})"

    def _compute_local(self) -> np.ndarray:
        """This rank's slab of the map on the engine's layout (all ranks must call it)."""
        from .model.pipeline import Pipeline

        st = self._stages
        pos = _local_positions(self._source, self.engine.dtype)
        if self._target == "dm":
            x = Pipeline(dm=st["dm"]).improve(pos)
            return np.asarray(self.engine.density(x))
        pipe = Pipeline(dm=st["dm"], stellar=st["stellar"], hi=st["hi"])
        x = pipe.improve(pos)
        star = st["stellar"][0].forward(x, st["stellar"][1])
        if self._target == "stellar":
            return np.asarray(star)
        return np.asarray(st["hi"][0].forward(x, st["hi"][1], star=star))

    def to_real_field(self, out=None, normalize=True):
        """The map as a :class:`pmesh.pm.RealField` on ``self.pm`` (computed once, then cached).

        ``out`` and ``normalize`` (MeshSource's signature) are ignored: the map is returned as the
        model defines it.
        """
        if self._local is None:
            self._local = self._compute_local()
        field = self.pm.create(type="real")
        local = self._local
        if self._same_layout(field, local):
            field.value[...] = local
        else:
            warnings.warn(
                "JeraldMesh: the engine's mesh layout differs from nbodykit's, redistributing",
                stacklevel=2,
            )
            full = self._global(local)
            field.value[...] = full[tuple(field.slices)]
        return field

    def _same_layout(self, field, local) -> bool:
        """True when every rank's engine slab is nbodykit's slab (collective under MPI)."""
        eng = self.engine
        same = field.value.shape == local.shape
        if eng.comm is None or eng.comm.size == 1:
            return same
        mine = [(int(s.start), int(s.stop)) for s in eng.local_slices("real")]
        theirs = [(int(s.start), int(s.stop)) for s in field.slices]
        same = same and mine == theirs
        return bool(self.comm.allreduce(int(same), op=_mpi_min()) == 1)

    def _global(self, local):
        eng = self.engine
        if eng.comm is None or eng.comm.size == 1:
            return np.asarray(local)
        return eng.to_global(local)

    def save(self, output, dataset="Field", mode="real"):
        """``MeshSource.save`` (a bigfile readable by ``BigFileMesh``), written atomically."""
        with atomic_dir(output, self.comm) as tmp:
            MeshSource.save(self, str(tmp), dataset=dataset, mode=mode)


def _mpi_min():
    from mpi4py import MPI

    return MPI.MIN
