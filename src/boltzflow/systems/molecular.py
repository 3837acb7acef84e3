"""MolecularSystem: an immutable OpenMM System plus the bookkeeping boltzflow needs.

Coordinates are ``(n_atoms, 3)`` / ``(batch, n_atoms, 3)`` in nm, in the atom order of the
user's input file (the order of ``topology``). Builders live in :mod:`boltzflow.systems.pdb`,
:mod:`boltzflow.systems.psf` and :mod:`boltzflow.systems.builtin`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.protocols import ModeSet
from ..errors import InputError
from ..io import atomic_write_json, atomic_write_text
from ..units import check_temperature, kt_kj_per_mol
from .modes import modes_from_dict

SOLVENTS = ("vacuum", "obc2")


@dataclass(frozen=True, eq=False)
class MolecularSystem:
    """An OpenMM System with reference coordinates and heavy-atom / hydrogen bookkeeping.

    Attributes:
        name: short name (e.g. ``"alanine-dipeptide"``).
        topology: ``openmm.app.Topology`` in input atom order.
        system: ``openmm.System`` (no CMMotionRemover, no constraints, NoCutoff).
        positions: ``(n_atoms, 3)`` float64 reference coordinates in nm.
        temperature: K.
        solvent: ``"vacuum"`` or ``"obc2"``.
        heavy_indices: ``(n_heavy,)`` int64, atoms that are not hydrogen, ascending.
        hydrogen_indices: ``(n_h,)`` int64, hydrogens, ascending.
        hydrogen_parents: ``(n_h,)`` int64, the heavy atom each hydrogen is bonded to.
        modes: optional mode definition (see :mod:`boltzflow.systems.modes`).
        metadata: free-form provenance (source files, force field, builder).
    """

    name: str
    topology: Any
    system: Any
    positions: np.ndarray
    temperature: float
    solvent: str
    heavy_indices: np.ndarray
    hydrogen_indices: np.ndarray
    hydrogen_parents: np.ndarray
    modes: ModeSet | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.solvent not in SOLVENTS:
            raise InputError(f"solvent must be one of {SOLVENTS}, got {self.solvent!r}")
        object.__setattr__(self, "temperature", check_temperature(self.temperature, "the system's temperature",
                                                                   warn=False))
        n = self.system.getNumParticles()
        if self.topology.getNumAtoms() != n:
            raise InputError(f"topology has {self.topology.getNumAtoms()} atoms but the System has {n} particles")
        pos = np.asarray(self.positions, dtype=np.float64)
        if pos.shape != (n, 3):
            raise InputError(f"positions must have shape ({n}, 3) in nm, got {pos.shape}")
        pos.setflags(write=False)
        object.__setattr__(self, "positions", pos)
        for name in ("heavy_indices", "hydrogen_indices", "hydrogen_parents"):
            arr = np.asarray(getattr(self, name), dtype=np.int64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return self.system.getNumParticles()

    @property
    def kT(self) -> float:
        """kT in kJ/mol."""
        return kt_kj_per_mol(self.temperature)

    @property
    def beta(self) -> float:
        """1/kT in mol/kJ."""
        return 1.0 / self.kT

    @property
    def masses(self) -> np.ndarray:
        """(n_atoms,) in dalton."""
        return np.array([self.system.getParticleMass(i)._value for i in range(self.n_atoms)])

    def atom_names(self) -> list[str]:
        return [a.name for a in self.topology.atoms()]

    def fingerprint(self) -> str:
        """sha256 over the serialized System, atom names and temperature: identifies the target."""
        import openmm

        h = hashlib.sha256()
        h.update(openmm.XmlSerializer.serialize(self.system).encode())
        h.update(",".join(f"{a.residue.name}:{a.name}" for a in self.topology.atoms()).encode())
        h.update(f"{self.temperature:.6f}".encode())
        return h.hexdigest()[:16]

    def check_coordinates(self, x: np.ndarray, what: str = "coordinates") -> np.ndarray:
        """Validate ``x: (batch, n_atoms, 3)`` or ``(n_atoms, 3)`` nm; returns a (batch, n, 3) array."""
        x = np.asarray(x)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise InputError(
                f"{what} must have shape (n_frames, {self.n_atoms}, 3) in nm for {self.name}, got {tuple(x.shape)}"
            )
        return x

    def with_temperature(self, temperature: float) -> "MolecularSystem":
        """Same System at another temperature (reduced energies change, the System does not)."""
        from dataclasses import replace

        return replace(self, temperature=float(temperature))

    # ---- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``system.xml``, ``topology.pdb`` and ``metadata.json`` into ``directory``."""
        import io

        import openmm
        import openmm.app as app

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "system.xml", openmm.XmlSerializer.serialize(self.system))
        buf = io.StringIO()
        app.PDBFile.writeFile(self.topology, self.positions * 10.0, buf, keepIds=True)
        atomic_write_text(d / "topology.pdb", buf.getvalue())
        meta = {
            "format": "boltzflow-system/1",
            "name": self.name,
            "temperature_k": self.temperature,
            "solvent": self.solvent,
            "n_atoms": self.n_atoms,
            "heavy_indices": self.heavy_indices.tolist(),
            "hydrogen_indices": self.hydrogen_indices.tolist(),
            "hydrogen_parents": self.hydrogen_parents.tolist(),
            "modes": self.modes.to_dict() if self.modes is not None else None,
            # exact bonds and atom names: reading topology.pdb back infers bonds from residue
            # templates (CONECT only for non-standard residues) and renames some atoms (CHARMM caps)
            "bonds": sorted([sorted((b[0].index, b[1].index)) for b in self.topology.bonds()]),
            "atom_names": [a.name for a in self.topology.atoms()],
            # the whole topology, so that loading never depends on PDB parsing (which drops atoms
            # whose names collide after its name normalisation, e.g. CHARMM CT3 HT1 -> H)
            "topology": _topology_table(self.topology),
            "positions_nm": self.positions.tolist(),
            "fingerprint": self.fingerprint(),
            "metadata": self.metadata,
        }
        atomic_write_json(d / "metadata.json", meta)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "MolecularSystem":
        """Read a directory written by :meth:`save` (or ``boltzflow prepare``)."""
        import openmm
        import openmm.app as app

        d = Path(directory)
        for f in ("system.xml", "topology.pdb", "metadata.json"):
            if not (d / f).is_file():
                raise InputError(f"'{d}' is not a boltzflow system directory (missing {f}); create one with `boltzflow prepare`")
        meta = json.loads((d / "metadata.json").read_text())
        system = openmm.XmlSerializer.deserialize((d / "system.xml").read_text())
        if meta.get("topology") is not None and meta.get("positions_nm") is not None:
            topology = _topology_from_table(meta["topology"], meta["bonds"])
            pos = np.array(meta["positions_nm"], dtype=np.float64)
        else:  # directories written before the topology table existed
            pdb = app.PDBFile(str(d / "topology.pdb"))
            pos = np.array(pdb.getPositions(asNumpy=True)._value, dtype=np.float64)
            topology = pdb.topology
            if meta.get("bonds") is not None:  # exact bonds / names as saved (see save)
                topology = _with_bonds(topology, meta["bonds"], meta.get("atom_names"))
        return cls(
            name=meta["name"],
            topology=topology,
            system=system,
            positions=pos,
            temperature=float(meta["temperature_k"]),
            solvent=meta["solvent"],
            heavy_indices=np.array(meta["heavy_indices"]),
            hydrogen_indices=np.array(meta["hydrogen_indices"]),
            hydrogen_parents=np.array(meta["hydrogen_parents"]),
            modes=modes_from_dict(meta.get("modes")),
            metadata=meta.get("metadata", {}),
        )


