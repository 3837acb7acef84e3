"""``boltzflow prepare``: turn a PDB, a PSF (+ parameter files) or a built-in name into a system directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_overwrite, add_verb, check_temperature, print_json

EXAMPLE = """\
  boltzflow prepare alanine-dipeptide -o systems-prepared/adp                 # shipped system
  boltzflow prepare my_peptide.pdb --solvent obc2 --temperature 310 -o my_peptide   # CHARMM36m
  boltzflow prepare mol.psf --params mol.prm mol.rtf --coords mol.crd -o mol  # PSF route
  boltzflow prepare --sequence ACE-ALA-ALA-ALA-NME -o ala4                     # peptide from a sequence
  boltzflow prepare --sequence GYDPETGTWG --solvent obc2 -o chignolin          # one-letter, zwitterionic

Writes SYSTEM_DIR/system.xml (serialized OpenMM System), topology.pdb (atom order of every later
command) and metadata.json. PDBs may use Amber-style ACE/NME caps, zwitterionic termini and
HID/HIE/HIP/HSD/HSE/HSP; missing hydrogens are added (see topology.pdb for the resulting order).
--sequence builds the 3D structure (PeptideBuilder + pdbfixer, extended, minimised): three-letter names
joined by '-' with optional ACE first / NME last, or one-letter codes (uncapped ends are zwitterionic).
Peptides get backbone states as modes (per residue alpha_R / beta_PPII / alpha_L; whole molecule
helix / extended / mixed / any_alpha_L), used by estimate, compare and report.
"""


def register(sub) -> None:
    p = add_verb(sub, "prepare", "build a CHARMM36m system directory from a PDB, a PSF or a built-in name",
                 EXAMPLE, run)
    p.add_argument("input", metavar="INPUT", nargs="?", default=None,
                   help="a .pdb file, a .psf file, or a built-in name (alanine-dipeptide, butane, ...); "
                        "omit with --sequence")
    p.add_argument("--sequence", default=None, metavar="SEQ",
                   help="build a peptide instead: ACE-ALA-ALA-ALA-NME (three-letter, optional caps) or AAAA (one-letter)")
    p.add_argument("--params", nargs="+", default=None, metavar="FILE",
                   help="CHARMM parameter/topology files (.prm .rtf .str) for a PSF")
    p.add_argument("--coords", default=None, metavar="PDB|CRD", help="coordinates for a PSF (PDB or CHARMM CRD)")
    p.add_argument("--solvent", choices=("vacuum", "obc2"), default="vacuum", help="vacuum (default) or OBC2 implicit solvent")
    p.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    p.add_argument("--name", default=None, help="system name (default: input file stem)")
    p.add_argument("--no-hydrogens", action="store_true", help="do not add missing hydrogens (PDB input)")
    p.add_argument("--force-field", nargs="+", default=None, metavar="XML",
                   help="OpenMM force-field files for PDB input (default charmm36_2024.xml; "
                        "charmm36.xml has extra CHARMM/CGenFF residues such as BUTA)")
    p.add_argument("-o", "--output", required=True, metavar="SYSTEM_DIR", help="directory to write")
    add_overwrite(p, "SYSTEM_DIR")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def build_system(args: argparse.Namespace):
    """The MolecularSystem described by the prepare arguments."""
    from ..errors import InputError
    from ..systems.builtin import BUILTIN_SYSTEMS, builtin_system

    if getattr(args, "sequence", None) is not None or args.input is None:
        return _from_sequence(args)
    src = Path(args.input)
    suffix = src.suffix.lower()
    if args.input in BUILTIN_SYSTEMS and not src.exists():
        if args.params or args.coords or args.force_field:
            raise InputError("--params/--coords/--force-field are not used with a built-in system")
        return builtin_system(args.input, solvent=args.solvent, temperature=args.temperature)
    if suffix == ".pdb":
        from ..systems.pdb import from_pdb

        if args.params or args.coords:
            raise InputError("--params/--coords are for PSF input; a PDB carries its own coordinates")
        kwargs = {"force_field": tuple(args.force_field)} if args.force_field else {}
        return from_pdb(src, solvent=args.solvent, temperature=args.temperature, name=args.name,
                        add_hydrogens=not args.no_hydrogens, **kwargs)
    if suffix == ".psf":
        from ..systems.psf import from_psf

        if not args.params:
            raise InputError("a PSF needs CHARMM parameter files: add --params FILE.prm [FILE.rtf ...]")
        if not args.coords:
            raise InputError("a PSF needs coordinates: add --coords FILE.pdb or FILE.crd (PSF atom order)")
        return from_psf(src, args.params, args.coords, solvent=args.solvent, temperature=args.temperature,
                        name=args.name)
    if not src.exists():
        raise InputError(f"'{args.input}' is not a file or a built-in system ({', '.join(BUILTIN_SYSTEMS)})")
    raise InputError(f"cannot prepare '{src}': expected a .pdb or .psf file or a built-in name")


def _from_sequence(args: argparse.Namespace):
    """The peptide of --sequence (InputError when INPUT is also given, or neither is)."""
    from ..errors import InputError
    from ..systems.sequence import from_sequence

    if args.sequence is None:
        raise InputError("give INPUT (a .pdb/.psf file or a built-in name) or --sequence SEQ")
    if args.input is not None:
        raise InputError(f"give either INPUT ('{args.input}') or --sequence, not both")
    if args.params or args.coords or args.no_hydrogens:
        raise InputError("--params/--coords/--no-hydrogens are not used with --sequence")
    kwargs = {"force_field": tuple(args.force_field)} if args.force_field else {}
    return from_sequence(args.sequence, solvent=args.solvent, temperature=args.temperature, name=args.name,
                         **kwargs)


def run(args: argparse.Namespace) -> int:
    from ..io import check_output_dir

    out = check_output_dir(args.output, "system", args.overwrite)
    check_temperature(args.temperature, "--temperature")
    system = build_system(args)
    system.save(out)
    summary = {
        "system_dir": str(out),
        "name": system.name,
        "n_atoms": system.n_atoms,
        "n_heavy": int(len(system.heavy_indices)),
        "solvent": system.solvent,
        "temperature_k": system.temperature,
        "forces": [type(f).__name__ for f in system.system.getForces()],
        "fingerprint": system.fingerprint(),
    }
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {out}: {system.name}, {system.n_atoms} atoms ({summary['n_heavy']} heavy), "
              f"{system.solvent}, {system.temperature:g} K")
    return 0
