"""The typed contracts of boltzflow.core.protocols hold for the real classes (not only in prose)."""

from __future__ import annotations

import numpy as np
import pytest

from boltzflow.core.protocols import Generator, ModeSet, MolecularModeSet, ReducedEnergy, is_molecular
from boltzflow.systems.modes import SignModes, TorsionModes


def test_mode_sets_say_their_kind():
    torsion = TorsionModes((0, 1, 2, 3), (0.0, 180.0), ("low", "high"), "high")
    sign = SignModes(0, ("negative", "positive"), "negative")
    assert isinstance(torsion, ModeSet) and isinstance(torsion, MolecularModeSet) and is_molecular(torsion)
    assert isinstance(sign, ModeSet) and not is_molecular(sign) and not is_molecular(None)
    assert sign.assign(np.array([[-1.0, 0.0], [2.0, 0.0]])).tolist() == [0, 1]


def test_peptide_modes_are_molecular():
    from boltzflow.systems.builtin import builtin_system

    modes = builtin_system("alanine-tetrapeptide").modes
    assert isinstance(modes, MolecularModeSet) and is_molecular(modes) and len(modes.atoms) == 4


def test_energies_and_generators_satisfy_their_protocols():
    from boltzflow.energy.native import NativeEnergy
    from boltzflow.energy.openmm_bridge import OpenMMEnergy
    from boltzflow.flows.generator import MolecularGenerator

    assert issubclass(NativeEnergy, ReducedEnergy) and issubclass(OpenMMEnergy, ReducedEnergy)
    from boltzflow.flows.generator import GeneratorMixture

    assert issubclass(MolecularGenerator, Generator) and issubclass(GeneratorMixture, Generator)


@pytest.mark.parametrize("bad", [object(), 3])
def test_plain_objects_are_not_mode_sets(bad):
    assert not isinstance(bad, ModeSet)
