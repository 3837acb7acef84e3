"""CHARMM36m systems from PDB files (OpenMM ``charmm36_2024.xml``; ``implicit/obc2.xml`` for OBC2).

What the builder does to a user's PDB:

* **Caps.** Amber-style ``ACE`` / ``NME`` (alias ``NMA``) residues are merged into the residue they
  cap, with CHARMM atom names (ACE: CH3->CAY, C->CY, O->OY, H1/H2/H3->HY1/HY2/HY3; NME: N->NT,
  H->HNT, C->CAT, H1/H2/H3->HT1/HT2/HT3), so OpenMM applies CHARMM's ACE / CT3 patches and the
  residue's impropers. Atom order is unchanged by the merge.
* **Histidine.** HID/HSD, HIE/HSE, HIP/HSP name the tautomer; with hydrogens present the
  tautomer follows the hydrogens (HD1 / HE2 / both).
* **Hydrogens.** If the file already holds every hydrogen, the atom order is exactly the file's.
  If hydrogens are missing (and ``add_hydrogens``), OpenMM's Modeller adds them: each residue's
  heavy atoms keep their file order and every hydrogen (old or new) is placed right after the
  heavy atom it is bonded to. The prepared system's ``topology.pdb`` is then the authoritative
  atom order (``boltzflow prepare`` writes it).
* Vacuum = NoCutoff; no constraints; no CMMotionRemover.
* **Modes.** A peptide (any residue with both backbone torsions phi and psi) gets backbone
  conformational states automatically (:func:`boltzflow.systems.modes.peptide_modes`), so
  populations, ``compare`` and ``report --replica`` work on it; other molecules get none.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, SystemBuildError
from ..units import check_temperature
from .modes import peptide_modes
from .molecular import SOLVENTS, MolecularSystem, hydrogen_bookkeeping, prune_unused_cmap_maps

FORCE_FIELD_FILES = ("charmm36_2024.xml",)
SOLVENT_FILES = {"vacuum": (), "obc2": ("implicit/obc2.xml",)}

_ACE_NAMES = {"CH3": "CAY", "C": "CY", "O": "OY", "H1": "HY1", "H2": "HY2", "H3": "HY3"}
_NME_NAMES = {"N": "NT", "H": "HNT", "C": "CAT", "H1": "HT1", "H2": "HT2", "H3": "HT3"}
_HIS_VARIANT = {"HID": "HID", "HSD": "HID", "HIE": "HIE", "HSE": "HIE", "HIP": "HIP", "HSP": "HIP"}


def check_solvent_temperature(solvent: str, temperature: float) -> None:
    """Raise InputError for an unknown solvent or a temperature (K) that is not finite and > 0
    (:func:`boltzflow.units.check_temperature`; a warning above 1 000 K)."""
    if solvent not in SOLVENTS:
        raise InputError(f"unknown solvent {solvent!r}; choose one of {', '.join(SOLVENTS)}")
    check_temperature(temperature)


def charmm_forcefield(solvent: str = "vacuum", force_field: tuple[str, ...] = FORCE_FIELD_FILES):
    """OpenMM ForceField ``force_field`` + the ``solvent`` files, cached per process (treat as read-only).

    The big CHARMM XML is parsed once; the solvent variant is a shallow copy with the implicit-solvent
    file's script loaded on top (the same ForceField as ``ForceField(*force_field, *solvent_files)``)."""
    check_solvent_temperature(solvent, 300.0)
    return _solvent_forcefield(solvent, tuple(force_field))


@functools.lru_cache(maxsize=8)
def _base_forcefield(force_field: tuple[str, ...]):
    import openmm.app as app

    try:
        return app.ForceField(*force_field)
    except Exception as e:  # missing or malformed XML
        raise InputError(f"could not load OpenMM force field {', '.join(force_field)}: "
                         f"{' '.join(str(e).split())[:200] or type(e).__name__}; give OpenMM force-field XML files") from e


