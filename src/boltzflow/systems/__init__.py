"""Molecular systems (OpenMM System + bookkeeping) and toy targets with known answers."""

from .molecular import MolecularSystem, hydrogen_bookkeeping
from .modes import SignModes, TorsionModes, dihedral

__all__ = ["MolecularSystem", "hydrogen_bookkeeping", "SignModes", "TorsionModes", "dihedral"]
