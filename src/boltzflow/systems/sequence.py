"""Peptides from a sequence: a 3D all-atom structure, then the usual CHARMM36m system.

Sequences are written either

* as three-letter residue names joined by ``-`` (or spaces): ``ACE-ALA-ALA-ALA-NME``; an optional
  ``ACE`` cap may come first and an optional ``NME`` (alias ``NMA``) cap last, or
* as one-letter codes without separators: ``AAAA``, ``GYDPETGTWG`` (so ``ALA`` alone is
  Ala-Leu-Ala; write ``ALA-`` ... with a separator, or ``ACE-ALA-NME``, for three-letter names).

An end without a cap is a charged (zwitterionic) terminus: NH3+ at the N-terminus, COO- at the
C-terminus. Histidine is built as HIS and protonated by OpenMM's Modeller at pH 7 (HIE/HSE).

How the structure is made (no geometry is written by boltzflow itself):

1. ``PeptideBuilder`` (Tien et al. 2013, on Biopython) builds the heavy atoms of the amino-acid
   chain from ideal internal coordinates with every backbone (phi, psi) = ``backbone`` (default
   extended, (-150, 150) degrees) and side chains in their standard rotamers.
2. ``pdbfixer`` adds the ACE / NME caps (its residue templates), the C-terminal OXT of an uncapped
   chain, and every hydrogen (pH 7). It places ACE as a cis amide; :func:`trans_caps` turns every cap
   amide trans (a 180-degree turn of the cap about its C-N bond), since sampling at <= 700 K never
   crosses the ~20 kcal/mol amide barrier. A single residue gets its NME cap from PeptideBuilder (a
   glycine whose CA becomes the methyl carbon): pdbfixer cannot cap a one-residue chain.
3. :func:`boltzflow.systems.pdb.from_pdb` builds the CHARMM36m System from that PDB (caps converted
   to CHARMM patches; atom order = the PDB's: per residue the caps' / amino acid's atoms in
   pdbfixer's order, see ``topology.pdb`` of a prepared system).
4. The structure is energy-minimised with that System (OpenMM ``LocalEnergyMinimizer``, Reference
   platform, so the result is reproducible).

The same sequence always gives the same atoms in the same order, with the same bonds and force
field terms (``alanine-tetrapeptide`` and ``alanine-hexapeptide`` are made this way,
``systems/*/make_files.py``, and tests check that their atom order is that of ``prepare --sequence``).
The coordinates are not bitwise reproducible: pdbfixer's placement of the caps and hydrogens varies
from run to run (it iterates a Python set of bonds), so two builds can end in nearby minima that
differ by up to ~0.2 nm in cap and hydrogen positions (e.g. methyl rotations); the backbone torsions,
the capped ends' included, are set (:func:`set_cap_torsions`). Any of them is a
valid starting structure; for a fixed one, keep the prepared directory or the shipped PDB.
"""

from __future__ import annotations

import dataclasses
import io
import re
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from .molecular import MolecularSystem
from .pdb import FORCE_FIELD_FILES, check_solvent_temperature

#: one-letter code -> residue name (the 20 standard amino acids)
ONE_LETTER = {"A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY",
              "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER",
              "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL"}
THREE_LETTER = {v: k for k, v in ONE_LETTER.items()}
N_CAPS = ("ACE",)
C_CAPS = ("NME", "NMA")

#: backbone (phi, psi) in degrees every residue is built with (extended strand)
EXTENDED = (-150.0, 150.0)

_FORMS = ("write three-letter names joined by '-' (e.g. ACE-ALA-ALA-ALA-NME; optional ACE first and NME last) "
          "or one-letter codes (e.g. AAAA, GYDPETGTWG)")


@dataclasses.dataclass(frozen=True)
class ParsedSequence:
    """A validated sequence: amino acids (three-letter names) and which ends carry a cap."""

    residues: tuple[str, ...]
    n_cap: str | None = None  # "ACE" or None (NH3+)
    c_cap: str | None = None  # "NME" or None (COO-)

    @property
    def one_letter(self) -> str:
        return "".join(THREE_LETTER[r] for r in self.residues)

    def __str__(self) -> str:
        return "-".join(([self.n_cap] if self.n_cap else []) + list(self.residues)
                        + ([self.c_cap] if self.c_cap else []))


