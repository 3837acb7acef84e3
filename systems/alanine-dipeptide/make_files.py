"""Regenerate the shipped alanine-dipeptide files.

Run from anywhere:  python systems/alanine-dipeptide/make_files.py
1. alanine-dipeptide.pdb: ACE-ALA-NME with Amber-style caps (as users write them), atoms and
   starting coordinates of openmmtools.testsystems.AlanineDipeptideVacuum, minimised with
   CHARMM36m (charmm36_2024.xml, vacuum) after boltzflow's cap conversion.
2. alanine-dipeptide.psf/.prm/.rtf: PSF + CHARMM parameter/topology files written from that
   OpenMM System (tools/charmm_params.py, write_charmm_files).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    import openmm
    import openmm.app as app
    import openmmtools.testsystems as ts

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # build tooling, not in the package
    from charmm_params import write_charmm_files
    from boltzflow.systems.pdb import convert_caps, create_charmm_system, from_pdb

    t = ts.AlanineDipeptideVacuum(constraints=None)
    top = t.topology
    charmm_top, _ = convert_caps(top)
    system = create_charmm_system(charmm_top, "vacuum")
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(t.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1e-3, 5000)
    pos = ctx.getState(getPositions=True).getPositions()
    out = HERE / "alanine-dipeptide.pdb"
    with open(out, "w") as fh:
        fh.write("REMARK   1 ACE-ALA-NME (Amber-style caps), from openmmtools AlanineDipeptideVacuum,\n")
        fh.write("REMARK   2 minimised with charmm36_2024.xml in vacuum (boltzflow make_files.py)\n")
        app.PDBFile.writeFile(top, pos, fh)
    ms = from_pdb(out, add_hydrogens=False)
    write_charmm_files(ms.topology, HERE / "alanine-dipeptide", segid="ALAD")
    print("wrote", *(p.name for p in sorted(HERE.glob("alanine-dipeptide.*"))))


if __name__ == "__main__":
    main()
