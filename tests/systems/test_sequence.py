"""Peptides from a sequence, the shipped tetra-/hexapeptide, and automatic backbone modes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("openmm")
pytest.importorskip("PeptideBuilder")

from boltzflow.cli import main  # noqa: E402
from boltzflow.errors import InputError  # noqa: E402
from boltzflow.estimators.regions import parse_region  # noqa: E402
from boltzflow.systems import MolecularSystem  # noqa: E402
from boltzflow.systems.builtin import builtin_system  # noqa: E402
from boltzflow.systems.modes import BACKBONE_STATES, PeptideModes, backbone_states, modes_from_dict  # noqa: E402
from boltzflow.systems.sequence import from_sequence, parse_sequence  # noqa: E402

TETRA = "ACE-ALA-ALA-ALA-NME"
HEXA = "ACE-ALA-ALA-ALA-ALA-ALA-NME"


@pytest.fixture(scope="module")
def tetra():
    return from_sequence(TETRA)


def _order(ms):
    return [(a.residue.name, a.name, a.element.symbol) for a in ms.topology.atoms()]


def _openmm_energy(ms, pos_nm):
    import openmm

    ctx = openmm.Context(ms.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos_nm)
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq, residues, caps", [
    ("ACE-ALA-ALA-ALA-NME", ("ALA",) * 3, ("ACE", "NME")),
    ("ace ala gly nma", ("ALA", "GLY"), ("ACE", "NME")),
    ("GYDPETGTWG", ("GLY", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "GLY"), (None, None)),
    ("ALA-ALA", ("ALA", "ALA"), (None, None)),
    ("ALA", ("ALA", "LEU", "ALA"), (None, None)),  # no separator: one-letter codes
])
def test_parse_sequence(seq, residues, caps):
    p = parse_sequence(seq)
    assert p.residues == residues and (p.n_cap, p.c_cap) == caps


@pytest.mark.parametrize("seq, words", [
    ("", "empty"), ("   ", "empty"), ("ACE-ALA-NME-ALA", "middle"), ("ALA-ACE-ALA", "middle"),
    ("ACE-XYZ-NME", "unknown residue 'XYZ'"), ("AXA", "'X'"), ("ACE-NME", "no amino acid"), ("A-A", "one-letter"),
    ("AA1", "unknown one-letter"),
])
def test_bad_sequences_are_input_errors(seq, words):
    with pytest.raises(InputError, match=words):
        parse_sequence(seq)


@pytest.mark.parametrize("seq", ["ACE-ALA-NME-ALA", "", "ACE-FOO-NME"])
def test_cli_bad_sequence_one_line_exit_2(tmp_path, capsys, seq):
    rc = main(["prepare", "--sequence", seq, "-o", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "p" / "system.xml").exists()


def test_cli_sequence_and_input_conflict(tmp_path, capsys):
    assert main(["prepare", "alanine-dipeptide", "--sequence", "AAA", "-o", str(tmp_path / "p")]) == 2
    assert main(["prepare", "-o", str(tmp_path / "q")]) == 2


# --- building ---------------------------------------------------------------------------------

def test_tetrapeptide_from_sequence(tetra):
    assert tetra.n_atoms == 42 and len(tetra.heavy_indices) == 20
    assert [r.name for r in tetra.topology.residues()] == ["ALA"] * 3  # caps merged (CHARMM ACE/CT3 patches)
    names = [a.name for a in tetra.topology.atoms()]
    for cap_atom in ("CAY", "CY", "OY", "NT", "CAT", "HNT"):
        assert names.count(cap_atom) == 1
    charge = sum(f.getParticleParameters(i)[0]._value for f in tetra.system.getForces()
                 if type(f).__name__ == "NonbondedForce" for i in range(f.getNumParticles()))
    assert abs(charge) < 1e-6
    # minimised: forces small, and the energy is that of OpenMM at the stored positions
    import openmm

    ctx = openmm.Context(tetra.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(tetra.positions)
    st = ctx.getState(getForces=True)
    assert np.abs(st.getForces(asNumpy=True)._value).max() < 150.0  # kJ/mol/nm after minimisation (built: >1e3)
    assert tetra.metadata["builder"] == "sequence" and tetra.metadata["sequence"] == TETRA


def _cap_omegas_charmm(ms) -> dict[str, float]:
    """Cap amide torsions (degrees) of a prepared system (CHARMM names: ACE = CAY-CY-N-CA of the first
    residue, NME = CA-C-NT-CAT of the last)."""
    from boltzflow.core.geometry import dihedral_of

    res = list(ms.topology.residues())

    def idx(r, name):
        return next(a.index for a in r.atoms() if a.name == name)

    out = {}
    names = {a.name for a in ms.topology.atoms()}
    if "CAY" in names:
        r = res[0]
        out["ACE"] = float(np.degrees(dihedral_of(ms.positions, [idx(r, "CAY"), idx(r, "CY"), idx(r, "N"), idx(r, "CA")])[0]))
    if "CAT" in names:
        r = res[-1]
        out["NME"] = float(np.degrees(dihedral_of(ms.positions, [idx(r, "CA"), idx(r, "C"), idx(r, "NT"), idx(r, "CAT")])[0]))
    return out


def test_caps_are_trans(tetra):
    """pdbfixer places ACE cis (omega ~ 2 degrees); the builder turns every cap amide trans, which the
    simulations at <= 700 K could never do themselves (the isomers are ~20 kcal/mol apart)."""
    om = _cap_omegas_charmm(tetra)
    assert set(om) == {"ACE", "NME"} and all(abs(v) > 150.0 for v in om.values()), om


def test_dipeptide_from_sequence_builds_trans():
    """One residue between two caps: pdbfixer cannot place caps on a one-residue chain, so NME is built
    from a glycine; alanine dipeptide then has the shipped system's atoms and trans caps."""
    from boltzflow.systems.builtin import builtin_system

    ms = from_sequence("ACE-ALA-NME")
    assert ms.n_atoms == 22 and sorted(_order(ms)) == sorted(_order(builtin_system("alanine-dipeptide")))
    om = _cap_omegas_charmm(ms)
    assert all(abs(v) > 150.0 for v in om.values()), om
    with pytest.raises(InputError, match="ACE-ALA-NME"):
        from_sequence("ACE-ALA")  # one residue without NME: a clear error, not pdbfixer's ZeroDivisionError


