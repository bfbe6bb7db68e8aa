"""Reference suite: a physically motivated stand-in for the hydro simulation JERALD is trained on.

* :mod:`.runs`: the FastPM low-resolution input and the high-resolution "truth" run from the same
  initial phases (Sherwood-Relics cosmology);
* the target ("truth") maps from the high-resolution run, one module per prescription, each
  beside its section of ``docs/reference-suite.md``: :mod:`.dm` (DM, ``1 + delta``),
  :mod:`.halos` (FOF halos and their stellar mass, Moster et al. 2013), :mod:`.hi` (HI,
  fluctuating Gunn-Peterson); :mod:`.mesh` holds their shared pmesh painting and
  :mod:`.constants` their shared physical constants;
* :mod:`.build`: :func:`make_targets` puts the three maps together at one redshift and
  :func:`build_suite` writes catalogs, meshes and the ``suite.json`` manifest.

Importing this package is cheap: fastpm, pmesh and nbodykit are imported when a suite is built.
See ``docs/reference-suite.md`` for every prescription and constant.
"""

from .build import GENERATOR_VERSION, SIZES, build_suite, make_targets, output_names, ztag

__all__ = ["build_suite", "make_targets", "SIZES", "GENERATOR_VERSION", "output_names", "ztag"]
