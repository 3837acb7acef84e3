"""Units and thermodynamic constants.

boltzflow works internally in nm for lengths and in kT (reduced units at the system's
temperature) for energies. kJ/mol appears only at I/O boundaries (OpenMM, files, CLI output).
"""

from __future__ import annotations

#: Molar gas constant R = N_A * k_B in kJ/(mol K) (CODATA 2018, as used by OpenMM).
MOLAR_GAS_CONSTANT_KJ = 8.314462618e-3


def kt_kj_per_mol(temperature_k: float) -> float:
    """kT in kJ/mol at ``temperature_k`` (K). 2.494 kJ/mol at 300 K."""
    if not temperature_k > 0:
        raise ValueError(f"temperature must be > 0 K, got {temperature_k!r}")
    return MOLAR_GAS_CONSTANT_KJ * float(temperature_k)


def beta_per_kj_mol(temperature_k: float) -> float:
    """1/kT in mol/kJ at ``temperature_k`` (K)."""
    return 1.0 / kt_kj_per_mol(temperature_k)


def kj_per_mol_to_kt(energy_kj_mol, temperature_k: float):
    """Convert energies in kJ/mol to reduced units (kT) at ``temperature_k``. Works on floats, arrays, tensors."""
    return energy_kj_mol / kt_kj_per_mol(temperature_k)


def kt_to_kj_per_mol(energy_kt, temperature_k: float):
    """Convert reduced energies (kT at ``temperature_k``) to kJ/mol."""
    return energy_kt * kt_kj_per_mol(temperature_k)


NM_PER_ANGSTROM = 0.1
