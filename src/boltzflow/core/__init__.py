"""The typed core every other package imports downward from (layer 0, above ``errors``/``io``/``units``).

* :mod:`.protocols`: the contracts between packages as typed Protocols: :class:`ReducedEnergy`,
  :class:`Generator`, :class:`ModeSet` (and :class:`MolecularModeSet`);
* :mod:`.bijection`: the :class:`Bijection` base class (flows and coordinate transforms);
* :mod:`.weights`: the one Kish effective sample size, :func:`kish_ess` (of log weights) and
  :func:`ess_of_weights`;
* :mod:`.geometry`: the one dihedral-angle function, :func:`dihedral`;
* :mod:`.sampleset`: :class:`SampleSet`, configurations + reduced energies + log weights with the one
  versioned provenance record (older files' key spellings are mapped when read);
* :mod:`.rundir`: :class:`RunDir`, the layout of a training run directory (config, checkpoints,
  metrics, summary, samples).

Nothing here imports another boltzflow package except ``errors`` and ``io``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> submodule; loaded on first use, so that importing one torch-free part (``SampleSet``,
#: ``RunDir``) does not import torch (``boltzflow --help`` stays light; tests/core/test_layering.py)
_WHERE = {
    "Bijection": "bijection", "dihedral": "geometry", "dihedral_of": "geometry", "Generator": "protocols",
    "ModeSet": "protocols", "MolecularModeSet": "protocols", "ReducedEnergy": "protocols",
    "is_molecular": "protocols", "kish_ess": "weights", "ess_of_weights": "weights", "RunDir": "rundir",
    "SampleSet": "sampleset",
}

if TYPE_CHECKING:
    from .bijection import Bijection
    from .geometry import dihedral, dihedral_of
    from .protocols import Generator, ModeSet, MolecularModeSet, ReducedEnergy, is_molecular
    from .rundir import RunDir
    from .sampleset import SampleSet
    from .weights import ess_of_weights, kish_ess


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Bijection", "dihedral", "dihedral_of", "Generator", "ModeSet", "MolecularModeSet", "ReducedEnergy",
           "is_molecular", "kish_ess", "ess_of_weights", "RunDir", "SampleSet"]
