"""Units and thermodynamic constants.

boltzflow works internally in nm for lengths and in kT (reduced units at the system's
temperature) for energies. kJ/mol appears only at I/O boundaries (OpenMM, files, CLI output).
"""

from __future__ import annotations

import math
import warnings

from .errors import InputError

#: Molar gas constant R = N_A * k_B in kJ/(mol K) (CODATA 2018, as used by OpenMM).
MOLAR_GAS_CONSTANT_KJ = 8.314462618e-3

#: above this many K a temperature is accepted with a warning (molecules come apart; CHARMM is not fit there)
HOT_TEMPERATURE_K = 1000.0


def check_temperature(value: float, what: str = "temperature", warn: bool = True) -> float:
    """``value`` in K as a float if it is a finite number > 0, else InputError naming ``what``.

    Above :data:`HOT_TEMPERATURE_K` a :class:`UserWarning` says that the force field is not meant for it
    (``warn=False``: no warning, for callers that say it their own way)."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not (math.isfinite(t) and t > 0):
        raise InputError(f"{what} must be a finite temperature > 0 K, got {value!r}")
    if warn and t > HOT_TEMPERATURE_K:
        warnings.warn(f"{what} {t:g} K is above {HOT_TEMPERATURE_K:g} K: bonds break and the force field is not "
                      "meant for it; check the structures", UserWarning, stacklevel=2)
    return t


def kt_kj_per_mol(temperature_k: float) -> float:
    """kT in kJ/mol at ``temperature_k`` (K, finite and > 0, else InputError). 2.494 kJ/mol at 300 K."""
    return MOLAR_GAS_CONSTANT_KJ * check_temperature(temperature_k, warn=False)
