"""Write CHARMM PSF + parameter (.prm) + topology (.rtf) files for a molecule parametrised by
OpenMM's ``charmm36_2024.xml``.

Build tooling (not part of the installed package: it uses OpenMM's private ``ForceField._forces``). Used by
``systems/<name>/make_files.py`` to make the shipped PSF route. The parameters written are
exactly those OpenMM assigned (per CHARMM atom class), converted to CHARMM units, so
``CharmmPsfFile(psf).createSystem(CharmmParameterSet(rtf, prm))`` reproduces the energy of the
``charmm36_2024.xml`` System. Only parameters the molecule uses are written.

Unit conversions (OpenMM -> CHARMM): bonds/UB ``K = k / 2 / 4.184 / 100`` (kcal/mol/A^2, E=K(r-r0)^2),
angles ``K = k / 2 / 4.184`` (kcal/mol/rad^2), dihedrals ``K = k / 4.184``, impropers ``K = k / 4.184``
(OpenMM's improper already is ``k dtheta^2``), LJ ``eps -> -eps/4.184``, ``sigma -> Rmin/2 =
sigma 2^(1/6) / 2`` in A, CMAP grids in kcal/mol on CHARMM's -180..180 grid.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

KCAL = 4.184
RMIN_PER_SIGMA = 2.0 ** (1.0 / 6.0)


def _capture_atom_types(topology, ff_files: tuple[str, ...]):
    """(openmm.System, [atom type name per atom], ForceField) from a fresh ForceField."""
    import openmm.app as app

    ff = app.ForceField(*ff_files)

    class _Capture:  # a generator whose createForce only records the matched atom types
        types: list[str] = []

        def createForce(self, sys, data, *args):
            _Capture.types = [data.atomType[a] for a in data.atoms]

    ff._forces.append(_Capture())
    system = ff.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=None, removeCMMotion=False)
    return system, list(_Capture.types), ff


def _lj_tables(ff_files: tuple[str, ...]) -> tuple[dict, dict]:
    """({class: (eps, sigma, eps14, sigma14)} in kJ/mol, nm; {(class1, class2): (eps, sigma)} NBFIX)."""
    import xml.etree.ElementTree as ET

    import openmm.app as app

    data_dir = Path(os.path.dirname(app.__file__)) / "data"
    lj, nbfix = {}, {}
    for f in ff_files:
        p = Path(f) if Path(f).is_file() else data_dir / f
        root = ET.parse(p).getroot()
        for node in root.iter("LennardJonesForce"):
            for a in node.findall("Atom"):
                eps, sig = float(a.get("epsilon")), float(a.get("sigma"))
                eps14 = float(a.get("epsilon14", eps))
                sig14 = float(a.get("sigma14", sig))
                lj[a.get("class") or a.get("type")] = (eps, sig, eps14, sig14)  # charmm36.xml: type == class
            for a in node.findall("NBFixPair"):
                nbfix[(a.get("class1") or a.get("type1"), a.get("class2") or a.get("type2"))] = (float(a.get("epsilon")), float(a.get("sigma")))
    return lj, nbfix


def _fmt(x: float) -> str:
    return f"{x:.10g}"


def write_charmm_files(topology, stem: str | Path, segid: str = "PROT",
                       ff_files: tuple[str, ...] = ("charmm36_2024.xml",)) -> dict[str, Path]:
    """Write ``<stem>.psf``, ``<stem>.prm`` and ``<stem>.rtf`` for ``topology`` (CHARMM-form, e.g. a
    MolecularSystem's topology) parametrised with ``ff_files``. Returns {"psf", "prm", "rtf": path}."""
    import openmm

    stem = Path(stem)
    system, types, ff = _capture_atom_types(topology, ff_files)
    atoms = list(topology.atoms())
    cls = [ff._atomTypes[t].atomClass for t in types]
    lj, nbfix = _lj_tables(ff_files)
    bonded = {(min(b[0].index, b[1].index), max(b[0].index, b[1].index)) for b in topology.bonds()}

    bonds_p: dict[tuple, tuple] = {}
    ub: dict[tuple[int, int], tuple[float, float]] = {}
    angles, dihedrals, impropers, cmaps = [], [], [], []
    dihed_p, impr_p, cmap_p = {}, {}, {}
    charges = [0.0] * len(atoms)

    def canon(key: tuple) -> tuple:
        return min(key, key[::-1])

    for f in system.getForces():
        name = type(f).__name__
        if name == "HarmonicBondForce":
            for k in range(f.getNumBonds()):
                i, j, r0, kk = f.getBondParameters(k)
                pair = (min(i, j), max(i, j))
                if pair in bonded:
                    bonds_p[canon((cls[i], cls[j]))] = (kk._value / 2 / KCAL / 100, r0._value * 10)
                else:
                    ub[pair] = (kk._value / 2 / KCAL / 100, r0._value * 10)
        elif name == "HarmonicAngleForce":
            for k in range(f.getNumAngles()):
                i, j, l, th, kk = f.getAngleParameters(k)
                angles.append((i, j, l))
        elif name == "PeriodicTorsionForce":
            for k in range(f.getNumTorsions()):
                i, j, l, m, n, ph, kk = f.getTorsionParameters(k)
                q = (i, j, l, m)
                chain = all((min(a, b), max(a, b)) in bonded for a, b in ((i, j), (j, l), (l, m)))
                if not chain:
                    raise ValueError(f"periodic improper {q} cannot be written to a CHARMM PRM by this tool")
                if q not in dihedrals:
                    dihedrals.append(q)
                key = (cls[i], cls[j], cls[l], cls[m])
                key = key if key == canon(key) else key[::-1]
                terms = dihed_p.setdefault(key, {})
                terms[(q if key == (cls[i], cls[j], cls[l], cls[m]) else q[::-1], n)] = (
                    kk._value / KCAL, n, math.degrees(ph._value))
        elif name == "CustomTorsionForce":
            for k in range(f.getNumTorsions()):
                i, j, l, m, (kk, th0) = f.getTorsionParameters(k)
                impropers.append((i, j, l, m))
                impr_p[(cls[i], cls[j], cls[l], cls[m])] = (kk / KCAL, math.degrees(th0))
        elif name == "CMAPTorsionForce":
            maps = [f.getMapParameters(k) for k in range(f.getNumMaps())]
            for k in range(f.getNumTorsions()):
                mp, *idx = f.getTorsionParameters(k)
                cmaps.append(tuple(idx))
                size, energy = maps[mp]
                grid = np.asarray(energy._value if hasattr(energy, "_value") else energy, dtype=float)
                charmm = np.roll(grid.reshape(size, size).T, size // 2, axis=(0, 1)) / KCAL
                cmap_p[tuple(cls[a] for a in idx)] = (size, charmm.reshape(-1))
        elif name == "NonbondedForce":
            for k in range(f.getNumParticles()):
                charges[k] = f.getParticleParameters(k)[0]._value
    angle_vals = {}
    for f in system.getForces():
        if type(f).__name__ == "HarmonicAngleForce":
            for k in range(f.getNumAngles()):
                i, j, l, th, kk = f.getAngleParameters(k)
                key = canon((cls[i], cls[j], cls[l]))
                u = ub.get((min(i, l), max(i, l)))
                angle_vals[key] = (kk._value / 2 / KCAL, math.degrees(th._value), u)

    used = sorted(set(cls))
    masses = {c: system.getParticleMass(k)._value for k, c in enumerate(cls)}
    elements = {c: atoms[k].element.symbol for k, c in enumerate(cls)}

    # ---- PSF -----------------------------------------------------------------------------
    lines = ["PSF EXT CMAP XPLOR", "", f"{2:10d} !NTITLE",
             f"* {stem.name}: written by boltzflow.systems._params from {', '.join(ff_files)}",
             "* OpenMM " + openmm.__version__, "", f"{len(atoms):10d} !NATOM"]
    for a in atoms:
        lines.append(f"{a.index + 1:10d} {segid:<8s} {a.residue.id:<8s} {a.residue.name:<8s} {a.name:<8s} "
                     f"{cls[a.index]:<6s} {charges[a.index]:14.6f}{masses[cls[a.index]]:14.4f}{0:12d}")

    def section(title: str, tuples: list[tuple], per_line: int) -> None:
        lines.append("")
        lines.append(f"{len(tuples):10d} !{title}")
        flat = [x + 1 for t in tuples for x in t]
        width = len(tuples[0]) if tuples else 1
        n_per = per_line * width
        for s in range(0, len(flat), n_per):
            lines.append("".join(f"{x:10d}" for x in flat[s:s + n_per]))

    section("NBOND: bonds", sorted(bonded), 4)
    section("NTHETA: angles", angles, 3)
    section("NPHI: dihedrals", dihedrals, 2)
    section("NIMPHI: impropers", impropers, 2)
    section("NDON: donors", [], 4)
    section("NACC: acceptors", [], 4)
    lines += ["", f"{0:10d} !NNB", "", "".join(f"{0:10d}" for _ in range(min(len(atoms), 8)))]
    for s in range(8, len(atoms), 8):
        lines.append("".join(f"{0:10d}" for _ in range(min(8, len(atoms) - s))))
    lines += ["", f"{1:10d}{0:10d} !NGRP NST2", f"{0:10d}{0:10d}{0:10d}"]
    section("NCRTERM: cross-terms", cmaps, 1)
    lines.append("")
    psf = stem.with_suffix(".psf")
    psf.write_text("\n".join(lines) + "\n")

    # ---- PRM -----------------------------------------------------------------------------
    out = [f"* CHARMM parameters for {stem.name}, converted from {', '.join(ff_files)} (OpenMM {openmm.__version__})",
           "* by boltzflow.systems._params.write_charmm_files; see the README next to this file", "*", "",
           "ATOMS"]
    for n, c in enumerate(used, 1):
        out.append(f"MASS {n:5d} {c:<6s} {masses[c]:10.5f}")
    out += ["", "BONDS"]
    for (a, b), (k, r0) in sorted(bonds_p.items()):
        out.append(f"{a:<6s} {b:<6s} {_fmt(k):>14s} {_fmt(r0):>14s}")
    out += ["", "ANGLES"]
    for (a, b, c), (k, th, u) in sorted(angle_vals.items()):
        line = f"{a:<6s} {b:<6s} {c:<6s} {_fmt(k):>14s} {_fmt(th):>14s}"
        if u is not None and u[0] != 0.0:
            line += f" {_fmt(u[0]):>14s} {_fmt(u[1]):>14s}"
        out.append(line)
    out += ["", "DIHEDRALS"]
    for key, terms in sorted(dihed_p.items()):
        seen = set()
        for (_, n), (k, nn, ph) in sorted(terms.items(), key=lambda t: t[0][1]):
            if nn in seen:
                continue
            seen.add(nn)
            out.append(f"{key[0]:<6s} {key[1]:<6s} {key[2]:<6s} {key[3]:<6s} {_fmt(k):>14s} {nn:3d} {_fmt(ph):>14s}")
    out += ["", "IMPROPER"]
    for key, (k, th0) in sorted(impr_p.items()):
        out.append(f"{key[0]:<6s} {key[1]:<6s} {key[2]:<6s} {key[3]:<6s} {_fmt(k):>14s} {0:3d} {_fmt(th0):>14s}")
    out += ["", "CMAP"]
    for key, (size, grid) in sorted(cmap_p.items()):
        out.append(" ".join(f"{c:<6s}" for c in key) + f" {size:4d}")
        for r in range(size):
            row = grid[r * size:(r + 1) * size]
            for s in range(0, size, 5):
                out.append(" ".join(f"{v:.10f}" for v in row[s:s + 5]))
            out.append("")
    out += ["", "NONBONDED nbxmod  5 atom cdiel shift vatom vdistance vswitch -",
            "cutnb 14.0 ctofnb 12.0 ctonnb 10.0 eps 1.0 e14fac 1.0 wmin 1.5", ""]
    for c in used:
        eps, sig, eps14, sig14 = lj[c]
        line = f"{c:<6s} 0.0 {_fmt(-eps / KCAL):>14s} {_fmt(sig * RMIN_PER_SIGMA / 2 * 10):>14s}"
        if (eps14, sig14) != (eps, sig):
            line += f" 0.0 {_fmt(-eps14 / KCAL):>14s} {_fmt(sig14 * RMIN_PER_SIGMA / 2 * 10):>14s}"
        out.append(line)
    fixes = [(a, b, v) for (a, b), v in sorted(nbfix.items()) if a in used and b in used]
    out += ["", "NBFIX"]
    for a, b, (eps, sig) in fixes:
        out.append(f"{a:<6s} {b:<6s} {_fmt(-eps / KCAL):>14s} {_fmt(sig * RMIN_PER_SIGMA * 10):>14s}")
    out += ["", "END", ""]
    prm = stem.with_suffix(".prm")
    prm.write_text("\n".join(out))

    # ---- RTF (atom types and the residue as it appears in the PSF) -------------------------
    rtf_lines = [f"* CHARMM topology for {stem.name} (atom types + residue), from {', '.join(ff_files)}", "*",
                 "36 1", ""]
    for n, c in enumerate(used, 1):
        rtf_lines.append(f"MASS {n:5d} {c:<6s} {masses[c]:10.5f} {elements[c]}")
    rtf_lines.append("")
    for res in topology.residues():
        q = sum(charges[a.index] for a in res.atoms())
        rtf_lines.append(f"RESI {res.name:<6s} {q:8.3f}")
        for a in res.atoms():
            rtf_lines.append(f"ATOM {a.name:<6s} {cls[a.index]:<6s} {charges[a.index]:8.4f}")
        for b in topology.bonds():
            if b[0].residue is res and b[1].residue is res:
                rtf_lines.append(f"BOND {b[0].name:<6s} {b[1].name:<6s}")
        rtf_lines.append("")
    rtf_lines += ["END", ""]
    rtf = stem.with_suffix(".rtf")
    rtf.write_text("\n".join(rtf_lines))
    return {"psf": psf, "prm": prm, "rtf": rtf}
