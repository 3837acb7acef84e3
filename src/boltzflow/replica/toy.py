"""Cheap MolecularSystems with exact answers, for testing replica exchange and estimators.

- :func:`harmonic_system`: ``n`` independent isotropic harmonic oscillators; the configurational
  partition function is Z(T) = (2 pi kT / k)^(3n/2), so the reduced free energy difference between
  temperatures is f(T2) - f(T1) = -(3n/2) log(T2/T1) (:func:`harmonic_reduced_free_energy`).
- :func:`double_well_system`: one particle in an asymmetric double well along x (harmonic in y, z);
  the population of x > 0 is a one-dimensional integral (:func:`double_well_population`).
"""

from __future__ import annotations

import numpy as np

from ..systems.molecular import MolecularSystem
from ..units import kt_kj_per_mol


def _topology(n: int, element: str = "Ar"):
    import openmm.app as app

    top = app.Topology()
    chain = top.addChain()
    for i in range(n):
        res = top.addResidue("TOY", chain)
        top.addAtom(f"X{i}", app.Element.getBySymbol(element), res)
    return top


def harmonic_system(n_particles: int = 5, k_kj_mol_nm2: float = 100.0, temperature: float = 300.0,
                    mass_da: float = 1.0):
    """MolecularSystem of ``n_particles`` independent oscillators U = k/2 |x - x0_i|^2 (kJ/mol, nm)."""
    import openmm

    sysobj = openmm.System()
    f = openmm.CustomExternalForce("0.5*harm_k*((x-harm_x0)^2+(y-harm_y0)^2+(z-harm_z0)^2)")
    f.addGlobalParameter("harm_k", float(k_kj_mol_nm2))
    for name in ("harm_x0", "harm_y0", "harm_z0"):
        f.addPerParticleParameter(name)
    pos = np.zeros((n_particles, 3))
    for i in range(n_particles):
        sysobj.addParticle(mass_da)
        pos[i] = (0.5 * i, 0.0, 0.0)
        f.addParticle(i, list(pos[i]))
    sysobj.addForce(f)
    return MolecularSystem("harmonic", _topology(n_particles), sysobj, pos, float(temperature), "vacuum",
                           np.arange(n_particles), np.zeros(0, dtype=int), np.zeros(0, dtype=int),
                           metadata={"toy": "harmonic", "k_kj_mol_nm2": k_kj_mol_nm2})


def harmonic_reduced_free_energy(n_particles: int, t1: float, t2: float) -> float:
    """Exact f(T2) - f(T1) = -log(Z(T2)/Z(T1)) of :func:`harmonic_system` (dimensionless)."""
    return -1.5 * n_particles * float(np.log(t2 / t1))


def double_well_system(barrier_kj_mol: float = 10.0, tilt_kj_mol: float = 4.0, temperature: float = 300.0,
                       mass_da: float = 1.0):
    """One particle, U = b (x^2/a^2 - 1)^2 + t x/a + 50 (y^2 + z^2) with a = 0.1 nm (kJ/mol, nm).

    With tilt > 0 the x > 0 well is the minor mode (modes: SignModes-like ``TorsionModes`` are not
    applicable; use the region ``x[0]>0``)."""
    import openmm

    sysobj = openmm.System()
    sysobj.addParticle(mass_da)
    # parameter names must not clash with openmmtools integrator variables ("a", "b", ...)
    f = openmm.CustomExternalForce("dw_b*((x/dw_a)^2-1)^2 + dw_t*x/dw_a + 50*(y^2+z^2)")
    f.addGlobalParameter("dw_a", 0.1)
    f.addGlobalParameter("dw_b", float(barrier_kj_mol))
    f.addGlobalParameter("dw_t", float(tilt_kj_mol))
    f.addParticle(0, [])
    sysobj.addForce(f)
    pos = np.array([[-0.1, 0.0, 0.0]])
    return MolecularSystem("double-well", _topology(1), sysobj, pos, float(temperature), "vacuum",
                           np.arange(1), np.zeros(0, dtype=int), np.zeros(0, dtype=int),
                           metadata={"toy": "double-well", "barrier": barrier_kj_mol, "tilt": tilt_kj_mol})


def double_well_population(barrier_kj_mol: float = 10.0, tilt_kj_mol: float = 4.0, temperature: float = 300.0) -> float:
    """Exact Boltzmann population of x > 0 for :func:`double_well_system` (numerical quadrature)."""
    kt = kt_kj_per_mol(temperature)
    s = np.linspace(-3.0, 3.0, 200001)  # x / a
    u = barrier_kj_mol * (s ** 2 - 1) ** 2 + tilt_kj_mol * s
    p = np.exp(-(u - u.min()) / kt)
    return float(p[s > 0].sum() / p.sum())
