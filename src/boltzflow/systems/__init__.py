"""Molecular systems (OpenMM System + bookkeeping) and toy targets with known answers."""

from .modes import SignModes, TorsionModes, dihedral
from .molecular import MolecularSystem, hydrogen_bookkeeping

__all__ = ["MolecularSystem", "hydrogen_bookkeeping", "SignModes", "TorsionModes", "dihedral"]