def parse_sequence(sequence: str) -> ParsedSequence:
    """Parse ``ACE-ALA-ALA-NME`` / ``AAAA`` style sequences; InputError naming the bad part otherwise."""
    if not isinstance(sequence, str) or not sequence.strip():
        raise InputError(f"empty sequence; {_FORMS}")
    text = sequence.strip()
    if re.search(r"[-\s]", text):
        tokens = [t.upper() for t in re.split(r"[-\s]+", text) if t]
    else:
        bad = [c for c in text if c.upper() not in ONE_LETTER]
        if bad or not text.isalpha():
            raise InputError(f"unknown one-letter residue code(s) {', '.join(sorted(set(bad)))!r} in sequence "
                             f"{sequence!r}; the codes are {''.join(sorted(ONE_LETTER))}; {_FORMS}")
        return ParsedSequence(tuple(ONE_LETTER[c.upper()] for c in text))
    if not tokens:
        raise InputError(f"empty sequence {sequence!r}; {_FORMS}")
    n_cap = c_cap = None
    if tokens[0] in N_CAPS:
        n_cap, tokens = tokens[0], tokens[1:]
    if tokens and tokens[-1] in C_CAPS:
        c_cap, tokens = "NME", tokens[:-1]
    for i, t in enumerate(tokens):
        if t in N_CAPS + C_CAPS:
            raise InputError(f"cap {t} in the middle of sequence {sequence!r}: ACE may only come first and NME "
                             "last; split the chain or remove the cap")
        if t not in THREE_LETTER:
            hint = " (one-letter codes are written without '-', e.g. AAAA)" if len(t) == 1 else ""
            raise InputError(f"unknown residue {t!r} in sequence {sequence!r}{hint}; known residues: "
                             f"{', '.join(sorted(THREE_LETTER))} and the caps ACE (first), NME (last)")
    if not tokens:
        raise InputError(f"sequence {sequence!r} has caps but no amino acid; put at least one residue between "
                         "ACE and NME")
    return ParsedSequence(tuple(tokens), n_cap, c_cap)


def sequence_pdb_text(sequence: str | ParsedSequence, backbone: tuple[float, float] = EXTENDED,
                      minimize: bool = True, solvent: str = "vacuum",
                      force_field: tuple[str, ...] = FORCE_FIELD_FILES) -> str:
    """PDB text (Amber-style ACE/NME caps, all hydrogens) of the peptide ``sequence``.

    The structure is built as described in the module docstring; with ``minimize`` its coordinates
    are those of the CHARMM36m energy minimum (in ``solvent``) reached from the built geometry."""
    import openmm.app as app

    seq = sequence if isinstance(sequence, ParsedSequence) else parse_sequence(sequence)
    top, pos = _build_topology(seq, backbone)
    if minimize:
        pos = _minimized(top, pos, solvent, force_field)
    buf = io.StringIO()
    buf.write(f"REMARK   1 {seq} built by boltzflow.systems.sequence (PeptideBuilder + pdbfixer)\n")
    if minimize:
        buf.write(f"REMARK   2 minimised with {', '.join(force_field)} ({solvent})\n")
    app.PDBFile.writeFile(top, pos, buf)
    return buf.getvalue()


def from_sequence(sequence: str, solvent: str = "vacuum", temperature: float = 300.0, name: str | None = None,
                  backbone: tuple[float, float] = EXTENDED, minimize: bool = True,
                  force_field: tuple[str, ...] = FORCE_FIELD_FILES) -> MolecularSystem:
    """CHARMM36m :class:`MolecularSystem` of a peptide given by its sequence.

    sequence: ``"ACE-ALA-ALA-ALA-NME"`` (three-letter, optional ACE/NME caps at the ends) or
    ``"GYDPETGTWG"`` (one-letter, zwitterionic ends). solvent: "vacuum" | "obc2". temperature: K.
    name: defaults to the sequence. backbone: (phi, psi) degrees of the built structure (every residue's,
    the capped ends' included: :func:`set_cap_torsions`; without a cap the terminal torsion is undefined).
    minimize: energy-minimise the built structure. The system carries automatic backbone modes
    (:func:`boltzflow.systems.modes.peptide_modes`). InputError for a bad sequence."""
    from .pdb import from_pdb

    check_solvent_temperature(solvent, temperature)
    seq = parse_sequence(sequence)
    text = sequence_pdb_text(seq, backbone=backbone, minimize=minimize, solvent=solvent, force_field=force_field)
    with tempfile.TemporaryDirectory(prefix="boltzflow-seq-") as tmp:
        path = Path(tmp) / "peptide.pdb"
        path.write_text(text)
        ms = from_pdb(path, solvent=solvent, temperature=temperature, name=name or str(seq).lower(),
                      add_hydrogens=False, force_field=tuple(force_field))
    meta = dict(ms.metadata, builder="sequence", source=None, sequence=str(seq),
                backbone_built_deg=list(backbone), minimized=bool(minimize))
    return dataclasses.replace(ms, metadata=meta)


