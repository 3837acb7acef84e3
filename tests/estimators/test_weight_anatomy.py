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


def test_state_excess_finds_the_state_a_generator_under_fits():
    from weight_anatomy import state_excess

    from boltzflow.sampling import SampleSet
    from boltzflow.systems.builtin import builtin_system

    system = builtin_system("alanine-tetrapeptide")
    x = np.asarray(SampleSet.load(ROOT / "systems" / "alanine-tetrapeptide" / "reference_300K.npz").positions[:3000],
                   dtype=np.float64)
    names = np.array(["".join("RBL"[v] for v in row) for row in system.modes.residue_states(x)])
    rare = sorted(k for k in set(names) if 20 <= (names == k).sum() <= 200)[0]
    lw = 0.1 * np.random.default_rng(3).standard_normal(len(x))
    lw[names == rare] += 2.0  # q is e^2 too small on the frames of one state
    lw[5] = np.nan  # an unscorable frame is left out
    out = state_excess(system, x, lw)
    assert out["n"] == len(x) - 1 and out["n_invalid"] == 1
    by = out["states"]
    assert sum(v["n"] for v in by.values()) == len(x) - 1
    share = (names == rare).sum() / len(x)
    assert by[rare]["excess"] == pytest.approx(2.0 * (1 - share), abs=4 * by[rare]["se"] + 0.02)
    others = [v for k, v in by.items() if k != rare and v["n"] > 50]
    assert all(abs(v["excess"] + 2.0 * share) < 4 * v["se"] + 0.02 for v in others)


def test_frames_option_scores_training_and_reference_frames_with_the_runs_generator(tmp_path, capsys):
    import json

    from weight_anatomy import main

    run = ROOT / "systems" / "alanine-tetrapeptide" / "generators" / "default"
    ref = ROOT / "systems" / "alanine-tetrapeptide" / "reference_300K.npz"
    out = main([str(run), "--frames", str(ref), "--frames", str(ref), "--frames-n", "400", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
    a = out["frames"][str(ref)]
    assert 300 <= a["n"] <= 400 and a["n_invalid"] == 0
    assert abs(sum(v["n"] * v["excess"] for v in a["states"].values())) < 1e-6 * a["n"]  # excess about the mean
    assert all(abs(g) < 1e-9 for g in out["gap"][str(ref)].values())  # the same frames: no gap
    with pytest.raises(SystemExit) as e:
        main([str(run), "--frames", str(tmp_path / "none.npz")])
    assert e.value.code == 2
