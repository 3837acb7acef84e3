"""PDB / PSF builders and shipped systems against real OpenMM."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

openmm = pytest.importorskip("openmm")
app = pytest.importorskip("openmm.app")

from boltzflow.errors import InputError, SystemBuildError  # noqa: E402
from boltzflow.systems import MolecularSystem  # noqa: E402
from boltzflow.systems.builtin import BUILTIN_SYSTEMS, builtin_dir, builtin_system  # noqa: E402
from boltzflow.systems.pdb import from_pdb  # noqa: E402
from boltzflow.systems.psf import from_psf  # noqa: E402

ADP_PDB = builtin_dir("alanine-dipeptide") / "alanine-dipeptide.pdb"


def energy_forces(system, x):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x)
    st = ctx.getState(getEnergy=True, getForces=True)
    return st.getPotentialEnergy()._value, st.getForces(asNumpy=True)._value


def perturbed(ms, n, seed, scale=0.01):
    rng = np.random.default_rng(seed)
    return ms.positions[None] + rng.normal(0.0, scale, (n, ms.n_atoms, 3))


@pytest.mark.parametrize("name", BUILTIN_SYSTEMS)
@pytest.mark.parametrize("solvent", ["vacuum", "obc2"])
def test_pdb_route_equals_psf_route(name, solvent):
    a = builtin_system(name, solvent=solvent, route="pdb")
    b = builtin_system(name, solvent=solvent, route="psf")
    # same atoms in the same order (OpenMM's PSF reader renames a few terminal atoms, e.g. HT1 -> H)
    assert [x.element for x in a.topology.atoms()] == [x.element for x in b.topology.atoms()]
    bonds = lambda t: {tuple(sorted((q[0].index, q[1].index))) for q in t.bonds()}  # noqa: E731
    assert bonds(a.topology) == bonds(b.topology)
    np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
    np.testing.assert_array_equal(a.hydrogen_parents, b.hydrogen_parents)
    for x in perturbed(a, 10, seed=1):
        ea, fa = energy_forces(a.system, x)
        eb, fb = energy_forces(b.system, x)
        assert abs(ea - eb) <= 1e-6 * abs(ea)
        np.testing.assert_allclose(fa, fb, rtol=1e-6, atol=1e-6 * np.abs(fa).max())


def test_shipped_systems_metadata_and_modes():
    adp = builtin_system("alanine-dipeptide")
    assert adp.n_atoms == 22 and len(adp.heavy_indices) == 10 and len(adp.hydrogen_indices) == 12
    names = adp.atom_names()
    assert [names[i] for i in adp.modes.atoms] == ["CY", "N", "CA", "C"]
    assert adp.modes.minor == "phi_positive"
    # the minimised reference is in the major (phi < 0) basin; a phi > 0 frame is labelled minor
    assert adp.modes.assign(adp.positions[None])[0] == adp.modes.names.index("phi_negative")
    assert not any(type(f).__name__ == "CMMotionRemover" for f in adp.system.getForces())
    assert adp.metadata["builtin"] == "alanine-dipeptide" and "charmm36_2024.xml" in adp.metadata["force_field"]
    but = builtin_system("butane")
    assert but.n_atoms == 14 and len(but.heavy_indices) == 4
    assert but.modes.fractions(but.positions[None])["trans"] == 1.0
    # impropers present only where CHARMM defines them: alanine dipeptide has the peptide impropers
    assert any(type(f).__name__ == "CustomTorsionForce" and f.getNumTorsions() >= 2 for f in adp.system.getForces())


def test_builtin_dir_env_override(tmp_path, monkeypatch):
    shutil.copytree(builtin_dir("butane"), tmp_path / "butane")
    monkeypatch.setenv("BOLTZFLOW_SYSTEMS", str(tmp_path))
    assert builtin_dir("butane") == tmp_path / "butane"
    assert builtin_system("butane", route="psf").metadata["source"].startswith(str(tmp_path.resolve()))
    with pytest.raises(InputError):
        builtin_dir("alanine-dipeptide")  # not in the override directory
    with pytest.raises(InputError):
        builtin_system("water")


def test_save_load_roundtrip_keeps_bonds_names_energy(tmp_path):
    ms = builtin_system("alanine-dipeptide", solvent="obc2", temperature=310.0)
    ms.save(tmp_path / "adp")
    back = MolecularSystem.load(tmp_path / "adp")
    bonds = lambda t: {tuple(sorted((b[0].index, b[1].index))) for b in t.bonds()}  # noqa: E731
    assert bonds(back.topology) == bonds(ms.topology) and len(bonds(ms.topology)) == 21
    assert back.atom_names() == ms.atom_names()
    assert back.fingerprint() == ms.fingerprint()
    assert back.temperature == 310.0 and back.modes == ms.modes
    x = perturbed(ms, 1, seed=3)[0]
    assert energy_forces(back.system, x)[0] == pytest.approx(energy_forces(ms.system, x)[0], rel=1e-12)


def _write(top, pos, path):
    with open(path, "w") as fh:
        app.PDBFile.writeFile(top, pos, fh)
    return path


def _strip_h(path, out):
    pdb = app.PDBFile(str(path))
    m = app.Modeller(pdb.topology, pdb.positions)
    m.delete([a for a in m.topology.atoms() if a.element.symbol == "H"])
    return _write(m.topology, m.positions, out)


def test_missing_hydrogens_are_added_after_their_parent(tmp_path):
    src = _strip_h(ADP_PDB, tmp_path / "noh.pdb")
    ms = from_pdb(src)
    ref = builtin_system("alanine-dipeptide")
    assert ms.metadata["hydrogens_added"] == 12 and ms.n_atoms == 22
    heavy = [ms.atom_names()[i] for i in ms.heavy_indices]
    assert heavy == [ref.atom_names()[i] for i in ref.heavy_indices]  # heavy atoms keep file order
    for h, p in zip(ms.hydrogen_indices, ms.hydrogen_parents):
        assert h > p  # rule: hydrogens follow the heavy atom they are bonded to
    e, f = energy_forces(ms.system, ms.positions)
    assert np.isfinite(e) and np.all(np.isfinite(f))


def _mutated_dipeptide(tmp_path, resname):
    from pdbfixer import PDBFixer

    fixer = PDBFixer(filename=str(ADP_PDB))
    fixer.applyMutations([f"ALA-2-{resname}"], "A")
    fixer.findMissingResidues()
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    m = app.Modeller(fixer.topology, fixer.positions)
    m.delete([a for a in m.topology.atoms() if a.element.symbol == "H"])
    return m


def test_capped_leucine_dipeptide_loads_and_evaluates(tmp_path):
    m = _mutated_dipeptide(tmp_path, "LEU")
    ms = from_pdb(_write(m.topology, m.positions, tmp_path / "ace-leu-nme.pdb"))
    assert len(ms.heavy_indices) == 13 and ms.n_atoms == 31
    assert any("ACE" in n for n in ms.metadata["caps_converted"])
    impropers = sum(f.getNumTorsions() for f in ms.system.getForces() if type(f).__name__ == "CustomTorsionForce")
    assert impropers >= 2  # peptide-bond impropers of the CHARMM residue were applied
    nb = next(f for f in ms.system.getForces() if type(f).__name__ == "NonbondedForce")
    assert sum(nb.getParticleParameters(i)[0]._value for i in range(ms.n_atoms)) == pytest.approx(0.0, abs=1e-9)
    e, f = energy_forces(ms.system, ms.positions)
    assert np.isfinite(e) and np.all(np.isfinite(f))


@pytest.mark.parametrize("variant,expect", [("HID", {"HD1"}), ("HIE", {"HE2"}), ("HIP", {"HD1", "HE2"}),
                                            ("HSE", {"HE2"})])
def test_histidine_tautomers(tmp_path, variant, expect):
    m = _mutated_dipeptide(tmp_path, "HIS")
    for r in m.topology.residues():
        if r.name == "HIS":
            r.name = variant
    ms = from_pdb(_write(m.topology, m.positions, tmp_path / f"{variant}.pdb"))
    ring_h = {a.name for a in ms.topology.atoms() if a.name in ("HD1", "HE2")}
    assert ring_h == expect
    nb = next(f for f in ms.system.getForces() if type(f).__name__ == "NonbondedForce")
    q = sum(nb.getParticleParameters(i)[0]._value for i in range(ms.n_atoms))
    assert q == pytest.approx(1.0 if variant == "HIP" else 0.0, abs=1e-9)


def test_zwitterionic_peptide(tmp_path):
    from pdbfixer import PDBFixer

    pdb = app.PDBFile(str(ADP_PDB))
    m = app.Modeller(pdb.topology, pdb.positions)
    m.delete([r for r in m.topology.residues() if r.name in ("ACE", "NME")])
    buf = io.StringIO()
    app.PDBFile.writeFile(m.topology, m.positions, buf)
    fixer = PDBFixer(pdbfile=io.StringIO(buf.getvalue()))
    fixer.findMissingResidues()
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()  # adds the terminal OXT
    ms = from_pdb(_write(fixer.topology, fixer.positions, tmp_path / "ala-zwitterion.pdb"))
    names = ms.atom_names()
    assert "OXT" in names and sum(n in ("H", "H2", "H3", "HT1", "HT2", "HT3") for n in names) == 3  # NH3+
    nb = next(f for f in ms.system.getForces() if type(f).__name__ == "NonbondedForce")
    charges = [nb.getParticleParameters(i)[0]._value for i in range(ms.n_atoms)]
    assert sum(charges) == pytest.approx(0.0, abs=1e-9)
    assert charges[names.index("N")] == pytest.approx(-0.3)  # CHARMM NTER nitrogen
    assert np.isfinite(energy_forces(ms.system, ms.positions)[0])


def test_pdb_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        from_pdb(tmp_path / "missing.pdb")
    bad = tmp_path / "bad.pdb"
    bad.write_text("this is not a PDB file\n")
    with pytest.raises(InputError):
        from_pdb(bad)
    text = ADP_PDB.read_text().replace(" ALA A", " XYZ A")
    (tmp_path / "xyz.pdb").write_text(text)
    with pytest.raises(SystemBuildError, match="XYZ"):
        from_pdb(tmp_path / "xyz.pdb")
    # C-terminus without a cap and without OXT: unsupported terminus
    pdb = app.PDBFile(str(ADP_PDB))
    m = app.Modeller(pdb.topology, pdb.positions)
    m.delete([r for r in m.topology.residues() if r.name == "NME"])
    with pytest.raises(SystemBuildError, match="terminated|template|parametrise"):
        from_pdb(_write(m.topology, m.positions, tmp_path / "open-end.pdb"), add_hydrogens=False)
    with pytest.raises(InputError):
        from_pdb(ADP_PDB, solvent="water")
    with pytest.raises(InputError):
        from_pdb(ADP_PDB, temperature=-5)


def test_psf_route_reads_charmm_crd(tmp_path):
    d = builtin_dir("butane")
    ref = builtin_system("butane", route="psf")
    lines = ["* butane coordinates (test)", "*", f"{ref.n_atoms:10d}  EXT"]
    for a in ref.topology.atoms():
        x, y, z = ref.positions[a.index] * 10.0  # CRD is in Angstrom
        lines.append(f"{a.index + 1:10d}{1:10d}  {'BUTA':<8s}  {a.name:<8s}{x:20.10f}{y:20.10f}{z:20.10f}  "
                     f"{'BUT':<8s}  {'1':<8s}{0.0:20.10f}")
    (tmp_path / "butane.crd").write_text("\n".join(lines) + "\n")
    ms = from_psf(d / "butane.psf", [d / "butane.rtf", d / "butane.prm"], tmp_path / "butane.crd", solvent="obc2")
    np.testing.assert_allclose(ms.positions, ref.positions, atol=1e-9)
    assert ms.metadata["coordinates"].endswith("butane.crd")
    with pytest.raises(InputError):
        from_psf(d / "butane.psf", [d / "butane.prm"], tmp_path / "butane.xyz")


def test_psf_errors(tmp_path):
    d = builtin_dir("butane")
    psf, prm, rtf, pdb = (d / f"butane.{s}" for s in ("psf", "prm", "rtf", "pdb"))
    with pytest.raises(InputError, match="not found"):
        from_psf(psf, [tmp_path / "missing.prm"], pdb)
    garbage = tmp_path / "garbage.prm"
    garbage.write_text("BONDS\nCG331 CG321 not-a-number 1.5\nEND\n")
    with pytest.raises(InputError):
        from_psf(psf, [rtf, garbage], pdb)
    incomplete = tmp_path / "incomplete.prm"
    incomplete.write_text(prm.read_text().split("ANGLES")[0] + "END\n")
    with pytest.raises(InputError):
        from_psf(psf, [rtf, incomplete], pdb)
    with pytest.raises(InputError, match="atoms"):
        from_psf(psf, [rtf, prm], ADP_PDB)  # 22-atom coordinates for a 14-atom PSF
    with pytest.raises(InputError):
        from_psf(tmp_path / "none.psf", [rtf, prm], pdb)


@pytest.mark.slow
@pytest.mark.parametrize("solvent", ["vacuum", "obc2"])
def test_fast_template_matching_equals_full_forcefield(tmp_path, solvent):
    """The restricted-template / shared-XML shortcuts give the same System as a fresh full ForceField."""
    from boltzflow.systems.pdb import SOLVENT_FILES

    m = _mutated_dipeptide(tmp_path, "HIS")
    for r in m.topology.residues():
        if r.name == "HIS":
            r.name = "HIP"
    for path in (ADP_PDB, _write(m.topology, m.positions, tmp_path / "hip.pdb")):
        ms = from_pdb(path, solvent=solvent)
        full = app.ForceField("charmm36_2024.xml", *SOLVENT_FILES[solvent]).createSystem(
            ms.topology, nonbondedMethod=app.NoCutoff, constraints=None)
        for x in perturbed(ms, 5, seed=7):
            e1, f1 = energy_forces(ms.system, x)
            e2, f2 = energy_forces(full, x)
            assert abs(e1 - e2) <= 1e-9 * abs(e2)
            np.testing.assert_allclose(f1, f2, rtol=1e-9, atol=1e-9)