def _build_topology(seq: ParsedSequence, backbone: tuple[float, float]):
    """(openmm Topology, positions Quantity) with caps, terminal OXT and hydrogens."""
    try:
        import PeptideBuilder
        from Bio.PDB import PDBIO
        from pdbfixer import PDBFixer
    except ImportError as e:  # pragma: no cover - dependencies of boltzflow
        raise InputError(f"building from a sequence needs PeptideBuilder, biopython and pdbfixer ({e}); "
                         "run scripts/setup.sh or pip install PeptideBuilder pdbfixer") from e
    phi, psi = (float(a) for a in backbone)
    n = len(seq.residues)
    # pdbfixer cannot place a cap on a one-residue chain (division by zero in its placement): there the
    # NME cap is built by PeptideBuilder as a glycine whose CA becomes NME's methyl carbon
    nme_from_gly = n == 1 and seq.c_cap == "NME"
    letters = seq.one_letter + ("G" if nme_from_gly else "")
    k = len(letters)
    structure = PeptideBuilder.make_structure(letters, [phi] * (k - 1), [psi] * (k - 1))
    if nme_from_gly:
        gly = list(structure[0]["A"])[-1]
        for name in ("C", "O", "OXT"):
            if name in gly:
                gly.detach_child(name)
        ca = gly["CA"]
        gly.detach_child("CA")
        ca.id, ca.name, ca.fullname = "C", "C", " C  "
        gly.add(ca)
        gly.resname = "NME"
    buf = io.StringIO()
    writer = PDBIO()
    writer.set_structure(structure)
    writer.save(buf)
    import openmm

    # pdbfixer places the caps with a seeded minimisation (Reference platform: no thread-order effects);
    # it still iterates a set of bonds, so the placement is not bitwise reproducible (module docstring)
    fixer = PDBFixer(pdbfile=io.StringIO(buf.getvalue()), platform=openmm.Platform.getPlatformByName("Reference"))
    fixer.findMissingResidues()
    missing = {}
    if seq.n_cap:
        missing[(0, 0)] = [seq.n_cap]
    if seq.c_cap and not nme_from_gly:
        missing[(0, n)] = [seq.c_cap]
    fixer.missingResidues = missing
    fixer.findMissingAtoms()
    try:
        fixer.addMissingAtoms(seed=0)
    except ZeroDivisionError as e:
        raise InputError(f"pdbfixer could not place the caps or terminal atoms of {seq} (a single residue "
                         "needs an NME cap here: write e.g. ACE-ALA-NME)") from e
    fixer.addMissingHydrogens(7.0)
    got = [r.name for r in fixer.topology.residues()]
    want = ([seq.n_cap] if seq.n_cap else []) + list(seq.residues) + ([seq.c_cap] if seq.c_cap else [])
    if [("HIS" if g in ("HID", "HIE", "HIP") else g) for g in got] != want:  # pragma: no cover - library change
        raise InputError(f"building {seq} gave residues {'-'.join(got)}; please report this")
    return fixer.topology, set_cap_torsions(fixer.topology, trans_caps(fixer.topology, fixer.positions), phi, psi)


#: (cap residue, atoms that define the amide torsion on the cap side, the cap's atoms that rotate)
_CAP_AMIDES = {"ACE": ("CH3", "C"), "NME": ("C", "N")}


def cap_omegas(topology, positions) -> dict[str, float]:
    """The amide torsions (degrees) of the ACE and NME caps of a peptide: ACE CH3-C-N-CA(first residue),
    NME CA(last residue)-C-N-C(methyl); trans is 180, cis 0. positions: (n_atoms, 3) any length unit."""
    from ..core.geometry import dihedral_of

    x = np.asarray(getattr(positions, "_value", positions), dtype=np.float64)
    res = list(topology.residues())
    out = {}
    for i, r in enumerate(res):
        names = {a.name: a.index for a in r.atoms()}
        if r.name == "ACE" and i + 1 < len(res):
            nxt = {a.name: a.index for a in res[i + 1].atoms()}
            quad = [names["CH3"], names["C"], nxt["N"], nxt["CA"]]
        elif r.name == "NME" and i > 0:
            prv = {a.name: a.index for a in res[i - 1].atoms()}
            quad = [prv["CA"], prv["C"], names["N"], names["C"]]
        else:
            continue
        out[r.name] = float(np.degrees(dihedral_of(x, quad)[0]))
    return out


