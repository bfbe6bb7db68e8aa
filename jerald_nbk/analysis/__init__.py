"""Analysis: power spectra, r(k), figures of merit, plots and the Markdown report.

* :mod:`.power`: :func:`power_spectrum`, :func:`cross_correlation` (nbodykit ``FFTPower``
  numbers on whole meshes, no MPI);
* :mod:`.metrics`: :func:`k_within`, :func:`k_above`, :func:`figures_of_merit`,
  :func:`relative_difference_map`;
* :mod:`.plots`: power-spectrum comparisons, slices, training curves (PNG);
* :mod:`.report`: :func:`write_report` (Markdown).

Importing this package imports neither nbodykit nor dask nor matplotlib.
"""

from .metrics import figures_of_merit, k_above, k_within, relative_difference_map, smooth_field
from .plots import plot_power_comparison, plot_slices, plot_training_curves, project_slab
from .power import CrossResult, PowerResult, cross_correlation, default_edges, power_spectrum
from .report import fom_table, write_report

__all__ = [
    "CrossResult",
    "PowerResult",
    "cross_correlation",
    "default_edges",
    "figures_of_merit",
    "fom_table",
    "k_above",
    "k_within",
    "plot_power_comparison",
    "plot_slices",
    "plot_training_curves",
    "power_spectrum",
    "project_slab",
    "relative_difference_map",
    "smooth_field",
    "write_report",
]
