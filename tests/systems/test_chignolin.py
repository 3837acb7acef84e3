"""Scale check on a real mini-protein: chignolin (GYDPETGTWG, zwitterionic ends, CHARMM36m + OBC2) prepares,
its native energy matches OpenMM (Reference platform, float64: per term, total, forces), and
benchmarks/scale_check.py runs prepare -> energy -> train -> sample on it at toy size.

Slow (the CHARMM36m force field parse and the minimisation of 138 atoms take ~1 min on the shared machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "energy"))
from parity import assert_native_matches_openmm  # noqa: E402

pytestmark = pytest.mark.slow

CHIGNOLIN = "GYDPETGTWG"


@pytest.fixture(scope="module")
def chignolin():
    from boltzflow.systems.sequence import from_sequence

    return from_sequence(CHIGNOLIN, solvent="obc2")


def test_chignolin_prepares_with_obc2_charges_and_states(chignolin):
    import openmm

    ms = chignolin
    assert ms.solvent == "obc2" and ms.n_atoms == 138 and len(ms.heavy_indices) == 77
    names = [r.name for r in ms.topology.residues()]
    assert names == ["GLY", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "GLY"]
    forces = {type(f).__name__: f for f in ms.system.getForces()}
    assert "CustomGBForce" in forces  # implicit solvent (OBC2 of implicit/obc2.xml)
    nb = forces["NonbondedForce"]
    charge = sum(nb.getParticleParameters(i)[0].value_in_unit(openmm.unit.elementary_charge) for i in range(ms.n_atoms))
    # NH3+ (Gly1) + COO- (Gly10) + Asp- + Glu- = -2 e
    assert charge == pytest.approx(-2.0, abs=1e-6)
    # every residue with phi and psi gets backbone states (Gly1 has no phi, Gly10 no psi)
    assert [r[1] for r in ms.modes.residues] == ["TYR2", "ASP3", "PRO4", "GLU5", "THR6", "GLY7", "THR8", "TRP9"]
    assert np.isfinite(ms.positions).all()


def test_chignolin_native_energy_matches_openmm(chignolin):
    from boltzflow.energy import Energy
    from boltzflow.energy.native import NativeEnergy, unsupported_forces

    torch.set_num_threads(1)
    ms = chignolin
    assert unsupported_forces(ms.system) == []
    assert isinstance(Energy(ms, backend="auto"), NativeEnergy)  # auto picks native: GB included
    rng = np.random.default_rng(3)
    x = torch.tensor(ms.positions[None] + rng.normal(scale=0.01, size=(6,) + ms.positions.shape))
    tn = assert_native_matches_openmm(ms, x, 1e-6, label=("chignolin",))
    assert "gb" in tn
    # the minimised structure sits far below the perturbed ones (a real minimum of the full energy with GB)
    native = NativeEnergy(ms)
    u0 = native(torch.tensor(ms.positions[None]))
    assert float(u0) < float(native(x).min())


def test_scale_check_quick_on_chignolin(chignolin, tmp_path, capsys, monkeypatch):
    """benchmarks/scale_check.py at toy size on the prepared chignolin: trains a few steps of both stages
    and samples with finite energies; the JSON has the numbers docs/peptides.md records."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import scale_check

    chignolin.save(tmp_path / "chig")
    out = scale_check.main(["--system", str(tmp_path / "chig"), "--quick", "--json"])
    assert out["n_atoms"] == 138 and out["solvent"] == "obc2" and out["n_residues_with_states"] == 8
    e = out["energy"]
    assert e["backend"] == "native" and e["parity_max_abs_kT"] < 0.05  # float32 vs OpenMM CPU (mixed)
    assert e["native_cpu_s_per_1000"] > 0 and e["openmm_cpu_s_per_1000"] > 0
    t = out["train"]
    assert t["steps"] == 8 and t["ml"]["loss"] == "klz" and t["klx_path"]["loss"] == "klx_path"
    assert t["ml"]["s_per_step"] > 0 and t["klx_path"]["energy_evals_per_step"] >= 16
    assert t["tempering"]["energy_evals"] > 0
    s = out["sample"]
    assert s["n"] == 64 and s["fraction_finite_energy"] == 1.0 and 0 < s["kish_ess_fraction"] <= 1
    rss = out["peak_rss_mb"]
    assert rss["start"] <= rss["energy"] <= rss["train"] <= rss["sample"]
