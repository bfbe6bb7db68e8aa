"""jerald-nbk: JERALD (Rigo, Trotta & Viel 2025) for the nbodykit/pmesh stack.

Learned displacement layers move the particles of a cheap FastPM run so that their maps look like
an expensive hydrodynamic simulation's: dark matter, stellar mass and neutral hydrogen.

Layout (the pipeline, in order):

* :mod:`jerald_nbk.pm` - particle-mesh operations with exact adjoints behind one interface
  (``JaxEngine``: one process, C++ CIC kernels via XLA FFI; ``PmeshEngine``: MPI over pmesh);
* :mod:`jerald_nbk.model` - parameter tables, displacement layers, final transforms, the pipeline;
* :mod:`jerald_nbk.train` - loss, splits, the eq-16 schedule, the Adam loop with checkpoints;
* :mod:`jerald_nbk.analysis` - power spectra, r(k), figures of merit, plots, reports;
* :mod:`jerald_nbk.io` - bigfile catalogs and meshes, HDF5 snapshots, parameter files;
* :mod:`jerald_nbk.sources` - ``JeraldCatalog`` and ``JeraldMesh``, nbodykit sources;
* :mod:`jerald_nbk.suite` - the reference suite; :mod:`jerald_nbk.cli` - the commands.

The training loop is ``jerald_nbk.train.train`` (``jerald_nbk.train`` is the subpackage).
``JeraldCatalog``, ``JeraldMesh`` (nbodykit) and the engines load lazily, so ``import jerald_nbk``
stays fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "JeraldCatalog": ("jerald_nbk.sources", "JeraldCatalog"),
    "JeraldMesh": ("jerald_nbk.sources", "JeraldMesh"),
    "JaxEngine": ("jerald_nbk.pm", "JaxEngine"),
    "PmeshEngine": ("jerald_nbk.pm", "PmeshEngine"),
    "make_pm": ("jerald_nbk.pm", "make_pm"),
    # deprecated names of the engines (DeprecationWarning from jerald_nbk.pm), for one release
    "JaxPM": ("jerald_nbk.pm", "JaxPM"),
    "PmeshPM": ("jerald_nbk.pm", "PmeshPM"),
    "Stage": ("jerald_nbk.model.pipeline", "Stage"),
    "StageConfig": ("jerald_nbk.model.pipeline", "StageConfig"),
    "Pipeline": ("jerald_nbk.model.pipeline", "Pipeline"),
    "TrainConfig": ("jerald_nbk.train.loop", "TrainConfig"),
    "Objective": ("jerald_nbk.train.loop", "Objective"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'jerald_nbk' has no attribute {name!r}")
