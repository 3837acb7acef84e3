"""The typed core every other package imports downward from (layer 0, above ``errors``/``io``/``units``).

* :mod:`.protocols`: the contracts between packages as typed Protocols: :class:`ReducedEnergy`,
  :class:`Generator`, :class:`ModeSet` (and :class:`MolecularModeSet`);
* :mod:`.bijection`: the :class:`Bijection` base class (flows and coordinate transforms);
* :mod:`.weights`: the one Kish effective sample size, :func:`kish_ess` (of log weights) and
  :func:`ess_of_weights`;
* :mod:`.geometry`: the one dihedral-angle function, :func:`dihedral`.

Nothing here imports another boltzflow package except ``errors``.
"""

from .bijection import Bijection
from .geometry import dihedral, dihedral_of
from .protocols import Generator, ModeSet, MolecularModeSet, ReducedEnergy, is_molecular
from .weights import ess_of_weights, kish_ess

__all__ = ["Bijection", "dihedral", "dihedral_of", "Generator", "ModeSet", "MolecularModeSet", "ReducedEnergy",
           "is_molecular", "kish_ess", "ess_of_weights"]
