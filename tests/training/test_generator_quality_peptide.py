"""Per-residue backbone-state populations: the estimator, ``boltzflow estimate`` on a peptide, and
benchmarks/generator_quality.py on the alanine tetrapeptide at toy size (same JSON as the dipeptide's)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from boltzflow.estimators import Estimate
from boltzflow.estimators.analysis import residue_populations, residue_region_names, z_score
from boltzflow.sampling import SampleSet
from boltzflow.systems.builtin import builtin_system
from boltzflow.systems.modes import BACKBONE_STATES

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import generator_quality as gq  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "systems" / "alanine-tetrapeptide" / "reference_300K.npz"


@pytest.fixture(scope="module")
def tetra():
    return builtin_system("alanine-tetrapeptide")


def test_z_score():
    assert z_score(Estimate("a", 0.5, 0.03), Estimate("b", 0.46, 0.04)) == pytest.approx(0.8)
    assert z_score(Estimate("a", 0.0, 0.0), Estimate("b", 0.0, 0.0)) == 0.0
    assert z_score(Estimate("a", 0.1, 0.0), Estimate("b", 0.0, 0.0)) == math.inf
    assert math.isnan(z_score(Estimate("a", 0.1), Estimate("b", 0.0, 0.01)))


def test_residue_populations_of_weighted_samples_match_the_states(tetra):
    """Weighted populations equal the weight fractions of the residue states; each residue sums to 1, and the
    whole-molecule any_alpha_L lies between the largest residue alpha_L and their sum."""
    ref = SampleSet.load(REFERENCE)
    x = ref.positions[:200]
    rng = np.random.default_rng(0)
    lw = rng.normal(size=len(x))
    s = SampleSet(x, log_weights=lw)
    pops = residue_populations(tetra.modes, s, n_bootstrap=0)
    names = residue_region_names(tetra.modes)
    assert list(pops) == names == [f"res{i}_{st}" for i in range(3) for st in BACKBONE_STATES]
    w = np.exp(lw - lw.max())
    w /= w.sum()
    st = tetra.modes.residue_states(x)
    for k, name in enumerate(names):
        r, j = divmod(k, 3)
        assert pops[name].value == pytest.approx(float(w[st[:, r] == j].sum()), abs=1e-12)
        assert pops[name].stderr >= 0
    for r in range(3):
        assert sum(pops[f"res{r}_{st}"].value for st in BACKBONE_STATES) == pytest.approx(1.0)
    # an alpha_L residue somewhere: the molecule's minor mode (needs some alpha_L frames: make one by mirroring)
    xm = x.copy()
    xm[:20] = -xm[:20]  # mirror images: phi -> -phi, so alpha_R/beta_PPII residues become alpha_L
    sm = SampleSet(xm, log_weights=lw)
    pm = residue_populations(tetra.modes, sm, n_bootstrap=0)
    lab = tetra.modes.assign(xm)
    p_any = float(w[lab == list(tetra.modes.names).index("any_alpha_L")].sum())
    per = [pm[f"res{r}_alpha_L"].value for r in range(3)]
    assert p_any > 0 and max(per) - 1e-12 <= p_any <= sum(per) + 1e-12


def test_estimate_cli_reports_residue_states_with_block_errors(tetra, capsys):
    """`boltzflow estimate` on the shipped reference (time-ordered frames): every residue state as P(...),
    with block errors, the same number as the --population expression for it."""
    from boltzflow.cli import main

    assert main(["estimate", str(REFERENCE), "--system", "alanine-tetrapeptide", "--population",
                 "mode=res0_alpha_R", "--bootstrap", "0", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in residue_region_names(tetra.modes):
        assert f"P({name})" in rows
    assert rows["P(res0_alpha_R)"]["value"] == pytest.approx(rows["P(mode=res0_alpha_R)"]["value"])
    assert rows["P(res0_alpha_R)"]["stderr"] == pytest.approx(rows["P(mode=res0_alpha_R)"]["stderr"])
    # physics of the vacuum reference (REFERENCE.md, two native-tempering runs): ALA2, next to the ACE cap,
    # has phi > 0 in 0.43 +- 0.01 of the ensemble, ALA3 is mostly alpha_R (0.64), ALA4 rarely alpha_L (0.009)
    assert 0.33 < rows["P(res0_alpha_L)"]["value"] < 0.53
    assert 0.55 < rows["P(res1_alpha_R)"]["value"] < 0.73
    assert rows["P(res2_alpha_L)"]["value"] < 0.03
    for r in range(3):
        assert sum(rows[f"P(res{r}_{st})"]["value"] for st in BACKBONE_STATES) == pytest.approx(1.0)


def test_generator_quality_quick_tetrapeptide(tmp_path, capsys):
    # the peptide recipe (the default for the tetrapeptide) at toy size
    out = gq.main(["--system", "alanine-tetrapeptide", "--route", "peptide", "--quick", "--seeds", "0",
                   "--samples", "300", "--curve-samples", "100", "--out", str(tmp_path), "--json",
                   "--set", "generator.lead_blocks=1"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["system"] == "alanine-tetrapeptide" and printed["route"] == "peptide" and len(out["seeds"]) == 1
    s = out["seeds"][0]
    assert {"seed", "ess", "any_alpha_L", "log_z", "energy_evals", "wall_s", "curve", "n_samples",
            "curve_checkpoints", "residue_populations", "residue_max_abs_z"} <= set(s)
    assert s["n_samples"] == 300 and 0 < s["ess"] <= 1 and s["energy_evals"] > s["data_energy_evals"] + 300
    res = s["residue_populations"]
    assert list(res) == [f"res{i}_{st}" for i in range(3) for st in BACKBONE_STATES]
    assert [res[f"res{i}_alpha_R"]["label"] for i in range(3)] == ["ALA2", "ALA3", "ALA4"]
    ref = out["reference_residue_populations"]
    for name, r in res.items():
        assert 0 <= r["value"] <= 1 and r["stderr"] >= 0
        assert r["reference"] == pytest.approx(ref[name]["value"])
        se = math.hypot(r["stderr"], r["reference_stderr"])
        if se > 0:
            assert r["z"] == pytest.approx((r["value"] - r["reference"]) / se)
    for i in range(3):
        assert sum(res[f"res{i}_{st}"]["value"] for st in BACKBONE_STATES) == pytest.approx(1.0)
        assert sum(ref[f"res{i}_{st}"]["value"] for st in BACKBONE_STATES) == pytest.approx(1.0)
    finite = [abs(r["z"]) for r in res.values() if math.isfinite(r["z"])]
    assert s["residue_max_abs_z"] == pytest.approx(max(finite))
