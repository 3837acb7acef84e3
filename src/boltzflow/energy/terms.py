"""Map the forces of an OpenMM System to boltzflow's canonical energy-term names.

``classify_forces(system, topology)`` returns ``[(force_index, term_name), ...]`` with names from
:data:`boltzflow.energy.base.TERM_NAMES`. One force may yield two entries (a NonbondedForce with
charges and LJ gives ``"coulomb"`` and ``"lj"``; a HarmonicBondForce holding both bonds and 1-3
Urey-Bradley pairs gives ``"bond"`` and ``"urey_bradley"``); :func:`split_force` builds the copy of
a force that holds only one of its terms. CMMotionRemover is dropped (it has no energy).
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedForceError
from .base import TERM_NAMES

#: force class name -> term name, for forces that map to exactly one term
_SIMPLE = {
    "HarmonicAngleForce": "angle",
    "PeriodicTorsionForce": "torsion",
    "CustomTorsionForce": "improper",
    "CMAPTorsionForce": "cmap",
    "CustomNonbondedForce": "lj",
    "CustomBondForce": "lj",
    "GBSAOBCForce": "gb",
    "CustomGBForce": "gb",
    "GBVIForce": "gb",
}
_IGNORED = ("CMMotionRemover",)


def _angle_end_pairs(system) -> set[tuple[int, int]]:
    """(i, k) end pairs of every angle i-j-k of the System's HarmonicAngleForces."""
    pairs = set()
    for f in system.getForces():
        if type(f).__name__ == "HarmonicAngleForce":
            for n in range(f.getNumAngles()):
                i, _, k, _, _ = f.getAngleParameters(n)
                pairs.add((min(i, k), max(i, k)))
    return pairs


def _bond_kinds(force, system, topology=None) -> list[bool]:
    """For each bond of a HarmonicBondForce: True for a real bond, False for a Urey-Bradley 1-3 pair.

    A pair is Urey-Bradley when it joins the two ends of an angle of the System (this does not
    depend on the topology's bonds, which a PDB round trip may lose)."""
    ub_like = _angle_end_pairs(system)
    out = []
    for k in range(force.getNumBonds()):
        i, j, _, _ = force.getBondParameters(k)
        out.append((min(i, j), max(i, j)) not in ub_like)
    return out


def _nonbonded_parts(force) -> tuple[bool, bool]:
    """(has_charges, has_lj) of a NonbondedForce, including exceptions."""
    has_q = has_lj = False
    for k in range(force.getNumParticles()):
        q, _, eps = force.getParticleParameters(k)
        has_q |= q._value != 0.0
        has_lj |= eps._value != 0.0
    for k in range(force.getNumExceptions()):
        _, _, qq, _, eps = force.getExceptionParameters(k)
        has_q |= qq._value != 0.0
        has_lj |= eps._value != 0.0
    return has_q, has_lj


def classify_forces(system, topology=None) -> list[tuple[int, str]]:
    """Canonical term name(s) for every force of ``system`` (an ``openmm.System``).

    A HarmonicBondForce pair joining the ends of an angle is Urey-Bradley, any other a bond;
    ``topology`` is accepted for the contract but not needed.
    Returns ``[(force_index, name)]`` in force order; CMMotionRemover is omitted.
    Raises :class:`~boltzflow.errors.UnsupportedForceError` for a force type it does not know."""
    out: list[tuple[int, str]] = []
    for idx, f in enumerate(system.getForces()):
        cls = type(f).__name__
        if cls in _IGNORED:
            continue
        if cls == "HarmonicBondForce":
            kinds = _bond_kinds(f, system)
            if any(kinds) or not kinds:
                out.append((idx, "bond"))
            if not all(kinds):
                out.append((idx, "urey_bradley"))
        elif cls == "NonbondedForce":
            has_q, has_lj = _nonbonded_parts(f)
            if has_q or not has_lj:
                out.append((idx, "coulomb"))
            if has_lj:
                out.append((idx, "lj"))
        elif cls in _SIMPLE:
            out.append((idx, _SIMPLE[cls]))
        else:
            raise UnsupportedForceError(
                f"force {idx} ({cls}) has no boltzflow energy-term name; systems may contain only "
                f"{', '.join(sorted(set(_SIMPLE) | {'HarmonicBondForce', 'NonbondedForce'}))}"
            )
    return out


def split_force(force, term: str, system) -> Any:
    """A deep copy of ``force`` keeping only ``term``'s part.

    NonbondedForce: ``"coulomb"`` zeroes every epsilon (particles and exceptions), ``"lj"`` zeroes
    every charge. HarmonicBondForce: ``"bond"`` zeroes the force constant of 1-3 (Urey-Bradley)
    pairs, ``"urey_bradley"`` that of real bonds. Other forces are copied unchanged."""
    import copy

    f = copy.deepcopy(force)
    cls = type(f).__name__
    if cls == "NonbondedForce":
        for k in range(f.getNumParticles()):
            q, sig, eps = f.getParticleParameters(k)
            if term == "coulomb":
                f.setParticleParameters(k, q, sig, 0.0)
            else:
                f.setParticleParameters(k, 0.0, sig, eps)
        for k in range(f.getNumExceptions()):
            i, j, qq, sig, eps = f.getExceptionParameters(k)
            if term == "coulomb":
                f.setExceptionParameters(k, i, j, qq, sig, 0.0)
            else:
                f.setExceptionParameters(k, i, j, 0.0, sig, eps)
    elif cls == "HarmonicBondForce":
        kinds = _bond_kinds(f, system)
        keep_bonded = term == "bond"
        for k, is_bond in enumerate(kinds):
            if is_bond != keep_bonded:
                i, j, r0, _ = f.getBondParameters(k)
                f.setBondParameters(k, i, j, r0, 0.0)
    return f


def term_systems(system, topology=None) -> tuple[Any, dict[str, list[int]]]:
    """An ``openmm.System`` with one force per (force, term) and a force group per term name.

    Returns ``(new_system, {term name: [force indices in new_system]})``; the new System has the
    same particles and no CMMotionRemover; term ``t`` is in force group ``TERM_NAMES.index(t)``."""
    import openmm

    new = openmm.System()
    for i in range(system.getNumParticles()):
        new.addParticle(system.getParticleMass(i))
    for i in range(system.getNumConstraints()):
        new.addConstraint(*system.getConstraintParameters(i))
    box = system.getDefaultPeriodicBoxVectors()
    new.setDefaultPeriodicBoxVectors(*box)
    forces = system.getForces()
    multi = {}
    for idx, name in classify_forces(system, topology):
        multi.setdefault(idx, []).append(name)
    groups: dict[str, list[int]] = {}
    for idx, names in multi.items():
        for name in names:
            f = split_force(forces[idx], name, system) if len(names) > 1 else _copy(forces[idx])
            f.setForceGroup(TERM_NAMES.index(name))
            groups.setdefault(name, []).append(new.addForce(f))
    return new, groups


def _copy(force):
    import copy

    return copy.deepcopy(force)
