"""The native energy's force compilers: one registered function per OpenMM force type, each producing a
TermTable that is merged only when the whole force compiled (issue 15)."""

from __future__ import annotations

import numpy as np
import openmm

from boltzflow.energy.native import FORCE_COMPILERS, TermTable, _compile, unsupported_forces


def test_every_charmm_force_type_has_one_compiler():
    kinds = {"HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "CustomTorsionForce",
             "CMAPTorsionForce", "NonbondedForce", "CustomNonbondedForce", "CustomBondForce", "CustomGBForce",
             "GBSAOBCForce"}
    assert kinds <= set(FORCE_COMPILERS)
    assert {k: r.term for k, r in FORCE_COMPILERS.items() if r.term} == {
        "HarmonicAngleForce": "angle", "PeriodicTorsionForce": "torsion", "CustomTorsionForce": "improper",
        "CMAPTorsionForce": "cmap", "CustomGBForce": "gb", "GBSAOBCForce": "gb"}


def _system(n: int = 3) -> openmm.System:
    s = openmm.System()
    for _ in range(n):
        s.addParticle(12.0)
    return s


def test_a_force_that_fails_half_way_leaves_nothing_behind():
    s = _system()
    hb = openmm.HarmonicBondForce()
    hb.addBond(0, 1, 0.15, 1000.0)
    s.addForce(hb)
    cb = openmm.CustomBondForce("a/r^12")
    cb.addPerBondParameter("a")
    cb.addBond(0, 2, [1e-6])  # compiles...
    cb.addBond(1, 1, [1e-6])  # ...then a bond of a particle with itself: the force is unsupported
    s.addForce(cb)
    c = _compile(s)
    assert c.bonds == [(0, 1, 0.15, 1000.0)]
    assert not np.any(c.pair_A) and not np.any(c.pair_B) and not np.any(c.pair_C)
    assert len(c.unsupported) == 1 and "CustomBondForce" in c.unsupported[0] and "itself" in c.unsupported[0]
    assert unsupported_forces(s) == c.unsupported


def test_tables_merge_in_force_order_with_cmap_maps_renumbered():
    s = _system(8)
    for shift in (0, 1):
        f = openmm.CMAPTorsionForce()
        f.addMap(4, [float(i + shift) for i in range(16)])
        f.addTorsion(0, 0, 1, 2, 3, 1, 2, 3, 4 + shift)
        s.addForce(f)
    c = _compile(s)
    assert not c.unsupported and len(c.cmap_maps) == 2
    assert [m for m, *_ in c.cmaps] == [0, 1] and c.cmaps[1][-1] == 5
    assert "cmap" in c.present


def test_an_unknown_force_is_named():
    s = _system()
    s.addForce(openmm.RBTorsionForce())
    assert "RBTorsionForce" in unsupported_forces(s)[0] and "not implemented" in unsupported_forces(s)[0]
    t = TermTable(4)
    a, b, c = t.pairs()
    assert a.shape == b.shape == c.shape == (6,) and t.pairs()[0] is a
