"""nbodykit adapters: JERALD-improved particle catalogs and JERALD maps as nbodykit sources.

* :class:`JeraldCatalog` is a :class:`nbodykit.base.catalog.CatalogSource` whose ``Position`` column
  holds the DM-improved positions of any input catalog with a ``Position`` column (a FastPM
  ``BigFileCatalog``, an ``ArrayCatalog``, ...). Every other column of the input passes through.
* :class:`JeraldMesh` is a :class:`nbodykit.base.mesh.MeshSource` painting the DM (``1 + delta`` of
  the improved particles), stellar-mass or HI map predicted from a catalog.

Both work with the rest of nbodykit (``to_mesh``, ``FFTPower``, ``save``, ``apply``, ...). Under MPI
(communicator with more than one rank) the model runs on the pmesh engine
(:class:`jerald_nbk.pm.pmesh_backend.PmeshEngine`): each rank displaces its own rows of the catalog and
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

from .geometry import BOX_RTOL, box_vector, mesh_vector, wrap_positions
from .model.params import TARGETS
from .utils import atomic_dir

__all__ = ["JeraldCatalog", "JeraldMesh"]


# --------------------------------------------------------------------------------------------
# helpers


def _agree(name: str, candidates: list[tuple[str, object]], integer: bool = False):
    """The value of ``name`` that every present candidate agrees on (None if none present).

    Each value is read by :func:`jerald_nbk.geometry.mesh_vector` (``integer``, an Nmesh) or
    :func:`jerald_nbk.geometry.box_vector` (a BoxSize), which name the candidate when it is bad.

    Raises
    ------
    ValueError
        Naming the two sources and their values when two candidates disagree.
    """
    read = mesh_vector if integer else box_vector
    present = [(label, read(v, label)) for label, v in candidates if v is not None]
    if not present:
        return None
    label0, ref = present[0]
    for label, vec in present[1:]:
        same = np.array_equal(vec, ref) if integer else np.allclose(vec, ref, rtol=BOX_RTOL)
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
    """The engine :func:`jerald_nbk.workflow.engine` chooses for this communicator."""
    from .workflow import engine

    return engine(Nmesh, BoxSize, dtype=dtype, backend=backend, comm=comm)


#: plain-text flavours: (gradient order, Green's function) of the code that wrote the file. LDL
#: (Dai & Seljak) uses 4th-order gradients and the eq-6 Green's function for every target (as
#: ``jerald-ldl`` does); the JERALD reference 6th-order gradients and eq 7 for DM, eq 6 otherwise.
PLAINTEXT_FLAVOURS = {"ldl": (4, "gaussian"), "jerald": (6, None)}


def _is_json(path: Path) -> bool:
    """``.json`` suffix, or a file whose first non-blank character opens a JSON object."""
    if path.suffix == ".json":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(256).lstrip()
    except FileNotFoundError:
        raise FileNotFoundError(f"parameter file {path} does not exist") from None
    return head.startswith(b"{")


class _StageSpec:
    """A stage given as a parameter-file path or as ``(Stage, raw)``, before it is built.

    Parameter files: jerald-nbk JSON (self-describing: target, layers, geometry), or the LDL /
    JERALD reference plain-text files (``flavour`` says whose; the target is the slot the file is
    given for and the layer count follows from the file's length, checked against ``layers``).
    """

    def __init__(self, spec, what: str, flavour: str | None = None, layers: int | None = None):
        from .model.pipeline import Stage

        self.what = what
        self.stage = None
        self.path = None
        self.flavour = "json"
        if isinstance(spec, str | os.PathLike):
            self.path = Path(spec)
            if _is_json(self.path):
                from .io.paramfiles import load_params

                self.config, self.raw, self.provenance = load_params(self.path)
                self.label = f"parameter file {self.path}"
            else:
                self._load_plaintext(flavour, layers)
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], Stage):
            self.stage, raw = spec
            self.raw = np.asarray(raw, dtype=float)
            self.config = self.stage.config
            self.provenance = {}
            self.label = f"{what} stage"
        else:
            raise TypeError(
                f"{what} parameters must be a parameter-file path (JSON, LDL or JERALD plain "
                f"text) or a (Stage, raw) tuple, got {type(spec).__name__}"
            )
        if self.config.target != what:
            raise ValueError(
                f"{self.label} holds a {self.config.target!r} model, expected {what!r}"
            )
        if layers is not None and int(layers) != self.config.n_layers:
            raise ValueError(
                f"{self.label} has {self.config.n_layers} {what} layers, but layers={layers} "
                "was given"
            )

    def _load_plaintext(self, flavour, layers) -> None:
        from .io.paramfiles import infer_ref_layers, is_ref_optstate, load_plaintext, plain_length
        from .model.pipeline import StageConfig

        path = self.path
        if flavour not in PLAINTEXT_FLAVOURS:
            raise ValueError(
                f"parameter file {path} is plain text, written by LDL or by the JERALD reference "
                "code, whose orders, signs and scalings differ and cannot be told apart from "
                f"the numbers: pass flavour='ldl' or flavour='jerald' (got flavour={flavour!r})"
            )
        if is_ref_optstate(path):
            raise ValueError(
                f"parameter file {path} is a JERALD optimiser-state file: pass the "
                "..._bestparam.txt file written next to it"
            )
        n_values = plain_length(path)
        # LDL's DM (5 S) and stellar (5 S + 3) lengths are the JERALD reference's: one rule
        inferred, shift = infer_ref_layers(n_values, self.what, path)
        if layers is not None and int(layers) != inferred:
            raise ValueError(
                f"parameter file {path}: {n_values} values are a {inferred}-layer {self.what} "
                f"model, but layers={layers} was given"
            )
        order, green = PLAINTEXT_FLAVOURS[flavour]
        self.config = StageConfig(self.what, inferred, order, shift, green)
        self.raw = load_plaintext(path, self.config, flavour)
        self.provenance = {}
        self.flavour = flavour
        self.label = f"{'LDL' if flavour == 'ldl' else 'JERALD'} parameter file {path}"

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
                f"split over {engine.comm.size} ranks: build the stage on PmeshEngine, or pass a "
                "parameter file"
            )
        return self.stage, self.raw

    def describe(self) -> dict:
        return {
            "params": str(self.path) if self.path is not None else "<in memory>",
            "format": self.flavour if self.path is not None else "<in memory>",
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
        The trained DM stage: a parameter file, a built stage with its raw vector, or a
        :class:`~jerald_nbk.model.pipeline.Pipeline` (its ``dm`` stage is used). Parameter files:
        jerald-nbk JSON (:func:`jerald_nbk.io.paramfiles.save_params`; it records its target,
        layers and geometry), or an LDL / JERALD reference plain-text file (``flavour`` needed;
        the layer count follows from its length).
    comm : MPI communicator, optional
        Default: the source's. Each rank displaces its own rows of the source.
    BoxSize : float or 3 floats, optional
        Mpc/h. Default from the parameter file's provenance and the source's ``attrs``; every value
        given (argument, parameter file, catalog) must agree.
    Nmesh : int or 3 ints, optional
        Mesh of the displacement layers; default from the parameter file (and the catalog's
        ``attrs['Nmesh']`` if present), which must agree with the argument.
    backend : {"auto", "jax", "pmesh"}
        Engine, chosen by :func:`jerald_nbk.workflow.engine`: ``auto`` is pmesh with more than one
        rank, JAX otherwise.
    dtype : {"f4", "f8"}
        Precision of the model (the column keeps the source's Position dtype).
    wrap : bool
        Wrap the improved positions into ``[0, BoxSize)`` (default; the layers move particles
        across the periodic boundary).
    flavour : {None, "ldl", "jerald"}
        Whose layout a plain-text parameter file has (LDL's or the JERALD reference's: their
        orders, signs and scalings differ, so it must be said); ignored for JSON files.
    layers : int, optional
        Expected number of DM layers; an error if the file holds another number.
    velocity : {None, "input"}
        The JERALD layers move particles by a learned, non-dynamical displacement; there is no
        velocity consistent with it. ``None`` (default): the input's velocity columns
        (``Velocity*``) are withheld and asking for them raises a KeyError saying why, so that a
        redshift-space position built from them cannot silently pair FastPM velocities with
        displaced positions. ``"input"``: pass them through unchanged, i.e. approximate each
        particle's velocity by its FastPM velocity (the displacement is a fraction of a cell;
        the approximation is recorded in ``attrs['jerald.velocity']``).

    Attributes
    ----------
    attrs : dict
        The source's attrs, plus ``BoxSize`` and ``Nmesh`` (so ``to_mesh()`` needs no arguments)
        and provenance: ``jerald.version``, ``jerald.backend``, ``jerald.Nmesh``,
        ``jerald.BoxSize``, ``jerald.dm.params`` (the file), ``jerald.dm.format`` (``json``,
        ``ldl`` or ``jerald``), ``jerald.dm.layers``, ``jerald.dm.config``,
        ``jerald.velocity``.
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
        flavour: str | None = None,
        layers: int | None = None,
        velocity: str | None = None,
    ):
        from .model.pipeline import Pipeline

        if velocity not in (None, "input"):
            raise ValueError(f"velocity must be None or 'input', got {velocity!r}")

        comm = _resolve_comm(comm, source)
        if getattr(source, "comm", comm).size != comm.size:
            raise ValueError(
                f"the source catalog lives on {source.comm.size} ranks, comm has {comm.size}"
            )
        if isinstance(params, Pipeline):
            if params.dm is None:
                raise ValueError("the Pipeline given as params has no DM stage")
            params = params.dm
        spec = _StageSpec(params, "dm", flavour, layers)
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
            improved = wrap_positions(improved, box, "JeraldCatalog")
        src_dtype = source["Position"].dtype
        self._improved = improved.astype(src_dtype if src_dtype.kind == "f" else np.float64)
        self._source = source
        passthrough = [c for c in source.columns if c != "Position" and not source[c].is_default]
        self._withheld = (
            [c for c in passthrough if c.startswith("Velocity")] if velocity is None else []
        )
        self._passthrough = [c for c in passthrough if c not in self._withheld]
        self._size = len(self._improved)
        if self._size != source.size:
            raise RuntimeError(f"{self._size} improved positions for {source.size} rows")

        self.attrs.update(getattr(source, "attrs", {}))
        self.attrs["BoxSize"] = np.array(box, dtype="f8")
        self.attrs["Nmesh"] = np.array(nmesh, dtype="i8")
        self.attrs.update(_provenance_attrs(self.engine, {"dm": spec}))
        self.attrs["jerald.velocity"] = (
            f"withheld ({', '.join(self._withheld) or 'none in the input'}): no velocity is "
            "consistent with the JERALD displacement"
            if velocity is None
            else "input: the FastPM velocity of each particle, unchanged by the displacement"
        )
        CatalogSource.__init__(self, comm)

    def __getitem__(self, sel):
        """Columns and slices as for any CatalogSource; a withheld velocity column says why."""
        withheld = getattr(self, "_withheld", ())
        if isinstance(sel, str) and sel in withheld and sel not in self.columns:
            raise KeyError(
                f"column {sel!r} of the input catalog is withheld: the JERALD layers displace "
                "the particles without a consistent velocity, so FastPM's would not match the "
                "improved positions. Pass velocity='input' to JeraldCatalog to use the FastPM "
                "velocities as an approximation (e.g. for redshift-space distortions)."
            )
        return CatalogSource.__getitem__(self, sel)

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

#: units of each target's map before normalisation (``to_real_field(normalize=False)``)
RAW_UNITS = {
    "dm": "particles per cell (CIC, unit mass)",
    "stellar": "1e10 Msun/h per cell",
    "hi": "HI training-target units",
}


def _per_stage(name: str, value, given: dict) -> dict:
    """``value`` (one for all stages, or a dict by target) as a dict over the stages given."""
    if value is None:
        return {}
    if isinstance(value, dict):
        unknown = set(value) - set(TARGETS)
        if unknown:
            raise ValueError(f"{name}: unknown targets {sorted(unknown)}, expected {TARGETS}")
        return dict(value)
    if name == "layers" and len(given) > 1:
        raise ValueError(
            f"layers={value} is ambiguous with {len(given)} stages ({', '.join(given)}): "
            "pass a dict, e.g. layers={'dm': 2, 'stellar': 1}"
        )
    return {t: value for t in given}


class JeraldMesh(MeshSource):
    """The DM, stellar-mass or HI map that JERALD predicts from a catalog, as a MeshSource.

    Parameters
    ----------
    source : CatalogSource
        Input particles (``Position`` in Mpc/h): FastPM output, or already improved positions
        (e.g. a :class:`JeraldCatalog`) with ``dm=None``.
    dm, stellar, hi : path-like or ``(Stage, raw)``, optional
        Trained stages: parameter files (jerald-nbk JSON, or LDL / JERALD reference plain text
        with ``flavour``; a plain-text file's target is the argument it is given as) or built
        stages. ``dm=None`` paints the input positions as they are. ``target="stellar"`` needs
        ``stellar``; ``target="hi"`` needs ``stellar`` and ``hi`` (the HI model uses the frozen
        stellar map).
    target : {"dm", "stellar", "hi"}, optional
        Which map: the (improved) particles' CIC density, the stellar-mass map or the HI map.
        Default: the last stage given (``hi`` if given, else ``stellar`` if given, else ``dm``).
    Nmesh, BoxSize : optional
        Default from the parameter files' provenance and the source's attrs (all must agree;
        plain-text files record neither).
    comm : MPI communicator, optional
        Default: the source's.
    backend : {"auto", "jax", "pmesh"}
        As in :class:`JeraldCatalog`.
    dtype : {"f4", "f8"}
        Mesh and model precision.
    flavour : {None, "ldl", "jerald"} or dict
        Whose layout the plain-text parameter files have (one for all, or per stage:
        ``{"dm": "ldl", ...}``); ignored for JSON files.
    layers : int or dict, optional
        Expected layer counts, checked against the files: a dict ``{"dm": 2, "stellar": 1}``, or
        an int when a single stage is given.

    Attributes
    ----------
    attrs : dict
        ``BoxSize``, ``Nmesh``, ``target``, ``units`` (of ``compute()`` / ``save()`` /
        ``FFTPower``: ``1+delta``), ``raw_units`` (of ``to_real_field(normalize=False)``:
        particles per cell for DM, 1e10 Msun/h per cell for stellar mass, the HI training
        target's units for HI), ``redshift`` when the files record it, and the provenance of
        :class:`JeraldCatalog` per stage.

    Notes
    -----
    Units follow nbodykit's ``CatalogMesh``: ``to_real_field(normalize=True)`` (what
    ``compute()``, ``save()`` and ``FFTPower`` use) divides the map by its mean, giving
    ``1 + delta`` of the DM, stellar-mass or HI field; ``normalize=False`` gives the model's
    units. For DM the raw map is the CIC count of unit-mass particles per cell, exactly as
    nbodykit paints a catalog, and the field's ``shotnoise`` attribute is ``V / N`` as nbodykit's.
    The returned field's ``attrs`` hold ``units``, ``normalized`` and ``mean`` (in raw units; a
    saved map times ``mean`` is the raw map).

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
        target: str | None = None,
        Nmesh=None,
        BoxSize=None,
        comm=None,
        backend: str = "auto",
        dtype: str = "f4",
        flavour=None,
        layers=None,
    ):
        if target is None:
            target = "hi" if hi is not None else "stellar" if stellar is not None else "dm"
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target in ("stellar", "hi") and stellar is None:
            raise ValueError(f"target={target!r} needs the stellar parameters (stellar=...)")
        if target == "hi" and hi is None:
            raise ValueError("target='hi' needs the HI parameters (hi=...)")
        comm = _resolve_comm(comm, source)
        given = {
            "dm": dm,
            "stellar": None if target == "dm" else stellar,
            "hi": None if target != "hi" else hi,
        }
        given = {k: v for k, v in given.items() if v is not None}
        flavours = _per_stage("flavour", flavour, given)
        nlayers = _per_stage("layers", layers, given)
        specs = {
            t: _StageSpec(given[t], t, flavours.get(t), nlayers.get(t)) if t in given else None
            for t in TARGETS
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
        self._mean = None

        MeshSource.__init__(self, comm, nmesh, box, np.dtype(dtype))
        self.attrs.update(_provenance_attrs(engine, specs))
        self.attrs["target"] = target
        self.attrs["units"] = "1+delta"
        self.attrs["raw_units"] = RAW_UNITS[target]
        redshift = next(
            (s.provenance["redshift"] for s in specs.values() if s and "redshift" in s.provenance),
            None,
        )
        if redshift is not None:
            self.attrs["redshift"] = float(redshift)

    def __repr__(self):
        return f"JeraldMesh(target={self._target!r}, Nmesh={list(self.pm.Nmesh)})"

    def _compute_local(self):
        """This rank's slab of the raw map and the map's global mean (all ranks must call it)."""
        from .model.pipeline import Pipeline

        st = self._stages
        eng = self.engine
        pos = _local_positions(self._source, eng.dtype)
        x = Pipeline(dm=st["dm"]).improve(pos)
        if self._target == "dm":
            # unit-mass CIC counts, nbodykit's normalize=False (not the pipeline's 1 + delta map);
            # its mean is N / Ncells exactly
            return np.asarray(eng.paint(x)), eng.count(x) / eng.ncells
        # the stellar (and HI) maps of the improved positions; no DM density map is painted
        maps = Pipeline(stellar=st["stellar"], hi=st["hi"]).maps(pos, improved=x)
        raw = np.asarray(maps[self._target])
        total = float(np.sum(raw, dtype=np.float64))
        if eng.comm is not None and eng.comm.size > 1:
            total = eng.comm.allreduce(total)
        return raw, total / eng.ncells

    def to_real_field(self, out=None, normalize=True):
        """The map as a :class:`pmesh.pm.RealField` on ``self.pm`` (computed once, then cached).

        Parameters
        ----------
        out : pmesh.pm.RealField, optional
            Written into and returned (its mesh must be ``self.pm``'s: same Nmesh, BoxSize).
        normalize : bool
            As nbodykit's ``CatalogMesh``: divide by the map's mean, giving ``1 + delta``
            (a map of mean 0 becomes 1 everywhere, with a warning, as nbodykit does for an
            empty catalog). False: the model's units (``attrs['raw_units']``).

        Returns
        -------
        pmesh.pm.RealField
            With ``attrs``: ``units``, ``normalized``, ``mean`` (raw units) and, for DM,
            ``shotnoise`` (``V / N``) and ``N``.
        """
        if self._local is None:
            self._local, self._mean = self._compute_local()
        if out is None:
            field = self.pm.create(type="real")
        else:
            from pmesh.pm import RealField

            if not isinstance(out, RealField):
                raise TypeError(f"out must be a pmesh RealField, got {type(out).__name__}")
            if tuple(out.pm.Nmesh) != tuple(self.pm.Nmesh) or not np.allclose(
                out.pm.BoxSize, self.pm.BoxSize
            ):
                raise ValueError(
                    f"out is on a mesh with Nmesh {np.asarray(out.pm.Nmesh).tolist()}, BoxSize "
                    f"{np.asarray(out.pm.BoxSize).tolist()}; this map has Nmesh "
                    f"{np.asarray(self.pm.Nmesh).tolist()}, BoxSize "
                    f"{np.asarray(self.pm.BoxSize).tolist()}"
                )
            field = out
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
        mean = float(self._mean)
        if normalize:
            if mean > 0:
                field.value[...] /= mean
            else:
                warnings.warn(
                    f"JeraldMesh: the {self._target} map has mean {mean:g}; normalize=True sets "
                    "it to 1 everywhere (nbodykit's convention); use normalize=False for the map",
                    stacklevel=2,
                )
                field.value[...] = 1
        field.attrs = {
            "units": "1+delta" if normalize else RAW_UNITS[self._target],
            "normalized": bool(normalize),
            "mean": mean,
        }
        if self._target == "dm":
            n_total = mean * float(np.prod(self.pm.Nmesh))
            field.attrs["N"] = int(round(n_total))
            field.attrs["shotnoise"] = float(np.prod(self.pm.BoxSize)) / n_total
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
