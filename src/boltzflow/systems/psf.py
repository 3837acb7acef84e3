"""CHARMM systems from a PSF + CHARMM parameter files (.prm/.par, .rtf/.top, .str) + coordinates.

Uses OpenMM's ``CharmmPsfFile`` and ``CharmmParameterSet``; coordinates come from a PDB or a CHARMM
CRD file in PSF atom order. Vacuum = NoCutoff; OBC2 = ``implicitSolvent=app.OBC2`` with the ACE
surface-area term (as OpenMM's ``implicit/obc2.xml``), so the PSF and PDB routes agree.
No constraints, no CMMotionRemover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError, SystemBuildError
from .modes import peptide_modes
from .molecular import MolecularSystem, hydrogen_bookkeeping
from .pdb import check_solvent_temperature, finish_system, read_pdb

PARAM_SUFFIXES = (".prm", ".par", ".rtf", ".top", ".str", ".inp")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (msg[:300] if msg else type(e).__name__)


def read_coordinates(path: str | Path, n_atoms: int) -> np.ndarray:
    """(n_atoms, 3) nm from a PDB or CHARMM CRD/COR file; InputError on a missing/bad file or count."""
    import openmm.app as app

    p = Path(path)
    if not p.is_file():
        raise InputError(f"coordinate file '{p}' not found; give a .pdb or .crd file in PSF atom order")
    suffix = p.suffix.lower()
    if suffix == ".pdb":
        pos = np.array(read_pdb(p).getPositions(asNumpy=True)._value, dtype=np.float64)
    elif suffix in (".crd", ".cor"):
        try:
            crd = app.CharmmCrdFile(str(p))
        except Exception as e:
            raise InputError(f"could not read CHARMM CRD file '{p}': {_one_line(e)}") from e
        import openmm.unit as unit

        pos = np.array(crd.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    else:
        raise InputError(f"coordinate file '{p}' must be .pdb or .crd (CHARMM), got '{suffix}'")
    pos = pos.reshape(-1, 3)
    if pos.shape[0] != n_atoms:
        raise InputError(f"coordinate file '{p}' has {pos.shape[0]} atoms but the PSF has {n_atoms}; "
                         "use coordinates of the same molecule in PSF atom order")
    if not np.all(np.isfinite(pos)):
        raise InputError(f"coordinate file '{p}' has non-finite coordinates")
    return pos


def load_parameters(param_paths: Sequence[str | Path]):
    """``openmm.app.CharmmParameterSet`` from files; InputError if a file is missing or malformed."""
    import openmm.app as app

    paths = [Path(p) for p in param_paths]
    if not paths:
        raise InputError("a PSF needs CHARMM parameter files; pass them with --params FILE.prm [FILE.rtf ...]")
    for p in paths:
        if not p.is_file():
            raise InputError(f"CHARMM parameter file '{p}' not found")
        if p.suffix.lower() not in PARAM_SUFFIXES:
            raise InputError(f"'{p}' is not a CHARMM parameter file; expected one of {', '.join(PARAM_SUFFIXES)}")
    try:
        return app.CharmmParameterSet(*map(str, paths))
    except Exception as e:
        raise InputError(f"could not read CHARMM parameter files ({', '.join(map(str, paths))}): {_one_line(e)}; "
                         "check the file format") from e


def from_psf(psf_path: str | Path, param_paths: Sequence[str | Path], coords_path: str | Path,
             solvent: str = "vacuum", temperature: float = 300.0, name: str | None = None) -> MolecularSystem:
    """Build a :class:`MolecularSystem` from a PSF, CHARMM parameter files and PDB/CRD coordinates.

    psf_path: CHARMM PSF. param_paths: .prm/.par (+ .rtf/.top/.str) files. coords_path: PDB or CRD
    with the PSF's atoms in PSF order (nm positions result). solvent: "vacuum" | "obc2".
    temperature: K. name: defaults to the PSF stem. Atom order = PSF order."""
    import openmm
    import openmm.app as app

    check_solvent_temperature(solvent, temperature)
    p = Path(psf_path)
    if not p.is_file():
        raise InputError(f"PSF file '{p}' not found")
    try:
        psf = app.CharmmPsfFile(str(p))
    except Exception as e:
        raise InputError(f"could not read PSF file '{p}': {_one_line(e)}; check that it is a CHARMM PSF") from e
    params = load_parameters(param_paths)
    pos = read_coordinates(coords_path, psf.topology.getNumAtoms())
    kwargs = dict(implicitSolvent=app.OBC2, sasaMethod="ACE") if solvent == "obc2" else {}
    try:
        system = psf.createSystem(params, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False,
                                  removeCMMotion=False, **kwargs)
    except Exception as e:
        raise SystemBuildError(f"could not build a System from '{p}' with the given parameters: {_one_line(e)}; "
                               "check that the parameter files cover every atom type of the PSF") from e
    finish_system(system)
    topology = psf.topology
    heavy, hyd, parents = hydrogen_bookkeeping(topology)
    meta = {
        "builder": "psf",
        "source": str(p.resolve()),
        "parameters": [str(Path(q).resolve()) for q in param_paths],
        "coordinates": str(Path(coords_path).resolve()),
        "force_field": "CHARMM (PSF + parameter files)" + (" + OBC2 (ACE surface area)" if solvent == "obc2" else ""),
        "nonbonded": "NoCutoff",
        "openmm_version": openmm.__version__,
    }
    return MolecularSystem(name=name or p.stem, topology=topology, system=system, positions=pos,
                           temperature=float(temperature), solvent=solvent, heavy_indices=heavy,
                           hydrogen_indices=hyd, hydrogen_parents=parents, modes=peptide_modes(topology),
                           metadata=meta)