def trans_caps(topology, positions):
    """Positions with every cis cap amide (ACE or NME, ``cap_omegas`` within 90 degrees of 0) turned trans:
    the cap's atoms off the C-N bond rotated by 180 degrees about it (bond lengths and angles kept).
    pdbfixer places an ACE cap cis (omega ~ 2 degrees), and the cis and trans amide are ~20 kcal/mol
    apart: sampling at <= 700 K never isomerises it, so a cis cap would stay cis in every simulation.
    Returns an OpenMM Quantity in nm."""
    import openmm.unit as u

    x = np.array(getattr(positions, "value_in_unit", lambda unit: positions)(u.nanometer), dtype=np.float64)
    res = list(topology.residues())
    for name, omega in cap_omegas(topology, x).items():
        if abs(omega) >= 90.0:
            continue
        cap = next(r for r in res if r.name == name)
        atoms = {a.name: a.index for a in cap.atoms()}
        if name == "ACE":  # axis C(ACE) -> N(first residue); every ACE atom but C rotates
            first = res[res.index(cap) + 1]
            a0, a1 = atoms["C"], next(a.index for a in first.atoms() if a.name == "N")
            moving = [i for n, i in atoms.items() if n != "C"]
        else:  # axis N(NME) -> C(last residue); every NME atom but N rotates
            last = res[res.index(cap) - 1]
            a0, a1 = atoms["N"], next(a.index for a in last.atoms() if a.name == "C")
            moving = [i for n, i in atoms.items() if n != "N"]
        _rotate(x, a0, a1, moving, np.pi)
    return u.Quantity([openmm_vec(p) for p in x], u.nanometer)


def _rotate(x: np.ndarray, axis_from: int, axis_to: int, moving: list[int], angle: float) -> None:
    """Rotate ``x[moving]`` in place by ``angle`` (radians) about the bond axis_from -> axis_to."""
    k = x[axis_to] - x[axis_from]
    k /= np.linalg.norm(k)
    v = x[moving] - x[axis_from]
    c, s = np.cos(angle), np.sin(angle)
    x[moving] = x[axis_from] + v * c + np.cross(k, v) * s + (v @ k)[:, None] * k[None] * (1.0 - c)


def set_cap_torsions(topology, positions, phi: float, psi: float):
    """Positions with phi of the first residue (C(ACE)-N-CA-C) set to ``phi`` and psi of the last
    (N-CA-C-N(NME)) to ``psi`` (degrees), by turning the cap with its amide plane (the first residue's
    amide H; the last residue's carbonyl O) about the N-CA / CA-C bond: pdbfixer's cap placement leaves these
    two torsions to chance (phi of ALA2 came out at -150 on one machine and +54 on another), so a built
    peptide now has every backbone torsion it was asked for. Returns an OpenMM Quantity in nm."""
    import openmm.unit as u

    from ..core.geometry import dihedral_of

    x = np.array(getattr(positions, "value_in_unit", lambda unit: positions)(u.nanometer), dtype=np.float64)
    res = list(topology.residues())
    for i, r in enumerate(res):
        own = {a.name: a.index for a in r.atoms()}
        if r.name == "ACE" and i + 1 < len(res):
            first = {a.name: a.index for a in res[i + 1].atoms()}
            quad = [own["C"], first["N"], first["CA"], first["C"]]
            moving = list(own.values()) + [first[h] for h in ("H", "HN") if h in first]
            axis, target = (first["N"], first["CA"]), phi
        elif r.name == "NME" and i > 0:
            last = {a.name: a.index for a in res[i - 1].atoms()}
            quad = [last["N"], last["CA"], last["C"], own["N"]]
            moving = list(own.values()) + [last["O"]]
            axis, target = (last["C"], last["CA"]), psi
        else:
            continue
        now = float(np.degrees(dihedral_of(x, quad)[0]))
        # rotate by the difference; if the axis' orientation makes that the wrong sense, turn back twice
        _rotate(x, axis[0], axis[1], moving, np.radians(target - now))
        got = float(np.degrees(dihedral_of(x, quad)[0]))
        if abs((got - target + 180.0) % 360.0 - 180.0) > 1e-6:
            _rotate(x, axis[0], axis[1], moving, -2.0 * np.radians(target - now))
    return u.Quantity([openmm_vec(p) for p in x], u.nanometer)


def openmm_vec(p):
    """One position as an ``openmm.Vec3`` (nm values)."""
    import openmm

    return openmm.Vec3(float(p[0]), float(p[1]), float(p[2]))


def _minimized(topology, positions, solvent: str, force_field: tuple[str, ...]):
    """Positions (Quantity) at the CHARMM36m minimum reached from ``positions`` (Reference platform)."""
    import openmm

    from .pdb import convert_caps, create_charmm_system

    charmm_top, _ = convert_caps(topology)
    system = create_charmm_system(charmm_top, solvent, tuple(force_field))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1e-3, 5000)
    pos = ctx.getState(getPositions=True).getPositions(asNumpy=True)
    if not np.all(np.isfinite(pos._value)):  # pragma: no cover
        raise InputError("energy minimisation of the built peptide gave non-finite coordinates; "
                         "try minimize=False or another backbone")
    del ctx
    return pos
