"""benchmarks/weight_anatomy.py splits the Kish deficit correctly on weights of known structure."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from weight_anatomy import anatomy  # noqa: E402


@pytest.fixture(scope="module")
def dipeptide():
    from boltzflow.sampling import SampleSet
    from boltzflow.systems import MolecularSystem

    system = MolecularSystem.load(ROOT / "systems" / "alanine-dipeptide" / "generators" / "energy" / "system")
    ref = SampleSet.load(ROOT / "systems" / "alanine-dipeptide" / "reference_300K.npz")
    return system, np.asarray(ref.positions[:4000], dtype=np.float64)


def test_state_split_and_linear_fit(dipeptide):
    system, x = dipeptide
    rng = np.random.default_rng(0)
    lab = system.modes.assign(x)
    minor = system.modes.names.index(system.modes.minor)
    # weights noisy only inside the major state: learning it exactly removes the whole deficit
    lw = 0.5 * rng.standard_normal(len(x))
    lw[lab == minor] = np.log(np.mean(np.exp(lw[lab != minor])))  # the major state's mean weight
    out = anatomy(system, x, lw)
    major = [n for n in system.modes.names if n != system.modes.minor][0]
    assert out["kish"] < 0.9
    assert out["states"][major]["kish_if_state_exact"] == pytest.approx(1.0, abs=1e-12)
    assert out["states"][system.modes.minor]["kish_within"] == pytest.approx(1.0)
    assert abs(out["linear_r2"]) < 0.05  # noise is no function of the coordinates
    # weights a linear function of one bond length: the linear fit explains nearly all of Var(w)
    d = np.linalg.norm(x[:, 4] - x[:, 6], axis=-1)
    w = 1.0 + 0.3 * (d - d.mean()) / d.std()
    out = anatomy(system, x, np.log(w))
    assert out["linear_r2"] > 0.99
    assert out["chi2"] == pytest.approx(np.var(w / w.mean()), rel=1e-9)


def test_largest_weights_are_listed_with_their_state(dipeptide):
    system, x = dipeptide
    lw = np.zeros(len(x))
    lw[[7, 11]] = [np.log(50.0), np.log(30.0)]  # two draws q under-weights 50- and 30-fold
    lw[3] = -np.inf  # an invalid draw: skipped, indices still refer to the input
    out = anatomy(system, x, lw)
    first, second = out["largest"][:2]
    assert (first["index"], second["index"]) == (7, 11)
    n = len(x) - 1
    mean = (n - 2 + 80.0) / n
    assert first["w"] == pytest.approx(50.0 / mean)
    assert first["w2_share"] == pytest.approx(2500.0 / (n - 2 + 2500.0 + 900.0))
    assert first["state"] == system.modes.names[int(system.modes.assign(x[7:8])[0])]
    for row in out["largest"]:  # the dipeptide's states are the sign of phi, the listed torsion
        assert (row["mode_coordinate_deg"] > 0) == (row["state"] == "phi_positive")


def test_peptide_residue_state_split_adds_up_to_the_kish_deficit():
    from boltzflow.sampling import SampleSet
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-tetrapeptide")
    x = np.asarray(SampleSet.load(ROOT / "systems" / "alanine-tetrapeptide" / "reference_300K.npz").positions[:3000],
                   dtype=np.float64)
    st = system.modes.residue_states(x)
    names = np.array(["".join("RBL"[v] for v in row) for row in st])
    rare = sorted(k for k in set(names) if 5 <= (names == k).sum() <= 100)[0]
    lw = 0.3 * np.random.default_rng(1).standard_normal(len(x))
    lw[names == rare] += np.log(20.0) + 0.5 * np.random.default_rng(2).standard_normal((names == rare).sum())
    out = anatomy(system, x, lw)
    by = out["residue_states"]
    assert set(by) == set(names) and all(len(k) == 3 for k in by)
    assert next(iter(by)) == rare  # largest share first
    assert sum(v["w2_share"] for v in by.values()) == pytest.approx(1.0)
    # 1/Kish = sum_s P_s^2 / (Q_s kish_s)
    inv = sum(v["mass"] ** 2 / (v["samples"] * v["kish_within"]) for v in by.values())
    assert inv == pytest.approx(1.0 / out["kish"], rel=1e-9)
    assert by[rare]["samples"] == pytest.approx((names == rare).mean())