def _topology_table(topology) -> dict:
    """JSON-able description of chains, residues and atoms (bonds are stored separately)."""
    chains = [c.id for c in topology.chains()]
    residues = [[r.name, r.id, r.chain.index, r.insertionCode] for r in topology.residues()]
    atoms = [[a.name, a.element.symbol if a.element is not None else None, a.residue.index, a.id]
             for a in topology.atoms()]
    return {"chains": chains, "residues": residues, "atoms": atoms}


def _topology_from_table(table: dict, bonds) -> "object":
    import openmm.app as app

    top = app.Topology()
    chains = [top.addChain(cid) for cid in table["chains"]]
    residues = [top.addResidue(name, chains[ci], rid, ins) for name, rid, ci, ins in table["residues"]]
    atoms = [top.addAtom(name, app.Element.getBySymbol(el) if el else None, residues[ri], aid)
             for name, el, ri, aid in table["atoms"]]
    for i, j in bonds:
        top.addBond(atoms[i], atoms[j])
    return top


def _with_bonds(topology, bonds, atom_names=None):
    """Copy of ``topology`` with exactly ``bonds`` ([[i, j], ...]) and optionally the given atom names."""
    import openmm.app as app

    new = app.Topology()
    new.setPeriodicBoxVectors(topology.getPeriodicBoxVectors())
    atoms = []
    for chain in topology.chains():
        c = new.addChain(chain.id)
        for res in chain.residues():
            r = new.addResidue(res.name, c, res.id, res.insertionCode)
            for a in res.atoms():
                name = atom_names[a.index] if atom_names is not None else a.name
                atoms.append(new.addAtom(name, a.element, r, a.id))
    for i, j in bonds:
        new.addBond(atoms[i], atoms[j])
    return new