def test_native_energy_equals_openmm_on_tetrapeptide(tetra):
    import torch

    from boltzflow.energy import Energy

    rng = np.random.default_rng(0)
    x = tetra.positions[None] + 0.003 * rng.standard_normal((4, tetra.n_atoms, 3))
    ref = np.array([_openmm_energy(tetra, xi) for xi in x]) / tetra.kT
    u = Energy(tetra, backend="native", dtype=torch.float64)(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(u, ref, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("name, seq", [("alanine-tetrapeptide", TETRA), ("alanine-hexapeptide", HEXA)])
def test_builtin_peptides_have_the_atom_order_of_prepare_sequence(tmp_path, name, seq, tetra):
    built = tetra if seq == TETRA else from_sequence(seq, minimize=False)
    ship = builtin_system(name)
    assert _order(ship) == _order(built)
    assert sorted(tuple(sorted((b[0].index, b[1].index))) for b in ship.topology.bonds()) == \
        sorted(tuple(sorted((b[0].index, b[1].index))) for b in built.topology.bonds())
    # same force field terms: equal energies at the same coordinates (the built coordinates themselves
    # are not bitwise reproducible, see boltzflow.systems.sequence)
    assert _openmm_energy(built, ship.positions) == pytest.approx(_openmm_energy(ship, ship.positions), rel=1e-9)
    assert isinstance(ship.modes, PeptideModes) and ship.modes.to_dict() == built.modes.to_dict()
    # the PSF route gives the same energy
    psf = builtin_system(name, route="psf")
    assert _openmm_energy(psf, ship.positions) == pytest.approx(_openmm_energy(ship, ship.positions), rel=1e-8, abs=1e-6)
    if seq == TETRA:  # the CLI gives the same system
        assert main(["prepare", "--sequence", seq, "-o", str(tmp_path / "p")]) == 0
        loaded = MolecularSystem.load(tmp_path / "p")
        assert _order(loaded) == _order(ship) and loaded.fingerprint() == ship.fingerprint()
        assert loaded.modes.to_dict() == ship.modes.to_dict()
        meta = json.loads((tmp_path / "p" / "metadata.json").read_text())
        assert meta["modes"]["kind"] == "peptide" and len(meta["modes"]["residues"]) == 3


def test_zwitterionic_one_letter_sequences():
    ms = from_sequence("AAAA", minimize=False)
    names = [a.name for a in ms.topology.atoms()]
    assert ms.n_atoms == 43 and "OXT" in names
    n_term = next(a for a in ms.topology.atoms() if a.name == "N")
    n_h = sum(1 for b in ms.topology.bonds() if n_term in b and b[0].element.symbol + b[1].element.symbol == "NH"
              or n_term in b and b[0].element.symbol + b[1].element.symbol == "HN")
    assert n_h == 3  # NH3+
    charge = sum(f.getParticleParameters(i)[0]._value for f in ms.system.getForces()
                 if type(f).__name__ == "NonbondedForce" for i in range(f.getNumParticles()))
    assert abs(charge) < 1e-6
    # the terminal residues have only psi / only phi: states exist for the two inner ones
    assert [r[0] for r in ms.modes.residues] == [1, 2]
    chig = from_sequence("GYDPETGTWG", solvent="obc2", minimize=False)
    assert chig.n_atoms == 138 and chig.solvent == "obc2"
    q = sum(f.getParticleParameters(i)[0]._value for f in chig.system.getForces()
            if type(f).__name__ == "NonbondedForce" for i in range(f.getNumParticles()))
    assert q == pytest.approx(-2.0, abs=1e-6)  # Asp, Glu; zwitterionic ends cancel
    assert len(chig.modes.residues) == 8


# --- modes --------------------------------------------------------------------------------------

def test_backbone_state_boundaries():
    phi = np.array([-60, -60, -60, -60, -150, -80, 60, 0.0, -0.001, -75, -75])
    psi = np.array([-45, -120, 49.9, 50, 150, 75, 45, -170, 0, 145, -121])
    want = ["alpha_R", "alpha_R", "alpha_R", "beta_PPII", "beta_PPII", "beta_PPII", "alpha_L", "alpha_L", "alpha_R",
            "beta_PPII", "beta_PPII"]
    assert [BACKBONE_STATES[i] for i in backbone_states(phi, psi)] == want


@pytest.mark.parametrize("backbone, state", [
    ((-60.0, -45.0), "alpha_R"), ((-150.0, 150.0), "beta_PPII"), ((-75.0, 145.0), "beta_PPII"), ((60.0, 40.0), "alpha_L"),
])
def test_modes_of_built_structures(backbone, state):
    # PeptideBuilder sets every torsion between two amino acids; the caps' (phi of the first residue, psi
    # of the last) come from pdbfixer's placement. In the tetrapeptide res1 (ALA3) has both set.
    ms = from_sequence(TETRA, backbone=backbone, minimize=False)
    m = ms.modes
    phi, psi = m.torsions_deg(ms.positions)
    np.testing.assert_allclose(phi[0, 1:], backbone[0], atol=1.0)
    np.testing.assert_allclose(psi[0, :2], backbone[1], atol=1.0)
    assert BACKBONE_STATES[m.residue_states(ms.positions)[0, 1]] == state
    x = ms.positions[None]
    assert parse_region(f"mode=res1_{state}", topology=ms.topology, modes=m)(x)[0]
    for other in BACKBONE_STATES:
        if other != state:
            assert not parse_region(f"mode=res1_{other}", topology=ms.topology, modes=m)(x)[0]
    # the same residue is phi1/psi1 of the grammar
    assert parse_region(f"phi1<{backbone[0] + 2} & phi1>{backbone[0] - 2} & psi1>{backbone[1] - 2}",
                        topology=ms.topology)(x)[0]
    if state == "alpha_L":
        assert m.names[m.assign(x)[0]] == "any_alpha_L" and parse_region("mode=any_alpha_L", modes=m)(x)[0]


def test_whole_molecule_states_from_residue_states(tetra):
    m = tetra.modes
    assert [m.names[i] for i in m.assign(tetra.positions[None])] == ["extended"]  # the shipped build
    table = np.array([[0, 0, 0], [1, 1, 1], [0, 1, 1], [1, 1, 0], [2, 1, 1], [0, 0, 2], [2, 2, 2]])
    want = ["helix", "extended", "mixed", "mixed", "any_alpha_L", "any_alpha_L", "any_alpha_L"]
    object.__setattr__(m, "residue_states", lambda x: table)  # on this instance only
    try:
        assert [m.names[i] for i in m.assign(np.zeros((7, 42, 3)))] == want
        assert m.fractions(np.zeros((7, 42, 3)))["any_alpha_L"] == pytest.approx(3 / 7)
        assert list(m.region("res2_alpha_L")(None)) == [False] * 5 + [True, True]
    finally:
        object.__delattr__(m, "residue_states")


def test_modes_roundtrip_and_names(tetra):
    m = tetra.modes
    assert modes_from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(InputError, match="res0_alpha_R"):
        parse_region("mode=res9_alpha_R", modes=m)
    ind = m.indicators()
    assert set(ind) == set(m.names) | set(m.region_names) and len(m.region_names) == 9
    assert [r[1] for r in m.residues] == ["ALA2", "ALA3", "ALA4"]


def test_prepared_pdb_peptide_gets_modes(tmp_path):
    from boltzflow.systems.builtin import builtin_dir
    from boltzflow.systems.pdb import from_pdb

    ms = from_pdb(builtin_dir("alanine-dipeptide") / "alanine-dipeptide.pdb")
    assert isinstance(ms.modes, PeptideModes) and len(ms.modes.residues) == 1
    # for one residue, any_alpha_L is the dipeptide's phi > 0
    adp = builtin_system("alanine-dipeptide")
    rng = np.random.default_rng(1)
    x = adp.positions[None] + 0.05 * rng.standard_normal((200, adp.n_atoms, 3))
    np.testing.assert_array_equal(ms.modes.assign(x) == 3, adp.modes.assign(x) == 1)


def test_capped_ends_get_the_requested_backbone_torsions():
    """phi of the first and psi of the last residue (set by turning the caps, not left to pdbfixer) are the
    requested ones like every other backbone torsion; the cap amides stay trans."""
    for backbone in ((-70.0, 140.0), (60.0, 40.0)):
        ms = from_sequence(TETRA, backbone=backbone, minimize=False)
        phi, psi = ms.modes.torsions_deg(ms.positions[None])
        np.testing.assert_allclose(phi[0], backbone[0], atol=0.5)
        np.testing.assert_allclose(psi[0], backbone[1], atol=0.5)
        assert all(abs(v) > 150.0 for v in _cap_omegas_charmm(ms).values())
