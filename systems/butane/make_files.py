"""Regenerate the shipped butane files: butane.pdb, butane.psf, butane.prm, butane.rtf.

Run from anywhere:  python systems/butane/make_files.py
1. Builds an all-trans n-butane (CHARMM residue BUTA, atom names of OpenMM's charmm36.xml)
   from ideal geometry and minimises it with OpenMM's charmm36.xml (CGenFF BUTA; charmm36_2024.xml has
   no BUTA template) in vacuum -> butane.pdb.
2. Writes PSF + CHARMM parameter/topology files from that OpenMM System
   (tools/charmm_params.py, write_charmm_files) -> butane.psf/.prm/.rtf.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def build_trans_butane() -> tuple[list[str], np.ndarray]:
    """Atom names and (14, 3) positions in nm of an ideal all-trans butane."""
    cc, ch = 0.153, 0.109
    half = np.radians(109.47) / 2
    carbons = []
    for k in range(4):  # zig-zag in the xy plane
        carbons.append([k * cc * np.sin(half), (k % 2) * cc * np.cos(half), 0.0])
    carbons = np.array(carbons)
    names, pos = [], []
    for k in range(4):
        c = carbons[k]
        names.append(f"C{k + 1}")
        pos.append(c)
        nbrs = [carbons[j] for j in (k - 1, k + 1) if 0 <= j < 4]
        bis = -sum((n - c) / np.linalg.norm(n - c) for n in nbrs)
        bis /= np.linalg.norm(bis)
        hs = []
        if len(nbrs) == 2:  # CH2: two H out of plane
            for s in (1, -1):
                d = bis * np.cos(np.radians(54.75)) + np.array([0, 0, s]) * np.sin(np.radians(54.75))
                hs.append(c + ch * d / np.linalg.norm(d))
        else:  # CH3
            axis = -(nbrs[0] - c) / np.linalg.norm(nbrs[0] - c)
            perp1 = np.cross(axis, [0, 0, 1.0]); perp1 /= np.linalg.norm(perp1)
            perp2 = np.cross(axis, perp1)
            for ang in (0, 120, 240):
                a = np.radians(ang)
                d = axis * np.cos(np.radians(70.53)) + np.sin(np.radians(70.53)) * (np.cos(a) * perp1 + np.sin(a) * perp2)
                hs.append(c + ch * d)
        for m, h in enumerate(hs):
            names.append(f"H{k + 1}{m + 1}")
            pos.append(h)
    return names, np.array(pos)


def write_pdb(path: Path) -> None:
    import openmm
    import openmm.app as app
    import openmm.unit as unit

    names, pos = build_trans_butane()
    top = app.Topology()
    chain = top.addChain("A")
    res = top.addResidue("BUTA", chain, "1")
    atoms = {n: top.addAtom(n, app.element.carbon if n[0] == "C" else app.element.hydrogen, res) for n in names}
    for k in range(1, 5):
        if k < 4:
            top.addBond(atoms[f"C{k}"], atoms[f"C{k + 1}"])
        for n in names:
            if n.startswith(f"H{k}"):
                top.addBond(atoms[f"C{k}"], atoms[n])
    ff = app.ForceField("charmm36.xml")
    system = ff.createSystem(top, nonbondedMethod=app.NoCutoff, constraints=None)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1e-3, 5000)
    minimised = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    with open(path, "w") as fh:
        fh.write("REMARK   1 n-butane, CHARMM residue BUTA, all-trans, minimised with charmm36.xml (vacuum)\n")
        app.PDBFile.writeFile(top, minimised, fh)


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    write_pdb(HERE / "butane.pdb")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))  # build tooling, not in the package
    from charmm_params import write_charmm_files
    from boltzflow.systems.pdb import from_pdb

    ms = from_pdb(HERE / "butane.pdb", add_hydrogens=False, force_field=("charmm36.xml",))
    write_charmm_files(ms.topology, HERE / "butane", segid="BUT", ff_files=("charmm36.xml",))
    print("wrote", *(p.name for p in sorted(HERE.glob("butane.*"))))


if __name__ == "__main__":
    main()