def hydrogen_bookkeeping(topology) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(heavy_indices, hydrogen_indices, hydrogen_parents) from a Topology's elements and bonds.

    Raises InputError when a hydrogen has no bond to a heavy atom."""
    import openmm.app as app

    atoms = list(topology.atoms())
    is_h = np.array([a.element is not None and a.element == app.element.hydrogen for a in atoms])
    parent = {}
    for b in topology.bonds():
        a1, a2 = b[0], b[1]
        if is_h[a1.index] and not is_h[a2.index]:
            parent[a1.index] = a2.index
        elif is_h[a2.index] and not is_h[a1.index]:
            parent[a2.index] = a1.index
    heavy = np.flatnonzero(~is_h)
    hyd = np.flatnonzero(is_h)
    missing = [atoms[i].name for i in hyd if i not in parent]
    if missing:
        raise InputError(f"hydrogen(s) {missing} are not bonded to a heavy atom; check CONECT records / residue templates")
    return heavy, hyd, np.array([parent[i] for i in hyd], dtype=np.int64)


def prune_unused_cmap_maps(sysobj) -> int:
    """Rebuild CMAPTorsionForces of ``sysobj`` (an openmm.System, modified in place) with only the maps
    their torsions use; energies are unchanged. Returns the number of maps removed.

    CHARMM36 force fields define ~24 CMAP maps; OpenMM evaluates the cost of all of them at every step,
    which made one 22-atom alanine-dipeptide step ~4x slower than with the one map it uses."""
    import openmm

    removed = 0
    for k in reversed(range(sysobj.getNumForces())):  # removals only shift forces already visited
        f = sysobj.getForce(k)
        if not isinstance(f, openmm.CMAPTorsionForce):
            continue
        used = sorted({f.getTorsionParameters(i)[0] for i in range(f.getNumTorsions())})
        if len(used) == f.getNumMaps():
            continue
        g = openmm.CMAPTorsionForce()
        remap = {}
        for m in used:
            size, energy = f.getMapParameters(m)
            remap[m] = g.addMap(size, energy)
        for i in range(f.getNumTorsions()):
            p = f.getTorsionParameters(i)
            g.addTorsion(remap[p[0]], *p[1:])
        g.setForceGroup(f.getForceGroup())
        g.setUsesPeriodicBoundaryConditions(f.usesPeriodicBoundaryConditions())
        removed += f.getNumMaps() - len(used)
        sysobj.removeForce(k)
        sysobj.addForce(g)
    return removed
