"""Reference suite: a physically motivated stand-in for the hydro simulation JERALD is trained on.

* :mod:`.runs`: the FastPM low-resolution input and the high-resolution "truth" run from the same
  initial phases (Sherwood-Relics cosmology);
* :mod:`.targets`: DM, stellar-mass (FOF + Moster et al. 2013) and HI (fluctuating Gunn-Peterson)
  target maps from the high-resolution run;
* :mod:`.build`: :func:`build_suite` writes catalogs, meshes and the ``suite.json`` manifest.

Importing this package is cheap: fastpm, pmesh and nbodykit are imported when a suite is built.
See ``docs/reference-suite.md`` for every prescription and constant.
"""

from .build import GENERATOR_VERSION, SIZES, build_suite, output_names, ztag

__all__ = ["build_suite", "SIZES", "GENERATOR_VERSION", "output_names", "ztag"]
