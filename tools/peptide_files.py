"""Build tooling (not in the package): the shipped peptide system files from a sequence.

``write_peptide_files(directory, sequence, segid)`` writes ``<name>.pdb`` exactly as ``boltzflow prepare
--sequence SEQUENCE`` builds it (PeptideBuilder + pdbfixer, extended backbone, minimised with
charmm36_2024.xml in vacuum; Amber-style ACE/NME caps) and the PSF + CHARMM parameter/topology files
written from the PDB route's OpenMM System (``charmm_params.write_charmm_files``); ``<name>`` is the
directory's name. Used by ``systems/alanine-*/make_files.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent


def write_peptide_files(directory: Path, sequence: str, segid: str) -> list[Path]:
    """Write ``directory/<name>.{pdb,psf,prm,rtf}`` for ``sequence``; returns the files written."""
    sys.path.insert(0, str(TOOLS.parent / "src"))
    sys.path.insert(0, str(TOOLS))
    from charmm_params import write_charmm_files

    from boltzflow.systems.pdb import from_pdb
    from boltzflow.systems.sequence import sequence_pdb_text

    name = directory.name
    out = directory / f"{name}.pdb"
    out.write_text(sequence_pdb_text(sequence))
    ms = from_pdb(out, add_hydrogens=False)
    write_charmm_files(ms.topology, directory / name, segid=segid)
    return sorted(directory.glob(f"{name}.*"))
