"""Regenerate the shipped alanine-hexapeptide files (ACE-(ALA)5-NME, CHARMM36m).

Run from anywhere:  python systems/alanine-hexapeptide/make_files.py
1. alanine-hexapeptide.pdb: exactly what ``boltzflow prepare --sequence ACE-ALA-ALA-ALA-ALA-ALA-NME``
   builds (boltzflow.systems.sequence: PeptideBuilder + pdbfixer, extended backbone, minimised
   with charmm36_2024.xml in vacuum), written with Amber-style ACE/NME caps.
2. alanine-hexapeptide.psf/.prm/.rtf: PSF + CHARMM parameter/topology files written from the
   PDB route's OpenMM System (tools/charmm_params.py, write_charmm_files).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = HERE.name
SEQUENCE = "ACE-ALA-ALA-ALA-ALA-ALA-NME"
SEGID = "ALA6"


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # build tooling, not in the package
    from charmm_params import write_charmm_files
    from boltzflow.systems.pdb import from_pdb
    from boltzflow.systems.sequence import sequence_pdb_text

    out = HERE / f"{NAME}.pdb"
    out.write_text(sequence_pdb_text(SEQUENCE))
    ms = from_pdb(out, add_hydrogens=False)
    write_charmm_files(ms.topology, HERE / NAME, segid=SEGID)
    print("wrote", *(p.name for p in sorted(HERE.glob(f"{NAME}.*"))))


if __name__ == "__main__":
    main()
