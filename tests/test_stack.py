"""Stack proof: CLASS (classylss) -> nbodykit LinearMesh -> pmesh FFTs -> FFTPower recovers Plin.

If this fails, the installed stack (numpy, classylss, pmesh, nbodykit) is broken, whatever the
project code does. Takes ~10 s (CLASS).

Tolerances, per bin with k < 0.1 h/Mpc on a 64^3 mesh in a 500 Mpc/h box (Planck15, z = 0):

* Gaussian realisation: ``|P/Plin - 1| < 4 sqrt(2 / modes)`` (four times the cosmic-variance
  error of a bin with ``modes`` Fourier modes; the seed is fixed, so the test is deterministic);
* ``unitary_amplitude=True`` (every mode has exactly the amplitude ``sqrt(Plin)``, no cosmic
  variance): ``|P/Plin(k_mean) - 1| < 3%``, the rest being the spread of Plin over a bin, for
  nbodykit's FFTPower and for our estimator each on its own.

Our estimator (:func:`jerald_nbk.analysis.power_spectrum`) gives the same numbers on the same mesh
to 1e-6 relative.
"""

import numpy as np
import pytest

from jerald_nbk.analysis import power_spectrum

NMESH, BOXSIZE, SEED, KMAX = 64, 500.0, 42, 0.1


@pytest.fixture(scope="module")
def plin():
    from nbodykit.lab import cosmology

    return cosmology.LinearPower(cosmology.Planck15, redshift=0, transfer="CLASS")


def measure(plin, unitary):
    from nbodykit.lab import FFTPower, LinearMesh

    mesh = LinearMesh(plin, Nmesh=NMESH, BoxSize=BOXSIZE, seed=SEED, unitary_amplitude=unitary)
    power = FFTPower(mesh, mode="1d").power
    field = np.asarray(mesh.compute(mode="real").preview())
    return power, field


@pytest.mark.slow
def test_linear_mesh_recovers_plin_within_cosmic_variance(plin):
    power, field = measure(plin, unitary=False)
    sel = (power["k"] > 0) & (power["k"] < KMAX)
    assert sel.sum() >= 5
    k, p, modes = power["k"][sel], power["power"].real[sel], power["modes"][sel]
    deviation = (p / plin(k) - 1) / np.sqrt(2.0 / modes)
    assert np.all(np.abs(deviation) < 4), deviation

    ours = power_spectrum(field, BOXSIZE)
    np.testing.assert_array_equal(ours.modes, power["modes"])
    np.testing.assert_allclose(ours.power[sel], p, rtol=1e-6)


@pytest.mark.slow
def test_unitary_linear_mesh_recovers_plin_tightly(plin):
    power, field = measure(plin, unitary=True)
    sel = (power["k"] > 0) & (power["k"] < KMAX)
    k, p = power["k"][sel], power["power"].real[sel]
    np.testing.assert_allclose(p / plin(k), 1.0, atol=0.03)  # the stack
    # our estimator on the same mesh recovers CLASS's Plin on its own (absolute normalisation,
    # mean k per bin), not only through its agreement with nbodykit
    ours = power_spectrum(field, BOXSIZE)
    mine = (ours.k > 0) & (ours.k < KMAX)
    assert mine.sum() == sel.sum()
    np.testing.assert_allclose(ours.power[mine] / plin(ours.k[mine]), 1.0, atol=0.03)
