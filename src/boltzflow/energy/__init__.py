"""Energies as differentiable torch functions in kT.

``Energy(system, backend="auto")`` returns the native batched torch evaluator when every force
of the System is supported, else the OpenMM bridge. OpenMM is the truth; native is the fast path.
"""

from __future__ import annotations

from .base import TERM_NAMES, EnergyCap, EnergyResult, cap_gradient, log_linear_cap

BACKENDS = ("auto", "native", "openmm")


def Energy(system, backend: str = "auto", cap: EnergyCap | None = None, **options):
    """Build an energy module for a :class:`~boltzflow.systems.MolecularSystem`.

    backend: "native" (batched torch, CPU/CUDA), "openmm" (process pool of OpenMM Contexts),
        or "auto" (native if it supports every force of the System, else openmm).
    cap: optional :class:`EnergyCap` (per-term gradient cap, log-linear energy cap).
    options: backend-specific keyword arguments (e.g. ``platform``, ``n_workers`` for openmm).
    """
    from ..errors import InputError

    if backend not in BACKENDS:
        raise InputError(f"unknown energy backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("auto", "native"):
        from .native import NativeEnergy, unsupported_forces

        missing = unsupported_forces(system.system)
        if not missing:
            return NativeEnergy(system, cap=cap, **options)
        if backend == "native":
            from ..errors import UnsupportedForceError

            raise UnsupportedForceError(
                f"native energy does not support force(s) {', '.join(missing)} of system {system.name!r}; "
                "use backend='openmm' (CLI: --backend openmm)"
            )
    from .openmm_bridge import OpenMMEnergy

    return OpenMMEnergy(system, cap=cap, **options)


__all__ = ["Energy", "EnergyCap", "EnergyResult", "TERM_NAMES", "BACKENDS", "cap_gradient", "log_linear_cap"]