@functools.lru_cache(maxsize=8)
def _solvent_forcefield(solvent: str, force_field: tuple[str, ...]):
    import copy

    base = _base_forcefield(force_field)
    if not SOLVENT_FILES[solvent]:
        return base
    ff = copy.copy(base)
    ff._forces = list(base._forces)  # loadFile appends generators/scripts: keep the base untouched
    ff._scripts = list(base._scripts)
    for f in SOLVENT_FILES[solvent]:
        ff.loadFile(f)
    return ff


def read_pdb(path: str | Path):
    """``openmm.app.PDBFile`` for ``path``; InputError if missing, empty or malformed."""
    import openmm.app as app

    p = Path(path)
    if not p.is_file():
        raise InputError(f"PDB file '{p}' not found; give the path to an existing .pdb file")
    try:
        pdb = app.PDBFile(str(p))
    except Exception as e:  # OpenMM raises bare Exceptions/ValueErrors for malformed files
        raise InputError(f"could not read PDB file '{p}': {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                         "check that it is a valid PDB (ATOM/HETATM records)") from e
    if pdb.topology.getNumAtoms() == 0:
        raise InputError(f"PDB file '{p}' contains no atoms (no ATOM/HETATM records)")
    pos = np.array(pdb.getPositions(asNumpy=True)._value, dtype=np.float64)
    if not np.all(np.isfinite(pos)):
        raise InputError(f"PDB file '{p}' has non-finite coordinates")
    return pdb


def _file_residue_names(path: Path) -> list[str]:
    """Residue names in file order (first model), as written in the file (before OpenMM renames)."""
    names, last = [], None
    for line in path.read_text(errors="replace").splitlines():
        rec = line[:6]
        if rec.startswith("ENDMDL"):
            break
        if rec in ("ATOM  ", "HETATM"):
            key = (line[21:22], line[22:27], line[17:20])
            if key != last:
                names.append(line[17:20].strip())
                last = key
    return names


def _has_missing_hydrogens(topology, positions) -> tuple[bool, Any, Any, list]:
    """Run Modeller.addHydrogens on a copy; return (added_any, topology, positions, variants)."""
    import openmm.app as app

    variants = []
    for res in topology.residues():
        variants.append(_HIS_VARIANT.get(getattr(res, "_file_name", res.name)))
    mod = app.Modeller(topology, positions)
    mod.addHydrogens(variants=variants)
    added = mod.topology.getNumAtoms() != topology.getNumAtoms()
    return added, mod.topology, mod.positions, variants


def convert_caps(topology) -> tuple[Any, list[str]]:
    """Merge Amber-style ACE/NME residues into the residue they cap (CHARMM ACE/CT3 form).

    Returns (new topology with the same atoms in the same order, list of conversions made).
    Raises SystemBuildError for a cap that is not next to a residue in its chain."""
    import openmm.app as app

    new = app.Topology()
    new.setPeriodicBoxVectors(topology.getPeriodicBoxVectors())
    atom_map = {}
    notes: list[str] = []
    for chain in topology.chains():
        residues = list(chain.residues())
        nchain = new.addChain(chain.id)
        pending_ace = None  # ACE residue waiting for the next residue
        current = None  # last residue created in the new topology
        for k, res in enumerate(residues):
            rname = res.name.upper()
            if rname == "ACE":
                if k + 1 >= len(residues) or residues[k + 1].name.upper() in ("ACE", "NME", "NMA"):
                    raise SystemBuildError(
                        f"ACE cap (chain {chain.id}, residue {res.id}) is not followed by an amino acid; "
                        "an ACE cap must precede the residue it caps")
                pending_ace = res
                continue
            if rname in ("NME", "NMA"):
                if current is None or k == 0:
                    raise SystemBuildError(
                        f"{res.name} cap (chain {chain.id}, residue {res.id}) does not follow an amino acid; "
                        "an NME cap must follow the residue it caps")
                for a in res.atoms():
                    atom_map[a] = new.addAtom(_NME_NAMES.get(a.name, a.name), a.element, current, a.id)
                notes.append(f"NME {chain.id}:{res.id} -> CT3 patch on {current.name} {current.id}")
                continue
            current = new.addResidue(res.name, nchain, res.id, res.insertionCode)
            if pending_ace is not None:
                for a in pending_ace.atoms():
                    atom_map[a] = new.addAtom(_ACE_NAMES.get(a.name, a.name), a.element, current, a.id)
                notes.append(f"ACE {chain.id}:{pending_ace.id} -> ACE patch on {res.name} {res.id}")
                pending_ace = None
            for a in res.atoms():
                atom_map[a] = new.addAtom(a.name, a.element, current, a.id)
    old_order = [a.index for a in topology.atoms()]
    new_order = [atom_map[a].index for a in topology.atoms()]
    if old_order != new_order:
        raise SystemBuildError("capping residues are not adjacent to the residues they cap in the atom order; "
                               "put each ACE right before and each NME right after its residue in the file")
    for b in topology.bonds():
        new.addBond(atom_map[b[0]], atom_map[b[1]], b.type, b.order)
    return new, notes


#: residue names that map to other CHARMM template names
_TEMPLATE_ALIASES = {"HIS": ("HSD", "HSE", "HSP"), "BUT": ("BUTA",)}


def _restricted_forcefield(ff, topology):
    """A shallow copy of ``ff`` whose residue templates are only those named like the topology's
    residues, or None when some residue name is unknown to ``ff``.

    OpenMM tries every single-residue patch on every template when a residue needs a patch (caps,
    termini): tens of seconds for CHARMM36m. Restricting the templates to the residue names makes
    that instant and gives the same System for correctly named residues (tested against the full
    force field). Residues are therefore matched by name (aliases: HIS -> HSD/HSE/HSP by hydrogens)."""
    import copy

    names = set()
    for res in topology.residues():
        cands = _TEMPLATE_ALIASES.get(res.name, (res.name,))
        known = [c for c in cands if c in ff._templates]
        if not known:
            return None
        names.update(known)
    small = copy.copy(ff)
    small._templates = {k: v for k, v in ff._templates.items() if k in names}
    # without HS2 (HSD/HSP -> HSE) patches: they make the histidine tautomers ambiguous
    small._templatePatches = {k: {p for p in v if not p[0].startswith("HS2_")}
                              for k, v in ff._templatePatches.items() if k in names}
    small._templateSignatures = {sig: [t for t in ts if t.name in names] for sig, ts in ff._templateSignatures.items()}
    return small


def _unknown_residues(ff, topology) -> list[str]:
    out = []
    for res in topology.residues():
        if not any(c in ff._templates for c in _TEMPLATE_ALIASES.get(res.name, (res.name,))):
            out.append(f"{res.name} {res.id} (chain {res.chain.id})")
    return out


#: atom names of CHARMM's ACE / CT3 cap patches, which a PDB must give as separate ACE / NME residues
_CHARMM_CAP_NAMES = frozenset(_ACE_NAMES.values()) | frozenset(_NME_NAMES.values())
#: heavy atoms of CHARMM's ACE / CT3 cap patches (a residue they are merged into has them on top of its template)
_CAP_HEAVY = {"CAY", "CY", "OY", "NT", "CAT"}
#: C-terminal oxygens: a residue with any of these may name its carbonyl O differently
_TERMINAL_OXYGENS = {"OXT", "OT1", "OT2"}


def _reject_charmm_named_caps(topology, path: Path) -> None:
    """SystemBuildError for a PDB whose caps are CHARMM-named atoms inside a residue (CAY, CY, OY,
    NT, CAT, ...), as in a CHARMM PDB or a prepared system's topology.pdb: they must be separate
    Amber-style ACE / NME residues."""
    for res in topology.residues():
        if res.name.upper() in ("ACE", "NME", "NMA"):
            continue
        caps = sorted({a.name for a in res.atoms()} & _CAP_HEAVY)
        if caps:
            raise SystemBuildError(
                f"'{path}': residue {res.name} {res.id} (chain {res.chain.id}) carries CHARMM-named cap atoms "
                f"({', '.join(caps)}); give each cap as its own residue, ACE (CH3, C, O, H1-H3) before and NME "
                "(N, H, C, H1-H3) after the residue it caps, or prepare the original PDB")


def _missing_heavy_atoms(ff, topology) -> tuple[str, list[str]] | None:
    """(residue label, heavy-atom names) of the first residue lacking heavy atoms of its force-field
    template (names matched as in _TEMPLATE_ALIASES; extra cap/terminal atoms are fine), or None."""
    for res in topology.residues():
        names = {a.name for a in res.atoms()}
        for cand in _TEMPLATE_ALIASES.get(res.name, (res.name,)):
            template = ff._templates.get(cand)
            if template is None:
                continue
            heavy = [a.name for a in template.atoms if a.element is not None and a.element.symbol != "H"]
            missing = [n for n in heavy if n not in names and not (n == "O" and names & _TERMINAL_OXYGENS)]
            if missing:
                return f"{res.name} {res.id} (chain {res.chain.id})", missing
            break
    return None


def create_charmm_system(topology, solvent: str, force_field: tuple[str, ...] = FORCE_FIELD_FILES):
    """``openmm.System`` for ``topology`` with CHARMM36m in ``solvent``; NoCutoff, no constraints,
    no CMMotionRemover. Raises SystemBuildError naming the residue that has no template."""
    import openmm.app as app

    ff = charmm_forcefield(solvent, tuple(force_field))
    unknown = _unknown_residues(ff, topology)
    if unknown:
        raise SystemBuildError(
            f"unknown residue(s) {', '.join(unknown[:5])}: no template of that name in {', '.join(force_field)}; "
            "use standard PDB/CHARMM residue names (amino acids, HID/HIE/HIP/HSD/HSE/HSP, ACE/NME caps) "
            "or remove the residue")
    kwargs = dict(nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False, removeCMMotion=False)
    small = _restricted_forcefield(ff, topology)
    try:
        system = (small or ff).createSystem(topology, **kwargs)
    except Exception as e:  # OpenMM raises ValueError/Exception for unmatched or ambiguous residues
        missing = _missing_heavy_atoms(ff, topology)
        if missing:  # OpenMM compares with the unpatched template and reports "too many" atoms instead
            raise SystemBuildError(
                f"residue {missing[0]} is missing heavy atom(s) {', '.join(missing[1])}: boltzflow adds only "
                "hydrogens; complete the residue (e.g. pdbfixer's addMissingAtoms) or remove it") from e
        msg = " ".join(str(e).split())
        raise SystemBuildError(
            f"CHARMM36m cannot parametrise this molecule: {msg[:300]} "
            "(supported: standard amino acids incl. HSD/HSE/HSP, ACE/NME caps, zwitterionic termini, "
            "CHARMM residues such as BUTA; fix unsupported termini or remove unknown residues)") from e
    finish_system(system)
    return system


def finish_system(system) -> None:
    """Make a freshly built CHARMM System boltzflow's (in place): no CMMotionRemover, LJ types numbered
    reproducibly, unused CMAP maps removed (CHARMM36 defines ~24; OpenMM pays for all every step)."""
    for i in reversed(range(system.getNumForces())):
        if type(system.getForce(i)).__name__ == "CMMotionRemover":
            system.removeForce(i)
    canonical_lj_types(system)
    prune_unused_cmap_maps(system)


def canonical_lj_types(system) -> None:
    """Renumber the LJ atom types of CustomNonbondedForces with per-particle ``type`` and 2D
    tabulated ``acoef``/``bcoef`` (OpenMM's CHARMM NBFIX form) by first appearance in particle order.

    OpenMM numbers these types in set-iteration order, which changes between Python processes; this
    makes the serialized System (and so ``MolecularSystem.fingerprint``) reproducible. In place."""
    import openmm

    for f in system.getForces():
        if not isinstance(f, openmm.CustomNonbondedForce) or f.getNumPerParticleParameters() != 1:
            continue
        if f.getPerParticleParameterName(0) != "type":
            continue
        tables = {}
        for t in range(f.getNumTabulatedFunctions()):
            fn = f.getTabulatedFunction(t)
            if not isinstance(fn, openmm.Discrete2DFunction):
                break
            tables[t] = fn
        else:
            old = [int(round(f.getParticleParameters(i)[0])) for i in range(f.getNumParticles())]
            perm: dict[int, int] = {}
            for t in old:
                perm.setdefault(t, len(perm))
            for fn in tables.values():
                nx, ny, vals = fn.getFunctionParameters()
                if nx != ny or len(perm) > nx:
                    break
            else:
                n = next(iter(tables.values())).getFunctionParameters()[0] if tables else 0
                for t in range(n):  # types no particle uses keep a slot after the used ones
                    perm.setdefault(t, len(perm))
                for fn in tables.values():
                    nx, ny, vals = fn.getFunctionParameters()
                    new = [0.0] * (nx * ny)
                    for ox in range(nx):
                        for oy in range(ny):
                            new[perm[ox] + nx * perm[oy]] = vals[ox + nx * oy]
                    fn.setFunctionParameters(nx, ny, new)
                for i, t in enumerate(old):
                    f.setParticleParameters(i, [float(perm[t])])


def from_pdb(path: str | Path, solvent: str = "vacuum", temperature: float = 300.0, name: str | None = None,
             add_hydrogens: bool = True, force_field: tuple[str, ...] = FORCE_FIELD_FILES) -> MolecularSystem:
    """Build a CHARMM36m :class:`MolecularSystem` from a PDB file.

    path: PDB file (Amber-style ACE/NME caps, zwitterionic termini and HIS tautomer names allowed).
    solvent: "vacuum" or "obc2". temperature: K. name: defaults to the file stem.
    add_hydrogens: add missing hydrogens with OpenMM's Modeller (see module docstring for the
    resulting atom order). Positions are in nm, in the (possibly hydrogen-extended) file order.
    force_field: OpenMM force-field files (default CHARMM36m ``charmm36_2024.xml``; butane's BUTA
    residue template is only in the older ``charmm36.xml``)."""
    import openmm

    check_solvent_temperature(solvent, temperature)
    p = Path(path)
    pdb = read_pdb(p)
    topology, positions = pdb.topology, pdb.positions
    _reject_charmm_named_caps(topology, p)
    file_names = _file_residue_names(p)
    residues = list(topology.residues())
    if len(file_names) == len(residues):
        for res, fname in zip(residues, file_names):
            res._file_name = fname.upper()
            if fname.upper() in _HIS_VARIANT or res.name == "HSE":
                res.name = "HIS"  # Modeller's hydrogen definitions use HIS (+ variant)
    n_added = 0
    if add_hydrogens:
        try:
            added, top2, pos2, _ = _has_missing_hydrogens(topology, positions)
        except Exception as e:
            raise SystemBuildError(f"could not add hydrogens to '{p}': {' '.join(str(e).split())[:300]}; "
                                   "add them yourself (e.g. with pdbfixer) or pass add_hydrogens=False") from e
        if added:
            n_added = top2.getNumAtoms() - topology.getNumAtoms()
            topology, positions = top2, pos2
    topology, notes = convert_caps(topology)
    system = create_charmm_system(topology, solvent, tuple(force_field))
    pos = np.array(positions.value_in_unit(openmm.unit.nanometer) if hasattr(positions, "value_in_unit")
                   else positions, dtype=np.float64).reshape(-1, 3)
    heavy, hyd, parents = hydrogen_bookkeeping(topology)
    meta = {
        "builder": "pdb",
        "source": str(p.resolve()),
        "force_field": list(force_field) + list(SOLVENT_FILES[solvent]),
        "nonbonded": "NoCutoff",
        "hydrogens_added": n_added,
        "caps_converted": notes,
        "openmm_version": openmm.__version__,
    }
    return MolecularSystem(name=name or p.stem, topology=topology, system=system, positions=pos,
                           temperature=float(temperature), solvent=solvent, heavy_indices=heavy,
                           hydrogen_indices=hyd, hydrogen_parents=parents, modes=peptide_modes(topology),
                           metadata=meta)
