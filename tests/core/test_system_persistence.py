import numpy as np
import pytest

from boltzflow.systems import MolecularSystem
from boltzflow.systems.builtin import builtin_system


@pytest.mark.parametrize("name", ["alanine-dipeptide", "butane"])
def test_save_load_round_trip_psf_route(tmp_path, name):
    """PSF-route atom names (CHARMM CT3 HT1..) collide after PDB name normalisation: loading must not
    depend on parsing topology.pdb."""
    s = builtin_system(name, route="psf")
    t = MolecularSystem.load(s.save(tmp_path / name))
    assert t.n_atoms == s.n_atoms and t.fingerprint() == s.fingerprint()
    assert [a.name for a in t.topology.atoms()] == [a.name for a in s.topology.atoms()]
    assert np.array_equal(t.positions, s.positions)
    bonds = lambda top: sorted(sorted((a.index, b.index)) for a, b in top.bonds())
    assert bonds(t.topology) == bonds(s.topology)
    np.testing.assert_array_equal(t.hydrogen_parents, s.hydrogen_parents)
    assert t.modes == s.modes
