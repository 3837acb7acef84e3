"""Reduced energies of stored configurations with a plain OpenMM Context (one frame at a time).

Used by ``boltzflow free-energy`` to evaluate samples of one state in another state. For training-
scale batches use :func:`boltzflow.energy.Energy` instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..systems.molecular import prune_unused_cmap_maps
from ..units import kt_kj_per_mol

if TYPE_CHECKING:
    import openmm


def reduced_energies(system, positions, temperature_k: float | None = None, platform: str = "CPU") -> np.ndarray:
    """u(x) = U(x) / kT in kT, (n,), for ``positions: (n, n_atoms, 3)`` nm of ``system`` (MolecularSystem)
    at ``temperature_k`` (default: the system's). Non-finite energies become +inf."""
    import openmm
    from openmm import unit


    x = system.check_coordinates(np.asarray(positions, dtype=np.float64), "positions")
    kt = kt_kj_per_mol(temperature_k if temperature_k is not None else system.temperature)
    sysobj = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system.system))
    prune_unused_cmap_maps(sysobj)
    plat, props = openmm_platform(platform, 1)
    ctx = openmm.Context(sysobj, openmm.VerletIntegrator(0.001), plat, props)
    out = np.empty(len(x))
    try:
        for i, xi in enumerate(x):
            if not np.all(np.isfinite(xi)):
                out[i] = np.inf
                continue
            ctx.setPositions(xi)
            e = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            out[i] = e / kt if np.isfinite(e) else np.inf
    finally:
        del ctx
    if out.size and not np.any(np.isfinite(out)):
        raise InputError("no sample has a finite energy in this system; do the samples belong to it?")
    return out


def openmm_platform(name: str, threads: int | None) -> tuple["openmm.Platform", dict[str, str]]:
    """(OpenMM Platform, its properties) for ``name`` (CPU, Reference, CUDA, OpenCL or ``auto``: the fastest
    available); ``threads`` sets the CPU platform's thread count. Unknown or unavailable -> InputError."""
    import openmm

    if name == "auto":
        names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        name = next((n for n in ("CUDA", "OpenCL", "CPU", "Reference") if n in names), "Reference")
    try:
        plat = openmm.Platform.getPlatformByName(name)
    except Exception as e:
        raise InputError(f"OpenMM platform {name!r} is not available ({e}); use CPU, Reference or auto") from e
    props = {}
    if name == "CPU" and threads:
        props["Threads"] = str(int(threads))
    return plat, props
