"""Physical constants shared by the reference suite's halo and HI prescriptions.

Values in cgs unless stated; the critical density in the (Msun/h) / (Mpc/h)^3 units of the halo
masses and in g / cm^3 for the hydrogen densities of the HI target.  See
``docs/reference-suite.md`` ("Stellar-mass target", "HI target") and
``../shared/spec/reference-suite.md`` ("Reference fields").
"""

from __future__ import annotations

#: Critical density today in (Msun/h) / (Mpc/h)^3 = 2.775e11 h^2 Msun / Mpc^3.
RHO_CRIT_MSUNH = 2.77536627e11
#: Critical density today in g / cm^3, divided by h^2.
RHO_CRIT_CGS_H2 = 1.87847e-29
M_PROTON = 1.67262192e-24  # g
K_BOLTZMANN = 1.380649e-16  # erg / K
G_NEWTON_KMS = 4.30091e-9  # Mpc (km/s)^2 / Msun

#: Hydrogen / helium mass fractions (primordial).
X_H = 0.76
Y_HE = 0.24
#: Mean molecular weight of fully ionised primordial gas (virial temperature).
MU_IONISED = 0.59
#: Adiabatic index of a monatomic gas (Jeans-like filtering scale).
GAMMA_ADIABATIC = 5.0 / 3.0
