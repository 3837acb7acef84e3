"""Shipped molecules: ``alanine-dipeptide`` (ACE-ALA-NME, CHARMM36m), ``alanine-tetrapeptide``
(ACE-(ALA)3-NME), ``alanine-hexapeptide`` (ACE-(ALA)5-NME) and ``butane`` (CHARMM BUTA).

The tetra- and hexapeptide files are what ``boltzflow prepare --sequence ACE-ALA-ALA-ALA-NME``
(``ACE-ALA-ALA-ALA-ALA-ALA-NME``) builds, so both routes give the same atom order; their modes are
the automatic backbone states of :class:`boltzflow.systems.modes.PeptideModes`.

Files live in the repository's ``systems/<name>/`` (``<name>.pdb``, ``.psf``, ``.prm``, ``.rtf``,
README, ``make_files.py``); set ``BOLTZFLOW_SYSTEMS`` to a directory holding ``<name>/`` folders
to use another copy. Both routes (PDB with OpenMM's force-field XML, PSF + parameter files) give
the same System energies and the same atom order (the PDB file's).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import InputError
from .modes import PeptideModes, TorsionModes, peptide_modes
from .molecular import MolecularSystem

BUILTIN_SYSTEMS = ("alanine-dipeptide", "alanine-tetrapeptide", "alanine-hexapeptide", "butane")
ROUTES = ("pdb", "psf")

#: OpenMM force-field files of the PDB route (butane's BUTA template exists only in charmm36.xml)
_FORCE_FIELD = {"alanine-dipeptide": ("charmm36_2024.xml",), "alanine-tetrapeptide": ("charmm36_2024.xml",),
                "alanine-hexapeptide": ("charmm36_2024.xml",), "butane": ("charmm36.xml",)}
#: the sequence each shipped peptide is built from (``systems/<name>/make_files.py``)
SEQUENCES = {"alanine-tetrapeptide": "ACE-ALA-ALA-ALA-NME", "alanine-hexapeptide": "ACE-ALA-ALA-ALA-ALA-ALA-NME"}


def builtin_dir(name: str) -> Path:
    """``systems/<name>/`` of the repository (or of ``$BOLTZFLOW_SYSTEMS``)."""
    if name not in BUILTIN_SYSTEMS:
        raise InputError(f"unknown built-in system {name!r}; choose one of {', '.join(BUILTIN_SYSTEMS)}")
    env = os.environ.get("BOLTZFLOW_SYSTEMS")
    root = Path(env) if env else Path(__file__).resolve().parents[3] / "systems"
    d = root / name
    if not d.is_dir():
        raise InputError(f"built-in system directory '{d}' not found; set BOLTZFLOW_SYSTEMS to the repository's "
                         "systems/ folder")
    return d


def _atom(topology, name: str) -> int:
    hits = [a.index for a in topology.atoms() if a.name == name]
    if len(hits) != 1:
        raise InputError(f"expected exactly one atom named {name!r} in the shipped system, found {len(hits)}")
    return hits[0]


def builtin_modes(name: str, topology) -> TorsionModes | PeptideModes:
    """Mode definition of a shipped system (alanine dipeptide: phi sign; butane: trans/gauche;
    tetra-/hexapeptide: backbone states, :class:`PeptideModes`)."""
    if name in SEQUENCES:
        return peptide_modes(topology)
    if name == "alanine-dipeptide":
        # phi = C(ACE) - N - CA - C(ALA); ACE's C is CY after cap conversion
        atoms = tuple(_atom(topology, n) for n in ("CY", "N", "CA", "C"))
        return TorsionModes(atoms, (-180.0, 0.0), ("phi_negative", "phi_positive"), "phi_positive", "phi")
    atoms = tuple(_atom(topology, n) for n in ("C1", "C2", "C3", "C4"))
    # bins: [-120, 0) gauche-, [0, 120) gauche+, [120, 180] U [-180, -120) trans
    return TorsionModes(atoms, (-120.0, 0.0, 120.0), ("gauche_minus", "gauche_plus", "trans"), "gauche_plus",
                        "C1-C2-C3-C4")


def builtin_system(name: str, solvent: str = "vacuum", temperature: float = 300.0,
                   route: str = "pdb") -> MolecularSystem:
    """A shipped system as a :class:`MolecularSystem` with its modes.

    name: one of ``BUILTIN_SYSTEMS``. solvent: "vacuum" | "obc2". temperature: K.
    route: "pdb" (OpenMM force-field XML on the PDB) or "psf" (PSF + .prm/.rtf); same energies."""
    if route not in ROUTES:
        raise InputError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    d = builtin_dir(name)
    pdb = d / f"{name}.pdb"
    if route == "pdb":
        from .pdb import from_pdb

        ms = from_pdb(pdb, solvent=solvent, temperature=temperature, name=name, add_hydrogens=False,
                      force_field=_FORCE_FIELD[name])
    else:
        from .psf import from_psf

        ms = from_psf(d / f"{name}.psf", [d / f"{name}.rtf", d / f"{name}.prm"], pdb, solvent=solvent,
                      temperature=temperature, name=name)
    meta = dict(ms.metadata, builtin=name, route=route)
    return dataclasses.replace(ms, modes=builtin_modes(name, ms.topology), metadata=meta)
