"""Regenerate the shipped alanine-tetrapeptide files (ACE-(ALA)3-NME, CHARMM36m).

Run from anywhere:  python systems/alanine-tetrapeptide/make_files.py
1. alanine-tetrapeptide.pdb: exactly what ``boltzflow prepare --sequence ACE-ALA-ALA-ALA-NME``
   builds (boltzflow.systems.sequence: PeptideBuilder + pdbfixer, extended backbone, minimised
   with charmm36_2024.xml in vacuum), written with Amber-style ACE/NME caps.
2. alanine-tetrapeptide.psf/.prm/.rtf: PSF + CHARMM parameter/topology files written from the
   PDB route's OpenMM System (tools/charmm_params.py, write_charmm_files); both by tools/peptide_files.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tools"))  # build tooling, not in the package

from peptide_files import write_peptide_files  # noqa: E402

if __name__ == "__main__":
    print("wrote", *(p.name for p in write_peptide_files(HERE, "ACE-ALA-ALA-ALA-NME", segid="ALA4")))
