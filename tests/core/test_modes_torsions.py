import numpy as np
import pytest

from boltzflow.systems.modes import SignModes, TorsionModes, dihedral, modes_from_dict


def _frame_with_dihedral(deg):
    t = np.radians(deg)
    return np.array([[1.0, 0, 0], [0, 0, 0], [0, 1.0, 0], [np.cos(t), 1.0, np.sin(t)]])


@pytest.mark.parametrize("deg", [-170, -60, 0.5, 60, 179])
def test_dihedral_matches_construction(deg):
    ang = dihedral(_frame_with_dihedral(deg)[None], (0, 1, 2, 3))
    assert abs(abs(np.degrees(ang[0])) - abs(deg)) < 1e-8


def test_torsion_modes_assign_and_round_trip():
    m = TorsionModes((0, 1, 2, 3), (-180.0, 0.0), ("neg", "pos"), "pos")
    x = np.stack([_frame_with_dihedral(d) for d in (-90, 90, 100)])
    signs = np.sign(dihedral(x, (0, 1, 2, 3)))
    lab = m.assign(x)
    assert list(lab) == [1 if s > 0 else 0 for s in signs]
    assert m.fractions(x)["pos"] == pytest.approx(np.mean(signs > 0))
    assert modes_from_dict(m.to_dict()) == m
    s = SignModes()
    assert list(s.assign(np.array([[-1.0, 2], [3, 0]]))) == [0, 1]
    assert modes_from_dict(s.to_dict()) == s


def test_backbone_torsions_from_graph():
    openmmtools = pytest.importorskip("openmmtools")
    from boltzflow.systems.torsions import named_torsions

    top = openmmtools.testsystems.AlanineDipeptideVacuum().topology
    t = named_torsions(top)
    names = [a.name for a in top.atoms()]
    assert [names[i] for i in t["phi"]] == ["C", "N", "CA", "C"]
    assert [names[i] for i in t["psi"]] == ["N", "CA", "C", "N"]
